""" What the benchmark scripts share: their common command-line options, the lines their results files start
with, the timers, the training step they time, and the results writer.

The scripts import it by name: Python puts benchmarks/ first on the path when it runs one of them.

Timing. `op_time` hands short operations (run.py's batch-1 and batch-8 eval forwards) to
`torch.utils.benchmark`: `Timer.blocked_autorange` warms up, picks how many calls to time per block and
reports the median over a time budget. What it does not do stays here:
  * `median_time`: a fixed number of single runs after a fixed number of untimed ones, as the scripts'
    --reps / --warmup flags promise (a training step takes seconds, so the count matters). torch's Timer
    runs either for a time budget (blocked_autorange) or as one block whose mean it returns, after warm-up
    runs of its own (timeit). On a CUDA device `median_time` times with CUDA events, which clock the GPU
    work alone (Timer synchronizes the device around each block instead);
  * `interleaved_times`: several functions timed back to back in each round, in alternating order, so
    that load drifting during a run on a shared machine hits them alike (the ratio benchmarks);
  * whole runs timed once (a first, compiling step; a training run): `time.perf_counter` where they happen;
    peak memory (CUDA's allocator statistics, the process's peak RSS) where it is read.
"""
import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as torch_benchmark

RESULTS = Path(__file__).resolve().parent / 'results'
# CIFAR-10 as an ImageFolder of JPEGs (cifar10/train/<class>/NNNN.jpg, cifar10/test/...: the official split, in the
# original order; about quality 75, so accuracies sit a little below the lossless original's). It sits beside the
# repository for developers and CI; a user's clone does not have it (benchmarks/cifar10.py --data takes their copy)
CIFAR10_ARCHIVE = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
SMOKE_NOTE = ' (smoke run: tiny sizes, not a measurement)'
CIFAR_MODELS = ('smp_flexnet_16', 'flexnet_16')


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def bench_parser(doc: str, out: str, reps: int | None = None, threads: bool = True) -> argparse.ArgumentParser:
    """Argument parser with the options the scripts share: --out (results file, default benchmarks/results/OUT),
    --smoke, and --threads (when `threads`) and --reps (when a default is given)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads:
        parser.add_argument('--threads', type=positive_int, default=2, help='torch CPU threads (default: 2)')
    if reps is not None:
        parser.add_argument('--reps', type=positive_int, default=reps, help=f'timed repetitions (default: {reps})')
    parser.add_argument('--out', type=Path, default=RESULTS / out, help=f'results file (default: benchmarks/results/{out})')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny sizes and few repetitions: checks that the script runs; its numbers mean nothing')
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse; a smoke run gets one repetition; set torch's CPU thread count where the parser has --threads."""
    args = parser.parse_args(argv)
    if args.smoke and hasattr(args, 'reps'):
        args.reps = 1
    if getattr(args, 'threads', None):
        torch.set_num_threads(args.threads)
    return args


def host() -> str:
    """The processor, as the platform names it."""
    return platform.processor() or platform.machine()


def machine_line(command: str, threads: int | None = None, sep: str = '; ', timm_version: bool = False) -> str:
    """'Machine: <processor>, <cores> cores[, <threads> threads]<sep>torch <version>[, timm <version>]. Command: `...`.'
    Most results files use sep '; '; digits.md and reparam.md, with their own fields, ', '."""
    machine = f'Machine: {host()}, {os.cpu_count()} cores' + (f', {threads} threads' if threads else '')
    versions = f'torch {torch.__version__}'
    if timm_version:
        import timm
        versions += f', timm {timm.__version__}'
    return f'{machine}{sep}{versions}. Command: `{command}`.'


def results_head(title: str, command: str, args: argparse.Namespace) -> list:
    """The first lines of a results file: title (marked on a smoke run), machine line, blank line."""
    return [f'# {title}' + (SMOKE_NOTE if args.smoke else ''), '', machine_line(command, args.threads), '']


