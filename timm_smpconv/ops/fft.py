""" 'Same' cross-correlation through the FFT, as the `timm_smpconv::fft_conv2d` custom op.

Forward: Y = X * conj(Wr), X the spectrum of the zero-padded input and Wr that of the kernel rolled so its
centre sits at grid index 0; no wrap-around reaches the kept outputs on a grid of H + kh // 2 by
W + kw // 2 (rounded up to a fast FFT length). Backward: the input gradient is the convolution of the
output gradient with the kernel (G * Wr), the kernel gradient the correlation of the input with the output
gradient (the batch sum of X * conj(G)), rolled back and cropped to the kernel.

Both directions are `torch.library` custom ops with fake implementations, so torch.compile and
torch.export see one opaque node each (Inductor cannot lower complex tensors) and no graph breaks. The
forward hands its spectra to the backward as real float32 views (transforming the input again instead
made a smpconv_t training step 10% slower on CPU; the spectra take more memory than a bf16 input: a
trade to measure on a GPU). Conjugation is always physical
(`torch.conj_physical`): a lazily conjugated tensor lost its conjugate bit inside compiled graphs
(torch 2.14, CPU: wrong outputs under aot_eager and inductor, exact in eager).
"""
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['fft_conv2d', 'fft_grid', 'fft_size', 'keep_spectra', 'kernel_spectrum', 'spectra_kept']


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


