""" torch.compile (fullgraph, Inductor on CPU), torch.export, ONNX export and the custom ops' opcheck. """
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import LargeKernelConv2d, SMPLargeKernel2d, randomize_bn_stats_
from timm_smpconv.ops import conv_impl, fft_grid, kernel_spectrum


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# every block type of each family, one block per stage: compile time grows with the graph, not with what it tests
SMALL_MOBILE31 = dict(layers=(1, 1, 1, 1), channels=(16, 32, 48, 64))


def _check_compiled_equals_eager(model, x, backend):
    """fullgraph compile (any graph break is an error): outputs and every parameter gradient equal eager's, then
    repeated no-grad calls run without recompiling (one recompile for the no-grad mode, none after)."""
    ref = model(x)
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = compiled(x)
    y.square().sum().backward()
    assert _rel(y, ref) < 1e-5
    for n, p in model.named_parameters():
        assert _rel(p.grad, want[n]) < 1e-4, n
    with torch.no_grad():
        ref = model(x)
        assert _rel(compiled(x), ref) < 1e-5
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                assert _rel(compiled(x), ref) < 1e-5


@pytest.mark.parametrize('name,size,kwargs', [
    ('smpconv_mobile31', 64, SMALL_MOBILE31),
    ('smp_flexnet_16', 32, dict(block_drop_rate=0., stem_width=12, widths=(12, 16))),
])
def test_whole_models_compile_fullgraph_and_equal_eager(name, size, kwargs):
    """Every model's code captures as one graph, forward and backward, through the custom conv ops (AOTAutograd
    with the aot_eager backend: the same capture Inductor gets, without generating C++; Inductor itself is the
    next test). Eval-mode BatchNorm with random statistics keeps the tiny batch's gradients well conditioned, so
    compiled and eager agree to float32 rounding."""
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model(name, num_classes=5, **kwargs)).eval()
    _check_compiled_equals_eager(model, torch.randn(2, 3, size, size), 'aot_eager')


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_inductor_compiles_the_large_kernel_layers(memory_format):
    """Inductor (the default backend) lowers the layers around the FFT custom op and its backward: an SMP
    large-kernel branch (depthwise SMP conv + small conv, each with BN) and a full large-kernel conv, NCHW and
    channels_last inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        SMPLargeKernel2d(8, 8, 13, small_kernel_size=3, groups=8), nn.GELU(), LargeKernelConv2d(8, 6, 9)).eval()
    randomize_bn_stats_(model)
    model = model.to(memory_format=memory_format)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=memory_format)
    with conv_impl('fft'):  # the custom op, whatever the CPU rule would pick at these sizes
        _check_compiled_equals_eager(model, x, 'inductor')


def test_compiled_training_step_is_as_accurate_as_eager():
    """A training step in train mode (BatchNorm on the batch's statistics), compiled by Inductor, against eager, both
    measured from the float64 gradient: compiled is no further from it than a few times eager's own float32 error.

    Where their differences come from (measured on smpconv_mobile31, batch 2, 64 px): neither the recompute path
    (off under torch.compile, and in eager on CPU bitwise equal to the plain backward) nor reduction order (1e-6)
    nor a BatchNorm that compiles differently (Inductor's gradient is as close to float64 as eager's), but the
    conditioning of the step itself. Train-mode BatchNorm over a batch of 2 (2 x 2 maps in the last stage) amplifies
    float32 rounding: eager float32 is 3e-5 to 1.4e-4 of the largest gradient from float64 (3 seeds of 4), Inductor
    1.6e-4 where eager is 7.7e-5, so two float32 computations differ by up to the sum. And ReLU kinks: where a
    pre-activation lies within rounding of 0, one computation takes the other branch, and that element's gradient,
    spread by the BatchNorms' backward, reaches 3.7e-3 of the largest gradient at batch 2 (the fourth seed) and
    2.1e-2 at batch 16 between eager float32 and float64 (3e-5 with the ReLUs replaced by GELUs)."""
    import copy
    torch.manual_seed(0)
    model = timm.create_model('smpconv_mobile31', num_classes=10, **SMALL_MOBILE31).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 8])

    def step(dtype, compiled=False, recompute=True):
        m = copy.deepcopy(model).to(dtype)
        m.set_recompute(recompute)
        loss = F.cross_entropy((torch.compile(m, fullgraph=True) if compiled else m)(x.to(dtype)), y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.double().flatten() for p in m.parameters()])

    loss64, ref = step(torch.float64)

    def dist(g):
        return ((g - ref).abs().max() / ref.abs().max()).item()

    (loss_e, eager), (_, eager_plain) = step(torch.float32), step(torch.float32, recompute=False)
    try:
        loss_c, compiled = step(torch.float32, compiled=True)
    finally:
        torch._dynamo.reset()
    assert dist(eager_plain) == pytest.approx(dist(eager), rel=1e-3)  # recompute: the same gradient
    assert abs(loss_c - loss64) <= 1e-5 * loss64 and abs(loss_e - loss64) <= 1e-5 * loss64
    assert dist(eager) < 1e-3  # measured 5.0e-5: the step's float32 conditioning at this seed
    assert dist(compiled) <= 4 * dist(eager) + 1e-6  # measured 2.6e-5


def test_torch_export_keeps_each_large_kernel_conv_as_one_custom_op():
    torch.manual_seed(0)
    model = nn.Sequential(LargeKernelConv2d(4, 4, 15, groups=4), nn.GELU(), LargeKernelConv2d(4, 6, 9)).eval()
    x = torch.randn(2, 4, 20, 20)
    with conv_impl('fft'), torch.no_grad():
        ref = model(x)
        ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == 'call_function']
    assert targets.count('timm_smpconv.fft_conv2d.default') == 2
    assert not any('fft_r2c' in t or 'complex' in t for t in targets)  # no complex tensor in the graph
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-5, atol=1e-5)


def test_onnx_export_default_exporter_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model('smpconv_mobile31', num_classes=5, **SMALL_MOBILE31)).eval()
    x = torch.randn(1, 3, 64, 64)
    for tag, m in (('original', model), ('reparameterized', reparameterize_model(model))):
        path = os.fspath(tmp_path / f'{tag}.onnx')
        with torch.no_grad(), conv_impl('fft'):  # even with FFT forced, the export holds plain convolutions
            ref = m(x)
            torch.onnx.export(m, (x,), path, dynamo=True)
        import onnx
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert 'Conv' in ops and not ops & {'DFT', 'STFT'}
        sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4, msg=tag)


@pytest.mark.parametrize('groups,out_chs', [(4, 4), (1, 6), (2, 6)])
def test_fft_custom_ops_pass_opcheck(groups, out_chs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 10, generator=g).requires_grad_()
    w = torch.randn(out_chs, 4 // groups, 5, 7, generator=g).requires_grad_()
    b = torch.randn(out_chs, generator=g).requires_grad_()
    op = torch.ops.timm_smpconv.fft_conv2d.default
    for keep in (True, False):
        torch.library.opcheck(op, (x, w, b, groups, None, torch.float32, keep))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), w, None, groups, None,
                               torch.bfloat16, True))
    wspec = kernel_spectrum(w.detach(), *fft_grid(9, 10, 5, 7))
    torch.library.opcheck(op, (x, w.detach(), b, groups, wspec, torch.float32, True))
    gy = torch.randn(2, out_chs, 9, 10, generator=g)
    _, xs, ws = op(x.detach(), w.detach(), None, groups, None, torch.float32, True)
    none = torch.empty(0)
    for saved in ((xs, ws), (none, none)):  # the forward's spectra, or transform again
        for need_x, need_w in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.timm_smpconv.fft_conv2d_backward.default,
                                  (gy, x.detach(), w.detach(), *saved, groups, need_x, need_w))
    # the op itself equals F.conv2d, and the backward from saved spectra equals the one transforming again
    torch.testing.assert_close(op(x, w, b, groups, None, torch.float32, False)[0],
                               F.conv2d(x, w, b, padding=(2, 3), groups=groups), rtol=1e-4, atol=1e-4)
    bw = torch.ops.timm_smpconv.fft_conv2d_backward
    for a, c in zip(bw(gy, x.detach(), w.detach(), xs, ws, groups, True, True),
                    bw(gy, x.detach(), w.detach(), none, none, groups, True, True)):
        torch.testing.assert_close(a, c)
