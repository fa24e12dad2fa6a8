""" SMPConvNet models against the checks timm applies to every model it ships (tests/test_models.py of timm),
written here because timm's own test file is not part of its wheel. Small inputs keep CI fast. """

import pytest
import timm
import torch
import torch.nn as nn
from helpers import check_timm_model_contract, fx_model
from timm.layers import set_scriptable
from timm.models import group_parameters
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401  (registers the models)
from timm_smpconv.layers import randomize_bn_stats_
from timm_smpconv.layers.smp_conv import _SMPConvNd, _SMPLargeKernelNd
from timm_smpconv.ops import conv_impl

MODELS = ['smpconv_t', 'smpconv_b', 'smpconv_mobile31', 'smpconv_mobile51']
PARAMS = {'smpconv_t': 26_705_248, 'smpconv_b': 79_546_520, 'smpconv_mobile31': 2_892_494,
          'smpconv_mobile51': 3_066_884}
SIZE = 64  # small input for CPU tests; all four models reduce by 32 -> 2x2 final maps


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered_with_timm_on_import():
    assert sorted(timm.list_models(module='smpconv')) == sorted(MODELS)
    assert set(timm.list_models('smpconv*', include_tags=True)) >= {m + '.untrained' for m in MODELS}


@pytest.mark.parametrize('name', MODELS)
def test_parameter_counts_equal_the_authors(name):
    model = timm.create_model(name, device='meta')
    assert n_params(model) == PARAMS[name]


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_and_api_contract_on_meta(name):
    """timm's test_model_default_cfgs, on the meta device."""
    model, cfg, _ = check_timm_model_contract(name)
    assert len(group_parameters(model, model.group_matcher(coarse=True))) > 1
    assert model.num_classes == cfg['num_classes'] == 1000


@pytest.mark.parametrize('name', MODELS)
def test_forward_and_grad_checkpointing(name):
    """timm's test_model_forward: eval forward, no NaN, unchanged with grad checkpointing."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 1000) and not torch.isnan(out).any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_backward_reaches_every_parameter(name):
    """timm's test_model_backward: num_classes=42, train mode, batch 2."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, drop_path_rate=0.1, drop_rate=0.1).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 42)
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert p.grad.numel() == p.numel(), n


def test_grad_checkpointing_really_checkpoints(monkeypatch):
    import timm_smpconv.models.smpconv as smp_models
    calls = []
    real = smp_models.checkpoint_seq
    monkeypatch.setattr(smp_models, 'checkpoint_seq', lambda *a, **k: calls.append(1) or real(*a, **k))
    model = timm.create_model('smpconv_mobile31', num_classes=3).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(0)
    ref = model(x)
    assert not calls
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    out = model(x)
    assert len(calls) == 4
    out.sum().backward()
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    model = timm.create_model(name).eval()
    with set_scriptable(True):
        scripted = torch.jit.script(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))




