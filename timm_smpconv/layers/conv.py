""" Plain convolution modules used by the SMP layers and by their reparameterized form. """
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fuse import fold_bn, fold_preceding_bn

__all__ = ['CausalConv1d', 'ConvBN']


class CausalConv1d(nn.Conv1d):
    """nn.Conv1d whose output at time t sees only inputs up to t.

    The input is left-padded by dilation * (kernel_size - 1) zeros, so the last kernel tap
    multiplies the current time step and the output has the input's length (for stride 1).
    State dict and parameters are those of nn.Conv1d.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get('padding', 0) not in (0, (0,)):
            raise ValueError('CausalConv1d pads on the left itself; do not pass padding')
        kwargs['padding'] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.dilation[0] * (self.kernel_size[0] - 1)
        return self._conv_forward(F.pad(x, (pad, 0)), self.weight, self.bias)


class ConvBN(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> optional activation.

    `reparameterize()` folds the BatchNorm into the conv (which gains a bias); `fold_input_bn_()`
    absorbs a BatchNorm that precedes a 1x1 conv. Children are named conv / bn / act.
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
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=groups, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, **dd)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def _set_conv(self, weight: torch.Tensor, bias: torch.Tensor):
        old = self.conv
        conv = nn.Conv2d(
            old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
            dilation=old.dilation, groups=old.groups, bias=True, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.conv = conv.train(old.training)

    @torch.no_grad()
    def fold_input_bn_(self, bn: nn.Module):
        """Absorb `bn` applied to this layer's input (1x1, ungrouped conv only)."""
        self._set_conv(*fold_preceding_bn(self.conv.weight, self.conv.bias, bn))

    @torch.no_grad()
    def reparameterize(self):
        """Fold the BatchNorm into the conv in place (idempotent)."""
        if isinstance(self.bn, nn.Identity):
            return
        self._set_conv(*fold_bn(self.conv.weight, self.conv.bias, self.bn))
        self.bn = nn.Identity().train(self.training)
