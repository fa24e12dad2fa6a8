""" Benchmark suite: our models against timm's convnext_tiny and resnet50, measured in one run.

    python benchmarks/run.py [--threads 2] [--reps 3] [--models ...] [--pairs ...] [--no-profile] [--out ...] [--smoke]

Each model runs in its own process (so peak memory is its own) and reports:
  * training step (forward + backward + AdamW step) at the stated batch and resolution, median of --reps
    (absolute times; every comparison is a ratio of an interleaved pair run, below);
  * eval latency at batch 1, original and reparameterized (timm.models.reparameterize_model);
  * eval throughput at batch 8 (reparameterized);
  * peak resident memory of the process.
ImageNet models: training batch 8 at 224 px; CIFAR models: batch 64 at 32 px (FlexNet with its masks
fully grown, the 33 x 33 state of a trained model, and at initialisation). For smpconv_t it also
measures the share of a batch-32 training step spent rendering SMP kernels and writes a profile.
Results: benchmarks/results/benchmark.md, and next to it benchmark.png, profile_smpconv_t.txt (channels_last) and
profile_smpconv_t_nchw.txt. Times are
medians; the eval timings are torch.utils.benchmark's (blocked_autorange over 0.3 s per --reps).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from harness import (
    CIFAR_MODELS,
    SMOKE_NOTE,
    bench_parser,
    build_workload,
    interleaved_times,
    machine_line,
    median_time,
    op_time,
    parse_args,
    train_step,
    write_results,
)

IMAGENET = ['smpconv_t', 'smpconv_mobile31', 'convnext_tiny', 'resnet50']
CIFAR = [*CIFAR_MODELS, 'flexnet_16@init']
# interleaved ratio runs, a:b:memory format
PAIRS = ['smpconv_t:convnext_tiny:nchw', 'smpconv_t:convnext_tiny:channels_last', 'smpconv_t:resnet50:nchw',
         'smpconv_mobile31:convnext_tiny:nchw', 'flexnet_16:smp_flexnet_16:nchw', 'flexnet_16@init:smp_flexnet_16:nchw']
OP_SECONDS_PER_REP = 0.3  # time budget of each eval timing (blocked_autorange), per --reps


def _ratio_and_medians(fa, fb, warmup: int, rounds: int):
    """Median of per-round time ratios fa / fb (interleaved_times), with the median times of each."""
    t = interleaved_times({'a': fa, 'b': fb}, warmup, rounds)
    ta, tb = t['a'], t['b']
    return statistics.median(a / b for a, b in zip(ta, tb)), statistics.median(ta), statistics.median(tb)


def pair_worker(spec: str, reps: int, smoke: bool = False) -> dict:
    """Ratios of model a to model b measured in one process, interleaved: 'a:b:format' with format
    'nchw' or 'channels_last'; training step, and (ImageNet models) reparameterized eval latency at
    batch 1."""
    import torch
    from timm.models import reparameterize_model

    a, b, fmt = spec.split(':')
    mf = torch.channels_last if fmt == 'channels_last' else None
    ma, mb = build_workload(a, mf, smoke), build_workload(b, mf, smoke)
    res = {'a': a, 'b': b, 'format': fmt}
    res['train_ratio'], res['train_a_s'], res['train_b_s'] = _ratio_and_medians(
        train_step(*ma), train_step(*mb), 1, 2 * reps + 1)
    if a.split('@')[0] not in CIFAR_MODELS:
        size = ma[1].shape[-1]
        x1 = torch.randn(1, 3, size, size)
        if mf is not None:
            x1 = x1.contiguous(memory_format=mf)
        fa, fb = (reparameterize_model(m[0].eval()) for m in (ma, mb))
        with torch.no_grad():
            res['latency_ratio'], res['latency_a_ms'], res['latency_b_ms'] = _ratio_and_medians(
                lambda: fa(x1), lambda: fb(x1), 3, 10 * reps + 1)
        res['latency_a_ms'] *= 1e3
        res['latency_b_ms'] *= 1e3
    return res


def worker(name: str, reps: int, threads: int, profile_path: Path | None, smoke: bool = False) -> dict:
    import torch
    from timm.models import reparameterize_model

    from timm_smpconv.layers import SMPConv2d

    model, x, y, opt = build_workload(name, smoke=smoke)
    size, batch = x.shape[-1], x.shape[0]
    res = {'model': name, 'params': sum(p.numel() for p in model.parameters()), 'train_batch': batch, 'size': size}

    model.train()
    res['train_step_s'] = median_time(train_step(model, x, y, opt), 1, reps)
    res['train_img_s'] = batch / res['train_step_s']

    if name == 'smpconv_t':
        # share of a batch-32 training step spent rendering the SMP kernels (forward + backward)
        smp = [m for m in model.modules() if isinstance(m, SMPConv2d)]
        batch32 = 2 if smoke else 32
        step32 = train_step(model, torch.randn(batch32, 3, size, size), torch.randint(0, 1000, (batch32,)), opt)

        def render():
            sum(m.get_weight().sum() for m in smp).backward()

        t = interleaved_times({'step': step32, 'render': render}, 1, max(1, reps - 1))
        res['step32_s'], res['render_s'] = (statistics.median(t[k]) for k in ('step', 'render'))
        res['render_share'] = statistics.median(r / st for r, st in zip(t['render'], t['step']))
    model.eval()
    x1 = torch.randn(1, 3, size, size)
    x8 = torch.randn(8, 3, size, size)
    budget = OP_SECONDS_PER_REP * reps
    with torch.no_grad():
        res['latency_ms'] = 1e3 * op_time(lambda: model(x1), budget)
        fused = reparameterize_model(model)
        res['latency_reparam_ms'] = 1e3 * op_time(lambda: fused(x1), budget)
        res['infer_img_s'] = 8 / op_time(lambda: fused(x8), budget)
    res['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if name == 'smpconv_t' and profile_path is not None:  # where a training step spends its time, both layouts
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile
        for fmt, path in ((torch.channels_last, profile_path),
                          (None, profile_path.with_name(profile_path.stem + '_nchw.txt'))):
            step = train_step(*build_workload(name, fmt, smoke))
            step()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            label = 'channels_last' if fmt is not None else 'NCHW input (computed in channels_last: SMPConvNet on the CPU)'
            path.write_text(f'smpconv_t training step, batch {batch}, {size} px, {label}, {threads} threads\n'
                            + prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25))
    return res


def write_report(rows: dict, pairs: dict, threads: int, out_md: Path, out_png: Path, smoke: bool = False):
    lines = [
        '# Benchmarks (CPU)' + (SMOKE_NOTE if smoke else ''),
        '',
        machine_line('python benchmarks/run.py', threads) + ' Medians; every number from one run.',
        '',
        '| model | params | train batch @ px | train step s | train img/s | eval latency ms (bs 1) | '
        'reparam latency ms | reparam img/s (bs 8) | peak RSS MB |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for name, r in rows.items():
        lines.append(
            f'| {name} | {r["params"]:,} | {r["train_batch"]} @ {r["size"]} | {r["train_step_s"]:.3f} | '
            f'{r["train_img_s"]:.1f} | {r["latency_ms"]:.1f} | {r["latency_reparam_ms"]:.1f} | '
            f'{r["infer_img_s"]:.1f} | {r["peak_rss_mb"]:.0f} |')
    p = pairs.get
    lines += ['', '## Ratios, interleaved (one process per pair, the two timed back to back, median of per-round '
              'ratios)', '', '| ratio | memory format | value | goal |', '|---|---|---|---|']
    for fmt in ('channels_last', 'nchw'):
        r = p(f'smpconv_t:convnext_tiny:{fmt}')
        if r:
            lines.append(f'| smpconv_t / convnext_tiny training step (batch 8, 224 px) | {fmt} | '
                         f'{r["train_ratio"]:.2f}x ({r["train_a_s"]:.2f} s / {r["train_b_s"]:.2f} s) | <= 1.3x |')
            lines.append(f'| smpconv_t / convnext_tiny eval latency, both reparameterized (batch 1, 224 px) | {fmt} | '
                         f'{r["latency_ratio"]:.2f}x ({r["latency_a_ms"]:.1f} ms / {r["latency_b_ms"]:.1f} ms) | '
                         f'<= 1.3x |')
    for spec, label, goal in (('flexnet_16:smp_flexnet_16:nchw', 'masks grown', '>= 3x'),
                              ('flexnet_16@init:smp_flexnet_16:nchw', 'masks at init', '(paper: 2.2x on a GPU)')):
        r = p(spec)
        if r:
            lines.append(f'| smp_flexnet_16 / flexnet_16 training throughput, {label} (batch 64, 32 px) | nchw | '
                         f'{r["train_ratio"]:.2f}x ({r["train_b_s"]:.2f} s / {r["train_a_s"]:.2f} s per step) | {goal} |')
    headline = {f'smpconv_t:convnext_tiny:{f}' for f in ('channels_last', 'nchw')} | {
        'flexnet_16:smp_flexnet_16:nchw', 'flexnet_16@init:smp_flexnet_16:nchw'}
    for spec, r in pairs.items():
        if spec not in headline:
            lines.append(f'| {r["a"]} / {r["b"]} training step | {r["format"]} | {r["train_ratio"]:.2f}x | |')
            if 'latency_ratio' in r:
                lines.append(f'| {r["a"]} / {r["b"]} eval latency, reparameterized, batch 1 | {r["format"]} | '
                             f'{r["latency_ratio"]:.2f}x | |')
    r = rows.get('smpconv_t')
    lines += ['', '## SMP kernel rendering', '']
    if r and 'render_share' in r:
        lines.append(f'Rendering the SMP kernels (forward + backward) / a smpconv_t training step (batch 32), '
                     f'interleaved: {100 * r["render_share"]:.2f}% ({r["render_s"] * 1e3:.0f} ms of '
                     f'{r["step32_s"]:.2f} s); goal <= 2%.')
    else:
        lines.append('Not measured: smpconv_t is not in --models.')
    write_results(out_md, lines)

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ('train_img_s', 'latency_ms', 'latency_reparam_ms'),
                              ('training images/s (higher is better)', 'eval latency ms, batch 1',
                               'reparameterized eval latency ms, batch 1')):
        ax.barh(names, [rows[n][key] for n in names], color=['C7' if n in ('convnext_tiny', 'resnet50') else 'C0' for n in names])
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
    fig.suptitle(f'timm-smpconv vs timm baselines, CPU {threads} threads')
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _run_worker(extra, args, env) -> dict:
    cmd = [sys.executable, __file__, *extra, '--reps', str(args.reps), '--threads', str(args.threads), '--out', str(args.out)]
    cmd += ['--no-profile'] * args.no_profile + ['--smoke'] * args.smoke
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith('RESULT ')), None)
    if out.returncode or line is None:
        raise SystemExit(f'benchmark {" ".join(extra)} failed:\n{out.stderr[-3000:]}')
    return json.loads(line[7:])


def main(argv=None):
    parser = bench_parser(__doc__, 'benchmark.md', reps=3)
    parser.add_argument('--models', nargs='+', default=IMAGENET + CIFAR)
    parser.add_argument('--pairs', nargs='*', default=PAIRS, help='interleaved ratio runs a:b:format')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--pair', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--no-profile', action='store_true', help='skip the smpconv_t profile table')
    args = parse_args(parser, argv)
    if args.worker:
        profile = None if args.no_profile else args.out.parent / 'profile_smpconv_t.txt'
        print('RESULT ' + json.dumps(worker(args.worker, args.reps, args.threads, profile, args.smoke)))
        return
    if args.pair:
        print('RESULT ' + json.dumps(pair_worker(args.pair, args.reps, args.smoke)))
        return
    rows = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for name in args.models:
        rows[name] = _run_worker(['--worker', name], args, env)
        r = rows[name]
        print(f'{name}: step {r["train_step_s"]:.3f} s, latency {r["latency_ms"]:.1f} ms, '
              f'reparam {r["latency_reparam_ms"]:.1f} ms', flush=True)
    pairs = {}
    for spec in args.pairs:
        a, b = spec.split(':')[:2]
        if a not in args.models or b not in args.models:
            continue
        pairs[spec] = _run_worker(['--pair', spec], args, env)
        print(f'{spec}: {json.dumps(pairs[spec])}', flush=True)
    write_report(rows, pairs, args.threads, args.out, args.out.with_suffix('.png'), args.smoke)
    print(args.out.read_text())


if __name__ == '__main__':
    main()
