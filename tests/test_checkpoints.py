""" Loading the authors' checkpoints and ours, fine-tuning, kernel sizes at load time.

The authors' weights are not downloadable here, so these tests write checkpoints in their layout
(the authors' key names and shapes, random values, non-trivial BN statistics, spread-out points) and
compare our model's logits with an independent functional evaluation of the same numbers that
renders kernels the way the authors' code does.
"""
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import random_bn_entries
from safetensors.torch import save_file

import timm_smpconv  # noqa: F401
from timm_smpconv.models._builder import CheckpointMismatchError

# smpconv_mobile31: layers, channels, kernel sizes, points divisor, ffn ratio
CFG = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 320), kernels=(31, 29, 27, 13), div=8, ffn=2)
SIZE = 64




def _conv(sd, name, shape, g):
    fan_in = shape[1] * shape[2] * shape[3]
    sd[name] = torch.randn(*shape, generator=g) / math.sqrt(fan_in)


def authors_state_dict(seed=0, num_classes=1000):
    """A state dict in the SMPConv authors' ImageNet layout (their smp_imagenet model's keys and shapes)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    c0 = CFG['channels'][0]
    for i, (cin, cout, k, groups) in enumerate([(3, c0, 3, 1), (c0, c0, 3, c0), (c0, c0, 1, 1), (c0, c0, 3, c0)]):
        _conv(sd, f'stem.{i}.conv.weight', (cout, cin // groups, k, k), g)
        random_bn_entries(sd, f'stem.{i}.bn.', cout, g)
    for s, (depth, c, k) in enumerate(zip(CFG['layers'], CFG['channels'], CFG['kernels'])):
        n_points = k * k // CFG['div']
        for b in range(2 * depth):
            p = f'stages.{s}.blocks.{b}.'
            if b % 2 == 0:
                random_bn_entries(sd, p + 'prelkb_bn.', c, g)
                _conv(sd, p + 'pw1.conv.weight', (c, c, 1, 1), g)
                random_bn_entries(sd, p + 'pw1.bn.', c, g)
                lk = p + 'large_kernel.'
                sd[lk + 'smp.conv.weight_coord'] = (torch.rand(1, n_points, 2, generator=g) * 1.6 - 0.8)
                sd[lk + 'smp.conv.radius'] = torch.rand(1, n_points, 1, 1, generator=g) * 0.2 + 0.1
                sd[lk + 'smp.conv.weights'] = torch.randn(1, c, n_points, generator=g) * 0.3
                lin = torch.linspace(-1, 1, k)
                sd[lk + 'smp.conv.kernel_coord'] = torch.stack(torch.meshgrid(lin, lin, indexing='ij')).unsqueeze(0)
                random_bn_entries(sd, lk + 'smp.bn.', c, g)
                _conv(sd, lk + 'small_conv.conv.weight', (c, 1, 5, 5), g)
                random_bn_entries(sd, lk + 'small_conv.bn.', c, g)
                _conv(sd, p + 'pw2.conv.weight', (c, c, 1, 1), g)
                random_bn_entries(sd, p + 'pw2.bn.', c, g)
            else:
                random_bn_entries(sd, p + 'preffn_bn.', c, g)
                _conv(sd, p + 'pw1.conv.weight', (c * CFG['ffn'], c, 1, 1), g)
                random_bn_entries(sd, p + 'pw1.bn.', c * CFG['ffn'], g)
                _conv(sd, p + 'pw2.conv.weight', (c, c * CFG['ffn'], 1, 1), g)
                random_bn_entries(sd, p + 'pw2.bn.', c, g)
        if s < 3:
            cn = CFG['channels'][s + 1]
            _conv(sd, f'transitions.{s}.0.conv.weight', (cn, c, 1, 1), g)
            random_bn_entries(sd, f'transitions.{s}.0.bn.', cn, g)
            _conv(sd, f'transitions.{s}.1.conv.weight', (cn, 1, 3, 3), g)
            random_bn_entries(sd, f'transitions.{s}.1.bn.', cn, g)
    random_bn_entries(sd, 'norm.', CFG['channels'][-1], g)
    sd['head.weight'] = torch.randn(num_classes, CFG['channels'][-1], generator=g) * 0.05
    sd['head.bias'] = torch.randn(num_classes, generator=g) * 0.05
    return sd


def authors_kernel(sd, prefix):
    """The conv weight the authors' module renders: A on the 'ij' grid, then W[c,i,j] = A[c, j, k-1-i]."""
    coord = sd[prefix + 'weight_coord'][0]  # (Np, 2)
    radius = sd[prefix + 'radius'][0, :, 0, 0]  # (Np,)
    weights = sd[prefix + 'weights'][0]  # (C, Np)
    grid = sd[prefix + 'kernel_coord'][0]  # (2, k, k)
    k = grid.shape[-1]
    diff = (grid.reshape(2, 1, k * k) - coord.t().unsqueeze(-1)).abs().sum(0)  # (Np, k*k)
    g = torch.relu(1 - diff / radius.unsqueeze(-1))
    a = (weights @ g).reshape(-1, k, k)
    w = a.transpose(1, 2).flip(1)  # W[c, i, j] = A[c, j, k-1-i]
    return w.unsqueeze(1)


