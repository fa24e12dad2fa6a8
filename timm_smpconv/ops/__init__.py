""" Functional convolution ops and their dispatch; no modules here (those are in `timm_smpconv.layers`).

* `dispatch.py`: `large_kernel_conv2d` and `causal_conv1d`, the backend registry, the measured rule, autotune, `set_conv_impl`.
* `fft.py`: the FFT convolution (`timm_smpconv::fft_conv2d` custom op and its backward; `keep_spectra`).
* `dft.py`: depthwise convolution through DFTs as matrix products (the ONNX export's form for large kernels).
* `dwconv.py`: the Triton depthwise convolution (`timm_smpconv::dwconv2d` custom op and its backward);
  `triton_dwconv.py`: its kernels, imported on first use only.
"""
from .dft import dft_conv2d
from .dispatch import (
    ConvBackend,
    causal_conv1d,
    conv_backends,
    conv_impl,
    default_backend,
    default_backend_1d,
    default_export_backend,
    get_conv_impl,
    large_kernel_conv2d,
    register_conv_backend,
    select_causal_backend,
    select_conv_backend,
    set_conv_impl,
)
from .dwconv import triton_available, triton_dwconv2d
from .fft import fft_conv2d, fft_grid, fft_size, keep_spectra, kernel_spectrum
