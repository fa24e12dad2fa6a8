""" FlexConv layer: MAGNet against the paper's formula, Gaussian mask and dynamic cropping, re-sampling at another
horizon, fusing, the FFT path, the anti-aliasing regulariser and resolution re-targeting. """
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_smpconv.layers import (
    CKConv2d,
    FlexConv2d,
    FlexConvBN1d,
    FlexConvBN2d,
    MAGNet,
    SMPConv2d,
    SMPLargeKernel2d,
    gaussian_mask_crop,
    randomize_bn_stats_,
)
from timm_smpconv.ops import fft_conv2d
from timm_smpconv.regularizers import anti_aliasing_penalty
from timm_smpconv.resolution import retarget_resolution

TAU_C = math.sqrt(-2 * math.log(0.1))  # 2.14597


def pad_full(kernel, k):
    """Zero-pad a cropped (possibly non-square) kernel back to the full k x k grid, centred per axis."""
    ph, pw = (k - kernel.shape[-2]) // 2, (k - kernel.shape[-1]) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------
# MAGNet and the kernel formula

HAND = dict(  # a tiny MAGNet (D=2, H=2, L=1, 4 outputs), every number chosen by hand
    mu=[[[0.1, -0.2], [0.0, 0.3]], [[-0.1, 0.2], [0.2, 0.0]]],
    gamma=[[[2.0, 1.0], [0.5, 3.0]], [[1.5, 0.7], [2.5, 1.2]]],
    W=[[[1.0, 2.0], [-3.0, 0.5]], [[0.3, -1.1], [2.0, 0.4]]],
    b=[[0.1, -0.4], [0.5, 0.2]],
    A=[[0.2, -0.5], [0.7, 0.1]], c=[0.05, -0.1],
    A_out=[[1.0, -2.0], [0.5, 0.25], [-0.3, 0.8], [1.5, -0.6]], c_out=[0.3, -0.2, 0.1, 0.0],
)


def _set_hand(net: MAGNet):
    with torch.no_grad():
        for l, filt in enumerate(net.filters):
            filt.mu.copy_(torch.tensor(HAND['mu'][l]))
            filt.gamma.copy_(torch.tensor(HAND['gamma'][l]))
            filt.linear.weight.copy_(torch.tensor(HAND['W'][l]))
            filt.linear.bias.copy_(torch.tensor(HAND['b'][l]))
        net.hidden[0].weight.copy_(torch.tensor(HAND['A']))
        net.hidden[0].bias.copy_(torch.tensor(HAND['c']))
        net.output.weight.copy_(torch.tensor(HAND['A_out']))
        net.output.bias.copy_(torch.tensor(HAND['c_out']))


def _magnet_formula(x):
    """MAGNet (FlexConv paper) in plain Python: g_l, z_0 = g_0, z_1 = g_1 * (A z_0 + c), k = A_out z_1 + c_out."""
    def g(l):
        out = []
        for h in range(2):
            env = math.exp(-0.5 * sum((HAND['gamma'][l][h][d] * (x[d] - HAND['mu'][l][h][d])) ** 2 for d in range(2)))
            out.append(env * math.sin(sum(HAND['W'][l][h][d] * x[d] for d in range(2)) + HAND['b'][l][h]))
        return out
    z0 = g(0)
    g1 = g(1)
    z1 = [g1[h] * (sum(HAND['A'][h][j] * z0[j] for j in range(2)) + HAND['c'][h]) for h in range(2)]
    return [sum(HAND['A_out'][j][h] * z1[h] for h in range(2)) + HAND['c_out'][j] for j in range(4)]


def test_magnet_equals_spec_formula_on_hand_built_case():
    net = MAGNet(2, 4, hidden_dim=2, num_layers=1)
    _set_hand(net)
    pts = [(0.25, -0.5), (-1.0, 1.0), (0.0, 0.0), (0.7, 0.3)]
    out = net(torch.tensor(pts))
    for row, x in zip(out, pts):
        assert row.tolist() == pytest.approx(_magnet_formula(x), abs=1e-6)


