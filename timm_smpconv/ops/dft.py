""" 'Same' depthwise cross-correlation through discrete Fourier transforms written as matrix products.

The FFT convolution (`fft.py`) needs an FFT. Runtimes that have none worth using (onnxruntime's `DFT` node
is a naive O(n^2) transform for lengths that are not powers of two: 384 ms for the rfft2 of a 96 x 72 x 72
map on one thread, against 14 ms for a direct 31 x 31 depthwise conv of it) still run matrix products at
full speed. Here the transforms are products with DFT matrices, restricted to what a 'same' convolution
needs: the h x w input rows and columns that hold data in, the h x w outputs out. For an (h, w) map and a
(kh, kw) kernel on the grid nh x nw (nh >= h + kh // 2, no wrap-around reaches a kept output; nw likewise;
m = nw // 2 + 1 column frequencies), per channel:

    A = X Fw                  (h, w) x (w, 2m)        column transform, [re | im]
    B = [C; S] A              (2nh, h) x (h, 2m)      row transform (C, S: the DFT's cosine and sine rows)
    Z = B * Kc                                        the kernel's spectrum (itself two small products)
    D = G Z                   (2h, 2nh) x (2nh, m)    inverse row transform, the h kept rows only
    Y = D P                   (h, 2m) x (2m, w)       inverse real column transform, the w kept columns

All channels share the matrices, so each step is one large matrix product over every channel at once:
about 4m + 8 nh m / w multiply-adds per output against kh kw for the direct convolution (528 against 961 for
smpconv_t's 31 x 31 kernels on 56 x 56 maps; the products run near the machine's matrix-multiply speed,
which the direct depthwise kernels do not). The ONNX export uses it for large depthwise kernels (see
`timm_smpconv.ops.dispatch.default_export_backend`): the graph holds MatMul nodes, no DFT node, and the
DFT matrices and the kernel spectra depend only on constants and weights, which onnxruntime folds when it
loads the model. Every op is a plain differentiable tensor op.
"""
import functools
import math
from typing import Optional, Tuple

import torch

from .fft import check_conv_args, is_channels_last

__all__ = ['dft_conv2d', 'dft_grid', 'dft_macs_per_output', 'dft_supports']


