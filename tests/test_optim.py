""" Optimizer parameter groups and the radius clamp. """
import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_smpconv import clamp_smp_radius_, param_groups_smp
from timm_smpconv.layers import SMPConv1d, SMPConv2d, SMPLargeKernel2d
from timm_smpconv.optim import RADIUS_RANGE_SMALL


def small_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
        SMPLargeKernel2d(8, 8, 9, groups=8), SMPConv2d(8, 4, 5, n_points=6),
    )


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g['params']))


def test_groups_with_create_optimizer_and_scheduler():
    model = small_model()
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-2, weight_decay=0.05, param_group_fn=param_groups_smp)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=2, warmup_lr=1e-4,
                                   min_lr=1e-6, step_on_epochs=False, updates_per_epoch=5)
    lk = model[2]
    for step in (1, 3, 7, 30):  # inside warm-up, and on the cosine
        sched.step_update(step)
        base = group_of(opt, lk.smp.weight)['lr']
        assert group_of(opt, lk.smp.radius)['lr'] == pytest.approx(0.1 * base)
        assert group_of(opt, model[3].radius)['lr'] == pytest.approx(0.1 * base)
        assert group_of(opt, model[0].bias)['lr'] == pytest.approx(base)
    assert group_of(opt, lk.smp.radius)['weight_decay'] == 0
    for p in (model[0].bias, model[1].weight, model[1].bias, lk.smp_bn.weight, model[3].bias):
        assert group_of(opt, p)['weight_decay'] == 0
    for p in (model[0].weight, lk.smp.weight, lk.smp.points, lk.small_conv.weight, model[3].points):
        assert group_of(opt, p)['weight_decay'] == 0.05
    n_params = sum(len(g['params']) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_groups_honour_no_weight_decay_and_frozen():
    model = small_model()
    model.no_weight_decay = lambda: {'3.points'}
    model[0].weight.requires_grad_(False)
    groups = param_groups_smp(model, weight_decay=0.1)
    decay = groups[0]
    assert decay['weight_decay'] == 0.1
    assert not any(p is model[3].points for p in decay['params'])
    assert not any(p is model[0].weight for g in groups for p in g['params'])
    assert any(p is model[3].points for p in groups[1]['params'])


def test_clamp_holds_after_optimizer_step():
    torch.manual_seed(0)
    model = nn.Sequential(SMPConv2d(4, 4, 9, groups=4, radius=0.5), SMPConv1d(2, 2, 5))
    opt = torch.optim.SGD(param_groups_smp(model), lr=100.0)
    x = torch.randn(2, 4, 12, 12)
    model[0](x).square().sum().backward()
    model[1](torch.randn(2, 2, 10)).pow(3).sum().backward()
    opt.step()
    radii = torch.cat([model[0].radius.flatten(), model[1].radius.flatten()])
    assert radii.min() < 1e-3 or radii.max() > 1  # the huge step left the range
    assert clamp_smp_radius_(model) == 2
    for r in (model[0].radius, model[1].radius):
        assert r.min() >= 1e-3 and r.max() <= 1.0
    with torch.no_grad():
        model[0].radius[0, 0] = 1e-6
    clamp_smp_radius_(model, *RADIUS_RANGE_SMALL)
    assert model[0].radius[0, 0].item() == pytest.approx(1e-4)


def test_clamp_rejects_non_finite_and_bad_range():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), SMPConv2d(2, 2, 5))
    with torch.no_grad():
        model[1].radius[0, 1] = float('nan')
    with pytest.raises(ValueError, match=r'non-finite SMP radius in 1\.radius'):
        clamp_smp_radius_(model)
    with pytest.raises(ValueError, match='min_radius'):
        clamp_smp_radius_(model, 0.5, 0.1)
    assert clamp_smp_radius_(nn.Linear(2, 2)) == 0
