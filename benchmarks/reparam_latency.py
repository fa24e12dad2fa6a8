""" Reparameterization: parameters, logit error and CPU eval latency before / after.

    python benchmarks/reparam_latency.py [--models smpconv_mobile31 smpconv_t] [--img-size 224] [--threads 2]
                                         [--warmup 2] [--reps 5] [--out ...] [--smoke]

Writes benchmarks/results/reparam.md. BatchNorm statistics are randomised first so that the
folding is exercised (with fresh BNs every fold is the identity). Latency: median of --reps timed
eval forwards at batch 1 after --warmup untimed ones, the two models interleaved (back to back in each round, by the
wall clock); the speed-up is the median of the per-round ratios.
"""
import statistics

import timm
import torch
from harness import SMOKE_NOTE, bench_parser, interleaved_times, machine_line, model_kwargs, parse_args, positive_int, write_results
from timm.models import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import randomize_bn_stats_


def main(argv=None):
    parser = bench_parser(__doc__, 'reparam.md', reps=5)
    parser.add_argument('--models', nargs='+', default=['smpconv_mobile31', 'smpconv_t'])
    parser.add_argument('--img-size', type=positive_int, default=224)
    parser.add_argument('--warmup', type=int, default=2)
    args = parse_args(parser, argv)
    if args.smoke:
        args.img_size, args.warmup = 64, 0
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.img_size, args.img_size)
    rows = []
    for name in args.models:
        model = timm.create_model(name, **model_kwargs(name, args.smoke))
        randomize_bn_stats_(model)
        model.eval()
        fused = reparameterize_model(model)
        with torch.no_grad():
            y, yf = model(x), fused(x)
            err = ((y - yf).abs().max() / y.abs().max()).item()
            # interleaved, by the wall clock: the speed-up is the median of the per-round ratios
            t = interleaved_times({'model': lambda: model(x), 'fused': lambda: fused(x)}, args.warmup, args.reps)
            t0, t1 = (1e3 * statistics.median(t[k]) for k in ('model', 'fused'))
            speedup = statistics.median(a / b for a, b in zip(t['model'], t['fused']))
        p0 = sum(p.numel() for p in model.parameters())
        p1 = sum(p.numel() for p in fused.parameters())
        rows.append(f'| {name} | {p0:,} | {p1:,} | {err:.1e} | {t0:.1f} | {t1:.1f} | {speedup:.2f}x |')
        print(rows[-1], flush=True)
    header = [
        f'# Reparameterization (CPU, {args.threads} threads, batch 1, {args.img_size}x{args.img_size})'
        + (SMOKE_NOTE if args.smoke else ''),
        '',
        machine_line('python benchmarks/reparam_latency.py', sep=', ', timm_version=True),
        '',
        '| model | params | params reparameterized | max rel. logit error | latency ms | reparameterized ms | speed-up |',
        '|---|---|---|---|---|---|---|',
    ]
    print(f'wrote {write_results(args.out, header + rows)}')


if __name__ == '__main__':
    main()
