""" Sequence models (SMP-TCN, FlexTCN): parameter counts, causality, the 1-D FFT path, reparameterization,
the authors' checkpoint layout, the timm contract, sequence length, bad input. """
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import check_timm_model_contract, fx_model, random_bn_entries
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv import flops
from timm_smpconv.layers import CausalConv1d, FlexConv1d, randomize_bn_stats_
from timm_smpconv.ops import causal_conv1d, conv_impl, select_causal_backend

# the authors' models, measured on their code
PARAMS = [
    ('smp_tcn.smnist', 370_960), ('smp_tcn.pmnist', 370_960), ('smp_tcn.speech_raw', 370_960),
    ('smp_tcn.scifar10', 373_480), ('smp_tcn.char_traj', 373_790), ('smp_tcn.speech_mfcc', 391_840),
    ('flextcn_2', 105_548), ('flextcn_4', 239_436), ('flextcn_6', 373_324), ('flextcn_6.scifar10', 375_364),
]
SMALL = [('smp_tcn', dict(seq_len=40, in_chans=2, num_classes=5)),
         ('flextcn_2', dict(seq_len=40, in_chans=2, num_classes=5))]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name,params', PARAMS)
def test_parameter_counts_equal_the_authors(name, params):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize('name,kwargs', SMALL)
@pytest.mark.parametrize('impl', ['direct', 'fft'])
def test_causal_eager_and_reparameterized(name, kwargs, impl):
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model(name, **kwargs)).eval()
    fused = reparameterize_model(model)
    x = torch.randn(2, 2, 40)
    for m in (model, fused):
        with torch.no_grad(), conv_impl(impl):
            base = m.forward_features(x)
            for t in (1, 17, 39):
                xp = x.clone()
                xp[:, :, t] += 5.0
                out = m.forward_features(xp)
                if impl == 'direct':
                    assert torch.equal(out[:, :, :t], base[:, :, :t])  # nothing before t moves
                else:  # the FFT spreads float rounding, nothing more
                    assert (out[:, :, :t] - base[:, :, :t]).abs().max() <= 1e-5 * base.abs().max()
                assert (out[:, :, t:] - base[:, :, t:]).abs().max() > 1e-3


@pytest.mark.parametrize('n,length,k', [(2, 50, 50), (1, 51, 51), (2, 37, 12), (1, 10, 40), (2, 64, 64)])
def test_causal_fft_equals_direct_values_and_gradients(n, length, k):
    torch.manual_seed(0)
    x = torch.randn(n, 3, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(F.pad(x, (k - 1, 0)), w, b)
    gy = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, w, b), gy)
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    with conv_impl('fft'):
        assert select_causal_backend(xf, wf) == 'fft'
        y = causal_conv1d(xf, wf, bf)
    assert rel(y.double(), ref) < 1e-5
    for got, exp in zip(torch.autograd.grad(y, (xf, wf, bf), gy.float()), want):
        assert rel(got.double(), exp) < 1e-5
    # grouped (depthwise) too
    wd = torch.randn(3, 1, k, dtype=torch.float64)
    with conv_impl('fft'):
        yd = causal_conv1d(x.detach().float(), wd.float(), None, groups=3)
    assert rel(yd.double(), F.conv1d(F.pad(x.detach(), (k - 1, 0)), wd, None, groups=3)) < 1e-5


