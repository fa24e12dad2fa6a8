""" One entry point for the package's 'same' convolutions, `large_kernel_conv2d`, and the backends behind it.

`large_kernel_conv2d(x, weight, bias, stride, groups)` is F.conv2d with symmetric padding
(kh // 2, kw // 2) (not TensorFlow's SAME, which pads asymmetrically for even sizes and strides); which
backend computes it is chosen per call:

* a setting (`set_conv_impl` / `conv_impl`): 'auto' (the measured rule, `default_backend`), a backend name
  ('direct', 'fft', 'triton') or 'autotune' (time every backend that supports the shape once per shape
  and keep the fastest for the process);
* a backend applies only where it `supports` the conv (e.g. Triton: depthwise, stride 1, CUDA); the
  others fall back to the rule;
* TorchScript and jit tracing (fvcore's FLOP counting) always convolve directly, so their graphs hold a real
  convolution; the ONNX export does too, except for large depthwise kernels, which it writes as DFTs in
  matrix products where onnxruntime runs them faster (`default_export_backend`; `conv_impl('direct')` keeps
  every convolution a Conv node).

Backends live in a registry (`register_conv_backend`); the FFT and Triton ones are `torch.library` custom
ops, so torch.compile and torch.export see one node per convolution; 'dft' is plain torch ops on purpose (the
ONNX export writes them as matrix products).
"""
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .dft import dft_conv2d, dft_macs_per_output, dft_supports
from .dwconv import triton_available, triton_dwconv2d, triton_supports
from .fft import fft_conv2d, fft_grid, is_channels_last, kernel_spectrum

__all__ = [
    'ConvBackend', 'causal_conv1d', 'conv_backends', 'conv_impl', 'default_backend', 'default_backend_1d',
    'default_export_backend', 'direct_macs_per_output', 'get_conv_impl', 'large_kernel_conv2d',
    'register_conv_backend', 'select_causal_backend', 'select_conv_backend', 'set_conv_impl',
]


@dataclass(frozen=True)
class ConvBackend:
    """A way to compute the 'same' conv: `supports(x, weight, stride, groups)` says whether it can,
    `run(x, weight, bias, stride, groups, cache)` computes it (`cache`: a dict the calling module owns for
    state derived from fixed weights, or None)."""
    name: str
    supports: Callable[[torch.Tensor, torch.Tensor, int, int], bool]
    run: Callable[..., torch.Tensor]


_BACKENDS: Dict[str, ConvBackend] = {}
_MODES = ('auto', 'autotune')
_impl = 'auto'
_tuned: Dict[tuple, str] = {}  # autotune's choice per call signature (shapes, dtype, layout, gradient)


def register_conv_backend(backend: ConvBackend):
    """Add (or replace) a backend; `set_conv_impl(backend.name)` then selects it."""
    _BACKENDS[backend.name] = backend


