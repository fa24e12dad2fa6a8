""" Model building shared by our model families. """
from typing import Callable, Dict, Optional, Type

import torch.nn as nn
from timm.models import build_model_with_cfg

__all__ = ['build_model_naming_file_errors']


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
