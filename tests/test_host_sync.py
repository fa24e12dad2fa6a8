""" A training step and a reparameterized eval forward of every registered model make the host wait for the device
nowhere (no `.item()`, `.tolist()`, `nonzero`, ... : see helpers.HostSyncs), except where a kernel size is read
from the parameters, documented and counted here: SMP `crop_to_support=True` and FlexConv's dynamic cropping
(one read per forward for all the layers of flexnet_16, one per layer of the FlexTCNs). """
import pytest
import timm
import torch
from helpers import HostSyncs
from timm.utils import reparameterize_model

from timm_smpconv.layers import FlexConv2d, SMPConv2d
from timm_smpconv.models import package_models

MODELS = package_models()


def _input(model, batch=2):
    """A small batch: ImageNet models at 32 px (1 x 1 after the last stage), CIFAR models at 16 px, sequence
    models at 64 steps; the same layers and ops as at full size."""
    c, h, w = model.pretrained_cfg['input_size']
    h = w = 32 if h > 32 else (16 if c == 3 else 8)
    return torch.randn(batch, c, h, w)


def _dynamic_crops(model):
    """The host reads a training forward must make where FlexConv layers crop their kernels by their masks: one
    `.tolist()` for all the 2-D layers of a FlexNet (their kernels are generated together), one `int()` per 1-D
    layer of a FlexTCN."""
    layers = [m for m in model.modules() if isinstance(m, FlexConv2d) and m.dynamic_cropping]
    two_d = sum(1 for m in layers if m.dims == 2)
    return {k: v for k, v in (('tolist', min(two_d, 1)), ('_local_scalar_dense', len(layers) - two_d)) if v}


def test_registered_models_are_all_checked():
    assert len(MODELS) == 11 and {'smpconv_t', 'flexnet_16', 'smp_tcn', 'flextcn_6'} <= set(MODELS)


@pytest.mark.parametrize('name', MODELS)
def test_training_step_and_reparameterized_eval_make_no_host_sync(name):
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x = _input(model)
    model(x).float().logsumexp(-1).sum().backward()  # the first step also sets the BatchNorm statistics (once)
    with HostSyncs() as syncs:
        model(x).float().logsumexp(-1).sum().backward()
    assert dict(syncs.events) == _dynamic_crops(model), name
    if name == 'flexnet_16':
        assert syncs.events['tolist'] == 1  # the 15 FlexConv crops, read at once: the documented exception
    deployed = reparameterize_model(model.eval())
    with torch.no_grad(), HostSyncs() as syncs:
        deployed(x)
    assert not syncs.events, name


def test_host_sync_exceptions_are_the_documented_ones():
    """crop_to_support=True reads the points' extent once per SMP layer; FlexConv without dynamic cropping (or
    CKConv, no mask) reads nothing."""
    model = timm.create_model('smpconv_mobile31', layers=(1, 1, 1, 1), crop_to_support=True).train()
    model._bn_stats_from_first_batch = False  # (the first step's one extra forward would read them twice)
    with HostSyncs() as syncs:
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert dict(syncs.events) == {'_local_scalar_dense': sum(isinstance(m, SMPConv2d) for m in model.modules())}
    model = timm.create_model('flexnet_16', widths=(24,), conv_kwargs=dict(dynamic_cropping=False)).train()
    with HostSyncs() as syncs:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not syncs.events


def test_host_sync_counter_sees_every_kind_of_read():
    t = torch.tensor([0., 1., 2.])
    with HostSyncs() as syncs:
        t.sum().item()
        t.tolist()
        bool(t[1])
        t.nonzero()
        torch.masked_select(t, t > 0)
        torch.equal(t, t)
    assert syncs.events['_local_scalar_dense'] >= 2 and syncs.events['tolist'] == 1
    assert syncs.events['nonzero'] == 1 and syncs.events['masked_select'] == 1 and syncs.events['equal'] == 1
