""" SMPConv1d / SMPConv2d / SMPLargeKernel*: conv semantics, bad input, scripting, tracing, devices, dtypes. """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_smpconv
from timm_smpconv.layers import CausalConv1d, SMPConv1d, SMPConv2d, SMPLargeKernel1d, SMPLargeKernel2d


def test_public_exports():
    for name in ('SMPConv1d', 'SMPConv2d', 'SMPLargeKernel1d', 'SMPLargeKernel2d'):
        assert getattr(timm_smpconv, name) is getattr(timm_smpconv.layers, name)


@pytest.mark.parametrize('stride,groups,bias', [(1, 1, True), (2, 1, False), (1, 4, True), (2, 2, True)])
def test_conv2d_equals_f_conv2d_with_rendered_kernel(stride, groups, bias):
    torch.manual_seed(0)
    layer = SMPConv2d(4, 8, 7, stride=stride, groups=groups, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(2, 4, 15, 15)
    want = F.conv2d(x, layer.get_weight(), layer.bias, stride, 3, 1, groups)
    torch.testing.assert_close(layer(x), want)
    assert layer(x).shape == nn.Conv2d(4, 8, 7, stride, 3, groups=groups)(x).shape
    assert layer.get_weight().shape == (8, 4 // groups, 7, 7)


def test_conv1d_is_causal():
    torch.manual_seed(0)
    layer = SMPConv1d(3, 5, 9, n_points=6, radius=0.5)
    x = torch.randn(1, 3, 40)
    y = layer(x)
    assert y.shape == (1, 5, 40)
    x2 = x.clone()
    x2[..., 25:] = torch.randn(1, 3, 15)  # change only the future of t = 24
    y2 = layer(x2)
    torch.testing.assert_close(y2[..., :25], y[..., :25])
    assert not torch.allclose(y2[..., 25:], y[..., 25:])
    # the last tap (coordinate +1) multiplies the current step: a unit impulse at t gives w[-1] at t
    imp = torch.zeros(1, 3, 20)
    imp[0, 0, 10] = 1
    w = layer.get_weight()
    torch.testing.assert_close(layer(imp)[0, :, 10] - layer.bias, w[:, 0, -1])
    torch.testing.assert_close(layer(imp)[0, :, 12] - layer.bias, w[:, 0, -3])


def test_causal_conv1d_matches_padded_conv():
    torch.manual_seed(0)
    conv = CausalConv1d(3, 4, 5, dilation=2)
    x = torch.randn(2, 3, 17)
    torch.testing.assert_close(conv(x), F.conv1d(F.pad(x, (8, 0)), conv.weight, conv.bias, dilation=2))
    with pytest.raises(ValueError, match='padding'):
        CausalConv1d(3, 4, 5, padding=2)


def test_large_kernel_branch_is_sum_of_two_bn_branches():
    torch.manual_seed(0)
    lk = SMPLargeKernel2d(6, 6, 13, small_kernel_size=5, groups=6).eval()
    x = torch.randn(2, 6, 20, 20)
    want = lk.smp_bn(lk.smp(x)) + lk.small_bn(F.conv2d(x, lk.small_conv.weight, None, 1, 2, 1, 6))
    torch.testing.assert_close(lk(x), want)
    only = SMPLargeKernel2d(6, 6, 13, small_kernel_size=None, groups=6).eval()
    assert only.small_conv is None
    torch.testing.assert_close(only(x), only.smp_bn(only.smp(x)))
    seq = SMPLargeKernel1d(4, 4, 31, groups=4)
    assert seq(torch.randn(2, 4, 50)).shape == (2, 4, 50)
    assert isinstance(seq.small_conv, CausalConv1d) and isinstance(seq.smp_bn, nn.BatchNorm1d)


BAD_ARGS = [
    (dict(kernel_size=4), ValueError, 'odd'),  # 2-D kernels are centred; 1-D causal ones may be even (below)
    (dict(kernel_size=0), ValueError, 'int >= 1'),
    (dict(kernel_size=-3), ValueError, 'int >= 1'),
    (dict(kernel_size=(5, 7)), ValueError, 'equal ints'),
    (dict(kernel_size=5.0), TypeError, 'kernel_size'),
    (dict(n_points=0), ValueError, 'n_points'),
    (dict(n_points=2.5), TypeError, 'n_points'),
    (dict(in_channels=6, groups=4), ValueError, 'divisible by groups'),
    (dict(out_channels=6, groups=4), ValueError, 'divisible by groups'),
    (dict(in_channels=0), ValueError, 'in_channels'),
    (dict(radius=float('nan')), ValueError, 'radius'),
    (dict(radius=float('inf')), ValueError, 'radius'),
    (dict(radius=-0.1), ValueError, 'radius'),
    (dict(radius='big'), TypeError, 'radius'),
    (dict(stride=0), ValueError, 'stride'),
]


@pytest.mark.parametrize('cls', [SMPConv2d, SMPConv1d])
@pytest.mark.parametrize('override,exc,match', BAD_ARGS)
def test_bad_constructor_arguments_raise(cls, override, exc, match):
    kwargs = dict(in_channels=4, out_channels=8, kernel_size=5)
    kwargs.update(override)
    if cls is SMPConv1d and isinstance(kwargs['kernel_size'], tuple):
        kwargs['kernel_size'] = (5,) * 2  # wrong number of entries for 1D
        match = 'must be one int'
    if cls is SMPConv1d and kwargs['kernel_size'] == 4:
        conv = cls(**kwargs)  # a causal kernel of any length: the sequence models' horizon is the sequence
        x = torch.randn(2, 4, 9)
        torch.testing.assert_close(conv(x), F.conv1d(F.pad(x, (3, 0)), conv.get_weight(), conv.bias))
        return
    with pytest.raises(exc, match=match):
        cls(**kwargs)


def test_bad_large_kernel_arguments_raise():
    with pytest.raises(ValueError, match='small_kernel_size'):
        SMPLargeKernel2d(4, 4, 5, small_kernel_size=7)
    with pytest.raises(ValueError, match='small_kernel_size'):
        SMPLargeKernel2d(4, 4, 9, small_kernel_size=4)
    with pytest.raises(ValueError, match='odd'):
        SMPLargeKernel2d(4, 4, 8)
    with pytest.raises(ValueError, match='set_kernel_size|odd'):
        SMPConv2d(4, 4, 5).set_kernel_size(6)


@pytest.mark.parametrize('scripted', [False, True])
def test_bad_input_raises(scripted):
    layer2, layer1 = SMPConv2d(4, 8, 5), SMPConv1d(4, 8, 5)
    lk = SMPLargeKernel2d(4, 4, 7, groups=4)
    if scripted:
        layer2, layer1, lk = (torch.jit.script(m) for m in (layer2, layer1, lk))
    with pytest.raises((ValueError, torch.jit.Error), match='expects 4 input channels, got 3'):
        layer2(torch.randn(1, 3, 8, 8))
    with pytest.raises((ValueError, torch.jit.Error), match='4-D input'):
        layer2(torch.randn(4, 8, 8))
    with pytest.raises((ValueError, torch.jit.Error), match='3-D input'):
        layer1(torch.randn(1, 4, 8, 8))
    with pytest.raises((ValueError, torch.jit.Error), match='expects 4 input channels, got 5'):
        layer1(torch.randn(1, 5, 8))
    with pytest.raises((ValueError, torch.jit.Error), match='expects 4 input channels, got 2'):
        lk(torch.randn(1, 2, 8, 8))


def test_torchscript_and_fx_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        SMPLargeKernel2d(4, 4, 11, groups=4), nn.ReLU(), SMPConv2d(4, 6, 5, normalize=True, shared_points=False),
    ).eval()
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    assert 'render_smp_kernel' in traced.code
    seq = nn.Sequential(SMPLargeKernel1d(3, 3, 21, groups=3), SMPConv1d(3, 2, 7)).eval()
    xs = torch.randn(2, 3, 30)
    torch.testing.assert_close(torch.jit.script(seq)(xs), seq(xs))
    torch.testing.assert_close(torch.fx.symbolic_trace(seq)(xs), seq(xs))


def test_meta_device_and_dtype_factory_kwargs():
    lk = SMPLargeKernel2d(8, 8, 31, groups=8, device='meta', dtype=torch.float64)
    for name, t in list(lk.named_parameters()) + list(lk.named_buffers()):
        assert t.device.type == 'meta', name
        assert not t.is_floating_point() or t.dtype == torch.float64, name
    out = lk(torch.empty(2, 8, 16, 16, device='meta', dtype=torch.float64))
    assert out.shape == (2, 8, 16, 16) and out.device.type == 'meta'


def test_bfloat16_forward_returns_bfloat16():
    model = nn.Sequential(SMPLargeKernel2d(4, 4, 9, groups=4), nn.GELU(), SMPConv2d(4, 4, 5))
    model = model.to(torch.bfloat16).eval()
    y = model(torch.randn(1, 4, 12, 12, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_repr_names_the_configuration():
    text = repr(SMPConv2d(8, 8, 31, groups=8, bias=False))
    assert 'kernel_size=31' in text and 'n_points=240' in text and 'groups=8' in text and 'bias=False' in text
    layer = SMPConv2d(8, 8, 17, groups=8)
    layer.set_kernel_size(33)
    assert 'kernel_size=33' in repr(layer) and int(layer.kernel_size_record) == 33
