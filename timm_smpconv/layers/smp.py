""" The self-moving point (SMP) continuous kernel.

A kernel is a function of a coordinate q in [-1, 1]^d (d = 1 for sequences, d = 2 for images)
built from Np learnable points, each with a position p_n, a radius r_n and a weight vector w_n:

    g_n(q) = max(0, 1 - ||q - p_n||_1 / r_n)             (L1 "tent", zero outside the radius)
    K(q)   = sum_n g_n(q) w_n                              (un-normalised sum, ImageNet models)
    K(q)   = sum_n g_n(q) w_n / (|N(q)| + 1e-6)            (count-normalised, paper Eq. 1)

where |N(q)| counts the points with g_n(q) > 0 (no gradient flows through the count).

Tensor layout used throughout the package:
    points  (F, Np, d)   F = 1: one set of points shared by every filter of the layer;
                         F = out_channels: each output filter has its own points
    radius  (F, Np)
    weight  (O, I, Np)   O output filters, I input channels per group

Rendering samples K on the grid linspace(-1, 1, k) along every axis. Axis order follows the
tensor: points[..., 0] is the row (first spatial axis, 'ij' indexing), points[..., 1] the
column. For d = 1 the single axis is time and coordinate +1 is the newest sample of a causal
kernel. A layer may instead carry explicit per-axis sample coordinates (`grid`, shape (d, k)):
the SMPConv authors' models sample on a stored grid buffer, and a checkpoint saved in half
precision holds that grid rounded to fp16, which their model then renders on.

Rendering at another size. The continuous kernel covers [-1, 1]^d whatever k is, so rendering
at k2 instead of the trained k1 samples the same function (k2 - 1) / (k1 - 1) times more densely
per axis. To give the same response on an input resized by that same factor, the values must be
multiplied by ((k1 - 1) / (k2 - 1)) ** d so that the (Riemann) sum over the kernel keeps its
magnitude; `rescale_factor` returns that number. With k2 = 2 * k1 - 1 the new grid contains the
old one at even indices, and there the rescaled values times 2 ** d equal the old kernel exactly.
The layers apply this (and the alternative 'extend' mapping) to their parameters: see
`timm_smpconv.layers.smp_conv.resize_smp_params`.
"""
from typing import List, Optional

import torch
from timm.layers import trunc_normal_

__all__ = [
    'render_smp_kernel', 'render_smp_kernels', 'rescale_factor', 'default_n_points', 'default_radius',
    'init_smp_points', 'support_crop',
]

