""" Plain convolution modules used by the SMP layers and by their reparameterized form. """
import weakref
from typing import Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fuse import fill_conv_, fold_bn, fold_preceding_bn

__all__ = ['CausalConv1d', 'ConvBN', 'SameConv2d', 'conv2d_same', 'fft_conv2d', 'fft_size', 'use_fft', 'set_conv_impl', 'conv_impl']

_CONV_IMPL = 'auto'
_CONV_IMPLS = ('auto', 'direct', 'fft')


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
        self.conv = fill_conv_(conv, weight, bias, old.training)

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


def fft_size(n: int) -> int:
    """Smallest even m >= n whose prime factors are 2, 3, 5 and 7.

    Measured (2-core x86, pocketfft, 8 x C maps; `python benchmarks/conv_paths.py`, grid table): even
    lengths beat the odd ones next to them by 1.3-1.5x for the forward + inverse transforms (28 vs 27 on
    14 x 14 maps, 14 vs 13 on 7 x 7), and 7 is as fast a factor as 5 (42 for 28 x 28 maps).
    """
    m = max(2, n + (n % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def _check_fft_args(x: torch.Tensor, weight: torch.Tensor, groups: int):
    kh, kw = weight.shape[-2], weight.shape[-1]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'fft_conv2d needs odd kernel dims, got {kh}x{kw}')
    c, out_chs = x.shape[1], weight.shape[0]
    if c % groups or out_chs % groups or weight.shape[1] != c // groups:
        raise ValueError(f'weight {list(weight.shape)} does not fit input channels {c} with groups={groups}')


def _is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (not one that is contiguous either way, e.g. with C = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rfft2_rows(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """rfft2 of x zero-padded to nh x nw, transforming only the x.shape[-2] rows that hold data."""
    return torch.fft.fft(torch.fft.rfft(x, n=nw, dim=-1), n=nh, dim=-2)


def _irfft2_rows(spec: torch.Tensor, h: int, w: int, nw: int) -> torch.Tensor:
    """The top-left h x w of irfft2(spec) on an nh x nw grid, inverting only the h rows that are kept."""
    return torch.fft.irfft(torch.fft.ifft(spec, dim=-2)[..., :h, :], n=nw, dim=-1)[..., :w]


def _freq_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frequency complex matmul a[f] @ b[f] ((F, p, q) x (F, q, r)) as one real bmm.

    PyTorch's complex bmm on CPU loops over the batch; here a is read as interleaved (re, im) pairs and b
    becomes the real block matrix [[br, bi], [-bi, br]] laid out to match, so one real bmm does it all.
    """
    f, p, q = a.shape
    r = b.shape[-1]
    # rows (q, re) hold (br, bi) = b, rows (q, im) hold (-bi, br) = i * b
    block = torch.stack((torch.view_as_real(b), torch.view_as_real(b * 1j)), 2).reshape(f, 2 * q, 2 * r)
    out = torch.bmm(torch.view_as_real(a).reshape(f, p, 2 * q), block)
    return torch.view_as_complex(out.view(f, p, r, 2))


def _mix(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """out[n, g, o] = sum_i a[n, g, i] * b[g, i, o] at every frequency; a (N, G*I, nh, nwf), b (G, I, O, nh, nwf)."""
    n, _, nh, nwf = a.shape
    g, i, o = b.shape[:3]
    fa = a.reshape(n, g, i, nh * nwf).permute(3, 1, 0, 2).reshape(nh * nwf * g, n, i)
    fb = b.reshape(g, i, o, nh * nwf).permute(3, 0, 1, 2).reshape(nh * nwf * g, i, o)
    out = _freq_bmm(fa, fb).reshape(nh * nwf, g, n, o)
    return out.permute(2, 1, 3, 0).reshape(n, g * o, nh, nwf)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    return groups == x.shape[1] and weight.shape[1] == 1 and weight.shape[0] == groups


class _FFTConv2dFn(torch.autograd.Function):
    """'Same' correlation through the FFT in float32 with a hand-written backward.

    Forward: Y = X * conj(Wr), with X the spectrum of the zero-padded input and Wr that of the kernel
    rolled so its centre sits at index 0. Backward: the input gradient is the convolution of the output
    gradient with the kernel (G * Wr) and the kernel gradient the correlation of the input with the
    output gradient (sum over the batch of X * conj(G)), rolled back and cropped to the kernel. Only the
    rows that hold data are transformed (rows first), which halves the row transforms on small maps.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, groups: int, nh: int, nw: int, wspec):
        h, w = x.shape[-2], x.shape[-1]
        kh, kw = weight.shape[-2], weight.shape[-1]
        xs = _rfft2_rows(x, nh, nw)
        if wspec is None:
            wspec = _kernel_spectrum(weight, nh, nw)
        depthwise = _depthwise(x, weight, groups)
        if depthwise:
            ys = xs * wspec[:, 0].conj()
        else:
            c, o = x.shape[1], weight.shape[0]
            wg = wspec.conj().reshape(groups, o // groups, c // groups, nh, nw // 2 + 1).transpose(1, 2)
            ys = _mix(xs, wg, groups)
        ctx.save_for_backward(xs, wspec)
        ctx.meta = (groups, depthwise, h, w, kh, kw, nh, nw)
        return _irfft2_rows(ys, h, w, nw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: torch.Tensor):
        xs, wspec = ctx.saved_tensors
        groups, depthwise, h, w, kh, kw, nh, nw = ctx.meta
        gs = _rfft2_rows(gy.float(), nh, nw)
        gx = gw = None
        n, c = xs.shape[:2]
        o = wspec.shape[0]
        if ctx.needs_input_grad[0]:
            if depthwise:
                gxs = gs * wspec[:, 0]
            else:  # gx[n, g, i] = sum_o g[n, g, o] w[g, o, i]
                gxs = _mix(gs, wspec.reshape(groups, o // groups, c // groups, nh, nw // 2 + 1), groups)
            gx = _irfft2_rows(gxs, h, w, nw)
        if ctx.needs_input_grad[1]:
            if depthwise:
                gws = (xs * gs.conj()).sum(0).unsqueeze(1)
            else:  # gw[g, o, i] = sum_n conj(g[n, g, o]) x[n, g, i]
                ci, co = c // groups, o // groups
                a = gs.conj().reshape(n, groups, co, nh, nw // 2 + 1).permute(2, 1, 0, 3, 4)
                a = a.reshape(co, groups * n, nh, nw // 2 + 1)
                b = xs.reshape(n, groups, ci, nh, nw // 2 + 1).transpose(0, 1)
                gws = _mix(a, b, groups).reshape(co, groups, ci, nh, nw // 2 + 1).transpose(0, 1)
                gws = gws.reshape(o, ci, nh, nw // 2 + 1)
            grid = torch.fft.irfft2(gws, s=(nh, nw))
            gw = grid.roll((kh // 2, kw // 2), (-2, -1))[..., :kh, :kw]
        return gx, gw, None, None, None, None


def _kernel_spectrum(weight: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """rfft2 of the kernel zero-padded to nh x nw with its centre rolled to index 0."""
    kh, kw = weight.shape[-2], weight.shape[-1]
    wp = F.pad(weight.float(), (0, nw - kw, 0, nh - kh)).roll((-(kh // 2), -(kw // 2)), (-2, -1))
    return _rfft2_rows(wp, nh, nw)  # the same transforms as the input's, so the spectra share a memory layout


# kernel spectra of weights that do not change between calls (eval / no-grad), keyed by tensor identity
_SPECTRA: Dict[int, tuple] = {}


def _cached_kernel_spectrum(weight: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """`_kernel_spectrum`, reused while the same weight tensor is unmodified (its version counter is
    unchanged); the entry goes when the tensor is freed. Inference tensors have no version counter
    and are transformed every call."""
    try:
        key = (weight._version, weight.data_ptr(), nh, nw, weight.dtype, weight.device)
    except RuntimeError:
        return _kernel_spectrum(weight, nh, nw)
    wid = id(weight)
    entry = _SPECTRA.get(wid)
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    spec = _kernel_spectrum(weight, nh, nw)
    _SPECTRA[wid] = (weakref.ref(weight, lambda _, k=wid: _SPECTRA.pop(k, None)), key, spec)
    return spec


def fft_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        groups: int = 1,
) -> torch.Tensor:
    """'Same' cross-correlation, F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=groups),
    computed through the FFT in float32 (complex64) and returned in the dtype F.conv2d would give (the
    autocast dtype under autocast).

    Stride 1, odd kernel dims; depthwise is an elementwise product of spectra, other groupings mix
    channels per frequency. The grid is H + kh // 2 by W + kw // 2, rounded up to a fast FFT length:
    with the kernel centre rolled to index 0 no wrap-around reaches the kept outputs.
    """
    _check_fft_args(x, weight, groups)
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    h, w = x.shape[-2], x.shape[-1]
    kh, kw = weight.shape[-2], weight.shape[-1]
    # at least kernel-sized, so every kernel tap has its own grid cell (the kernel gradient needs it)
    nh, nw = fft_size(max(h + kh // 2, kh)), fft_size(max(w + kw // 2, kw))
    channels_last = _is_channels_last(x)
    with torch.autocast(x.device.type, enabled=False):
        wspec = None
        if not (torch.is_grad_enabled() and weight.requires_grad):
            wspec = _cached_kernel_spectrum(weight, nh, nw)
        y = _FFTConv2dFn.apply(x.float(), weight.float(), groups, nh, nw, wspec)
        if bias is not None:
            y = y + bias.float().reshape(1, -1, 1, 1)
    return y.to(out_dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def set_conv_impl(impl: str) -> str:
    """Choose how `conv2d_same` convolves: 'auto' (the measured per-shape rule), 'direct' or 'fft'.

    Returns the previous setting. Also a context manager: `with conv_impl('fft'): ...`.
    """
    global _CONV_IMPL
    if impl not in _CONV_IMPLS:
        raise ValueError(f'conv impl must be one of {_CONV_IMPLS}, got {impl!r}')
    prev, _CONV_IMPL = _CONV_IMPL, impl
    return prev


class conv_impl:
    """Context manager form of `set_conv_impl`."""

    def __init__(self, impl: str):
        self.impl = impl
        self.prev = None

    def __enter__(self):
        self.prev = set_conv_impl(self.impl)
        return self

    def __exit__(self, *exc):
        set_conv_impl(self.prev)
        return False


def use_fft(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """The dispatch rule of `conv2d_same` for stride-1 convs (measured on a 2-core x86 CPU, torch 2.14,
    batch 1 and 8: `python benchmarks/conv_paths.py`, table in README 'Large-kernel convolution'):

    * CPU, depthwise, no gradient: PyTorch's direct NCHW kernel is fast up to 13 x 13 and falls off a
      cliff above (15 x 15 is 7-40x slower than 13 x 13), so FFT for k > 13; its channels_last kernel has
      no cliff (27 x 27 on 14 x 14 maps: 2.9 ms direct, 8.0 ms FFT), so FFT only from 31 x 31.
    * CPU, depthwise, with gradient: the direct backward is slow for large kernels, so FFT from 9 x 9;
      NCHW also from 5 x 5 on maps of 50 x 50 and more (channels_last 5 x 5 stays direct: 16 ms vs 29 ms).
    * CPU, full (or grouped) convs: FFT from 7 x 7.
    * CUDA and other devices: direct (cuDNN); no GPU was available to measure a crossover.
    """
    if _CONV_IMPL != 'auto':
        return _CONV_IMPL == 'fft'
    if x.device.type != 'cpu':
        return False
    kh, kw = weight.shape[-2], weight.shape[-1]
    k = min(kh, kw)
    depthwise = weight.shape[1] == 1 and groups == x.shape[1]
    if not depthwise:
        return kh * kw >= 49
    channels_last = _is_channels_last(x)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return k >= 31 if channels_last else k > 13
    if channels_last:
        return k >= 9
    return k >= 9 or (k >= 5 and x.shape[-2] * x.shape[-1] >= 2500)


def conv2d_same(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: int = 1,
        groups: int = 1,
) -> torch.Tensor:
    """F.conv2d with 'same' padding (kh // 2, kw // 2), computed directly or through the FFT by `use_fft`.

    Both give the same result (to float32 rounding). Under torch.jit.script / torch.jit.trace (fvcore's
    FLOP counting) the direct conv is used, so traced graphs and FLOP counts show a real convolution.
    """
    kh, kw = weight.shape[-2], weight.shape[-1]
    if torch.jit.is_scripting():
        return F.conv2d(x, weight, bias, stride, (kh // 2, kw // 2), 1, groups)
    if stride == 1 and not torch.jit.is_tracing() and use_fft(x, weight, groups):
        return fft_conv2d(x, weight, bias, groups)
    return F.conv2d(x, weight, bias, stride, (kh // 2, kw // 2), 1, groups)


# torch.fx records the dispatch as one call instead of tracing its shape logic
torch.fx.wrap('conv2d_same')


class SameConv2d(nn.Conv2d):
    """A plain nn.Conv2d with 'same' padding (kh // 2, kw // 2) whose forward convolves through
    `conv2d_same`, i.e. directly or through the FFT by the measured rule (the same result either way).

    The reparameterized form of our large-kernel layers: state dict, parameters and isinstance checks are
    those of nn.Conv2d; only the speed differs (PyTorch's direct CPU kernel is slow above 13 x 13).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, groups: int = 1,
                 bias: bool = True, device=None, dtype=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, (kh, kw), stride=stride, padding=(kh // 2, kw // 2),
                         groups=groups, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.weight, self.bias, self.stride[0], self.groups)
