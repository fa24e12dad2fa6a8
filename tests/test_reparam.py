""" Structural reparameterization through timm.utils.reparameterize_model. """
import pytest
import torch
import torch.nn as nn
from timm.utils import reparameterize_model

from timm_smpconv.layers import CausalConv1d, SMPConv1d, SMPConv2d, SMPLargeKernel1d, SMPLargeKernel2d, randomize_bn_stats_
from timm_smpconv.layers.smp_conv import _SMPConvNd, _SMPLargeKernelNd
from timm_smpconv.ops import conv_impl


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def assert_plain(model: nn.Module):
    for name, m in model.named_modules():
        assert not isinstance(m, (_SMPConvNd, _SMPLargeKernelNd)), name
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm), name
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            assert m.bias is not None, name
    assert not any(n.endswith(('.points', '.radius')) for n, _ in model.named_parameters())


MODELS_2D = {
    'lk_depthwise': lambda: SMPLargeKernel2d(16, 16, 31, groups=16),
    'lk_full_normalized': lambda: SMPLargeKernel2d(3, 8, 13, small_kernel_size=3, small_bias=True,
                                                   normalize=True, n_points=16, point_std=0.05),
    'lk_strided_grouped': lambda: SMPLargeKernel2d(8, 8, 9, small_kernel_size=3, stride=2, groups=2),
    'lk_no_small': lambda: SMPLargeKernel2d(8, 8, 9, small_kernel_size=None, groups=8),
    'conv_bias': lambda: SMPConv2d(4, 6, 7),
    'conv_no_bias_dw': lambda: SMPConv2d(6, 6, 7, groups=6, bias=False),
}


@pytest.mark.parametrize('name', list(MODELS_2D))
def test_reparameterize_2d(name):
    torch.manual_seed(0)
    layer = MODELS_2D[name]()
    in_chs = layer.smp.in_channels if hasattr(layer, 'smp') else layer.in_channels
    model = nn.Sequential(layer, nn.GELU())
    randomize_bn_stats_(model)
    model.eval()
    x = torch.randn(2, in_chs, 24, 24)
    with torch.no_grad():
        y = model(x)
        fused = reparameterize_model(model)
        y_fused = fused(x)
    assert_plain(fused)
    assert isinstance(fused[0], nn.Conv2d)
    assert rel_err(y, y_fused) <= 1e-5
    # the original is untouched (reparameterize_model works on a copy by default)
    assert isinstance(model[0], type(layer))
    # fusing a fused model changes nothing; the fused model scripts
    torch.testing.assert_close(reparameterize_model(fused)(x), y_fused)
    with conv_impl('direct'):  # scripted convs are direct; compare like with like
        torch.testing.assert_close(torch.jit.script(fused)(x), fused(x))


@pytest.mark.parametrize('layer_fn', [
    lambda: SMPLargeKernel1d(6, 6, 41, groups=6, n_points=30, radius=0.05),
    lambda: SMPLargeKernel1d(3, 5, 15, small_kernel_size=5, normalize=True),
    lambda: SMPConv1d(4, 4, 21, stride=2),
])
def test_reparameterize_1d(layer_fn):
    torch.manual_seed(0)
    layer = layer_fn()
    in_chs = layer.smp.in_channels if hasattr(layer, 'smp') else layer.in_channels
    model = nn.Sequential(layer, nn.ReLU())
    randomize_bn_stats_(model)
    model.eval()
    x = torch.randn(2, in_chs, 64)
    with torch.no_grad():
        y = model(x)
        fused = reparameterize_model(model)
        y_fused = fused(x)
    assert_plain(fused)
    assert isinstance(fused[0], CausalConv1d) and isinstance(fused[0], nn.Conv1d)
    assert rel_err(y, y_fused) <= 1e-5


def test_reparameterize_nested_model_and_training_state():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lk = SMPLargeKernel2d(8, 8, 15, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return x + self.pw(torch.relu(self.lk(x)))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block())
    model.train()
    with torch.no_grad():  # real BN statistics from a few batches
        for _ in range(3):
            model(torch.randn(4, 3, 20, 20))
    model.eval()
    x = torch.randn(2, 3, 20, 20)
    fused = reparameterize_model(model)
    assert_plain(fused)
    assert not fused[1].lk.training
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-5
    n_plain = sum(p.numel() for p in fused.parameters())
    assert n_plain == 3 * 8 * 9 + 8 + 2 * (8 * 15 * 15 + 8 + 8 * 8 + 8)


def test_fold_bn_requires_running_stats():
    lk = SMPLargeKernel2d(4, 4, 7, groups=4)
    lk.smp_bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match='running statistics'):
        lk.fuse()


def test_randomize_bn_stats_changes_every_batchnorm():
    model = nn.Sequential(nn.BatchNorm2d(4), SMPLargeKernel2d(4, 4, 5, groups=4), nn.BatchNorm1d(3, affine=False))
    randomize_bn_stats_(model, seed=3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert m.running_var.min() >= 0.5
            if m.affine:
                assert not torch.allclose(m.weight, torch.ones_like(m.weight))
