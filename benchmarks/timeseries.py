""" Time-series training with train_imagenet.py on the UEA / UCR archives aeon ships (no download): accuracy and
wall time of the `sequence` preset's SMP-TCN.

    python benchmarks/timeseries.py [--threads 2] [--out ...] [--smoke]

Each archive is trained from scratch with the command in the table (its --data-dir is aeon's own data folder)
and writes benchmarks/results/timeseries.md: the best and the final validation (the archive's TEST split)
top-1, chance level, the wall time of the run (and per epoch), and the machine's load average (1 min) when the
run started and ended: wall times are only what a run takes alone where the load stayed below the core count.
A smoke run trains one epoch of two batches.
"""
import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import bench_parser, parse_args, results_head, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = (  # (archive, what it is, chance %, extra flags)
    ('BasicMotions', 'multivariate: 6 channels, 4 classes, 40 / 40 series of 100 steps', 25.0,
     ['--epochs', '30', '--lr', '2e-3', '-b', '8', '--warmup-epochs', '2']),
    ('ItalyPowerDemand', 'univariate: 2 classes, 67 / 1,029 series of 24 steps', 50.0,
     ['--epochs', '30', '--lr', '2e-3', '-b', '8', '--warmup-epochs', '2']),
    ('JapaneseVowels', 'multivariate, unequal lengths: 12 channels, 9 classes, 270 / 370 series of 7-29 steps', 100 / 9,
     ['--epochs', '30', '--lr', '2e-3', '-b', '16', '--warmup-epochs', '2']),
)


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'timeseries.md'), argv)
    import aeon

    import train_imagenet
    data = os.path.join(os.path.dirname(aeon.__file__), 'datasets', 'data')
    lines = results_head('Time series: the UEA / UCR archives aeon ships', 'python benchmarks/timeseries.py', args)
    lines += ['Command: `python train_imagenet.py --dataset ts/NAME --data-dir AEON_DATA FLAGS` (the `sequence` preset: '
              '`smp_tcn` at the data\'s length, Adam, coupled weight decay 1e-5, cosine; AEON_DATA is aeon\'s '
              '`datasets/data` folder). Validation is the archive\'s TEST split.', '',
              '| archive | data | flags | best val top-1 (epoch) | final | chance | wall time | per epoch | load avg start / end |',
              '|---|---|---|---|---|---|---|---|---|']
    for name, what, chance, flags in RUNS:
        smoke = ['--epochs', '1', '--max-train-batches', '2'] if args.smoke else []
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            load_start = os.getloadavg()[0]
            t0 = time.perf_counter()
            train_imagenet.main(['--dataset', f'ts/{name}', '--data-dir', data, '--output', tmp, '--experiment', 'r']
                                + flags + smoke)
            wall = time.perf_counter() - t0
            load_end = os.getloadavg()[0]
            with open(Path(tmp) / 'r' / 'summary.csv') as f:
                rows = list(csv.DictReader(f))
        best = max(rows, key=lambda r: float(r['eval_top1']))
        lines.append(f'| {name} | {what} | `{" ".join(flags)}` | {float(best["eval_top1"]):.2f}% ({best["epoch"]}) | '
                     f'{float(rows[-1]["eval_top1"]):.2f}% | {chance:.1f}% | {wall:.0f} s | {wall / len(rows):.2f} s | '
                     f'{load_start:.1f} / {load_end:.1f} |')
        print(lines[-1], flush=True)
    lines += ['', f'Load average (1 min): per run above, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores; '
              f'{args.threads} torch threads. Wall times grow with other jobs on the machine: they are a run\'s own '
              f'where the load stayed at or below the threads used.']
    write_results(args.out, lines)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
