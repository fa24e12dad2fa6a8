""" FlexNet-16, SMP FlexNet-16 and CKCNN-16 as timm models: parameter counts, the timm model API,
reparameterization, the authors' checkpoints, cross-resolution deployment, regulariser, optimizer groups.

The authors' weights are not available here, so the checkpoint tests write state dicts in their layout
(the authors' key names and shapes, random values) and compare our logits with an
independent functional evaluation written the way their modules compute (MAGNet as 1x1 convs over the
position grid, the literal cropping rule, SMP kernels rendered on the 'ij' grid then transposed and flipped).
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import check_timm_model_contract, fx_model, random_bn_entries
from timm.layers import set_scriptable
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401  (registers the models)
from timm_smpconv import anti_aliasing_penalty, param_groups_smp, retarget_resolution
from timm_smpconv.layers import FlexConv2d, randomize_bn_stats_
from timm_smpconv.layers.smp_conv import _SMPConvNd, _SMPLargeKernelNd
from timm_smpconv.ops import conv_impl

MODELS = ['flexnet_16', 'smp_flexnet_16', 'ckcnn_16']
PARAMS = {'flexnet_16': 671_650, 'smp_flexnet_16': 489_646, 'ckcnn_16': 627_910}
SMALL = dict(stem_width=4, widths=(4, 6, 6), img_size=8)  # few channels where the exact network is not needed
BLOCKS = [(24, 24), (24, 24), (24, 36), (36, 36), (36, 36), (36, 48), (48, 48)]
TAU_C = math.sqrt(-2 * math.log(0.1))


def pad_full(kernel, k):
    """Zero-pad a cropped (possibly non-square) kernel back to the full k x k grid, centred per axis."""
    ph, pw = (k - kernel.shape[-2]) // 2, (k - kernel.shape[-1]) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def rel_err(a, b):
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# Registration and parameter counts

def test_registered_with_timm():
    assert sorted(timm.list_models(module='flexnet')) == sorted(MODELS)
    assert set(timm.list_models('*', include_tags=True)) >= {m + '.untrained' for m in MODELS}


@pytest.mark.parametrize('name', MODELS)
def test_parameter_counts_equal_the_authors(name):
    assert n_params(timm.create_model(name, device='meta')) == PARAMS[name]


def test_parameter_counts_per_part():
    m = timm.create_model('flexnet_16', device='meta')
    assert n_params(m.stem) == 6468 + 48
    assert [n_params(b) for b in m.blocks] == [46296, 46296, 80532, 93888, 93888, 143256, 160488]
    assert n_params(m.head) == 490
    # related counts measured on the authors' code: CKCNN with a MAGNet kernel and no mask; FlexNet-5 for ImageNet-32
    assert n_params(timm.create_model('ckcnn_16', conv_kwargs=dict(kernel_net='magnet'), device='meta')) == 671_590
    assert n_params(timm.create_model('flexnet_16', stem_width=22, widths=(22, 33, 33, 44, 44), num_classes=1000,
                                      device='meta')) == 498_596
    s = timm.create_model('smp_flexnet_16', device='meta')
    assert n_params(s.stem) == 3072
    assert [n_params(b) for b in s.blocks] == [31296, 31296, 58644, 68544, 68544, 107568, 120192]


@pytest.mark.parametrize('points,expected', [(4, 250_318), (8, 330_094), (16, 489_646), (32, 808_750),
                                             (64, 1_446_958)])
def test_smp_points_ablation(points, expected):
    assert n_params(timm.create_model('smp_flexnet_16', n_points=points, device='meta')) == expected


# ------------------------------------------------------------------------------------------------
# The timm model API

@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_and_api_contract_on_meta(name):
    """timm's test_model_default_cfgs, on the meta device, with the exact networks."""
    model, cfg, x = check_timm_model_contract(name, resize_input=16)
    assert cfg['input_size'] == (3, 32, 32) and cfg['num_classes'] == 10
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert model.num_classes == 10 and model.in_chans == cfg['input_size'][0]
    assert model.num_features == model.head_hidden_size == 48
    assert tuple(model.forward_features(x).shape[2:]) == cfg['pool_size'] == (32, 32)
    assert timm.create_model(name, device='meta', num_classes=0)(x).shape == (1, 48)


