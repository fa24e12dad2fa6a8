""" Causal 1-D convolution, direct (F.conv1d) against the FFT (`timm_smpconv.ops.causal_conv1d`), per length:
the measurements behind `timm_smpconv.ops.default_backend_1d`.

    python benchmarks/conv1d_paths.py [--threads 2] [--reps 5]

The sequence models' case: 30 -> 30 channels, batch 32, a kernel as long as the sequence; forward +
backward (input and kernel gradients) and forward without autograd, the two paths timed back to back in
each round, medians in ms. Writes benchmarks/results/conv1d_paths.md.
"""
import statistics

import torch
from run import bench_start, interleaved_times, write_results

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
        t = interleaved_times({'direct': run('direct', grad), 'fft': run('fft', grad)}, 1, reps)
        out.update({f'{n}_{"train" if grad else "infer"}': 1e3 * statistics.median(v) for n, v in t.items()})
    return out


def main(argv=None):
    args, lines = bench_start(__doc__, 5, 'Causal 1-D conv, direct vs FFT (ms, medians; batch 32, 30 -> 30 channels)',
                              'python benchmarks/conv1d_paths.py', argv)
    lines += ['| length | kernel | direct fwd+bwd | FFT fwd+bwd | direct fwd (no grad) | FFT fwd (no grad) |',
              '|---|---|---|---|---|---|']
    for length in LENGTHS:
        for k in sorted({length, 5}):
            r = measure(length, k, args.reps)
            lines.append(f'| {length} | {k} | {r["direct_train"]:.2f} | {r["fft_train"]:.2f} | '
                         f'{r["direct_infer"]:.2f} | {r["fft_infer"]:.2f} |')
            print(lines[-1], flush=True)
    write_results('conv1d_paths.md', lines)


if __name__ == '__main__':
    main()
