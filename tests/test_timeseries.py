""" Time series in train_imagenet.py: --dataset npz (a file the test writes) and --dataset ts/NAME (UEA / UCR
archives read with aeon, here the small ones aeon ships: BasicMotions, 6 channels, and ItalyPowerDemand, one
channel); front padding of unequal lengths (JapaneseVowels), the normalisation stored with the run, exact resume,
torchrun, and image flags refused. """
import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_smpconv.data import SequenceDataset, channel_stats, load_sequence_splits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import run_trainer  # noqa: E402

# a small SMP-TCN (2 blocks of width 16) for the tests' series
SMALL = ['--model', 'smp_tcn', '--model-kwargs', 'depth=2', 'width=16', 'n_points=8', '--device', 'cpu', '--seed', '1',
         '--log-interval', '5']


def aeon_data():
    import aeon
    return os.path.join(os.path.dirname(aeon.__file__), 'datasets', 'data')


pytestmark = pytest.mark.usefixtures('one_thread')


def run_main(argv):
    """(exit code, stdout + stderr) of the trainer run in this process."""
    return run_trainer(argv)[:2]


def summary(run_dir):
    with open(run_dir / 'summary.csv') as f:
        return list(csv.DictReader(f))


def load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def npz_dir(tmp_path_factory):
    """Three classes of 2-channel series, 40 steps: a sine whose frequency (2, 4 or 6 periods) is the class, with a
    random phase and noise; channel 1 a noisy cosine of it on another scale and offset (the normalisation has work
    to do)."""
    root = tmp_path_factory.mktemp('npz')
    rng = np.random.RandomState(0)
    for split, n in (('train', 96), ('test', 48)):
        y = np.arange(n) % 3
        phase = 2 * np.pi * (2 * (y[:, None] + 1) * np.linspace(0, 1, 40) + rng.rand(n, 1))
        x = np.stack([np.sin(phase), 50 + 10 * np.cos(phase)], axis=1) + 0.2 * rng.randn(n, 2, 40)
        np.savez(root / f'{split}.npz', X=x.astype(np.float32), y=y)
    return root


def test_npz_trains_above_chance_and_stores_its_normalisation(npz_dir, tmp_path):
    code, log = run_main(SMALL + ['--dataset', 'npz', '--data-dir', str(npz_dir), '--epochs', '6', '--lr', '5e-3',
                                  '--batch-size', '16', '--warmup-epochs', '1', '--output', str(tmp_path),
                                  '--experiment', 'n'])
    assert code == 0, log[-3000:]
    assert "preset 'sequence'" in log.lower() or "Recipe: preset 'sequence'" in log
    assert 'npz: 96 train / 48 validation series, 2 channels, 3 classes, length 40-40' in log
    rows = summary(tmp_path / 'n')
    assert max(float(r['eval_top1']) for r in rows) >= 33.3 + 40  # chance is 33.3%
    args = load(tmp_path / 'n' / 'last.pth.tar')['args']
    x_train = list(np.load(npz_dir / 'train.npz')['X'])
    mean, std = channel_stats(x_train)
    assert args.mean == pytest.approx(mean) and args.std == pytest.approx(std) and abs(args.mean[1] - 50) < 1
    assert (args.seq_len, args.in_chans, args.class_names) == (40, 2, ['0', '1', '2'])
    assert (tmp_path / 'n' / 'curves.png').is_file()
    # --eval-only with the run's checkpoint reproduces the logged accuracy
    code, log = run_main(SMALL + ['--dataset', 'npz', '--data-dir', str(npz_dir), '--eval-only', '--checkpoint',
                                  str(tmp_path / 'n' / 'last.pth.tar')])
    assert code == 0 and f'model: top-1 {float(rows[-1]["eval_top1"]):.2f}' in log, log[-2000:]


@pytest.mark.parametrize('name,chance,margin', [('BasicMotions', 25.0, 40), ('ItalyPowerDemand', 50.0, 25)])
def test_shipped_uea_ucr_archives_train_above_chance(name, chance, margin, tmp_path):
    """BasicMotions (multivariate: 6 channels, 4 classes, 40 / 40 series of 100 steps) and ItalyPowerDemand
    (univariate: 2 classes, 67 / 1,029 series of 24 steps), as aeon ships them."""
    code, log = run_main(SMALL + ['--dataset', f'ts/{name}', '--data-dir', aeon_data(), '--epochs', '8', '--lr', '5e-3',
                                  '--batch-size', '8', '--warmup-epochs', '1', '--output', str(tmp_path),
                                  '--experiment', 'ts'])
    assert code == 0, log[-3000:]
    best = max(float(r['eval_top1']) for r in summary(tmp_path / 'ts'))
    assert best >= chance + margin, (name, best)


def test_small_archive_trains_at_a_batch_that_fits(tmp_path):
    """BasicMotions has 40 training series, fewer than the sequence preset's batch of 64 (the paper's, for
    CharacterTrajectories' 1,422): the run trains at 8 (four full batches an epoch) and says so; a -b the user
    chose that gives no full batch is an error naming the -b that fits."""
    common = SMALL + ['--dataset', 'ts/BasicMotions', '--data-dir', aeon_data(), '--epochs', '1', '--warmup-epochs', '0',
                      '--output', str(tmp_path)]
    code, log = run_main(common + ['--experiment', 'fit'])
    assert code == 0, log[-3000:]
    assert "Batch size 8: 40 training series give no full batch of the preset's 64 (four batches an epoch at 8; " \
           "-b sets it)" in log
    assert load(tmp_path / 'fit' / 'last.pth.tar')['args'].batch_size == 8  # the run's record: what it trained with
    code, log = run_main(common + ['--experiment', 'b48', '-b', '48'])
    assert code == 2 and '40 training series give no full batch of 48: pass a smaller -b/--batch-size, e.g. -b 8' in log