@pytest.mark.parametrize('name', MODELS)
def test_bf16_and_no_weight_decay(name):
    model = timm.create_model(name, **SMALL).to(torch.bfloat16)
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    expected = {'flexnet_16': {'*.mask_params'}, 'smp_flexnet_16': {'*.radius'}, 'ckcnn_16': set()}[name]
    assert model.no_weight_decay() == expected


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, drop_rate=0.1, drop_path_rate=0.1, **SMALL).train()
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.numel() == p.numel(), n
    one = model.eval()(torch.randn(1, 3, 8, 8))
    assert one.shape == (1, 42)  # not squeezed, unlike the authors' output


def test_dropouts_and_drop_path():
    m = timm.create_model('flexnet_16', device='meta')
    assert [b.drop.p for b in m.blocks] == [0.2] * 7 and m.head.drop.p == 0.
    assert all(isinstance(b.drop_path, nn.Identity) for b in m.blocks)
    s = timm.create_model('smp_flexnet_16', device='meta', drop_rate=0.3, drop_path_rate=0.2, block_drop_rate=0.05)
    assert [b.drop.p for b in s.blocks] == [0.05] * 7 and s.head.drop.p == 0.3
    assert s.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_grad_checkpointing_really_checkpoints(monkeypatch):
    import timm_smpconv.models.flexnet as fn
    calls = []
    real = fn.checkpoint_seq
    monkeypatch.setattr(fn, 'checkpoint_seq', lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = timm.create_model('flexnet_16', num_classes=3, **SMALL).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, ref)
    model.train()
    model(x).sum().backward()
    assert model.stem.conv.mask_params.grad is not None


@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    with set_scriptable(True):
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), conv_impl('direct'):  # scripted models convolve directly; compare like with like
        torch.testing.assert_close(scripted(x), model(x))




@pytest.mark.parametrize('name', MODELS)
def test_fx_forward_and_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **SMALL).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    out = fx_model(model, train=False)(x)
    out = out[next(iter(out))] if isinstance(out, dict) else out
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    fx_train = fx_model(model, train=True)
    out = fx_train(torch.randn(2, 3, 8, 8))
    out = out[next(iter(out))] if isinstance(out, dict) else out
    out.mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


def test_features_only_intermediates_and_prune():
    torch.manual_seed(0)
    kw = dict(SMALL)
    feat = timm.create_model('flexnet_16', features_only=True, **kw).eval()
    assert feat.feature_info.reduction() == [1, 1, 1] and feat.feature_info.channels() == [4, 6, 6]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        fs = feat(x)
    assert [tuple(f.shape) for f in fs] == [(1, 4, 8, 8), (1, 6, 8, 8), (1, 6, 8, 8)]
    torch.manual_seed(0)
    model = timm.create_model('flexnet_16', **kw).eval()  # same seed: the same weights
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for a, b in zip(inter, fs):
            torch.testing.assert_close(a, b)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1])
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final)
    getter = timm.create_model('flexnet_16', features_only=True, feature_cls='getter', out_indices=(0, 2), **kw)
    assert [f.shape[1] for f in getter.eval()(x)] == [4, 6]
    sub = timm.create_model('smp_flexnet_16', features_only=True, out_indices=(1,), **kw).eval()
    assert sub(x)[0].shape == (1, 6, 8, 8)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.blocks) == 2 and model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[1], inter[1])
    default = timm.create_model('flexnet_16', features_only=True, device='meta')
    assert default.feature_info.reduction() == [1] * 7
    assert default.feature_info.channels() == [24, 24, 36, 36, 36, 48, 48]


def test_create_model_kwargs():
    m = timm.create_model('flexnet_16', num_classes=100, in_chans=1, global_pool='max', device='meta',
                          dtype=torch.bfloat16, conv_kwargs=dict(mask_init=0.1, hidden_dim=16))
    assert m.num_classes == 100 and m.in_chans == 1 and m.stem.conv.in_channels == 1
    assert m.head.global_pool.pool_type == 'max' and m.stem.conv.mask_init == 0.1
    assert m.stem.conv.kernel_net.hidden_dim == 16
    assert m(torch.empty(2, 1, 32, 32, device='meta', dtype=torch.bfloat16)).shape == (2, 100)
    s = timm.create_model('smp_flexnet_16', conv_kwargs=dict(radius=0.18), device='meta')
    assert s.stem.smp.init_radius == 0.18 and s.stem.small_conv.bias is not None
    assert s.blocks[0].conv1.small_conv.bias is None and s.stem.smp.normalize and not s.stem.smp.shared_points
    assert s.stem.smp.kernel_size == 33 and s.stem.small_conv.kernel_size == (3, 3)
    assert timm.create_model('flexnet_16', img_size=16, device='meta').stem.conv.kernel_size == 17
    assert timm.create_model('flexnet_16', kernel_size=21, device='meta').blocks[3].conv2.conv.kernel_size == 21


