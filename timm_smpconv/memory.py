""" Device-independent costs of a training step: the bytes a forward keeps for the backward (by layer type), and
the number of aten ops a step dispatches (on a GPU: kernel launches, give or take views and fusions).

    from timm_smpconv.memory import count_aten_ops, saved_activation_bytes
    report = saved_activation_bytes(model, x, amp=True)   # report.total, report.by_type, report.per_image
    ops = count_aten_ops(lambda: F.cross_entropy(model(x), y).backward())

Every tensor an op saves for the backward passes through a `torch.autograd.graph.saved_tensors_hooks` pack hook;
the report counts each storage once (a tensor saved by several ops, or views of one tensor, are kept once),
excludes the model's parameters and buffers (kept anyway), and attributes the bytes to the innermost module
running when the storage was first saved (by type: BatchNorm2d, Conv2d, SMPConv2d, ...). This is the memory the
activations hold at the end of the forward, device-independent (the CUDA allocator's peak adds the backward's
transient tensors and its block rounding). Recipes of `timm_smpconv.layers.recompute` are counted by what they
keep (their inputs), not by the tensors they stand for.
"""
import collections
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
import torch.nn as nn

__all__ = ['SavedBytes', 'count_aten_ops', 'saved_activation_bytes']


@dataclass
class SavedBytes:
    """total: bytes kept for the backward; by_type: the same by module type; batch: the batch size."""
    total: int
    batch: int
    by_type: Dict[str, int] = field(default_factory=dict)

    @property
    def per_image(self) -> float:
        return self.total / self.batch


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, amp: bool = False,
                           amp_dtype: torch.dtype = torch.bfloat16) -> SavedBytes:
    """Run model(x) with autograd (under autocast with `amp`) and count what it keeps for the backward (module
    docstring). The model's mode is used as is (call .train() first for training memory); nothing is run
    backward."""
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: Dict[int, tuple] = {}
    stack = []

    def pre(module, args):
        stack.append(type(module).__name__)

    def post(module, args, output):
        stack.pop()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in kept and ptr not in seen:
            seen[ptr] = (storage.nbytes(), stack[-1] if stack else type(model).__name__, storage)
        # detached: a saved output handed back itself would hold its own node (a cycle, never freed)
        return t if t.grad_fn is None else t.detach()

    pack.observes_saved_tensors = True  # recompute scopes report what they keep instead of stepping aside
    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp):
                model(x)
    finally:
        for h in handles:
            h.remove()
    by_type = collections.Counter()
    for nbytes, owner, _ in seen.values():
        by_type[owner] += nbytes
    return SavedBytes(sum(by_type.values()), x.shape[0], dict(by_type.most_common()))


def count_aten_ops(fn: Callable[[], object]) -> int:
    """The number of aten ops `fn()` dispatches (every op that reaches a backend: views and in-place updates
    included), counted with a TorchDispatchMode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n