@pytest.mark.parametrize('name', MODELS)
def test_fx_forward_and_backward(name):
    """timm's test_model_forward_fx / test_model_backward_fx."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
    fx = fx_model(model, train=False)
    with torch.no_grad():
        out = fx(x)
    out = out[next(iter(out))] if isinstance(out, dict) else out
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    fx_train = fx_model(model, train=True)
    out = fx_train(torch.randn(2, 3, SIZE, SIZE))
    out = out[next(iter(out))] if isinstance(out, dict) else out
    out.mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_features_only_and_out_indices(name):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True).eval()
    info = model.feature_info
    assert len(info.channels()) == 4 and info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model(x)
    for f, c, r in zip(feats, info.channels(), info.reduction()):
        assert f.shape[1] == c and f.shape[-1] == SIZE // r
    torch.manual_seed(0)  # the same weights
    sub = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        f1, f3 = sub(x)
    torch.testing.assert_close(f1, feats[1])
    torch.testing.assert_close(f3, feats[3])


def test_forward_intermediates_and_getter():
    """timm's test_model_forward_intermediates(_features); our module is not in timm's filter list."""
    torch.manual_seed(0)
    model = timm.create_model('smpconv_mobile31').eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], model.head.norm(final))
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1])
        model.set_grad_checkpointing()
        final2, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final2, final)
    getter = timm.create_model('smpconv_mobile31', features_only=True, feature_cls='getter', out_indices=(0, 2)).eval()
    with torch.no_grad():
        feats = getter(x)
    assert [f.shape[1] for f in feats] == [64, 256]


def test_prune_intermediate_layers_contract():
    torch.manual_seed(0)
    model = timm.create_model('smpconv_mobile31').eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1], prune_head=True)
    assert kept == [0, 1] and len(model.stages) == 2
    assert model.num_features == 128 and model.num_classes == 0
    with torch.no_grad():
        pruned = model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(pruned[1], full[1])
    model.train()
    out = model(x)
    out.mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


@pytest.mark.parametrize('name', MODELS)
def test_create_model_kwargs(name):
    model = timm.create_model(name, num_classes=10, in_chans=1, drop_rate=0.2, drop_path_rate=0.3,
                              global_pool='max', device='meta', dtype=torch.bfloat16)
    assert model.num_classes == 10 and model.in_chans == 1
    assert model.stem[0].conv.in_channels == 1 and model.head.drop.p == 0.2
    assert model.head.global_pool.pool_type == 'max'
    dps = [m.drop_prob for m in model.modules() if type(m).__name__ == 'DropPath']
    assert max(dps) == pytest.approx(0.3)
    assert next(model.parameters()).dtype == torch.bfloat16
    out = model(torch.empty(2, 1, SIZE, SIZE, device='meta', dtype=torch.bfloat16))
    assert out.shape == (2, 10)


def test_kernel_and_points_overrides():
    m = timm.create_model('smpconv_mobile31', kernel_sizes=(51, 49, 47, 13), device='meta')
    lk = m.stages[0].blocks[0].large_kernel
    assert lk.smp.kernel_size == 51 and lk.smp.n_points == 31 * 31 // 8  # the variant's points: checkpoints fit
    assert n_params(m) == PARAMS['smpconv_mobile31']
    m = timm.create_model('smpconv_mobile31', n_points=(10, 11, 12, 13), device='meta')
    assert [s.blocks[0].large_kernel.smp.n_points for s in m.stages] == [10, 11, 12, 13]
    with pytest.raises(ValueError, match='kernel_sizes has 3 entries'):
        timm.create_model('smpconv_mobile31', kernel_sizes=(31, 29, 27), device='meta')
    with pytest.raises(ValueError, match='odd'):
        timm.create_model('smpconv_mobile31', kernel_sizes=(30, 29, 27, 13), device='meta')
    with pytest.raises(ValueError, match='kernel_resize'):
        timm.create_model('smpconv_mobile31', kernel_resize='crop', device='meta')


def test_one_int_for_every_stage():
    """kernel_sizes=31 / n_points=16 as plain ints apply to every stage (the CIFAR models take an int too)."""
    def stage_sizes(m):
        return [(s.blocks[0].large_kernel.smp.kernel_size, s.blocks[0].large_kernel.smp.n_points) for s in m.stages]

    name = 'smpconv_mobile31'  # kernel sizes (31, 29, 27, 13), points floor(k^2 / 8)
    m = timm.create_model(name, kernel_sizes=31, device='meta')
    assert m.kernel_sizes == (31,) * 4 and stage_sizes(m) == [(31, 120), (31, 105), (31, 91), (31, 21)]
    m = timm.create_model(name, n_points=16, device='meta')
    assert stage_sizes(m) == [(31, 16), (29, 16), (27, 16), (13, 16)]
    m = timm.create_model(name, kernel_sizes=21, n_points=16, device='meta')
    assert stage_sizes(m) == [(21, 16)] * 4
    with pytest.raises(ValueError, match=r'n_points has 2 entries .* or one int for every stage'):
        timm.create_model(name, n_points=(16, 16), device='meta')


@pytest.mark.parametrize('name', ['smpconv_mobile31', 'smpconv_t'])
def test_reparameterize_whole_network(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    randomize_bn_stats_(model)
    model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = model(x)
        fused = reparameterize_model(model)
        y_fused = fused(x)
    assert ((y - y_fused).abs().max() / y.abs().max()).item() <= 1e-4
    kinds = {type(m) for m in fused.modules()}
    assert not any(issubclass(k, (_SMPConvNd, _SMPLargeKernelNd, nn.modules.batchnorm._BatchNorm)) for k in kinds)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    # one conv per large-kernel branch at the SMP kernel size
    lk = fused.stages[0].blocks[0].large_kernel
    assert isinstance(lk, nn.Conv2d) and lk.kernel_size == (model.kernel_sizes[0],) * 2
    with torch.no_grad():
        with conv_impl('direct'):  # scripted convs are direct; compare like with like
            torch.testing.assert_close(torch.jit.script(fused)(x), fused(x))
    # the original is untouched
    assert isinstance(model.stages[0].blocks[0].prelkb_bn, nn.BatchNorm2d)


def test_reparameterize_without_classifier_keeps_head_norm():
    model = timm.create_model('smpconv_mobile31', num_classes=0)
    randomize_bn_stats_(model)
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    fused = reparameterize_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    assert isinstance(fused.head.norm, nn.BatchNorm2d)  # nothing to fold it into
