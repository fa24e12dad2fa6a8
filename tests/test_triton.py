""" The Triton depthwise convolution (forward, input and kernel gradients, custom ops, dispatch).

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter in float64 (exact
comparisons against F.conv2d); with CUDA they run compiled on the GPU. `pytest -k triton` selects these.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from timm_smpconv.ops import conv_impl, large_kernel_conv2d, select_conv_backend, triton_dwconv2d

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton is not installed')


@pytest.fixture
def triton_device():
    """'cuda' where a GPU is present, else 'cpu' with Triton's interpreter (set up by conftest.py)."""
    if torch.cuda.is_available():
        return 'cuda'
    assert os.environ.get('TRITON_INTERPRET') == '1', 'conftest.py sets TRITON_INTERPRET=1 without a GPU'
    return 'cpu'


def _reference(x, w, b):
    return F.conv2d(x, w, b, padding=(w.shape[-2] // 2, w.shape[-1] // 2), groups=x.shape[1])


SHAPES = [
    # (batch, channels, h, w, kh, kw, channels_last)
    (2, 3, 9, 10, 3, 3, False),      # smallest kernel, odd x even map
    (1, 2, 7, 7, 13, 13, True),      # batch 1, kernel larger than the map, channels_last
    (2, 2, 12, 9, 5, 9, False),      # non-square kernel
    (1, 2, 8, 16, 7, 3, True),       # non-square, channels_last, even map
    (1, 2, 20, 18, 31, 31, False),   # the SMPConv-T stage-1 kernel size
    (3, 2, 6, 5, 17, 11, False),     # several images per program, non-square
]


@pytest.mark.parametrize('n,c,h,w,kh,kw,channels_last', SHAPES)
def test_triton_dwconv_forward_and_gradients_match_conv2d(triton_device, n, c, h, w, kh, kw, channels_last):
    g = torch.Generator().manual_seed(kh * 100 + kw)
    dd = dict(dtype=torch.float64)
    x = torch.randn(n, c, h, w, generator=g, **dd).to(triton_device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, kh, kw, generator=g, **dd).to(triton_device)
    b = torch.randn(c, generator=g, **dd).to(triton_device)
    x, wt, b = (t.requires_grad_() for t in (x, wt, b))
    y = triton_dwconv2d(x, wt, b)
    ref = _reference(x, wt, b)
    assert y.shape == ref.shape and y.dtype == torch.float64
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # the input's layout, no copy
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn(ref.shape, generator=g, **dd).to(triton_device)
    got = torch.autograd.grad(y, (x, wt, b), gy)
    want = torch.autograd.grad(ref, (x, wt, b), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    # one gradient alone: the other is not computed
    gx_only = torch.autograd.grad(triton_dwconv2d(x, wt.detach(), None), x, gy)[0]
    gx_ref = torch.autograd.grad(_reference(x, wt.detach(), None), x, gy)[0]
    torch.testing.assert_close(gx_only, gx_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_triton_dwconv_low_precision_accumulates_in_float32(triton_device, dtype, tol):
    if dtype == torch.bfloat16 and triton_device == 'cpu':
        pytest.skip("Triton's interpreter has no bfloat16 (checked on CUDA)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 12, generator=g).to(triton_device)
    wt = torch.randn(3, 1, 9, 9, generator=g).to(triton_device) / 9
    y = triton_dwconv2d(x.to(dtype), wt.to(dtype))
    assert y.dtype == dtype
    ref = _reference(x.to(dtype).double(), wt.to(dtype).double(), None)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    if dtype != torch.float32:  # under autocast input and kernel take the autocast dtype, as F.conv2d's would
        with torch.autocast(triton_device, dtype=dtype):
            assert triton_dwconv2d(x, wt).dtype == dtype


def test_triton_custom_ops_pass_opcheck(triton_device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 9, generator=g, dtype=torch.float64).to(triton_device).requires_grad_()
    wt = torch.randn(3, 1, 5, 7, generator=g, dtype=torch.float64).to(triton_device).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).to(triton_device).requires_grad_()
    torch.library.opcheck(torch.ops.timm_smpconv.dwconv2d.default, (x, wt, b))
    torch.library.opcheck(torch.ops.timm_smpconv.dwconv2d.default, (x.contiguous(memory_format=torch.channels_last),
                                                                    wt, None))
    gy = torch.randn(2, 3, 8, 9, generator=g, dtype=torch.float64).to(triton_device)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.timm_smpconv.dwconv2d_backward.default,
                              (gy, x.detach(), wt.detach(), need_x, need_w))


def test_triton_dispatch_and_bad_input(triton_device):
    x = torch.randn(1, 4, 10, 10, dtype=torch.float64, device=triton_device)
    w = torch.randn(4, 1, 7, 7, dtype=torch.float64, device=triton_device)
    with conv_impl('triton'):
        assert select_conv_backend(x, w, 1, 4) == 'triton'
        torch.testing.assert_close(large_kernel_conv2d(x, w, None, 1, 4), _reference(x, w, None))
        # not depthwise, strided, or even-sized: Triton does not apply, the rule picks another backend
        assert select_conv_backend(x, torch.randn(4, 4, 7, 7, dtype=torch.float64, device=triton_device), 1, 1) != 'triton'
        assert select_conv_backend(x, w, 2, 4) == 'direct'
        assert select_conv_backend(x, torch.randn(4, 1, 6, 6, dtype=torch.float64, device=triton_device), 1, 4) == 'direct'
    with pytest.raises(ValueError, match='odd kernel dims'):
        triton_dwconv2d(x, torch.randn(4, 1, 6, 7, dtype=torch.float64, device=triton_device))
    with pytest.raises(ValueError, match='depthwise'):
        triton_dwconv2d(x, torch.randn(8, 1, 7, 7, dtype=torch.float64, device=triton_device))


def test_triton_backend_refuses_devices_it_cannot_run_on(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('a GPU is present')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(RuntimeError, match='needs Triton and a CUDA device'):
        triton_dwconv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3))
    with pytest.raises(RuntimeError, match="conv impl 'triton' needs"):
        conv_impl('triton').__enter__()


def test_triton_dispatch_leaves_float32_without_tf32_to_other_backends(triton_device):
    """With TF32 off, exact float32 is not sent to the Triton kernels (their full-precision dot spills registers on
    real GPUs: timm_smpconv.triton_aot); half precision still is."""
    x = torch.randn(1, 4, 10, 10, device=triton_device)
    w = torch.randn(4, 1, 7, 7, device=triton_device)
    with conv_impl('triton'):
        assert select_conv_backend(x, w, 1, 4) == 'triton'
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            assert select_conv_backend(x, w, 1, 4) != 'triton'
            assert select_conv_backend(x.half(), w.half(), 1, 4) == 'triton'


def test_tuned_launch_settings_are_used_and_keep_results(triton_device):
    """`set_launch_configs` (what benchmarks/triton_sweep.py finds on a GPU) replaces the rules for its shapes only,
    in every pass, and the results stay exact; malformed settings are refused with the entry named."""
    from timm_smpconv.ops import triton_dwconv as k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 6, 20, generator=g, dtype=torch.float64).to(triton_device).requires_grad_()
    wt = torch.randn(2, 1, 5, 7, generator=g, dtype=torch.float64).to(triton_device).requires_grad_()
    gy = torch.randn(3, 2, 6, 20, generator=g, dtype=torch.float64).to(triton_device)
    tuned = {k.launch_key('forward', x, 5, 7): dict(block_h=4, imgs=4, num_warps=2),
             k.launch_key('input_grad', x, 5, 7): dict(block_h=16, imgs=1),
             k.launch_key('weight_grad', x, 5, 7): dict(block_m=16, programs=4, num_warps=2)}
    assert list(tuned)[0] == 'forward:float64:nchw:2x6x20:5x7'
    prev = k.set_launch_configs(tuned)
    try:
        fwd = k.forward_launch(x, wt, None, torch.empty_like(x))
        assert (fwd.kwargs['BLOCK_H'], fwd.kwargs['IMGS'], fwd.kwargs['num_warps']) == (4, 4, 2)
        assert fwd.grid[0] == 2  # 3 images, 4 per program: one program per channel
        wg = k.weight_grad_launch(gy, x, 5, 7)
        assert (wg.kwargs['BLOCK_M'], wg.kwargs['num_warps'], wg.grid) == (16, 2, (2, 5, 1))
        other = torch.randn(1, 2, 6, 20, dtype=torch.float64).to(triton_device)[:, :, :5]  # another shape: the rules
        assert k.forward_launch(other, wt, None, torch.empty_like(other)).kwargs['BLOCK_H'] == 8
        y = triton_dwconv2d(x, wt, None)
        ref = _reference(x, wt, None)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        for a, e in zip(torch.autograd.grad(y, (x, wt), gy), torch.autograd.grad(ref, (x, wt), gy)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    finally:
        k.set_launch_configs(prev)
    for bad, msg in (({'forward:x': dict(block_h=3)}, 'power of two'), ({'forward:x': dict(block_m=16)}, 'unknown'),
                     ({'sideways:x': {}}, 'bad entry')):
        with pytest.raises(ValueError, match=msg):
            k.set_launch_configs(bad)
