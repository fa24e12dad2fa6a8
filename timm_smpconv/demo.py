""" Quick-start demo: build a stack of SMP large-kernel blocks, reparameterize it, compare outputs.

    python -m timm_smpconv.demo [--channels 32] [--kernel-size 31] [--depth 4] [--img-size 64]

Prints the parameter count before and after `timm.models.reparameterize_model`, the modules that
remain, and the largest difference between the two models' eval-mode outputs.
"""
import argparse
import time

import torch
import torch.nn as nn
from timm.models import reparameterize_model

from .layers import SMPLargeKernel2d


class DemoBlock(nn.Module):
    """x + 1x1 conv(GELU(BN(SMP k x k) + BN(5 x 5))), all depthwise in the large-kernel part."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.large_kernel = SMPLargeKernel2d(channels, channels, kernel_size, groups=channels)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.pw(self.act(self.large_kernel(x)))


def build_demo_model(channels: int = 32, kernel_size: int = 31, depth: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, stride=2, padding=1),
        *[DemoBlock(channels, kernel_size) for _ in range(depth)],
    )


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _time(model: nn.Module, x: torch.Tensor, reps: int = 3) -> float:
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t) / reps


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(prog='python -m timm_smpconv.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--channels', type=int, default=32)
    parser.add_argument('--kernel-size', type=int, default=31)
    parser.add_argument('--depth', type=int, default=4)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model = build_demo_model(args.channels, args.kernel_size, args.depth)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    # a few train-mode passes give the BatchNorms non-trivial running statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn_like(x))
    model.eval()
    print(f'SMP demo stack: {args.depth} blocks, {args.channels} channels, '
          f'{args.kernel_size}x{args.kernel_size} SMP kernels')
    print(f'  parameters (continuous kernels):  {_count(model):,}')

    fused = reparameterize_model(model)
    kinds = sorted({type(m).__name__ for m in fused.modules() if not list(m.children())})
    print(f'  parameters (reparameterized):     {_count(fused):,}')
    print(f'  modules left after reparameterization: {", ".join(kinds)}')

    with torch.no_grad():
        y, y_fused = model(x), fused(x)
    max_abs = (y - y_fused).abs().max().item()
    rel = max_abs / y.abs().max().item()
    print(f'  output {tuple(y.shape)}: max |diff| = {max_abs:.3e}, max relative error = {rel:.3e}')
    print(f'  eval latency, batch {args.batch_size}: {_time(model, x) * 1e3:.1f} ms original, '
          f'{_time(fused, x) * 1e3:.1f} ms reparameterized')
    print('  outputs identical (relative error <= 1e-5):', 'yes' if rel <= 1e-5 else 'NO')
    return rel


if __name__ == '__main__':
    raise SystemExit(0 if main() <= 1e-5 else 1)
