""" SMPConvNet computes NCHW inputs in channels_last on the CPU (eager): the same outputs and gradients as computing
in NCHW, results handed back in the input's layout, `cpu_channels_last = False` and graph capture leave the layout
alone."""
import copy

import timm
import torch

import timm_smpconv  # noqa: F401  (registers the models)


def _model():
    torch.manual_seed(0)
    return timm.create_model('smpconv_mobile31', num_classes=10)


def _stem_layouts(model, x, fn):
    seen = []
    hook = model.stem.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        out = fn(x)
    finally:
        hook.remove()
    return out, seen


def test_nchw_input_is_computed_in_channels_last_with_the_same_results():
    model = _model().train()
    ref = copy.deepcopy(model)
    ref.cpu_channels_last = False
    x = torch.randn(2, 3, 64, 64)
    y, seen = _stem_layouts(model, x, model)
    y_ref, seen_ref = _stem_layouts(ref, x, ref)
    assert seen[-1] and not seen_ref[-1]
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    y.square().sum().backward()
    y_ref.square().sum().backward()
    scale = max(q.grad.abs().max() for q in ref.parameters() if q.grad is not None)
    diff = max((p.grad - q.grad).abs().max() for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None)
    assert diff <= 1e-3 * scale, (diff, scale)


def test_features_come_back_in_the_inputs_layout():
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        inter = model.forward_intermediates(x, intermediates_only=True)
    assert feats.is_contiguous() and all(t.is_contiguous() for t in inter)


def test_graph_capture_sees_the_inputs_layout():
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)
        _, seen = _stem_layouts(model, x, lambda t: torch.jit.trace(model, t, check_trace=False))
    assert seen == [False]
