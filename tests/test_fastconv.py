""" The large-kernel convolution: FFT == direct (values, gradients, layouts, dtypes), dispatch, FLOP
counting through FFT-dispatched models, and the eval-mode kernel cache. """
import copy
import pickle

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_smpconv  # noqa: F401
from timm_smpconv import flops
from timm_smpconv.layers import LargeKernelConv2d, SMPConv2d, randomize_bn_stats_
from timm_smpconv.ops import (
    conv_impl,
    default_backend,
    dispatch,
    fft_conv2d,
    fft_size,
    get_conv_impl,
    large_kernel_conv2d,
    select_conv_backend,
)
from timm_smpconv.ops import fft as fft_mod


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [
    # (batch, in, out, groups, h, w, kh, kw)
    (2, 8, 8, 8, 20, 20, 31, 31),     # depthwise, kernel larger than the map
    (1, 6, 6, 6, 15, 17, 13, 13),     # odd / non-square map, batch 1
    (2, 4, 4, 4, 16, 9, 5, 5),        # small kernel, even x odd map
    (2, 3, 5, 1, 12, 14, 7, 9),       # full conv, non-square kernel
    (1, 4, 6, 2, 11, 10, 9, 9),       # grouped
    (2, 16, 16, 16, 7, 7, 13, 13),    # the last SMPConv-T stage shape
]


@pytest.mark.parametrize('n,ci,co,g,h,w,kh,kw', CASES)
def test_fft_equals_direct_values_and_gradients(n, ci, co, g, h, w, kh, kw):
    torch.manual_seed(0)
    x = torch.randn(n, ci, h, w, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(co, ci // g, kh, kw, dtype=torch.float64, requires_grad=True)
    b = torch.randn(co, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, wt, b, padding=(kh // 2, kw // 2), groups=g)
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, wt, b), gy)
    # the FFT path computes in float32: compare float32 inputs against the float64 reference
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (x, wt, b))
    out = fft_conv2d(x32, w32, b32, groups=g)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel(out.double(), ref) < 1e-5
    grads = torch.autograd.grad(out, (x32, w32, b32), gy.float())
    for got, want in zip(grads, ref_grads):
        assert rel(got.double(), want) < 1e-5


def test_fft_handles_non_contiguous_and_channels_last_inputs():
    torch.manual_seed(0)
    base = torch.randn(2, 12, 24, 24)
    w = torch.randn(6, 1, 15, 15)
    for x in (base[:, ::2], base.transpose(-1, -2), base[:, :6].contiguous(memory_format=torch.channels_last)):
        assert not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        x = x[:, :6]
        assert rel(fft_conv2d(x, w, None, groups=6), F.conv2d(x, w, None, padding=7, groups=6)) < 1e-5


def test_fft_output_follows_the_input_memory_format_and_partial_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 9, 9)
    y = fft_conv2d(x, w, None, groups=6)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert fft_conv2d(x.contiguous(), w, None, groups=6).is_contiguous()
    # only one of input / kernel needs a gradient: the other is skipped, the one asked for is right
    for need_x, need_w in ((True, False), (False, True)):
        xg, wg = x.clone().requires_grad_(need_x), w.clone().requires_grad_(need_w)
        gy = torch.randn(2, 6, 12, 12)
        got = torch.autograd.grad(fft_conv2d(xg, wg, None, groups=6), xg if need_x else wg, gy)[0]
        want = torch.autograd.grad(F.conv2d(xg, wg, None, padding=4, groups=6), xg if need_x else wg, gy)[0]
        assert rel(got, want) < 1e-5


