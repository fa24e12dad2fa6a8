""" train_imagenet.py is a drop-in for timm's train.py: every option of timm's train.py (the list in
timm_smpconv/timm_train_args.py) is accepted with timm's nargs and type, and either has timm's meaning or is refused
with its reason; timm's --model-kwargs parsing; the defaults that differ from timm's are said out loud. """
import io
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from timm_smpconv.timm_train_args import TIMM_TRAIN_OPTIONS, timm_defaults

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import run_trainer  # noqa: E402

import train_imagenet  # noqa: E402

MODEL = ['--model', 'smpconv_mobile31', '--model-kwargs', 'kernel_sizes=[9,7,5,5]', 'n_points=[8,6,3,3]',
         'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]', '--workers', '0', '--device', 'cpu',
         '--seed', '3', '--log-interval', '1', '--validation-batch-size', '128']
TINY_RUN = MODEL + ['--epochs', '1', '--max-train-batches', '2', '--batch-size', '8']


pytestmark = pytest.mark.usefixtures('one_thread')


def run_main(argv):
    """(exit code, stdout + stderr) of the trainer run in this process."""
    return run_trainer(argv)[:2]


def sample_argv(option, choices):
    """The option on a command line with a value of its type and arity (one of `choices` where ours limits them:
    timm reads those as free strings and fails later, or not at all, on a wrong one)."""
    if option.action == 'store_true':
        return [option.flags[-1]]
    if option.action == 'kwargs':
        return [option.flags[-1], 'a=1']
    value = {int: '2', float: '0.5'}.get(option.type, str(list(choices)[-1]) if choices else 'x')
    count = {None: 1, '?': 1, '+': 2, '*': 2}.get(option.nargs, option.nargs)
    values = [value] * count
    return values if option.positional else [option.flags[-1]] + values


def our_action(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings or (not a.option_strings and a.dest == flag))


@pytest.mark.parametrize('option', TIMM_TRAIN_OPTIONS, ids=lambda o: o.flags[-1])
def test_every_timm_option_is_accepted_or_refused_with_its_reason(option, tmp_path):
    parser = train_imagenet.build_parser()
    for flag in option.flags:  # every spelling, e.g. -b / --batch-size, --decay-rate / --dr
        action = our_action(parser, flag)
        if option.action == 'store_true':
            assert action.nargs == 0, flag
        elif option.action == 'kwargs':
            assert action.nargs == '*' and issubclass(type(action), train_imagenet.ParseKwargs), flag
        else:
            assert action.nargs == option.nargs, (flag, action.nargs, option.nargs)
            assert (action.type or str) is option.type, (flag, action.type, option.type)
            if option.choices:
                assert set(option.choices) <= set(action.choices), flag
    if option.dest == 'config':
        return  # -c reads a file (tests/test_train_timm_flags.py)
    argv = sample_argv(option, our_action(parser, option.flags[-1]).choices)
    args = train_imagenet.parse_args(argv)
    args.distributed, args.rank, args.world_size = False, 0, 1
    if option.dest in train_imagenet.REFUSED:
        with pytest.raises(train_imagenet.TrainingError, match='not supported: ' + train_imagenet.REFUSED[option.dest][:30]):
            train_imagenet.check_args(args)
        return
    try:
        train_imagenet.check_args(args)
    except train_imagenet.TrainingError as e:
        # accepted: only an error about the value in this context (a missing path, a flag it needs), never a refusal
        assert 'not supported' not in str(e), e


