""" BatchNorm running statistics that start from what the network computes, not from PyTorch's 0 / 1.

PyTorch starts every BatchNorm's running mean at 0 and running variance at 1, which suits a BatchNorm whose input
has about unit variance. In our models most BatchNorms follow a conv with the authors' small init (trunc-normal
std 0.02, SMP kernels of a few such points): at initialisation their inputs have variances of about 1e-4 to 1e-1
(smpconv_mobile31 at 224 px: large-kernel branches 2e-2 to 3e-3, small-kernel branches 3e-3, depthwise downsampling
1e-3), and lower still where a large kernel meets a small map (4e-4 to 3e-4 in the last stage at 32 px). A model
follows its batches within a few dozen steps (momentum 0.1), but an EMA of the model that averages buffers too
(timm's ModelEmaV3, as timm's train.py and timm.task keep it) keeps decay^t of the starting 1.0 for thousands of
steps, and evaluated, divides those branches by a variance 10 to 1000 times their own: a run's EMA then sits at
chance whatever its weights learned.

Two measures, one rule ("a BatchNorm's running statistics start as the statistics of its input"):

* `init_bn_running_stats_(model, x)`: every BatchNorm's running mean and variance set to those of its input in one
  training-mode forward of x (momentum 1 for that forward), with no other effect (weights, other buffers, the mode,
  the random number generators as they were). Our models call it at creation on a fixed random probe of their
  default input size (`BatchNormStatsMixin._init_bn_stats`).
* `BatchNormStatsMixin`: the first training step's forward (training mode, autograd on) sets them again from its
  batch (one extra forward without gradients, once; forwards without autograd, such as a re-estimation of the
  statistics with fvcore's PreciseBN, leave it pending), so the statistics match the data's resolution and
  distribution, not the probe's. An EMA that copies the model at its first update (ModelEmaV3 updated with
  `step`, as timm's trainers do) starts from them too. Loading a state dict that holds running statistics (a checkpoint, pretrained weights,
  a resume) ends it: those statistics are real. Skipped under torch.compile, torch.export, TorchScript, jit and fx
  tracing (graphs see a plain model; a compiled run keeps the creation probe's statistics).
"""
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['BN_MOMENTUM', 'BatchNormStatsMixin', 'init_bn_running_stats_']

BN_MOMENTUM = 0.3  # our models' BatchNorm momentum unless bn_momentum= is given (see BatchNormStatsMixin)

_STAT_NAMES = ('running_mean', 'running_var')


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
        # graphs (compile, export, jit and fx tracing) see the plain model: no guard on the flag, no extra forward
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
            return
        if self.training and self._bn_stats_from_first_batch and torch.is_grad_enabled():
            self._bn_stats_from_first_batch = False
            init_bn_running_stats_(self, x)