def dft_grid(h: int, w: int, kh: int, kw: int) -> Tuple[int, int]:
    """The smallest grid without wrap-around into kept outputs and with a cell per kernel tap (any length
    works: a matrix product has no preferred size)."""
    return max(h + kh // 2, kh), max(w + kw // 2, kw)


def dft_macs_per_output(h: int, w: int, kh: int, kw: int) -> float:
    """Multiply-adds per output value of `dft_conv2d` (the four products; the direct conv takes kh * kw)."""
    nh, nw = dft_grid(h, w, kh, kw)
    m = nw // 2 + 1
    return 4 * m + 8 * nh * m / w


def dft_supports(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> bool:
    """Depthwise (C, 1, kh, kw), odd kh and kw, stride 1, floating point."""
    return (stride == 1 and x.dim() == 4 and weight.dim() == 4 and groups == x.shape[1] == weight.shape[0]
            and weight.shape[1] == 1 and weight.shape[-2] % 2 == 1 and weight.shape[-1] % 2 == 1
            and x.is_floating_point())


def _angles(rows: int, cols: int, n: int, shift: int = 0, sign: float = 1.) -> torch.Tensor:
    """2 pi sign (r (c - shift) mod n) / n for r < rows, c < cols, in float64 (exact integer products first)."""
    r = torch.arange(rows, dtype=torch.float64)[:, None]
    c = torch.arange(cols, dtype=torch.float64)[None] - shift
    return (2 * math.pi * sign / n) * torch.remainder(r * c, n)


def _matrices(h: int, w: int, nh: int, nw: int, dtype: torch.dtype, device) -> Tuple[torch.Tensor, ...]:
    """Fw (w, 2m), CS (2nh, h), G (2h, 2nh), P (2m, w): the four transforms of the module docstring."""
    m = nw // 2 + 1
    aw = _angles(w, m, nw)  # (w, m): 2 pi x f / nw
    fw = torch.cat([torch.cos(aw), -torch.sin(aw)], 1)
    ah = _angles(nh, h, nh)  # (nh, h)
    cs = torch.cat([torch.cos(ah), -torch.sin(ah)], 0)
    ai = _angles(h, nh, nh)  # (h, nh)
    gc, gs = torch.cos(ai) / nh, torch.sin(ai) / nh
    g = torch.cat([torch.cat([gc, -gs], 1), torch.cat([gs, gc], 1)], 0)
    scale = torch.full((m, 1), 2. / nw, dtype=torch.float64)  # the half spectrum counts twice ...
    scale[0] = 1. / nw  # ... except the zero frequency and, for an even grid, the last
    if nw % 2 == 0:
        scale[-1] = 1. / nw
    ap = _angles(m, w, nw)  # (m, w)
    p = torch.cat([scale * torch.cos(ap), -scale * torch.sin(ap)], 0)
    return tuple(t.to(device=device, dtype=dtype) for t in (fw, cs, g, p))


@functools.lru_cache(maxsize=64)
def _cached_matrices(h, w, nh, nw, dtype, device) -> Tuple[torch.Tensor, ...]:
    return _matrices(h, w, nh, nw, dtype, device)


def _kernel_spectrum(weight: torch.Tensor, nh: int, nw: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(re, im), each (nh, C, m): the spectrum that multiplies the input's for a cross-correlation with the
    kernel centred at grid index 0, sum_ab K[a, b] exp(+2 pi i (fh (a - kh // 2) / nh + fw (b - kw // 2) / nw))."""
    c, _, kh, kw = weight.shape
    m = nw // 2 + 1
    ew = _angles(m, kw, nw, kw // 2)  # (m, kw)
    eh = _angles(nh, kh, nh, kh // 2)  # (nh, kh)
    ewc, ews, ehc, ehs = (t.to(device=weight.device, dtype=dtype) for t in (
        torch.cos(ew).T, torch.sin(ew).T, torch.cos(eh), torch.sin(eh)))
    k = weight.reshape(c, kh, kw).to(dtype)
    tr, ti = k @ ewc, k @ ews  # (C, kh, m)
    kr = ehc @ tr - ehs @ ti  # (C, nh, m)
    ki = ehc @ ti + ehs @ tr
    return kr.transpose(0, 1), ki.transpose(0, 1)


def dft_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C) for a depthwise (C, 1, kh, kw) weight,
    through DFTs as matrix products (module docstring). Float32 arithmetic for float32 and lower precisions
    (the result is cast back), float64 for float64; the output keeps the input's memory format."""
    check_conv_args(x, weight, x.shape[1], 'dft_conv2d')
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f'dft_conv2d is depthwise: weight {list(weight.shape)} for {x.shape[1]} channels')
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2], weight.shape[-1]
    nh, nw = dft_grid(h, w, kh, kw)
    m = nw // 2 + 1
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        fw, cs, g, p = _matrices(h, w, nh, nw, dtype, x.device)  # traced: constants of the graph
    else:
        fw, cs, g, p = _cached_matrices(h, w, nh, nw, dtype, x.device)
    kr, ki = _kernel_spectrum(weight, nh, nw, dtype)  # (nh, C, m)
    # rows outermost, so that the row transforms are single products over every image and channel
    a = x.to(dtype).permute(2, 0, 1, 3).reshape(h * n * c, w) @ fw  # (h, n, c, [re | im] m)
    b = (cs @ a.reshape(h, n * c * 2 * m)).reshape(2, nh, n, c, 2, m)  # [cos; sin] rows x [re | im] columns
    br = b[0, :, :, :, 0] - b[1, :, :, :, 1]
    bi = b[1, :, :, :, 0] + b[0, :, :, :, 1]
    kr, ki = kr[:, None], ki[:, None]
    z = torch.cat([br * kr - bi * ki, br * ki + bi * kr], 0)  # (2nh, n, c, m)
    d = (g @ z.reshape(2 * nh, n * c * m)).reshape(2, h, n, c, m).permute(2, 3, 1, 0, 4)
    y = (d.reshape(n * c * h, 2 * m) @ p).reshape(n, c, h, w)
    if bias is not None:
        y = y + bias.to(dtype).reshape(1, -1, 1, 1)
    y = y.to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y