def fft_grid(h: int, w: int, kh: int, kw: int) -> Tuple[int, int]:
    """The FFT grid for an h x w map and a kh x kw kernel: at least map + half kernel (no wrap-around
    reaches a kept output) and at least kernel-sized (every tap has its own cell for the kernel gradient).
    A single row with a single-row kernel (the 1-D convs) needs no transform along the rows: nh = 1."""
    nh = 1 if h == 1 and kh == 1 else fft_size(max(h + kh // 2, kh))
    return nh, fft_size(max(w + kw // 2, kw))


def check_conv_args(x: torch.Tensor, weight: torch.Tensor, groups: int, who: str):
    """Raise a ValueError naming what is wrong with a 'same' conv's input, odd kernel and grouping."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f'{who} needs a 4-D input and weight, got {list(x.shape)} and {list(weight.shape)}')
    kh, kw = weight.shape[-2], weight.shape[-1]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'{who} needs odd kernel dims, got {kh}x{kw}')
    c, out_chs = x.shape[1], weight.shape[0]
    if groups < 1 or c % groups or out_chs % groups or weight.shape[1] != c // groups:
        raise ValueError(f'weight {list(weight.shape)} does not fit input channels {c} with groups={groups}')


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (not one that is contiguous either way, e.g. with C = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _output_like(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _rfft2_rows(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """rfft2 of x zero-padded to nh x nw, transforming only the x.shape[-2] rows that hold data."""
    spec = torch.fft.rfft(x, n=nw, dim=-1)
    return spec if nh == 1 else torch.fft.fft(spec, n=nh, dim=-2)


def _irfft2_rows(spec: torch.Tensor, h: int, w: int, nw: int) -> torch.Tensor:
    """The top-left h x w of irfft2(spec) on an nh x nw grid, inverting only the h rows that are kept."""
    if spec.shape[-2] > 1:
        spec = torch.fft.ifft(spec, dim=-2)[..., :h, :]
    return torch.fft.irfft(spec, n=nw, dim=-1)[..., :w]


def _freq_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frequency complex matmul a[f] @ b[f] ((F, p, q) x (F, q, r)) as one real bmm.

    PyTorch's complex bmm on CPU loops over the batch; here a is read as interleaved (re, im) pairs and b
    becomes the real block matrix [[br, bi], [-bi, br]] laid out to match, so one real bmm does it all.
    """
    f, p, q = a.shape
    r = b.shape[-1]
    # rows (q, re) hold (br, bi) = b, rows (q, im) hold (-bi, br) = i * b
    block = torch.stack((torch.view_as_real(b), torch.view_as_real(b * 1j)), 2).reshape(f, 2 * q, 2 * r)
    out = torch.bmm(torch.view_as_real(a.contiguous()).reshape(f, p, 2 * q), block)
    return torch.view_as_complex(out.view(f, p, r, 2))


def _mix(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """out[n, g, o] = sum_i a[n, g, i] * b[g, i, o] at every frequency; a (N, G*I, nh, nwf), b (G, I, O, nh, nwf)."""
    n, _, nh, nwf = a.shape
    g, i, o = b.shape[:3]
    fa = a.reshape(n, g, i, nh * nwf).permute(3, 1, 0, 2).reshape(nh * nwf * g, n, i)
    fb = b.reshape(g, i, o, nh * nwf).permute(3, 0, 1, 2).reshape(nh * nwf * g, i, o)
    out = _freq_bmm(fa, fb).reshape(nh * nwf, g, n, o)
    return out.permute(2, 1, 3, 0).reshape(n, g * o, nh, nwf)


def _is_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    return groups == x.shape[1] and weight.shape[1] == 1 and weight.shape[0] == groups


def kernel_spectrum(weight: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """rfft2 of the kernel zero-padded to nh x nw with its centre rolled to index 0, as a real tensor
    (..., nh, nw // 2 + 1, 2) (the form `fft_conv2d` takes as `wspec`, so no complex tensor crosses an op)."""
    kh, kw = weight.shape[-2], weight.shape[-1]
    wp = F.pad(weight.float(), (0, nw - kw, 0, nh - kh)).roll((-(kh // 2), -(kw // 2)), (-2, -1))
    return torch.view_as_real(_rfft2_rows(wp, nh, nw))  # the input's transforms: the spectra share a layout


def _forward(x, weight, groups: int, wspec: Optional[torch.Tensor]):
    """(output in float32, input spectrum, kernel spectrum), the spectra complex."""
    h, w = x.shape[-2], x.shape[-1]
    kh, kw = weight.shape[-2], weight.shape[-1]
    nh, nw = fft_grid(h, w, kh, kw)
    xs = _rfft2_rows(x.float(), nh, nw)
    ws = torch.view_as_complex(kernel_spectrum(weight, nh, nw) if wspec is None else wspec)
    wconj = torch.conj_physical(ws)
    if _is_depthwise(x, weight, groups):
        ys = xs * wconj[:, 0]
    else:
        c, o = x.shape[1], weight.shape[0]
        ys = _mix(xs, wconj.reshape(groups, o // groups, c // groups, nh, nw // 2 + 1).transpose(1, 2), groups)
    return _irfft2_rows(ys, h, w, nw), xs, ws


def _backward(gy, x, weight, xs, ws, groups: int, need_x: bool, need_w: bool):
    """(input gradient, kernel gradient) in float32, None where not needed; xs / ws: the forward's spectra,
    or None to transform again."""
    h, w = x.shape[-2], x.shape[-1]
    kh, kw = weight.shape[-2], weight.shape[-1]
    nh, nw = fft_grid(h, w, kh, kw)
    nwf = nw // 2 + 1
    gs = _rfft2_rows(gy.float(), nh, nw)
    depthwise = _is_depthwise(x, weight, groups)
    n, c, o = x.shape[0], x.shape[1], weight.shape[0]
    gx = gw = None
    if need_x:
        if ws is None:
            ws = torch.view_as_complex(kernel_spectrum(weight, nh, nw))
        if depthwise:
            gxs = gs * ws[:, 0]
        else:  # gx[n, g, i] = sum_o g[n, g, o] w[g, o, i]
            gxs = _mix(gs, ws.reshape(groups, o // groups, c // groups, nh, nwf), groups)
        gx = _irfft2_rows(gxs, h, w, nw)
    if need_w:
        if xs is None:
            xs = _rfft2_rows(x.float(), nh, nw)
        gconj = torch.conj_physical(gs)
        if depthwise:
            gws = (xs * gconj).sum(0).unsqueeze(1)
        else:  # gw[g, o, i] = sum_n conj(g[n, g, o]) x[n, g, i]
            ci, co = c // groups, o // groups
            a = gconj.reshape(n, groups, co, nh, nwf).permute(2, 1, 0, 3, 4).reshape(co, groups * n, nh, nwf)
            b = xs.reshape(n, groups, ci, nh, nwf).transpose(0, 1)
            gws = _mix(a, b, groups).reshape(co, groups, ci, nh, nwf).transpose(0, 1).reshape(o, ci, nh, nwf)
        grid = torch.fft.irfft2(gws, s=(nh, nw))
        gw = grid.roll((kh // 2, kw // 2), (-2, -1))[..., :kh, :kw]
    return gx, gw


def _spectrum_shapes(x, weight):
    nh, nw = fft_grid(x.shape[-2], x.shape[-1], weight.shape[-2], weight.shape[-1])
    return ((x.shape[0], x.shape[1], nw // 2 + 1, nh, 2),
            (weight.shape[0], weight.shape[1], nw // 2 + 1, nh, 2))


def _pack(spec: torch.Tensor) -> torch.Tensor:
    """A spectrum (.., nh, nwf) handed between the ops: a contiguous real (.., nwf, nh, 2) tensor. Column
    frequencies outermost is the layout pocketfft's transform along the rows already produces (no copy on
    CPU); a custom op's outputs need one fixed layout for their fake implementation."""
    return torch.view_as_real(spec.transpose(-1, -2).contiguous())


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(packed).transpose(-1, -2)


@torch.library.custom_op('timm_smpconv::fft_conv2d', mutates_args=())
def _fft_conv2d_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        groups: int,
        wspec: Optional[torch.Tensor],
        out_dtype: torch.dtype,
        keep_spectra: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, input spectrum, kernel spectrum): the spectra (`_pack`ed, float32) only with `keep_spectra`
    (for the backward: measured 10% faster per smpconv_t training step on CPU than transforming again),
    else empty; the kernel spectrum also when it came in as `wspec` (an output may not alias an input)."""
    y, xs, ws = _forward(x, weight, groups, wspec)
    # bias, cast and layout in one pass over the output
    out = torch.empty(y.shape, dtype=out_dtype, device=y.device, memory_format=_output_like(x))
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias.float().reshape(1, -1, 1, 1), out=out)
    if not keep_spectra:
        return out, _empty(x), _empty(x)
    return out, _pack(xs), _pack(ws) if wspec is None else _empty(x)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0, dtype=torch.float32)  # a new one per output: outputs may not alias each other


@_fft_conv2d_op.register_fake
def _(x, weight, bias, groups, wspec, out_dtype, keep_spectra):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    out = x.new_empty(shape, dtype=out_dtype).contiguous(memory_format=_output_like(x))
    if not keep_spectra:
        return out, _empty(x), _empty(x)
    xs_shape, ws_shape = _spectrum_shapes(x, weight)
    return out, x.new_empty(xs_shape, dtype=torch.float32), (
        x.new_empty(ws_shape, dtype=torch.float32) if wspec is None else _empty(x))


@torch.library.custom_op('timm_smpconv::fft_conv2d_backward', mutates_args=())
def _fft_conv2d_backward_op(
        gy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        xs: torch.Tensor,
        ws: torch.Tensor,
        groups: int,
        need_x: bool,
        need_w: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input gradient, kernel gradient) in the dtypes and layouts of x and weight; an empty tensor for one
    that is not needed. xs / ws: the forward's spectra (`_pack`ed), or empty to transform again."""
    gx, gw = _backward(gy, x, weight, _unpack(xs) if xs.numel() else None, _unpack(ws) if ws.numel() else None,
                       groups, need_x, need_w)
    gx = (x.new_empty(0) if gx is None  # cast and layout in one pass
          else torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_output_like(x)).copy_(gx))
    gw = weight.new_empty(0) if gw is None else gw.to(weight.dtype).contiguous()
    return gx, gw


@_fft_conv2d_backward_op.register_fake
def _(gy, x, weight, xs, ws, groups, need_x, need_w):
    gx = x.new_empty(x.shape).contiguous(memory_format=_output_like(x)) if need_x else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    return gx, gw


def bias_grad(gy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of a per-channel bias added to a (N, C, H, W) output, summed in at least float32."""
    return gy.sum((0, 2, 3), dtype=torch.promote_types(gy.dtype, torch.float32)).to(dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, wspec, out_dtype, keep_spectra = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.groups = groups
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_fn(ctx, gy, _gxs, _gws):
    x, weight, xs, ws = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = torch.ops.timm_smpconv.fft_conv2d_backward(gy, x, weight, xs, ws, ctx.groups, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    if need_b:
        gb = bias_grad(gy, ctx.bias_dtype)
    return gx, gw, gb, None, None, None, None


_fft_conv2d_op.register_autograd(_backward_fn, setup_context=_setup_context)


def conv_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d gives for input x here: the autocast dtype under autocast, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fft_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        groups: int = 1,
        wspec: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=groups) through the FFT.

    Computed in float32 (complex64 spectra) and returned in the dtype F.conv2d would give (the autocast
    dtype under autocast) and in the input's memory format. Stride 1, odd kernel dims; depthwise is an
    elementwise product of spectra, other groupings mix channels per frequency. `wspec`: the kernel's
    `kernel_spectrum` on this map's `fft_grid`, when the caller keeps it (fixed weights only: no gradient
    reaches the kernel through it).
    """
    check_conv_args(x, weight, groups, 'fft_conv2d')
    if wspec is not None:
        nh, nw = fft_grid(x.shape[-2], x.shape[-1], weight.shape[-2], weight.shape[-1])
        want = (weight.shape[0], weight.shape[1], nh, nw // 2 + 1, 2)
        if tuple(wspec.shape) != want or wspec.dtype != torch.float32:
            raise ValueError(f'wspec must be a float32 kernel_spectrum of shape {list(want)}, got '
                             f'{list(wspec.shape)} {wspec.dtype}')
    keep = (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and (torch.compiler.is_compiling() or spectra_kept()))
    return torch.ops.timm_smpconv.fft_conv2d(x, weight, bias, groups, wspec, conv_out_dtype(x), keep)[0]


_spectra = threading.local()


def spectra_kept() -> bool:
    """Whether `fft_conv2d` hands its spectra to the backward (the default) or lets the backward transform the
    input and kernel again (inside `keep_spectra(False)`: less memory, the transforms twice)."""
    return getattr(_spectra, 'keep', True)


class keep_spectra:
    """`with keep_spectra(False): ...`: FFT convs in the block keep only their input for the backward, not the
    float32 input and kernel spectra (about 1.7 input maps and a kernel-sized spectrum per conv); the backward
    transforms them again. The outputs and gradients are the same."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.prev = True

    def __enter__(self):
        self.prev = spectra_kept()
        _spectra.keep = self.enabled
        return self

    def __exit__(self, *exc):
        _spectra.keep = self.prev
        return False