def test_flexconv_kernel_is_scaled_masked_magnet_with_output_ordering():
    """K[o, i, a, b] = s * k(x)[o * Cin + i] * m(x), x = (lin[a], lin[b]), m separable Gaussian per axis."""
    conv = FlexConv2d(2, 2, kernel_size=5, hidden_dim=2, num_layers=1, sampling_rate_norm=0.5, dynamic_cropping=False)
    _set_hand(conv.kernel_net)
    mp = [[0.1, 0.4], [-0.2, 0.6]]
    with torch.no_grad():
        conv.mask_params.copy_(torch.tensor(mp))
    w = conv.get_weight()
    assert w.shape == (2, 2, 5, 5)
    lin = [-1.0, -0.5, 0.0, 0.5, 1.0]
    for a in range(5):
        for b in range(5):
            x = (lin[a], lin[b])
            k = _magnet_formula(x)
            m = (math.exp(-0.5 * ((x[0] - mp[0][0]) / mp[0][1]) ** 2)
                 * math.exp(-0.5 * ((x[1] - mp[1][0]) / mp[1][1]) ** 2))
            for o in range(2):
                for i in range(2):
                    assert w[o, i, a, b].item() == pytest.approx(0.5 * k[o * 2 + i] * m, abs=1e-6)


def test_magnet_init_matches_spec():
    torch.manual_seed(0)
    H = 1500  # many units: tight statistics (H x D = 3000 samples per filter)
    net = MAGNet(2, 4, hidden_dim=H, num_layers=3, input_scale=25.6, init_spatial_value=0.125025)
    for l, filt in enumerate(net.filters):
        alpha = 6.0 / (l + 1)
        assert filt.gamma.mean().item() == pytest.approx(alpha, rel=0.05)  # Gamma(alpha, rate 1): mean alpha
        assert filt.gamma.var().item() == pytest.approx(alpha, rel=0.15)
        assert filt.mu.abs().max().item() <= 0.125025 and filt.mu.abs().max().item() > 0.12
        u = filt.linear.weight / (12.8 * filt.gamma)  # W = u * 25.6 / sqrt(4) * gamma, u ~ U(+-1/sqrt(2))
        assert u.abs().max().item() <= 1 / math.sqrt(2) + 1e-6 and u.abs().max().item() > 0.7
        assert u.std().item() == pytest.approx(1 / math.sqrt(6), rel=0.05)
        assert filt.linear.bias.abs().max().item() <= math.pi and filt.linear.bias.abs().max().item() > 3.1
    for lin in net.hidden:
        top = lin.weight.abs().max().item()
        assert 0.99 * math.sqrt(1 / H) < top <= math.sqrt(1 / H) * (1 + 1e-6)
    conv = FlexConv2d(3, 4, mask_init=0.075)
    assert conv.kernel_net.filters[0].init_spatial_value == pytest.approx(0.125025)  # 1.667 x mask init
    assert torch.equal(conv.mask_params.detach(), torch.tensor([[0., 0.075], [0., 0.075]]))
    assert torch.equal(conv.bias.detach(), torch.zeros(4))
    assert CKConv2d(3, 4, kernel_net='magnet').kernel_net.filters[0].init_spatial_value == 1.0


@pytest.mark.parametrize('cin,cout,expected', [(3, 24, 6468), (24, 24, 23100), (24, 36, 32616), (36, 36, 46872)])
def test_flexconv_parameter_count(cin, cout, expected):
    conv = FlexConv2d(cin, cout, device='meta')
    assert n_params(conv) == expected == 4068 + 33 * cin * cout + cout


# ------------------------------------------------------------------------------------------------
# Gaussian mask and dynamic cropping

