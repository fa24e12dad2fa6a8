""" Triton kernels for the depthwise 'same' convolution (stride 1, odd kh x kw), forward and both gradients.

Imported only when the Triton backend runs (see `dwconv.py`), so CPU-only installs never import Triton.
Under `TRITON_INTERPRET=1` (set before this module is imported) the kernels run on CPU tensors through
Triton's interpreter, which is how the tests check them on machines without a GPU.

Forward, as tensor-core matmuls: for kernel row i, a tile of output rows y[r, w0:w0 + BW] is
X_i @ T_i, with X_i the input rows r + i - kh // 2 over the column window [w0 - kw // 2, w0 - kw // 2 + WIN)
and T_i the WIN x BW Toeplitz matrix of that kernel row (T_i[a, b] = k[i, a - b] for 0 <= a - b < kw).
Several images share a program (and so the channel's Toeplitz tiles) when the map has few rows. The work
is WIN / kw times the direct conv's (about 2x for 13 <= k <= 63), in exchange for tensor cores.

Input gradient: the same kernel on the output gradient with the kernel rotated by 180 degrees (for odd
kernels and symmetric padding that is exactly the transposed convolution).

Kernel gradient, per (channel, kernel row i, slice of the N * H rows): P = G^T @ X_i summed over rows and
column tiles gives P[b, a] = sum gy[., w0 + b] x[., w0 - kw // 2 + a]; tap j is the diagonal sum over
a - b = j (independent of w0, so the diagonals are read once, at the end). Each program writes its P tile;
the slices' tiles are added in float32 and the diagonals summed afterwards in PyTorch (deterministic, no
atomics; reducing the diagonals in the kernel, one block-wide sum per tap, made ptxas spill).

Inputs may be NCHW or channels_last (any strides: no layout copies); accumulation is float32 (float64 for
float64 inputs); outputs take the input's dtype.
"""
import json
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = ['KernelLaunch', 'LAUNCH_SETTINGS', 'dwconv2d_forward', 'dwconv2d_input_grad', 'dwconv2d_weight_grad',
           'forward_launch', 'launch_key', 'set_launch_configs', 'weight_grad_launch']


# Shapes (and, in the kernel gradient, the kernel size) and the bias flag are runtime arguments and not specialized
# (no ==1 / divisible-by-16 variants): they enter index math, masks and loop bounds only, so one compiled kernel serves
# every batch and map size of a tile, dtype and layout, with or without bias. The strides are specialized as Triton
# does (they set the vectorization). The forward keeps kh and kw as constexprs: as runtime values they cost up to
# 50% more registers on sm_90. `timm_smpconv.triton_aot` compiles every variant the models need for sm_80 / sm_90 /
# sm_100 and checks registers, spills, shared memory and tensor-core instructions.
_SHAPE_ARGS = ['N', 'C', 'H', 'W']


