""" Does rendering and convolving SMP kernels only over their support's bounding box pay?

    python benchmarks/support_crop.py [--threads 2] [--batch 8] [--reps 3] [--out ...] [--smoke]

smpconv_t training step (batch 8, 224 px) with crop_to_support off and on, at initialisation and
with the points pulled towards the centre (x0.5, as early in training), and the resulting kernel
sizes; median of --reps steps after one warm-up. Writes benchmarks/results/support_crop.md.
"""
import timm
import torch
from harness import SMOKE_NOTE, bench_parser, median_time, model_kwargs, parse_args, positive_int, train_step, write_results

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import SMPConv2d
from timm_smpconv.layers.smp import support_crop


def main(argv=None):
    parser = bench_parser(__doc__, 'support_crop.md', reps=3)
    parser.add_argument('--batch', type=positive_int, default=8)
    args = parse_args(parser, argv)
    batch, size = (1, 64) if args.smoke else (args.batch, 224)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    rows = []
    for state, shrink in (('initialisation', 1.0), ('points x0.5 (early training)', 0.5)):
        times = {}
        for crop in (False, True):
            torch.manual_seed(0)
            model = timm.create_model('smpconv_t', crop_to_support=crop, **model_kwargs('smpconv_t', args.smoke)).train()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, SMPConv2d):
                        m.points.mul_(shrink)
            times[crop] = median_time(train_step(model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-6)), 1, args.reps)
        sizes = [m.kernel_size - 2 * support_crop(m.points, m.radius, m.kernel_size)
                 for m in model.modules() if isinstance(m, SMPConv2d)]
        stages = sorted(set(zip((m.kernel_size for m in model.modules() if isinstance(m, SMPConv2d)), sizes)))
        rows.append(f'| {state} | {", ".join(f"{a}->{b}" for a, b in stages)} | {times[False]:.3f} | '
                    f'{times[True]:.3f} | {times[False] / times[True]:.2f}x |')
        print(rows[-1], flush=True)
    lines = ['# SMP support cropping (smpconv_t training step, CPU)' + (SMOKE_NOTE if args.smoke else ''), '',
             f'Batch {batch}, {size} px, {args.threads} threads. Command: `python benchmarks/support_crop.py`.', '',
             '| state | kernel sizes (full -> cropped) | step s, full | step s, cropped | speed-up |',
             '|---|---|---|---|---|'] + rows
    print(f'wrote {write_results(args.out, lines)}')


if __name__ == '__main__':
    main()