def _crop_reference(mean, sigma, k):
    """The authors' cropping rule literally: kept index range per axis."""
    p = torch.linspace(-1, 1, k)
    mean, sigma = torch.tensor(mean, dtype=torch.float32), torch.tensor(sigma, dtype=torch.float32)
    rs = [max(abs((m - s * TAU_C).item()), abs((m + s * TAU_C).item())) for m, s in zip(mean, sigma)]
    if all(r >= 1 for r in rs):
        return [(0, k)] * len(rs)
    out = []
    for r in rs:
        if r >= 1:
            out.append((0, k))
            continue
        i = next(i for i in range(k // 2 + 1) if p[i] > -r)
        out.append((i, k - i))
    return out


@pytest.mark.parametrize('sigma,size', [(0.075, 5), (0.1, 7), (0.2, 13), (0.3, 21), (0.4, 27), (0.5, 33),
                                        (0.466, 33)])
def test_crop_sizes_on_33_grid(sigma, size):
    conv = FlexConv2d(1, 1, kernel_size=33, hidden_dim=4)
    with torch.no_grad():
        conv.mask_params.copy_(torch.tensor([[0., sigma], [0., sigma]]))
    assert conv.get_weight().shape[-2:] == (size, size)


def test_crop_with_mean_and_non_square():
    conv = FlexConv2d(2, 3, kernel_size=33, hidden_dim=4)
    cases = [([[0.05, 0.2], [0.05, 0.2]], (15, 15)), ([[-0.1, 0.3], [-0.1, 0.3]], (23, 23)),
             ([[0.0, 0.1], [0.0, 0.3]], (7, 21)), ([[0.0, 0.6], [0.0, 0.2]], (33, 13))]
    for mp, shape in cases:
        with torch.no_grad():
            conv.mask_params.copy_(torch.tensor(mp))
        assert conv.get_weight().shape[-2:] == shape, mp
        y = conv(torch.randn(1, 2, 9, 11))
        assert y.shape == (1, 3, 9, 11)  # 'same' conv for non-square kernels


def test_crop_matches_spec_rule_on_random_masks():
    g = torch.Generator().manual_seed(0)
    for k in (9, 17, 33, 65):
        for _ in range(40):
            mean = (torch.rand(2, generator=g) - 0.5) * 0.6
            sigma = torch.rand(2, generator=g) * 0.55 + 0.01
            starts = gaussian_mask_crop(torch.stack([mean, sigma], 1), k)
            ref = _crop_reference(mean.tolist(), sigma.tolist(), k)
            assert [(s, k - s) for s in starts] == ref, (k, mean, sigma)


def test_cropping_keeps_the_uncropped_values():
    torch.manual_seed(0)
    conv = FlexConv2d(2, 3, kernel_size=33, hidden_dim=8)
    with torch.no_grad():
        conv.mask_params.copy_(torch.tensor([[0.02, 0.15], [-0.05, 0.25]]))
    cropped = conv.get_weight()
    conv.dynamic_cropping = False
    full = conv.get_weight()
    h, w = cropped.shape[-2:]
    i0, i1 = (33 - h) // 2, (33 - w) // 2
    assert (h, w) != (33, 33)
    torch.testing.assert_close(cropped, full[..., i0:33 - i0, i1:33 - i1])
    # and what is dropped is below the threshold of the mask: small next to the kept values
    outside = full.clone()
    outside[..., i0:33 - i0, i1:33 - i1] = 0
    assert outside.abs().max() < 0.2 * cropped.abs().max()


def test_mask_threshold_changes_the_crop():
    conv = FlexConv2d(1, 1, kernel_size=33, hidden_dim=4, mask_threshold=0.5)
    with torch.no_grad():
        conv.mask_params.copy_(torch.tensor([[0., 0.3], [0., 0.3]]))
    c = math.sqrt(-2 * math.log(0.5))
    i = sum(1 for v in torch.linspace(-1, 1, 33)[:17].tolist() if v <= -0.3 * c)
    assert conv.get_weight().shape[-1] == 33 - 2 * i < 21


# ------------------------------------------------------------------------------------------------
# Re-sampling at another horizon (the cross-resolution protocol at layer level)

def test_33_grid_at_even_indices_times_4_equals_17_grid():
    torch.manual_seed(0)
    conv = FlexConv2d(3, 4, kernel_size=17, hidden_dim=16)
    with torch.no_grad():
        conv.mask_params.copy_(torch.tensor([[0.03, 0.18], [-0.02, 0.3]]))
    k17 = conv.get_weight()
    conv.set_kernel_size(33)
    assert conv.sampling_rate_norm.item() == pytest.approx(0.25) and int(conv.kernel_size_record) == 33
    k33 = conv.get_weight()
    assert k33.shape[-1] > k17.shape[-1]
    full17, full33 = pad_full(k17, 17), pad_full(k33, 33)
    torch.testing.assert_close(full33[..., ::2, ::2] * 4, full17, rtol=1e-5, atol=1e-6)
    # uncropped too
    conv.dynamic_cropping = False
    conv.set_kernel_size(17)
    a = conv.get_weight()
    conv.set_kernel_size(33)
    torch.testing.assert_close(conv.get_weight()[..., ::2, ::2] * 4, a, rtol=1e-5, atol=1e-6)
    conv.set_kernel_size(65, mode='none')
    assert conv.sampling_rate_norm.item() == pytest.approx(0.25)


def test_state_dict_saved_at_another_horizon_is_retargeted_on_load():
    torch.manual_seed(0)
    src = FlexConv2d(2, 3, kernel_size=17, hidden_dim=8)
    dst = FlexConv2d(2, 3, kernel_size=33, hidden_dim=8)
    dst.load_state_dict(src.state_dict())
    assert dst.kernel_size == 33 and dst.sampling_rate_norm.item() == pytest.approx(0.25)
    torch.testing.assert_close(pad_full(dst.get_weight(), 33)[..., ::2, ::2] * 4, pad_full(src.get_weight(), 17))
    # and back: a re-targeted layer saves its factor, a 17 layer gets 1.0 again
    back = FlexConv2d(2, 3, kernel_size=17, hidden_dim=8, sampling_rate_norm=3.0)
    back.load_state_dict(dst.state_dict())
    assert back.sampling_rate_norm.item() == pytest.approx(1.0)
    torch.testing.assert_close(back.get_weight(), src.get_weight())
    keep = FlexConv2d(2, 3, kernel_size=33, hidden_dim=8, resize_mode='none')
    keep.load_state_dict(src.state_dict())
    assert keep.sampling_rate_norm.item() == 1.0
    bad = src.state_dict()
    bad['kernel_size_record'] = torch.tensor(16)
    with pytest.raises(RuntimeError, match='invalid saved kernel size 16'):
        dst.load_state_dict(bad)


# ------------------------------------------------------------------------------------------------
# Fusing and the FFT path

def test_fuse_gives_plain_conv_with_same_output():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10)
    for mp in ([[0.0, 0.1], [0.0, 0.3]], [[0.1, 0.6], [0.0, 0.6]]):
        conv = FlexConv2d(3, 5, kernel_size=17, hidden_dim=8)
        with torch.no_grad():
            conv.mask_params.copy_(torch.tensor(mp))
            conv.bias.normal_()
        plain = conv.fuse()
        assert isinstance(plain, nn.Conv2d) and type(plain).__name__ == "LargeKernelConv2d" and plain.bias is not None
        with torch.no_grad():
            torch.testing.assert_close(plain(x), conv(x), rtol=1e-5, atol=1e-5)
    branch = FlexConvBN2d(3, 5, kernel_size=17, hidden_dim=8).eval()
    with torch.no_grad():
        branch.conv.mask_params.copy_(torch.tensor([[0.0, 0.2], [0.05, 0.1]]))
    randomize_bn_stats_(branch)
    fused = branch.fuse()
    assert isinstance(fused, nn.Conv2d) and fused.kernel_size == (7, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), branch(x), rtol=1e-5, atol=1e-5)
    ck = CKConv2d(3, 4, kernel_size=9, hidden_dim=8)
    assert ck.mask_params is None and ck.fuse().kernel_size == (9, 9)