@triton.jit(do_not_specialize=_SHAPE_ARGS + ['HAS_BIAS'])
def _dw_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        N, C, H, W, HAS_BIAS,
        sxn, sxc, sxh, sxw,
        syn, syc, syh, syw,
        KH: tl.constexpr, KW: tl.constexpr,
        IMGS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, WIN: tl.constexpr,
        ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    c = pid_nc % C
    m = tl.arange(0, IMGS * BLOCK_H)
    n = (pid_nc // C) * IMGS + m // BLOCK_H
    oh = tl.program_id(1) * BLOCK_H + m % BLOCK_H
    w0 = tl.program_id(2) * BLOCK_W
    ow = w0 + tl.arange(0, BLOCK_W)
    a = tl.arange(0, WIN)
    iw = w0 - KW // 2 + a
    tap = a[:, None] - tl.arange(0, BLOCK_W)[None, :]
    tap_ok = (tap >= 0) & (tap < KW)
    col_ok = (iw >= 0) & (iw < W)
    img_ok = n < N
    x_rows = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    acc = tl.zeros((IMGS * BLOCK_H, BLOCK_W), dtype=ACC)
    for i in range(KH):
        ih = oh + i - KH // 2
        row_ok = img_ok & (ih >= 0) & (ih < H)
        xt = tl.load(x_rows[:, None] + ih[:, None] * sxh + iw[None, :] * sxw,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.)
        t = tl.load(w_ptr + (c * KH + i) * KW + tap, mask=tap_ok, other=0.)
        acc += tl.dot(xt, t.to(xt.dtype), input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS != 0:
        acc += tl.load(b_ptr + c).to(ACC)
    out_ok = (img_ok & (oh < H))[:, None] & (ow < W)[None, :]
    y = y_ptr + (n.to(tl.int64) * syn + c.to(tl.int64) * syc)[:, None] + oh[:, None] * syh + ow[None, :] * syw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=_SHAPE_ARGS + ['KH', 'KW', 'ROWS_PER_SPLIT'])
def _dw_wgrad_kernel(
        x_ptr, g_ptr, out_ptr,
        N, C, H, W, KH, KW, ROWS_PER_SPLIT,
        sxn, sxc, sxh, sxw,
        sgn, sgc, sgh, sgw,
        BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, WIN: tl.constexpr,
        ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    c = tl.program_id(0)
    i = tl.program_id(1)
    s = tl.program_id(2)
    r_start = s * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, N * H)
    b = tl.arange(0, BLOCK_W)
    a = tl.arange(0, WIN)
    acc = tl.zeros((BLOCK_W, WIN), dtype=ACC)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < r_end
        n = (rows // H).to(tl.int64)
        h = rows % H
        ih = h + i - KH // 2
        x_ok = rows_ok & (ih >= 0) & (ih < H)
        g_rows = g_ptr + n * sgn + c.to(tl.int64) * sgc + h * sgh
        x_rows = x_ptr + n * sxn + c.to(tl.int64) * sxc + ih * sxh
        for w0 in range(0, W, BLOCK_W):
            ow = w0 + b
            iw = w0 - KW // 2 + a
            g = tl.load(g_rows[:, None] + ow[None, :] * sgw, mask=rows_ok[:, None] & (ow < W)[None, :], other=0.)
            xt = tl.load(x_rows[:, None] + iw[None, :] * sxw,
                         mask=x_ok[:, None] & ((iw >= 0) & (iw < W))[None, :], other=0.)
            acc += tl.dot(tl.trans(g), xt.to(g.dtype), input_precision=PRECISION, out_dtype=ACC)
    # the whole product tile goes out; its diagonals (the taps) are summed afterwards (`dwconv2d_weight_grad`)
    out = out_ptr + ((s * C + c) * KH + i).to(tl.int64) * (BLOCK_W * WIN)
    tl.store(out + b[:, None] * WIN + a[None, :], acc)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _col_tiles(kw: int):
    """(BLOCK_W, WIN): the smallest window (>= 16 + kw - 1, a power of two) and the widest power-of-two
    output tile (>= 16, as tl.dot needs) it serves; work per output is WIN / kw of the direct conv's."""
    win = _next_pow2(16 + kw - 1)
    bw = 16
    while 2 * bw <= win - kw + 1:
        bw *= 2
    return bw, win


def _launch_options(block_w: int, win: int, arch: Optional[int]) -> Dict[str, int]:
    """num_warps: 8 for the widest tiles (the WIN x BLOCK_W Toeplitz tile of the forward, the BLOCK_W x WIN
    product of the kernel gradient: 8192 elements, from 51 x 51 kernels on), which with 4 need more than 255
    registers per thread and spill (sm_80 / sm_90 / sm_100); 4 otherwise. On sm_100 and later also maxnreg 255:
    without a register bound the CUDA 13 ptxas caps registers itself (at 48-80 for some of these kernels) and
    spills to do so; on sm_80 / sm_90 the bound is left out (there it made ptxas use more registers, up to
    159 instead of 96, for no spill saved). Both found by `timm_smpconv.triton_aot`."""
    options = dict(num_warps=8 if block_w * win >= 8192 else 4)
    if arch is not None and arch >= 100:
        options['maxnreg'] = 255
    return options


# Launch settings per pass and conv shape, found by timing on a GPU (`python benchmarks/triton_sweep.py` writes them as
# JSON); a shape without an entry gets the rules below. Keys: `launch_key`; values: a dict of the pass's settings
# (forward and input grad: block_h, imgs, num_warps, num_stages; kernel grad: block_m, programs, num_warps,
# num_stages). Set with `set_launch_configs(path or dict)` or the TIMM_SMPCONV_TRITON_CONFIGS environment variable
# (a JSON file, read when this module is first imported).
LAUNCH_SETTINGS = {
    'forward': ('block_h', 'imgs', 'num_warps', 'num_stages'),
    'input_grad': ('block_h', 'imgs', 'num_warps', 'num_stages'),
    'weight_grad': ('block_m', 'programs', 'num_warps', 'num_stages'),
}
_CONFIGS: Dict[str, Dict[str, int]] = {}


def launch_key(pass_name: str, x: torch.Tensor, kh: int, kw: int) -> str:
    """'pass:dtype:layout:CxHxW:khxkw', e.g. 'forward:bfloat16:channels_last:96x56x56:31x31' (the batch is not part
    of the key: settings are tuned at one batch and serve every batch)."""
    layout = 'channels_last' if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 else 'nchw'
    return f'{pass_name}:{str(x.dtype).replace("torch.", "")}:{layout}:{"x".join(map(str, x.shape[1:]))}:{kh}x{kw}'


def _check_setting(key: str, name: str, value) -> int:
    pow2 = name in ('block_h', 'imgs', 'block_m')
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (pow2 and value & (value - 1)):
        raise ValueError(f'Triton launch setting {key} {name}={value!r}: must be a positive int'
                         + (' and a power of two' if pow2 else ''))
    return value


def set_launch_configs(configs: Union[None, str, os.PathLike, Dict[str, Dict[str, int]]]) -> Dict[str, Dict[str, int]]:
    """Use these launch settings (a dict as `LAUNCH_SETTINGS` describes, or the path of a JSON file holding one);
    None clears them. Returns the previous settings. Unknown passes or settings raise ValueError."""
    global _CONFIGS
    if configs is not None and not isinstance(configs, dict):
        with open(configs) as f:
            configs = json.load(f)
    checked = {}
    for key, settings in (configs or {}).items():
        pass_name = key.split(':', 1)[0]
        if pass_name not in LAUNCH_SETTINGS or not isinstance(settings, dict):
            raise ValueError(f'Triton launch settings: bad entry {key!r}: keys are launch_key() strings of the passes '
                             f'{sorted(LAUNCH_SETTINGS)}, values dicts of settings')
        unknown = set(settings) - set(LAUNCH_SETTINGS[pass_name])
        if unknown:
            raise ValueError(f'Triton launch settings {key}: unknown {sorted(unknown)} (a {pass_name} launch takes '
                             f'{", ".join(LAUNCH_SETTINGS[pass_name])})')
        checked[key] = {k: _check_setting(key, k, v) for k, v in settings.items()}
    prev, _CONFIGS = _CONFIGS, checked
    return prev


if os.environ.get('TIMM_SMPCONV_TRITON_CONFIGS'):
    set_launch_configs(os.environ['TIMM_SMPCONV_TRITON_CONFIGS'])


def _settings(pass_name: str, x: torch.Tensor, kh: int, kw: int, config: Optional[Dict[str, int]]) -> Dict[str, int]:
    return dict(config) if config is not None else _CONFIGS.get(launch_key(pass_name, x, kh, kw), {})


def _with_options(options: Dict[str, int], cfg: Dict[str, int]) -> Dict[str, int]:
    options.update({k: cfg[k] for k in ('num_warps', 'num_stages') if k in cfg})
    return options


def _arch(x: torch.Tensor, arch: Optional[int]) -> Optional[int]:
    """The compute capability the launch is for: given (ahead-of-time compiles), else x's CUDA device's."""
    if arch is None and x.device.type == 'cuda':
        major, minor = torch.cuda.get_device_capability(x.device)
        arch = 10 * major + minor
    return arch


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 follows PyTorch's convolution setting (cuDNN uses TF32 unless
    torch.backends.cudnn.allow_tf32 is off); the dispatch sends float32 here only with TF32 on (`triton_supports`)."""
    return 'tf32' if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else 'ieee'


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class KernelLaunch(NamedTuple):
    """One kernel launch, as the wrappers below decide it: `kernel[grid](*args, **kwargs)` (kwargs: the
    constexprs and launch options). The ahead-of-time compile check (`triton_aot.py`) builds these on meta
    tensors and compiles exactly what a GPU run would."""
    kernel: Any
    grid: Tuple[int, int, int]
    args: tuple
    kwargs: Dict[str, Any]

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.kwargs)


def forward_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
                   arch: Optional[int] = None, pass_name: str = 'forward',
                   config: Optional[Dict[str, int]] = None) -> KernelLaunch:
    """The launch of `dwconv2d_forward` for input x, contiguous weight (C, 1, kh, kw), bias and output y, on
    x's device or (`arch`, e.g. 90) for that compute capability. Settings: `config`, else the tuned ones for
    (`pass_name`, x, kernel) if any (`set_launch_configs`), else the rules: rows of the map per program up to 32,
    images per program filling 32 rows, `_launch_options`."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2], weight.shape[-1]
    cfg = _settings(pass_name, x, kh, kw, config)
    block_w, win = _col_tiles(kw)
    block_h = cfg.get('block_h', min(_next_pow2(h), 32))
    imgs = cfg.get('imgs', max(1, 32 // block_h))
    if imgs * block_h < 16:
        raise ValueError(f'Triton forward launch: imgs * block_h must be at least 16 (tl.dot), got {imgs} * {block_h}')
    grid = (triton.cdiv(n, imgs) * c, triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    return KernelLaunch(_dw_fwd_kernel, grid, (
        x, weight, bias if bias is not None else weight, y,
        n, c, h, w, int(bias is not None), *x.stride(), *y.stride()), dict(
        KH=kh, KW=kw, IMGS=imgs, BLOCK_H=block_h, BLOCK_W=block_w, WIN=win,
        ACC=_acc(x.dtype), PRECISION=_precision(x.dtype),
        **_with_options(_launch_options(block_w, win, _arch(x, arch)), cfg)))


def dwconv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias=None, out=None, pass_name: str = 'forward') -> torch.Tensor:
    """y = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C), written to `out` (any strides)
    or to a new tensor in x's dtype and layout. weight (C, 1, kh, kw) and x share a dtype; bias (C,) or None."""
    y = torch.empty_like(x) if out is None else out
    forward_launch(x, weight.contiguous(), bias, y, pass_name=pass_name)()
    return y


def dwconv2d_input_grad(gy: torch.Tensor, weight: torch.Tensor, out=None) -> torch.Tensor:
    """The input gradient of `dwconv2d_forward`: the forward on gy with the kernel rotated 180 degrees."""
    return dwconv2d_forward(gy, weight.flip(-2, -1), out=out, pass_name='input_grad')


def weight_grad_launch(gy: torch.Tensor, x: torch.Tensor, kh: int, kw: int, arch: Optional[int] = None,
                       config: Optional[Dict[str, int]] = None) -> KernelLaunch:
    """The launch of `dwconv2d_weight_grad`; its output, the per-slice product tiles (splits, C, kh, BLOCK_W, WIN)
    in float32, is args[2] (allocated here, on x's device). Settings as `forward_launch`'s; the rules: row
    blocks of 32, about 2048 programs."""
    n, c, h, w = x.shape
    cfg = _settings('weight_grad', x, kh, kw, config)
    block_w, win = _col_tiles(kw)
    block_m = cfg.get('block_m', 32)
    if block_m < 16:
        raise ValueError(f'Triton kernel-grad launch: block_m must be at least 16 (tl.dot), got {block_m}')
    rows = n * h
    # enough programs to fill a large GPU (about 2048) without splitting below one row block each
    splits = max(1, min(triton.cdiv(rows, block_m), triton.cdiv(cfg.get('programs', 2048), c * kh)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_split)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(splits, c, kh, block_w, win, device=x.device, dtype=acc_dtype)
    return KernelLaunch(_dw_wgrad_kernel, (c, kh, splits), (
        x, gy, partial, n, c, h, w, kh, kw, rows_per_split, *x.stride(), *gy.stride()), dict(
        BLOCK_M=block_m, BLOCK_W=block_w, WIN=win, ACC=_acc(x.dtype), PRECISION=_precision(x.dtype),
        **_with_options(_launch_options(block_w, win, _arch(x, arch)), cfg)))


def dwconv2d_weight_grad(gy: torch.Tensor, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The kernel gradient (C, 1, kh, kw) of `dwconv2d_forward`, in float32 (the caller casts)."""
    launch = weight_grad_launch(gy, x, kh, kw)
    launch()
    partial = launch.args[2]
    # (C, kh, BLOCK_W, WIN): P[b, a] = sum gy[., w0 + b] x[., w0 - kw // 2 + a]
    p = partial[0] if partial.shape[0] == 1 else partial.sum(0)
    c, _, block_w, win = p.shape
    # tap j of row i is the diagonal a - b = j of P: elements j + b (WIN + 1), b < BLOCK_W
    taps = p.as_strided((c, kh, kw, block_w), (kh * block_w * win, block_w * win, 1, win + 1))
    return taps.sum(-1).unsqueeze(1)