def test_bad_model_arguments():
    with pytest.raises(ValueError, match='conv_type must be one of'):
        timm.create_model('flexnet_16', conv_type='gabor', device='meta')
    with pytest.raises(ValueError, match="n_points applies to conv_type='smp' only"):
        timm.create_model('flexnet_16', n_points=8, device='meta')
    with pytest.raises(ValueError, match='img_size must be an even int'):
        timm.create_model('flexnet_16', img_size=31, device='meta')
    with pytest.raises(ValueError, match='img_size must be square'):
        timm.create_model('flexnet_16', img_size=(32, 16), device='meta')
    with pytest.raises(ValueError, match='sampling_rate_norm applies to FlexConv'):
        timm.create_model('smp_flexnet_16', sampling_rate_norm=0.25, device='meta')
    with pytest.raises(ValueError, match='horizon.*odd'):
        timm.create_model('flexnet_16', kernel_size=32, device='meta')
    with pytest.raises(ValueError, match='widths must list'):
        timm.create_model('flexnet_16', widths=(), device='meta')


# ------------------------------------------------------------------------------------------------
# Reparameterization

def _spread_masks(model, seed=0):
    """Varied (non-square) crops instead of the 5 x 5 init ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FlexConv2d) and m.mask_params is not None:
                m.mask_params[:, 0] = (torch.rand(2, generator=g) - 0.5) * 0.2
                m.mask_params[:, 1] = torch.rand(2, generator=g) * 0.4 + 0.07


@pytest.mark.parametrize('name', MODELS)
def test_reparameterize_whole_network(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=16)
    _spread_masks(model)
    randomize_bn_stats_(model)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        fused = reparameterize_model(model)
        y_fused = fused(x)
    err = rel_err(y_fused, y)
    print(f'{name}: reparameterized max |dlogit| / max |logit| = {err:.2e}')
    assert err <= 1e-4
    kinds = {type(m) for m in fused.modules()}
    assert not any(issubclass(k, (FlexConv2d, _SMPConvNd, _SMPLargeKernelNd, nn.modules.batchnorm._BatchNorm))
                   for k in kinds)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    sizes = {c.kernel_size for c in convs}
    if name == 'flexnet_16':
        assert any(a != b for a, b in sizes)  # cropped, non-square kernels
    else:
        assert (17, 17) in sizes
    with torch.no_grad():
        with conv_impl('direct'):  # scripted convs are direct; compare like with like
            torch.testing.assert_close(torch.jit.script(fused)(x), fused(x))
    assert isinstance(model.blocks[0].conv1.bn if name != 'smp_flexnet_16' else model.blocks[0].conv1.smp_bn,
                      nn.BatchNorm2d)  # the original is untouched


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints: builders of their layout and independent evaluations



def _uniform(shape, bound, g):
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


FLEX_MASKS = {  # mean0, sigma0, mean1, sigma1: varied crops at horizon 33 (33 x 21 and 15 x 23 among them)
    'cconv1.': (0.0, 0.5, 0.0, 0.3), 'blocks.0.cconv1.': (0.05, 0.2, -0.1, 0.3),
    'blocks.2.cconv2.': (0.0, 0.1, 0.02, 0.2)}


def _flexconv_sd(sd, F_, cin, cout, g, train_length):
    H = 32
    sd[F_ + 'bias'] = torch.randn(cout, generator=g) * 0.1
    r1, r2 = torch.rand(2, generator=g).tolist()
    m0, s0, m1, s1 = FLEX_MASKS.get(F_, (r1 * 0.1 - 0.05, 0.075 + 0.05 * r2, 0.0, 0.08))  # mostly small crops
    sd[F_ + 'mask_params'] = torch.tensor([[m0, s0], [m1, s1]])
    sd[F_ + 'train_length'] = torch.tensor([train_length], dtype=torch.int32)
    sd[F_ + 'temperature'] = torch.tensor([15.0])
    sd[F_ + 'mask_threshold'] = torch.tensor([0.1])
    for l in range(3):
        sd[F_ + f'Kernel.linear.{l}.weight'] = _uniform((H, H, 1, 1), math.sqrt(1 / H), g)
        sd[F_ + f'Kernel.linear.{l}.bias'] = _uniform((H,), 1 / math.sqrt(H), g)
    sd[F_ + 'Kernel.output_linear.weight'] = _uniform((cout * cin, H, 1, 1), 1 / math.sqrt(H), g)
    sd[F_ + 'Kernel.output_linear.bias'] = _uniform((cout * cin,), 1 / math.sqrt(H), g)
    for l in range(4):
        gamma = torch._standard_gamma(torch.full((H, 2), 6.0 / (l + 1)), generator=g)
        sd[F_ + f'Kernel.filters.{l}.mu'] = _uniform((H, 2), 0.125, g)
        sd[F_ + f'Kernel.filters.{l}.gamma'] = gamma
        w = _uniform((H, 2), 1 / math.sqrt(2), g) * 12.8 * gamma
        sd[F_ + f'Kernel.filters.{l}.linear.weight'] = w.view(H, 2, 1, 1)
        sd[F_ + f'Kernel.filters.{l}.linear.bias'] = _uniform((H,), math.pi, g)


def _shortcut_sd(sd, p, cin, cout, g):
    """The authors' 1x1 shortcut of a block that changes width."""
    sd[p + 'shortcut.0.weight'] = torch.randn(cout, cin, 1, 1, generator=g) / math.sqrt(cin)
    sd[p + 'shortcut.0.bias'] = torch.randn(cout, generator=g) * 0.1


