""" Deployed models: `inference_mode=True` for every family, checkpoints that round-trip through timm's Hugging Face
format (`save_for_hf` and `push_to_hf_hub`, reloaded through `local-dir:`, `hf-hub:` and
`pretrained_cfg_overlay=dict(file=...)`), deployed kernel sizes that training decides, and bad input.

No test touches the network: `push_to_hf_hub` uploads through a stand-in for huggingface_hub's HfApi into a
local cache laid out as huggingface_hub lays it out, which `hf-hub:` names read with HF_HUB_OFFLINE.
"""
import copy
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import timm
import timm.models._hub
import torch
from timm.models import push_to_hf_hub, save_for_hf
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import FlexConv2d, randomize_bn_stats_
from timm_smpconv.layers.smp_conv import _SMPConvNd

# one case per family and conv type: small non-default kwargs, the input shape
FAMILIES = {
    'smpconv_t': (dict(kernel_sizes=(51, 49, 47, 13), num_classes=10, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16)),
                  (3, 64, 64)),
    'flexnet_16': (dict(num_classes=7, stem_width=4, widths=(4, 6), img_size=16, conv_kwargs=dict(mask_init=0.1)),
                   (3, 16, 16)),
    'smp_flexnet_16': (dict(num_classes=7, stem_width=4, widths=(4, 6), img_size=16, n_points=8), (3, 16, 16)),
    'ckcnn_16': (dict(num_classes=7, stem_width=4, widths=(4, 6), img_size=8), (3, 8, 8)),
    'smp_tcn.digits': (dict(width=8, depth=2), (3, 8, 8)),  # the tag's 64 steps of 3 channels, read from 8 x 8
    'flextcn_2': (dict(in_chans=2, num_classes=5, seq_len=40, width=8), (2, 40)),
}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _trained(name, kwargs, shape):
    """A model as training leaves it: a few SGD steps, non-trivial BatchNorm statistics, FlexConv masks of various
    sizes (so that the deployed kernels are of various shapes)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, *shape)).square().mean().backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FlexConv2d) and m.mask_params is not None:
                m.mask_params[:, 0] = (torch.rand(m.dims, generator=g) - 0.5) * 0.2 + (m.dims == 1)
                m.mask_params[:, 1] = torch.rand(m.dims, generator=g) * 0.4 + 0.07
    return randomize_bn_stats_(model).eval()


class _FakeHub:
    """Stands in for huggingface_hub.HfApi in timm's push_to_hf_hub: the upload lands in `cache`, laid out as
    huggingface_hub's cache (models--ORG--NAME/refs/main naming a snapshot folder), which hf_hub_download reads
    when offline."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.pushed = {}

    def __call__(self, **kwargs):  # HfApi(token=..., library_name=..., library_version=...)
        return self

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def file_exists(self, **kwargs):
        return False

    def upload_folder(self, repo_id, folder_path, **kwargs):
        repo = self.cache / f'models--{repo_id.replace("/", "--")}'
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        shutil.copytree(folder_path, repo / 'snapshots' / commit)
        (repo / 'refs').mkdir(parents=True)
        (repo / 'refs' / 'main').write_text(commit)
        self.pushed[repo_id] = repo / 'snapshots' / commit
        return f'https://huggingface.co/{repo_id}'


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = _FakeHub(tmp_path / 'hf_cache')
    monkeypatch.setattr(timm.models._hub, 'HfApi', fake)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return fake


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_round_trips_through_timms_hub_format(name, tmp_path, hub):
    """A trained model with non-default kwargs and its reparameterized form, each saved with save_for_hf and
    pushed with push_to_hf_hub (the same config.json), come back through local-dir: and hf-hub: with identical
    outputs; the deployed file also loads through pretrained_cfg_overlay=dict(file=...)."""
    kwargs, shape = FAMILIES[name]
    model = _trained(name, kwargs, shape)
    deployed = reparameterize_model(model)
    assert deployed.inference_mode and not model.inference_mode
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, y_dep = model(x), deployed(x)
    assert _rel(y_dep, y) < 1e-5

    for form, m, ref in (('train', model, y), ('deploy', deployed, y_dep)):
        local = tmp_path / form
        save_for_hf(m, local, safe_serialization=True)
        repo = f'someone/{name.replace(".", "-")}-{form}'
        push_to_hf_hub(m, repo)
        config = json.loads((local / 'config.json').read_text())
        assert config == json.loads((hub.pushed[repo] / 'config.json').read_text())
        assert config['model_args'].get('inference_mode', False) == (form == 'deploy')
        for source in (f'local-dir:{local}', f'hf-hub:{repo}'):
            loaded = timm.create_model(source, pretrained=True, cache_dir=hub.cache).eval()
            assert loaded.inference_mode == (form == 'deploy'), source
            assert type(loaded) is type(m) and list(loaded.state_dict()) == list(m.state_dict())
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0, msg=source)

    # the deployed file alone, through the factory's kwargs (the classes it was saved with, as timm wants)
    overlay = dict(file=str(tmp_path / 'deploy' / 'model.safetensors'), num_classes=deployed.num_classes)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, inference_mode=True,
                               **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y_dep, rtol=0, atol=0)