def default_n_points(kernel_size: int, dims: int, points_div: int = 4) -> int:
    """Default number of points: floor(k^2 / points_div) for 2D (points_div 4 in SMPConv-T/B, the
    paper's k^2 / 4 rule), 30 for 1D sequence models (the authors' SMP-TCN)."""
    return max(1, kernel_size * kernel_size // points_div) if dims == 2 else 30


def default_radius(kernel_size: int, dims: int) -> float:
    """Initial radius 2d / k (paper A.1); for d = 2 this is the ImageNet reference's 4 / k."""
    return 2.0 * dims / kernel_size


def rescale_factor(trained_size: int, render_size: int, dims: int) -> float:
    """Value multiplier for a kernel trained at `trained_size` and rendered at `render_size`.

    Keeps the response to an input resized by (render_size - 1) / (trained_size - 1) equal
    to the response of the trained kernel on the original input (see module docstring).
    """
    if trained_size == render_size:
        return 1.0
    if trained_size < 2 or render_size < 2:
        raise ValueError(f'rescaling needs kernel sizes >= 2, got {trained_size} -> {render_size}')
    return ((trained_size - 1) / (render_size - 1)) ** dims


@torch.no_grad()
def init_smp_points(points: torch.Tensor, std: float, causal: bool = False) -> torch.Tensor:
    """Initialise point positions in place.

    Non-causal: truncated normal, mean 0, std `std`, truncated to [-1, 1].
    Causal (1D): t ~ truncated normal(0, std) on [-1, 0], then p = 2 t + 1, so p lies in [-1, 1]
    and clusters just below +1, the newest time step (as the sequence models of the paper do).
    """
    if causal:
        trunc_normal_(points, mean=0., std=std, a=-1., b=0.)
        points.mul_(2.).add_(1.)
    else:
        trunc_normal_(points, mean=0., std=std, a=-1., b=1.)
    return points


def render_smp_kernel(
        points: torch.Tensor,
        radius: torch.Tensor,
        weight: torch.Tensor,
        kernel_size: int,
        normalize: bool = False,
        eps: float = 1e-6,
        crop: int = 0,
        grid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Render the SMP kernel to a discrete (O, I, k[, k]) tensor.

    Args:
        points: (F, Np, d) point positions, F = 1 (shared) or O (per filter).
        radius: (F, Np) point radii.
        weight: (O, I, Np) point values.
        kernel_size: k, the number of samples per axis on linspace(-1, 1, k).
        normalize: divide by the number of points covering each sample (paper Eq. 1).
        eps: added to the point count before dividing (normalize=True), as the reference does.
        crop: render only the central k - 2 * crop samples per axis (the same values; see
            `support_crop`).
        grid: (d, k) sample coordinates per axis (row axis first) instead of linspace(-1, 1, k) on
            every axis.
    """
    num_f, num_points, dims = points.shape
    out_chs, in_chs = weight.shape[0], weight.shape[1]
    if grid is None:
        lin = torch.linspace(-1., 1., kernel_size, device=points.device, dtype=points.dtype)
        axes = [lin[crop:kernel_size - crop]] * dims
    else:
        axes = grid.to(points.dtype)[:, crop:kernel_size - crop].unbind(0)
    # L1 distance is separable: |q_0 - p_0| + |q_1 - p_1|, built by broadcasting per axis.
    dist = (axes[0] - points[:, :, 0:1]).abs()  # (F, Np, k)
    if dims == 2:
        dist = dist.unsqueeze(-1) + (axes[1] - points[:, :, 1:2]).abs().unsqueeze(-2)  # (F, Np, k, k)
    dist = dist.flatten(2)  # (F, Np, k^d)
    g = torch.relu(1. - dist / radius.unsqueeze(-1))
    if normalize:
        count = (g > 0).sum(dim=1, keepdim=True).to(g.dtype)
        g = g / (count + eps)
    if num_f == 1:
        # shared points: one (O*I, Np) @ (Np, k^d) matmul for the whole layer
        kernel = weight.reshape(out_chs * in_chs, num_points) @ g[0]
    else:
        kernel = torch.bmm(weight, g)
    return kernel.reshape([out_chs, in_chs] + [kernel_size - 2 * crop] * dims)


def render_smp_kernels(
        points: List[torch.Tensor],
        radius: List[torch.Tensor],
        weight: List[torch.Tensor],
        kernel_size: int,
        normalize: bool = False,
        eps: float = 1e-6,
) -> List[torch.Tensor]:
    """`render_smp_kernel` of several 2-D layers with per-filter points (points (O, Np, 2), radius (O, Np),
    weight (O, I, Np); the same Np and kernel size, any O and I) at once: the tents of all the filters in one
    computation and one batched matmul per input width, so the ops do not grow with the number of layers. The
    same values as rendering each layer alone."""
    order = sorted(range(len(points)), key=lambda i: weight[i].shape[1])  # one contiguous run per input width
    pts = torch.cat([points[i] for i in order])
    lin = torch.linspace(-1., 1., kernel_size, device=pts.device, dtype=pts.dtype)
    dist = (lin - pts[:, :, 0:1]).abs().unsqueeze(-1) + (lin - pts[:, :, 1:2]).abs().unsqueeze(-2)
    g = torch.relu(1. - dist.flatten(2) / torch.cat([radius[i] for i in order]).unsqueeze(-1))  # (sum O, Np, k*k)
    if normalize:
        count = (g > 0).sum(dim=1, keepdim=True).to(g.dtype)
        g = g / (count + eps)
    out: List[Optional[torch.Tensor]] = [None] * len(points)
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and weight[order[end]].shape[1] == weight[order[start]].shape[1]:
            end += 1
        run = order[start:end]
        rows = sum(points[i].shape[0] for i in order[:start])
        sizes = [points[i].shape[0] for i in run]
        kern = torch.bmm(torch.cat([weight[i] for i in run]), g[rows:rows + sum(sizes)])
        for i, k in zip(run, kern.split(sizes)):
            out[i] = k.reshape(k.shape[0], k.shape[1], kernel_size, kernel_size)
        start = end
    return out


def support_crop(points: torch.Tensor, radius: torch.Tensor, kernel_size: int,
                 grid: Optional[torch.Tensor] = None) -> int:
    """How many samples per side lie outside every point's support (L1 ball of its radius).

    The kernel is exactly zero there, so rendering and convolving with the central
    kernel_size - 2 * crop samples gives the same output. Reads the parameters on the host (a sync).
    `grid`: the (d, k) sample coordinates the kernel is rendered on, if not linspace(-1, 1, k).
    """
    extent = (points.detach().abs().amax(-1) + radius.detach().abs()).max().item()
    half = (kernel_size - 1) // 2
    if grid is None:
        return max(0, half - min(half, int(extent * (kernel_size - 1) / 2)))
    # a sample index can go when its coordinate lies beyond the extent on every axis, on both sides
    outside = (grid.detach().abs() > extent).all(0).tolist()
    crop = 0
    while crop < half and outside[crop] and outside[kernel_size - 1 - crop]:
        crop += 1
    return crop
