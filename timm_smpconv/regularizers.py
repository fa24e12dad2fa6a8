""" The FlexConv paper's anti-aliasing regulariser, computed over a whole model (FlexConv paper §2).

Decision about the authors' code (rjbruin/flexconv): their per-filter frequency is
max|W|/2pi + S max|gamma|/2pi, the maxima over all units taken separately (a broadcasting accident in
their code). It is the default here, so the reported numbers stay comparable; `per_unit=True` gives the
per-unit maximum of |W|/2pi + S|gamma|/2pi instead.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_kernel_size, check_positive
from .layers.flexconv import FlexConv2d, MAGNet

__all__ = ['ALIASING_TARGETS', 'anti_aliasing_penalty']

# 'gabor': the MAGNet filters' frequencies (f_MAGNet+); 'gabor+mask': with the mask's (f_FlexConv+)
ALIASING_TARGETS = ('gabor', 'gabor+mask')


def _filter_frequencies(net: MAGNet, gauss_stddevs: float, per_unit: bool) -> torch.Tensor:
    """(L + 1,) frequency estimate of each Gabor filter, in cycles per unit of [-1, 1]."""
    freqs = []
    for filt in net.filters:
        w = filt.linear.weight.abs() / (2 * math.pi)
        g = gauss_stddevs * filt.gamma.abs() / (2 * math.pi)
        if per_unit:
            freqs.append((w + g).max())
        else:
            # the authors' value: (H, D, 1, 1) + (H, D) broadcasts to (H, D, H, D), max = sum of maxima
            freqs.append(w.max() + g.max())
    return torch.stack(freqs)


def anti_aliasing_penalty(
        model: nn.Module,
        target: str = 'gabor',
        method: str = 'together',
        gauss_stddevs: float = 2.0,
        factor: float = 0.1,
        kernel_size: Optional[int] = None,
        per_unit: bool = False,
) -> torch.Tensor:
    """The FlexConv paper's alias-free frequency regulariser of a whole model (as the authors' code
    computes it), to add to the training loss.

        R = factor * sum_{FlexConv layers} sum_{l = 0..L} max(0, f_l - t)^2

    f_l is the frequency of MAGNet filter l (max|W|/2pi + S max|gamma|/2pi, the authors' form; with
    per_unit=True the per-unit max of |W|/2pi + S|gamma|/2pi); with target 'gabor+mask' each f_l also
    gets (S max_d 1/|sigma_d| / 2pi) / (L + 1). The target t is the Nyquist frequency of the k-sample grid,
    (k - 1) / 4, split evenly over the L + 1 multiplied filters (method 'together').

    Args:
        model: any module containing MAGNet FlexConv2d layers.
        target: 'gabor' (f_MAGNet+) or 'gabor+mask' (f_FlexConv+).
        method: 'together' (the only method the paper runs use).
        gauss_stddevs: S, the number of envelope standard deviations counted.
        factor: lambda (0.1 in the paper's runs).
        kernel_size: the horizon k whose Nyquist frequency is the target; default each layer's own
            (which `retarget_resolution` keeps equal to resolution + 1, as their cross-res script sets it).
        per_unit: per-unit frequencies instead of the authors' broadcasting form.
    """
    check_choice('target', target, ALIASING_TARGETS)
    if method != 'together':
        raise ValueError(f"method must be 'together', got {method!r}")
    gauss_stddevs = check_positive('gauss_stddevs', gauss_stddevs)
    if kernel_size is not None:
        kernel_size = check_kernel_size(kernel_size, 2, minimum=3, what=' (the horizon)')
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, FlexConv2d) and isinstance(m.kernel_net, MAGNet)]
    if not layers:
        raise ValueError('anti_aliasing_penalty: the model has no FlexConv2d layer with a MAGNet kernel')
    total = None
    for name, layer in layers:
        net = layer.kernel_net
        k = layer.kernel_size if kernel_size is None else kernel_size
        t = (k - 1) / 4. / (net.num_layers + 1)
        f = _filter_frequencies(net, gauss_stddevs, per_unit)
        if target == 'gabor+mask':
            if layer.mask_params is None:
                raise ValueError(f"target 'gabor+mask' needs a masked FlexConv, but {name} has no mask")
            f_mask = gauss_stddevs * (1. / layer.mask_params[:, 1].abs()).max() / (2 * math.pi)
            f = f + f_mask / (net.num_layers + 1)
        term = F.relu(f - t).pow(2).sum()
        total = term if total is None else total + term
    return factor * total
