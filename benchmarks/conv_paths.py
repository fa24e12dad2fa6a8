""" Direct (F.conv2d) against FFT (fft_conv2d) convolution, per shape: the measurements behind the
CPU dispatch rule in `timm_smpconv.ops.default_backend` and the README table.

    python benchmarks/conv_paths.py [--threads 2] [--reps 5] [--out ...] [--smoke]

For every shape: forward + backward (gradients of input and kernel) and forward without autograd, the
two paths timed back to back in each round, medians in ms, for contiguous (NCHW) and channels_last
inputs; then the FFT grid lengths compared (forward + inverse transforms alone) for the smpconv_t
stage shapes. Writes benchmarks/results/conv_paths.md. The two paths alternate rather than going through
torch.utils.benchmark one after the other, so that load drifting on a shared machine hits both alike.
"""
import torch
import torch.nn.functional as F
from harness import bench_parser, interleaved_medians, parse_args, results_head, write_results

from timm_smpconv.ops import fft_conv2d, fft_size
from timm_smpconv.ops.fft import _irfft2_rows, _rfft2_rows

# (label, batch, in channels, out channels, groups, map, kernel)
SHAPES = [
    ('smpconv_t stage 1 (depthwise)', 8, 96, 96, 96, 56, 31),
    ('smpconv_t stage 2 (depthwise)', 8, 192, 192, 192, 28, 29),
    ('smpconv_t stage 3 (depthwise)', 8, 384, 384, 384, 14, 27),
    ('smpconv_t stage 4 (depthwise)', 8, 768, 768, 768, 7, 13),
    ('13 x 13 depthwise on 14 x 14', 8, 384, 384, 384, 14, 13),
    ('15 x 15 depthwise on 14 x 14', 8, 384, 384, 384, 14, 15),
    ('5 x 5 depthwise on 56 x 56', 8, 96, 96, 96, 56, 5),
    ('5 x 5 depthwise on 14 x 14', 8, 384, 384, 384, 14, 5),
    ('FlexNet 48->48 full conv', 8, 48, 48, 1, 32, 33),
    ('smpconv_t stage 3, batch 1', 1, 384, 384, 384, 14, 27),
]


# grid lengths compared for the transforms alone: (channels, map, candidate lengths incl. the minimum)
GRIDS = [(96, 56, (71, 72, 75, 80)), (192, 28, (42, 44, 45, 48)), (384, 14, (27, 28, 30, 32)), (768, 7, (13, 14, 15, 16))]


def _smoke_shape(label, batch, cin, cout, groups, size, k):
    """The shape at smoke size: batch 1, at most 8 channels, maps of at most 16, the same kernel."""
    c = min(cin, 8)
    return label, 1, c, c, c if groups == cin else 1, min(size, 16), k


def _median_ms(fns: dict, reps: int) -> dict:
    return interleaved_medians(fns, 1, reps, scale=1e3)


def measure(batch, cin, cout, groups, size, k, reps, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(cout, cin // groups, k, k, requires_grad=True)
    gy = torch.randn(batch, cout, size, size)

    def direct():
        return F.conv2d(x, w, None, 1, k // 2, 1, groups)

    def fft():
        return fft_conv2d(x, w, None, groups)

    def train(f):
        return lambda: torch.autograd.grad(f(), (x, w), gy)

    def infer(f):
        def run():
            with torch.no_grad():
                f()
        return run

    out = _median_ms({'direct_train': train(direct), 'fft_train': train(fft)}, reps)
    out.update(_median_ms({'direct_infer': infer(direct), 'fft_infer': infer(fft)}, reps))
    return out


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'conv_paths.md', reps=5), argv)
    lines = results_head('Direct vs FFT convolution (ms, medians)', 'python benchmarks/conv_paths.py', args)
    shapes = [_smoke_shape(*s) for s in SHAPES] if args.smoke else SHAPES
    lines += [
        '| conv | input | kernel | memory format | direct fwd+bwd | FFT fwd+bwd | direct fwd (no grad) | FFT fwd (no grad) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for fmt_name, fmt in (('NCHW', torch.contiguous_format), ('channels_last', torch.channels_last)):
        for label, batch, cin, cout, groups, size, k in shapes:
            r = measure(batch, cin, cout, groups, size, k, args.reps, fmt)
            lines.append(f'| {label} | {batch}x{cin}x{size}x{size} | {cout}x{cin // groups}x{k}x{k} | {fmt_name} | '
                         f'{r["direct_train"]:.1f} | {r["fft_train"]:.1f} | {r["direct_infer"]:.1f} | '
                         f'{r["fft_infer"]:.1f} |')
            print(lines[-1], flush=True)
    # forward + inverse transform of an 8 x C x H x H batch (row-pruned, as fft_conv2d does) per grid length
    lines += ['', '| map (batch 8) | ' + ' | '.join(f'grid {i + 1}' for i in range(4)) + ' | fft_size picks |',
              '|---|---|---|---|---|---|']
    for c, h, lengths in GRIDS:
        x = torch.randn(8, min(c, 8) if args.smoke else c, h, h)
        fns = {n: (lambda n=n: _irfft2_rows(_rfft2_rows(x, n, n), h, h, n)) for n in lengths}
        t = _median_ms(fns, 3 * args.reps)
        lines.append(f'| {c} x {h} x {h} | ' + ' | '.join(f'{n}: {t[n]:.1f} ms' for n in lengths) +
                     f' | {fft_size(lengths[0])} |')
        print(lines[-1], flush=True)
    write_results(args.out, lines)


if __name__ == '__main__':
    main()
