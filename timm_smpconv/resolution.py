""" Deploying a model at another input resolution (the FlexConv paper's cross-resolution protocol).

`retarget_resolution` works on whole models: it finds every 2-D continuous kernel (FlexConv2d,
CKConv2d, SMP convs) and re-samples it for the new resolution. 1-D layers follow sequence length
instead (`SequenceTCN.set_seq_len`).
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ._validate import square_size
from .layers.bn_stats import kernels_changed
from .layers.flexconv import FlexConv2d
from .layers.smp_conv import _SMPConvNd, _SMPLargeKernelNd

__all__ = ['retarget_resolution']


def _continuous_layers(model: nn.Module):
    """The 2-D continuous convs and SMP large-kernel branches of `model` (1-D layers follow sequence length)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (FlexConv2d, _SMPConvNd)) and m.dims == 2], [
        m for m in model.modules() if isinstance(m, _SMPLargeKernelNd) and m.dims == 2]


@torch.no_grad()
def retarget_resolution(
        model: nn.Module,
        img_size: Union[int, Tuple[int, int]],
        source_img_size: Optional[Union[int, Tuple[int, int]]] = None,
) -> nn.Module:
    """Re-target every continuous kernel of `model` (FlexConv2d, CKConv2d, SMP convs) to another input
    resolution, in place (the FlexConv paper's cross-resolution protocol, the authors' run_crossres.py).

    Each kernel keeps its continuous function over [-1, 1] and is sampled on a grid scaled with the
    resolution: k' = (k - 1) * img_size / source_img_size + 1 (horizon = resolution + 1 for FlexNet),
    values times (source / target)^d: FlexConv layers through their sampling-rate factor, SMP layers
    through their point weights (`set_kernel_size(k', mode='stretch')`). Mask means and sigmas (and SMP
    positions and radii) are unchanged, so kernels keep their size relative to the image. Discrete
    layers (the 3 x 3 branches of SMP FlexNet, 1 x 1 convs) are not resolution-aware and stay as they are.

    Args:
        model: the model; its `img_size` attribute (if any) is the default source and is updated.
        img_size: target resolution (int or square pair).
        source_img_size: the resolution the model's kernels are set up for (default `model.img_size`).
    """
    if source_img_size is None:
        source_img_size = getattr(model, 'img_size', None)
        if source_img_size is None:
            raise ValueError('retarget_resolution: pass source_img_size (the model has no img_size attribute)')
    target, source = square_size(img_size, 'img_size'), square_size(source_img_size, 'source_img_size')
    layers, wrappers = _continuous_layers(model)
    if not layers:
        raise ValueError('retarget_resolution: the model has no FlexConv or SMP layer')
    plan = []
    for name, m in layers:
        num = (m.kernel_size - 1) * target
        if num % source or (num // source + 1) % 2 == 0:
            raise ValueError(
                f'retarget_resolution: {name} has kernel size {m.kernel_size} at {source} px, which maps to '
                f'{num / source + 1:g} at {target} px; kernel sizes must stay odd integers')
        if num // source + 1 < 3:
            raise ValueError(
                f'retarget_resolution: {name} would get kernel size {num // source + 1} at {target} px (< 3)')
        plan.append((m, num // source + 1))
    with kernels_changed(model):  # the BatchNorms keep normalising as at the source resolution
        for m, k in plan:
            m.set_kernel_size(k, mode='stretch')
    for w in wrappers:
        w.kernel_size = w.smp.kernel_size
    if hasattr(model, 'img_size'):
        model.img_size = target
    return model