@pytest.mark.parametrize('kh,kw', [(53, 59), (55, 55), (5, 3)])
def test_fft_conv_equals_spatial_conv(kh, kw):
    """The authors' FFT path pads every axis by the last kernel dim: wrong (shifted) for 53 x 59."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 36, generator=g)
    w = torch.randn(4, 3, kh, kw, generator=g)
    b = torch.randn(4, generator=g)
    ref = F.conv2d(x, w, b, padding=(kh // 2, kw // 2))
    torch.testing.assert_close(fft_conv2d(x, w, b), ref, rtol=1e-4, atol=1e-3)


def test_flexconv_fft_path_taken_above_threshold():
    torch.manual_seed(0)
    conv = FlexConv2d(2, 3, kernel_size=61, hidden_dim=8, use_fft=True)
    with torch.no_grad():
        conv.mask_params.copy_(torch.tensor([[0.0, 0.6], [0.0, 0.4]]))  # 61 x 51 after cropping: non-square, both > 50
    x = torch.randn(1, 2, 20, 24)
    w = conv.get_weight()
    assert w.shape[-2:] == (61, 51)
    with torch.no_grad():
        y = conv(x)
        torch.testing.assert_close(y, F.conv2d(x, w, conv.bias, padding=(30, 25)), rtol=1e-4, atol=1e-4)
    calls = []
    import timm_smpconv.layers.flexconv as fc
    orig = fc.fft_conv2d
    try:
        fc.fft_conv2d = lambda *a: calls.append(1) or orig(*a)
        conv(x)
        with torch.no_grad():
            conv.mask_params.copy_(torch.tensor([[0.0, 0.6], [0.0, 0.2]]))  # 61 x 27: spatial
        conv(x)
    finally:
        fc.fft_conv2d = orig
    assert calls == [1]


# ------------------------------------------------------------------------------------------------
# The anti-aliasing regulariser

def _reg_model():
    a = FlexConv2d(1, 1, kernel_size=17, hidden_dim=2, num_layers=1)
    b = FlexConv2d(1, 2, kernel_size=33, hidden_dim=2, num_layers=1)
    vals = {  # (filter W, filter gamma) per layer and filter, mask sigmas per layer
        'a': ([[[10., -3.], [4., 20.]], [[1., 0.], [0., 1.]]],
              [[[1., 8.], [2., 0.5]], [[1., 1.], [1., 1.]]], (0.1, 0.25)),
        'b': ([[[30., 1.], [-2., 5.]], [[12., -25.], [3., 3.]]],
              [[[6., 1.], [9., 2.]], [[0.5, 1.], [4., 3.]]], (0.5, -0.05)),
    }
    with torch.no_grad():
        for conv, key in ((a, 'a'), (b, 'b')):
            ws, gs, sig = vals[key]
            for l, filt in enumerate(conv.kernel_net.filters):
                filt.linear.weight.copy_(torch.tensor(ws[l]))
                filt.gamma.copy_(torch.tensor(gs[l]))
            conv.mask_params[:, 1] = torch.tensor(sig)
    return nn.Sequential(nn.Conv2d(1, 1, 1), a, nn.ReLU(), b), vals


def _reg_expected(vals, target, per_unit, S=2.0, factor=0.1):
    """The authors' regulariser by hand: f_l = max|W|/2pi + S max|gamma|/2pi (or per unit), + mask share, t = (k-1)/4/(L+1)."""
    total = 0.
    for key, k in (('a', 17), ('b', 33)):
        ws, gs, sig = vals[key]
        t = (k - 1) / 4 / 2
        for l in range(2):
            w_abs = [abs(v) for row in ws[l] for v in row]
            g_abs = [abs(v) for row in gs[l] for v in row]
            if per_unit:
                f = max(w + S * g for w, g in zip(w_abs, g_abs)) / (2 * math.pi)
            else:
                f = max(w_abs) / (2 * math.pi) + S * max(g_abs) / (2 * math.pi)
            if target == 'gabor+mask':
                f += S * max(1 / abs(s) for s in sig) / (2 * math.pi) / 2
            total += max(0., f - t) ** 2
    return factor * total