def test_kernel_spectrum_kept_by_the_module_for_fixed_weights_and_refreshed_after_updates(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 10, 10)
    conv = LargeKernelConv2d(4, 4, 11, groups=4, bias=False)
    calls = []
    orig = fft_mod.kernel_spectrum
    monkeypatch.setattr(dispatch, 'kernel_spectrum', lambda *a: calls.append(1) or orig(*a))
    with conv_impl('fft'):
        with torch.no_grad():
            a, b = conv(x), conv(x)
            assert len(calls) == 1 and torch.equal(a, b)  # the second call reused the spectrum
            assert conv._conv_cache['fft_spectrum'][0]() is conv.weight  # owned by the module, not a global table
            conv(torch.randn(1, 4, 14, 14))
            assert len(calls) == 2  # another grid size: another spectrum
            conv.weight.mul_(2)  # an in-place update (what optimizer.step does) bumps the version
            c = conv(x)
            assert len(calls) == 3 and rel(c, 2 * a) < 1e-6
            # a new tensor at a freed one's address is not mistaken for it: the cache holds a weak reference
            w_new = conv.weight.detach().clone()
            conv.weight = nn.Parameter(w_new.neg())
            assert rel(conv(x), -c) < 1e-6 and len(calls) == 4
        # with autograd on the weight the spectrum is part of the graph, never cached
        conv(x).sum().backward()
        assert len(calls) == 4 and conv.weight.grad is not None
    assert not hasattr(fft_mod, '_SPECTRA') and not hasattr(dispatch, '_SPECTRA')
    # whole-module pickling (torch.save(model)) and deepcopy work with a filled cache, which stays behind
    import io
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert '_conv_cache' not in loaded.__dict__ and torch.equal(loaded(x), conv(x))
    assert torch.equal(copy.deepcopy(conv)(x), conv(x))


def test_fft_under_bf16_autocast_returns_the_autocast_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16)
    w = torch.randn(8, 1, 17, 17)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        direct = F.conv2d(x, w, None, padding=8, groups=8)
        fft = fft_conv2d(x, w, None, groups=8)
    assert fft.dtype == direct.dtype == torch.bfloat16
    assert rel(fft.float(), F.conv2d(x, w, None, padding=8, groups=8)) < 1e-2
    # bf16 inputs without autocast stay bf16 (computed in float32 inside)
    y = fft_conv2d(x.bfloat16(), w.bfloat16(), None, groups=8)
    assert y.dtype == torch.bfloat16


def test_bad_fft_arguments_raise():
    with pytest.raises(ValueError, match='odd kernel'):
        fft_conv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 4, 4), groups=2)
    with pytest.raises(ValueError, match='does not fit'):
        fft_conv2d(torch.randn(1, 3, 8, 8), torch.randn(2, 1, 5, 5), groups=2)
    with pytest.raises(ValueError, match='conv impl'):
        conv_impl('winograd').__enter__()
    with pytest.raises(ValueError, match='wspec'):
        fft_conv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 5, 5), groups=2, wspec=torch.zeros(2, 1, 12, 7, 2))
    assert get_conv_impl() == 'auto'


