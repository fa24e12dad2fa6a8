""" How much of a training step is kernel generation, and how the pointwise work of smpconv_t compares
with convnext_tiny's: the numbers behind the README's reading of the FlexNet and SMPConv-T ratios.

    python benchmarks/kernel_generation.py [--threads 2] [--reps 4] [--out ...] [--smoke]

* flexnet_16 (masks fully grown) and smp_flexnet_16 at batch 64, 32 px: median training step and the
  median time to generate every continuous kernel and backpropagate through it (MAGNet for FlexConv,
  the SMP rendering for SMP), timed alternately in one process (so that load drifting on a shared
  machine hits both alike).
* fvcore GMACs per 224 px image of the 1x1 convolutions (smpconv_t) and the Linear layers of the
  blocks (convnext_tiny, whose pointwise layers are Linear).
Writes benchmarks/results/kernel_generation.md.
"""
import timm
import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis
from harness import bench_parser, build_workload, interleaved_medians, parse_args, results_head, train_step, write_results

from timm_smpconv.layers import FlexConv2d, SMPConv2d


def generation_share(name: str, reps: int, smoke: bool = False) -> dict:
    model, x, y, opt = build_workload(name, smoke=smoke)
    step = train_step(model, x, y, opt)
    layers = [m for m in model.modules() if isinstance(m, (FlexConv2d, SMPConv2d))]

    def generate():
        sum(m.get_weight().sum() for m in layers).backward()

    t = interleaved_medians({'step': step, 'gen': generate}, 1, reps)
    return {'layers': len(layers), 'step_s': t['step'], 'gen_s': t['gen']}


def pointwise_gmacs(name: str, img_size: int = 224) -> float:
    model = timm.create_model(name).eval()
    counts = FlopCountAnalysis(model, torch.randn(1, 3, img_size, img_size))
    counts.unsupported_ops_warnings(False)
    counts.uncalled_modules_warnings(False)
    by_module = counts.by_module()
    total = 0
    for n, m in model.named_modules():
        pointwise_conv = isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
        block_linear = isinstance(m, nn.Linear) and n.startswith('stages')
        if pointwise_conv or block_linear:
            total += by_module[n]
    return total / 1e9


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'kernel_generation.md', reps=4), argv)
    lines = results_head('Kernel generation share and pointwise work', 'python benchmarks/kernel_generation.py', args)
    lines += [
        '| model (batch 64, 32 px) | continuous-kernel layers | training step s | kernel generation fwd+bwd ms | share |',
        '|---|---|---|---|---|',
    ]
    for name in ('flexnet_16', 'smp_flexnet_16'):
        r = generation_share(name, args.reps, args.smoke)
        label = 'flexnet_16 (masks grown)' if name == 'flexnet_16' else name
        lines.append(f'| {label} | {r["layers"]} | {r["step_s"]:.3f} | {1e3 * r["gen_s"]:.1f} | '
                     f'{100 * r["gen_s"] / r["step_s"]:.1f}% |')
        print(lines[-1], flush=True)
    lines += ['', '| model | pointwise GMACs per 224 px image (fvcore) |', '|---|---|']
    for name in ('smpconv_t', 'convnext_tiny'):
        lines.append(f'| {name} | {pointwise_gmacs(name, 64 if args.smoke else 224):.2f} |')
        print(lines[-1], flush=True)
    write_results(args.out, lines)


if __name__ == '__main__':
    main()