def conv_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def _direct(x, weight, bias, stride: int, groups: int, cache=None):
    return F.conv2d(x, weight, bias, stride, (weight.shape[-2] // 2, weight.shape[-1] // 2), 1, groups)


def _fft(x, weight, bias, stride: int, groups: int, cache=None):
    wspec = None
    if (cache is not None and not (torch.is_grad_enabled() and weight.requires_grad)
            and not torch.compiler.is_compiling()):
        # the kernel spectrum of fixed weights (eval, reparameterized convs) is kept by the calling module for
        # this very tensor (a weak reference: a new tensor at a freed one's address is not mistaken for it),
        # unmodified since (its version counter, bumped by in-place updates) and on the same grid
        grid = fft_grid(x.shape[-2], x.shape[-1], weight.shape[-2], weight.shape[-1])
        try:
            key = (weight._version, weight.dtype, weight.device, grid)
        except RuntimeError:  # inference tensors have no version counter: no caching
            key = None
        if key is not None:
            entry = cache.get('fft_spectrum')
            if entry is None or entry[0]() is not weight or entry[1] != key:
                with torch.no_grad():
                    entry = (weakref.ref(weight), key, kernel_spectrum(weight, *grid))
                cache['fft_spectrum'] = entry
            wspec = entry[2]
    return fft_conv2d(x, weight, bias, groups, wspec)


def _fft_supports(x, weight, stride: int, groups: int) -> bool:
    return stride == 1 and weight.shape[-2] % 2 == 1 and weight.shape[-1] % 2 == 1


def _triton(x, weight, bias, stride: int, groups: int, cache=None):
    return triton_dwconv2d(x, weight, bias)


def _dft(x, weight, bias, stride: int, groups: int, cache=None):
    return dft_conv2d(x, weight, bias)


register_conv_backend(ConvBackend('direct', lambda x, w, s, g: True, _direct))
register_conv_backend(ConvBackend('fft', _fft_supports, _fft))
register_conv_backend(ConvBackend('triton', triton_supports, _triton))
register_conv_backend(ConvBackend('dft', dft_supports, _dft))


def get_conv_impl() -> str:
    return _impl


def set_conv_impl(impl: str) -> str:
    """Choose how `large_kernel_conv2d` convolves: 'auto' (the measured rule), 'autotune', or a backend
    name ('direct', 'fft', 'triton', 'dft'). Returns the previous setting. Context-manager form: `conv_impl`."""
    global _impl
    if impl not in _MODES + conv_backends():
        raise ValueError(f'conv impl must be one of {_MODES + conv_backends()}, got {impl!r}')
    if impl == 'triton' and not (triton_available('cuda') or triton_available('cpu')):
        raise RuntimeError("conv impl 'triton' needs the triton package and a CUDA device")
    prev, _impl = _impl, impl
    return prev


class conv_impl:
    """`with conv_impl('fft'): ...` sets the convolution backend for the block (see `set_conv_impl`)."""

    def __init__(self, impl: str):
        self.impl = impl
        self.prev = None

    def __enter__(self):
        self.prev = set_conv_impl(self.impl)
        return self

    def __exit__(self, *exc):
        set_conv_impl(self.prev)
        return False


def default_backend(
        device_type: str,
        depthwise: bool,
        kernel_size: Tuple[int, int],
        map_size: Tuple[int, int],
        channels_last: bool,
        grad: bool,
) -> str:
    """The 'auto' rule for a stride-1 conv with odd kernel dims, from measurements.

    CPU (2-core x86, torch 2.14, batch 1 and 8; `python benchmarks/conv_paths.py` ->
    benchmarks/results/conv_paths.md):

    * depthwise, no gradient: PyTorch's NCHW direct kernel is fast up to 13 x 13 and falls off a cliff above
      (15 x 15 is 7-40x slower than 13 x 13): FFT for k > 13. Its channels_last kernel has no cliff (27 x 27
      on 14 x 14 maps: 2.9 ms direct, 8.0 ms FFT): FFT only from 31 x 31.
    * depthwise, with gradient: the direct backward is slow for large kernels: FFT from 9 x 9; NCHW also
      from 5 x 5 on maps of 50 x 50 and more (channels_last 5 x 5 stays direct: 16 ms against 29 ms).
    * full or grouped convs: FFT from 7 x 7.

    CUDA (H100, torch 2.11+cu130, cuDNN 9.19, bf16, batch 64, depthwise forward + backward, ms NCHW /
    channels_last; measured for the GPU issue, docs/performance.md):

    * 31 x 31 on 96 x 56 x 56: direct 41.2 / 65.6, FFT 2.88 / 3.12; 29 x 29 on 192 x 28 x 28: 18.5 / 26.5
      against 2.00 / 2.11; 27 x 27 on 384 x 14 x 14: 8.9 / 11.0 against 1.78 / 1.90; 13 x 13 on 768 x 7 x 7:
      2.06 / 1.68 against 1.88 / 1.47; 5 x 5 on 96 x 56 x 56: 1.47 / 0.58 against 2.81 / 2.55.
    * so depthwise from 13 x 13 (the smallest size measured faster) goes through the FFT; smaller and
      full convs stay with cuDNN. The Triton backend is not in the rule until it is measured on a GPU:
      select it with set_conv_impl('triton') or let 'autotune' time it.

    Other devices: direct.
    """
    kh, kw = kernel_size
    k = min(kh, kw)
    if device_type == 'cuda':
        return 'fft' if depthwise and k >= 13 else 'direct'
    if device_type != 'cpu':
        return 'direct'
    if not depthwise:
        return 'fft' if kh * kw >= 49 else 'direct'
    if not grad:
        return 'fft' if (k >= 31 if channels_last else k > 13) else 'direct'
    if channels_last:
        return 'fft' if k >= 9 else 'direct'
    return 'fft' if k >= 9 or (k >= 5 and map_size[0] * map_size[1] >= 2500) else 'direct'


def _signature(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int, grad: bool) -> tuple:
    return (x.device.type, x.dtype, tuple(x.shape), tuple(weight.shape), stride, groups, is_channels_last(x),
            grad, torch.is_autocast_enabled(x.device.type))


def _time_backend(backend: ConvBackend, x, weight, stride: int, groups: int, grad: bool, reps: int = 5) -> float:
    """Median seconds of one call (forward, plus backward when `grad`) on random data of the same shape."""
    xs = torch.randn_like(x).requires_grad_(grad and x.requires_grad)
    ws = torch.randn_like(weight).requires_grad_(grad and weight.requires_grad)
    cuda = x.device.type == 'cuda'

    def step():
        y = backend.run(xs, ws, None, stride, groups, None)
        if grad:
            y.backward(torch.ones_like(y))

    times = []
    for i in range(reps + 1):
        if cuda:
            torch.cuda.synchronize(x.device)
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(x.device)
        if i:  # the first call warms up (Triton compiles, cuFFT plans)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def direct_macs_per_output(h: int, w: int, kh: int, kw: int) -> float:
    """Multiply-adds per output of a direct 'same' conv that meet the map (taps over the zero padding need none):
    per axis, the mean number of the kernel's taps inside the map."""
    def axis(n: int, k: int) -> float:
        r = k // 2
        return sum(min(n - 1, i + r) - max(0, i - r) + 1 for i in range(n)) / n
    return axis(h, kh) * axis(w, kw)


def default_export_backend(depthwise: bool, kernel_size: Tuple[int, int], map_size: Tuple[int, int]) -> str:
    """The 'auto' rule under ONNX export: 'dft' (`timm_smpconv.ops.dft`, matrix products) for a depthwise conv
    whose direct taps inside the map outnumber the DFT products' multiply-adds, else 'direct' (a Conv node).

    onnxruntime 1.32, CPU, batch 1 (`python benchmarks/deploy.py`, its table of large depthwise convs): its
    direct depthwise kernel is several times slower per multiply-add than its matrix products (31 x 31 on
    96 x 56 x 56: 18 ms against 8 ms; 29 x 29 on 192 x 28 x 28: 9.5 ms against 2.0 ms, one thread), and its
    own DFT node (naive for lengths that are not powers of two) far slower than both. Where a kernel is larger
    than the map, most taps fall on padding, which the direct kernel skips: 47 x 47 on 14 x 14 stays direct."""
    if not depthwise:
        return 'direct'
    (kh, kw), (h, w) = kernel_size, map_size
    return 'dft' if direct_macs_per_output(h, w, kh, kw) >= dft_macs_per_output(h, w, kh, kw) else 'direct'


def select_conv_backend(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1) -> str:
    """The backend `large_kernel_conv2d` uses for these arguments under the current setting."""
    if stride != 1 or torch.jit.is_tracing():
        return 'direct'
    if torch.onnx.is_in_onnx_export():
        if _impl in ('direct', 'dft') and _BACKENDS[_impl].supports(x, weight, stride, groups):
            return _impl
        depthwise = weight.shape[1] == 1 and groups == x.shape[1]
        odd = weight.shape[-2] % 2 == 1 and weight.shape[-1] % 2 == 1
        return default_export_backend(depthwise and odd, tuple(weight.shape[-2:]), tuple(x.shape[-2:]))
    kh, kw = weight.shape[-2], weight.shape[-1]
    if kh % 2 == 0 or kw % 2 == 0:
        return 'direct'
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if _impl in _BACKENDS and _BACKENDS[_impl].supports(x, weight, stride, groups):
        return _impl
    if _impl == 'autotune':
        key = _signature(x, weight, stride, groups, grad)
        choice = _tuned.get(key)
        if choice is None and not torch.compiler.is_compiling():
            with torch.enable_grad() if grad else torch.no_grad():
                timings = {name: _time_backend(b, x, weight, stride, groups, grad)
                           for name, b in _BACKENDS.items() if b.supports(x, weight, stride, groups)}
            choice = _tuned[key] = min(timings, key=timings.get)
        if choice is not None:
            return choice
    depthwise = weight.shape[1] == 1 and groups == x.shape[1]
    return default_backend(
        x.device.type, depthwise, (kh, kw), (x.shape[-2], x.shape[-1]), is_channels_last(x), grad)


def large_kernel_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: int = 1,
        groups: int = 1,
        cache: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding=(kh // 2, kw // 2), groups=groups) by the backend
    `select_conv_backend` picks; every backend gives the same result (to float32 rounding).

    `cache`: a dict owned by the calling module where a backend may keep state derived from fixed
    weights (the FFT kernel spectrum in eval); it is never used while compiling or for a weight that
    requires grad. (Typed so that TorchScript can compile this function: an fx graph of a model, where
    it is a leaf call, is scriptable; scripted, it convolves directly.)
    """
    if torch.jit.is_scripting():
        return F.conv2d(x, weight, bias, stride, (weight.shape[-2] // 2, weight.shape[-1] // 2), 1, groups)
    return _BACKENDS[select_conv_backend(x, weight, stride, groups)].run(x, weight, bias, stride, groups, cache)



# causal 1-D convolutions: direct below this kernel length, FFT from it (see default_backend_1d)
CAUSAL_FFT_MIN_KERNEL = 48


def default_backend_1d(device_type: str, kernel_size: int, length: int) -> str:
    """The 'auto' rule for a causal 1-D conv (stride 1): the FFT from `CAUSAL_FFT_MIN_KERNEL` taps, direct below.

    Measured on CPU (2 cores, batch 32, 30 -> 30 channels, kernel = sequence length; `python
    benchmarks/conv1d_paths.py` -> benchmarks/results/conv1d_paths.md): forward + backward, direct / FFT,
    2.24 / 2.52 ms at 32 taps, 4.34 / 3.55 at 48, 25.7 / 6.2 at 128, 1117 / 55 at 784; 5-tap kernels stay
    direct at every length. CUDA is not measured yet and follows the same rule. A kernel longer than the
    sequence is cut to it first (older taps see only padding), so the sequence bounds the kernel that counts."""
    if device_type not in ('cpu', 'cuda'):
        return 'direct'
    return 'fft' if min(kernel_size, length) >= CAUSAL_FFT_MIN_KERNEL else 'direct'


def select_causal_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend `causal_conv1d` uses for these arguments under the current setting."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return 'direct'
    if _impl in ('direct', 'fft'):
        return _impl
    return default_backend_1d(x.device.type, weight.shape[-1], x.shape[-1])


def causal_conv1d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        groups: int = 1,
) -> torch.Tensor:
    """F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, groups=groups): output step t sees inputs up to t; kernel
    tap k - 1 multiplies the current step. Directly or through the FFT (`select_causal_backend`), the same
    result either way.

    The FFT path is the 2-D FFT custom op on a single row: a causal correlation is a centred one with the
    kernel followed by k - 1 zero (future) taps, whose centre is then tap k - 1; the FFT grid is the
    linear-convolution length L + k - 1 rounded up to a fast size.
    """
    k = weight.shape[-1]
    if torch.jit.is_scripting():
        return F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, 1, 0, 1, groups)
    if k > x.shape[-1] > 0:  # taps older than the sequence only ever see the left padding
        weight = weight[..., k - x.shape[-1]:]
        k = x.shape[-1]
    if select_causal_backend(x, weight) == 'fft':
        w2 = F.pad(weight, (0, k - 1)).unsqueeze(2)
        return fft_conv2d(x.unsqueeze(2), w2, bias, groups).squeeze(2)
    return F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, 1, 0, 1, groups)
