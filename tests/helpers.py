""" Helpers shared by the test modules. """
import contextlib
import io
import sys
from pathlib import Path

import torch
from timm.layers import get_notrace_functions, get_notrace_modules


def random_bn_entries(sd: dict, prefix: str, c: int, g: torch.Generator):
    """BatchNorm entries with non-trivial values, as a trained checkpoint has them."""
    sd[prefix + 'weight'] = torch.rand(c, generator=g) + 0.5
    sd[prefix + 'bias'] = torch.randn(c, generator=g) * 0.2
    sd[prefix + 'running_mean'] = torch.randn(c, generator=g) * 0.2
    sd[prefix + 'running_var'] = torch.rand(c, generator=g) + 0.5
    sd[prefix + 'num_batches_tracked'] = torch.tensor(100)


def fx_model(model, train: bool):
    """The model traced as timm's fx tests do (torchvision's extractor with timm's notrace leaves)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=list(get_notrace_modules()), autowrap_functions=list(get_notrace_functions()))
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    model.train(train)
    return create_feature_extractor(
        model, return_nodes=[(train_nodes if train else eval_nodes)[-1]], tracer_kwargs=tracer_kwargs)


def check_timm_model_contract(name: str, resize_input=None, **kwargs):
    """The checks of timm's test_model_default_cfgs, on the meta device, for a registered model (created with
    `kwargs`, e.g. inference_mode=True).

    Returns (model, cfg, x) for model-specific checks; `resize_input` (a size) is also applied to the
    frozen-parameter check through set_input_size, as timm does for models that have it.
    """
    import fnmatch
    import inspect

    import pytest
    import timm
    from timm.models import group_parameters

    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_an_argument=1, **kwargs)
    with torch.device('meta'):
        model = timm.create_model(name, device='meta', dtype=torch.float32, **kwargs)
    cfg = model.pretrained_cfg
    assert inspect.signature(model.reset_classifier).parameters['global_pool'].default is None
    assert len(group_parameters(model, model.group_matcher(coarse=False))) > 1
    names = [n for n, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    assert model.num_classes == cfg['num_classes']
    assert model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == cfg['input_size'][0]
    x = torch.empty((1,) + tuple(cfg['input_size']), device='meta')
    # image models keep a pooled map; sequence models (no pool_size) read H * W steps
    spatial = tuple(cfg['pool_size']) if cfg.get('pool_size') else (cfg['input_size'][1] * cfg['input_size'][2],)
    feat = model.forward_features(x)
    assert feat.shape[1] == model.num_features and tuple(feat.shape[2:]) == spatial
    assert model.forward_head(feat, pre_logits=True).shape[1] == model.head_hidden_size
    sd = model.state_dict()
    assert cfg['classifier'] + '.weight' in sd and cfg['first_conv'] + '.weight' in sd
    # bf16: output dtype follows the model
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    # a fresh model for the head checks, so callers can inspect `model` as created
    head = timm.create_model(name, device='meta', **kwargs)
    head.reset_classifier(0)
    assert head.num_classes == 0 and head(x).shape == (1, head.head_hidden_size)
    head.reset_classifier(0, '')
    assert tuple(head(x).shape[2:]) == spatial
    m0 = timm.create_model(name, device='meta', num_classes=0, **kwargs)
    assert m0(x).shape == (1, m0.head_hidden_size)
    m0 = timm.create_model(name, device='meta', num_classes=0, global_pool='', **kwargs)
    assert m0(x).ndim == 2 + len(spatial)
    # factory device without a device context: every param and buffer on meta
    off = [n for n, t in list(head.named_parameters()) + list(head.named_buffers()) if t.device.type != 'meta']
    assert not off
    # reset_classifier keeps device, dtype, training flag; frozen params stay frozen
    m64 = timm.create_model(name, device='meta', dtype=torch.float64, **kwargs).train()
    m64.requires_grad_(False)
    m64.reset_classifier(7)
    assert m64.get_classifier().weight.dtype == torch.float64 and m64.get_classifier().training
    assert m64.get_classifier().weight.device.type == 'meta'
    m64.requires_grad_(False)
    m64.reset_classifier(0)
    m64.reset_classifier(0, '')
    if resize_input is not None:
        m64.set_input_size(resize_input)
    assert not any(p.requires_grad for p in m64.parameters())
    return model, cfg, x


class HostSyncs:
    """Counts the operations of a block that make the host wait for the device (on a GPU): the aten ops that read
    values or data-dependent shapes back (`.item()`, `int(t)`, `bool(t)`, `nonzero`, `masked_select`, ...) through a
    TorchDispatchMode, and `Tensor.tolist()` / `.numpy()` through a TorchFunctionMode (on CPU tensors these read
    memory without dispatching an op). `events`: a Counter of op names."""
    DISPATCH = {'_local_scalar_dense', 'nonzero', 'masked_select', 'unique_dim', '_unique2', 'unique_consecutive',
                'equal'}
    FUNCTIONS = {'tolist', 'numpy'}

    def __init__(self):
        import collections

        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        self.events = collections.Counter()
        events = self.events

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in HostSyncs.DISPATCH or (name == 'repeat_interleave' and 'output_size' not in (kwargs or {})
                                                  and isinstance(args[0], torch.Tensor) and args[0].dim() > 0
                                                  and len(args) == 1):
                    events[name] += 1
                return func(*args, **(kwargs or {}))

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, '__name__', None) in HostSyncs.FUNCTIONS:
                    events[func.__name__] += 1
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def run_trainer(argv):
    """train_imagenet.main(argv) in this process, as `python train_imagenet.py ARGV` runs it: (exit code, stdout
    and stderr together, what main returned or None). torch.compile's caches are reset after it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_imagenet
    out = io.StringIO()
    result, code = None, 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                result = train_imagenet.main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        torch._dynamo.reset()
    return code, out.getvalue(), result


# a small SMP model for 32 px inputs on the built-in data (the mobile31 layout, kernels fitting the feature maps)
TINY_SMP = ['--model', 'smpconv_mobile31', '--model-kwargs', 'kernel_sizes=[9,7,5,5]', 'n_points=[8,6,3,3]',
            'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]', '--workers', '0', '--device', 'cpu',
            '--seed', '3']


def built_trainer_state(monkeypatch, argv):
    """train_imagenet.run()'s set-up steps for argv, without the epoch loop: the TrainState the loop would get."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_imagenet
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    return train_imagenet.run(train_imagenet.parse_args(argv))


def summary_rows(run_dir):
    """The rows of a training run's summary.csv, as dicts."""
    import csv
    with open(Path(run_dir) / 'summary.csv') as f:
        return list(csv.DictReader(f))


def load_train_checkpoint(path):
    """A checkpoint of train_imagenet.py, read with torch's safe loader (the run's args allowed)."""
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)