def _out_layer_sd(sd, g):
    """The authors' 1x1 output layer (48 -> 10 classes)."""
    sd['out_layer.weight'] = torch.randn(10, 48, 1, 1, generator=g) * math.sqrt(2 / 48)
    sd['out_layer.bias'] = torch.randn(10, generator=g) * 0.1


def flexnet_authors_sd(seed=0, train_length=33):
    """FlexNet-16 in the authors' layout (their saved state dict)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _flexconv_sd(sd, 'cconv1.', 3, 24, g, train_length)
    random_bn_entries(sd, 'norm1.', 24, g)
    for i, (cin, cout) in enumerate(BLOCKS):
        p = f'blocks.{i}.'
        _flexconv_sd(sd, p + 'cconv1.', cin, cout, g, train_length)
        _flexconv_sd(sd, p + 'cconv2.', cout, cout, g, train_length)
        random_bn_entries(sd, p + 'norm1.', cout, g)
        random_bn_entries(sd, p + 'norm2.', cout, g)
        if cin != cout:
            _shortcut_sd(sd, p, cin, cout, g)
    _out_layer_sd(sd, g)
    return sd


def _ref_bn(t, sd, p):
    return F.batch_norm(t, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                        False, 0., 1e-5)


def ref_flexconv(x, sd, F_, k, norm):
    """Their FlexConv at horizon k (train_length reset), their algorithm literally."""
    lin = torch.linspace(-1, 1, k)
    mp = sd[F_ + 'mask_params']
    rs = [max(abs(float(m - s * TAU_C)), abs(float(m + s * TAU_C))) for m, s in mp]
    axes = [lin, lin]
    if rs[0] < 1 or rs[1] < 1:
        axes = []
        for r in rs:
            if r >= 1:
                axes.append(lin)
            else:
                i = next(i for i in range(k // 2 + 1) if lin[i] > -r)
                axes.append(lin[i:k - i])
    grid = torch.stack(torch.meshgrid(*axes, indexing='ij')).unsqueeze(0)  # (1, 2, h, w)
    H = 32

    def gabor(l):
        p = F_ + f'Kernel.filters.{l}.'
        mu, gamma = sd[p + 'mu'].view(1, H, 2, 1, 1), sd[p + 'gamma'].view(1, H, 2, 1, 1)
        env = torch.exp(-0.5 * ((gamma * (grid.unsqueeze(1) - mu)) ** 2).sum(2))
        return env * torch.sin(F.conv2d(grid, sd[p + 'linear.weight'], sd[p + 'linear.bias']))

    z = gabor(0)
    for l in range(3):
        z = gabor(l + 1) * F.conv2d(z, sd[F_ + f'Kernel.linear.{l}.weight'], sd[F_ + f'Kernel.linear.{l}.bias'])
    out = F.conv2d(z, sd[F_ + 'Kernel.output_linear.weight'], sd[F_ + 'Kernel.output_linear.bias'])
    h, w = grid.shape[-2:]
    kernel = out.view(-1, x.shape[1], h, w) * norm
    mask = torch.exp(-0.5 * (((grid[0, 0] - mp[0, 0]) / mp[0, 1]) ** 2 + ((grid[0, 1] - mp[1, 0]) / mp[1, 1]) ** 2))
    kernel = kernel * mask
    return F.conv2d(x, kernel, sd[F_ + 'bias'], padding=(h // 2, w // 2))


def ref_flexnet(sd, x, k, norm=1.0):
    y = F.relu(_ref_bn(ref_flexconv(x, sd, 'cconv1.', k, norm), sd, 'norm1.'))
    for i in range(7):
        p = f'blocks.{i}.'
        s = F.conv2d(y, sd[p + 'shortcut.0.weight'], sd[p + 'shortcut.0.bias']) if p + 'shortcut.0.weight' in sd else y
        h = F.relu(_ref_bn(ref_flexconv(y, sd, p + 'cconv1.', k, norm), sd, p + 'norm1.'))
        y = F.relu(_ref_bn(ref_flexconv(h, sd, p + 'cconv2.', k, norm), sd, p + 'norm2.') + s)
    y = y.mean((2, 3), keepdim=True)
    return F.conv2d(y, sd['out_layer.weight'], sd['out_layer.bias']).flatten(1)


def smp_authors_sd(seed=0, train_length=17, conv_bias=False, n_points=16):
    """The SMP CIFAR model in the authors' layout (their saved state dict)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def smp(prefix, cin, cout):
        sd[prefix + 'train_length'] = torch.tensor([train_length], dtype=torch.int32)
        sd[prefix + 'Kernel.weight_coord'] = (torch.randn(cout, n_points, 2, generator=g) * 0.4).clamp(-0.9, 0.9)
        sd[prefix + 'Kernel.radius'] = torch.rand(cout, n_points, 1, 1, generator=g) * 0.3 + 0.15
        sd[prefix + 'Kernel.weights'] = torch.randn(cout, cin, n_points, generator=g) * 0.3
        if conv_bias:
            sd[prefix + 'bias'] = torch.randn(cout, generator=g) * 0.3

    smp('cconv1.', 3, 24)
    sd['cconv1s.weight'] = torch.randn(24, 3, 3, 3, generator=g) * 0.2
    sd['cconv1s.bias'] = torch.randn(24, generator=g) * 0.1
    random_bn_entries(sd, 'norm1.', 24, g)
    random_bn_entries(sd, 'norm1s.', 24, g)
    for i, (cin, cout) in enumerate(BLOCKS):
        p = f'blocks.{i}.'
        smp(p + 'cconv1.', cin, cout)
        smp(p + 'cconv2.', cout, cout)
        sd[p + 'cconv1s.weight'] = torch.randn(cout, cin, 3, 3, generator=g) / math.sqrt(9 * cin)
        sd[p + 'cconv2s.weight'] = torch.randn(cout, cout, 3, 3, generator=g) / math.sqrt(9 * cout)
        for n in ('norm1.', 'norm2.', 'norm1s.', 'norm2s.'):
            random_bn_entries(sd, p + n, cout, g)
        if cin != cout:
            _shortcut_sd(sd, p, cin, cout, g)
    _out_layer_sd(sd, g)
    return sd


