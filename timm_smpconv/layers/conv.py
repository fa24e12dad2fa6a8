""" Plain convolution modules used by the SMP layers and by their reparameterized form. """
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CausalConv1d']


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
