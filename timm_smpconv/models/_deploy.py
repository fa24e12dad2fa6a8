""" Deployed models, shared by our model families: the reparameterized structure built directly
(`inference_mode=True`), what a model records for timm's Hugging Face format, and how a checkpoint's form
and kernel shapes are matched to the model.

A model is *deployed* when it holds no continuous-kernel layer: `timm.models.reparameterize_model` made it, or
`timm.create_model(name, inference_mode=True)` built it. Both have the same modules, state-dict keys and
shapes. Each continuous-kernel *branch* of a training model (an SMP large-kernel branch, a FlexConv + BN) is
one plain conv in the deployed model, under the same module name.

The kernel size of a deployed branch is fixed by the creation arguments (SMPConvNet's `kernel_sizes`, a
sequence model's `seq_len`, CKConv's horizon) except where training decides it: FlexConv's masks crop their
kernels (a fresh layer's initial mask gives the default), and SMP layers with `crop_to_support` keep only
their points' support. Those sizes come from `inference_kernel_sizes` (one entry per branch, which a deployed
model records in the `model_args` timm saves with it) or from a checkpoint's shapes, read by the model's
checkpoint filter when the model is created with `pretrained=True`.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers import CausalConv1d, FlexConv2d, LargeKernelConv2d
from ..layers.smp_conv import _SMPConvNd

__all__ = [
    'DeployableMixin', 'check_checkpoint_form', 'deployed_conv', 'deployed_first_conv', 'kernel_size_entry',
    'parse_kernel_sizes', 'require_deploy_sizes',
]

KernelSizes = Sequence[Union[int, Sequence[int]]]


def kernel_size_entry(shape: Sequence[int]) -> Union[int, List[int]]:
    """A kernel shape as `inference_kernel_sizes` holds it (JSON-friendly): an int when every dim is equal, else
    a list."""
    shape = [int(s) for s in shape]
    return shape[0] if len(set(shape)) == 1 else shape


def parse_kernel_sizes(
        sizes: KernelSizes,
        horizons: Sequence[int],
        dims: int,
        minimum: Optional[Sequence[int]] = None,
) -> List[Tuple[int, ...]]:
    """Check `inference_kernel_sizes` against the branches' horizons (their largest kernels): one entry per
    branch, an int or `dims` ints, each at most the horizon, odd in 2-D ('same' padding), at least `minimum`
    (per branch, e.g. a parallel small kernel). Returns one shape tuple per branch."""
    name = 'inference_kernel_sizes'
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f'{name} must be a list with one kernel size per continuous-kernel layer, got {sizes!r}')
    if len(sizes) != len(horizons):
        raise ValueError(f'{name} has {len(sizes)} entries but the model has {len(horizons)} continuous-kernel '
                         f'layers')
    out = []
    for i, (s, k) in enumerate(zip(sizes, horizons)):
        shape = tuple(s) if isinstance(s, (tuple, list)) else (s,) * dims
        if len(shape) != dims or any(isinstance(v, bool) or not isinstance(v, int) for v in shape):
            raise ValueError(f'{name}[{i}] must be an int or {dims} ints, got {s!r}')
        low = minimum[i] if minimum is not None else 1
        if any(v < low or v > k or (dims == 2 and v % 2 == 0) for v in shape):
            odd = 'odd ' if dims == 2 else ''
            raise ValueError(f'{name}[{i}] = {s!r}: each size must be an {odd}int from {low} to the layer\'s '
                             f'kernel size {k}')
        out.append(shape)
    return out


def deployed_conv(
        in_channels: int,
        out_channels: int,
        shape: Sequence[int],
        stride: int = 1,
        groups: int = 1,
        device=None,
        dtype=None,
) -> nn.Module:
    """The plain conv (with bias) a continuous-kernel branch fuses to: a 'same' LargeKernelConv2d for a 2-D
    `shape`, a CausalConv1d for a 1-D one."""
    if len(shape) == 2:
        return LargeKernelConv2d(in_channels, out_channels, tuple(shape), stride=stride, groups=groups, bias=True,
                                 device=device, dtype=dtype)
    return CausalConv1d(in_channels, out_channels, shape[0], stride=stride, groups=groups, bias=True,
                        device=device, dtype=dtype)


def _resized_conv(conv: nn.Module, shape: Sequence[int]) -> nn.Module:
    return deployed_conv(conv.in_channels, conv.out_channels, shape, conv.stride[0], conv.groups,
                         device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)


class DeployableMixin:
    """Deployed-form support for a model class (listed before nn.Module in its bases).

    The model's __init__ calls `_init_deploy`; it implements `_deploy_branches()`, the (module name, horizon)
    of every continuous-kernel branch in order. In return:

    * `model.inference_mode`: True when the model is deployed (reparameterized or built so);
    * `model.deployed_kernel_sizes()`: the kernel size of every deployed branch;
    * timm's recorded creation arguments (`model._model_args`, which `save_for_hf` / `push_to_hf_hub` write to
      config.json) say `inference_mode=True` for a deployed model, with its `inference_kernel_sizes` where
      training decides them, so `create_model('local-dir:...' / 'hf-hub:...', pretrained=True)` rebuilds it.
    """
    # computed from the modules; TorchScript need not compile them
    __jit_unused_properties__ = ['inference_mode', '_model_args']

    def _init_deploy(self, sizes_learned: bool, size_source: str, sizes_given: bool):
        """sizes_learned: training decides the deployed kernel sizes; size_source: the creation arguments
        that fix them otherwise (for error messages); sizes_given: `inference_kernel_sizes` was passed."""
        self._deploy_sizes_learned = sizes_learned
        self._deploy_size_source = 'inference_kernel_sizes' if sizes_given else size_source
        self._deploy_sizes_fixed = sizes_given or not sizes_learned

    def _deploy_branches(self) -> List[Tuple[str, int]]:
        raise NotImplementedError

    @property
    def inference_mode(self) -> bool:
        return not any(isinstance(m, (_SMPConvNd, FlexConv2d)) for m in self.modules())

    @torch.jit.ignore
    def deployed_kernel_sizes(self) -> List[Union[int, List[int]]]:
        """The kernel size of every continuous-kernel branch of the deployed model (an int, or [h, w])."""
        if not self.inference_mode:
            raise ValueError('the model is not deployed: reparameterize it first (timm.models.reparameterize_model)')
        return [kernel_size_entry(self.get_submodule(n).weight.shape[2:]) for n, _ in self._deploy_branches()]

    @property
    def _model_args(self) -> Dict[str, Any]:
        args = {k: v for k, v in self.__dict__.get('_factory_model_args', {}).items()
                if k not in ('inference_mode', 'inference_kernel_sizes')}
        if self.inference_mode:
            args['inference_mode'] = True
            if self._deploy_sizes_learned:
                args['inference_kernel_sizes'] = self.deployed_kernel_sizes()
        return args

    @_model_args.setter
    def _model_args(self, value: Dict[str, Any]):
        # timm's factory and update_model_args store the creation arguments here
        self.__dict__['_factory_model_args'] = dict(value)

    @torch.jit.ignore
    def _adopt_deployed_shapes(self, state_dict: Dict[str, torch.Tensor]):
        """Give the deployed branches the checkpoint's kernel shapes where training decides them; raise
        ValueError where the creation arguments fix them and the checkpoint disagrees."""
        branches = self._deploy_branches()
        found = []
        for name, horizon in branches:
            w, conv = state_dict.get(name + '.weight'), self.get_submodule(name)
            if not isinstance(w, torch.Tensor) or w.dim() != conv.weight.dim() or w.shape[:2] != conv.weight.shape[:2]:
                continue  # absent or other channels: the key check names it
            if w.shape[2:] != conv.weight.shape[2:]:
                found.append((name, horizon, tuple(w.shape[2:]), tuple(conv.weight.shape[2:])))
        if not found:
            return
        if self._deploy_sizes_fixed:
            listed = '; '.join(f'{n}: checkpoint {kernel_size_entry(c)}, model {kernel_size_entry(m)}'
                               for n, _, c, m in found[:4])
            more = f' (+{len(found) - 4} more)' if len(found) > 4 else ''
            raise ValueError(
                f'the checkpoint\'s deployed kernel sizes disagree with the model\'s, which {self._deploy_size_source} '
                f'fixes: {listed}{more}. Create the model with the arguments the checkpoint was deployed with')
        for name, horizon, shape, _ in found:
            if any(s > horizon for s in shape) or (len(shape) == 2 and any(s % 2 == 0 for s in shape)):
                raise ValueError(
                    f'{name}.weight: the checkpoint\'s deployed kernel {kernel_size_entry(shape)} does not fit this '
                    f'model, whose kernels are at most {horizon} ({self._deploy_size_source})'
                    f'{" and odd" if len(shape) == 2 else ""}: create it with the arguments the checkpoint was '
                    f'deployed with')
            self.set_submodule(name, _resized_conv(self.get_submodule(name), shape))


def check_checkpoint_form(state_dict: Dict[str, torch.Tensor], model: nn.Module, family: str):
    """Match the checkpoint's form to the model's: a deployed checkpoint needs `inference_mode=True`, a training
    checkpoint a training model (ValueError saying so); a deployed model takes the checkpoint's kernel shapes
    where training decides them (see `DeployableMixin._adopt_deployed_shapes`)."""
    names = [n for n, _ in model._deploy_branches()]
    deployed = any(f'{n}.weight' in state_dict for n in names)
    training = any(k.endswith('kernel_size_record') for k in state_dict)
    if model.inference_mode:
        if training and not deployed:
            raise ValueError(
                f'the checkpoint holds the training form of {family} (continuous kernels), but the model was created '
                f'with inference_mode=True: create it without inference_mode and reparameterize it '
                f'(timm.models.reparameterize_model), or deploy the checkpoint with python -m timm_smpconv.export')
        model._adopt_deployed_shapes(state_dict)
    elif deployed and not training:
        raise ValueError(
            f'the checkpoint holds the deployed (reparameterized) form of {family}: create the model with inference_mode=True '
            f'(a deployed model runs inference only; train or fine-tune from the training checkpoint)')


def require_deploy_sizes(variant: str, pretrained: bool, needed: bool, why: str):
    """A deployed model whose kernel sizes training decides needs `inference_kernel_sizes` or a checkpoint."""
    if needed and not pretrained:
        raise ValueError(
            f'{variant} with inference_mode=True and {why}: the deployed kernel sizes depend on training. Pass '
            f'inference_kernel_sizes=[...] (a deployed model records them in the config.json that save_for_hf '
            f'writes) or load a deployed checkpoint (pretrained=True with pretrained_cfg_overlay=dict(file=...), '
            f'or a local-dir: / hf-hub: name)')


def deployed_first_conv(model_args: Dict[str, Any], name: str):
    """Name the deployed model's first conv in its pretrained cfg (through the overlay `model_args` carries), so
    timm's in_chans adaptation and its cfg checks find it."""
    model_args['pretrained_cfg_overlay'] = dict(model_args.get('pretrained_cfg_overlay') or {}, first_conv=name)
