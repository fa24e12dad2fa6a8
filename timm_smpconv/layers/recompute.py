""" Keeping less for the backward: cheap pointwise results are recomputed from what is kept anyway.

A training forward keeps, for the backward, the tensors its ops save: a BatchNorm its input, a ReLU its output,
a convolution its input. In a conv -> BN -> ReLU -> conv chain that is three maps where one suffices: the BN
output and the ReLU output are cheap pointwise functions of the BN input (with the batch statistics BN saves
anyway). Within a `recompute_scope`, a tensor registered with `recompute_saved(t, fn, *inputs)` is not kept by the
ops that save it: a recipe (fn and its inputs, tensors kept anyway) is kept instead, and the backward recomputes
it, once, when the first op that needs it runs (torch.autograd.graph.saved_tensors_hooks). Outputs are untouched;
the recomputed values equal the kept ones to float rounding (BatchNorm's affine step is evaluated by PyTorch's
elementwise ops, not its BN kernel: at most an ulp apart), so gradients agree to ~1e-7 relative.

The scope does nothing (everything is kept as usual) where another saved-tensor hook is active (gradient
checkpointing, `torch.autograd.graph.save_on_cpu`), under torch.compile (Inductor chooses what to recompute
itself), TorchScript and fx tracing, and without autograd.
"""
import threading
import weakref
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from ..ops.fft import keep_spectra

__all__ = ['activation', 'batch_norm_affine', 'recompute_activation', 'recompute_batch_norm', 'recompute_dropout',
           'recompute_saved', 'recompute_scope', 'recompute_sum', 'recomputing']

_state = threading.local()


def _scopes() -> List['recompute_scope']:
    if not hasattr(_state, 'scopes'):
        _state.scopes = []
    return _state.scopes


def recomputing() -> bool:
    """A recompute scope is active here (registered tensors will be recomputed, not kept). Never while compiling."""
    if torch.compiler.is_compiling():
        return False
    scopes = _scopes()
    if not scopes or not scopes[-1].active:
        return False
    # and its hooks are the innermost: inside a checkpointed region (whose own hooks see the saves) the model
    # computes exactly as without a scope, as the checkpoint's recomputation will
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and top[0] == scopes[-1]._pack


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


class _Recipe:
    """fn(*inputs), computed on first use and shared by every op that saved the tensor. Inputs may be recipes."""
    __slots__ = ('fn', 'inputs', 'versions', 'value', '__weakref__')

    def __init__(self, fn: Callable, inputs: tuple):
        self.fn = fn
        self.inputs = inputs
        self.versions = tuple(i._version if isinstance(i, torch.Tensor) else None for i in inputs)
        self.value = None

    def __call__(self) -> torch.Tensor:
        if self.value is None:
            for i, v in zip(self.inputs, self.versions):
                if v is not None and i._version != v:
                    raise RuntimeError('an input of a recomputed tensor was modified in place after the forward '
                                       '(timm_smpconv.layers.recompute): disable recompute for this model')
            self.value = self.fn(*(i() if isinstance(i, _Recipe) else i for i in self.inputs))
        return self.value


class recompute_scope:
    """`with recompute_scope(): ...` recomputes, in the backward, the tensors registered with `recompute_saved`
    inside the block instead of keeping them (module docstring). `enabled=False`: a no-op. `fft_spectra=True`:
    FFT convolutions keep their input only and transform it again in the backward (`ops.keep_spectra`)."""

    def __init__(self, enabled: bool = True, fft_spectra: bool = False):
        self.enabled = enabled
        self.fft_spectra = fft_spectra
        self._spectra = None
        self.active = False
        self.recipes = {}
        self.observer: Optional[Callable] = None
        self._hooks = None

    def __enter__(self):
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        # an outer hook marked as an observer (the memory accounting of timm_smpconv.memory) sees what is kept
        self.observer = outer[0] if outer is not None and getattr(outer[0], 'observes_saved_tensors', False) else None
        self.active = (self.enabled and torch.is_grad_enabled() and (outer is None or self.observer is not None)
                       and not torch.compiler.is_compiling())
        if self.active:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
            if self.fft_spectra:
                self._spectra = keep_spectra(False)
                self._spectra.__enter__()
        _scopes().append(self)
        return self

    def __exit__(self, *exc):
        _scopes().pop()
        if self._spectra is not None:
            self._spectra.__exit__(*exc)
            self._spectra = None
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        self.recipes.clear()  # packed recipes live on in the graph; new saves are not ours any more
        self.active = False
        return False

    def recipe_of(self, t: torch.Tensor) -> Optional[_Recipe]:
        """t's recipe: registered for this very tensor (a weak reference: a new tensor in a freed one's memory is
        not it) and not modified in place since."""
        entry = self.recipes.get(_key(t))
        if entry is None or entry[1]() is not t or entry[2] != t._version:
            return None
        return entry[0]

    def register(self, t: torch.Tensor, fn: Callable, inputs: tuple) -> _Recipe:
        recipe = _Recipe(fn, inputs)
        self.recipes[_key(t)] = (recipe, weakref.ref(t), t._version)
        return recipe

    def _pack(self, t: torch.Tensor):
        recipe = self.recipe_of(t)
        if recipe is not None:
            if self.observer is not None:
                _observe_inputs(self.observer, recipe)
            return recipe
        if self.observer is not None:
            self.observer(t)
        # detached: a tensor an op saves of its own outputs would otherwise hold that op's node, which holds it (a
        # cycle through the graph that Python's collector cannot see: a graph dropped without a backward leaked)
        return t if t.grad_fn is None else t.detach()

    @staticmethod
    def _unpack(packed):
        return packed() if isinstance(packed, _Recipe) else packed