def test_timm_option_list_is_timms_train_py():
    flags = {f for o in TIMM_TRAIN_OPTIONS for f in o.flags}
    # 1.0.29.dev0's 173 options (5 with a second spelling) and the 26 timm's train.py gained up to 1.0.31
    assert len(TIMM_TRAIN_OPTIONS) == 199 and len(flags) == 204
    # the ones a user of timm's train.py found rejected before (issue 23), a sample of every group
    for flag in ('--bn-momentum', '--decay-milestones', '--lr-noise', '--patience-epochs', '--gp', '--fuser',
                 '--fast-norm', '--torchscript', '--drop-block', '--split-bn', '--aug-splits', '--jsd-loss',
                 '--train-crop-mode', '--input-key', '--epoch-repeats', '--model-ema-force-cpu', '--tta', '--no-ddp-bb',
                 '--local_rank', '--device-modules', '--wandb-tags', '-vb', '--dr', '--train-img-sizes',
                 '--variable-batch-loss-scale', '--naflex-loader', '--kd-model-name', '--kd-token-distill-type',
                 # new in 1.0.31 (issue 28)
                 '--task', '--target-format', '--multilabel-threshold', '--loss', '--class-stats', '--loss-pos-weight',
                 '--asl-gamma-neg', '--poly-epsilon', '--db-focal-gamma', '--lr-decay-fn', '--lr-stable-timescale',
                 '--stop-epoch', '--save-epochs'):
        assert flag in flags, flag
    assert timm_defaults()['decay_milestones'] == [90, 180, 270] and timm_defaults()['opt'] == 'sgd'
    assert timm_defaults()['decay_epochs'] is None and timm_defaults()['eval_metric'] is None  # moved in 1.0.31


@pytest.mark.parametrize('text,value', [('ls_init_value=1e-6', 1e-6), ('x=None', None), ('x=(3,3)', (3, 3)),
                                        ('x=[51,49,47,13]', [51, 49, 47, 13]), ('x=True', True),
                                        ('x=avg', 'avg'), ('x=1e-6', 1e-6)])
def test_model_kwargs_are_parsed_as_timms_python_literals(text, value):
    args = train_imagenet.parse_args(['--model-kwargs', text])
    key = text.split('=')[0]
    assert args.model_kwargs[key] == value and type(args.model_kwargs[key]) is type(value)


def test_model_kwargs_without_equals_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train_imagenet.parse_args(['--model-kwargs', 'kernel_sizes'])
    assert exc.value.code == 2 and "--model-kwargs takes KEY=VALUE items, got 'kernel_sizes'" in capsys.readouterr().err


def test_timm_spellings_and_arities():
    args = train_imagenet.parse_args(['--dr', '0.5', '--aug-repeats', '3.0', '--scale', '0.5', '1', '-vb', '7',
                                      '--local_rank', '1', '/some/data'])
    assert (args.decay_rate, args.aug_repeats, args.scale, args.validation_batch_size) == (0.5, 3.0, [0.5, 1.], 7)
    assert args.data_dir == '/some/data' and args.preset == 'imagenet'  # timm's positional data directory
    assert train_imagenet.parse_args(['--local-rank', '2']).local_rank == 2  # torch.distributed.launch's spelling
    assert train_imagenet.parse_args(['--drop-connect', '0.3']).drop_path == 0.3  # timm's old name of drop path


@pytest.mark.parametrize('argv,message', [
    (['--scale', '0.5'], '--scale takes two values (MIN MAX), got 1'),
    (['--cutmix-minmax', '0.2', '0.5', '0.9'], '--cutmix-minmax takes two values'),
    (['--aug-repeats', '3.0'], '--aug-repeats repeats augmented copies across ranks'),
    (['--decay-milestones', '5', '3'], '--decay-milestones must increase'),
    (['--epoch-repeats', '2'], '--epoch-repeats repeats an iterable dataset'),
    (['--naflex-loader'], '--naflex-loader: not supported: the NaFlex loader'),
    (['--naflex-max-seq-len', '128'], '--naflex-max-seq-len: not supported: the NaFlex loader'),
    (['--tta', '2'], '--tta: not supported'),
    (['--jsd-loss'], '--jsd-loss needs --aug-splits >= 2'),
    (['--aug-splits', '1'], '--aug-splits must be 0 or >= 2'),
    (['--torchscript', '--torchcompile'], 'exclude each other'),
    (['--wandb-resume-id', 'abc'], '--wandb-resume-id continues a wandb run and needs --resume'),
    (['--train-batch-sizes', '8'], '--train-batch-sizes needs --train-img-sizes'),
    (['--train-img-sizes', '24', '32', '--train-size-probs', '1'], 'one value per --train-img-sizes size (2), got 1'),
    (['--kd-temperature', '2'], '--kd-temperature needs --kd-model-name'),
    (['--kd-model-name', 'not_a_model'], "unknown model 'not_a_model'"),
    (['--device-modules', 'no_such_module_xyz'], "--device-modules: cannot import 'no_such_module_xyz'"),
])
def test_timm_flags_with_a_bad_value_exit_2_naming_it(argv, message, tmp_path):
    code, out = run_main(MODEL + ['--output', str(tmp_path)] + argv)
    assert code == 2 and message in out, out[-2000:]
    assert not list(tmp_path.iterdir())  # nothing written


