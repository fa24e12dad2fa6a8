""" Model building shared by our model families. """
from typing import Callable, Dict, Optional, Set, Type

import torch.nn as nn
from timm.models import build_model_with_cfg

__all__ = ['build_model_naming_file_errors', 'no_decay_patterns', 'unwrap_checkpoint']


def build_model_naming_file_errors(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Callable,
        feature_cfg: Optional[Dict] = None,
        **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, turning an unreadable weights file into an error that names it.

    A truncated or corrupt file surfaces from torch.load as many exception types (UnpicklingError,
    EOFError, IndexError, RuntimeError...); they become one RuntimeError naming the file. ValueError
    and TypeError pass unchanged: bad arguments, or a checkpoint whose keys do not fit (the filter
    names them). Errors without a file or url (e.g. no weights exist for an `.untrained` cfg) pass too.
    """
    try:
        return build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as e:
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        source = overlay.get('file') or overlay.get('url')
        if not pretrained or not source:
            raise
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


def no_decay_patterns(model: nn.Module) -> Set[str]:
    """timm's no_weight_decay() set for our models: Gaussian mask parameters and SMP radii (they also get a
    0.1x lr through timm_smpconv.param_groups_smp), where the model has them."""
    names = [n for n, _ in model.named_parameters()]
    return {p for p in ('*.mask_params', '*.radius') if any(n.endswith(p[1:]) for n in names)}