@pytest.mark.parametrize('target', ['gabor', 'gabor+mask'])
@pytest.mark.parametrize('per_unit', [False, True])
def test_regulariser_equals_spec_formula(target, per_unit):
    model, vals = _reg_model()
    r = anti_aliasing_penalty(model, target=target, per_unit=per_unit)
    assert r.item() == pytest.approx(_reg_expected(vals, target, per_unit), rel=1e-5)
    assert r.item() > 0
    r2 = anti_aliasing_penalty(model, target=target, per_unit=per_unit, gauss_stddevs=1.0, factor=2.0)
    assert r2.item() == pytest.approx(_reg_expected(vals, target, per_unit, S=1.0, factor=2.0), rel=1e-5)


def test_regulariser_default_is_the_authors_broadcasting_form():
    model, vals = _reg_model()
    conv = model[1]
    filt = conv.kernel_net.filters[0]
    # their expression: a (H, D, 1, 1) tensor plus an (H, D) tensor
    their = (filt.linear.weight.abs().view(2, 2, 1, 1) / (2 * math.pi) + 2.0 * filt.gamma.abs() / (2 * math.pi)).max()
    per_unit = (filt.linear.weight.abs() / (2 * math.pi) + 2.0 * filt.gamma.abs() / (2 * math.pi)).max()
    assert their.item() > per_unit.item()
    a_only = nn.Sequential(conv)
    t = 16 / 4 / 2
    r = anti_aliasing_penalty(a_only, factor=1.0)
    f1 = (1 / (2 * math.pi) + 2 / (2 * math.pi))  # second filter, below target
    assert f1 < t
    assert r.item() == pytest.approx((their.item() - t) ** 2, rel=1e-5)