def test_unequal_lengths_are_padded_at_the_front():
    """JapaneseVowels (12 channels, 7 to 29 steps): every series ends at the last step, padded before with zeros
    (the channel mean after normalisation)."""
    x_train, y_train, x_val, y_val, classes = load_sequence_splits('ts/JapaneseVowels', aeon_data())
    lengths = [x.shape[1] for x in x_train]
    assert len(set(lengths)) > 5 and len(classes) == 9 and x_train[0].shape[0] == 12
    mean, std = channel_stats(x_train)
    ds = SequenceDataset(x_train, y_train, mean, std, max(lengths))
    for i in (int(np.argmin(lengths)), int(np.argmax(lengths)), 7):
        x, n = ds[i][0], lengths[i]
        expected = (x_train[i] - np.array(mean)[:, None]) / np.array(std)[:, None]
        assert torch.allclose(x[:, -n:], torch.from_numpy(expected).float(), atol=1e-5)
        assert torch.all(x[:, :-n] == 0)
    pooled = torch.cat([ds[i][0][:, -lengths[i]:] for i in range(len(ds))], dim=1)
    assert pooled.mean(1).abs().max() < 1e-4 and (pooled.std(1) - 1).abs().max() < 1e-2


def test_resume_is_exact_with_ema(npz_dir, tmp_path):
    common = SMALL + ['--dataset', 'npz', '--data-dir', str(npz_dir), '--epochs', '2', '--batch-size', '16',
                      '--model-ema', '--model-ema-decay', '0.9', '--output', str(tmp_path)]
    assert run_main(common + ['--experiment', 'full'])[0] == 0
    assert run_main(common + ['--experiment', 'parts', '--stop-after-epochs', '1'])[0] == 0
    code, log = run_main(common + ['--experiment', 'parts', '--auto-resume'])
    assert code == 0 and 'Resumed from' in log, log[-2000:]
    a, b = load(tmp_path / 'full' / 'last.pth.tar'), load(tmp_path / 'parts' / 'last.pth.tar')
    for key in ('state_dict', 'state_dict_ema'):
        assert max((a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key]) <= 1e-6, key
    assert [r['eval_top1'] for r in summary(tmp_path / 'full')] == [r['eval_top1'] for r in summary(tmp_path / 'parts')]


def test_torchrun_two_ranks(npz_dir, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_imagenet.py',
           *SMALL, '--dataset', 'npz', '--data-dir', str(npz_dir), '--epochs', '1', '--batch-size', '16',
           '--output', str(tmp_path), '--experiment', 'ddp', '--model-ema']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'Distributed: 2 processes' in res.stdout
    row = summary(tmp_path / 'ddp')[0]
    assert row['eval_ema_top1'] and 0 <= float(row['eval_top1']) <= 100
    # 48 validation series over two ranks: every one counted once (timm's evaluator drops the sampler's padding)
    assert (float(row['eval_top1']) * 48 / 100) == pytest.approx(round(float(row['eval_top1']) * 48 / 100), abs=1e-6)


@pytest.mark.parametrize('argv,message', [
    (['--mixup', '0.8'], 'these image flags do not apply to them: --mixup 0.8'),
    (['--preset', 'digits'], 'these image flags do not apply to them:'),
    (['--aa', 'rand-m9-mstd0.5'], '--aa rand-m9-mstd0.5'),
    (['--channels-last'], '--channels-last True'),
    (['--in-chans', '3'], '--in-chans 3, but the npz series have 2 channels'),
    (['--mean', '0', '--std', '1'], '--mean and --std need one value per channel (2)'),
])
def test_image_flags_and_mismatches_are_refused(npz_dir, tmp_path, argv, message):
    code, log = run_main(SMALL + ['--dataset', 'npz', '--data-dir', str(npz_dir), '--output', str(tmp_path)] + argv)
    assert code == 2 and message in log, log[-2000:]


def test_bad_files_and_missing_aeon_are_named(tmp_path, monkeypatch):
    np.savez(tmp_path / 'train.npz', X=np.zeros((4, 8)), y=np.zeros(4))
    np.savez(tmp_path / 'val.npz', X=np.zeros((4, 1, 8)), y=np.zeros(4))
    code, log = run_main(SMALL + ['--dataset', 'npz', '--data-dir', str(tmp_path), '--output', str(tmp_path / 'o')])
    assert code == 2 and 'X must be (N, C, L) and y (N,)' in log
    (tmp_path / 'val.npz').unlink()
    code, log = run_main(SMALL + ['--dataset', 'npz', '--data-dir', str(tmp_path), '--output', str(tmp_path / 'o')])
    assert code == 2 and '--dataset npz reads train.npz and validation.npz or val.npz or test.npz' in log
    monkeypatch.setitem(sys.modules, 'aeon.datasets', None)  # as if aeon were not installed
    code, log = run_main(SMALL + ['--dataset', 'ts/BasicMotions', '--data-dir', aeon_data(), '--output', str(tmp_path)])
    assert code == 2 and "needs aeon: pip install 'timm-smpconv[timeseries]'" in log
