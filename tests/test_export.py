""" python -m timm_smpconv.export: a training checkpoint in, a checked Hugging Face-style folder out. """
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.utils import CheckpointSaver, ModelEmaV3, reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv.export import main
from timm_smpconv.layers import randomize_bn_stats_

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_imagenet  # noqa: E402

# a small SMP model for 32 px inputs, as the trainer's tests run it
TINY = ['--model', 'smpconv_mobile31', '--img-size', '32', '--num-classes', '3', '--device', 'cpu', '--model-kwargs',
        'kernel_sizes=[9,7,5,5]', 'n_points=[8,6,3,3]', 'small_kernel_size=3', 'channels=[16,24,32,40]',
        'layers=[1,1,1,1]']


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def trainer_checkpoint(tmp_path_factory):
    """A checkpoint as train_imagenet.py saves it (timm's CheckpointSaver: weights, EMA weights, the run's args),
    after a few optimizer steps, so that the EMA and the raw weights differ."""
    args = train_imagenet.parse_args(TINY)
    torch.manual_seed(0)
    model = randomize_bn_stats_(timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs))
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
        ema.update(model)
    out = tmp_path_factory.mktemp('run')
    CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(out), recovery_dir=str(out)
                    ).save_checkpoint(1, 0.5)
    return out / 'last.pth.tar', model.eval(), ema.module.eval()


def test_export_trainer_checkpoint_with_onnx(trainer_checkpoint, tmp_path, capsys):
    path, raw, ema = trainer_checkpoint
    out = tmp_path / 'deployed'
    report = main(['--checkpoint', str(path), '--out', str(out), '--onnx'])
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.onnx', 'model.safetensors']
    # what the folder gives, loaded as a user will: the EMA model's logits, in PyTorch and onnxruntime
    x = torch.randn(3, 3, 32, 32)
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.inference_mode and loaded.num_classes == 3
    with torch.no_grad():
        ref = ema(x)
        assert _rel(loaded(x), ref) < 1e-5
        assert _rel(raw(x), ref) > 1e-3  # (the raw weights are another model)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    assert _rel(torch.from_numpy(sess.run(None, {'x': x.numpy()})[0]), ref) < 1e-4  # dynamic batch: 3, exported at 2
    # the creation arguments came from the checkpoint's stored training arguments
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['kernel_sizes'] == [9, 7, 5, 5] and config['model_args']['inference_mode'] is True
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    # the model card lists the checks as measured, and the command printed them
    card = (out / 'README.md').read_text()
    for row in report['checks']:
        assert row['rel'] <= row['tol'] and f'{row["rel"]:.3g}' in card
    assert 'state_dict_ema weights, epoch 1' in card and 'onnxruntime' in card
    assert 'max rel diff' in capsys.readouterr().out

    # --no-ema: the raw weights; --img-size: the check's and the config's input size
    main(['--checkpoint', str(path), '--out', str(tmp_path / 'raw'), '--no-ema', '--img-size', '48'])
    loaded = timm.create_model(f'local-dir:{tmp_path / "raw"}', pretrained=True).eval()
    with torch.no_grad():
        assert _rel(loaded(x), raw(x)) < 1e-5
    assert json.loads((tmp_path / 'raw' / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 48, 48]


def test_export_authors_checkpoint_reproduces_their_model(tmp_path):
    """The SMPConv authors' layout (no stored arguments: --model names it) deploys to their network's logits,
    evaluated independently of our code."""
    from test_checkpoints import SIZE, authors_state_dict, reference_logits
    sd = authors_state_dict(seed=3, num_classes=10)
    path = tmp_path / 'authors.pth'
    torch.save({'model': sd, 'epoch': 299}, path)
    out = tmp_path / 'deployed'
    main(['--checkpoint', str(path), '--out', str(out), '--model', 'smpconv_mobile31', '--num-classes', '10',
          '--img-size', str(SIZE)])
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert _rel(loaded(x), reference_logits(sd, x)) < 1e-5
    assert 'model weights, epoch 299' in (out / 'README.md').read_text()


def test_export_bad_input_is_named(trainer_checkpoint, tmp_path, capsys):
    path, raw, _ = trainer_checkpoint

    def fails(argv, match):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert match in capsys.readouterr().err

    fails(['--checkpoint', str(tmp_path / 'none.pth'), '--out', str(tmp_path / 'a')], 'not found')
    plain = tmp_path / 'plain.pth'
    torch.save(raw.state_dict(), plain)
    fails(['--checkpoint', str(plain), '--out', str(tmp_path / 'b')], 'pass --model NAME')
    fails(['--checkpoint', str(path), '--out', str(tmp_path / 'c'), '--num-classes', '5'],
          "does not fit smpconv_mobile31 created with {'kernel_sizes': [9, 7, 5, 5]")
    # a plain state dict does not say its class count: the error gives the flag, read from the classifier's shape
    fails(['--checkpoint', str(plain), '--out', str(tmp_path / 'b'), '--model', 'smpconv_mobile31'] + TINY[-6:],
          "head.fc.weight: checkpoint (3, 40) vs model (1000, 40), head.fc.bias: checkpoint (3,) vs model (1000,); the "
          "checkpoint's classifier has 3 classes, the model 1000: pass --num-classes 3\n")
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'x.txt').write_text('keep me')
    fails(['--checkpoint', str(path), '--out', str(tmp_path / 'd')], 'exists and is not an empty folder')
    deployed = tmp_path / 'deployed.pth'
    torch.save(reparameterize_model(raw).state_dict(), deployed)
    fails(['--checkpoint', str(deployed), '--out', str(tmp_path / 'e'), '--model', 'smpconv_mobile31'] + TINY[-6:]
          + ['--num-classes', '3'], 'deployed (reparameterized) form')
    # a check that fails leaves nothing behind
    fails(['--checkpoint', str(path), '--out', str(tmp_path / 'f'), '--tol', '-1'], 'differ from the trained model')
    assert not (tmp_path / 'f').exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
