""" train_imagenet.py speaks timm's train.py: -c config files, the lr-base rule, the loss / data / model flags.

Most tests call the set-up steps in-process (run() with the epoch loop swapped for a function that returns the built
state); one tiny in-process run on the built-in digits puts several flags through real training epochs. """
import contextlib
import io
import logging
import sys
import types
from pathlib import Path

import pytest
import timm.utils.summary
import torch
import yaml
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_imagenet  # noqa: E402

# the built-in digits with a small SMP model at 32 px (the mobile31 layout, kernels fitting the feature maps)
MODEL = ['--model', 'smpconv_mobile31', '--model-kwargs', 'kernel_sizes=[9,7,5,5]', 'n_points=[8,6,3,3]',
         'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]', '--workers', '0', '--device', 'cpu',
         '--seed', '3', '--log-interval', '1', '--validation-batch-size', '128']
SMALL = MODEL + ['--batch-size', '8']


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """In-process runs share the test process: one intra-op thread, as the subprocess runs get (OMP_NUM_THREADS=1);
    more threads than free cores slow these tiny models several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built_state(monkeypatch, argv):
    """run()'s set-up steps for argv, without the epoch loop: the TrainState the loop would get."""
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    return train_imagenet.run(train_imagenet.parse_args(SMALL + argv))


def train_transform_interpolations(loader):
    tf = loader.dataset.transform
    return [getattr(t, 'interpolation', None) for t in getattr(tf, 'transforms', [tf])][0]


def param_group_lrs(args, world_size=1):
    args.world_size, args.rank = world_size, 0
    train_imagenet.resolve_lr(args)
    return args.lr


class FakeWandb(types.SimpleNamespace):
    """Stands in for the wandb package: records init() and log() calls."""

    def __init__(self):
        super().__init__(inits=[], logs=[])

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, row):
        self.logs.append(dict(row))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """One tiny run, in-process, through -c, --input-size, --grad-checkpointing, --lr-base*, --opt-kwargs,
    --start-epoch, --mixup-off-epoch, --bce-loss*, --val-interval and --log-wandb (a stand-in wandb module)."""
    out = tmp_path_factory.mktemp('timm_flags')
    config = out / 'config.yaml'
    config.write_text(yaml.safe_dump(dict(epochs=4, batch_size=16, mixup=0.8, cutmix=1.0, warmup_epochs=1)))
    argv = MODEL + ['-c', str(config), '--output', str(out), '--experiment', 'x', '--max-train-batches', '2',
                    '--input-size', '3', '32', '32', '--grad-checkpointing', '--lr-base', '1e-3',
                    '--lr-base-size', '64', '--lr-base-scale', 'linear', '--opt-kwargs', 'amsgrad=True',
                    '--start-epoch', '1', '--mixup-off-epoch', '2', '--bce-loss', '--bce-target-thresh', '0.2',
                    '--val-interval', '3', '--log-wandb', '--wandb-project', 'smp-tests']
    wandb = FakeWandb()
    seen = {}
    real_train_one_epoch = train_imagenet.train_one_epoch

    def recording_train_one_epoch(state, epoch):
        seen[epoch] = dict(mixup=state.collate_fn.mixup_enabled, loss_fn=state.train_loss_fn,
                      input_size=state.data_config['input_size'],
                      checkpointing=[s.grad_checkpointing for s in train_imagenet.unwrap(state.model).stages])
        return real_train_one_epoch(state, epoch)

    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setitem(sys.modules, 'wandb', wandb)
        mp.setattr(timm.utils.summary, 'wandb', wandb, raising=False)
        mp.setattr(train_imagenet, 'train_one_epoch', recording_train_one_epoch)
        best = train_imagenet.main(argv)
    return types.SimpleNamespace(out=out / 'x', best=best, wandb=wandb, seen=seen, log=log.getvalue())


