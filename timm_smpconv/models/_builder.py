""" Model building shared by our model families. """
import os
from typing import Callable, Dict, Optional, Set, Type

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg

__all__ = [
    'build_model_naming_file_errors', 'check_state_dict_keys', 'no_decay_patterns', 'points_from_authors',
    'unwrap_checkpoint',
]


def build_model_naming_file_errors(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Callable,
        feature_cfg: Optional[Dict] = None,
        **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, with errors about weights that say what happened.

    * `pretrained=True` without a file: our models ship no weights; the error says how to load the authors'
      or your own file (`pretrained_cfg_overlay=dict(file=...)`).
    * a file that does not exist: FileNotFoundError naming the path.
    * a file torch's safe (weights_only) loader refuses, because it pickles arbitrary Python objects: said
      so, with how to load a file you trust.
    * a truncated or corrupt file (UnpicklingError, EOFError, IndexError, RuntimeError... from torch.load):
      one RuntimeError naming the file.
    ValueError and TypeError pass unchanged: bad arguments, or a checkpoint whose keys do not fit (the filter
    names them).
    """
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    source = overlay.get('file') or overlay.get('url')
    cfg = kwargs.get('pretrained_cfg')
    cfg_source = (cfg.get('file') or cfg.get('url') or cfg.get('hf_hub_id')) if isinstance(cfg, dict) else None
    if pretrained and not source and not cfg_source:
        raise RuntimeError(
            f'{variant} ships no pretrained weights (no package registry hosts them). Load the authors\' or your '
            f'own checkpoint with timm.create_model({variant!r}, pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=PATH)), or use pretrained=False')
    if pretrained and overlay.get('file') and not os.path.exists(overlay['file']):
        raise FileNotFoundError(f'pretrained weights for {variant} not found: {overlay["file"]}')
    try:
        return build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as e:
        if not pretrained or not source:
            raise
        if 'weights_only' in str(e) or 'Weights only load failed' in str(e):
            raise RuntimeError(
                f'could not load pretrained weights for {variant} from {source}: torch\'s safe loader refused the '
                f'file because it holds pickled Python objects that could run code when loaded. If you trust it, '
                f'load it yourself and pass the weights: model = timm.create_model({variant!r}); '
                f'sd = torch.load(PATH, weights_only=False); model.load_state_dict('
                f'{model_cls.__module__}.checkpoint_filter_fn(sd, model))') from e
        raise RuntimeError(
            f'could not load pretrained weights for {variant} from {source}: the file is corrupt or not a '
            f'PyTorch / safetensors checkpoint ({type(e).__name__}: {e})') from e


def unwrap_checkpoint(state_dict: Dict) -> Dict:
    """The model weights inside a saved checkpoint: the EMA weights if present (as timm prefers), else
    'state_dict' or 'model' (the authors' files), else the dict itself; DataParallel 'module.' prefixes
    dropped."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    return {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def check_state_dict_keys(state_dict: Dict[str, torch.Tensor], model: nn.Module):
    """Raise ValueError naming missing, unexpected and mis-shaped keys (the classifier and the first
    conv may differ in shape: timm re-initialises / adapts them after this filter)."""
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    # timm adapts the first conv its traits name (a deployed model's own), else the cfg's
    first_conv = getattr(model, '_traits', {}).get('first_conv') or cfg.get('first_conv', 'stem.0.conv')
    adaptable = {cfg.get('classifier', 'head.fc') + '.weight', cfg.get('classifier', 'head.fc') + '.bias',
                 first_conv + '.weight'}
    # buffers registered as None (absent from a fresh model's state dict) may be present, e.g. an SMP layer's
    # render_grid; the layer checks their shape when loading
    optional = {f'{name}.{b}' if name else b for name, m in model.named_modules()
                for b, v in m._buffers.items() if v is None}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and k not in adaptable and k not in optional]
    shapes = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
              for k, v in state_dict.items() if k in own and k not in adaptable and v.shape != own[k].shape]
    problems = []
    for what, items in (('missing keys', missing), ('unexpected keys', unexpected), ('mis-shaped keys', shapes)):
        if items:
            more = f' (+{len(items) - 10} more)' if len(items) > 10 else ''
            problems.append(f'{len(items)} {what}: {", ".join(items[:10])}{more}')
    if problems:
        raise ValueError(f'checkpoint does not fit the {type(model).__name__}: ' + '; '.join(problems))


def points_from_authors(weight_coord: torch.Tensor) -> torch.Tensor:
    """The SMPConv authors' (..., Np, 2) point positions -> ours (..., Np, 2) as (row, col).

    They render A on an 'ij' grid from (c0, c1) and use W[c, i, j] = A[c, j, k-1-i] as the conv
    weight; sampling at (row = lin[i], col = lin[j]) gives the same W with (row, col) = (-c1, c0).
    """
    return torch.stack([-weight_coord[..., 1], weight_coord[..., 0]], dim=-1)


def no_decay_patterns(model: nn.Module) -> Set[str]:
    """timm's no_weight_decay() set for our models: Gaussian mask parameters and SMP radii (they also get a
    0.1x lr through timm_smpconv.param_groups_smp), where the model has them."""
    names = [n for n, _ in model.named_parameters()]
    return {p for p in ('*.mask_params', '*.radius') if any(n.endswith(p[1:]) for n in names)}
