""" Model building shared by our model families, and the errors of their two checkpoint-loading routes. """
import argparse
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Optional, Set, Type

import timm
import timm.models._factory as _timm_factory
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, get_pretrained_cfg, list_models, load_checkpoint, load_state_dict, model_entrypoint

from ..layers.bn_stats import KernelScaledBNMixin
from ..layers.flexconv import FlexConv2d

__all__ = [
    'CheckpointMismatchError', 'UnsafeCheckpointError', 'build_model_naming_file_errors', 'check_state_dict_keys', 'create_model_or_exit',
    'flexconv_from_authors', 'load_checkpoint_naming_errors', 'no_decay_patterns', 'package_models',
    'points_from_authors', 'read_checkpoint', 'refused_pickle', 'saved_kernel_size', 'unknown_model_message',
    'unwrap_checkpoint',
]

# our model classes -> their checkpoint filter (convert the authors' layouts, check the keys), registered by
# build_model_naming_file_errors: the checkpoint_path= route applies the same filter as pretrained=True
_FILTERS: Dict[type, Callable] = {}


def package_models() -> List[str]:
    """Every model this package registers with timm, all families (SMPConv, FlexNet / CKCNN, the sequence models)."""
    return [n for n in list_models() if model_entrypoint(n).__module__.startswith('timm_smpconv.')]


def unknown_model_message(name: str) -> str:
    """The error for a model name timm does not know, offering ours."""
    return f'unknown model {name!r}; ours: {", ".join(package_models())} (or any timm model)'


