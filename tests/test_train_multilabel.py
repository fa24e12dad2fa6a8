""" train_imagenet.py at timm 1.0.31's train.py contract (issue 28): multi-label training on the built-in digit pairs
(timm's MultiLabelClassificationTask and evaluator), --loss with timm's create_classification_loss and class
weighting, the WSD schedule, --stop-epoch / --resume auto / --save-epochs, and the one-line errors of the trainer. """
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from timm.data import MultiLabelTarget
from timm.loss import (
    AsymmetricLossMultiLabel,
    DistributionBalancedLoss,
    PolyBinaryCrossEntropy,
    PolyCrossEntropy,
    ZlprLoss,
    compute_class_weights,
)
from timm.scheduler import WSDLRScheduler
from timm.task import MultiLabelClassificationEvaluator, MultiLabelClassificationTask

from timm_smpconv.data import DIGIT_PAIRS_MEAN, DIGIT_PAIRS_STD, DigitPairsDataset, DigitsDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import TINY_SMP, built_trainer_state, load_train_checkpoint, run_trainer, summary_rows  # noqa: E402

import train_imagenet  # noqa: E402

TINY = TINY_SMP + ['--log-interval', '20', '--validation-batch-size', '128']
ML = TINY + ['--task', 'multilabel']
built_state = built_trainer_state
load_ckpt = load_train_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')


def max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- the built-in multi-label task ------------------------------------------------------------------------------

def test_digit_pairs_are_two_real_digits_and_the_set_of_their_classes():
    digits = DigitsDataset('val')
    pairs = DigitPairsDataset('val')
    assert len(pairs) == len(digits) == 359 and len(DigitPairsDataset('train')) == 1438
    left = {bytes(img[4:12, :8, 0]) for img in pairs.images}
    assert left == {bytes(img[..., 0]) for img in digits.images}  # every validation digit once, on the left
    by_image = {bytes(img[..., 0]): int(t) for img, t in zip(digits.images, digits.targets)}
    for img, target in zip(pairs.images, pairs.targets):
        classes = {by_image[bytes(img[4:12, :8, 0])], by_image[bytes(img[4:12, 8:, 0])]}
        assert target == sorted(classes)
        assert not img[:4].any() and not img[12:].any()  # blank border above and below
    assert 1.85 < np.mean([len(t) for t in pairs.targets]) < 1.95
    img, target = DigitPairsDataset('train', target_transform=MultiLabelTarget(10))[0]
    assert img.size == (16, 16) and target.dtype == torch.float32 and target.sum() in (1, 2)
    grey = DigitPairsDataset('train').images[..., 0] / 255.
    assert (round(grey.mean(), 4), round(grey.std(), 4)) == (DIGIT_PAIRS_MEAN[0], DIGIT_PAIRS_STD[0])


def label_frequency_map(dataset):
    """mAP (%) of a constant predictor on the dataset: every class's AP is its positive rate (timm's evaluator)."""
    encode = MultiLabelTarget(10)
    target = torch.stack([encode(t) for t in dataset.targets])
    evaluator = MultiLabelClassificationEvaluator()
    evaluator.update(torch.zeros_like(target), target)
    return evaluator.compute()['map'], 100 * target.mean().item()


@pytest.fixture(scope='module')
def multilabel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ml')
    code, log, best = run_trainer(ML + ['--output', str(out), '--experiment', 'ml', '--epochs', '3', '--batch-size', '32',
                                        '--warmup-epochs', '0', '--lr', '5e-3', '--model-ema-decay', '0.9'])
    assert code == 0, log[-3000:]
    return out / 'ml', log, best


