""" The quick-start training run, timed: accuracy and wall time of `python train_imagenet.py` (digits preset).

    python benchmarks/train_digits.py [--threads 2] [--out ...] [--smoke]

Runs the README's main job (built-in digits data, default preset) in-process and writes
benchmarks/results/digits.md with the number of epochs, the best validation top-1 (model or EMA), the
epoch it was reached, the total wall time and the top-1 of every epoch. A smoke run trains one epoch of
two batches.
"""
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import SMOKE_NOTE, bench_parser, machine_line, parse_args, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'digits.md'), argv)
    import train_imagenet
    smoke = ['--epochs', '1', '--max-train-batches', '2'] if args.smoke else []
    with tempfile.TemporaryDirectory() as tmp:
        # one run of minutes, data loading and checkpoints included: timed once, by the host clock
        t0 = time.perf_counter()
        train_imagenet.main(['--output', tmp, '--experiment', 'digits'] + smoke)
        total = time.perf_counter() - t0
        with open(os.path.join(tmp, 'digits', 'summary.csv')) as f:
            rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: max(float(r['eval_top1']), float(r.get('eval_ema_top1', 0))))
    best_top1 = max(float(best['eval_top1']), float(best.get('eval_ema_top1', 0)))
    lines = [
        '# Quick-start training run: built-in digits (`python train_imagenet.py`)' + (SMOKE_NOTE if args.smoke else ''),
        '',
        machine_line('python benchmarks/train_digits.py', args.threads, sep=', '),
        '',
        '| epochs | best val top-1 | at epoch | wall time (model creation, data, training, checkpoints) |',
        '|---|---|---|---|',
        f'| {len(rows)} | {best_top1:.2f}% | {best["epoch"]} | {total:.0f} s |',
        '',
        'Per epoch (val top-1 model / EMA):',
        '',
        ' '.join(f'{r["epoch"]}: {float(r["eval_top1"]):.1f}/{float(r.get("eval_ema_top1", 0)):.1f}' for r in rows),
    ]
    write_results(args.out, lines)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
