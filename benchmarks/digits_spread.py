""" The figures a user gets from `python train_imagenet.py --epochs 3` (the digits preset), and how much they vary.

    python benchmarks/digits_spread.py [--threads-list 1 2] [--seeds 42 0 1 2 3] [--out ...] [--smoke]

A run's numbers depend on the seed and on the number of torch threads (the order float32 sums are reduced in,
which the training amplifies; the default seed is 42, the default thread count torch's, the machine's cores).
For each thread count and seed, as a user runs it (in-process, `torch.set_num_threads(T)`, i.e.
`OMP_NUM_THREADS=T python train_imagenet.py --epochs 3 --seed S`): the validation top-1 of the model and of its
EMA after epoch 0 and at the end (epoch 2), as the run logs them (with the preset's --bn-recalibrate).

Then the check of tests/test_bn_recalibrate.py at each thread count and seed: a 1-epoch run (the test's
`--epochs 1`), its logged epoch-0 top-1 of model and EMA against the same saved weights with their BatchNorm
statistics re-estimated over the whole training epoch; the test allows 5 points.

Writes benchmarks/results/digits_spread.md (accuracies only: no timing, any machine load will do). A smoke run
trains one epoch of two batches per run.
"""
import contextlib
import csv
import io
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from harness import SMOKE_NOTE, bench_parser, machine_line, positive_int, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(argv, threads):
    """train_imagenet.main(argv) at `threads` torch threads; its log is shown only if it fails."""
    import train_imagenet
    torch.set_num_threads(threads)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train_imagenet.main(argv)
    except SystemExit:
        print(log.getvalue()[-3000:], file=sys.stderr)
        raise


def _summary(run_dir):
    with open(run_dir / 'summary.csv') as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def precise_top1(run_dir, seed, threads, smoke):
    """(model, EMA) top-1 of the run's last.pth.tar with the BatchNorm statistics re-estimated over one whole
    training epoch (fvcore's PreciseBN, the trainer's loader), as tests/test_bn_recalibrate.py checks them."""
    import train_imagenet
    from timm_smpconv._fvcore import update_bn_stats
    from timm_smpconv.models import read_checkpoint
    torch.set_num_threads(threads)
    train = train_imagenet.train
    train_imagenet.train = lambda state: state  # the run's set-up (data, loaders, models), no training
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            state = train_imagenet.run(train_imagenet.parse_args(
                ['--epochs', '1', '--seed', str(seed), '--output', tmp] + (['--max-train-batches', '2'] if smoke else [])))
    finally:
        train_imagenet.train = train
    ckpt = read_checkpoint(run_dir / 'last.pth.tar')
    out = []
    for key, module in (('state_dict', state.model), ('state_dict_ema', state.model_ema.module)):
        module.load_state_dict(ckpt[key])
        module.train()
        update_bn_stats(module, (x for x, _ in train_imagenet.training_batches(state)), num_iters=state.num_batches)
        out.append(train_imagenet.evaluate(module, state.loader_eval, state.args, state.device)['top1'])
    return out


def _span(values):
    return f'{min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f})'


def main(argv=None):
    parser = bench_parser(__doc__, 'digits_spread.md', threads=False)
    parser.add_argument('--threads-list', type=positive_int, nargs='+', default=[1, 2],
                        help='torch thread counts to run at (default: 1 2)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[42, 0, 1, 2, 3],
                        help="seeds (default: 42, the trainer's default, and 0 1 2 3)")
    args = parser.parse_args(argv)
    smoke = ['--epochs', '1', '--max-train-batches', '2'] if args.smoke else []
    lines = ['# `python train_imagenet.py --epochs 3` on the built-in digits: seeds and threads'
             + (SMOKE_NOTE if args.smoke else ''), '',
             machine_line('python benchmarks/digits_spread.py', sep='; ', timm_version=True), '',
             'Validation top-1 (359 images) as the run logs it, model / EMA (the digits preset: --bn-recalibrate 8).', '',
             '| threads | seed | epoch 0 model | epoch 0 EMA | final model | final EMA |', '|---|---|---|---|---|---|']
    runs = {}
    for threads in args.threads_list:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                _run(['--epochs', '3', '--seed', str(seed), '--output', tmp, '--experiment', 'r'] + smoke, threads)
                rows = _summary(Path(tmp) / 'r')
            runs[threads, seed] = rows
            lines.append(f'| {threads} | {seed} | {rows[0]["eval_top1"]:.2f} | {rows[0]["eval_ema_top1"]:.2f} | '
                         f'{rows[-1]["eval_top1"]:.2f} | {rows[-1]["eval_ema_top1"]:.2f} |')
            print(lines[-1], flush=True)
    lines += ['', '| threads | epoch 0 model | epoch 0 EMA | final model | final EMA |', '|---|---|---|---|---|']
    for threads in args.threads_list:
        rows = [runs[threads, seed] for seed in args.seeds]
        lines.append(f'| {threads} | ' + ' | '.join(_span([r[i][k] for r in rows]) for i, k in (
            (0, 'eval_top1'), (0, 'eval_ema_top1'), (-1, 'eval_top1'), (-1, 'eval_ema_top1'))) + ' |')
    lines += ['', 'The check of tests/test_bn_recalibrate.py (a 1-epoch run, `--epochs 1`): its logged top-1 against the '
              'same saved weights with BatchNorm statistics re-estimated over the whole training epoch; the test '
              'allows 5 points.', '',
              '| threads | seed | model logged | model re-estimated | gap | EMA logged | EMA re-estimated | gap |',
              '|---|---|---|---|---|---|---|---|']
    gaps = []
    for threads in args.threads_list:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                _run(['--epochs', '1', '--seed', str(seed), '--output', tmp, '--experiment', 'r'] + smoke, threads)
                row = _summary(Path(tmp) / 'r')[0]
                precise = precise_top1(Path(tmp) / 'r', seed, threads, args.smoke)
            logged = row['eval_top1'], row['eval_ema_top1']
            gaps += [abs(p - q) for p, q in zip(precise, logged)]
            lines.append(f'| {threads} | {seed} | {logged[0]:.2f} | {precise[0]:.2f} | {precise[0] - logged[0]:+.2f} | '
                         f'{logged[1]:.2f} | {precise[1]:.2f} | {precise[1] - logged[1]:+.2f} |')
            print(lines[-1], flush=True)
    lines += ['', f'Largest gap: {max(gaps):.2f} points (the test allows 5).']
    write_results(args.out, lines)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
