""" The quick-start training run, timed: accuracy and wall time of `python train_imagenet.py` (digits preset).

    python benchmarks/train_digits.py [--threads 2]

Runs the README's main job (built-in digits data, default preset) in-process and writes
benchmarks/results/digits.md with the best validation top-1 (model or EMA), the epoch it was
reached, the time to first reach 97% and the total training time.
"""
import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'digits.md'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import train_imagenet
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        train_imagenet.main(['--output', tmp, '--experiment', 'digits'])
        total = time.time() - t0
        with open(os.path.join(tmp, 'digits', 'summary.csv')) as f:
            rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: max(float(r['eval_top1']), float(r.get('eval_ema_top1', 0))))
    best_top1 = max(float(best['eval_top1']), float(best.get('eval_ema_top1', 0)))
    lines = [
        '# Quick-start training run: built-in digits (`python train_imagenet.py`)',
        '',
        f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, '
        f'torch {torch.__version__}. Command: `python benchmarks/train_digits.py`.',
        '',
        '| epochs | best val top-1 | at epoch | wall time (model creation, data, training, checkpoints) |',
        '|---|---|---|---|',
        f'| {len(rows)} | {best_top1:.2f}% | {best["epoch"]} | {total:.0f} s |',
        '',
        'Per epoch (val top-1 model / EMA):',
        '',
        ' '.join(f'{r["epoch"]}: {float(r["eval_top1"]):.1f}/{float(r.get("eval_ema_top1", 0)):.1f}' for r in rows),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
