""" Untrained continuous-kernel models in eval mode: finite, moderate outputs (timm's tests run eval forwards on fresh
models), train mode untouched by how the BatchNorm statistics start, and a model and its deepcopy computing the same.

Generated kernels are not scaled to the conv's fan-in: at init the per-channel output variance for unit inputs is up to
9e5 in ckcnn_16, 60 in flexnet_16 and 700 in flextcn_6 (sMNIST). With BatchNorm's default running variance 1, eval mode
passed every branch's gain on: measured before FlexConvBN started its running variance at the conv's output variance,
max |logit| of a fresh model in eval was ~1e35 or NaN for ckcnn_16 (NaN for 2 of 6 seeds), 1e7 for flexnet_16 and
1.6e11 for flextcn_6; after one train-mode forward 2e10, 6e4 and 3e4. Now every BatchNorm's running statistics start
as those of its input on the model's creation probe (bn_stats.py), and eval outputs are of the train-mode outputs'
size: measured on a batch of 2 (seed 0), max |logit| eval / train mode 9.6 / 5.1 for ckcnn_16 (11.8 after one
train-mode forward at momentum 0.3), 2.1 / 2.4 for flexnet_16, 2.9 / 3.0 for smp_flexnet_16.
"""
import copy

import pytest
import timm
import torch

import timm_smpconv  # noqa: F401  (registers the models)
from timm_smpconv.layers import FlexConvBN2d

CIFAR = ['flexnet_16', 'smp_flexnet_16', 'ckcnn_16']
SEQUENCE = ['flextcn_2', 'flextcn_4', 'flextcn_6', 'smp_tcn']


@pytest.mark.parametrize('name', CIFAR + SEQUENCE)
def test_fresh_model_is_moderate_in_eval(name):
    """The default configurations (32 px; 784 steps), fresh and after one train-mode forward: eval outputs within 3x
    the size of the train-mode outputs on the same batch (with BatchNorm's default statistics they were 1e7 to NaN)."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    with torch.no_grad():
        fresh = model.eval()(x)
        train = model.train()(x)
        once = model.eval()(x)
    bound = 3 * train.abs().max()
    for y in (fresh, once):
        assert y.isfinite().all() and y.abs().max() < bound, (y.abs().max(), bound)


@pytest.mark.parametrize('name,kwargs', [
    ('flexnet_16', dict(stem_width=4, widths=(4, 6), img_size=8)),
    ('ckcnn_16', dict(stem_width=4, widths=(4, 6), img_size=8)),
    ('flextcn_2', dict(pretrained_cfg='digits')),
])
def test_bn_statistics_at_init_leave_train_mode_unchanged(name, kwargs):
    """Train-mode outputs and gradients are those of the same model with BatchNorm's default statistics (0, 1)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    ref = copy.deepcopy(model)
    branches = [m for m in ref.modules() if isinstance(m, FlexConvBN2d)]  # and FlexConvBN1d
    assert branches
    for m in branches:
        assert (m.bn.running_var - 1).abs().max() > 0.5
        m.bn.reset_running_stats()
    x = torch.randn(3, 3, 8, 8)  # 8 px images; the digits task's 64 steps of 3 channels
    outs, grads = [], []
    for m in (model, ref):
        m.train()
        torch.manual_seed(1)  # the same dropout masks
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in m.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('name', CIFAR + ['flextcn_2'])
def test_model_and_deepcopy_compute_the_same(name, seed):
    """Repeated: eval, train (dropout from the same RNG state), eval again; copied after a forward filled the caches."""
    torch.manual_seed(seed)
    if name in CIFAR:
        model, x = timm.create_model(name, img_size=16), torch.randn(2, 3, 16, 16)
    else:
        model, x = timm.create_model(name, pretrained_cfg='digits'), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.eval()(x)
    twin = copy.deepcopy(model)
    for train in (False, True, False):
        outs = []
        for m in (model, twin):
            m.train(train)
            torch.manual_seed(100 + seed)
            with torch.no_grad():
                outs.append(m(x))
        assert outs[0].isfinite().all() and torch.equal(outs[0], outs[1]), train
