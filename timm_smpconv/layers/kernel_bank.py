""" Generating the kernels of many continuous-kernel layers in one batched evaluation.

Each FlexConv / SMP layer generates its kernel on every forward from a few small tensors: a kernel network on a
grid of positions, or the points' tents. Layer by layer that is a few dozen small ops (and, in the backward, twice
as many) per layer: on a GPU the CIFAR models are launch-bound by them. Inside `batched_kernels(layers)`, the
kernels of all the layers are generated up front, one batched evaluation per group of layers of one kind (the
layer types' `batched_weights`: their parameters stacked, one op where there was one per layer); each layer then
takes its own kernel in its forward (`take_kernel`) instead of generating it. The kernels are the same (to float
rounding: batched matmuls sum in another order).

Used by the FlexNet models' forward; a no-op under TorchScript, tracing, fx and torch.compile (where each layer
generates its own kernel, as before).
"""
import threading
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

__all__ = ['batched_kernels', 'captured_kernel', 'note_kernel', 'take_kernel']

_state = threading.local()


def _banks() -> List[Dict[int, torch.Tensor]]:
    if not hasattr(_state, 'banks'):
        _state.banks = []
    return _state.banks


def take_kernel(layer: nn.Module) -> Optional[torch.Tensor]:
    """The kernel generated for `layer` by the innermost `batched_kernels`, once (None: generate it yourself)."""
    if torch.compiler.is_compiling():
        return None
    banks = _banks()
    return banks[-1].pop(id(layer), None) if banks else None


class batched_kernels:
    """`with batched_kernels(layers): ...`: the layers (those with a `batched_weights` staticmethod and a
    `batch_key()`, None for a layer that generates its own) get their kernels from one batched evaluation per
    group of compatible layers, computed on entering (module docstring). `enabled=False`: a no-op."""

    def __init__(self, layers: Iterable[nn.Module], enabled: bool = True):
        self.layers = [m for m in layers if getattr(type(m), 'batched_weights', None) is not None]
        self.enabled = enabled and not (torch.jit.is_tracing() or torch.compiler.is_compiling())

    def __enter__(self):
        bank: Dict[int, torch.Tensor] = {}
        if self.enabled:
            groups: Dict[tuple, List[nn.Module]] = {}
            for m in self.layers:
                key = m.batch_key()
                if key is not None:
                    groups.setdefault((type(m),) + key, []).append(m)
            for key, group in groups.items():
                if len(group) > 1:
                    for m, w in zip(group, key[0].batched_weights(group)):
                        bank[id(m)] = w
        _banks().append(bank)
        return self

    def __exit__(self, *exc):
        _banks().pop()
        return False


def _captures() -> list:
    if not hasattr(_state, 'captures'):
        _state.captures = []
    return _state.captures


class captured_kernel:
    """`with captured_kernel(layer) as cap: y = layer(x)`: `cap.kernel` is the kernel the layer convolved with (its
    forward reports it with `note_kernel`), or None. The layer is called as a module (its hooks run, FLOP
    counters file its work under it) and nothing is generated twice: the BatchNorm after it reads the kernel's
    norm (`KernelScaledBNMixin`). Not under torch.compile (take None there)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.kernel: Optional[torch.Tensor] = None

    def __enter__(self):
        _captures().append(self)
        return self

    def __exit__(self, *exc):
        _captures().pop()
        return False


def note_kernel(layer: nn.Module, kernel: torch.Tensor) -> None:
    """Called by a continuous-kernel layer's forward with the kernel it convolved with (see `captured_kernel`)."""
    if torch.compiler.is_compiling():
        return
    caps = _captures()
    if caps and caps[-1].layer is layer:
        caps[-1].kernel = kernel
