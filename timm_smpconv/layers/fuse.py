""" Helpers shared by every fuse()/reparameterize() in the package: BN folding, kernel padding. """
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ['fill_conv_', 'fold_bn', 'fold_preceding_bn', 'pad_kernel', 'randomize_bn_stats_']


@torch.no_grad()
def fill_conv_(conv: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], training: bool) -> nn.Module:
    """Load (weight, bias) into a freshly built conv with a bias (a zero bias if `bias` is None) and set its mode."""
    conv.weight.copy_(weight)
    conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    return conv.train(training)


def _check_running_stats(bn: nn.Module):
    if getattr(bn, 'running_mean', None) is None or getattr(bn, 'running_var', None) is None:
        raise ValueError(
            f'cannot fold {type(bn).__name__} without running statistics (track_running_stats=False)')


@torch.no_grad()
def randomize_bn_stats_(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (in place).

    Fresh BatchNorms fold to the identity, which would let a wrong reparameterization pass a check;
    this is the test timm applies to its own fused models.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * scale)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * scale)
    return model


@torch.no_grad()
def fold_bn(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        bn: nn.Module,
        running_var: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference-mode BatchNorm that follows a conv into the conv's (weight, bias).

    BN(conv(x)) == conv'(x) with weight' = weight * t, bias' = (bias - mean) * t + beta,
    t = gamma / sqrt(var + eps). Uses the running statistics, as eval mode does (`running_var`: the variance
    eval mode uses where it is not the BatchNorm's own, see `KernelScaledBNMixin.eval_running_var`).
    """
    _check_running_stats(bn)
    w, b = fuse_conv_bn_weights(
        weight, bias, bn.running_mean, bn.running_var if running_var is None else running_var, bn.eps, bn.weight,
        bn.bias)
    return w.detach(), b.detach()


def pad_kernel(kernel: torch.Tensor, size: int, causal: bool = False) -> torch.Tensor:
    """Zero-pad the spatial dims of a (O, I, k[, k]) kernel to `size`.

    Centred padding for 'same' convolutions; for causal 1D kernels the zeros go at the start
    (the past), so the last tap stays aligned with the current time step.
    """
    k = kernel.shape[-1]
    if k > size or (size - k) % 2 and not causal:
        raise ValueError(f'cannot pad a kernel of size {k} to {size}')
    if k == size:
        return kernel
    if causal:
        return F.pad(kernel, (size - k, 0))
    p = (size - k) // 2
    return F.pad(kernel, [p, p] * (kernel.dim() - 2))


@torch.no_grad()
def fold_preceding_bn(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        bn: nn.Module,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference-mode BatchNorm that feeds a 1x1 conv (or a Linear) into its (weight, bias).

    conv(BN(x)) = W (t * x + s) + b = (W * t) x + (W s + b), t = gamma / sqrt(var + eps),
    s = beta - mean * t. Exact only for 1x1 kernels without groups (no zero padding to see the shift).
    """
    if weight.dim() > 2 and any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f'a preceding BatchNorm folds only into a 1x1 conv, got kernel {tuple(weight.shape[2:])}')
    _check_running_stats(bn)
    if weight.shape[1] != bn.running_mean.numel():
        raise ValueError(
            f'BatchNorm has {bn.running_mean.numel()} channels but the next layer takes {weight.shape[1]} '
            f'(grouped convs cannot absorb a preceding BatchNorm)')
    t = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        t = t * bn.weight
    s = -bn.running_mean * t
    if bn.bias is not None:
        s = s + bn.bias
    shape = [1, -1] + [1] * (weight.dim() - 2)
    new_w = weight * t.reshape(shape).to(weight.dtype)
    new_b = weight.flatten(1) @ s.to(weight.dtype)
    if bias is not None:
        new_b = new_b + bias
    return new_w.detach(), new_b.detach()