def create_model_or_exit(parser, name: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, **kwargs)` for a command-line tool: an unknown name or a failed creation ends the
    program with one line naming the problem (`PROG: error: ...`, exit code 2), not a traceback."""
    if ':' not in name and not timm.is_model(name):
        parser.exit(2, f'{parser.prog}: error: {unknown_model_message(name)}\n')
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        parser.exit(2, f'{parser.prog}: error: could not create {name}: {e}\n')


def _model_name(architecture: str, tag: Optional[str]) -> str:
    """The name as the user writes it: 'smp_tcn.speech_raw', or the bare architecture for its default tag."""
    if not tag:
        return architecture
    try:
        default = get_pretrained_cfg(architecture).tag
    except Exception:
        default = None
    return architecture if tag == default else f'{architecture}.{tag}'


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file torch's safe (weights_only) loader refused: it holds pickled Python objects that can run
    code when unpickled, so it was not loaded. Every route that reads a checkpoint (create_model's pretrained and
    checkpoint_path routes, the trainer's --resume / --initial-checkpoint / --pretrained-path / --checkpoint /
    --kd-checkpoint, export) raises this one message."""


def refused_pickle(path, e: BaseException) -> Optional[UnsafeCheckpointError]:
    """The error for `path` if `e` (or an exception it was raised from) is torch's safe loader refusing the file's
    pickled objects (torch's own message, and timm's re-raised one, advise `weights_only=False`, which would run
    them: ours names the file and what it holds instead); None for any other failure (missing, truncated, corrupt)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UnsafeCheckpointError):
            return e
        if isinstance(e, pickle.UnpicklingError) and str(e).startswith('Weights only load failed'):
            break
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    else:
        return None
    try:  # the offending globals, where torch can list them (zip checkpoints) without unpickling anything
        names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g != 'argparse.Namespace']
    except Exception:
        names = []
    what = f' ({", ".join(names)})' if names else ''
    return UnsafeCheckpointError(
        f'checkpoint {str(path)!r} was not loaded: it holds pickled Python objects{what} that can execute code when '
        f'unpickled. Checkpoints are read with torch\'s safe loader, which takes tensors, plain containers and a '
        f'training run\'s stored arguments only.')


def read_checkpoint(path) -> Any:
    """A checkpoint file as torch or safetensors stores it, read safely: safetensors, or torch's weights_only loader
    with a training run's stored arguments (timm's saver pickles an argparse.Namespace) allowed. A file with other
    pickled objects raises UnsafeCheckpointError; other failures (corrupt, truncated) pass unchanged."""
    path = str(path)
    if path.endswith('.safetensors'):
        import safetensors.torch
        return safetensors.torch.load_file(path, device='cpu')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        unsafe = refused_pickle(path, e)
        if unsafe is not None:
            raise unsafe from None
        raise


def _raise_file_error(name: str, source: str, e: Exception):
    """Raise the error for a weights file torch cannot read: refused by the safe loader (the message of every route,
    without torch's own in the traceback), or truncated / corrupt."""
    unsafe = refused_pickle(source, e)
    if unsafe is not None:
        raise unsafe from None
    raise RuntimeError(
        f'could not load pretrained weights for {name} from {source}: the file is corrupt or not a '
        f'PyTorch / safetensors checkpoint ({type(e).__name__}: {e})') from e


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
      or your own file (`pretrained_cfg_overlay=dict(file=...)`), with the model name as given (its tag too).
    * a file that does not exist: FileNotFoundError naming the path.
    * a file torch's safe (weights_only) loader refuses, because it pickles arbitrary Python objects:
      UnsafeCheckpointError naming the file (the message of every checkpoint route).
    * a truncated or corrupt file (UnpicklingError, EOFError, IndexError, RuntimeError... from torch.load):
      one RuntimeError naming the file.
    ValueError and TypeError pass unchanged: bad arguments, or a checkpoint whose keys do not fit (the filter
    names them). `timm.create_model(..., checkpoint_path=FILE)` gives the same errors
    (`load_checkpoint_naming_errors`).
    """
    _FILTERS[model_cls] = filter_fn
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    source = overlay.get('file') or overlay.get('url')
    cfg = kwargs.get('pretrained_cfg')
    cfg_source = (cfg.get('file') or cfg.get('url') or cfg.get('hf_hub_id')) if isinstance(cfg, dict) else None
    name = _model_name(variant, cfg if isinstance(cfg, str) else (cfg.get('tag') if isinstance(cfg, dict) else None))
    if pretrained and not source and not cfg_source:
        raise RuntimeError(
            f'{name} ships no pretrained weights (no package registry hosts them). Load the authors\' or your '
            f'own checkpoint with timm.create_model({name!r}, pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=PATH)), or use pretrained=False')
    if pretrained and overlay.get('file') and not os.path.exists(overlay['file']):
        raise FileNotFoundError(f'pretrained weights for {name} not found: {overlay["file"]}')
    try:
        return build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as e:
        if not pretrained:
            raise
        if not source:  # the cfg's own weights (local-dir:, hf-hub:, a url): refused pickles get our message too
            unsafe = refused_pickle(cfg_source or name, e)
            if unsafe is None:
                raise
            raise unsafe from None
        _raise_file_error(name, source, e)


def load_checkpoint_naming_errors(model: nn.Module, checkpoint_path, *args, **kwargs):
    """`timm.create_model(..., checkpoint_path=FILE)` for our models: the route of `pretrained=True` with
    `pretrained_cfg_overlay=dict(file=FILE)`, strict. timm's reader loads the file (EMA weights preferred,
    safetensors, `module.` prefixes dropped); an unreadable or missing file raises the error naming it, the
    model's checkpoint filter converts the authors' layouts and names missing, unexpected and mis-shaped keys
    (the classifier and first conv included: this route adapts nothing). Other models, and calls with
    options, go to timm's `load_checkpoint` unchanged."""
    filter_fn = _FILTERS.get(type(model))
    path = str(checkpoint_path)
    if filter_fn is None or args or kwargs or os.path.splitext(path)[-1].lower() in ('.npz', '.npy'):
        return load_checkpoint(model, checkpoint_path, *args, **kwargs)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = _model_name(cfg.get('architecture') or type(model).__name__, cfg.get('tag'))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'pretrained weights for {name} not found: {path}')
    try:
        state_dict = load_state_dict(path)
    except Exception as e:
        _raise_file_error(name, path, e)
    state_dict = filter_fn(state_dict, model)
    check_state_dict_keys(state_dict, model, adaptable=False)
    return model.load_state_dict(state_dict, strict=True)


# timm.create_model calls the load_checkpoint of its factory module after building the model, out of reach of
# our builder: routed through ours (which hands every other model back to timm's)
if getattr(_timm_factory, 'load_checkpoint', None) is load_checkpoint:
    _timm_factory.load_checkpoint = load_checkpoint_naming_errors


def unwrap_checkpoint(state_dict: Dict) -> Dict:
    """The model weights inside a saved checkpoint: the EMA weights if present (as timm prefers), else
    'state_dict' or 'model' (the authors' files), else the dict itself; DataParallel 'module.' prefixes
    dropped."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    return {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys do not fit the model (the message names them). `num_classes`: the class count of the
    checkpoint's classifier where it differs from the model's (the fix is to create the model with it), else None."""

    def __init__(self, message: str, num_classes: Optional[int] = None):
        super().__init__(message)
        self.num_classes = num_classes


def check_state_dict_keys(state_dict: Dict[str, torch.Tensor], model: nn.Module, adaptable: bool = True):
    """Raise CheckpointMismatchError (a ValueError) naming missing, unexpected and mis-shaped keys, and the
    checkpoint's class count where its classifier does not fit.

    adaptable=True (the pretrained route, where timm adapts the classifier and the first conv after this filter):
    the file's classifier gives the class count its weights have, recorded as the pretrained cfg's num_classes,
    so timm keeps the classifier when the model has that many classes and re-initialises it (fine-tuning)
    otherwise; the first conv may differ in shape when in_chans differs from the cfg's (timm adapts it).
    adaptable=False: every key must fit as it is (the checkpoint_path route)."""
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None)
    cfg = cfg if isinstance(cfg, dict) else {}
    head = cfg.get('classifier', 'head.fc')
    head_keys = {head + '.weight', head + '.bias'}
    exempt = set()
    if adaptable:
        file_head = state_dict.get(head + '.weight')
        if cfg and isinstance(file_head, torch.Tensor) and file_head.ndim >= 1:
            cfg['num_classes'] = int(file_head.shape[0])
        if getattr(model, 'num_classes', None) != cfg.get('num_classes'):
            exempt |= head_keys
        if getattr(model, 'in_chans', None) != (cfg.get('input_size') or (3,))[0]:
            exempt.add(cfg.get('first_conv', 'stem.0.conv') + '.weight')  # a deployed model's own (its cfg overlay)
    # buffers registered as None (absent from a fresh model's state dict) may be present, e.g. an SMP layer's
    # render_grid; the layer checks their shape when loading
    optional = {f'{name}.{b}' if name else b for name, m in model.named_modules()
                for b, v in m._buffers.items() if v is None}
    # the kernel norms kept with BatchNorm statistics (KernelScaledBNMixin) are filled from the loaded kernels when
    # a file has none (the authors', ours from before them)
    filled = {f'{name}.{b}' if name else b for name, m in model.named_modules()
              if isinstance(m, KernelScaledBNMixin) for b in m._buffers if b.endswith('_kernel_sq')}
    missing = [k for k in own if k not in state_dict and k not in filled]
    unexpected = [k for k in state_dict if k not in own and k not in exempt and k not in optional]
    shapes = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
              for k, v in state_dict.items() if k in own and k not in exempt and v.shape != own[k].shape]
    problems = []
    for what, items in (('missing keys', missing), ('unexpected keys', unexpected), ('mis-shaped keys', shapes)):
        if items:
            more = f' (+{len(items) - 10} more)' if len(items) > 10 else ''
            problems.append(f'{len(items)} {what}: {", ".join(items[:10])}{more}')
    file_head, own_head = state_dict.get(head + '.weight'), own.get(head + '.weight')
    num_classes = None
    if (head + '.weight' not in exempt and isinstance(file_head, torch.Tensor) and own_head is not None
            and file_head.ndim >= 1 and file_head.shape[0] != own_head.shape[0]):
        num_classes = int(file_head.shape[0])
        problems.append(f'the checkpoint\'s classifier has {num_classes} classes, the model {own_head.shape[0]}')
    if problems:
        raise CheckpointMismatchError(
            f'checkpoint does not fit the {type(model).__name__}: ' + '; '.join(problems), num_classes=num_classes)


def saved_kernel_size(v: torch.Tensor, layer: Optional[nn.Module]) -> torch.Tensor:
    """The authors' `train_length` buffer (the horizon of the last forward before saving; 0 if none ran) -> our
    `kernel_size_record`. 0 means the horizon is unknown: taken as the layer's, so nothing is re-sampled."""
    k = int(v.reshape(-1)[0])
    if k == 0 and layer is not None:
        k = layer.kernel_size
    return torch.tensor(k, dtype=torch.long)


# the FlexConv authors' kernel network (MAGNet with 1x1 convs as its linear layers) -> ours
_FLEX_KERNEL = [
    (re.compile(r'^Kernel\.linear\.(\d+)\.(weight|bias)$'), 'kernel_net.hidden.{0}.{1}'),
    (re.compile(r'^Kernel\.output_linear\.(weight|bias)$'), 'kernel_net.output.{0}'),
    (re.compile(r'^Kernel\.filters\.(\d+)\.(mu|gamma)$'), 'kernel_net.filters.{0}.{1}'),
    (re.compile(r'^Kernel\.filters\.(\d+)\.linear\.(weight|bias)$'), 'kernel_net.filters.{0}.linear.{1}'),
]


def flexconv_from_authors(key: str, rest: str, v: torch.Tensor, prefix: str,
                          layer: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
    """One entry of a FlexConv saved by the FlexConv authors' code (rjbruin/flexconv; 2-D in FlexNet, 1-D in
    FlexTCN) -> our FlexConv2d / FlexConv1d entries.

    `key` is their whole key (for errors), `rest` the part after their conv's prefix, `prefix` our layer's
    ('blocks.0.conv1.conv.'), `layer` our layer. Their kernel network's 1x1 convs become our Linear weights
    (the trailing unit axes dropped); `train_length` becomes `kernel_size_record`, with the sampling-rate
    factor the layer is configured with (they do not save it); `temperature` (used by a sigmoid mask only,
    which they never implemented) is dropped; a `mask_threshold` other than the layer's is refused. The
    other entries (bias, mask_params: (dims, 2) rows [mean, sigma] in both) keep their names and values."""
    if rest == 'train_length':
        out = {prefix + 'kernel_size_record': saved_kernel_size(v, layer)}
        if isinstance(layer, FlexConv2d):
            out[prefix + 'sampling_rate_norm'] = layer.sampling_rate_norm.detach().clone()
        return out
    if rest == 'temperature':
        return {}
    if rest == 'mask_threshold':
        if isinstance(layer, FlexConv2d) and abs(float(v.reshape(-1)[0]) - layer.mask_threshold) > 1e-6:
            raise ValueError(
                f'{key} = {float(v.reshape(-1)[0])} but the model crops at mask_threshold='
                f'{layer.mask_threshold}; pass conv_kwargs=dict(mask_threshold=...)')
        return {}
    for pattern, ours in _FLEX_KERNEL:
        m = pattern.match(rest)
        if m:
            return {prefix + ours.format(*m.groups()): v.flatten(1) if v.ndim >= 3 else v}
    return {prefix + rest: v}


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
