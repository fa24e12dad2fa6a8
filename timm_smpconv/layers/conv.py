""" Plain convolution modules used by the SMP layers and by their reparameterized form. """
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import causal_conv1d, large_kernel_conv2d
from .bn_stats import KernelScaledBNMixin, kernels_changed
from .fuse import fill_conv_, fold_bn, fold_preceding_bn
from .recompute import activation, recompute_activation, recompute_batch_norm, recomputing

__all__ = ['CausalConv1d', 'ConvBN', 'DispatchConvMixin', 'LargeKernelConv2d']

# torch.fx records the dispatch as one call (a leaf) instead of tracing its shape logic
torch.fx.wrap('large_kernel_conv2d')
torch.fx.wrap('causal_conv1d')


class CausalConv1d(nn.Conv1d):
    """nn.Conv1d whose output at time t sees only inputs up to t.

    The input is left-padded by dilation * (kernel_size - 1) zeros, so the last kernel tap
    multiplies the current time step and the output has the input's length (for stride 1).
    State dict and parameters are those of nn.Conv1d. Stride 1 without dilation convolves through
    `timm_smpconv.ops.causal_conv1d` (direct, or the FFT for long kernels; the same result).
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get('padding', 0) not in (0, (0,)):
            raise ValueError('CausalConv1d pads on the left itself; do not pass padding')
        kwargs['padding'] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.stride[0] == 1 and self.dilation[0] == 1:
                return causal_conv1d(x, self.weight, self.bias, self.groups)
        pad = self.dilation[0] * (self.kernel_size[0] - 1)
        return self._conv_forward(F.pad(x, (pad, 0)), self.weight, self.bias)


class ConvBN(KernelScaledBNMixin, nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> optional activation.

    The BatchNorm's eval variance follows the conv weight's scale (`KernelScaledBNMixin`; buffer bn_kernel_sq).

    `reparameterize()` folds the BatchNorm into the conv (which gains a bias); `fold_input_bn_()`
    absorbs a BatchNorm that precedes a 1x1 conv. Children are named conv / bn / act.
    `inference_mode=True` builds the folded form directly (a conv with bias, no BatchNorm), as timm's
    MobileOne / FastViT blocks do.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 1,
            stride: int = 1,
            groups: int = 1,
            act_layer: Optional[Type[nn.Module]] = None,
            bn_eps: float = 1e-5,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=groups, bias=inference_mode, **dd)
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(out_channels, eps=bn_eps, **dd)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self._init_kernel_sq()

    def _kernel(self, bn_name: str) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.act(self.bn(self.conv(x)))
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not recomputing():
            return self.act(self._bn_forward(self.conv(x), 'bn'))
        c = self.conv(x)
        y = self._bn_forward(c, 'bn')
        if isinstance(self.bn, nn.BatchNorm2d):
            recompute_batch_norm(c, y, self.bn)  # keep only the conv output: BN and activation recomputed from it
        z = activation(self.act, y)
        recompute_activation(z, self.act, y)
        return z

    @torch.no_grad()
    def _set_conv(self, weight: torch.Tensor, bias: torch.Tensor):
        old = self.conv
        conv = nn.Conv2d(
            old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
            dilation=old.dilation, groups=old.groups, bias=True, device=weight.device, dtype=weight.dtype)
        self.conv = fill_conv_(conv, weight, bias, old.training)

    @torch.no_grad()
    def fold_input_bn_(self, bn: nn.Module):
        """Absorb `bn` applied to this layer's input (1x1, ungrouped conv only)."""
        with kernels_changed(self):  # the same outputs: our BatchNorm keeps its eval variance
            self._set_conv(*fold_preceding_bn(self.conv.weight, self.conv.bias, bn))

    @torch.no_grad()
    def reparameterize(self):
        """Fold the BatchNorm into the conv in place (idempotent)."""
        if isinstance(self.bn, nn.Identity):
            return
        self._set_conv(*fold_bn(self.conv.weight, self.conv.bias, self.bn, self.eval_running_var('bn')))
        self.bn = nn.Identity().train(self.training)
        self._drop_kernel_sq('bn')


class DispatchConvMixin:
    """For modules that convolve through `timm_smpconv.ops.large_kernel_conv2d`: `_dispatch_conv` passes it
    a cache the module owns (for state derived from fixed weights, e.g. an FFT kernel spectrum in eval),
    never under fx tracing or torch.compile, where the graph recomputes it."""

    @torch.jit.unused
    def _dispatch_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                       groups: int) -> torch.Tensor:
        cache = None
        if not (isinstance(weight, torch.fx.Proxy) or torch.compiler.is_compiling()):
            cache = self.__dict__.setdefault('_conv_cache', {})
        return large_kernel_conv2d(x, weight, bias, stride, groups, cache)

    def __getstate__(self):
        # the cache holds a weak reference (not picklable) and is derived state: pickles go without it
        state = dict(super().__getstate__())  # a copy: the live module keeps its cache
        state.pop('_conv_cache', None)
        return state


class LargeKernelConv2d(DispatchConvMixin, nn.Conv2d):
    """nn.Conv2d with symmetric padding (kh // 2, kw // 2) whose forward convolves through
    `timm_smpconv.ops.large_kernel_conv2d`: directly, through the FFT or by the Triton kernels, as the
    dispatch picks (the same result every way).

    The reparameterized form of our large-kernel layers: state dict, parameters and isinstance checks are
    those of nn.Conv2d; only the speed differs (PyTorch's direct kernels are slow for large depthwise
    kernels, above 13 x 13 on CPU and on CUDA).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, groups: int = 1,
                 bias: bool = True, device=None, dtype=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, (kh, kw), stride=stride, padding=(kh // 2, kw // 2),
                         groups=groups, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._dispatch_conv(x, self.weight, self.bias, self.stride[0], self.groups)