def test_causal_dispatch_rule_and_module():
    x = torch.randn(1, 2, 100)
    assert select_causal_backend(x, torch.randn(2, 2, 5)) == 'direct'
    assert select_causal_backend(x, torch.randn(2, 2, 100)) == 'fft'
    assert select_causal_backend(torch.randn(1, 2, 8), torch.randn(2, 2, 100)) == 'direct'  # cut to 8 taps
    with conv_impl('direct'):
        assert select_causal_backend(x, torch.randn(2, 2, 100)) == 'direct'
    conv = CausalConv1d(2, 3, 70)
    torch.testing.assert_close(conv(x), F.conv1d(F.pad(x, (69, 0)), conv.weight, conv.bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,kwargs', SMALL)
def test_reparameterized_outputs_equal(name, kwargs):
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model(name, **kwargs)).eval()
    x = torch.randn(3, 2, 40)
    fused = reparameterize_model(model)
    kinds = {type(m).__name__ for m in fused.modules()}
    assert not kinds & {'SMPConv1d', 'FlexConv1d', 'SMPLargeKernel1d', 'FlexConvBN1d', 'BatchNorm1d'}
    assert 'CausalConv1d' in kinds
    with torch.no_grad():
        assert rel(fused(x), model(x)) < 1e-5


def _authors_tcn_state_dict(cin, classes, bias, g):
    """A random state dict in the SMP authors' sequence-model layout (`backbone.{i}`, `finallyr`)."""
    sd = {}
    for i in range(6):
        c = cin if i == 0 else 30
        p = f'backbone.{i}.'
        for j, ci in ((1, c), (2, 30)):
            sd[p + f'cconv{j}.train_length'] = torch.tensor([40], dtype=torch.int32)
            sd[p + f'cconv{j}.Kernel.weight_coord'] = torch.rand(30, 30, 1, generator=g) * 2 - 1
            sd[p + f'cconv{j}.Kernel.radius'] = torch.rand(30, 30, 1, generator=g) * 0.1 + 0.05
            sd[p + f'cconv{j}.Kernel.weights'] = torch.randn(30, ci, 30, generator=g) * 0.1
            if bias:
                sd[p + f'cconv{j}.bias'] = torch.randn(30, generator=g) * 0.1
            sd[p + f'cconv{j}s.weight'] = torch.randn(30, ci, 5, generator=g) * 0.1
            random_bn_entries(sd, p + f'norm{j}.', 30, g)
            random_bn_entries(sd, p + f'norm{j}s.', 30, g)
        if i == 0 and c != 30:
            sd[p + 'shortcut.0.weight'] = torch.randn(30, c, 1, generator=g) * 0.3
            sd[p + 'shortcut.0.bias'] = torch.randn(30, generator=g) * 0.1
    sd['finallyr.weight'] = torch.randn(classes, 30, generator=g) * 0.1
    sd['finallyr.bias'] = torch.randn(classes, generator=g) * 0.1
    return sd


def _authors_forward(sd, x):
    """The authors' SMP-TCN in eval mode, written from their description alone (no package code): count-
    normalised tent kernels on linspace(-1, 1, k), causal conv (left pad k - 1), BN, 5-tap branches."""
    def bn(h, p):
        return (h - sd[p + 'running_mean'][:, None]) / torch.sqrt(sd[p + 'running_var'][:, None] + 1e-5) \
            * sd[p + 'weight'][:, None] + sd[p + 'bias'][:, None]

    def smp(h, p):
        k = int(sd[p + 'train_length'])
        q = torch.linspace(-1, 1, k)
        pos, r, w = sd[p + 'Kernel.weight_coord'], sd[p + 'Kernel.radius'], sd[p + 'Kernel.weights']
        g = torch.relu(1 - (q[None, None, :] - pos).abs() / r)  # (Cout, P, k)
        g = g / ((g != 0).sum(1, keepdim=True) + 1e-6)
        kern = torch.einsum('oip,opk->oik', w, g)
        return F.conv1d(F.pad(h, (k - 1, 0)), kern, sd.get(p + 'bias'))

    def branch(h, i, j):
        p = f'backbone.{i}.'
        small = F.conv1d(F.pad(h, (4, 0)), sd[p + f'cconv{j}s.weight'])
        return torch.relu(bn(smp(h, p + f'cconv{j}.'), p + f'norm{j}.') + bn(small, p + f'norm{j}s.'))

    for i in range(6):
        h = branch(branch(x, i, 1), i, 2)
        p = f'backbone.{i}.shortcut.0.'
        s = F.conv1d(x, sd[p + 'weight'], sd[p + 'bias']) if p + 'weight' in sd else x
        x = torch.relu(h + s)
    return x[:, :, -1] @ sd['finallyr.weight'].t() + sd['finallyr.bias']


@pytest.mark.parametrize('tag,cin,classes,bias', [('smnist', 1, 10, False), ('char_traj', 3, 20, True)])
def test_authors_checkpoint_reproduces_their_model(tmp_path, tag, cin, classes, bias):
    g = torch.Generator().manual_seed(cin)
    sd = _authors_tcn_state_dict(cin, classes, bias, g)
    path = tmp_path / 'smp_tcn.pth'
    torch.save({'model': sd, 'epoch': 3}, path)
    # the dataset's tag sets channels, classes and conv bias (seq_len 40 keeps the test small)
    model = timm.create_model(f'smp_tcn.{tag}', pretrained=True, seq_len=40,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert model.in_chans == cin and model.num_classes == classes
    x = torch.randn(2, cin, 40, generator=g)
    with torch.no_grad():
        ref = _authors_forward(sd, x)
        assert rel(model(x), ref) < 1e-5
        for impl in ('direct', 'fft'):
            with conv_impl(impl):
                assert rel(model(x), ref) < 1e-5
    # wrong layouts are named
    bad = dict(sd)
    bad['backbone.1.cconv1.Kernel.weights'] = torch.zeros(30, 29, 30)
    del bad['finallyr.bias']
    torch.save({'model': bad}, path)
    with pytest.raises(ValueError, match=r'(?s)blocks\.1\.conv1\.smp\.weight.*head\.bias|head\.bias.*blocks\.1'):
        timm.create_model(f'smp_tcn.{tag}', pretrained=True, seq_len=40, pretrained_cfg_overlay=dict(file=str(path)))


# the FlexConv authors' FlexTCN (rjbruin/flexconv, models/cktcn.py): random values in their layout
TAU_C = math.sqrt(-2 * math.log(0.1))  # their mask threshold 0.1: the mask is below it beyond mean -+ sigma * TAU_C
FLEX_MASKS = [(1.0, 0.075), (1.0, 0.3), (0.9, 0.45), (1.0, 1.0), (0.3, 0.2), (1.0, 0.6)]  # crops 40 -> 3 .. none


def _authors_flextcn_state_dict(depth, cin, classes, g, train_length=40):
    """A FlexTCN state dict as their code saves it: `backbone.{i}.cconv{1,2}` 1-D FlexConvs (MAGNet kernel
    net of 1x1 Conv1d layers, hidden 32, 3 layers, Gaussian mask (1, 2)), `norm{1,2}` BatchNorm1d,
    `shortcut.0` Conv1d in block 0 when cin != 30, `finallyr` Linear."""
    H, sd = 32, {}

    def uniform(shape, bound):
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    for i in range(depth):
        p = f'backbone.{i}.'
        for j, ci in ((1, cin if i == 0 else 30), (2, 30)):
            f = p + f'cconv{j}.'
            mean, sigma = FLEX_MASKS[(2 * i + j - 1) % len(FLEX_MASKS)]
            sd[f + 'bias'] = torch.randn(30, generator=g) * 0.1
            sd[f + 'mask_params'] = torch.tensor([[mean, sigma]])
            sd[f + 'train_length'] = torch.tensor([0 if (i, j) == (0, 2) else train_length], dtype=torch.int32)
            sd[f + 'temperature'] = torch.tensor([15.0])
            sd[f + 'mask_threshold'] = torch.tensor([0.1])
            for l in range(3):
                sd[f + f'Kernel.linear.{l}.weight'] = uniform((H, H, 1), math.sqrt(1 / H))
                sd[f + f'Kernel.linear.{l}.bias'] = uniform((H,), 1 / math.sqrt(H))
            sd[f + 'Kernel.output_linear.weight'] = uniform((30 * ci, H, 1), 1 / math.sqrt(H))
            sd[f + 'Kernel.output_linear.bias'] = uniform((30 * ci,), 1 / math.sqrt(H))
            for l in range(4):
                gamma = torch._standard_gamma(torch.full((H, 1), 6.0 / (l + 1)), generator=g)
                sd[f + f'Kernel.filters.{l}.mu'] = uniform((H, 1), 0.125)
                sd[f + f'Kernel.filters.{l}.gamma'] = gamma
                sd[f + f'Kernel.filters.{l}.linear.weight'] = (uniform((H, 1), 1) * 12.8 * gamma).view(H, 1, 1)
                sd[f + f'Kernel.filters.{l}.linear.bias'] = uniform((H,), math.pi)
            random_bn_entries(sd, p + f'norm{j}.', 30, g)
        if i == 0 and cin != 30:
            sd[p + 'shortcut.0.weight'] = torch.randn(30, cin, 1, generator=g) / math.sqrt(cin)
            sd[p + 'shortcut.0.bias'] = torch.randn(30, generator=g) * 0.1
    sd['finallyr.weight'] = torch.randn(classes, 30, generator=g) * 0.3
    sd['finallyr.bias'] = torch.randn(classes, generator=g) * 0.1
    return sd


def _authors_flextcn_forward(sd, x):
    """Their FlexTCN in eval mode, written from their code's description alone (no package code): the horizon is
    the saved train_length (the input length if 0), the grid linspace(-1, 1, k) cropped to the positions past
    the mask's lower root (when |root| < 1), MAGNet on it, times the mask; an even kernel gets one zero tap in
    front; causal conv (left pad k - 1); BN; ReLU; dropout off."""
    H = 32

    def flexconv(h, f):
        k = int(sd[f + 'train_length']) or h.shape[-1]
        lin = torch.linspace(-1, 1, k)
        mean, sigma = sd[f + 'mask_params'][0].tolist()
        root = min(mean - sigma * TAU_C, mean + sigma * TAU_C)
        grid = lin[int(torch.nonzero(lin > root)[0]):] if abs(root) < 1 else lin
        pos = grid.view(1, 1, -1)

        def gabor(l):
            q = f + f'Kernel.filters.{l}.'
            env = torch.exp(-0.5 * (sd[q + 'gamma'].view(1, H, 1) * (pos - sd[q + 'mu'].view(1, H, 1))) ** 2)
            return env * torch.sin(F.conv1d(pos, sd[q + 'linear.weight'], sd[q + 'linear.bias']))

        z = gabor(0)
        for l in range(3):
            z = gabor(l + 1) * F.conv1d(z, sd[f + f'Kernel.linear.{l}.weight'], sd[f + f'Kernel.linear.{l}.bias'])
        kernel = F.conv1d(z, sd[f + 'Kernel.output_linear.weight'], sd[f + 'Kernel.output_linear.bias'])
        kernel = kernel.view(-1, h.shape[1], grid.shape[0]) * torch.exp(-0.5 * ((grid - mean) / sigma) ** 2)
        if kernel.shape[-1] % 2 == 0:
            kernel = F.pad(kernel, (1, 0))
        return F.conv1d(F.pad(h, (kernel.shape[-1] - 1, 0)), kernel, sd[f + 'bias'])

    def bn(h, p):
        return F.batch_norm(h, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                            False, 0., 1e-5)

    i = 0
    while f'backbone.{i}.cconv1.bias' in sd:
        p = f'backbone.{i}.'
        s = F.conv1d(x, sd[p + 'shortcut.0.weight'], sd[p + 'shortcut.0.bias']) if p + 'shortcut.0.weight' in sd else x
        h = torch.relu(bn(flexconv(x, p + 'cconv1.'), p + 'norm1.'))
        x = torch.relu(torch.relu(bn(flexconv(h, p + 'cconv2.'), p + 'norm2.')) + s)
        i += 1
    return x[:, :, -1] @ sd['finallyr.weight'].t() + sd['finallyr.bias']


def test_authors_flextcn_layout_has_their_parameter_counts():
    g = torch.Generator().manual_seed(0)
    buffers = ('running_mean', 'running_var', 'num_batches_tracked', 'train_length', 'temperature', 'mask_threshold')
    for depth, params in ((2, 105_548), (4, 239_436), (6, 373_324)):
        sd = _authors_flextcn_state_dict(depth, 1, 10, g)
        assert sum(v.numel() for k, v in sd.items() if not k.endswith(buffers)) == params


@pytest.mark.parametrize('name,kwargs,cin,classes', [
    ('flextcn_6', dict(in_chans=1, num_classes=10), 1, 10),   # the call: channels and classes as kwargs
    ('flextcn_2.char_traj', {}, 3, 20),                         # the dataset's tag sets them
    ('flextcn_4', dict(in_chans=3, num_classes=20), 3, 20),    # kwargs other than the default tag's: head kept
])
def test_authors_flextcn_checkpoint_reproduces_their_model(tmp_path, name, kwargs, cin, classes):
    depth = int(name.split('.')[0][-1])
    g = torch.Generator().manual_seed(depth)
    sd = _authors_flextcn_state_dict(depth, cin, classes, g)
    path = tmp_path / 'flextcn.pth'
    torch.save({'model': sd, 'optimizer': {}, 'epoch': 7}, path)
    x = torch.randn(2, cin, 40, generator=g)
    with torch.no_grad():
        ref = _authors_flextcn_forward(sd, x)
    for model in (timm.create_model(name, pretrained=True, seq_len=40, pretrained_cfg_overlay=dict(file=str(path)), **kwargs),
                  timm.create_model(name, seq_len=40, checkpoint_path=str(path), **kwargs)):
        model.eval()
        assert model.in_chans == cin and model.num_classes == classes and len(model.blocks) == depth
        with torch.no_grad():
            for impl in ('direct', 'fft'):
                with conv_impl(impl):
                    assert rel(model(x), ref) < 1e-5, impl
    # the crops the checkpoint asks for: 40 taps, the newest 3 (mean 1, sigma 0.075) up to all (sigma 1)
    lengths = {m.conv.get_weight().shape[-1] for m in model.modules() if type(m).__name__ == 'FlexConvBN1d'}
    assert min(lengths) <= 4 and 40 in lengths and len(lengths) >= 4


def test_authors_flextcn_bad_checkpoints_are_named(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = _authors_flextcn_state_dict(2, 1, 10, g)

    def load(obj, name='flextcn_2'):
        torch.save({'model': obj}, tmp_path / 'f.pth')
        return timm.create_model(name, pretrained=True, seq_len=40, pretrained_cfg_overlay=dict(file=str(tmp_path / 'f.pth')))

    bad = dict(sd)
    bad['backbone.1.cconv2.Kernel.output_linear.weight'] = torch.zeros(29 * 30, 32, 1)
    del bad['backbone.0.norm2.running_var']
    bad['backbone.1.cconv1s.weight'] = torch.zeros(30, 30, 5)
    with pytest.raises(ValueError) as err:
        load(bad)
    msg = str(err.value)
    assert 'missing keys: blocks.0.conv2.bn.running_var' in msg
    assert 'unexpected keys: backbone.1.cconv1s.weight' in msg
    assert 'blocks.1.conv2.conv.kernel_net.output.weight: checkpoint (870, 32) vs model (900, 32)' in msg
    with pytest.raises(ValueError, match=r'backbone\.1\.cconv1\.mask_threshold = 0\.2.* mask_threshold=0\.1'):
        load(dict(sd, **{'backbone.1.cconv1.mask_threshold': torch.tensor([0.2])}))
    with pytest.raises(ValueError, match=r"authors' FlexTCN, which does not fit this SMP-TCN"):
        load(sd, 'smp_tcn')
    smp = _authors_tcn_state_dict(1, 10, False, g)
    with pytest.raises(ValueError, match=r"authors' SMP-TCN, which does not fit this FlexTCN"):
        load(smp, 'flextcn_6')


@pytest.mark.parametrize('name', ['smp_tcn.digits', 'flextcn_2.digits'])
def test_timm_contract(name):
    check_timm_model_contract(name)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 8, 8)
    feats = timm.create_model(name, features_only=True, out_indices=(0, -1)).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    outs = feats(x)
    assert [o.shape for o in outs] == [(2, 30, 64)] * 2
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.blocks) and torch.equal(final, inter[-1])
    with torch.no_grad():
        y = model(x)
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True), model.forward_features(x)[:, :, -1])
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), y)
        # fx, as timm's tests trace
        torch.testing.assert_close(next(iter(fx_model(model, False)(x).values())), y)
    # the image is read in raster order: the same as the flattened sequence
    torch.testing.assert_close(model(x.flatten(2)), y)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


