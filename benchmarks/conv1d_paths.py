""" Causal 1-D convolution, direct (F.conv1d) against the FFT (`timm_smpconv.ops.causal_conv1d`), per length:
the measurements behind `timm_smpconv.ops.default_backend_1d`.

    python benchmarks/conv1d_paths.py [--threads 2] [--reps 5] [--out ...] [--smoke]

The sequence models' case: 30 -> 30 channels, batch 32, a kernel as long as the sequence; forward +
backward (input and kernel gradients) and forward without autograd, the two paths timed back to back in
each round (so that load drifting on a shared machine hits both alike), medians in ms. Writes
benchmarks/results/conv1d_paths.md.
"""
import torch
from harness import bench_parser, interleaved_medians, parse_args, results_head, write_results

from timm_smpconv.ops import causal_conv1d, conv_impl

LENGTHS = [16, 32, 48, 64, 96, 128, 182, 256, 784, 1024]


def measure(length: int, k: int, reps: int, batch: int = 32, chs: int = 30) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, chs, length, requires_grad=True)
    w = torch.randn(chs, chs, k, requires_grad=True)
    gy = torch.randn(batch, chs, length)

    def run(impl, grad):
        def f():
            with conv_impl(impl):
                if grad:
                    torch.autograd.grad(causal_conv1d(x, w), (x, w), gy)
                else:
                    with torch.no_grad():
                        causal_conv1d(x, w)
        return f

    out = {}
    for grad in (True, False):
        t = interleaved_medians({'direct': run('direct', grad), 'fft': run('fft', grad)}, 1, reps, scale=1e3)
        out.update({f'{n}_{"train" if grad else "infer"}': v for n, v in t.items()})
    return out


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'conv1d_paths.md', reps=5), argv)
    lines = results_head('Causal 1-D conv, direct vs FFT (ms, medians; batch 32, 30 -> 30 channels)',
                         'python benchmarks/conv1d_paths.py', args)
    lines += ['| length | kernel | direct fwd+bwd | FFT fwd+bwd | direct fwd (no grad) | FFT fwd (no grad) |',
              '|---|---|---|---|---|---|']
    for length in LENGTHS[:2] if args.smoke else LENGTHS:
        for k in sorted({length, 5}):
            r = measure(length, k, args.reps, batch=2 if args.smoke else 32)
            lines.append(f'| {length} | {k} | {r["direct_train"]:.2f} | {r["fft_train"]:.2f} | '
                         f'{r["direct_infer"]:.2f} | {r["fft_infer"]:.2f} |')
            print(lines[-1], flush=True)
    write_results(args.out, lines)


if __name__ == '__main__':
    main()