def ref_smp_kernel(sd, S, k):
    """Their SMPKernel: count-normalised tents on the 'ij' grid from (c0, c1), then W[a, b] = A[b, k-1-a]."""
    coord, radius, weights = sd[S + 'Kernel.weight_coord'], sd[S + 'Kernel.radius'], sd[S + 'Kernel.weights']
    cout, n_pts = coord.shape[:2]
    lin = torch.linspace(-1, 1, k)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing='ij')).reshape(1, 1, 2, k * k)
    dist = (grid - coord.unsqueeze(-1)).abs().sum(2)  # (Cout, P, k*k)
    gv = F.relu(1 - dist / radius.view(cout, n_pts, 1))
    gv = gv / ((gv != 0).sum(1, keepdim=True) + 1e-6)
    a = torch.einsum('oip,opq->oiq', weights, gv).reshape(cout, -1, k, k)
    return a.transpose(-1, -2).flip(-2)


def ref_smp_net(sd, x, k):
    def smp(t, S):
        w = ref_smp_kernel(sd, S, k)
        return F.conv2d(t, w, sd.get(S + 'bias'), padding=k // 2)

    y = F.relu(_ref_bn(smp(x, 'cconv1.'), sd, 'norm1.')
               + _ref_bn(F.conv2d(x, sd['cconv1s.weight'], sd['cconv1s.bias'], padding=1), sd, 'norm1s.'))
    for i in range(7):
        p = f'blocks.{i}.'
        s = F.conv2d(y, sd[p + 'shortcut.0.weight'], sd[p + 'shortcut.0.bias']) if p + 'shortcut.0.weight' in sd else y
        h = F.relu(_ref_bn(smp(y, p + 'cconv1.'), sd, p + 'norm1.')
                   + _ref_bn(F.conv2d(y, sd[p + 'cconv1s.weight'], padding=1), sd, p + 'norm1s.'))
        y = F.relu(_ref_bn(smp(h, p + 'cconv2.'), sd, p + 'norm2.')
                   + _ref_bn(F.conv2d(h, sd[p + 'cconv2s.weight'], padding=1), sd, p + 'norm2s.') + s)
    y = y.mean((2, 3), keepdim=True)
    return F.conv2d(y, sd['out_layer.weight'], sd['out_layer.bias']).flatten(1)


def _n_authors_params(sd):
    buffers = ('running_mean', 'running_var', 'num_batches_tracked', 'train_length', 'temperature', 'mask_threshold')
    return sum(v.numel() for k, v in sd.items() if not k.endswith(buffers))


def load(name, obj, tmp_path, **kwargs):
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


@pytest.fixture(scope='module')
def flex_sd():
    return flexnet_authors_sd()


@pytest.fixture(scope='module')
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_authors_layouts_match_spec_counts(flex_sd):
    assert _n_authors_params(flex_sd) == 671_650
    assert flex_sd['blocks.5.cconv2.Kernel.output_linear.weight'].shape == (2304, 32, 1, 1)
    assert _n_authors_params(smp_authors_sd()) == 489_646
    assert _n_authors_params(smp_authors_sd(conv_bias=True)) == 490_174


@pytest.mark.parametrize('wrapper', ['model', 'module_prefix'])
def test_authors_flexnet_checkpoint_gives_reference_logits(tmp_path, flex_sd, x32, wrapper):
    obj = ({'model': flex_sd, 'optimizer': {}, 'epoch': 349} if wrapper == 'model'
           else {'model': {'module.' + k: v for k, v in flex_sd.items()}})
    model = load('flexnet_16', obj, tmp_path)
    with torch.no_grad():
        ours, ref = model(x32), ref_flexnet(flex_sd, x32, 33)
    assert rel_err(ours, ref) <= 1e-5
    # the crops are the varied ones the checkpoint asks for
    assert model.stem.conv.get_weight().shape[-2:] == (33, 21)
    assert model.blocks[0].conv1.conv.get_weight().shape[-2:] == (15, 23)


def test_authors_flexnet_16px_checkpoint_at_32px_and_16px(tmp_path, x32):
    """Their cross-res protocol: weights trained at 16 px (train_length 17) deployed at 32 px = horizon 33,
    kernel_sampling_rate_norm 0.25; our img_size=32 does it on load."""
    sd = flexnet_authors_sd(seed=3, train_length=17)
    model = load('flexnet_16', {'model': sd}, tmp_path, img_size=32)
    assert model.stem.conv.kernel_size == 33 and model.stem.conv.sampling_rate_norm.item() == pytest.approx(0.25)
    with torch.no_grad():
        assert rel_err(model(x32), ref_flexnet(sd, x32, 33, norm=0.25)) <= 1e-5
    small = load('flexnet_16', {'model': sd}, tmp_path, img_size=16)
    x16 = F.interpolate(x32, size=16, mode='bilinear', align_corners=False)
    with torch.no_grad():
        assert rel_err(small(x16), ref_flexnet(sd, x16, 17)) <= 1e-5
    # their fine-tuned checkpoints (train_length 33, trained with factor 0.25) need the factor given
    tuned = flexnet_authors_sd(seed=4, train_length=33)
    model = load('flexnet_16', {'model': tuned}, tmp_path, sampling_rate_norm=0.25)
    with torch.no_grad():
        assert rel_err(model(x32), ref_flexnet(tuned, x32, 33, norm=0.25)) <= 1e-5


def test_authors_smp_checkpoint_gives_reference_logits(tmp_path):
    x16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for conv_bias in (False, True):
        sd = smp_authors_sd(seed=1, train_length=17, conv_bias=conv_bias)
        model = load('smp_flexnet_16', {'model': sd}, tmp_path, img_size=16)
        with torch.no_grad():
            ours, ref = model(x16), ref_smp_net(sd, x16, 17)
        assert rel_err(ours, ref) <= 1e-5, conv_bias
        torch.testing.assert_close(model.blocks[3].conv2.smp.get_weight(), ref_smp_kernel(sd, 'blocks.3.cconv2.', 17))
    # train_length 17 into a 32-px model: the SMP kernels are re-sampled at 33 with weights x 0.25
    big = load('smp_flexnet_16', {'model': sd}, tmp_path, img_size=32)
    k33 = big.blocks[5].conv1.smp.get_weight()
    torch.testing.assert_close(k33[..., ::2, ::2] * 4, ref_smp_kernel(sd, 'blocks.5.cconv1.', 17), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big.blocks[5].conv1.small_conv.weight, sd['blocks.5.cconv1s.weight'])


def test_authors_checkpoint_new_classes_and_gray_input(tmp_path, flex_sd, x32):
    model = load('flexnet_16', {'model': flex_sd}, tmp_path, num_classes=5)
    assert model.get_classifier().weight.shape == (5, 48)
    torch.testing.assert_close(model.blocks[6].conv1.bn.running_var, flex_sd['blocks.6.norm1.running_var'])
    gray = load('flexnet_16', {'model': flex_sd}, tmp_path, in_chans=1)
    g = x32[:, :1]
    with torch.no_grad():  # summed stem kernel on a gray image == the RGB network on the replicated image
        assert rel_err(gray(g), ref_flexnet(flex_sd, g.expand(-1, 3, -1, -1), 33)) <= 1e-5
    sd = smp_authors_sd(seed=2)
    gray = load('smp_flexnet_16', {'model': sd}, tmp_path, in_chans=1, img_size=16)
    g16 = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert rel_err(gray(g16), ref_smp_net(sd, g16.expand(-1, 3, -1, -1), 17)) <= 1e-5
    two = load('flexnet_16', {'model': flex_sd}, tmp_path, in_chans=2, num_classes=0)
    assert two(torch.randn(1, 2, 16, 16)).shape == (1, 48)


def test_bad_checkpoints_raise_clear_errors(tmp_path, flex_sd):
    sd = dict(flex_sd)
    del sd['blocks.2.cconv2.Kernel.filters.3.gamma']
    sd['blocks.9.cconv1.bias'] = torch.zeros(3)
    sd['blocks.1.shortcut.0.weight'] = torch.zeros(24, 24, 1, 1)
    sd['blocks.4.cconv1.Kernel.linear.0.weight'] = torch.zeros(16, 32, 1, 1)
    with pytest.raises(ValueError) as err:
        load('flexnet_16', {'model': sd}, tmp_path)
    msg = str(err.value)
    assert 'does not fit the FlexNet' in msg
    assert 'missing keys: blocks.2.conv2.conv.kernel_net.filters.3.gamma' in msg
    assert 'unexpected keys: blocks.9.conv1.conv.bias, blocks.1.shortcut.weight' in msg
    assert 'blocks.4.conv1.conv.kernel_net.hidden.0.weight: checkpoint (16, 32) vs model (32, 32)' in msg
    with pytest.raises(ValueError, match="an authors' SMP model, which does not fit conv_type='flexconv'"):
        load('flexnet_16', {'model': smp_authors_sd()}, tmp_path)
    with pytest.raises(ValueError, match="FlexConv \\(MAGNet\\) model, which does not fit conv_type='smp'"):
        load('smp_flexnet_16', {'model': flex_sd}, tmp_path)
    sd = dict(flex_sd)
    sd['blocks.3.cconv2.mask_threshold'] = torch.tensor([0.2])
    with pytest.raises(ValueError, match='blocks.3.cconv2.mask_threshold = 0.2.* mask_threshold=0.1'):
        load('flexnet_16', {'model': sd}, tmp_path)
    bad = tmp_path / 'corrupt.pth'
    torch.save({'model': flex_sd}, bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=r'could not load pretrained weights for flexnet_16 .*corrupt\.pth'):
        timm.create_model('flexnet_16', pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    with pytest.raises(RuntimeError, match='flexnet_16 ships no pretrained weights'):
        timm.create_model('flexnet_16', pretrained=True)


# ------------------------------------------------------------------------------------------------
# Cross-resolution deployment with our own models and checkpoints

def _continuous(model):
    return [m for m in model.modules() if isinstance(m, (FlexConv2d, _SMPConvNd))]


@pytest.mark.parametrize('name', ['flexnet_16', 'smp_flexnet_16'])
def test_model_built_at_16px_retargeted_to_32px(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=16).eval()
    _spread_masks(model)
    randomize_bn_stats_(model)
    k16 = [pad_full(m.get_weight(), 17) for m in _continuous(model)]
    torch.save(model.state_dict(), tmp_path / 'src.pth')
    model.set_input_size(32)
    assert model.img_size == 32 and {m.kernel_size for m in _continuous(model)} == {33}
    k32 = [pad_full(m.get_weight(), 33) for m in _continuous(model)]
    for a, b in zip(k32, k16):  # the same continuous kernels, sampled twice as densely, values x 1/4
        torch.testing.assert_close(a[..., ::2, ::2] * 4, b, rtol=1e-5, atol=1e-6)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    # the same at creation time, from the 16-px weights
    created = timm.create_model(name, img_size=32, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'src.pth'))).eval()
    with torch.no_grad():  # (the BatchNorms' kernel-scale factors reach the same value by another float32 route)
        torch.testing.assert_close(created(x), y, rtol=1e-5, atol=1e-5)
    # a re-targeted model saves its calibration: reloading into a 32-px model changes nothing,
    # into a 16-px model restores the original
    torch.save(model.state_dict(), tmp_path / 'tgt.pth')
    tgt = dict(file=str(tmp_path / 'tgt.pth'))
    again = timm.create_model(name, img_size=32, pretrained=True, pretrained_cfg_overlay=tgt)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), y)
    back = timm.create_model(name, img_size=16, pretrained=True, pretrained_cfg_overlay=tgt)
    for a, b in zip([pad_full(m.get_weight(), 17) for m in _continuous(back)], k16):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match='img_size must be an even int'):
        model.set_input_size(31)
    retarget_resolution(model, 16)
    assert model.img_size == 16