def test_fft_size_is_a_fast_length():
    for n in range(1, 300):
        m = fft_size(n)
        assert m >= n and m % 2 == 0 and m - n <= max(4, n // 8)
        assert all(fft_size(k) != k for k in range(n, m))  # the smallest such length
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        assert r == 1


def test_dispatch_rule():
    def pick(c, h, k, grad, channels_last=False, groups=None, out=None, impl='auto'):
        x = torch.zeros(2, c, h, h)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        groups = c if groups is None else groups
        w = torch.zeros(out or c, c // groups, *((k, k) if isinstance(k, int) else k))
        with conv_impl(impl), torch.set_grad_enabled(grad):
            return select_conv_backend(x.requires_grad_(grad), w, 1, groups)

    # CPU, NCHW: without gradient the direct kernel is fast up to 13 x 13 and falls off a cliff above
    assert pick(96, 56, 13, False) == 'direct' and pick(96, 56, 15, False) == 'fft'
    assert pick(96, 56, 9, True) == 'fft'                                # training: FFT from 9
    assert pick(384, 14, 5, True) == 'direct' and pick(96, 56, 5, True) == 'fft'  # 5 x 5: large maps only
    assert pick(48, 32, 33, True, groups=1) == 'fft'                     # full 33 x 33 (FlexNet)
    assert pick(48, 32, 3, True, groups=1) == 'direct'
    # channels_last: no cliff without gradient; 5 x 5 with gradient stays direct
    assert pick(384, 14, 27, False, True) == 'direct' and pick(96, 56, 31, False, True) == 'fft'
    assert pick(96, 56, 5, True, True) == 'direct' and pick(384, 14, 13, True, True) == 'fft'
    # settings; a forced backend applies only where it supports the conv, even kernels go direct
    assert pick(96, 56, 31, True, impl='direct') == 'direct' and pick(96, 56, 3, True, impl='fft') == 'fft'
    assert pick(96, 56, (4, 4), True, impl='fft') == 'direct'
    with conv_impl('fft'):
        x, w = torch.zeros(1, 8, 16, 16), torch.zeros(8, 1, 17, 17)
        assert select_conv_backend(x, w, 2, 8) == 'direct'              # strided: direct
    # CUDA (the rule from the H100 table): depthwise from 13 x 13 through the FFT, the rest cuDNN
    for cl in (False, True):
        for grad in (False, True):
            assert default_backend('cuda', True, (13, 13), (7, 7), cl, grad) == 'fft'
            assert default_backend('cuda', True, (31, 31), (56, 56), cl, grad) == 'fft'
            assert default_backend('cuda', True, (5, 5), (56, 56), cl, grad) == 'direct'
            assert default_backend('cuda', False, (33, 33), (32, 32), cl, grad) == 'direct'
    assert default_backend('mps', True, (31, 31), (56, 56), False, True) == 'direct'
    # the CPU rows above come from the same pure rule
    assert default_backend('cpu', True, (15, 15), (56, 56), False, False) == 'fft'


def test_autotune_times_once_per_shape_and_keeps_the_fastest(monkeypatch):
    timed = []

    def fake_time(backend, x, weight, stride, groups, grad, reps=5):
        timed.append(backend.name)
        return {'direct': 2.0, 'fft': 1.0}.get(backend.name, 3.0)

    monkeypatch.setattr(dispatch, '_time_backend', fake_time)
    monkeypatch.setattr(dispatch, '_tuned', {})
    x, w = torch.randn(1, 4, 12, 12), torch.randn(4, 1, 3, 3)
    with conv_impl('autotune'):
        assert select_conv_backend(x, w, 1, 4) == 'fft'      # the rule would say direct; timing says fft
        assert select_conv_backend(x, w, 1, 4) == 'fft'
        supported = [n for n, b in dispatch._BACKENDS.items() if b.supports(x, w, 1, 4)]
        assert sorted(timed) == sorted(supported) and {'direct', 'fft'} <= set(timed)  # each timed once
        y = large_kernel_conv2d(x, w, None, 1, 4)
    assert rel(y, F.conv2d(x, w, None, 1, 1, 1, 4)) < 1e-5
    # the real timer runs both directions and returns seconds
    t = dispatch._time_backend(dispatch._BACKENDS['fft'], x.requires_grad_(), w, 1, 4, True, reps=1)
    assert 0 < t < 10


def test_smp_model_same_logits_and_grads_on_both_paths():
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model('smpconv_mobile31', num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    outs, grads = [], []
    for impl in ('direct', 'fft'):
        model.zero_grad()
        with conv_impl(impl):
            y = model(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(model.stages[0].blocks[0].large_kernel.smp.points.grad.clone())
    assert rel(outs[1], outs[0]) < 1e-5
    assert rel(grads[1], grads[0]) < 1e-4


def test_fvcore_counts_equal_on_fft_dispatched_model():
    model = timm.create_model('smpconv_mobile31')
    with conv_impl('direct'):
        direct = flops.count_flops(model, img_size=96)
    with conv_impl('fft'):
        fft = flops.count_flops(model, img_size=96)
    assert fft['conv'] == direct['conv'] > 0
    assert fft['total'] == direct['total']


def test_torchscript_and_fx_of_dispatched_layers():
    torch.manual_seed(0)
    model = nn.Sequential(SMPConv2d(4, 4, 17, groups=4), nn.GELU(), SMPConv2d(4, 6, 9)).eval()
    x = torch.randn(1, 4, 20, 20)
    with torch.no_grad(), conv_impl('fft'):
        y = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert 'large_kernel_conv2d' in traced.code
        assert rel(traced(x), y) < 1e-5
        assert rel(torch.jit.script(model)(x), y) < 1e-5  # scripted: direct conv


def test_eval_kernel_cache_and_invalidation(monkeypatch):
    torch.manual_seed(0)
    layer = SMPConv2d(4, 4, 11, groups=4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.eval()
    with torch.no_grad():
        w1 = layer.get_weight()
        assert layer.get_weight() is w1                     # cached
    x = torch.randn(2, 4, 12, 12)
    layer(x).square().sum().backward()                      # grad enabled: no cache used
    opt.step()
    with torch.no_grad():
        w2 = layer.get_weight()
        assert w2 is not w1 and not torch.allclose(w2, w1)  # the step invalidated it
        torch.testing.assert_close(w2, layer._render())
        layer.set_kernel_size(13)
        assert layer.get_weight().shape[-1] == 13           # a new size too
        layer.set_kernel_size(11)
    # under inference_mode the cached kernel is still a normal tensor: its FFT spectrum is reused too
    calls = []
    orig = fft_mod.kernel_spectrum
    monkeypatch.setattr(dispatch, 'kernel_spectrum', lambda *a: calls.append(1) or orig(*a))
    with torch.inference_mode(), conv_impl('fft'):
        y1, y2 = layer(x), layer(x)
        cached = layer.get_weight()
    assert not cached.is_inference() and not cached.requires_grad and len(calls) == 1 and torch.equal(y1, y2)
    copy.deepcopy(layer)  # what timm.utils.reparameterize_model does first: the cache must not block it
    loaded = pickle.loads(pickle.dumps(layer))  # torch.save(model) pickles it: the cache stays behind
    assert '_weight_cache' in layer.__dict__ and '_weight_cache' not in loaded.__dict__
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), layer(x))
        # a replaced parameter is a new key even at version 0 (the cache holds weak references, not addresses)
        layer.weight = nn.Parameter(layer.weight.detach() * 2)
        torch.testing.assert_close(layer.get_weight(), layer._render())
        assert torch.allclose(layer.get_weight(), 2 * cached)
    layer.train()
    assert '_weight_cache' not in layer.__dict__
    with torch.no_grad():
        assert layer.get_weight() is not layer.get_weight()  # no caching while training


@pytest.mark.slow
def test_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(SMPConv2d(4, 4, 17, groups=4), nn.GELU()).eval()
    x = torch.randn(1, 4, 20, 20)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model)
        assert rel(compiled(x), ref) < 1e-5


def test_support_crop_is_exact_and_shrinks_the_kernel():
    from timm_smpconv.layers.smp import render_smp_kernel, support_crop
    torch.manual_seed(0)
    full = SMPConv2d(6, 6, 31, groups=6, point_std=0.1)
    crop = support_crop(full.points, full.radius, 31)
    assert crop > 0
    w = full.get_weight()
    inner = render_smp_kernel(full.points, full.radius, full.weight, 31, crop=crop)
    assert inner.shape[-1] == 31 - 2 * crop
    torch.testing.assert_close(inner, w[..., crop:31 - crop, crop:31 - crop])
    assert w[..., :crop, :].abs().max() == 0 and w[..., :, -crop:].abs().max() == 0  # exactly zero outside
    cropped = SMPConv2d(6, 6, 31, groups=6, crop_to_support=True)
    cropped.load_state_dict(full.state_dict())
    x = torch.randn(2, 6, 28, 28, requires_grad=True)
    for impl in ('direct', 'fft'):
        with conv_impl(impl):
            assert rel(cropped(x), full(x)) < 1e-5
    g_full = torch.autograd.grad(full(x).square().sum(), full.points)[0]
    g_crop = torch.autograd.grad(cropped(x).square().sum(), cropped.points)[0]
    assert rel(g_crop, g_full) < 1e-4
    # a point at the border: nothing to crop
    with torch.no_grad():
        full.points[0, 0] = torch.tensor([0.95, 0.0])
    assert support_crop(full.points, full.radius, 31) == 0
    m = timm.create_model('smpconv_mobile31', crop_to_support=True, device='meta')
    assert m.stages[0].blocks[0].large_kernel.smp.crop_to_support