def test_tiny_run_with_timm_flags(tiny_run):
    out = tiny_run.out
    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=False)
    args = ckpt['args']
    # -c: the config's values are the defaults (batch size 16, 4 epochs); --start-epoch 1: epochs 1..3 trained
    assert (args.batch_size, args.epochs, ckpt['epoch']) == (16, 4, 3)
    assert sorted(tiny_run.seen) == [1, 2, 3]
    # --lr-base: lr = 1e-3 * (16 images per step / 64), linear; the schedule's base lr of every group
    assert args.lr == pytest.approx(1e-3 * 16 / 64)
    assert 'Learning rate 0.00025 from --lr-base' in tiny_run.log
    groups = ckpt['optimizer']['param_groups']
    assert all(g['initial_lr'] == pytest.approx(args.lr) for g in groups)  # lr_scale applies on top
    assert all(g['amsgrad'] is True for g in groups)  # --opt-kwargs reached the optimizer
    # --mixup-off-epoch 2: the loader's Mixup/CutMix is on in epoch 1 only
    assert {e: s['mixup'] for e, s in tiny_run.seen.items()} == {1: True, 2: False, 3: False}
    loss_fn = tiny_run.seen[1]['loss_fn']
    assert isinstance(loss_fn, BinaryCrossEntropy) and loss_fn.target_threshold == 0.2
    assert tiny_run.seen[1]['input_size'] == (3, 32, 32) and all(tiny_run.seen[1]['checkpointing'])
    # --val-interval 3: epoch 2 ((2 + 1) % 3 == 0) and the last epoch validated, epoch 1 not; only they rank
    rows = (out / 'summary.csv').read_text().splitlines()
    header, rows = rows[0].split(','), [dict(zip(rows[0].split(','), r.split(','))) for r in rows[1:]]
    assert [r['epoch'] for r in rows] == ['1', '2', '3'] and 'eval_ema_top1' in header
    assert [bool(r['eval_top1']) for r in rows] == [False, True, True]
    assert 'not validated (--val-interval 3)' in tiny_run.log
    best_metric, best_epoch = tiny_run.best
    assert best_epoch in (2, 3) and torch.load(out / 'model_best.pth.tar', map_location='cpu',
                                           weights_only=False)['epoch'] == best_epoch
    assert best_metric == max(float(rows[best_epoch - 1][k]) for k in ('eval_top1', 'eval_ema_top1'))
    # --log-wandb: init with the project, the run name and the args; one row per epoch through update_summary
    assert tiny_run.wandb.inits == [dict(project='smp-tests', name='x', config=tiny_run.wandb.inits[0]['config'],
                                         tags=[], resume=None, id=None)]
    assert tiny_run.wandb.inits[0]['config'].lr == args.lr
    assert [r['epoch'] for r in tiny_run.wandb.logs] == [1, 2, 3]
    assert tiny_run.wandb.logs[0]['eval_top1'] is None and tiny_run.wandb.logs[1]['eval_top1'] == float(
        rows[1]['eval_top1'])
    assert (out / 'curves.png').is_file()


def test_run_args_yaml_works_as_a_config(tiny_run):
    """-c with a run's args.yaml: its run-state keys (rank, world size) are skipped, the values come back."""
    again = train_imagenet.parse_args(['-c', str(tiny_run.out / 'args.yaml')])
    saved = yaml.safe_load((tiny_run.out / 'args.yaml').read_text())
    for key in ('lr', 'epochs', 'batch_size', 'opt_kwargs', 'input_size', 'start_epoch', 'bce_loss', 'val_interval',
                'model_kwargs', 'preset'):
        assert getattr(again, key) == saved[key], key


