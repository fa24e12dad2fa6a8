""" timm's model test battery (tests/test_models.py of timm 1.0.31, which its wheel does not ship), written for
the models this package registers, in training form and deployed (`inference_mode=True`).

The checks, per model: forward (no NaN, unchanged under gradient checkpointing), backward (42 classes, every
parameter gets a gradient), the default-cfg / API contract on the meta device, TorchScript, features_only,
forward_intermediates and its feature getter, prune_intermediate_layers, torch.fx forward and backward, and an
fx graph scripted with TorchScript (test_model_forward_fx_torchscript).

The registered names of a family differ only in their arguments (widths, depths, kernel sizes, tags), so the
runtime checks run one small model per model class and conv type, on small inputs, and
`test_every_registered_model_is_covered` checks that each registered name is one of those; every name's
deployed form goes through the default-cfg contract at its full size on the meta device (the per-family test
files check the training form's contract and run the full-size networks).
"""
import copy

import pytest
import timm
import torch
from helpers import check_timm_model_contract, fx_model
from timm.layers import set_scriptable

import timm_smpconv  # noqa: F401  (registers the models)
from timm_smpconv.models import package_models
from timm_smpconv.ops import conv_impl

REGISTERED = sorted(package_models())
# one small model per model class and conv type (at least 3 feature levels, as timm's feature test wants), and
# its input shape; the sequence models read 16 steps of their tag's channels
SMALL = {
    'smpconv_mobile31': (dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16)), (3, 32, 32)),
    'flexnet_16': (dict(stem_width=4, widths=(4, 6, 6), img_size=8), (3, 8, 8)),
    'smp_flexnet_16': (dict(stem_width=4, widths=(4, 6, 6), img_size=8), (3, 8, 8)),
    'ckcnn_16': (dict(stem_width=4, widths=(4, 6, 6), img_size=8), (3, 8, 8)),
    'smp_tcn': (dict(width=6, depth=3, seq_len=16), (1, 16)),
    'flextcn_2': (dict(width=6, depth=3, seq_len=16), (1, 16)),
}


def _kind(name):
    model = timm.create_model(name, device='meta')
    return type(model), getattr(model, 'conv_type', None)


def test_every_registered_model_is_covered():
    kinds = {_kind(n) for n in SMALL}
    assert len(kinds) == len(SMALL)
    for name in REGISTERED:
        assert _kind(name) in kinds, name


@pytest.mark.parametrize('name', REGISTERED)
def test_deployed_default_cfg_contract(name):
    """timm's test_model_default_cfgs for the deployed form of every registered model, at its full size."""
    check_timm_model_contract(name, inference_mode=True)


@pytest.mark.parametrize('deployed', [False, True], ids=['train', 'deploy'])
@pytest.mark.parametrize('name', sorted(SMALL))
def test_wrong_input_shape_is_one_error_for_every_family(name, deployed):
    """Every family refuses an input of the wrong channel count (or rank) before its first layer with the same
    ValueError naming the shape it expects, in every entry point (not torch's conv error from inside the stem)."""
    kwargs, shape = SMALL[name]
    model = timm.create_model(name, device='meta', inference_mode=deployed, **kwargs)
    c = shape[0]
    what = f'(N, {c}, L) sequences or (N, {c}, H, W) images' if len(shape) == 2 else f'(N, {c}, H, W) images'
    bad = [(2, c + 2) + shape[1:]] + ([(2, c, shape[1])] if len(shape) == 3 else [])
    for size in bad:
        x = torch.empty(size, device='meta')
        message = f'{type(model).__name__} expects {what}, got shape {list(size)}'
        for entry in (model, model.forward_features, model.forward_intermediates):
            with pytest.raises(ValueError) as err:
                entry(x)
            assert str(err.value) == message


def _out(y):
    return y[next(iter(y))] if isinstance(y, dict) else y


@pytest.mark.parametrize('deployed', [False, True], ids=['train', 'deploy'])
@pytest.mark.parametrize('name', sorted(SMALL))
def test_timm_battery(name, deployed):
    kwargs, shape = SMALL[name]
    if deployed:
        kwargs = dict(kwargs, inference_mode=True)
    torch.manual_seed(0)
    x = torch.randn(1, *shape)

    # test_model_forward: eval, batch 1, no NaN; gradient checkpointing changes nothing
    model = timm.create_model(name, **kwargs).eval()
    assert model.inference_mode == deployed
    with torch.no_grad():
        ref = model(x)
        assert ref.shape[0] == 1 and not torch.isnan(ref).any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        model.set_grad_checkpointing(False)

    # test_model_backward: 42 classes, train mode, batch 2, every parameter gets a whole gradient
    trained = timm.create_model(name, num_classes=42, **kwargs).train()
    out = trained(torch.randn(2, *shape))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    for n, p in trained.named_parameters():
        assert p.grad is not None and p.grad.numel() == p.numel(), n

    # test_model_forward_torchscript (scripted convs are direct: compare with the direct backend)
    with set_scriptable(True):
        scripted = torch.jit.script(timm.create_model(name, **kwargs).eval())
    scripted.load_state_dict(model.state_dict())
    with torch.no_grad(), conv_impl('direct'):
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)

    # test_model_forward_features: features_only, every level's channels
    feats = timm.create_model(name, features_only=True, **kwargs).eval()
    channels = feats.feature_info.channels()
    assert len(channels) >= 3
    with torch.no_grad():
        maps = feats(x)
    assert [f.shape[1] for f in maps] == channels and all(f.shape[0] == 1 for f in maps)

    # test_model_forward_intermediates(_features): the last output is forward_features', the getter's levels
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-6 * float(final.abs().max()))
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
        getter = timm.create_model(name, features_only=True, feature_cls='getter', **kwargs).eval()
        assert [f.shape[1] for f in getter(x)] == channels

    # test_prune_intermediate_layers_contract: taps kept, no unused parameter after pruning
    pruned = copy.deepcopy(model)
    kept = pruned.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    with torch.no_grad():
        taps = pruned.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(taps[1], inter[1])
    pruned.train()
    pruned(torch.randn(2, *shape)).mean().backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]

    # test_model_forward_fx / test_model_backward_fx
    traced = fx_model(model, train=False)
    with torch.no_grad():
        torch.testing.assert_close(_out(traced(x)), ref, rtol=1e-4, atol=1e-5)
    traced_train = fx_model(trained, train=True)
    trained.zero_grad(set_to_none=True)
    _out(traced_train(torch.randn(2, *shape))).mean().backward()
    assert all(p.grad is not None for p in traced_train.parameters())

    # test_model_forward_fx_torchscript: the fx graph (large-kernel convs as leaf calls) scripts and runs
    scripted_fx = torch.jit.script(fx_model(model, train=False))
    with torch.no_grad(), conv_impl('direct'):
        torch.testing.assert_close(_out(scripted_fx(x)), model(x), rtol=1e-4, atol=1e-5)
