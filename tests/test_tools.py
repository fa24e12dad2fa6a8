""" FLOP counting (python -m timm_smpconv.flops) and kernel pictures (python -m timm_smpconv.visualize). """
import pytest
import timm
import torch
from timm.utils import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv import flops, visualize

# the authors' models measured with fvcore: conv GFLOPs per image, kernel generation per forward
PAPER = {'smpconv_t': (5.7066, 0.5306), 'smpconv_b': (16.6092, 1.5226),
         'smpconv_mobile31': (1.3250, 0.0736), 'smpconv_mobile51': (2.4449, 0.6070)}


@pytest.mark.parametrize('name', list(PAPER))
def test_flops_match_the_paper(name):
    counts = flops.count_flops(timm.create_model(name), img_size=224)
    conv, gen = PAPER[name]
    assert abs(counts['conv'] / 1e9 - conv) < 0.01
    assert abs(counts['kernel_gen'] / 1e9 - gen) < 0.001
    assert counts['params'] == sum(p.numel() for p in timm.create_model(name, device='meta').parameters())


def test_flops_per_image_vs_per_forward_and_reparam():
    model = timm.create_model('smpconv_mobile31')
    one = flops.count_flops(model, img_size=96, batch_size=1)
    two = flops.count_flops(model, img_size=96, batch_size=2)
    assert two['conv'] == pytest.approx(one['conv'])            # per image
    assert two['kernel_gen'] == pytest.approx(one['kernel_gen'])  # per forward
    assert two['total'] == pytest.approx(2 * one['total'] - one['kernel_gen'])
    fused = flops.count_flops(reparameterize_model(model.eval()), img_size=96)
    assert fused['kernel_gen'] == 0 and fused['norm'] == 0
    # the merged 5x5 branches are gone: conv FLOPs drop by exactly their cost
    c5 = sum(m.weight.numel() * (96 // (4 * 2 ** int(n.split('.')[1]))) ** 2
             for n, m in model.named_modules() if n.endswith('small_conv'))
    assert fused['conv'] == pytest.approx(one['conv'] - c5)


def test_flops_cli(capsys):
    counts = flops.main(['--model', 'smpconv_mobile31', '--img-size', '64', '--reparam'])
    out = capsys.readouterr().out
    assert 'smpconv_mobile31 at 64x64 (reparameterized)' in out and 'conv GFLOPs per image' in out
    assert f'{counts["params"]:,}' in out


@pytest.mark.parametrize('tool', [flops, visualize])
def test_tool_cli_names_itself_and_a_bad_model_in_one_line(tool, capsys):
    prog = f'python -m {tool.__name__}'
    with pytest.raises(SystemExit) as exc:
        tool.main(['--help'])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f'usage: {prog} ')
    for argv, message in ((['--model', 'nosuch'], "unknown model 'nosuch'; ours: ckcnn_16, flexnet_16, flextcn_2"),
                          (['--model', 'smpconv_mobile31.nosuchtag'], 'could not create smpconv_mobile31.nosuchtag: ')):
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f'{prog}: error: {message}') and err.count('\n') == 1, err
        assert 'smp_tcn' in err or 'nosuchtag' in err


def test_flops_cli_shows_no_fvcore_warning(capsys):
    """fvcore.nn's import scripts a loss with the deprecated torch.jit.script: the CLI does not pass the
    FutureWarning on. Checked on a fresh import (the modules are cached by earlier tests), then restored."""
    import importlib
    import sys
    import warnings

    def ours(k):
        return k == 'timm_smpconv.flops' or k == 'fvcore.nn' or k.startswith('fvcore.nn.')

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    try:
        for k in saved:
            del sys.modules[k]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            importlib.import_module('timm_smpconv.flops').main(['--model', 'flextcn_2.digits', '--seq-len', '16'])
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        timm_smpconv.flops = saved['timm_smpconv.flops']
    assert 'conv GFLOPs per image' in capsys.readouterr().out
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_visualize_writes_png(tmp_path):
    out = tmp_path / 'kernels.png'
    visualize.main(['--model', 'smpconv_mobile31', '--out', str(out), '--channels', '2'])
    data = out.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000
    model = timm.create_model('smpconv_mobile31')
    assert visualize._default_layers(model) == [f'stages.{i}.blocks.0.large_kernel.smp' for i in range(4)]
    with pytest.raises(ValueError, match='not SMP layers'):
        visualize.plot_kernels(model, ['stem.0'], out=str(out))


def test_visualize_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('smpconv_mobile31')
    torch.save({'state_dict': src.state_dict()}, tmp_path / 'ckpt.pth')
    out = tmp_path / 'k.png'
    visualize.main(['--model', 'smpconv_mobile31', '--checkpoint', str(tmp_path / 'ckpt.pth'), '--out', str(out),
                    '--layers', 'stages.2.blocks.2.large_kernel.smp'])
    assert out.stat().st_size > 5_000


@pytest.mark.parametrize('name', ['ckcnn_16', 'flexnet_16'])
def test_kernel_network_cost_is_kernel_generation_paid_once_per_forward(name):
    model = timm.create_model(name)
    one = flops.count_flops(model, img_size=32, batch_size=1)
    four = flops.count_flops(model, img_size=32, batch_size=4)
    assert one['kernel_gen'] > 0 and four['kernel_gen'] == pytest.approx(one['kernel_gen'])
    assert one['linear'] == four['linear'] == 48 * 10  # the classifier alone, per image
    assert four['total'] == pytest.approx(4 * one['total'] - 3 * one['kernel_gen'])