def test_regulariser_gradients_and_kernel_size_override():
    model, vals = _reg_model()
    r = anti_aliasing_penalty(model, target='gabor+mask')
    r.backward()
    a = model[1]
    assert a.kernel_net.filters[0].linear.weight.grad.abs().sum() > 0
    assert a.kernel_net.filters[0].gamma.grad.abs().sum() > 0
    assert a.mask_params.grad[:, 1].abs().sum() > 0
    assert a.mask_params.grad[:, 0].abs().sum() == 0
    for name, p in model.named_parameters():
        if name.endswith(('.mu', 'bias')) or 'hidden' in name or 'output' in name:
            assert p.grad is None or p.grad.abs().sum() == 0, name
    model.zero_grad()
    anti_aliasing_penalty(model, target='gabor').backward()
    assert a.mask_params.grad is None or a.mask_params.grad.abs().sum() == 0
    # a larger horizon raises the target and lowers the penalty
    assert anti_aliasing_penalty(model, kernel_size=65).item() < anti_aliasing_penalty(model).item()


def test_regulariser_errors():
    model, _ = _reg_model()
    with pytest.raises(ValueError, match='target must be one of'):
        anti_aliasing_penalty(model, target='mask')
    with pytest.raises(ValueError, match="method must be 'together'"):
        anti_aliasing_penalty(model, method='distributed')
    with pytest.raises(ValueError, match='gauss_stddevs'):
        anti_aliasing_penalty(model, gauss_stddevs=0)
    with pytest.raises(ValueError, match='no FlexConv2d layer with a MAGNet kernel'):
        anti_aliasing_penalty(nn.Sequential(nn.Conv2d(1, 1, 3), CKConv2d(1, 1, 9)))
    with pytest.raises(ValueError, match="needs a masked FlexConv, but 0 has no mask"):
        anti_aliasing_penalty(nn.Sequential(CKConv2d(1, 1, 9, kernel_net='magnet')), target='gabor+mask')