@pytest.mark.parametrize('name', sorted(timm.list_models(module=['smpconv', 'flexnet', 'tcn'])))
def test_inference_mode_builds_what_reparameterize_model_leaves(name):
    """create_model(name, inference_mode=True) and reparameterize_model(create_model(name)) have the same state-dict
    keys and shapes (the ImageNet models on the meta device: nothing there depends on values)."""
    device = 'meta' if name.startswith('smpconv') else 'cpu'
    fused = reparameterize_model(timm.create_model(name, device=device), inplace=True)
    built = timm.create_model(name, inference_mode=True, device=device)
    assert [(k, v.shape) for k, v in built.state_dict().items()] == [(k, v.shape) for k, v in fused.state_dict().items()]
    assert [type(m) for m in built.modules()] == [type(m) for m in fused.modules()]
    assert built.inference_mode and fused.inference_mode


def test_learned_kernel_sizes_come_from_a_kwarg_or_the_checkpoint(tmp_path):
    """FlexConv crops and SMP crop_to_support: a deployed model records its kernel sizes (config.json), a deployed
    file gives them to a model created without them, and neither saying them is an error."""
    kwargs, shape = FAMILIES['flexnet_16']
    deployed = reparameterize_model(_trained('flexnet_16', kwargs, shape))
    sizes = deployed.deployed_kernel_sizes()
    assert len({json.dumps(s) for s in sizes}) > 1 and any(isinstance(s, list) for s in sizes)  # varied, non-square
    assert deployed._model_args['inference_kernel_sizes'] == sizes
    save_for_hf(deployed, tmp_path / 'flex', safe_serialization=True)
    x = torch.randn(2, *shape)
    for model in (timm.create_model(f'local-dir:{tmp_path / "flex"}', pretrained=True),
                  timm.create_model('flexnet_16', inference_mode=True, pretrained=True, **kwargs, pretrained_cfg_overlay=dict(
                      file=str(tmp_path / 'flex' / 'model.safetensors'), num_classes=7))):
        assert model.deployed_kernel_sizes() == sizes
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), deployed(x), rtol=0, atol=0)
    built = timm.create_model('flexnet_16', inference_mode=True, inference_kernel_sizes=sizes, **kwargs)
    assert built.deployed_kernel_sizes() == sizes

    # SMP crop_to_support: the support's box is all the deployed conv keeps (the same output)
    kw = dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), crop_to_support=True, num_classes=3)
    model = _trained('smpconv_t', kw, (3, 32, 32))
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, _SMPConvNd)):
            m.points.mul_(0.3 + 0.2 * i)  # points gathered near the centre, as training may leave them
    deployed = reparameterize_model(model)
    sizes = deployed.deployed_kernel_sizes()
    assert all(5 <= s < k for s, k in zip(sizes, model.kernel_sizes)), sizes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(deployed(x), model(x)) < 1e-5
    save_for_hf(deployed, tmp_path / 'smp', safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "smp"}', pretrained=True).eval()
    assert loaded.deployed_kernel_sizes() == sizes
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='depend on training. Pass inference_kernel_sizes'):
        timm.create_model('smpconv_t', inference_mode=True, **kw)
    assert timm.create_model('smpconv_t', inference_mode=True, inference_kernel_sizes=sizes, **kw,
                             device='meta').deployed_kernel_sizes() == sizes


def _deployed_file(tmp_path, name, **kwargs):
    model = randomize_bn_stats_(timm.create_model(name, **kwargs)).eval()
    path = tmp_path / f'{name}_deployed.pth'
    torch.save(reparameterize_model(model).state_dict(), path)
    return path, model


@pytest.mark.parametrize('name,kwargs,family', [
    ('smpconv_t', dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16)), 'SMPConvNet'),
    ('smp_flexnet_16', dict(stem_width=4, widths=(4,), img_size=8), 'FlexNet'),
    ('flextcn_2', dict(seq_len=16, width=4), 'SequenceTCN'),
])
def test_the_wrong_form_is_named(tmp_path, name, kwargs, family):
    deployed_path, model = _deployed_file(tmp_path, name, **kwargs)
    training_path = tmp_path / 'training.pth'
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, training_path)
    with pytest.raises(ValueError, match=f'deployed \\(reparameterized\\) form of {family}: create the model with '
                                         f'inference_mode=True'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(deployed_path)), **kwargs)
    with pytest.raises(ValueError, match=f'training form of {family} .* created with inference_mode=True'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(training_path)),
                          inference_mode=True, **kwargs)