# ------------------------------------------------------------------------------------------------
# Regulariser on the real network, optimizer groups

def test_regulariser_on_flexnet_16_at_init():
    """A run of the authors' code measured R ~ 841 ('gabor') and ~ 977 ('gabor+mask') at init for FlexNet-16 at res 17."""
    torch.manual_seed(0)
    model = timm.create_model('flexnet_16', img_size=16)
    r_g = anti_aliasing_penalty(model, target='gabor').item()
    r_gm = anti_aliasing_penalty(model, target='gabor+mask').item()
    print(f'R at init (res 17): gabor {r_g:.1f}, gabor+mask {r_gm:.1f}')
    assert 600 < r_g < 1200 and 100 < r_gm - r_g < 200
    # after re-targeting to 32 px the target doubles (t = 2.0), the penalty drops
    retarget_resolution(model, 32)
    assert anti_aliasing_penalty(model, target='gabor').item() < r_g - 100
    assert anti_aliasing_penalty(model, target='gabor', kernel_size=17).item() == pytest.approx(r_g, rel=1e-6)


@pytest.mark.parametrize('name,slow_param', [('flexnet_16', 'mask_params'), ('smp_flexnet_16', 'radius')])
def test_reduced_lr_group(name, slow_param):
    model = timm.create_model(name, **SMALL)
    opt = create_optimizer_v2(model, opt='adam', lr=1e-2, weight_decay=1e-5, param_group_fn=param_groups_smp)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=2, warmup_lr=0.,
                                   min_lr=1e-6, step_on_epochs=False, updates_per_epoch=5)
    slow = [p for n, p in model.named_parameters() if n.endswith(slow_param)]
    assert len(slow) == 1 + 2 * 3  # stem + two per block

    def group(p):
        return next(g for g in opt.param_groups if any(q is p for q in g['params']))

    for step in (1, 4, 30):
        sched.step_update(step)
        base = group(model.head.fc.weight)['lr']
        for p in slow:
            assert group(p)['lr'] == pytest.approx(0.1 * base) and group(p)['weight_decay'] == 0
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))