# ------------------------------------------------------------------------------------------------
# Re-targeting a model's resolution (FlexConv and SMP layers)

def test_retarget_resolution_flexconv_and_smp():
    torch.manual_seed(0)
    model = nn.Sequential(
        FlexConv2d(2, 3, kernel_size=17, hidden_dim=8),
        SMPConv2d(3, 3, 17, n_points=6, normalize=True, shared_points=False, radius=0.2),
        SMPLargeKernel2d(3, 4, 17, small_kernel_size=3, normalize=True, n_points=5, radius=0.25),
    )
    with torch.no_grad():
        model[0].mask_params.copy_(torch.tensor([[0.0, 0.3], [0.1, 0.2]]))
    before = [pad_full(model[0].get_weight(), 17), model[1].get_weight(), model[2].smp.get_weight()]
    small_before = model[2].small_conv.weight.clone()
    retarget_resolution(model, 32, source_img_size=16)
    assert model[0].kernel_size == model[1].kernel_size == model[2].smp.kernel_size == model[2].kernel_size == 33
    after = [pad_full(model[0].get_weight(), 33), model[1].get_weight(), model[2].smp.get_weight()]
    for b, a in zip(before, after):
        torch.testing.assert_close(a[..., ::2, ::2] * 4, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[2].small_conv.weight, small_before)  # discrete: untouched
    y = model(torch.randn(1, 2, 32, 32))
    assert y.shape == (1, 4, 32, 32)


def test_retarget_resolution_errors():
    model = nn.Sequential(FlexConv2d(1, 1, kernel_size=17, hidden_dim=4))
    with pytest.raises(ValueError, match='pass source_img_size'):
        retarget_resolution(model, 32)
    with pytest.raises(ValueError, match='maps to 16 at 15 px; kernel sizes must stay odd'):
        retarget_resolution(model, 15, source_img_size=16)
    with pytest.raises(ValueError, match='must be square'):
        retarget_resolution(model, (32, 24), source_img_size=16)
    with pytest.raises(ValueError, match='no FlexConv or SMP layer'):
        retarget_resolution(nn.Sequential(nn.Conv2d(1, 1, 3)), 32, source_img_size=16)
    assert model[0].kernel_size == 17  # nothing applied on error


# ------------------------------------------------------------------------------------------------
# The branch's BatchNorm statistics at init