def test_kwargs_that_disagree_with_the_checkpoints_shapes_are_named(tmp_path):
    small = dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16))
    path, _ = _deployed_file(tmp_path, 'smpconv_t', kernel_sizes=(51, 49, 47, 13), **small)
    with pytest.raises(ValueError, match=r'kernel_sizes=\(31, 29, 27, 13\) fixes: stages.0.blocks.0.large_kernel: '
                                         r'checkpoint 51, model 31'):
        timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          inference_mode=True, **small)
    path, _ = _deployed_file(tmp_path, 'smp_tcn', seq_len=40, depth=1, width=4)
    with pytest.raises(ValueError, match='seq_len=30 fixes: blocks.0.conv1: checkpoint 40, model 30'):
        timm.create_model('smp_tcn', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          inference_mode=True, seq_len=30, depth=1, width=4)
    flex = dict(stem_width=4, widths=(4,), img_size=16)
    path, _ = _deployed_file(tmp_path, 'flexnet_16', conv_kwargs=dict(mask_init=0.4), **flex)  # 13 x 13 kernels
    with pytest.raises(ValueError, match='inference_kernel_sizes fixes: stem: checkpoint 13, model 3'):
        timm.create_model('flexnet_16', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          inference_mode=True, inference_kernel_sizes=[3, 3, 3], **flex)
    with pytest.raises(ValueError, match=r'kernel 13 does not fit this model, whose kernels are at most 9 '
                                         r'\(img_size=8\)'):
        timm.create_model('flexnet_16', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          inference_mode=True, **dict(flex, img_size=8))
    # a classifier-free deployed model cannot get back the head BatchNorm folded into the file's classifier
    path, _ = _deployed_file(tmp_path, 'smpconv_mobile31', **small)
    with pytest.raises(ValueError, match='final BatchNorm folded into its classifier'):
        timm.create_model('smpconv_mobile31', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          inference_mode=True, num_classes=0, **small)


def test_bad_inference_arguments():
    small = dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), device='meta')
    with pytest.raises(ValueError, match='applies with inference_mode=True and crop_to_support=True only'):
        timm.create_model('smpconv_t', inference_kernel_sizes=[31, 29, 27, 13], **small)
    with pytest.raises(ValueError, match='inference_kernel_sizes has 3 entries but the model has 4'):
        timm.create_model('smpconv_t', inference_mode=True, crop_to_support=True, inference_kernel_sizes=[9, 9, 9],
                          **small)
    with pytest.raises(ValueError, match=r'inference_kernel_sizes\[0\] = 8: each size must be an odd int from 5 '
                                         r'to the layer\'s kernel size 31'):
        timm.create_model('smpconv_t', inference_mode=True, crop_to_support=True, inference_kernel_sizes=[8, 9, 9, 9],
                          **small)
    with pytest.raises(ValueError, match='applies to FlexTCNs with inference_mode=True only'):
        timm.create_model('smp_tcn', inference_mode=True, inference_kernel_sizes=[4] * 12, device='meta')
    deployed_tcn = timm.create_model('flextcn_2', inference_mode=True, seq_len=32)
    with pytest.raises(ValueError, match='deployed .* cannot be re-sampled'):
        deployed_tcn.set_seq_len(64)
    with pytest.raises(ValueError, match='deployed .* cannot be re-sampled'):
        timm.create_model('flexnet_16', inference_mode=True, device='meta').set_input_size(16)
    with pytest.raises(ValueError, match='not deployed'):
        timm.create_model('flextcn_2', seq_len=32).deployed_kernel_sizes()


def test_deployed_record_survives_copies_and_timm_updates():
    """The recorded creation arguments follow what the model is: reparameterizing a copy leaves the original's
    record alone, and timm's update_model_args adds to it."""
    from timm.models._input import update_model_args
    model = timm.create_model('smpconv_mobile31', num_classes=3, device='meta')
    fused = reparameterize_model(model)
    assert model._model_args == {'num_classes': 3}
    assert fused._model_args == {'num_classes': 3, 'inference_mode': True}
    update_model_args(fused, img_size=(96, 96))
    assert fused._model_args == {'num_classes': 3, 'img_size': (96, 96), 'inference_mode': True}
    assert copy.deepcopy(fused)._model_args == fused._model_args
