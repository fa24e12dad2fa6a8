""" The Triton depthwise 'same' convolution as the `timm_smpconv::dwconv2d` custom op.

The op and its fake implementation are registered without importing Triton; the kernels
(`triton_dwconv.py`) are imported on the first call. They run on CUDA tensors, and on CPU tensors only
under Triton's interpreter (`TRITON_INTERPRET=1`), which is what the CPU tests use.
"""
import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch

from .fft import _output_like, bias_grad, check_conv_args, conv_out_dtype

__all__ = ['triton_available', 'triton_dwconv2d', 'triton_fits', 'triton_supports']


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec('triton') is not None


def triton_available(device_type: str) -> bool:
    """Triton can run this backend's kernels on tensors of `device_type` here."""
    if not _triton_installed():
        return False
    if os.environ.get('TRITON_INTERPRET') == '1':
        return True
    return device_type == 'cuda' and torch.cuda.is_available()


def triton_fits(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> bool:
    """The conv is one the kernels compute: depthwise (C, 1, kh, kw) with odd kh, kw, stride 1, floating dtype
    (on any device: the ahead-of-time compile check reads meta tensors)."""
    return (stride == 1 and x.dim() == 4 and weight.dim() == 4 and groups == x.shape[1] == weight.shape[0]
            and weight.shape[1] == 1 and weight.shape[-2] % 2 == 1 and weight.shape[-1] % 2 == 1
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))


def triton_supports(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> bool:
    """`triton_fits`, on a device Triton runs on; float32 only with TF32 allowed (torch.backends.cudnn.allow_tf32,
    PyTorch's default for convolutions). With TF32 off the dispatch leaves exact float32 to the other backends:
    the kernels' full-precision dot runs on FMA units and spills registers at every tile size the models use
    (sm_80 to sm_100, `timm_smpconv.triton_aot`)."""
    if conv_out_dtype(x) == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return False
    return triton_fits(x, weight, stride, groups) and triton_available(x.device.type)


def _kernels():
    from . import triton_dwconv
    return triton_dwconv


@torch.library.custom_op('timm_smpconv::dwconv2d', mutates_args=())
def _dwconv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _kernels().dwconv2d_forward(x, weight, bias)


@_dwconv2d_op.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op('timm_smpconv::dwconv2d_backward', mutates_args=())
def _dwconv2d_backward_op(
        gy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        need_x: bool,
        need_w: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input gradient in x's dtype and layout, kernel gradient in weight's dtype); empty where not needed."""
    k = _kernels()
    # the output gradient in x's dtype and layout (a copy only where autograd hands over another layout): both
    # kernels then read x and gy alike, and the compiled variants are one per layout (see triton_aot)
    gy = gy.to(x.dtype).contiguous(memory_format=_output_like(x))
    gx = k.dwconv2d_input_grad(gy, weight, out=torch.empty_like(x)) if need_x else x.new_empty(0)
    gw = (k.dwconv2d_weight_grad(gy, x, weight.shape[-2], weight.shape[-1]).to(weight.dtype) if need_w
          else weight.new_empty(0))
    return gx, gw


@_dwconv2d_backward_op.register_fake
def _(gy, x, weight, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_fn(ctx, gy):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = torch.ops.timm_smpconv.dwconv2d_backward(gy, x, weight, need_x, need_w)
        gx, gw = (gx if need_x else None), (gw if need_w else None)
    if need_b:
        gb = bias_grad(gy, ctx.bias_dtype)
    return gx, gw, gb


_dwconv2d_op.register_autograd(_backward_fn, setup_context=_setup_context)


def triton_dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C) by the Triton kernels.

    Odd kh, kw (non-square allowed), stride 1; float16 / bfloat16 / float32 (float64 for tests) with float32
    accumulation; NCHW or channels_last without layout copies. Under autocast, input, kernel and bias are cast
    to the autocast dtype as F.conv2d does; the output has the input's memory format.
    """
    check_conv_args(x, weight, x.shape[1] if x.dim() == 4 else 1, 'triton_dwconv2d')
    if weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f'triton_dwconv2d is depthwise: weight must be ({x.shape[1]}, 1, kh, kw) for '
                         f'{x.shape[1]} input channels, got {list(weight.shape)}')
    if not triton_available(x.device.type):
        raise RuntimeError(
            f'triton_dwconv2d needs Triton and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); '
            f'got a {x.device.type} tensor')
    dtype = conv_out_dtype(x)
    return torch.ops.timm_smpconv.dwconv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
