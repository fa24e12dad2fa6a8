""" --bn-recalibrate: the validation a short run logs, the checkpoints it writes and their --eval-only / --reparam
evaluation all reflect what the weights learned (BatchNorm statistics re-estimated before each validation). """
import argparse
import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import run_trainer  # noqa: E402

import train_imagenet  # noqa: E402
from timm_smpconv._fvcore import update_bn_stats  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def run_main(argv):
    return run_trainer(argv)


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """One epoch of the README's main job (the digits preset, --bn-recalibrate 8 by default)."""
    out = tmp_path_factory.mktemp('bn')
    code, log, _ = run_main(['--epochs', '1', '--output', str(out), '--experiment', 'r'])
    assert code == 0, log[-3000:]
    with open(out / 'r' / 'summary.csv') as f:
        row = next(csv.DictReader(f))
    return out / 'r', float(row['eval_top1']), float(row['eval_ema_top1'])


def test_epoch0_validation_matches_the_weights_with_precise_statistics(digits_run, monkeypatch, tmp_path):
    """The logged epoch-0 top-1 of model and EMA is within 5 points of the same saved weights evaluated after their
    statistics are re-estimated on the whole training epoch (stale statistics gave ~10%, chance, here)."""
    run_dir, logged, logged_ema = digits_run
    assert logged > 50 and logged_ema > 50
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    state = train_imagenet.run(train_imagenet.parse_args(['--epochs', '1', '--output', str(tmp_path)]))
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key, module, value in (('state_dict', state.model, logged), ('state_dict_ema', state.model_ema.module, logged_ema)):
        module.load_state_dict(ckpt[key])
        module.train()
        update_bn_stats(module, (x for x, _ in train_imagenet.training_batches(state)), num_iters=state.num_batches)
        precise = train_imagenet.evaluate(module, state.loader_eval, state.args, state.device)['top1']
        assert abs(precise - value) <= 5, (key, precise, value)


def test_eval_only_and_reparam_reproduce_the_logged_accuracy(digits_run):
    run_dir, logged, logged_ema = digits_run
    for extra in ([], ['--reparam']):
        code, log, results = run_main(['--eval-only', '--checkpoint', str(run_dir / 'last.pth.tar')] + extra)
        assert code == 0, log[-3000:]
        assert results['model']['top1'] == pytest.approx(logged, abs=0.5), extra
        assert results['EMA']['top1'] == pytest.approx(logged_ema, abs=0.5), extra


def test_recalibration_is_off_with_zero_and_leaves_weights_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    args = ['--epochs', '1', '--output', str(tmp_path), '--model-kwargs', 'kernel_sizes=[9,7,5,5]', 'n_points=[8,6,3,3]',
            'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]', '--batch-size', '16']
    state = train_imagenet.run(train_imagenet.parse_args(args + ['--bn-recalibrate', '3']))
    params = {k: v.clone() for k, v in state.model.state_dict().items() if 'running' not in k and 'num_batches' not in k}
    before = state.model.stem[0].bn.running_var.clone()
    ema_before = [b.clone() for n, b in state.model_ema.module.named_buffers() if n.endswith('running_var')]
    train_imagenet.recalibrate_bn(state)
    assert all(torch.equal(v, state.model.state_dict()[k]) for k, v in params.items())  # weights unchanged
    assert not torch.equal(before, state.model.stem[0].bn.running_var)
    ema_after = [b for n, b in state.model_ema.module.named_buffers() if n.endswith('running_var')]
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, ema_after))
    assert not state.model_ema.module.training  # back in eval mode
    off = train_imagenet.run(train_imagenet.parse_args(args + ['--bn-recalibrate', '0']))
    snapshot = [b.clone() for _, b in off.model.named_buffers()]
    train_imagenet.recalibrate_bn(off)
    assert all(torch.equal(a, b) for a, (_, b) in zip(snapshot, off.model.named_buffers()))
