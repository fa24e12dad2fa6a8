""" What the kernel-scale factor of the BatchNorm statistics costs (timm_smpconv.layers.bn_stats.KernelScaledBNMixin):
each BatchNorm behind a conv keeps the running squared norm of its kernel in training, and eval mode scales its
running variance by (squared norm now / that average).

    python benchmarks/bn_kernel_scale.py [--threads 2] [--rounds 7] [--out ...] [--smoke]

For each model, by the wall clock, interleaved in one process against the same model with every such BatchNorm
called plainly (the code before the factor; median of per-round ratios): a training step (forward, backward,
AdamW; smpconv_t at batch 8 / 224 px, the CIFAR models at batch 64 / 32 px) and an eval forward of the
non-reparameterized model (a reparameterized model has no BatchNorm left, so no factor). Run it on a quiet machine.
Writes benchmarks/results/bn_kernel_scale.md.
"""
import statistics
from unittest import mock

import torch
from harness import (
    SMOKE_NOTE,
    bench_parser,
    build_workload,
    interleaved_times,
    machine_line,
    parse_args,
    positive_int,
    train_step,
    write_results,
)

from timm_smpconv.layers.bn_stats import KernelScaledBNMixin

MODELS = ['smpconv_t', 'smp_flexnet_16', 'flexnet_16']


def _plain_bn(self, x, bn_name, kernel=None):
    return getattr(self, bn_name)(x)


def _without_factor(fn):
    def run():
        with mock.patch.object(KernelScaledBNMixin, '_bn_forward', _plain_bn):
            fn()
    return run


def _ratios(fns, warmup, rounds):
    times = interleaved_times(fns, warmup, rounds)
    ratio = statistics.median(a / b for a, b in zip(times['factor'], times['plain']))
    return statistics.median(times['plain']), ratio


def measure(name, rounds, smoke):
    model, x, y, opt = build_workload(name, smoke=smoke)
    step = train_step(model.train(), x, y, opt)
    train = _ratios({'factor': step, 'plain': _without_factor(step)}, 2, rounds)
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)
    evals = _ratios({'factor': forward, 'plain': _without_factor(forward)}, 2, rounds)
    return train, evals


def main(argv=None):
    parser = bench_parser(__doc__, 'bn_kernel_scale.md', reps=None)
    parser.add_argument('--rounds', type=positive_int, default=7)
    parser.add_argument('--models', nargs='+', default=MODELS)
    args = parse_args(parser, argv)
    rounds = 2 if args.smoke else args.rounds
    lines = [f'# The BatchNorm kernel-scale factor: step-time cost{SMOKE_NOTE if args.smoke else ""}', '',
             machine_line('python benchmarks/bn_kernel_scale.py', args.threads, timm_version=True), '',
             f'Wall clock, interleaved with the same model without the factor, median of {rounds} per-round ratios.', '',
             '| model | training step without (ms) | with / without | eval forward without (ms) | with / without |',
             '|---|---|---|---|---|']
    for name in args.models:
        (t_plain, t_ratio), (e_plain, e_ratio) = measure(name, rounds, args.smoke)
        lines.append(f'| {name} | {1e3 * t_plain:.1f} | {t_ratio:.3f}x | {1e3 * e_plain:.1f} | {e_ratio:.3f}x |')
        print(lines[-1], flush=True)
    write_results(args.out, lines)


if __name__ == '__main__':
    main()