def test_decay_milestones_reach_the_multistep_schedule(monkeypatch, tmp_path):
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    state = train_imagenet.run(train_imagenet.parse_args(
        TINY_RUN + ['--output', str(tmp_path), '--sched', 'multistep', '--decay-milestones', '2', '5', '--dr', '0.5',
                    '--no-sched-on-updates', '--epochs', '8', '--warmup-epochs', '0']))
    sched = state.lr_scheduler
    assert list(sched.decay_t) == [2, 5] and sched.decay_rate == 0.5
    assert sched._get_lr(4)[0] == pytest.approx(0.5 * sched._get_lr(1)[0])


def test_timm_model_and_loader_flags_reach_their_targets(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(train_imagenet, 'set_fast_norm', lambda: calls.setdefault('fast_norm', True))
    monkeypatch.setattr(train_imagenet, 'set_jit_fuser', lambda f: calls.setdefault('fuser', f))
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    state = train_imagenet.run(train_imagenet.parse_args(
        TINY_RUN + ['--output', str(tmp_path), '--gp', 'max', '--head-init-scale', '0', '--head-init-bias', '0.25',
                    '--fast-norm', '--fuser', 'te', '--device-modules', 'json', '--layer-decay', '0.5',
                    '--layer-decay-no-opt-scale', '0.2', '--grayscale-prob', '0.5', '--train-crop-mode', 'rrc',
                    '--model-ema-force-cpu', '--worker-seeding', 'part']))
    assert calls == dict(fast_norm=True, fuser='te')
    assert state.model.head.global_pool.pool_type == 'max'
    fc = state.model.get_classifier()
    assert torch.all(fc.weight == 0) and torch.all(fc.bias == 0.25)
    # --layer-decay-no-opt-scale: the first layers' scale 0.5 ** depth falls below 0.2 and they are not optimized
    optimized = {id(p) for g in state.optimizer.param_groups for p in g['params']}
    frozen = [n for n, p in state.model.named_parameters() if id(p) not in optimized]
    assert frozen and all(n.startswith(('stem', 'stages.')) for n in frozen), frozen
    assert not any(p.requires_grad for n, p in state.model.named_parameters() if n in frozen)
    assert all(id(p) in optimized for p in state.model.head.parameters())
    assert next(state.model_ema.parameters()).device.type == 'cpu'
    names = [type(t).__name__ for t in state.loader_train.dataset.transform.transforms]
    assert 'RandomGrayscale' in names, names
    assert state.loader_train.loader.worker_init_fn.keywords['worker_seeding'] == 'part'


def test_ddp_buffers_and_dataset_flags(monkeypatch, tmp_path):
    seen = {}
    real_create = train_imagenet.create_dataset

    def create_dataset(name, **kwargs):
        seen.setdefault('datasets', []).append(kwargs)
        return real_create(name, **kwargs)

    monkeypatch.setattr(train_imagenet, 'create_dataset', create_dataset)
    data = tmp_path / 'data'
    for split in ('train', 'validation'):
        for c in ('a', 'b'):
            (data / split / c).mkdir(parents=True)
            from PIL import Image
            for i in range(4):
                Image.new('RGB', (16, 16), (40 * i, 0, 0)).save(data / split / c / f'{i}.png')
    args = train_imagenet.parse_args(TINY_RUN + [str(data), '--output', str(tmp_path), '--train-num-samples', '8',
                                                 '--val-num-samples', '4', '--dataset-trust-remote-code'])
    train_datasets = train_imagenet.load_datasets(args)
    assert len(train_datasets[0]) == 8 and seen['datasets'][0]['num_samples'] == 8
    assert seen['datasets'][1]['num_samples'] == 4 and seen['datasets'][0]['trust_remote_code'] is True
    args.input_key = 'image'  # the field of an hfds/wds record: a folder dataset has none (timm would find 0 images)
    with pytest.raises(train_imagenet.TrainingError, match='--input-key / --target-key name the fields'):
        train_imagenet.load_datasets(args)
    # --no-ddp-bb: the task wraps its model in DDP without broadcasting buffers
    captured = {}
    monkeypatch.setattr(train_imagenet.ClassificationTask, 'prepare_distributed',
                        lambda self, **kw: captured.update(kw))
    state = types_state(args, tmp_path)
    args.distributed, args.no_ddp_bb = True, True
    train_imagenet.wrap_model(state)
    assert captured == dict(device_ids=None, broadcast_buffers=False)


def types_state(args, tmp_path):
    import timm
    model = timm.create_model('resnet10t', num_classes=2)
    args.rank, args.world_size, args.distributed, args.torchcompile = 0, 1, False, None
    state = train_imagenet.TrainState(args=args, device=torch.device('cpu'), model=model)
    state.task = train_imagenet.ClassificationTask(model, verbose=False)
    return state


def test_run_lists_the_values_that_differ_from_timms_defaults_and_the_table_in_the_docs(monkeypatch):
    # the docs' table is a GPU node's: at least 4 cores per rank, so --workers is timm's 4 (fewer cores: fewer)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    diffs = {flag: (ours, theirs) for flag, ours, theirs in train_imagenet.timm_differences(
        train_imagenet.parse_args(['--data-dir', '/d', '--device', 'cuda']))}
    assert diffs['--opt'] == ('adamw', 'sgd') and diffs['--drop-path'] == (0.1, None)
    assert diffs['--model'] == ('smpconv_t', 'resnet50') and '--device' not in diffs and '--dr' not in diffs
    docs = (ROOT / 'docs' / 'training.md').read_text()
    for flag, (ours, theirs) in diffs.items():
        if flag not in ('--data-dir',):
            assert f'| `{flag}` | `{ours!r}` | `{theirs!r}` |' in docs, flag


