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

And eval-mode variances that follow the kernel's scale (`KernelScaledBNMixin`, in every module where a BatchNorm
follows a conv: ConvBN, the SMP large-kernel branch, the FlexConv branch): with the statistics each BatchNorm keeps
the running squared norm of its kernel per channel (buffer `<bn>_kernel_sq`), and eval mode uses the running
variance times (squared norm now / that average). An EMA of the model (weights and buffers averaged) otherwise
normalises its averaged kernels, whose norm is smaller than the norms the averaged variances were taken at, with
variances several times too large, and the error compounds over the depth: timm's train.py evaluated
smpconv_mobile31's EMA at chance for a whole CIFAR-10 run (docs/training.md has the measurements before and
after).
"""
import copy
import weakref
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['BN_MOMENTUM', 'BatchNormStatsMixin', 'KernelScaledBNMixin', 'capturing_graph', 'init_bn_running_stats_',
           'kernel_sq_norm', 'kernels_changed']

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


def _stat_buffer_ids(module: nn.Module, bns) -> set:
    """ids of the running statistics: every BatchNorm's mean and variance and the kernel norms kept with them."""
    ids = {id(getattr(bn, n)) for bn in bns for n in _STAT_NAMES}
    for m in module.modules():
        if isinstance(m, KernelScaledBNMixin):
            ids.update(id(b) for b in m._kernel_sq_buffers())
    return ids


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
    stats = _stat_buffer_ids(module, bns)
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


def kernel_sq_norm(kernel: torch.Tensor) -> torch.Tensor:
    """Per output channel, the squared L2 norm of a conv kernel (out_channels, ...), in float32, without autograd."""
    return kernel.detach().float().flatten(1).pow(2).sum(1)


