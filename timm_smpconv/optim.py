""" Optimizer helpers: SMP parameter groups and the radius clamp.

Parameter groups for `timm.optim.create_optimizer_v2`:

    from timm.optim import create_optimizer_v2
    from timm_smpconv import param_groups_smp
    opt = create_optimizer_v2(model, opt='adamw', lr=4e-3, weight_decay=0.05, param_group_fn=param_groups_smp)

gives three groups: the decayed parameters (weight decay = the optimizer's), the 1-D tensors,
biases and `model.no_weight_decay()` names (no decay), and the reduced-lr parameters (SMP radii,
any module attribute listed in a module's `reduced_lr_param_names`), which get no decay and
`lr_scale` = 0.1. timm's schedulers set `lr = scheduled_lr * lr_scale` for every group on every
update, so warm-up and cosine keep the 0.1 ratio.

After every optimizer step call `clamp_smp_radius_(model)` (ImageNet range [1e-3, 1]; use
`RADIUS_RANGE_SMALL` = [1e-4, 1] for the small-scale recipes).
"""
import fnmatch
from typing import Collection, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

__all__ = [
    'param_groups_smp', 'reduced_lr_param_names', 'clamp_smp_radius_',
    'RADIUS_RANGE_IMAGENET', 'RADIUS_RANGE_SMALL', 'RADIUS_LR_SCALE',
]

RADIUS_RANGE_IMAGENET: Tuple[float, float] = (1e-3, 1.0)
RADIUS_RANGE_SMALL: Tuple[float, float] = (1e-4, 1.0)
RADIUS_LR_SCALE = 0.1


def reduced_lr_param_names(model: nn.Module) -> List[str]:
    """Full names of the parameters that modules declare in `reduced_lr_param_names`."""
    names = []
    for mod_name, module in model.named_modules():
        for attr in getattr(module, 'reduced_lr_param_names', ()):
            if isinstance(getattr(module, attr, None), nn.Parameter):
                names.append(f'{mod_name}.{attr}' if mod_name else attr)
    return names


def param_groups_smp(
        model: nn.Module,
        weight_decay: Optional[float] = None,
        lr_scale: float = RADIUS_LR_SCALE,
        no_weight_decay_list: Optional[Collection[str]] = None,
        layer_decay: Optional[float] = None,
        layer_decay_min_scale: float = 0.,
        layer_decay_no_opt_scale: Optional[float] = None,
) -> List[Dict]:
    """Parameter groups: decay / no decay (1-D, biases, no_weight_decay names) / reduced lr (radii).

    Args:
        model: the model.
        weight_decay: decay of the first group; None leaves it to the optimizer's default, which is
            what `create_optimizer_v2(..., weight_decay=wd, param_group_fn=param_groups_smp)` sets.
        lr_scale: lr multiplier of the reduced-lr group (0.1 in both papers' recipes).
        no_weight_decay_list: names or fnmatch patterns without decay; default `model.no_weight_decay()`.
        layer_decay: layer-wise lr decay (timm's `param_groups_layer_decay`, by the model's group_matcher);
            the reduced-lr parameters of each layer then get `lr_scale` times that layer's scale.
        layer_decay_min_scale: lower bound of the layer-wise scale (timm's `min_scale`).
        layer_decay_no_opt_scale: layers whose scale falls below this are left out (timm's `no_opt_scale`).
    """
    if no_weight_decay_list is None:
        no_weight_decay_list = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    no_wd_patterns = set(no_weight_decay_list)
    reduced = set(reduced_lr_param_names(model))
    if layer_decay is not None:
        return _split_reduced(model, param_groups_layer_decay(
            model, weight_decay=weight_decay or 0., no_weight_decay_list=no_wd_patterns, layer_decay=layer_decay,
            min_scale=layer_decay_min_scale, no_opt_scale=layer_decay_no_opt_scale),
            reduced, lr_scale)
    decay, no_decay, slow = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in reduced:
            slow.append(param)
        elif param.ndim <= 1 or name.endswith('.bias') or any(fnmatch.fnmatch(name, p) for p in no_wd_patterns):
            no_decay.append(param)
        else:
            decay.append(param)
    decay_group = {'params': decay}
    if weight_decay is not None:
        decay_group['weight_decay'] = weight_decay
    groups = [decay_group, {'params': no_decay, 'weight_decay': 0.}, {'params': slow, 'weight_decay': 0., 'lr_scale': lr_scale}]
    return [g for g in groups if g['params']]


def _split_reduced(model: nn.Module, groups: List[Dict], reduced: Collection[str], lr_scale: float) -> List[Dict]:
    """Move the reduced-lr parameters of each group into a sibling group with lr_scale x its scale, no decay."""
    reduced_ids = {id(p) for n, p in model.named_parameters() if n in reduced}
    out = []
    for g in groups:
        keep = [p for p in g['params'] if id(p) not in reduced_ids]
        slow = [p for p in g['params'] if id(p) in reduced_ids]
        if keep:
            out.append({**g, 'params': keep})
        if slow:
            out.append({**g, 'params': slow, 'weight_decay': 0., 'lr_scale': g.get('lr_scale', 1.) * lr_scale})
    return out


@torch.no_grad()
def clamp_smp_radius_(
        model: nn.Module,
        min_radius: float = RADIUS_RANGE_IMAGENET[0],
        max_radius: float = RADIUS_RANGE_IMAGENET[1],
) -> int:
    """Clamp every SMP radius of `model` to [min_radius, max_radius] in place; call after each optimizer step.

    Returns the number of radius tensors clamped. Raises ValueError naming the first layer whose radii
    are not finite (a diverged run), since clamping would hide it.
    """
    if not 0 < min_radius <= max_radius:
        raise ValueError(f'need 0 < min_radius <= max_radius, got [{min_radius}, {max_radius}]')
    radii = []
    for name, module in model.named_modules():
        for attr in getattr(module, 'reduced_lr_param_names', ()):
            if attr == 'radius' and isinstance(getattr(module, attr, None), torch.Tensor):
                radii.append((f'{name}.{attr}' if name else attr, getattr(module, attr)))
    if not radii:
        return 0
    finite = torch.stack([r.isfinite().all() for _, r in radii]).all()
    if not bool(finite):
        bad = next(n for n, r in radii if not bool(r.isfinite().all()))
        raise ValueError(f'non-finite SMP radius in {bad}')
    for _, r in radii:
        r.clamp_(min_radius, max_radius)
    return len(radii)