def write_results(path: Path, lines) -> Path:
    """Write a results file from its lines, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n')
    return path


def median_time(fn, warmup: int, reps: int, device: torch.device | None = None) -> float:
    """Median seconds of `reps` single calls of fn() after `warmup` untimed ones; on a CUDA device timed with
    CUDA events (the GPU work alone), else with the host clock. (Why not torch.utils.benchmark: module doc.)"""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device is not None and device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def op_time(fn, min_run_time: float) -> float:
    """Median seconds per call of a short operation, from torch.utils.benchmark's blocked_autorange over at
    least `min_run_time` seconds, run at torch's current thread count (Timer's own default is one thread)."""
    timer = torch_benchmark.Timer(stmt='fn()', globals={'fn': fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_times(fns: dict, warmup: int, rounds: int) -> dict:
    """Wall-clock times (s) of every function in `fns`, all timed back to back in each round (in reverse order on
    odd rounds), so load that drifts during the run hits them alike. {name: [time per round]}. (Not the process's
    CPU time: with several threads it is not the step time a user waits for.)"""
    for _ in range(warmup):
        for f in fns.values():
            f()
    items = list(fns.items())
    times = {k: [] for k in fns}
    for i in range(rounds):
        for k, f in items if i % 2 == 0 else items[::-1]:
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def interleaved_medians(fns: dict, warmup: int, rounds: int, scale: float = 1.0) -> dict:
    """Median time of every function in `fns` (interleaved_times), times `scale` (1e3: milliseconds)."""
    return {k: scale * statistics.median(v) for k, v in interleaved_times(fns, warmup, rounds).items()}


def train_step(model, x, y, opt, amp: bool = False):
    """A training step to time: zeroed gradients, cross-entropy of model(x) against y (under bfloat16
    autocast when `amp`), backward, opt.step()."""
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


# --smoke builds every model one block per stage (the same layer types, a fraction of the time): smoke runs check
# that a script works and writes its report, they measure nothing
SMOKE_MODEL_KWARGS = {
    **{n: dict(layers=(1, 1, 1, 1)) for n in ('smpconv_t', 'smpconv_b', 'smpconv_mobile31', 'smpconv_mobile51',
                                              'resnet50')},
    'convnext_tiny': dict(depths=(1, 1, 1, 1)),
    **{n: dict(widths=(24,)) for n in CIFAR_MODELS + ('ckcnn_16',)},
}


def model_kwargs(name: str, smoke: bool) -> dict:
    """Extra create_model arguments for `name`: the one-block-per-stage version in smoke runs, none otherwise."""
    return dict(SMOKE_MODEL_KWARGS.get(name, {})) if smoke else {}


def build_workload(name: str, memory_format=None, smoke: bool = False):
    """The CPU benchmarks' training workload: model `name` ('flexnet_16' with its masks fully grown,
    'flexnet_16@init' as initialised), its training batch (inputs, targets) and an AdamW optimizer.
    CIFAR models: batch 64 at 32 px, 10 classes; ImageNet models: batch 8 at 224 px (smoke: batch 2 at
    16 / 64 px, one block per stage)."""
    import timm

    import timm_smpconv  # noqa: F401

    torch.manual_seed(0)
    arch = name.split('@')[0]
    cifar = arch in CIFAR_MODELS
    size, batch = (32, 64) if cifar else (224, 8)
    if smoke:
        size, batch = (16 if cifar else 64), 2
    model = timm.create_model(arch, num_classes=10 if cifar else 1000, **model_kwargs(arch, smoke))
    if name == 'flexnet_16':  # masks fully grown: every FlexConv kernel spans the whole 33 x 33 horizon
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, 'mask_params', None) is not None:
                    m.mask_params[:, 1].fill_(1.0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10 if cifar else 1000, (batch,))
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, x, y, opt


def cifar10_options(parser: argparse.ArgumentParser, train_per_class: int, workers: int):
    """The CIFAR-10 scripts' data options: --data, --train-per-class, --workers, --runs."""
    parser.add_argument('--data', type=Path, default=CIFAR10_ARCHIVE,
                        help='CIFAR-10: the JPEG archive or its extracted folder (default: ../shared/data/cifar10-jpeg.tar.gz)')
    parser.add_argument('--train-per-class', type=int, default=train_per_class,
                        help=f'training images per class, the first N of each (default: {train_per_class}; 0: all 5,000)')
    parser.add_argument('--workers', type=int, default=workers, help=f'data loading processes (default: {workers})')
    parser.add_argument('--runs', type=Path, default=None,
                        help='keep the run folders (checkpoints, logs) here (default: a temporary folder)')


def cifar10_folder(data, dest, train_per_class: int | None = None, test_per_class: int | None = None) -> Path:
    """The CIFAR-10 ImageFolder (`train/`, `test/`, one folder per class) from `data`: the JPEG archive (extracted into
    `dest`) or an extracted folder (used as it is, or linked into `dest` for a subset). `train_per_class` /
    `test_per_class` keep the first N images of each class (their original order); None keeps all. Returns the
    folder to pass as --data-dir."""
    import tarfile
    data, dest = Path(data), Path(dest)
    limits = {'train': train_per_class, 'test': test_per_class}

    def keep(split, name):  # name: NNNN.jpg
        return limits.get(split, 0) is None or int(Path(name).stem) < limits[split]

    if data.is_dir():
        root = data / 'cifar10' if (data / 'cifar10' / 'train').is_dir() else data
        if train_per_class is None and test_per_class is None:
            return root
        out = dest / 'cifar10'
        for split in limits:
            for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                (out / split / cls.name).mkdir(parents=True, exist_ok=True)
                for img in cls.iterdir():
                    if keep(split, img.name):
                        (out / split / cls.name / img.name).symlink_to(img.resolve())
        return out
    if not data.is_file():
        raise FileNotFoundError(f'CIFAR-10 data not found: {data} (the JPEG archive cifar10-jpeg.tar.gz or its '
                                f'extracted folder)')
    with tarfile.open(data) as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts  # cifar10/<split>/<class>/NNNN.jpg
            if m.isfile() and len(parts) == 4 and parts[0] == 'cifar10' and keep(parts[1], parts[3]):
                members.append(m)
        tar.extractall(dest, members=members, filter='data')
    return dest / 'cifar10'