@pytest.mark.parametrize('cls,kwargs,shape', [
    (FlexConvBN2d, dict(kernel_net='siren', mask=False), (9, 9)),  # CKConv: the full 9 x 9 kernel
    (FlexConvBN2d, dict(mask_init=0.3), (9, 9)),  # masked MAGNet, cropped to 5 x 5
    (FlexConvBN1d, dict(mask_init=0.5), (12,)),  # causal 1-D, cropped
])
def test_bn_running_var_starts_at_the_conv_output_variance(cls, kwargs, shape):
    torch.manual_seed(0)
    branch = cls(3, 4, shape[0], hidden_dim=8, **kwargs)
    with torch.no_grad():
        w = branch.conv.get_weight()
    want = w.pow(2).flatten(1).sum(1) + w.flatten(2).sum(2).pow(2).sum(1)
    torch.testing.assert_close(branch.bn.running_var, want)
    assert not branch.bn.running_mean.any() and (want - 1).abs().max() > 0.5  # not BatchNorm's default 1
    # it is the output variance for unit inputs: a per-channel constant plus white noise, each N(0, 1), seen
    # at the position whose receptive field holds the whole kernel (the centre; the causal layer's last step)
    g = torch.Generator().manual_seed(1)
    n = 8000
    x = torch.randn(n, 3, *[1] * len(shape), generator=g) + torch.randn(n, 3, *shape, generator=g)
    with torch.no_grad():
        y = branch.conv(x)
    y = y[..., shape[0] // 2, shape[1] // 2] if len(shape) == 2 else y[..., -1]
    assert ((y.var(0) / want - 1).abs() < 0.06).all()  # the estimate's standard error is 1.6%
    # a train-mode forward moves the statistics; reset_running_stats brings back those of the current kernel
    branch.train()(x[:16])
    assert not torch.allclose(branch.bn.running_var, want)
    branch.reset_running_stats()
    torch.testing.assert_close(branch.bn.running_var, want)
    assert not branch.bn.running_mean.any() and branch.bn.num_batches_tracked == 0


# ------------------------------------------------------------------------------------------------
# Devices, dtypes and bad inputs

def test_meta_and_bf16():
    branch = FlexConvBN2d(3, 4, kernel_size=9, device='meta')  # no kernel to measure: the statistics stay meta
    assert branch.bn.running_var.is_meta
    branch = FlexConvBN2d(3, 4, kernel_size=9, kernel_net='siren', mask=False, dtype=torch.bfloat16)
    w = branch.conv.get_weight().float()
    want = w.pow(2).flatten(1).sum(1) + w.flatten(2).sum(2).pow(2).sum(1)
    assert branch.bn.running_var.dtype == torch.bfloat16
    torch.testing.assert_close(branch.bn.running_var.float(), want, rtol=1e-2, atol=0)
    conv = FlexConv2d(3, 4, kernel_size=9, device='meta')
    assert all(t.device.type == 'meta' for t in list(conv.parameters()) + list(conv.buffers()))
    assert conv(torch.empty(1, 3, 8, 8, device='meta')).shape == (1, 4, 8, 8)
    conv = FlexConv2d(3, 4, kernel_size=9).to(torch.bfloat16)
    assert conv(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    conv = FlexConv2d(3, 4, kernel_size=9, dtype=torch.float64)
    assert conv(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match='horizon.*odd int >= 3, got 32'):
        FlexConv2d(1, 1, kernel_size=32)
    with pytest.raises(ValueError, match='equal ints'):
        FlexConv2d(1, 1, kernel_size=(33, 17))
    with pytest.raises(ValueError, match="kernel_net must be one of"):
        FlexConv2d(1, 1, kernel_net='gabornet')
    with pytest.raises(ValueError, match='mask_threshold must be in'):
        FlexConv2d(1, 1, mask_threshold=15.0)
    with pytest.raises(ValueError, match='mask_init must be a finite number > 0'):
        FlexConv2d(1, 1, mask_init=0.)
    with pytest.raises(ValueError, match='sampling_rate_norm must be'):
        FlexConv2d(1, 1, sampling_rate_norm=-1.)
    with pytest.raises(ValueError, match="resize mode must be one of \\('stretch', 'none'\\)"):
        FlexConv2d(1, 1, resize_mode='extend')
    with pytest.raises(ValueError, match='in_channels must be an int >= 1'):
        FlexConv2d(0, 1)
    with pytest.raises(ValueError, match='MAGNet needs num_layers >= 1'):
        FlexConv2d(1, 1, num_layers=0)
    conv = FlexConv2d(3, 2, kernel_size=9, hidden_dim=4)
    with pytest.raises(ValueError, match=r'FlexConv2d expects \(N, 3, H, W\) inputs, got shape \[1, 2, 8, 8\]'):
        conv(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match='odd int >= 3, got 10'):
        conv.set_kernel_size(10)
    with pytest.raises(ValueError, match='odd kernel dims'):
        fft_conv2d(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 4, 3))
