""" Training memory and launch counts: what a training forward keeps for the backward (smpconv_t within 1.5x of
convnext_tiny, recomputed pointwise results, the FFT-spectra switch) and the aten ops of a CIFAR training step
(one batched kernel generation for all the layers). The measurements themselves: `python benchmarks/memory.py`. """
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import FlexConv2d, render_smp_kernel
from timm_smpconv.layers.kernel_bank import batched_kernels
from timm_smpconv.layers.recompute import recompute_batch_norm, recompute_scope
from timm_smpconv.layers.smp import render_smp_kernels
from timm_smpconv.memory import count_aten_ops, saved_activation_bytes

FORMS = {'plain': (False, False), 'pointwise': (True, False), 'lean': (True, True)}


def _per_image(model, size, amp, channels_last):
    """Bytes kept per image: the difference between batch 2 and batch 1 (what is kept once per step, e.g. kernel
    spectra and autocast's weight copies, cancels: at any batch a step keeps it once)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    b = [saved_activation_bytes(model, torch.randn(n, 3, size, size).contiguous(memory_format=fmt), amp).total
         for n in (1, 2)]
    return b[1] - b[0]


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_smpconv_t_keeps_at_most_1_5x_of_convnext_tiny(amp, channels_last):
    """At 224 px (forward only: fast), per image; 1.4 leaves a margin under the issue's 1.5 (measured: 1.13 fp32,
    1.28 bf16; benchmarks/results/memory.md)."""
    torch.manual_seed(0)
    model = timm.create_model('smpconv_t').train()
    model.set_recompute(True)  # the memory saving (off by default: a faster step)
    ours = _per_image(model, 224, amp, channels_last)
    ref = _per_image(timm.create_model('convnext_tiny').train(), 224, amp, channels_last)
    assert ours / ref <= 1.4, f'smpconv_t keeps {ours / ref:.2f}x what convnext_tiny keeps per image'


def _step(model, x, form):
    model.set_recompute(*FORMS[form])
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout noise in every form
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('name,kwargs,size', [
    ('smpconv_mobile31', dict(layers=(1, 1, 1, 1)), 64),
    ('smp_flexnet_16', dict(widths=(24, 36)), 16),
    ('flexnet_16', dict(widths=(24, 36), drop_path_rate=0.1), 16),
])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_recompute_keeps_outputs_and_gradients_and_keeps_less(name, kwargs, size, channels_last):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FlexConv2d):
                m.mask_params[:, 1].fill_(1.0)  # grown masks: 33 x 33 kernels, through the FFT
    x = torch.randn(4, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out0, grads0 = _step(model, x, 'plain')
    kept = {}
    for form in FORMS:
        out, grads = _step(model, x, form)
        torch.testing.assert_close(out, out0, rtol=1e-6, atol=0)
        assert grads.keys() == grads0.keys()
        for n, g in grads.items():
            assert (g - grads0[n]).norm() <= 1e-6 * grads0[n].norm() + 1e-12, (form, n)
        model.set_recompute(*FORMS[form])
        kept[form] = saved_activation_bytes(model, x).total
    assert kept['lean'] < kept['pointwise'] < kept['plain'], kept


def test_recompute_keeps_a_float64_model_in_float64():
    """The recomputed BatchNorm outputs are computed in the model's precision (float32 for half precision, as
    PyTorch's BN kernels do): a float64 model's gradients equal the plain ones to float64 rounding (a float32 recipe
    put 1e-7 into them)."""
    torch.manual_seed(0)
    model = timm.create_model('smpconv_mobile31', layers=(1, 1, 1, 1)).train().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out0, grads0 = _step(model, x, 'plain')
    out, grads = _step(model, x, 'pointwise')
    assert torch.equal(out, out0)
    for n, g in grads.items():
        assert (g - grads0[n]).abs().max() <= 1e-12 * grads0[n].abs().max(), n


def test_recompute_steps_aside_for_checkpointing_and_other_hooks():
    """Inside gradient checkpointing or another saved-tensor hook (here save_on_cpu) the model computes and keeps
    exactly as without recompute: the checkpoint's recomputation must see the same ops."""
    torch.manual_seed(0)
    model = timm.create_model('smpconv_mobile31', layers=(1, 1, 1, 1)).train()
    x = torch.randn(2, 3, 64, 64)
    _, ref = _step(model, x, 'plain')
    model.set_grad_checkpointing(True)
    _, grads = _step(model, x, 'pointwise')
    model.set_grad_checkpointing(False)
    with torch.autograd.graph.save_on_cpu():
        _, grads2 = _step(model, x, 'lean')
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(grads2[n], ref[n], rtol=1e-6, atol=1e-9)