def test_config_file_defaults_under_command_line_flags(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('preset: smp-cifar\nbatch_size: 24\nopt: sgd\nmodel_kwargs: {kernel_sizes: [5, 5]}\n'
                   'lr: 1e-2\nlr_base: 0.5\n')
    a = train_imagenet.parse_args(['-c', str(cfg), '--opt', 'lamb'])
    smp_cifar = train_imagenet.PRESETS['smp-cifar']
    assert a.preset == 'smp-cifar' and a.weight_decay == smp_cifar['weight_decay']  # the config's preset applies
    assert (a.batch_size, a.model_kwargs) == (24, {'kernel_sizes': [5, 5]})
    assert a.opt == 'lamb'  # the command line wins
    assert a.lr == 1e-2  # an lr in the config is explicit: it wins over lr_base (a YAML '1e-2' string is converted)
    b = train_imagenet.parse_args(['-c', str(cfg), '--batch-size', '4', '--lr', '3e-3'])
    assert (b.batch_size, b.lr) == (4, 3e-3)


@pytest.mark.parametrize('text,message', [
    ('batch_sise: 3\nfoo: 1\n', 'unknown keys batch_sise, foo'),
    ('kernel_resize: squash\n', "kernel_resize: 'squash' is not one of"),
    ('- 1\n- 2\n', 'must map flag names to values'),
    ('epochs: [1\n', 'is not valid YAML'),
])
def test_bad_config_file_is_a_clear_error(tmp_path, capsys, text, message):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exc:
        train_imagenet.parse_args(['-c', str(cfg)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_lr_from_base_is_timms_rule():
    lr, scale = train_imagenet.lr_from_base(0.1, 1024, 256, 'linear')
    assert (lr, scale) == (pytest.approx(0.1 * 1024 / 256), 'linear')
    lr, scale = train_imagenet.lr_from_base(0.1, 1024, 256, 'sqrt')
    assert (lr, scale) == (pytest.approx(0.1 * (1024 / 256) ** 0.5), 'sqrt')
    # empty scale: sqrt for optimizers named *ada* or *lamb*, linear for the rest
    for opt, expected in (('adamw', 'sqrt'), ('nadam', 'sqrt'), ('lamb', 'sqrt'), ('sgd', 'linear'), ('lion', 'linear')):
        assert train_imagenet.lr_from_base(0.1, 512, 256, '', opt)[1] == expected, opt


def test_lr_is_the_recipes_unless_given_or_from_lr_base():
    for name, preset in train_imagenet.PRESETS.items():  # no new flags: each recipe's lr, as before
        assert train_imagenet.parse_args(['--preset', name]).lr == preset.get('lr', 4e-3), name
    assert train_imagenet.parse_args(['--data-dir', '/d']).lr == 4e-3
    assert train_imagenet.parse_args(['--lr', '1e-3', '--lr-base', '0.5']).lr == 1e-3  # an explicit --lr wins
    args = train_imagenet.parse_args(['--lr-base', '0.1', '--batch-size', '32', '--grad-accum-steps', '2', '--opt', 'sgd'])
    assert args.lr is None  # resolved once the world size is known
    expected = train_imagenet.lr_from_base(0.1, 32 * 4 * 2, 256, '', 'sgd')[0]
    assert param_group_lrs(args, world_size=4) == pytest.approx(expected) and args.lr_base_scale == 'linear'
    recipe = train_imagenet.parse_args(['--lr-base-size', '512'])  # without --lr-base the base size changes nothing
    assert param_group_lrs(recipe, world_size=8) == train_imagenet.PRESETS['digits']['lr']


@pytest.mark.parametrize('argv,message', [
    (['--amp', '--model-dtype', 'bfloat16'], '--amp keeps float32 weights'),
    (['--input-size', '1', '32', '32', '--in-chans', '3'], '--input-size has 1 channels but --in-chans is 3'),
    (['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode needs --torchcompile'),
    (['--bce-sum'], 'need --bce-loss'),
    (['--val-interval', '0'], '--val-interval must be >= 1'),
    (['--start-epoch', '-1'], '--start-epoch must be >= 0'),
    (['--eval-metric', 'top3'], '--eval-metric must be one of'),
    (['--opt-kwargs', 'lr=0.1'], '--opt-kwargs lr: set these with their own flags'),
])
def test_bad_flag_combinations_fail_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train_imagenet.main(SMALL + ['--output', str(tmp_path)] + argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob('**/last.pth.tar'))


@pytest.mark.parametrize('argv,loss_type,smoothing', [
    (['--mixup', '0.8', '--bce-loss'], BinaryCrossEntropy, None),
    (['--mixup', '0.8'], SoftTargetCrossEntropy, None),
    (['--smoothing', '0.2', '--bce-loss'], BinaryCrossEntropy, 0.2),
    (['--smoothing', '0.2'], LabelSmoothingCrossEntropy, 0.2),
    (['--smoothing', '0', '--bce-loss'], BinaryCrossEntropy, 0.),
    (['--smoothing', '0'], torch.nn.CrossEntropyLoss, None),
])
def test_training_loss_follows_timm(argv, loss_type, smoothing):
    args = train_imagenet.parse_args(['--mixup', '0', '--cutmix', '0'] + argv)
    loss = train_imagenet.create_train_loss(args)
    assert type(loss) is loss_type
    if smoothing is not None:
        assert loss.smoothing == smoothing


def test_bce_options_reach_the_loss():
    args = train_imagenet.parse_args(['--bce-loss', '--bce-sum', '--bce-target-thresh', '0.3', '--bce-pos-weight', '2'])
    loss = train_imagenet.create_train_loss(args)
    assert (loss.sum_classes, loss.target_threshold, float(loss.pos_weight)) == (True, 0.3, 2.0)
    x, target = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    binary = target.gt(0.3).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        x, binary, pos_weight=torch.tensor(2.), reduction='none').sum(-1).mean()
    assert torch.allclose(loss(x, target), expected)


def test_input_size_sets_data_config_and_model_channels():
    args = train_imagenet.parse_args(SMALL + ['--input-size', '1', '40', '36', '--img-size', '64', '--mean', '0.5',
                                         '--std', '0.25'])
    model = train_imagenet.create_training_model(args, 10)
    assert next(p for p in model.parameters() if p.dim() == 4).shape[1] == 1  # the stem reads one channel
    cfg = train_imagenet.build_data_config(args, model)
    assert cfg['input_size'] == (1, 40, 36) and cfg['mean'] == (0.5,) and cfg['std'] == (0.25,)


def test_model_dtype_grad_checkpointing_and_default_train_interpolation(monkeypatch, tmp_path):
    state = built_state(monkeypatch, ['--output', str(tmp_path), '--model-dtype', 'bfloat16', '--grad-checkpointing',
                                 '--max-train-batches', '1', '--mixup', '0', '--cutmix', '0'])
    assert state.model_dtype == torch.bfloat16 and not state.args.amp
    assert {p.dtype for p in state.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in state.model_ema.parameters()} == {torch.bfloat16}
    assert all(s.grad_checkpointing for s in state.model.stages)
    inputs, _ = next(iter(state.loader_train))
    assert inputs.dtype == torch.bfloat16  # the prefetcher normalises into the model's dtype
    before = [p.detach().clone() for p in state.model.parameters()]
    metrics = train_imagenet.train_one_epoch(state, 0)
    assert torch.isfinite(torch.tensor(metrics['loss'])) and state.num_updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    assert {p.dtype for p in state.model.parameters()} == {torch.bfloat16}
    # no --train-interpolation: training transforms use the validation interpolation (the digits preset's)
    interp = train_transform_interpolations(state.loader_train)
    assert str(interp).lower().endswith(state.data_config['interpolation'])


def test_train_interpolation_and_torchcompile_mode(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: calls.append(kw) or model)
    state = built_state(monkeypatch, ['--output', str(tmp_path), '--train-interpolation', 'bicubic',
                                 '--torchcompile', '--torchcompile-mode', 'max-autotune'])
    assert calls == [dict(backend='inductor', mode='max-autotune')] * 2  # the task's model and its EMA, as timm
    assert state.data_config['interpolation'] == 'bilinear'  # validation keeps the preset's
    assert 'bicubic' in str(train_transform_interpolations(state.loader_train)).lower()


def test_start_epoch_overrides_the_resumed_epoch(monkeypatch, tmp_path, tiny_run):
    ckpt = tiny_run.out / 'last.pth.tar'
    common = ['--output', str(tmp_path), '--input-size', '3', '32', '32', '--resume', str(ckpt)]
    resumed = built_state(monkeypatch, common)
    assert resumed.start_epoch == 4  # the checkpoint's next epoch
    state = built_state(monkeypatch, common + ['--start-epoch', '2', '--no-sched-on-updates'])
    assert state.start_epoch == 2 and state.num_updates == 2 * state.updates_per_epoch
    lr_at_2 = state.lr_scheduler._get_lr(2)[0]
    assert state.optimizer.param_groups[0]['lr'] == pytest.approx(lr_at_2 * state.optimizer.param_groups[0].get(
        'lr_scale', 1.0))


def _schedule_state(argv):
    args = train_imagenet.parse_args(argv)
    param = torch.nn.Parameter(torch.zeros(1))
    state = train_imagenet.TrainState(args=args, device=torch.device('cpu'), model=None,
                                 optimizer=torch.optim.SGD([param], lr=args.lr), loader_train=[None] * 3)
    train_imagenet.resume(state)
    train_imagenet.setup_schedule(state)
    return state


def test_warmup_prefix_puts_the_warmup_before_the_decay():
    base = ['--lr', '0.1', '--epochs', '4', '--warmup-epochs', '2', '--no-sched-on-updates', '--min-lr', '0',
            '--grad-accum-steps', '2']
    counted = _schedule_state(base)
    prefix = _schedule_state(base + ['--warmup-prefix'])
    assert counted.lr_scheduler.warmup_prefix is False and prefix.lr_scheduler.warmup_prefix is True
    # the cosine starts at the peak right after the warm-up only when the warm-up is a prefix
    assert prefix.lr_scheduler._get_lr(2)[0] == pytest.approx(0.1)
    assert counted.lr_scheduler._get_lr(2)[0] < 0.1
    assert prefix.num_epochs == counted.num_epochs + 2  # timm lengthens the schedule by the prefix
    assert (counted.num_batches, counted.updates_per_epoch) == (3, 2)  # counted once: 3 batches, 2 accumulated


def test_log_wandb_without_wandb_warns_and_continues(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb -> ImportError
    args = train_imagenet.parse_args(['--log-wandb'])
    args.rank = 0
    with caplog.at_level(logging.WARNING, logger='train'):
        assert train_imagenet.init_wandb(args, 'run') is False
    assert 'wandb package is not installed' in caplog.text
    args.log_wandb = False
    assert train_imagenet.init_wandb(args, 'run') is False


def test_help_lists_the_timm_flags():
    names = {s for a in train_imagenet.build_parser()._actions for s in a.option_strings}
    for flag in ('-c', '--config', '--input-size', '--grad-checkpointing', '--torchcompile-mode', '--lr-base',
                 '--lr-base-size', '--lr-base-scale', '--opt-kwargs', '--start-epoch', '--mixup-off-epoch',
                 '--bce-loss', '--bce-sum', '--bce-target-thresh', '--bce-pos-weight', '--model-dtype',
                 '--val-interval', '--warmup-prefix', '--train-interpolation', '--log-wandb', '--wandb-project'):
        assert flag in names, flag
