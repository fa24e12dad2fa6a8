""" Does rendering and convolving SMP kernels only over their support's bounding box pay?

    python benchmarks/support_crop.py [--threads 2] [--batch 8]

smpconv_t training step (batch 8, 224 px) with crop_to_support off and on, at initialisation and
with the points pulled towards the centre (x0.5, as early in training), and the resulting kernel
sizes. Writes benchmarks/results/support_crop.md.
"""
import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import SMPConv2d
from timm_smpconv.layers.smp import support_crop


def step_time(model, x, y, reps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--reps', type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    rows = []
    for state, shrink in (('initialisation', 1.0), ('points x0.5 (early training)', 0.5)):
        times = {}
        for crop in (False, True):
            torch.manual_seed(0)
            model = timm.create_model('smpconv_t', crop_to_support=crop).train()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, SMPConv2d):
                        m.points.mul_(shrink)
            times[crop] = step_time(model, x, y, args.reps)
        sizes = [m.kernel_size - 2 * support_crop(m.points, m.radius, m.kernel_size)
                 for m in model.modules() if isinstance(m, SMPConv2d)]
        stages = sorted(set(zip((m.kernel_size for m in model.modules() if isinstance(m, SMPConv2d)), sizes)))
        rows.append(f'| {state} | {", ".join(f"{a}->{b}" for a, b in stages)} | {times[False]:.3f} | '
                    f'{times[True]:.3f} | {times[False] / times[True]:.2f}x |')
        print(rows[-1], flush=True)
    lines = ['# SMP support cropping (smpconv_t training step, CPU)', '',
             f'Batch {args.batch}, 224 px, {args.threads} threads. Command: `python benchmarks/support_crop.py`.', '',
             '| state | kernel sizes (full -> cropped) | step s, full | step s, cropped | speed-up |',
             '|---|---|---|---|---|'] + rows
    out = Path(__file__).resolve().parent / 'results' / 'support_crop.md'
    out.write_text('\n'.join(lines) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
