""" Pictures of SMP kernels: point positions and radii, rendered kernels, summed |kernel| maps.

    python -m timm_smpconv.visualize --model smpconv_t [--checkpoint PATH] --out kernels.png
        [--layers stages.0.blocks.0.large_kernel.smp ...] [--channels 4]

One row per chosen SMP layer (default: the first large-kernel layer of every stage):
  1. the points, each drawn as its L1 ball (a diamond of the point's radius) on the [-1, 1]^2 kernel
     extent, coloured by the mean |weight| of the point (paper Fig. 5);
  2. the rendered kernels of the first `--channels` channels;
  3. the |kernel| summed over the layer's channels (paper Fig. 4).
Axes follow the conv weight: rows downwards, columns to the right.
"""
import argparse
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .layers.smp_conv import SMPConv2d
from .models import create_model_or_exit

__all__ = ['smp_layers', 'plot_kernels', 'main']


def smp_layers(model: nn.Module) -> List[str]:
    """Names of the 2D SMP layers of a model, in order."""
    return [n for n, m in model.named_modules() if isinstance(m, SMPConv2d)]


def _default_layers(model: nn.Module) -> List[str]:
    names = smp_layers(model)
    firsts, seen = [], set()
    for n in names:
        stage = n.split('.blocks.')[0]
        if stage not in seen:
            seen.add(stage)
            firsts.append(n)
    return firsts or names[:4]


@torch.no_grad()
def plot_kernels(model: nn.Module, layers: Optional[Sequence[str]] = None, channels: int = 4, out: str = 'kernels.png'):
    """Draw the chosen SMP layers of `model` into a PNG at `out`; returns the matplotlib figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    modules = dict(model.named_modules())
    layers = list(layers) if layers else _default_layers(model)
    unknown = [n for n in layers if not isinstance(modules.get(n), SMPConv2d)]
    if unknown:
        raise ValueError(f'not SMP layers of this model: {unknown}; available: {smp_layers(model)[:8]} ...')
    if not layers:
        raise ValueError('the model has no SMP layers')
    ncols = channels + 2
    fig, axes = plt.subplots(len(layers), ncols, figsize=(2.2 * ncols, 2.3 * len(layers)), squeeze=False)
    cmap = plt.get_cmap('viridis')
    for row, name in enumerate(layers):
        layer = modules[name]
        pts = layer.points[0].float().cpu().numpy()
        rad = layer.radius[0].float().cpu().numpy()
        strength = layer.weight.float().abs().mean(dim=(0, 1)).cpu()
        strength = (strength / strength.max().clamp_min(1e-12)).numpy()
        ax = axes[row, 0]
        for (y, x), r, s in zip(pts.tolist(), rad.tolist(), strength.tolist()):
            ax.add_patch(Polygon([(x - r, y), (x, y - r), (x + r, y), (x, y + r)], closed=True,
                                 facecolor=cmap(s), edgecolor='k', linewidth=0.3, alpha=0.6))
        ax.scatter(pts[:, 1], pts[:, 0], s=3, c='k')
        ax.set_xlim(-1, 1)
        ax.set_ylim(1, -1)
        ax.set_aspect('equal')
        ax.set_title(f'{name.replace(".large_kernel.smp", "")}\n{layer.n_points} points, k={layer.kernel_size}',
                     fontsize=7)
        kernel = layer.get_weight().float().cpu()[:, 0].numpy()
        for c in range(channels):
            ax = axes[row, 1 + c]
            if c < kernel.shape[0]:
                v = max(float(abs(kernel[c]).max()), 1e-12)
                ax.imshow(kernel[c], cmap='RdBu_r', vmin=-v, vmax=v)
                ax.set_title(f'channel {c}', fontsize=7)
        ax = axes[row, -1]
        ax.imshow(abs(kernel).sum(0), cmap='magma')
        ax.set_title('sum of |kernel|', fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog='python -m timm_smpconv.visualize', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='smpconv_t')
    parser.add_argument('--checkpoint', default=None,
                        help="weights to draw: ours (timm's saver, safetensors) or the authors' checkpoint")
    parser.add_argument('--layers', nargs='*', default=None, help='SMP layer names (default: first per stage)')
    parser.add_argument('--channels', type=int, default=4, help='rendered kernels shown per layer')
    parser.add_argument('--out', default='kernels.png')
    parser.add_argument('--seed', type=int, default=0, help='init seed when no checkpoint is given')
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    kwargs = {}
    if args.checkpoint:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    model = create_model_or_exit(parser, args.model, **kwargs)
    plot_kernels(model, args.layers, args.channels, args.out)
    print(f'wrote {args.out}')
    return args.out


if __name__ == '__main__':
    main()
