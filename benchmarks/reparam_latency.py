""" Reparameterization: parameters, logit error and CPU eval latency before / after.

    python benchmarks/reparam_latency.py [--models smpconv_mobile31 smpconv_t] [--img-size 224] [--threads 2]

Writes benchmarks/results/reparam.md. BatchNorm statistics are randomised first so that the
folding is exercised (with fresh BNs every fold is the identity). Latency: median of --reps timed
eval forwards at batch 1 after --warmup untimed ones, in the same process for both models.
"""
import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import randomize_bn_stats_


@torch.no_grad()
def latency_ms(model, x, warmup, reps):
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['smpconv_mobile31', 'smpconv_t'])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'reparam.md'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.img_size, args.img_size)
    rows = []
    for name in args.models:
        model = timm.create_model(name)
        randomize_bn_stats_(model)
        model.eval()
        fused = reparameterize_model(model)
        with torch.no_grad():
            y, yf = model(x), fused(x)
        err = ((y - yf).abs().max() / y.abs().max()).item()
        t0 = latency_ms(model, x, args.warmup, args.reps)
        t1 = latency_ms(fused, x, args.warmup, args.reps)
        p0 = sum(p.numel() for p in model.parameters())
        p1 = sum(p.numel() for p in fused.parameters())
        rows.append(f'| {name} | {p0:,} | {p1:,} | {err:.1e} | {t0:.1f} | {t1:.1f} | {t0 / t1:.2f}x |')
        print(rows[-1], flush=True)
    header = [
        f'# Reparameterization (CPU, {args.threads} threads, batch 1, {args.img_size}x{args.img_size})',
        '',
        f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, '
        f'timm {timm.__version__}. Command: `python benchmarks/reparam_latency.py`.',
        '',
        '| model | params | params reparameterized | max rel. logit error | latency ms | reparameterized ms | speed-up |',
        '|---|---|---|---|---|---|---|',
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(header + rows) + '\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