def _factor(now: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Squared kernel norms now / their running average `ref` (1 where that is 0)."""
    now = now.to(ref)
    return torch.where(ref > 0, now / ref.clamp_min(torch.finfo(ref.dtype).tiny), torch.ones_like(ref))


def _kernel_sq_loaded(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of KernelScaledBNMixin: a state dict without the kernel norms (the authors'
    checkpoints, ours from before they existed) holds statistics of the weights it holds; one whose continuous
    kernels were saved at another size (and re-sampled to this model's on load) keeps its eval variances."""
    module.reset_kernel_sq_(module.__dict__.pop('_kernel_sq_pending', ()))
    resampled = module.__dict__.pop('_kernel_sq_resampled', ())
    with torch.no_grad():
        for bn_name, saved in resampled:  # as kernels_changed: the eval variance the file's model used
            ref = module._buffers[module._kernel_sq_name(bn_name)]
            ref.mul_(_factor(module._kernel_sq(bn_name), saved.to(ref)))


class KernelScaledBNMixin:
    """BatchNorm running variances that follow the scale of the kernel they normalise, so that an average of
    the model's weights and buffers (timm's ModelEmaV3, as timm's train.py keeps it) evaluates right.

    For a module holding a conv whose output a BatchNorm normalises (ConvBN, the SMP large-kernel branch, the
    FlexConv branch). In training mode the BatchNorm runs as usual and a buffer `<bn>_kernel_sq` keeps, with the
    BatchNorm's own momentum, the running average of the kernel's squared norm per output channel (the kernel
    its statistics were taken with). In eval mode the running variance is used times (squared norm now / that
    average). For the model itself this is about 1 (a small correction for the weights' last steps). For an
    EMA it is the correction that matters: the EMA's running variance is an average of the model's past
    variances, each about q * |w_t|^2, while the EMA's kernel is the average of the w_t, whose squared norm is
    smaller (the w_t point in different directions: the authors' small initialisation, std 0.02, moves by a large
    fraction of itself in each AdamW step). The variance of the averaged kernel's output follows its norm, not
    the average of the variances; uncorrected, each layer's output shrinks and the shrinkage compounds over the
    depth (smpconv_mobile31's EMA evaluated at chance for a whole CIFAR-10 run under timm's train.py; with the
    factor it rises with its weights, 4-9.5 points below re-estimated statistics: the part of the mismatch that
    the kernels' directions make, fitted to inputs the layers below keep changing, needs data; docs/training.md).
    The mean is used as it is: it is linear in the kernel, so the EMA's average is already the averaged kernel's
    mean.

    The buffer is absent where the BatchNorm is not (inference mode, reparameterized). A state dict without it
    loads as statistics of the weights it holds (factor 1: the authors' checkpoints give their outputs), and
    `torch.jit.script` folds the factor into the running variance first (`fold_kernel_scale_`, in place; the
    eval outputs do not change).
    Subclasses set `_kernel_scaled_bns` (the BatchNorm attribute names), implement `_kernel(bn_name)` (the
    kernel the BatchNorm follows) and call `_init_kernel_sq()` at the end of __init__.
    """
    _kernel_scaled_bns: Tuple[str, ...] = ('bn',)

    def _kernel(self, bn_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_conv(self, bn_name: str) -> str:
        """The attribute name of the conv whose kernel `_kernel(bn_name)` is."""
        return 'conv'

    @staticmethod
    def _kernel_sq_name(bn_name: str) -> str:
        return bn_name + '_kernel_sq'

    def _kernel_sq(self, bn_name: str) -> torch.Tensor:
        with torch.no_grad():
            return kernel_sq_norm(self._kernel(bn_name))

    def _scaled_bn(self, bn_name: str) -> Optional[_BatchNorm]:
        bn = getattr(self, bn_name)
        if isinstance(bn, _BatchNorm) and bn.track_running_stats and bn.running_var is not None:
            return bn
        return None

    def _tracked(self, bn_name: str) -> Optional[Tuple[_BatchNorm, torch.Tensor]]:
        """(the BatchNorm, its kernel-norm buffer), or None where either is absent (no running statistics,
        folded away)."""
        bn, ref = self._scaled_bn(bn_name), self._buffers.get(self._kernel_sq_name(bn_name))
        return None if bn is None or ref is None else (bn, ref)

    def _kernel_sq_buffers(self):
        return [t[1] for t in map(self._tracked, self._kernel_scaled_bns) if t is not None]

    def _init_kernel_sq(self):
        for bn_name in self._kernel_scaled_bns:
            bn = self._scaled_bn(bn_name)
            if bn is not None:
                if bn.running_var.is_meta:
                    value = torch.empty_like(bn.running_var)
                else:
                    value = self._kernel_sq(bn_name).to(bn.running_var)
                self.register_buffer(self._kernel_sq_name(bn_name), value)
        self.register_load_state_dict_post_hook(_kernel_sq_loaded)

    def _drop_kernel_sq(self, bn_name: str):
        """After the BatchNorm is folded away (reparameterize): no buffer, as in a model built deployed."""
        self._buffers.pop(self._kernel_sq_name(bn_name), None)

    def kernel_scale(self, bn_name: str = 'bn') -> torch.Tensor:
        """The factor eval mode applies to the BatchNorm's running variance: squared kernel norm now / its
        running average (1 where that average is 0)."""
        tracked = self._tracked(bn_name)
        if tracked is None:
            raise ValueError(f'{bn_name} is not a BatchNorm with running statistics (nothing to scale)')
        return _factor(self._kernel_sq(bn_name), tracked[1])

    def eval_running_var(self, bn_name: str = 'bn') -> Optional[torch.Tensor]:
        """The variance eval mode normalises with (folding uses it too); None where `bn_name` keeps no running
        statistics (a folding then raises its own error)."""
        tracked = self._tracked(bn_name)
        if tracked is None:
            return None
        return tracked[0].running_var * self.kernel_scale(bn_name).to(tracked[0].running_var)

    def _bn_forward(self, x: torch.Tensor, bn_name: str, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The BatchNorm `bn_name` on x, the output of the conv with `kernel` (default `_kernel(bn_name)`)."""
        tracked = self._tracked(bn_name)
        if tracked is None:
            return getattr(self, bn_name)(x)
        bn, ref = tracked
        with torch.no_grad():
            now = self._eval_kernel_sq(bn_name, kernel, x)
        if bn.training:
            out = bn(x)
            # the update factor BatchNorm's forward used (cumulative average when momentum is None)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0.0
            else:
                factor = bn.momentum
            with torch.no_grad():
                ref.lerp_(now.to(ref), factor)
            return out
        return F.batch_norm(x, bn.running_mean, bn.running_var * _factor(now, ref).to(bn.running_var),
                            bn.weight, bn.bias, False, 0.0, bn.eps)

    def _eval_kernel_sq(self, bn_name: str, kernel: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The kernel's squared norms for this forward; in eval mode without autograd (validation, inference)
        cached, keyed by the conv's parameters and buffers (weak references and version counters: an optimizer
        step, an EMA update, load_state_dict or a re-sampling computes them again)."""
        def compute():
            return kernel_sq_norm(kernel) if kernel is not None else self._kernel_sq(bn_name)
        if self.training or torch.is_grad_enabled() or capturing_graph(x) or torch.jit.is_scripting():
            return compute()
        conv = getattr(self, self._kernel_conv(bn_name))
        tensors = tuple(conv.parameters()) + tuple(conv.buffers())
        key = tuple((t._version, t.dtype, t.device, t.shape) for t in tensors)
        cache = self.__dict__.setdefault('_kernel_sq_cache', {})
        hit = cache.get(bn_name)
        if hit is not None and hit[0] == key and all(r() is t for r, t in zip(hit[1], tensors)):
            return hit[2]
        now = compute()
        cache[bn_name] = (key, tuple(weakref.ref(t) for t in tensors), now)
        return now

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop('_kernel_sq_cache', None)  # weak references: not copied or pickled
        return state

    @torch.no_grad()
    def fold_kernel_scale_(self):
        """Fold the eval factor into the running variances (and set the running kernel norms to the current
        ones): eval outputs stay the same, a plain BatchNorm call gives them (what TorchScript compiles)."""
        for bn_name in self._kernel_scaled_bns:
            tracked = self._tracked(bn_name)
            if tracked is not None:
                tracked[0].running_var.copy_(self.eval_running_var(bn_name))
        return self.reset_kernel_sq_()

    @torch.no_grad()
    def reset_kernel_sq_(self, bn_names: Optional[Tuple[str, ...]] = None):
        """Take the current kernels as the ones the running statistics describe (eval factor 1), for `bn_names`
        (default all)."""
        for bn_name in self._kernel_scaled_bns if bn_names is None else bn_names:
            name = self._kernel_sq_name(bn_name)
            ref = self._buffers.get(name)
            if ref is None:
                continue
            now = self._kernel_sq(bn_name)
            if ref.is_meta and not now.is_meta:  # a model built on the meta device, loaded with assign=True
                self._buffers[name] = now.to(ref.dtype)
            else:
                ref.copy_(now)
        return self

    @staticmethod
    @torch.no_grad()
    def _saved_kernel_sq(conv: nn.Module, conv_prefix: str, state_dict, saved_size: int) -> torch.Tensor:
        """The squared kernel norms of a continuous conv's entries in `state_dict`, rendered at the size they were
        saved at (before the conv's own load re-samples them to its size)."""
        tmp = copy.deepcopy(conv)
        tmp.set_kernel_size(saved_size)
        tmp.load_state_dict({k[len(conv_prefix):]: v for k, v in state_dict.items() if k.startswith(conv_prefix)},
                            strict=False)
        return kernel_sq_norm(tmp.get_weight())

    def __prepare_scriptable__(self):
        return self.fold_kernel_scale_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pending, resampled = [], []
        for bn_name in self._kernel_scaled_bns:
            name = self._kernel_sq_name(bn_name)
            if name not in self._buffers:
                continue
            if prefix + name not in state_dict:
                state_dict[prefix + name] = self._buffers[name]  # set from the loaded kernel after loading
                pending.append(bn_name)
                continue
            conv_prefix = prefix + self._kernel_conv(bn_name) + '.'
            conv = getattr(self, self._kernel_conv(bn_name))
            record = state_dict.get(conv_prefix + 'kernel_size_record')
            if record is not None and hasattr(conv, 'kernel_size_record') and int(record) != conv.kernel_size:
                resampled.append((bn_name, self._saved_kernel_sq(conv, conv_prefix, state_dict, int(record))))
        self.__dict__['_kernel_sq_pending'] = tuple(pending)
        self.__dict__['_kernel_sq_resampled'] = tuple(resampled)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@contextmanager
def kernels_changed(module: nn.Module):
    """Around a deliberate change of kernels that is not training (a BatchNorm folded into a conv, kernels
    re-sampled for another resolution or length): the BatchNorms after them normalise with the variance they
    used before (`KernelScaledBNMixin`: the eval factor is folded in first, and the new kernels are the
    reference after)."""
    mods = [m for m in module.modules() if isinstance(m, KernelScaledBNMixin)]
    for m in mods:
        m.fold_kernel_scale_()
    yield
    for m in mods:
        m.reset_kernel_sq_()