def test_multilabel_run_learns_well_above_the_label_frequency(multilabel_run):
    run_dir, log, best = multilabel_run
    assert 'built-in digit pairs' in log
    rows = summary_rows(run_dir)
    assert {'eval_map', 'eval_micro_f1', 'eval_macro_f1', 'eval_sample_f1', 'eval_ema_map'} <= set(rows[0])
    baseline, positive_rate = label_frequency_map(DigitPairsDataset('val'))
    assert baseline == pytest.approx(positive_rate, abs=1e-6) and 18 < baseline < 21
    final = float(rows[-1]['eval_map'])
    assert final > baseline + 25, (final, baseline)  # measured 53.98 against 19.16 (1 thread)
    assert re.search(r'Best map: [\d.]+ \(epoch \d, (model|EMA)\)', log)
    assert best[0] == max(max(float(r['eval_map']), float(r['eval_ema_map'])) for r in rows)
    assert ckpt_args(run_dir / 'last.pth.tar').task == 'multilabel'


def ckpt_args(path):
    return load_ckpt(path)['args']


def test_multilabel_eval_only_reproduces_the_logged_metrics(multilabel_run, tmp_path):
    run_dir, _, _ = multilabel_run
    code, log, results = run_trainer(ML + ['--eval-only', '--checkpoint', str(run_dir / 'last.pth.tar'),
                                           '--output', str(tmp_path)])
    assert code == 0, log[-3000:]
    last = summary_rows(run_dir)[-1]
    for name, prefix in (('model', 'eval_'), ('EMA', 'eval_ema_')):
        assert re.search(rf'{name}: mAP [\d.]+ micro-F1 [\d.]+ macro-F1 [\d.]+ sample-F1 [\d.]+ loss', log), log
        for key in ('map', 'micro_f1', 'macro_f1', 'sample_f1', 'loss'):
            assert results[name][key] == pytest.approx(float(last[prefix + key]), abs=1e-4), (name, key)
    code, log, fused = run_trainer(ML + ['--eval-only', '--checkpoint', str(run_dir / 'last.pth.tar'), '--reparam',
                                         '--output', str(tmp_path)])
    assert code == 0 and 'model (reparameterized): mAP' in log
    assert fused['EMA']['map'] == pytest.approx(results['EMA']['map'], abs=0.05)


def test_multilabel_export_command_deploys_the_best_checkpoint(multilabel_run, tmp_path):
    from timm_smpconv.export import main as export_main
    run_dir, log, _ = multilabel_run
    command = re.search(r'python -m timm_smpconv\.export (.*)', log).group(1)
    argv = shlex.split(command)
    argv[argv.index('--out') + 1] = str(tmp_path / 'deployed')
    report = export_main(argv)
    assert all(row['rel'] <= row['tol'] for row in report['checks'])
    cfg = json.loads((tmp_path / 'deployed' / 'config.json').read_text())
    assert cfg['num_classes'] == 10 and cfg['pretrained_cfg']['mean'] == list(DIGIT_PAIRS_MEAN)


# ---- --stop-epoch, --resume auto (and --auto-resume without --experiment), --save-epochs ------------------------