def reference_logits(sd, x):
    """Evaluate the authors' network from their state dict with plain functional ops (eval mode)."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                            False, 0., 1e-5)

    def conv_bn(t, p, stride=1, relu=True):
        w = sd[p + 'conv.weight']
        groups = t.shape[1] if w.shape[1] == 1 and t.shape[1] > 1 else 1
        t = bn(F.conv2d(t, w, None, stride, w.shape[-1] // 2, 1, groups), p + 'bn.')
        return F.relu(t) if relu else t

    x = conv_bn(x, 'stem.0.', 2)
    x = conv_bn(x, 'stem.1.')
    x = conv_bn(x, 'stem.2.')
    x = conv_bn(x, 'stem.3.', 2)
    for s, depth in enumerate(CFG['layers']):
        for b in range(2 * depth):
            p = f'stages.{s}.blocks.{b}.'
            if b % 2 == 0:
                h = conv_bn(bn(x, p + 'prelkb_bn.'), p + 'pw1.')
                lk = p + 'large_kernel.'
                w = authors_kernel(sd, lk + 'smp.conv.')
                c = h.shape[1]
                big = bn(F.conv2d(h, w, None, 1, w.shape[-1] // 2, 1, c), lk + 'smp.bn.')
                small = bn(F.conv2d(h, sd[lk + 'small_conv.conv.weight'], None, 1, 2, 1, c), lk + 'small_conv.bn.')
                x = x + conv_bn(F.relu(big + small), p + 'pw2.', relu=False)
            else:
                h = conv_bn(bn(x, p + 'preffn_bn.'), p + 'pw1.', relu=False)
                x = x + conv_bn(F.gelu(h), p + 'pw2.', relu=False)
        if s < 3:
            x = conv_bn(x, f'transitions.{s}.0.')
            x = conv_bn(x, f'transitions.{s}.1.', 2)
    x = bn(x, 'norm.').mean((2, 3))
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def assert_rel(a, b, tol=1e-5):
    """max |a - b| relative to max |b| (random deep nets have logits in the thousands)."""
    assert a.shape == b.shape
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= tol, err


def load(path, **kwargs):
    return timm.create_model('smpconv_mobile31', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs).eval()


@pytest.fixture(scope='module')
def authors_sd():
    return authors_state_dict()


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_authors_layout_spec_consistency(authors_sd):
    n_params = sum(v.numel() for k, v in authors_sd.items()
                   if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked', 'kernel_coord')))
    assert n_params == 2_892_494  # the authors' mobile31, measured on their code: the layout is right


def test_authors_kernel_orientation_known_case():
    """Measured on the authors' code: in their rendering a point at (c0=+0.5, c1=0) peaks at (row 16, col 24)
    and a point at (0, +0.5) at (row 8, col 16); our converted model renders the same kernel."""
    k = 33
    lin = torch.linspace(-1, 1, k)
    sd = {'p.kernel_coord': torch.stack(torch.meshgrid(lin, lin, indexing='ij')).unsqueeze(0),
          'p.radius': torch.full((1, 1, 1, 1), 0.1), 'p.weights': torch.ones(1, 1, 1)}
    for coord, peak in [((0.5, 0.0), (16, 24)), ((0.0, 0.5), (8, 16))]:
        sd['p.weight_coord'] = torch.tensor([[coord]])
        w = authors_kernel(sd, 'p.')[0, 0]
        assert divmod(int(w.argmax()), k) == peak
    from timm_smpconv.layers import render_smp_kernel
    from timm_smpconv.models._builder import points_from_authors
    for coord in [(0.5, 0.0), (0.0, 0.5), (0.3, -0.7)]:
        sd['p.weight_coord'] = torch.tensor([[coord]])
        ours = render_smp_kernel(points_from_authors(sd['p.weight_coord']), torch.full((1, 1), 0.1),
                                 torch.ones(1, 1, 1), k)
        torch.testing.assert_close(ours, authors_kernel(sd, 'p.'))


@pytest.mark.parametrize('wrapper', ['model', 'bare', 'module_prefix'])
def test_authors_checkpoint_gives_reference_logits(tmp_path, authors_sd, x, wrapper):
    if wrapper == 'model':
        obj = {'model': authors_sd, 'epoch': 3, 'optimizer': {}}
    elif wrapper == 'bare':
        obj = authors_sd
    else:
        obj = {'model': {'module.' + k: v for k, v in authors_sd.items()}}
    torch.save(obj, tmp_path / 'ckpt.pth')
    model = load(tmp_path / 'ckpt.pth')
    with torch.no_grad():
        ours = model(x)
        ref = reference_logits(authors_sd, x)
    assert_rel(ours, ref)
    # and the rendered kernels are exactly the authors' conv weights
    w = model.stages[1].blocks[2].large_kernel.smp.get_weight()
    torch.testing.assert_close(w, authors_kernel(authors_sd, 'stages.1.blocks.2.large_kernel.smp.conv.'))


def _cast(sd, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def test_half_precision_authors_checkpoint_renders_on_its_stored_grid(tmp_path, authors_sd, x):
    """A file saved in fp16 (every tensor half, their grid buffer included): the authors' model loads the values
    into its fp32 parameters and buffers and renders on the fp16-rounded grid; ours reproduces that."""
    half = _cast(authors_sd, torch.float16)
    torch.save({'model': half}, tmp_path / 'half.pth')
    model = load(tmp_path / 'half.pth')
    theirs = _cast(half, torch.float32)  # what their fp32 model holds after loading the file
    with torch.no_grad():
        assert_rel(model(x[:1]), reference_logits(theirs, x[:1]), 2e-6)  # 4e-4 on the exact linspace
    h = torch.randn(1, 64, 16, 16)
    for s in range(4):
        p = f'stages.{s}.blocks.2.large_kernel'
        w = authors_kernel(theirs, p + '.smp.conv.')
        torch.testing.assert_close(model.get_submodule(p + '.smp').get_weight(), w)
        on_linspace = dict(theirs, **{p + '.smp.conv.kernel_coord': authors_sd[p + '.smp.conv.kernel_coord']})
        assert not torch.allclose(authors_kernel(on_linspace, p + '.smp.conv.'), w)  # the grid matters
    # reparameterized: the fused conv holds the kernel rendered on the stored grid
    branch = model.stages[0].blocks[0].large_kernel
    with torch.no_grad():
        torch.testing.assert_close(branch.fuse()(h), branch(h), rtol=1e-5, atol=1e-5)
    # the grid is state of the loaded model only: our state dict carries it, and our strict loaders bring it back
    sd = model.state_dict()
    fresh_keys = set(timm.create_model('smpconv_mobile31', device='meta').state_dict())
    grid_keys = set(sd) - fresh_keys
    assert set(sd) >= fresh_keys and len(grid_keys) == 8 and all(k.endswith('large_kernel.smp.render_grid') for k in grid_keys)
    torch.save(sd, tmp_path / 'ours.pth')
    again = timm.create_model('smpconv_mobile31', checkpoint_path=str(tmp_path / 'ours.pth'))
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items()) and set(again.state_dict()) == set(sd)
    # and through the pretrained route (checkpoint_filter_fn checks the keys: a stored grid is allowed)
    again = load(tmp_path / 'ours.pth')
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items()) and set(again.state_dict()) == set(sd)


def test_authors_grid_that_is_not_a_linspace_meshgrid_raises(tmp_path, authors_sd):
    from timm_smpconv.models.smpconv import _convert_authors
    key = 'stages.1.blocks.0.large_kernel.smp.conv.kernel_coord'
    sd = dict(authors_sd)
    grid = sd[key].clone()
    grid[0, 0, 3, 5] += 0.01  # one row no longer constant
    sd[key] = grid
    torch.save({'model': sd}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match=f'{key}: not a sampling grid'):
        load(tmp_path / 'bad.pth')
    lin = torch.linspace(-1, 1, 29) * 1.01
    sd[key] = torch.stack(torch.meshgrid(lin, lin, indexing='ij')).unsqueeze(0).half()
    with pytest.raises(ValueError, match=r'off linspace\(-1, 1, 29\), more than torch.float16 rounding'):
        _convert_authors(sd)
    sd[key] = torch.zeros(2, 29, 29)
    with pytest.raises(ValueError, match=r'shape \(1, 2, k, k\)'):
        _convert_authors(sd)


def test_ema_weights_are_preferred(tmp_path, authors_sd, x):
    ema = authors_state_dict(seed=5)
    torch.save({'model': authors_sd, 'model_ema': ema}, tmp_path / 'ckpt.pth')
    model = load(tmp_path / 'ckpt.pth')
    with torch.no_grad():
        assert_rel(model(x), reference_logits(ema, x))


def test_corrupt_file_and_mismatched_keys_raise_clear_errors(tmp_path, authors_sd):
    bad = tmp_path / 'corrupt.pth'
    torch.save({'model': authors_sd}, bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(RuntimeError, match=r'could not load pretrained weights .*corrupt\.pth.*corrupt'):
        load(bad)
    sd = dict(authors_sd)
    del sd['stages.2.blocks.1.pw2.conv.weight']
    sd['stages.9.extra.weight'] = torch.zeros(1)
    sd['stages.0.blocks.0.pw1.conv.weight'] = torch.zeros(64, 32, 1, 1)
    torch.save({'model': sd}, tmp_path / 'mismatch.pth')
    with pytest.raises(ValueError) as err:
        load(tmp_path / 'mismatch.pth')
    msg = str(err.value)
    assert 'missing keys: stages.2.blocks.1.pw2.conv.weight' in msg
    assert 'unexpected keys: stages.9.extra.weight' in msg
    assert 'stages.0.blocks.0.pw1.conv.weight: checkpoint (64, 32, 1, 1) vs model (64, 64, 1, 1)' in msg
    # a checkpoint of another variant names its problems too
    torch.save({'model': authors_sd}, tmp_path / 'mobile.pth')
    with pytest.raises(ValueError, match='mis-shaped keys'):
        timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'mobile.pth')))


def test_our_checkpoints_load(tmp_path, x):
    torch.manual_seed(0)
    src = timm.create_model('smpconv_mobile31', num_classes=7).eval()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
        ref = src(x)
    # timm's CheckpointSaver layout: state_dict + state_dict_ema
    torch.save({'epoch': 1, 'arch': 'smpconv_mobile31', 'state_dict': {k: v * 0 for k, v in src.state_dict().items()},
                'state_dict_ema': src.state_dict(), 'version': 2}, tmp_path / 'last.pth.tar')
    model = load(tmp_path / 'last.pth.tar', num_classes=7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / 'model.safetensors'))
    model = load(tmp_path / 'model.safetensors', num_classes=7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    # timm's own checkpoint_path route (strict, no filter) works for our format
    torch.save(src.state_dict(), tmp_path / 'plain.pth')
    model = timm.create_model('smpconv_mobile31', num_classes=7, checkpoint_path=str(tmp_path / 'plain.pth')).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_finetune_new_classes_and_in_chans(tmp_path, authors_sd, x):
    torch.save({'model': authors_sd}, tmp_path / 'ckpt.pth')
    model = load(tmp_path / 'ckpt.pth', num_classes=10)
    assert model.get_classifier().weight.shape == (10, 320)
    torch.testing.assert_close(model.stages[3].blocks[0].pw1.conv.weight, authors_sd['stages.3.blocks.0.pw1.conv.weight'])
    torch.testing.assert_close(model.head.norm.running_mean, authors_sd['norm.running_mean'])
    out = model.train()(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 10)
    out.sum().backward()
    gray = load(tmp_path / 'ckpt.pth', in_chans=1)
    torch.testing.assert_close(gray.stem[0].conv.weight, authors_sd['stem.0.conv.weight'].sum(1, keepdim=True))
    with torch.no_grad():
        # a gray image through the summed stem equals the RGB model on the replicated image
        g = x[:, :1]
        assert_rel(gray(g), reference_logits(authors_sd, g.expand(-1, 3, -1, -1)))
    two = load(tmp_path / 'ckpt.pth', in_chans=2, num_classes=0)
    assert two.stem[0].conv.weight.shape[1] == 2 and two(torch.randn(1, 2, SIZE, SIZE)).shape == (1, 320)


def test_load_with_new_kernel_sizes_extend_is_exact(tmp_path, authors_sd, x):
    torch.save({'model': authors_sd}, tmp_path / 'ckpt.pth')
    model = load(tmp_path / 'ckpt.pth', kernel_sizes=(51, 49, 47, 13), kernel_resize='extend')
    assert model.stages[0].blocks[0].large_kernel.smp.kernel_size == 51
    big = model.stages[0].blocks[0].large_kernel.smp.get_weight()
    small = authors_kernel(authors_sd, 'stages.0.blocks.0.large_kernel.smp.conv.')
    torch.testing.assert_close(big[..., 10:-10, 10:-10], small, rtol=1e-4, atol=1e-5)
    assert big[..., :10, :].abs().max() < 1e-6  # nothing outside the trained extent yet
    with torch.no_grad():
        assert_rel(model(x), reference_logits(authors_sd, x))
    model.train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    out.mean().backward()
    assert model.stages[0].blocks[0].large_kernel.smp.points.grad is not None


def test_load_with_new_kernel_sizes_stretch_rescales(tmp_path, authors_sd):
    torch.save({'model': authors_sd}, tmp_path / 'ckpt.pth')
    fine = load(tmp_path / 'ckpt.pth', kernel_sizes=(61, 57, 53, 25))  # 2k - 1 each: the grids nest
    for s, k in enumerate(CFG['kernels']):
        w_fine = fine.stages[s].blocks[0].large_kernel.smp.get_weight()
        w_auth = authors_kernel(authors_sd, f'stages.{s}.blocks.0.large_kernel.smp.conv.')
        assert w_fine.shape[-1] == 2 * k - 1
        torch.testing.assert_close(w_fine[..., ::2, ::2] * 4, w_auth, rtol=1e-4, atol=1e-5)
    # fine-tune forward/backward at (51, 49, 47, 13) from a model trained at 31
    model = load(tmp_path / 'ckpt.pth', kernel_sizes=(51, 49, 47, 13), num_classes=10).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 10)
    out.mean().backward()


def test_our_checkpoint_with_new_kernel_sizes(tmp_path, x):
    torch.manual_seed(0)
    src = timm.create_model('smpconv_mobile31').eval()
    torch.save(src.state_dict(), tmp_path / 'ours.pth')
    model = load(tmp_path / 'ours.pth', kernel_sizes=(41, 39, 37, 13), kernel_resize='extend')
    with torch.no_grad():
        assert_rel(model(x), src(x))


def test_pretrained_without_weights_says_how_to_load_a_file():
    with pytest.raises(RuntimeError, match=r'smpconv_mobile31 ships no pretrained weights.*pretrained_cfg_overlay='
                                           r'dict\(file=PATH\)') as err:
        timm.create_model('smpconv_mobile31', pretrained=True)
    assert 'corrupt' not in str(err.value)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / 'nowhere' / 'w.pth'
    with pytest.raises(FileNotFoundError, match=f'not found: {missing}'):
        timm.create_model('smpconv_mobile31', pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_unsafe_checkpoint_gets_one_message_on_every_route(tmp_path, capsys):
    """A file with a pickled object that runs code when unpickled is refused on every route that reads a
    checkpoint, with the same message: it names the file and says why it was not loaded, never advises turning the
    safe loader off (torch's and timm's own messages say to retry with weights_only=False), and the object never
    runs."""
    import traceback

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_imagenet
    from timm_smpconv.export import main as export_main
    from timm_smpconv.models import UnsafeCheckpointError

    ran = tmp_path / 'payload_ran'

    class Payload:  # unpickling it creates a file: the sign that the file's code ran
        def __reduce__(self):
            return (open, (str(ran), 'w'))

    unsafe = tmp_path / 'unsafe.pth'
    src = timm.create_model('smpconv_mobile31')
    torch.save({'state_dict': src.state_dict(), 'extra': Payload()}, unsafe)
    message = (f"checkpoint '{unsafe}' was not loaded: it holds pickled Python objects (io.open) that can "
               f"execute code when unpickled")

    def check(text):
        assert message in text, text
        assert text.count('was not loaded') == 1, text
        assert 'weights_only' not in text and 'trust' not in text, text

    for kwargs in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(unsafe))), dict(checkpoint_path=str(unsafe))):
        with pytest.raises(UnsafeCheckpointError) as err:
            timm.create_model('smpconv_mobile31', **kwargs)
        check(''.join(traceback.format_exception(err.value)))  # torch's message is not in the traceback either
    # a local-dir: (or hf-hub:) folder whose weights file pickles code
    from timm.models import save_for_hf
    save_for_hf(src, tmp_path / 'hf', safe_serialization=False)
    torch.save({'extra': Payload(), **src.state_dict()}, tmp_path / 'hf' / 'pytorch_model.bin')
    with pytest.raises(UnsafeCheckpointError) as err:
        timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True)
    text = ''.join(traceback.format_exception(err.value))
    assert f"checkpoint '{tmp_path / 'hf'}' was not loaded: it holds pickled Python objects" in text
    assert 'weights_only' not in text
    with pytest.raises(SystemExit) as exc:
        export_main(['--checkpoint', str(unsafe), '--out', str(tmp_path / 'out'), '--model', 'smpconv_mobile31'])
    assert exc.value.code == 2
    check(capsys.readouterr().err)
    base = ['--model', 'smpconv_mobile31', '--img-size', '32', '--workers', '0', '--device', 'cpu',
            '--output', str(tmp_path / 'runs')]
    for route in (['--resume'], ['--initial-checkpoint'], ['--pretrained-path'], ['--eval-only', '--checkpoint'],
                  ['--kd-model-name', 'smpconv_mobile31', '--kd-checkpoint']):
        with pytest.raises(SystemExit) as exc:
            train_imagenet.main(base + route + [str(unsafe)])
        assert exc.value.code == 2, route
        out = capsys.readouterr()
        check(out.err)
        assert 'weights_only' not in out.out
    assert not ran.exists()


# ------------------------------------------------------------------------------------------------
# The two loading routes, every family: pretrained=True with pretrained_cfg_overlay=dict(file=...) and
# timm's checkpoint_path=, with the same errors

FAMILIES = {  # one model per family (class and checkpoint filter), small, and a model of another architecture
    'smpconv_mobile31': (dict(layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), kernel_sizes=7, n_points=4), 'smp_tcn.digits'),
    'flexnet_16': (dict(stem_width=8, widths=(8,), img_size=8), 'smp_tcn.digits'),
    'smp_tcn.digits': (dict(depth=1, width=8, seq_len=16), 'flexnet_16'),
    'flextcn_2.digits': (dict(depth=1, width=8, seq_len=16), 'smp_tcn.digits'),
}


def _error(fn):
    with pytest.raises(Exception) as err:
        fn()
    return err.value


def _both_routes(name, path, **kwargs):
    """The exception each route raises for the file (pretrained route, checkpoint_path route)."""
    return (_error(lambda: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)),
            _error(lambda: timm.create_model(name, checkpoint_path=str(path), **kwargs)))


@pytest.mark.parametrize('name', list(FAMILIES))
def test_both_loading_routes_give_the_same_errors(tmp_path, name):
    small, other_name = FAMILIES[name]
    torch.manual_seed(0)
    src = timm.create_model(name, num_classes=7, **small)
    path = tmp_path / 'weights.pth'
    torch.save({'state_dict': src.state_dict(), 'epoch': 2}, path)
    # our own file with its own class count loads exactly on both routes (the classifier too)
    for model in (timm.create_model(name, num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small),
                  timm.create_model(name, num_classes=7, checkpoint_path=str(path), **small)):
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    # another class count: the pretrained route fine-tunes (new classifier), checkpoint_path names the classifier
    tuned = timm.create_model(name, num_classes=5, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small)
    assert tuned.get_classifier().weight.shape[0] == 5
    head = src.pretrained_cfg['classifier']
    with pytest.raises(ValueError, match=rf'mis-shaped keys: {head}\.weight: checkpoint \(7, 8\) vs model \(5, 8\)'):
        timm.create_model(name, num_classes=5, checkpoint_path=str(path), **small)
    # a truncated file: one RuntimeError naming the file
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(path.read_bytes()[:2000])
    a, b = _both_routes(name, bad, num_classes=7, **small)
    assert type(a) is type(b) is RuntimeError and str(a) == str(b)
    assert str(bad) in str(a) and 'corrupt or not a PyTorch / safetensors checkpoint' in str(a)
    # a checkpoint of another architecture: the keys named
    other = tmp_path / 'other.pth'
    torch.save(timm.create_model(other_name, **FAMILIES[other_name][0]).state_dict(), other)
    a, b = _both_routes(name, other, **small)
    assert type(a) is type(b) is CheckpointMismatchError and str(a) == str(b)  # a ValueError
    assert f'checkpoint does not fit the {type(src).__name__}' in str(a) and 'missing keys' in str(a)
    # a file that is not there
    a, b = _both_routes(name, tmp_path / 'nowhere.pth', **small)
    assert type(a) is type(b) is FileNotFoundError and str(a) == str(b) and 'nowhere.pth' in str(a)


@pytest.mark.parametrize('name', ['smp_tcn.speech_raw', 'flextcn_4.char_traj', 'smpconv_t'])
def test_no_weights_hint_keeps_the_tag(name):
    with pytest.raises(RuntimeError, match=rf"timm\.create_model\('{name}', pretrained=True, pretrained_cfg_overlay="):
        timm.create_model(name, pretrained=True)