def test_sequence_length_rule():
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model('smp_tcn', seq_len=40, in_chans=1)).eval()
    x = torch.randn(2, 1, 60)
    with torch.no_grad():
        long = model.forward_features(x)
        # kernels fixed in time steps: a shorter sequence gives exactly the prefix of a longer one's outputs
        assert rel(model.forward_features(x[:, :, :25]), long[:, :, :25]) < 1e-5
        assert model(x).shape == (2, 10)
        y40 = model(x[:, :, :40])
        model.set_seq_len(79)  # 'stretch': the same continuous kernels, sampled at 79 taps
        assert model.blocks[0].conv1.smp.get_weight().shape[-1] == 79 and model.seq_len == 79
        model.set_seq_len(40)
        assert rel(model(x[:, :, :40]), y40) < 1e-5  # a round trip restores the model
    flex = timm.create_model('flextcn_2', seq_len=40, in_chans=1).eval()
    flex.set_seq_len(21)
    assert flex.blocks[0].conv1.conv.kernel_size == 21 and flex(torch.randn(1, 1, 30)).shape == (1, 10)
    with pytest.raises(ValueError, match='mode'):
        model.set_seq_len(50, mode='extend')


def test_permutation_is_fixed_stored_and_tied_to_the_length():
    a = timm.create_model('smp_tcn.pdigits')
    b = timm.create_model('smp_tcn.pdigits')
    assert torch.equal(a.permutation, b.permutation) and 'permutation' in a.state_dict()
    assert sorted(a.permutation.tolist()) == list(range(64)) and a.permutation.tolist() != list(range(64))
    x = torch.randn(2, 3, 8, 8)
    plain = timm.create_model('smp_tcn.digits').eval()
    plain.load_state_dict({k: v for k, v in a.state_dict().items() if k != 'permutation'})
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), plain(x.flatten(2)[:, :, a.permutation]))
    with pytest.raises(ValueError, match='fixed permutation, got 49 steps'):
        a(torch.randn(2, 3, 7, 7))
    with pytest.raises(ValueError, match='cannot be re-targeted'):
        a.set_seq_len(49)


