""" Depthwise convolution through DFTs as matrix products (timm_smpconv.ops.dft) and the ONNX export's rule. """
import pytest
import torch
import torch.nn.functional as F

from timm_smpconv.layers import LargeKernelConv2d
from timm_smpconv.ops import conv_impl, default_export_backend, dft_conv2d
from timm_smpconv.ops.dispatch import direct_macs_per_output


@pytest.mark.parametrize('n,c,h,w,kh,kw', [
    (1, 6, 56, 56, 31, 31), (2, 4, 7, 9, 13, 5), (1, 3, 1, 10, 1, 7), (3, 5, 6, 6, 3, 3), (1, 2, 4, 4, 9, 9),
])
def test_dft_equals_direct_values_and_gradients(n, c, h, w, kh, kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g).requires_grad_()
    wt = torch.randn(c, 1, kh, kw, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, generator=g).requires_grad_()
    ref = F.conv2d(x, wt, b, 1, (kh // 2, kw // 2), 1, c)
    out = dft_conv2d(x, wt, b)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, wt, b), gy)
    got = torch.autograd.grad(out, (x, wt, b), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_dft_dtypes_and_memory_format():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 15, 15)
    ref = F.conv2d(x, w, None, 1, 7, 1, 8)
    out = dft_conv2d(x, w)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert dft_conv2d(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match='depthwise'):
        dft_conv2d(torch.randn(1, 4, 8, 8), torch.randn(8, 1, 3, 3))
    with pytest.raises(ValueError, match='odd kernel'):
        dft_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4))


def test_export_rule_follows_the_multiply_adds():
    """The rule as measured in onnxruntime (benchmarks/results/deploy.md): smpconv_t's 31 x 31 and 29 x 29
    kernels go through the DFT products; 27 x 27 on 14 x 14 maps (most taps on the padding), 13 x 13, small and
    full convs stay Conv nodes."""
    assert direct_macs_per_output(14, 14, 47, 47) == 14 * 14  # every output sees the whole map
    assert direct_macs_per_output(56, 56, 1, 1) == 1
    pick = default_export_backend
    assert pick(True, (31, 31), (56, 56)) == 'dft' and pick(True, (29, 29), (28, 28)) == 'dft'
    assert pick(True, (51, 51), (56, 56)) == 'dft' and pick(True, (49, 49), (28, 28)) == 'dft'
    assert pick(True, (27, 27), (14, 14)) == 'direct' and pick(True, (47, 47), (14, 14)) == 'direct'
    assert pick(True, (13, 13), (7, 7)) == 'direct' and pick(True, (5, 5), (56, 56)) == 'direct'
    assert pick(False, (33, 33), (32, 32)) == 'direct'


def test_onnx_export_writes_large_depthwise_convs_as_matrix_products(tmp_path):
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    conv = LargeKernelConv2d(8, 8, 31, groups=8).eval()
    x = torch.randn(1, 8, 56, 56)
    with torch.no_grad():
        ref = conv(x)
    for impl, want in (('auto', 'MatMul'), ('direct', 'Conv')):
        path = str(tmp_path / f'{impl}.onnx')
        with torch.no_grad(), conv_impl(impl):
            torch.onnx.export(conv, (x,), path, dynamo=True, external_data=False)
        ops = {node.op_type for node in onnx.load(path).graph.node}
        assert want in ops and not ops & {'DFT', 'STFT'}, ops
        assert ('Conv' in ops) == (impl == 'direct')
        sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5, impl