def test_recomputed_tensor_whose_input_changed_in_place_raises():
    bn = nn.BatchNorm2d(3).train()
    conv = nn.Conv2d(3, 3, 1)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with recompute_scope():
        c = x * 2
        y = bn(c)
        assert recompute_batch_norm(c, y, bn) is not None
        out = conv(y)  # conv keeps y: as a recipe from c
    c.add_(0)  # an in-place update bumps c's version
    with pytest.raises(RuntimeError, match='modified in place'):
        out.sum().backward()


def test_saved_activation_bytes_counts_each_storage_once_without_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False)).train()
    x = torch.randn(2, 3, 10, 10)
    r = saved_activation_bytes(model, x)
    # conv1 keeps its input (for its weight gradient); BN its input (8 maps) and 2 x 8 statistics; ReLU its output,
    # which conv2 keeps too (one storage)
    assert r.by_type == {'Conv2d': 2 * 3 * 100 * 4, 'BatchNorm2d': (2 * 8 * 100 + 2 * 8) * 4, 'ReLU': 2 * 8 * 100 * 4}
    assert r.total == sum(r.by_type.values()) and r.per_image == r.total / 2


# ---- one batched kernel generation per step (CIFAR models)

def _train_step_ops(model, x, y):
    return count_aten_ops(lambda: F.cross_entropy(model(x), y).backward())


@pytest.mark.parametrize('name,limit', [('flexnet_16', 2000), ('smp_flexnet_16', 900)])
def test_cifar_training_step_dispatches_few_ops(name, limit):
    """Forward, loss and backward of batch 8 at 32 px (measured: 1,582 and 729 ops; 5,241 and 1,401 when each
    layer generated its own kernel)."""
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _train_step_ops(model, x, y)
    assert _train_step_ops(model, x, y) <= limit


def test_batched_kernels_equal_each_layers_own():
    torch.manual_seed(0)
    model = timm.create_model('flexnet_16', widths=(24, 36, 48)).train()
    layers = [m for m in model.modules() if isinstance(m, FlexConv2d)]
    with torch.no_grad():
        for i, m in enumerate(layers):  # grown masks, a different crop per layer
            m.mask_params[:, 1].fill_(0.1 + 0.2 * i)
    crops = {tuple(m.get_weight().shape[-2:]) for m in layers}
    assert len(crops) > 2
    batched = FlexConv2d.batched_weights(layers)
    for m, w in zip(layers, batched):
        torch.testing.assert_close(w, m.get_weight(), rtol=1e-6, atol=1e-7)
    smp = [m for m in timm.create_model('smp_flexnet_16', widths=(24, 36)).modules() if hasattr(m, 'points')]
    many = render_smp_kernels([m.points for m in smp], [m.radius for m in smp], [m.weight for m in smp], 33, True)
    for m, w in zip(smp, many):
        torch.testing.assert_close(w, render_smp_kernel(m.points, m.radius, m.weight, 33, normalize=True))
    # inside the block every layer takes its batched kernel: the model's output is the per-layer one
    x = torch.randn(2, 3, 32, 32)
    model.eval()  # (no dropout noise)
    with batched_kernels([], enabled=False):
        ref = model.blocks(model.stem_act(model.stem(x)))
    torch.testing.assert_close(model.forward_features(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('measure', [False, True], ids=['recompute', 'measured'])
def test_a_graph_dropped_without_backward_is_freed(measure):
    """Saved-tensor hooks that hand back a saved output itself tie it to its own node (a cycle the collector cannot
    see): a forward whose output is dropped without a backward must free everything it kept."""
    import gc
    import weakref
    model = timm.create_model('smpconv_mobile31', layers=(1, 1, 1, 1)).train()
    kept = []
    hook = model.stages[0].blocks[0].large_kernel.smp.register_forward_hook(
        lambda m, args, out: kept.append(weakref.ref(out)))
    x = torch.randn(2, 3, 64, 64)
    if measure:
        saved_activation_bytes(model, x)
    else:
        model(x).sum()
    hook.remove()
    gc.collect()
    assert kept and all(r() is None for r in kept)