def _observe_inputs(observer: Callable, recipe: _Recipe):
    for i in recipe.inputs:
        if isinstance(i, _Recipe):
            _observe_inputs(observer, i)
        elif isinstance(i, torch.Tensor):
            observer(i)


def recompute_saved(t: torch.Tensor, fn: Callable, *inputs) -> Optional[_Recipe]:
    """Register `t == fn(*inputs)` with the innermost active recompute scope: ops that save `t` for the backward keep
    the recipe instead. `inputs` are tensors kept anyway (or recipes returned by this function, or anything else
    fn takes). Returns the recipe (None where no scope is active); `t` itself is unchanged."""
    if not isinstance(t, torch.Tensor) or not t.requires_grad or not recomputing():
        return None
    return _scopes()[-1].register(t, fn, inputs)


_BN_NODES = ('NativeBatchNormBackward0', 'CudnnBatchNormBackward0', 'MiopenBatchNormBackward0')


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, stride: tuple) -> torch.Tensor:
    """x * scale + shift per channel (dim 1), in scale's precision, rounded once to `dtype`, laid out with `stride`."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))
    if out.dtype == dtype and out.stride() == stride:
        return out
    return torch.empty_strided(x.shape, stride, dtype=dtype, device=x.device).copy_(out)


def batch_norm_affine(x: torch.Tensor, y: torch.Tensor, bn: nn.Module):
    """For `y = bn(x)` in training (batch statistics): a recipe `(fn, inputs)` recomputing y from x and the
    statistics BN saved, or None where that is not available (eval statistics, affine=False, an unknown
    BatchNorm implementation). The recipe holds no reference to y."""
    node = y.grad_fn
    if type(node).__name__ not in _BN_NODES or not getattr(node, '_saved_training', True):
        return None
    if bn.weight is None or bn.bias is None:
        return None
    mean, invstd = node._saved_result1, node._saved_result2  # per-channel batch mean and 1 / sqrt(var + eps)
    if mean.numel() != x.shape[1] or invstd.numel() != x.shape[1]:
        return None
    dtype, stride = y.dtype, y.stride()
    # as PyTorch's BN kernels compute it: in float32 for half-precision inputs, in the input's precision otherwise
    # (float64 stays float64: a float32 recipe would put float32 rounding into a float64 model's gradients)
    compute = torch.promote_types(dtype, torch.float32)

    def fn(x, mean, invstd, weight, bias):
        scale = invstd.to(compute) * weight.to(compute)
        return _affine(x, scale, bias.to(compute) - mean.to(compute) * scale, dtype, stride)

    return fn, (x, mean, invstd, bn.weight, bn.bias)  # (mean and invstd come detached from the hooks)


def _recipe_or_tensor(t: torch.Tensor):
    """t's recipe where t is registered in the active scope, else t itself (kept: an input kept anyway)."""
    recipe = _scopes()[-1].recipe_of(t)
    return t if recipe is None else recipe


def recompute_batch_norm(x: torch.Tensor, y: torch.Tensor, bn: nn.Module) -> Optional[_Recipe]:
    """Register `y = bn(x)` (training statistics) to be recomputed from x; None where not possible."""
    if not recomputing() or not y.requires_grad:
        return None
    recipe = batch_norm_affine(x, y, bn)
    if recipe is None:
        return None
    fn, inputs = recipe
    return recompute_saved(y, fn, *inputs)


def _activation_fn(act: nn.Module) -> Optional[Callable]:
    if isinstance(act, nn.ReLU):
        return torch.relu
    if isinstance(act, nn.GELU):
        approximate = act.approximate
        return lambda t: torch.nn.functional.gelu(t, approximate=approximate)
    return None


def activation(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """act(y); a ReLU in a recompute scope as `torch.threshold(y, 0, 0)` (the same values and gradient), which keeps
    its input for the backward where ReLU keeps its output: registered beforehand, the input is recomputed too,
    while the output, only known after the call, could not be."""
    if recomputing() and type(act) is nn.ReLU and not act.inplace:
        return torch.threshold(y, 0., 0.)
    return act(y)


def recompute_activation(z: torch.Tensor, act: nn.Module, y: torch.Tensor) -> Optional[_Recipe]:
    """Register `z = act(y)` (ReLU or GELU) to be recomputed from y, itself recomputed if registered."""
    fn = _activation_fn(act)
    if fn is None or not recomputing() or not z.requires_grad:
        return None
    return recompute_saved(z, fn, _recipe_or_tensor(y))


def recompute_sum(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Optional[_Recipe]:
    """Register `z = a + b` to be recomputed from a and b (each recomputed if registered)."""
    if not recomputing() or not z.requires_grad:
        return None
    return recompute_saved(z, torch.add, _recipe_or_tensor(a), _recipe_or_tensor(b))


def recompute_dropout(z: torch.Tensor, y: torch.Tensor) -> Optional[_Recipe]:
    """Register `z = dropout(y)` (training) to be recomputed from y (itself recomputed if registered) and what
    dropout keeps anyway: its mask (CUDA's fused dropout: y * mask * scale) or its scaled noise (CPU: y * noise)."""
    if not recomputing() or not z.requires_grad:  # first: under torch.compile nothing may read grad_fn
        return None
    node = z.grad_fn
    kind = type(node).__name__
    if kind == 'NativeDropoutBackward0':
        mask, scale = node._saved_result1, node._saved_scale
        return recompute_saved(z, lambda y, mask: y.mul(mask).mul_(scale), _recipe_or_tensor(y), mask)
    if kind == 'MulBackward0':
        noise = node._saved_other
        if isinstance(noise, torch.Tensor) and noise.shape == z.shape and not noise.requires_grad:
            return recompute_saved(z, torch.mul, _recipe_or_tensor(y), noise)
    return None