@pytest.mark.parametrize('x,match', [
    (torch.randn(2, 2, 64), r'expects \(N, 3, L\) sequences'),
    (torch.randn(2, 3, 0), 'empty'),
    (torch.randn(3, 64), r'expects \(N, 3, L\)'),
])
def test_bad_input_raises(x, match):
    model = timm.create_model('smp_tcn.digits')
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="conv_type must be one of"):
        timm.create_model('smp_tcn', conv_type='lstm')
    with pytest.raises(ValueError, match="radius and conv_bias apply to conv_type='smp' only"):
        timm.create_model('flextcn_2', radius=0.1)
    with pytest.raises(ValueError, match='seq_len must be an int >= 2'):
        timm.create_model('smp_tcn', seq_len=1)
    with pytest.raises(ValueError, match='global_pool must be one of'):
        timm.create_model('smp_tcn', global_pool='avg')


def test_flexconv1d_mask_crop_and_causal_kernel():
    torch.manual_seed(0)
    conv = FlexConv1d(2, 3, 101)
    assert conv.mask_params.tolist() == [[1.0, pytest.approx(0.075)]]
    w = conv.get_weight()
    # at init the mask (mean +1, sigma 0.075) keeps the newest positions p > 1 - 0.075 * 2.146
    grid = torch.linspace(-1, 1, 101)
    assert w.shape[-1] == int((grid > 1 - 0.075 * (-2 * torch.tensor(0.1).log()).sqrt()).sum())
    x = torch.randn(2, 2, 50)
    full = F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, conv.bias)
    torch.testing.assert_close(conv(x), full, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        conv.mask_params[0, 1] = 2.0  # wide mask: nothing cropped
    assert conv.get_weight().shape[-1] == 101


def test_flops_of_a_sequence_model():
    model = timm.create_model('smp_tcn.digits')
    counts = flops.count_flops(model, seq_len=64)
    # the conv work of the rendered kernels: (SMP 64 taps + 5 taps) x C_in x 30 per step, plus the shortcut
    per_step = sum((64 + 5) * c * 30 for c in [3, 30] + [30, 30] * 5) + 3 * 30
    assert counts['conv'] == per_step * 64
    assert counts['kernel_gen'] > 0 and counts['params'] == sum(p.numel() for p in model.parameters())
    out = flops.main(['--model', 'smp_tcn.digits'])
    assert out['conv'] == counts['conv']
