""" BatchNorm running statistics that start from, and keep up with, what the network computes.

PyTorch starts every BatchNorm's running mean at 0 and running variance at 1, which suits a BatchNorm whose input
has about unit variance. Our models' BatchNorm inputs are far from it at initialisation: after the authors' small
conv init (trunc-normal std 0.02, SMP kernels of a few such points) about 1e-4 to 1e-1 (smpconv_mobile31 at 224 px:
large-kernel branches 2e-2 to 3e-3, small-kernel branches 3e-3, depthwise downsampling 1e-3; 3e-4 in the last stage
at 32 px), after generated FlexConv / CKConv kernels (not scaled to their fan-in) up to 50 (flexnet_16) and 5e5
(ckcnn_16). An EMA of the model that averages buffers too (timm's ModelEmaV3, as timm's train.py and timm.task keep
it) carries decay^t of the starting 1.0 for thousands of steps and, evaluated, scales those branches by orders of
magnitude.

What our models do (`BatchNormStatsMixin`), one rule: a BatchNorm's running statistics start as the statistics of
its input.

* At creation `init_bn_running_stats_(model, probe)`: every BatchNorm's running mean and variance set to those of
  its input in one training-mode forward of a fixed random probe of the model's default input size (momentum 1 for
  that forward), with no other effect (weights, other buffers, the mode, the random number generators as they
  were).
* The first training step's forward (training mode, autograd on) sets them again from its batch: one extra forward
  without gradients, once, so that they match the data's resolution and distribution, not the probe's. An EMA that
  copies the model at its first update (ModelEmaV3 updated with `step`, as timm's trainers do) starts from them.
  Forwards without autograd (a re-estimation with fvcore's PreciseBN, evaluation) leave it pending; loading a state
  dict that holds running statistics (a checkpoint, pretrained weights, a resume) ends it: those are real. Skipped
  under torch.compile, torch.export, TorchScript, jit and fx tracing (graphs see the plain model; a compiled run
  keeps the creation probe's statistics).

And a faster running average, `BN_MOMENTUM` 0.3 instead of PyTorch's 0.1 (every BatchNorm; `bn_momentum=` at
creation, which timm's train.py passes for --bn-momentum, sets another): early in training, at the peak learning
rate, these models' BatchNorm inputs move by a large fraction of their spread each step (AdamW's steps are large
against the small initial weights), and a 0.1 average, about 10 steps behind, evaluated the built-in digits model at
10-33% where its weights gave 78-92% (with re-estimated statistics); 0.3 (3 steps behind) and 0.5 brought it within
a few points from the second epoch (docs/training.md, "BatchNorm statistics"). Training is not affected (training
mode normalises with the batch's statistics), nor are checkpoints (the momentum is not saved).
"""
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['BN_MOMENTUM', 'BatchNormStatsMixin', 'capturing_graph', 'init_bn_running_stats_']

BN_MOMENTUM = 0.3  # our models' BatchNorm momentum unless bn_momentum= is given (see BatchNormStatsMixin)

_STAT_NAMES = ('running_mean', 'running_var')


def capturing_graph(x: torch.Tensor) -> bool:
    """True while a graph is being captured from a forward with input x (torch.compile, torch.export and ONNX
    export, jit tracing, fx symbolic tracing): the models' eager-only steps (the first batch's statistics, the CPU
    channels_last computation) then stand aside, so that graphs see the plain model."""
    return (isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


def _tracked_bns(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def init_bn_running_stats_(module: nn.Module, *inputs, **kwargs) -> int:
    """Set the running mean and variance of every BatchNorm in `module` to the statistics of its input in one
    training-mode forward `module(*inputs, **kwargs)` (each BatchNorm's momentum is 1 for that forward; the
    variance is the unbiased batch variance, as BatchNorm keeps it).

    Nothing else changes: no gradient is computed, every other buffer (num_batches_tracked included) is restored,
    every submodule keeps its training mode and momentum, and the CPU and CUDA random number generators are left
    as they were (dropout and drop-path draw in the forward). Returns the number of BatchNorms set."""
    bns = _tracked_bns(module)
    if not bns:
        return 0
    stats = {id(getattr(bn, n)) for bn in bns for n in _STAT_NAMES}
    others = [(b, b.clone()) for b in module.buffers() if id(b) not in stats]
    modes = [(m, m.training) for m in module.modules()]
    momenta = [bn.momentum for bn in bns]
    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            for bn in bns:
                bn.momentum = 1.0
            module.train()
            module(*inputs, **kwargs)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
            for m, training in modes:
                m.training = training
            for b, saved in others:
                b.copy_(saved)
    return len(bns)


def _stats_loaded(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: statistics just loaded are real ones; the first batch leaves them alone.
    (A plain function of the module, not a bound method: a deep copy of the model, an EMA, keeps it right.)"""
    module._bn_stats_from_first_batch = False


class BatchNormStatsMixin:
    """Running statistics that start from the network's own (module doc). For a model class (listed before
    nn.Module): its __init__ calls `_init_bn_stats(probe)` last, and its forward paths call
    `self._first_batch_bn_stats(x)` first (`if not torch.jit.is_scripting()`)."""

    def _init_bn_stats(self, probe_shape: Optional[tuple], momentum: Optional[float] = None, eps: Optional[float] = None):
        """probe_shape: (batch, channels, *spatial) of the creation probe (random normal values, a fixed seed), or
        None for no probe. Models on the meta device, and models without BatchNorm (deployed), are left alone.
        momentum, eps: every BatchNorm's (timm's `bn_momentum` / `bn_eps` model arguments, which timm's train.py
        passes for --bn-momentum / --bn-eps); momentum defaults to BN_MOMENTUM, eps stays each layer's."""
        for bn in _tracked_bns(self):
            bn.momentum = BN_MOMENTUM if momentum is None else momentum
            if eps is not None:
                bn.eps = eps
        self._bn_stats_from_first_batch = False  # (not during the probe's own forward)
        self.register_load_state_dict_post_hook(_stats_loaded)
        if not _tracked_bns(self):
            return
        p = next(self.parameters(), None)
        if probe_shape is not None and p is not None and not p.is_meta:
            g = torch.Generator().manual_seed(0)
            init_bn_running_stats_(self, torch.randn(probe_shape, generator=g).to(device=p.device, dtype=p.dtype))
        self._bn_stats_from_first_batch = True

    @torch.jit.unused
    def _first_batch_bn_stats(self, x: torch.Tensor) -> None:
        if capturing_graph(x):  # no guard on the flag, no extra forward in a graph
            return
        if self.training and self._bn_stats_from_first_batch and torch.is_grad_enabled():
            self._bn_stats_from_first_batch = False
            init_bn_running_stats_(self, x)