def test_other_model_on_the_builtin_data_trains_without_the_presets_kwargs(tmp_path):
    """The acceptance command `train_imagenet.py --model convnext_atto --model-kwargs ls_init_value=1e-6`, shortened."""
    code, out = run_main(['--model', 'convnext_atto', '--model-kwargs', 'ls_init_value=1e-6', '--epochs', '1',
                          '--max-train-batches', '2', '--device', 'cpu', '--output', str(tmp_path), '--experiment', 'c'])
    assert code == 0, out[-3000:]
    ckpt = torch.load(tmp_path / 'c' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert ckpt['args'].model_kwargs == {'ls_init_value': 1e-6}
    assert type(ckpt['args'].model_kwargs['ls_init_value']) is float  # YAML made it the string '1e-6' before
    # without --model-kwargs the preset's SMP kwargs are left out, and the run's first lines say so
    args = train_imagenet.parse_args(['--model', 'convnext_atto'])
    assert args.model_kwargs == {} and args.preset_kwargs_dropped == train_imagenet.PRESETS['digits']['model_kwargs']
    assert train_imagenet.parse_args(['--model', 'smpconv_mobile31.x']).model_kwargs == args.preset_kwargs_dropped
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    train_imagenet._logger.addHandler(handler)
    try:
        args.rank = 0
        train_imagenet.log_defaults(args)
    finally:
        train_imagenet._logger.removeHandler(handler)
    assert "Preset 'digits' model kwargs (kernel_sizes=[13, 7, 5, 5] n_points=[21, 6, 3, 3] small_kernel_size=3) are " \
           "for smpconv_mobile31; convnext_atto is built with its own defaults" in log.getvalue()
    # a model-creation problem exits 2 with the message, not a traceback
    code, out = run_main(['--model', 'convnext_atto', '--model-kwargs', 'n_points=3', '--epochs', '1', '--device', 'cpu',
                          '--output', str(tmp_path)])
    assert code == 2 and "could not create model convnext_atto: " in out and 'n_points' in out


def test_each_preset_banner_names_the_paper_of_its_recipe():
    assert set(train_imagenet.PRESET_SOURCES) == set(train_imagenet.PRESETS)
    for preset, source in (('flexnet-cifar', "the FlexConv paper's CIFAR-10 recipe for FlexNet-16"),
                           ('smp-cifar', "the SMPConv paper's CIFAR-10 recipe for SMP FlexNet-16"),
                           ('imagenet', "the SMPConv paper's ImageNet recipe for SMPConv-T")):
        args = train_imagenet.parse_args(['--preset', preset])
        args.rank = 0
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        train_imagenet._logger.addHandler(handler)
        try:
            train_imagenet.log_defaults(args)
        finally:
            train_imagenet._logger.removeHandler(handler)
        first = log.getvalue().splitlines()[0]
        assert first.startswith(f"Recipe: preset '{preset}' ({source}, not timm's defaults); "), first


def test_variable_resolution_augmix_split_bn_and_save_images(tmp_path):
    code, out = run_main(TINY_RUN + ['--output', str(tmp_path), '--experiment', 'vr', '--train-img-sizes', '24', '32',
                                     '--train-batch-sizes', '8', '4', '--variable-batch-loss-scale', 'linear',
                                     '--save-images', '--synchronize-step', '--log-interval', '1'])
    assert code == 0, out[-3000:]
    assert {p.name for p in (tmp_path / 'vr').glob('train-batch-*.jpg')} == {'train-batch-0.jpg', 'train-batch-1.jpg'}
    code, out = run_main(TINY_RUN + ['--output', str(tmp_path), '--experiment', 'augmix', '--aug-splits', '2',
                                     '--jsd-loss', '--split-bn', '--resplit', '--reprob', '0.5'])
    assert code == 0, out[-3000:]
    sd = torch.load(tmp_path / 'augmix' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert any('.aux_bn.0.' in k for k in sd)  # timm's SplitBatchNorm2d


def test_scheduled_sizes_reach_the_loader(monkeypatch, tmp_path):
    monkeypatch.setattr(train_imagenet, 'train', lambda state: state)
    state = train_imagenet.run(train_imagenet.parse_args(
        TINY_RUN + ['--output', str(tmp_path), '--train-img-sizes', '16', '32', '--train-batch-sizes', '12', '4',
                    '--train-size-schedule', 'progressive', '--train-steps-per-epoch', '3', '--grad-accum-steps', '2']))
    shapes = {tuple(x.shape) for x, _ in state.loader_train}
    assert shapes <= {(12, 3, 16, 16), (4, 3, 32, 32)} and len(shapes) >= 1
    assert len(state.loader_train) == 6  # 3 optimizer steps of 2 accumulated batches


def test_best_line_says_model_or_ema(tmp_path):
    code, out = run_main(TINY_RUN + ['--output', str(tmp_path), '--experiment', 'b', '--epochs', '2'])
    assert code == 0, out[-3000:]
    line = next(x for x in out.splitlines() if 'Best top1' in x)
    epoch, source = line.split('(epoch ')[1].split(')')[0].split(', ')
    assert source in ('model', 'EMA')
    rows = (tmp_path / 'b' / 'summary.csv').read_text().splitlines()
    header = rows[0].split(',')
    epoch = int(epoch)
    row = dict(zip(header, rows[1 + epoch].split(',')))
    expected = 'EMA' if float(row['eval_ema_top1']) > float(row['eval_top1']) else 'model'
    assert source == expected