def test_stop_epoch_then_resume_auto_ends_with_the_uninterrupted_weights(tmp_path):
    """A multi-label run with Mixup/CutMix, EMA and BatchNorm re-estimation stopped by --stop-epoch 1 and continued by
    the same command with --resume auto (no --experiment: the run folder is found in --output) ends with the weights of
    the uninterrupted run; --save-epochs keeps milestone-1; the summary has each epoch once."""
    common = ML + ['--output', str(tmp_path), '--epochs', '2', '--batch-size', '16', '--max-train-batches', '6',
                   '--mixup', '0.2', '--cutmix', '1.0', '--warmup-epochs', '1', '--save-epochs', '1', '2']
    code, log, _ = run_trainer(common + ['--experiment', 'full'])
    assert code == 0, log[-3000:]
    code, log, _ = run_trainer(common + ['--stop-epoch', '1'])
    assert code == 0, log[-3000:]
    runs = [p for p in tmp_path.iterdir() if p.name != 'full']
    assert len(runs) == 1 and load_ckpt(runs[0] / 'last.pth.tar')['epoch'] == 0
    assert f'Stopped before epoch 1 of 2 (--stop-epoch); the same command with --resume auto --experiment {runs[0].name}' \
           in log
    code, log, _ = run_trainer(common + ['--resume', 'auto'])
    assert code == 0, log[-3000:]
    assert f'--resume auto: continuing {runs[0]}, the latest run of smpconv_mobile31 at 32 px' in log
    assert [p for p in tmp_path.iterdir() if p.name != 'full'] == runs  # no new run folder
    full, parts = load_ckpt(tmp_path / 'full' / 'last.pth.tar'), load_ckpt(runs[0] / 'last.pth.tar')
    assert full['epoch'] == parts['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        assert max_weight_diff(full[key], parts[key]) <= 1e-6, key
    assert [r['epoch'] for r in summary_rows(runs[0])] == ['0', '1']
    for n, epoch in ((1, 0), (2, 1)):
        milestone = load_ckpt(runs[0] / f'milestone-{n}.pth.tar')
        assert milestone['epoch'] == epoch
    assert max_weight_diff(load_ckpt(runs[0] / 'milestone-2.pth.tar')['state_dict'], parts['state_dict']) == 0
    # a finished run relaunched: nothing to train, said so
    code, log, _ = run_trainer(common + ['--auto-resume'])
    assert code == 0 and f'--resume auto: continuing {runs[0]}' in log
    assert 'Nothing to train: the run starts at epoch 2' in log


@pytest.mark.slow
def test_torchrun_auto_resume_without_experiment_continues_the_killed_run(tmp_path):
    """Issue 29.8: `torchrun ... --auto-resume` after a stopped run started again at epoch 0 (with a warning) unless
    --experiment named the earlier run's folder; now every rank continues the latest run folder in --output."""
    import os
    import subprocess
    args = TINY + ['--output', str(tmp_path), '--epochs', '2', '--batch-size', '8', '--max-train-batches', '3']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'train_imagenet.py')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    first = subprocess.run(cmd + args + ['--stop-epoch', '1'], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = list(tmp_path.iterdir())
    again = subprocess.run(cmd + args + ['--auto-resume'], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f'--resume auto: continuing {runs[0]}' in again.stdout and 'Resumed from' in again.stdout
    assert list(tmp_path.iterdir()) == runs and load_ckpt(runs[0] / 'last.pth.tar')['epoch'] == 1
    assert [r['epoch'] for r in summary_rows(runs[0])] == ['0', '1']


def test_auto_resume_is_resume_auto_and_starts_fresh_where_nothing_was_run(monkeypatch, tmp_path, capsys):
    args = train_imagenet.parse_args(['--auto-resume'])
    assert args.resume == 'auto'
    state = built_state(monkeypatch, TINY + ['--output', str(tmp_path), '--auto-resume', '--experiment', 'named'])
    assert state.output_dir == str(tmp_path / 'named') and state.resume_path == '' and state.start_epoch == 0
    assert f'--resume auto: no last.pth.tar in {tmp_path / "named"}; starting a new run in {tmp_path / "named"}' \
           in capsys.readouterr().out
    code, log, _ = run_trainer(TINY + ['--output', str(tmp_path), '--auto-resume', '--resume', 'x.pth'])
    assert code == 2 and 'error: --auto-resume is --resume auto; it does not combine with --resume x.pth' in log


# ---- --loss and class weighting ---------------------------------------------------------------------------------

@pytest.mark.parametrize('argv,loss_class,check', [
    (['--loss', 'poly', '--poly-epsilon', '1.5'], PolyCrossEntropy, lambda loss: loss.epsilon == 1.5),
    (['--task', 'multilabel', '--loss', 'poly', '--poly-gamma', '2'], PolyBinaryCrossEntropy,
     lambda loss: loss.gamma == 2.),
    (['--task', 'multilabel', '--loss', 'asl', '--asl-gamma-neg', '2', '--asl-clip', '0'], AsymmetricLossMultiLabel,
     lambda loss: loss.gamma_neg == 2 and not loss.clip),
    (['--task', 'multilabel', '--loss', 'zlpr'], ZlprLoss, lambda loss: True),
])
def test_loss_flags_reach_timms_loss_factory(argv, loss_class, check):
    loss = train_imagenet.create_train_loss(train_imagenet.parse_args(argv))
    assert type(loss) is loss_class and check(loss)


def test_class_frequency_weights_from_the_training_labels(monkeypatch, tmp_path):
    """--loss-pos-weight neg_pos: timm's weights from the positive counts of the training split (counted from the
    built-in digit pairs' label lists, or read from --class-stats as timm's class_weights.py writes it)."""
    train = DigitPairsDataset('train')
    counts = torch.stack([MultiLabelTarget(10)(t) for t in train.targets]).sum(0)
    state = built_state(monkeypatch, ML + ['--output', str(tmp_path), '--loss-pos-weight', 'neg_pos',
                                           '--loss-weight-power', '0.5'])
    assert isinstance(state.task, MultiLabelClassificationTask)
    _, expected = compute_class_weights(counts, len(train), method='neg_pos', power=0.5)
    assert torch.allclose(state.task.criterion.pos_weight, expected)
    stats = tmp_path / 'stats.json'
    stats.write_text(json.dumps(dict(pos_counts=[100] * 5 + [300] * 5, num_samples=1000)))
    args = train_imagenet.parse_args(ML + ['--loss-class-weight', 'inv_freq', '--class-stats', str(stats)])
    args.num_classes = 10
    loss = train_imagenet.create_train_loss(args, train_imagenet.class_stats_for(args, train))
    assert torch.allclose(loss.weight, torch.tensor([1.5] * 5 + [0.5] * 5))  # (1000 / n), mean 1
    args = train_imagenet.parse_args(ML + ['--loss', 'db'])
    args.num_classes = 10
    loss = train_imagenet.create_train_loss(args, train_imagenet.class_stats_for(args, train))
    assert isinstance(loss, DistributionBalancedLoss)


@pytest.mark.parametrize('argv,message', [
    (['--loss', 'zlpr'], '--loss zlpr is a multi-label loss: it needs --task multilabel'),
    (['--task', 'multilabel', '--loss', 'ce'], '--loss ce is single-label; --task multilabel takes bce, asl, poly'),
    (['--loss', 'poly', '--asl-gamma-neg', '2'], '--asl-gamma-neg is an argument of --loss asl; this run uses --loss poly'),
    (['--loss', 'poly', '--bce-loss'], '--bce-loss is --loss bce; it does not combine with --loss poly'),
    (['--loss-pos-weight', '2'], '--loss-pos-weight: class weights apply to --loss bce and multilabel asl'),
    (['--task', 'multilabel', '--loss-pos-weight', 'inv_freq'], 'that method computes class_weight values'),
    (['--task', 'multilabel', '--loss', 'twoway', '--smoothing', '0.1'], 'could not create the --loss twoway training loss'),
    (['--task', 'multilabel', '--kd-model-name', 'resnet18'], "timm's distillation tasks train single-label"),
    (['--task', 'multilabel', '--data-dir', str(ROOT / 'tests')], 'gives one class per image; multi-label targets come'),
    (['--target-format', 'multihot'], '--target-format needs --task multilabel'),
    (['--task', 'multilabel', '--multilabel-threshold', '1.5'], '--multilabel-threshold is a sigmoid probability'),
    (['--task', 'multilabel', '--eval-metric', 'top1'], '--eval-metric must be one of loss, map, micro_f1'),
    (['--epochs', '0'], '--epochs must be >= 1, got 0'),
    (['--epochs', '2', '--sched', 'wsd', '--warmup-epochs', '10'],
     '--sched wsd: --warmup-epochs 10 leaves none of --epochs 2 for the stable and decay phases'),
    (['--sched', 'wsd', '--epochs', '5', '--warmup-epochs', '1', '--decay-epochs', '6'], '--decay-epochs 6 must be'),
    (['--lr-decay-fn', 'linear'], '--lr-decay-fn shapes the final decay of --sched wsd / rsqrt, not of --sched cosine'),
    (['--sched', 'rsqrt', '--warmup-epochs', '0'], '--sched rsqrt without warm-up needs --lr-stable-timescale'),
    (['--sched', 'cosinus'], "unknown --sched 'cosinus'"),
    (['--save-epochs', '40'], '--save-epochs 40: the schedule has 12 epochs'),
])
def test_bad_task_loss_and_schedule_flags_exit_2_with_one_line(argv, message, tmp_path):
    code, out, _ = run_trainer(TINY + ['--output', str(tmp_path), '--max-train-batches', '1'] + argv)
    assert code == 2 and message in out, out[-2000:]
    assert out.count('error:') == 1 and 'Traceback' not in out  # printed once (issue 29.3)
    assert not list(tmp_path.glob('**/last.pth.tar'))


# ---- schedules ----------------------------------------------------------------------------------------------------

def test_wsd_schedule_with_timms_defaults_fits_a_short_run(monkeypatch, tmp_path):
    state = built_state(monkeypatch, TINY + ['--output', str(tmp_path), '--epochs', '2', '--sched', 'wsd',
                                             '--lr-decay-fn', 'cosine', '--batch-size', '32'])
    sched = state.lr_scheduler
    assert isinstance(sched, WSDLRScheduler) and sched.decay_fn == 'cosine'
    updates = state.updates_per_epoch
    assert sched.warmup_t == updates and sched.t_initial == updates  # 1 warm-up epoch (digits preset), 1 after it
    assert sched.decay_t == round(0.2 * updates)  # timm's default decay: the last 20% of the stable + decay length
    assert sched._get_lr(2 * updates)[0] == pytest.approx(state.args.min_lr)
    rsqrt = built_state(monkeypatch, TINY + ['--output', str(tmp_path), '--epochs', '4', '--sched', 'rsqrt',
                                             '--lr-stable-timescale', '2', '--no-sched-on-updates'])
    assert rsqrt.lr_scheduler.stable_fn == 'rsqrt' and rsqrt.lr_scheduler.stable_timescale == 2


def test_plateau_is_deprecated_as_timm_says_and_steps_per_epoch(monkeypatch, tmp_path, capsys, recwarn):
    state = built_state(monkeypatch, TINY + ['--output', str(tmp_path), '--sched', 'plateau'])
    out = capsys.readouterr()
    assert out.out.count('--sched plateau is deprecated by timm (1.0.31)') == 1
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]  # said once, as a log line
    assert state.args.sched_on_updates is False and type(state.lr_scheduler).__name__ == 'PlateauLRScheduler'


def test_warmup_longer_than_the_run_is_said(monkeypatch, tmp_path, capsys):
    """Issue 29.2: `--warmup-epochs 10 --epochs 4` ran without a word while the lr never reached its peak."""
    built_state(monkeypatch, TINY + ['--output', str(tmp_path), '--epochs', '4', '--warmup-epochs', '10',
                                     '--no-sched-on-updates', '--lr', '0.01', '--warmup-lr', '0'])
    out = capsys.readouterr().out
    assert ('--warmup-epochs 10 >= --epochs 4: the warm-up is still rising when the run ends, so the lr never reaches '
            '--lr 0.01 (it ends at 0.003); lower --warmup-epochs or add --warmup-prefix') in out
    built_state(monkeypatch, TINY + ['--output', str(tmp_path), '--epochs', '4', '--warmup-epochs', '2'])
    assert 'warm-up is still rising' not in capsys.readouterr().out


def test_acceptance_command_wsd_poly_milestone(tmp_path):
    """`python train_imagenet.py --epochs 2 --sched wsd --loss poly --save-epochs 1`, with the tiny model and few
    batches."""
    code, log, _ = run_trainer(TINY + ['--epochs', '2', '--sched', 'wsd', '--loss', 'poly', '--save-epochs', '1',
                                       '--max-train-batches', '4', '--batch-size', '16', '--output', str(tmp_path),
                                       '--experiment', 'acc'])
    assert code == 0, log[-3000:]
    milestone = load_ckpt(tmp_path / 'acc' / 'milestone-1.pth.tar')
    assert milestone['epoch'] == 0 and milestone['args'].sched == 'wsd'
    assert not (tmp_path / 'acc' / 'milestone-2.pth.tar').exists()


# ---- parsing: -c validated, one-line errors, no abbreviations ----------------------------------------------------

@pytest.mark.parametrize('text,message', [
    ('batch_sise: 3\n', "unknown key batch_sise (keys are the flag names with underscores"),
    ('epochs: abc\n', "epochs: 'abc' is not an int"),
    ('scale: 0.5\n', 'scale: 0.5 is not a list'),
    ('input_size: [3, 32]\n', 'input_size: [3, 32] has 2 values, the flag takes 3'),
    ('model_ema: 1\n', 'model_ema: 1 is not true or false'),
    ('task: multi\n', "task: 'multi' is not one of 'classification', 'multilabel'"),
])
def test_config_file_is_validated_against_the_flags_in_one_line(tmp_path, text, message):
    """Issue 28: -c values validated against the parser; issue 29.3: a bad -c file printed the ~130-line usage."""
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    code, out, _ = run_trainer(['-c', str(cfg)])
    assert code == 2 and message in out, out
    assert out.strip().count('\n') == 0 and out.startswith('train_imagenet.py: error: config file')
    assert 'usage:' not in out


def test_config_values_become_the_flags_types(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(yaml.safe_dump(dict(lr='1e-2', scale=['0.5', 1], save_epochs=[2], task='multilabel')))
    args = train_imagenet.parse_args(['-c', str(cfg)])
    assert args.lr == 0.01 and args.scale == [0.5, 1.0] and args.save_epochs == [2] and args.task == 'multilabel'
    assert args.smoothing == 0 and args.eval_metric == 'map'  # timm's multi-label defaults


def test_errors_are_one_line_once_without_traceback(tmp_path):
    """Issue 29.2 / 29.3: `--epochs 0` ended in a bare AssertionError traceback; every trainer error was printed twice
    (a log line and the error line); argparse's own errors printed the whole usage."""
    code, out, _ = run_trainer(['--epochs', '0', '--output', str(tmp_path)])
    assert code == 2 and out.count('--epochs must be >= 1, got 0') == 1 and 'Traceback' not in out
    assert 'train_imagenet.py: error: --epochs must be >= 1, got 0' in out
    code, out, _ = run_trainer(['--epochs', 'x'])
    assert code == 2 and out == "train_imagenet.py: error: argument --epochs: invalid int value: 'x'\n"


def test_abbreviations_are_off_so_task_is_its_own_flag():
    """`--task multilabel` failed with `argument --task-loss-weight: invalid float value` (an abbreviation)."""
    assert train_imagenet.parse_args(['--task', 'multilabel']).task == 'multilabel'
    code, out, _ = run_trainer(['--task-loss', '0.5'])
    assert code == 2 and out == 'train_imagenet.py: error: unrecognized arguments: --task-loss\n'
    code, out, _ = run_trainer(['--epoch', '3'])
    assert code == 2 and out == 'train_imagenet.py: error: unrecognized arguments: --epoch\n'


def test_multilabel_run_lists_timms_multilabel_defaults():
    diffs = {flag for flag, _, _ in train_imagenet.timm_differences(train_imagenet.parse_args(
        ['--data-dir', '/d', '--dataset', 'hfds/x', '--task', 'multilabel', '--device', 'cuda']))}
    assert '--eval-metric' not in diffs and '--smoothing' not in diffs  # map and 0 are timm's multi-label defaults
    assert '--task' in diffs
