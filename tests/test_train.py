""" train_imagenet.py: torchrun on CPU, exact resume, SMP optimizer rules inside a run, faults, bad input. """
import argparse
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / 'train_imagenet.py')
sys.path.insert(0, str(ROOT))
import train_imagenet  # noqa: E402

# a small SMP model for 32 px inputs (the mobile31 layout, kernels fitting the feature maps)
TINY = ['--model', 'smpconv_mobile31', '--img-size', '32', '--model-kwargs', 'kernel_sizes=[9,7,5,5]',
        'n_points=[8,6,3,3]', 'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]',
        '--workers', '0', '--device', 'cpu', '--seed', '3', '--log-interval', '2']


def make_image_folder(root: Path, n_train=12, n_val=4, classes=('a', 'b')):
    rng = np.random.RandomState(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.randint(0, 80, (40, 40, 3)).astype(np.uint8)
                img[:, :, ci] += 150  # a learnable colour cue per class
                Image.fromarray(img).save(d / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


def run_torchrun(args, procs=2):
    """`torchrun --standalone --nproc_per_node=PROCS train_imagenet.py ARGS` in a subprocess, one thread per rank."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', SCRIPT] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def run_main(args):
    """train_imagenet.main(args) in this process, as `python train_imagenet.py ARGS` would run it: the exit code,
    stdout and stderr, on one intra-op thread (the subprocess runs get OMP_NUM_THREADS=1). No interpreter start
    and no torch / timm import per run: most of a tiny run's time otherwise."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train_imagenet.main(args)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()  # a --torchcompile run leaves compiled code behind
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def load_ckpt(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def test_torchrun_two_ranks_cpu_full_pipeline(data_dir, tmp_path):
    args = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--experiment', 'ddp', '--epochs', '2',
                   '--batch-size', '4', '--grad-accum-steps', '1', '--aa', 'rand-m9-mstd0.5-inc1', '--mixup', '0.8',
                   '--cutmix', '1.0', '--reprob', '0.25', '--model-ema', '--model-ema-decay', '0.9',
                   '--warmup-epochs', '1', '--lr', '1e-3', '--drop-path', '0.1']
    res = run_torchrun(args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / 'ddp'
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar', 'summary.csv', 'curves.png',
                 'args.yaml'):
        assert (out / name).is_file(), name
    assert 'Distributed: 2 processes, backend gloo' in res.stdout
    lines = (out / 'summary.csv').read_text().splitlines()
    assert lines[0].startswith('epoch,train_loss,eval_loss,eval_top1,eval_top5,eval_ema_loss') and len(lines) == 3
    ckpt = load_ckpt(out / 'last.pth.tar')
    assert ckpt['epoch'] == 1 and 'state_dict_ema' in ckpt and 'optimizer' in ckpt
    assert 'ETA' in res.stdout and 'img/s' in res.stdout and 'EMA top-1' in res.stdout


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    common = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--epochs', '2', '--batch-size', '4',
                     '--grad-accum-steps', '2', '--aa', 'rand-m9-mstd0.5-inc1', '--mixup', '0.8', '--cutmix', '1.0',
                     '--reprob', '0.25', '--model-ema', '--model-ema-decay', '0.9', '--warmup-epochs', '1',
                     '--drop-path', '0.1']
    assert run_main(common + ['--experiment', 'full']).returncode == 0
    first = run_main(common + ['--experiment', 'parts', '--stop-after-epochs', '1'])
    assert first.returncode == 0, first.stderr[-2000:]
    assert load_ckpt(tmp_path / 'parts' / 'last.pth.tar')['epoch'] == 0
    second = run_main(common + ['--experiment', 'parts', '--auto-resume'])
    assert second.returncode == 0, second.stderr[-2000:]
    assert 'Resumed from' in second.stdout
    a = load_ckpt(tmp_path / 'full' / 'last.pth.tar')
    b = load_ckpt(tmp_path / 'parts' / 'last.pth.tar')
    assert a['epoch'] == b['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        diffs = [(a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key]]
        assert max(diffs) <= 1e-6, (key, max(diffs))
    sa = a['optimizer']['state']
    sb = b['optimizer']['state']
    assert max((sa[i]['exp_avg'] - sb[i]['exp_avg']).abs().max().item() for i in sa) <= 1e-6
    rows_a = (tmp_path / 'full' / 'summary.csv').read_text().splitlines()
    rows_b = (tmp_path / 'parts' / 'summary.csv').read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 3


def test_run_ends_with_its_export_command(tmp_path):
    """The last log lines name the export of the best checkpoint, with the weights that gave its metric; the
    deployed folder carries the run's data config (the built-in digits' statistics, not the model's defaults)."""
    import json
    import shlex

    from timm_smpconv.export import main as export_main
    res = run_main(TINY + ['--output', str(tmp_path), '--experiment', 'run', '--epochs', '1', '--batch-size', '32',
                           '--warmup-epochs', '0', '--model-ema', '--num-classes', '10'])
    assert res.returncode == 0, res.stderr[-2000:]
    source = re.search(r'Best top1: [\d.]+ \(epoch 0, (model|EMA)\)', res.stdout).group(1)
    command = re.search(r'python -m timm_smpconv\.export (.*)', res.stdout).group(1)
    assert ('--no-ema' in command) == (source == 'model')
    export_main(shlex.split(command))
    cfg = json.loads((tmp_path / 'run' / 'deployed' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['mean'] == list(train_imagenet.DIGITS_MEAN) and cfg['std'] == list(train_imagenet.DIGITS_STD)
    assert cfg['input_size'] == [3, 32, 32]


def test_randaugment_at_full_magnitude_trains(data_dir, tmp_path):
    """timm's RandAugment at magnitude 10 posterizes to 0 bits, which Pillow 13 refuses; the run goes on."""
    res = run_main(TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--epochs', '1', '--batch-size', '4',
                           '--warmup-epochs', '0', '--aa', 'rand-m10-n12-inc1', '--bn-recalibrate', '0'])
    assert res.returncode == 0, res.stderr[-2000:]


def test_zero_bit_posterize_clears_the_image():
    from timm.data.auto_augment import AugmentOp

    from timm_smpconv.data import allow_zero_bit_posterize
    allow_zero_bit_posterize()
    img = Image.new('RGB', (4, 4), (200, 100, 50))
    for name, magnitude in (('PosterizeIncreasing', 10), ('Posterize', 0)):
        out = AugmentOp(name, prob=1.0, magnitude=magnitude)(img)
        assert np.asarray(out).max() == 0, name
    kept = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img)  # 2 bits kept: 200 -> 192, 100 -> 64, 50 -> 0
    assert tuple(np.asarray(kept)[0, 0]) == (192, 64, 0)


def test_channels_last_trains_the_same_model(data_dir, tmp_path):
    common = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--epochs', '1', '--batch-size', '4',
                     '--grad-accum-steps', '1', '--warmup-epochs', '0']
    plain = run_main(common + ['--experiment', 'nchw'])
    res = run_main(common + ['--experiment', 'cl', '--channels-last'])
    assert plain.returncode == 0 and res.returncode == 0, res.stderr[-2000:]
    b = load_ckpt(tmp_path / 'cl' / 'last.pth.tar')['state_dict']
    assert any(v.dim() == 4 and not v.is_contiguous() for v in b.values())  # it really ran channels_last

    # the memory format changes the conv kernels used, not the model: the first batch's loss (before any
    # update; later steps drift apart by float rounding amplified through Adam) is the same
    def first_loss(out):
        return next(line.split('loss ')[1].split()[0] for line in out.splitlines() if '[   1/6] loss' in line)
    assert first_loss(plain.stdout) == first_loss(res.stdout)


def test_radius_lr_ratio_and_clamp_in_a_real_run(data_dir, tmp_path):
    res = run_main(TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--experiment', 'r',
                             '--epochs', '1', '--batch-size', '4', '--grad-accum-steps', '1', '--lr', '0.05',
                             '--radius-clamp', '0.3', '0.35', '--mixup', '0', '--cutmix', '0', '--no-model-ema',
                             '--warmup-epochs', '0', '--sched', 'cosine'])
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = load_ckpt(tmp_path / 'r' / 'last.pth.tar')
    sd = ckpt['state_dict']
    radii = torch.cat([v.flatten() for k, v in sd.items() if k.endswith('.radius')])
    assert radii.min() >= 0.3 - 1e-7 and radii.max() <= 0.35 + 1e-7
    assert ((radii - 0.3).abs() < 1e-6).any() or ((radii - 0.35).abs() < 1e-6).any()  # the clamp was binding
    groups = ckpt['optimizer']['param_groups']
    scaled = [g for g in groups if g.get('lr_scale', 1.0) != 1.0]
    plain = [g for g in groups if g.get('lr_scale', 1.0) == 1.0]
    assert scaled and plain
    for g in scaled:
        assert g['lr'] == pytest.approx(0.1 * plain[0]['lr']) and g['weight_decay'] == 0
    n_radius = sum(1 for k in sd if k.endswith('.radius'))
    assert sum(len(g['params']) for g in scaled) == n_radius


def test_killed_rank_ends_torchrun_with_error(data_dir, tmp_path):
    # no --experiment: both ranks must agree on the generated run folder (and both create it, without racing)
    args = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--epochs', '200',
                   '--batch-size', '2', '--grad-accum-steps', '1', '--mixup', '0', '--cutmix', '0', '--no-model-ema']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', SCRIPT] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS='1'), start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if 'Train 0' in line:
                break
        children = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2, ''.join(lines)
        t0 = time.time()
        os.kill(int(children[-1]), signal.SIGKILL)
        rest, _ = proc.communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 120
    assert 'SIGKILL' in rest or 'failed' in rest.lower() or 'Signal 9' in rest
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize('case', ['missing_dir', 'empty_dir', 'unknown_model', 'corrupt_resume', 'corrupt_pretrained',
                                  'odd_batch_mixup', 'no_checkpoint_for_eval', 'unsafe_eval_checkpoint'])
def test_bad_input_fails_before_training(case, tmp_path, capsys, data_dir):
    base = ['--output', str(tmp_path), '--device', 'cpu', '--workers', '0']
    corrupt = tmp_path / 'bad.pth.tar'
    corrupt.write_bytes(b'this is not a checkpoint')
    argv, message = {
        'missing_dir': (['--data-dir', str(tmp_path / 'nope')], 'does not exist'),
        'empty_dir': (['--data-dir', str(tmp_path / 'empty')], 'is empty'),
        'unknown_model': (['--model', 'smpconv_q'], "unknown model 'smpconv_q'"),
        'corrupt_resume': (TINY + ['--resume', str(corrupt)], 'could not resume from'),
        'corrupt_pretrained': (TINY + ['--pretrained-path', str(corrupt)], 'could not create model smpconv_mobile31'),
        'odd_batch_mixup': (['--batch-size', '7', '--mixup', '0.8'], 'even --batch-size, got 7'),
        'no_checkpoint_for_eval': (['--eval-only'], '--eval-only needs --checkpoint'),
        'unsafe_eval_checkpoint': (TINY + ['--eval-only', '--checkpoint', str(tmp_path / 'unsafe.pth.tar')],
                                   'holds pickled Python objects (types.SimpleNamespace) that can execute code'),
    }[case]
    torch.save({'state_dict': {}, 'extra': types.SimpleNamespace(a=1)}, tmp_path / 'unsafe.pth.tar')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit) as exc:
        train_imagenet.main(base + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if case == 'unknown_model':  # every family we register is offered, the sequence models too
        assert all(name in err for name in ('smpconv_t', 'flexnet_16', 'smp_flexnet_16', 'ckcnn_16', 'smp_tcn',
                                            'flextcn_2', 'flextcn_6')), err
    assert not list(tmp_path.glob('**/last.pth.tar'))
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ['empty']  # no run folder left behind


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path):
    common = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--experiment', 'nan',
                     '--batch-size', '4', '--grad-accum-steps', '1', '--mixup', '0', '--cutmix', '0',
                     '--no-model-ema', '--warmup-epochs', '0', '--epochs', '3']
    assert run_main(common + ['--stop-after-epochs', '1']).returncode == 0
    good = load_ckpt(tmp_path / 'nan' / 'last.pth.tar')
    res = run_main(common + ['--auto-resume', '--no-resume-opt', '--lr', '1e20'])
    assert res.returncode == 2
    assert 'non-finite loss' in res.stderr
    after = load_ckpt(tmp_path / 'nan' / 'last.pth.tar')
    assert after['epoch'] == good['epoch'] == 0
    for k, v in good['state_dict'].items():
        assert torch.equal(v, after['state_dict'][k]), k


def test_eval_only_with_reparam_and_finetune_from_checkpoint(data_dir, tmp_path):
    common = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--batch-size', '4',
                     '--grad-accum-steps', '1', '--mixup', '0', '--cutmix', '0', '--warmup-epochs', '0']
    assert run_main(common + ['--experiment', 'base', '--epochs', '1']).returncode == 0
    ckpt = tmp_path / 'base' / 'last.pth.tar'
    plain = run_main(common + ['--eval-only', '--checkpoint', str(ckpt)])
    fused = run_main(common + ['--eval-only', '--checkpoint', str(ckpt), '--reparam'])
    assert plain.returncode == 0 and fused.returncode == 0, plain.stderr[-2000:] + fused.stderr[-2000:]
    for out, tag in ((plain.stdout, ''), (fused.stdout, ' (reparameterized)')):
        assert f'model{tag}: top-1' in out and f'EMA{tag}: top-1' in out and 'top-5' in out
    top1 = [line.split('top-1 ')[1].split()[0] for line in plain.stdout.splitlines() if 'top-1' in line]
    top1_f = [line.split('top-1 ')[1].split()[0] for line in fused.stdout.splitlines() if 'top-1' in line]
    assert top1 == top1_f
    # fine-tune: new head size and larger kernels, classifier re-initialised, the rest loaded
    ft = run_main(common + ['--experiment', 'ft', '--epochs', '1', '--pretrained-path', str(ckpt),
                              '--num-classes', '3', '--model-kwargs', 'kernel_sizes=[13,9,5,5]', 'n_points=[8,6,3,3]',
                              'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]',
                              '--kernel-resize', 'extend', '--layer-decay', '0.8'])
    assert ft.returncode == 0, ft.stderr[-3000:]
    new = load_ckpt(tmp_path / 'ft' / 'last.pth.tar')['state_dict']
    assert new['head.fc.weight'].shape[0] == 3
    assert int(new['stages.0.blocks.0.large_kernel.smp.kernel_size_record']) == 13


def test_help_documents_every_flag():
    parser = train_imagenet.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    text = ' '.join(parser.format_help().split())
    assert '(default: the dataset\'s)' in text and 'default: 256' in text
    assert not re.search(r'\(default: [^)]*\) \(default:', text)  # each default once
    names = {s for a in parser._actions for s in a.option_strings}
    for flag in ('--data-dir', '--model', '--num-classes', '--img-size', '--batch-size', '--epochs', '--output',
                 '--resume', '--lr', '--opt', '--weight-decay', '--warmup-epochs', '--sched', '--aa', '--mixup',
                 '--cutmix', '--smoothing', '--reprob', '--drop-path', '--model-ema', '--model-ema-decay', '--amp',
                 '--grad-accum-steps', '--workers', '--device'):
        assert flag in names, flag


@pytest.mark.parametrize('cores, local_ranks, workers', [(2, None, 2), (2, '2', 1), (1, None, 1), (16, None, 4),
                                                      (16, '8', 2)])
def test_workers_default_fits_the_cores_of_each_rank(monkeypatch, cores, local_ranks, workers):
    """timm's 4 loader processes per rank, fewer where the ranks share fewer cores: torch's own check of a loader
    (the warning every run on a 2-core machine gave with 4) has nothing to say; --workers still wins."""
    import warnings
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)), raising=False)
    if local_ranks:
        monkeypatch.setenv('LOCAL_WORLD_SIZE', local_ranks)
    else:
        monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    args = train_imagenet.parse_args(['--data-dir', '/some/imagenet'])
    assert args.workers == workers
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.utils.data.DataLoader(range(4), num_workers=args.workers).check_worker_number_rationality()
    assert train_imagenet.parse_args(['--data-dir', '/some/imagenet', '-j', '6']).workers == 6


def test_defaults_are_the_papers_imagenet_recipe_and_digits_without_data():
    a = train_imagenet.parse_args(['--data-dir', '/some/imagenet'])
    assert (a.model, a.epochs, a.opt, a.lr, a.weight_decay, a.warmup_epochs, a.min_lr) == \
        ('smpconv_t', 300, 'adamw', 4e-3, 0.05, 10, 1e-6)
    assert (a.aa, a.mixup, a.cutmix, a.smoothing, a.reprob, a.drop_path) == \
        ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25, 0.1)
    assert (a.model_ema, a.model_ema_decay, a.radius_lr_scale, a.radius_clamp) == (True, 0.9999, 0.1, [1e-3, 1.0])
    assert a.batch_size * a.grad_accum_steps * 4 == 2048 and a.color_jitter == 0.4
    assert (a.mixup_switch_prob, a.mixup_mode) == (0.5, 'batch')
    d = train_imagenet.parse_args([])
    assert d.preset == 'digits' and d.data_dir is None
    c = train_imagenet.parse_args(['--preset', 'smp-cifar', '--lr', '1e-3'])
    assert (c.model, c.opt, c.lr, c.weight_decay, c.radius_clamp) == ('smp_flexnet_16', 'adam', 1e-3, 1e-5, [1e-4, 1.0])


def test_flexnet_training_with_aliasing_regulariser(data_dir, tmp_path):
    res = run_main(['--model', 'flexnet_16', '--img-size', '16', '--data-dir', str(data_dir), '--output',
                      str(tmp_path), '--experiment', 'flex', '--epochs', '1', '--batch-size', '4',
                      '--grad-accum-steps', '1', '--mixup', '0', '--cutmix', '0', '--no-model-ema', '--opt', 'adam',
                      '--lr', '0.01', '--weight-decay', '0', '--warmup-epochs', '0', '--aliasing-reg', '0.1',
                      '--aliasing-target', 'gabor+mask', '--max-train-batches', '3', '--workers', '0', '--device', 'cpu'])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_ckpt(tmp_path / 'flex' / 'last.pth.tar')
    groups = ckpt['optimizer']['param_groups']
    masks = [k for k in ckpt['state_dict'] if k.endswith('mask_params')]
    scaled = [g for g in groups if g.get('lr_scale', 1.0) == pytest.approx(0.1)]
    assert masks and sum(len(g['params']) for g in scaled) == len(masks)


def test_aliasing_regulariser_reaches_the_loss(monkeypatch):
    calls = []
    real = train_imagenet.anti_aliasing_penalty
    monkeypatch.setattr(train_imagenet, 'anti_aliasing_penalty',
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    args = train_imagenet.parse_args(['--model', 'flexnet_16', '--aliasing-reg', '0.1'])
    assert args.aliasing_reg == 0.1 and args.aliasing_target == 'gabor'
    import timm
    model = timm.create_model('flexnet_16', img_size=16, num_classes=2)
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]
    args.no_prefetcher, args.channels_last, args.distributed, args.rank, args.world_size = True, False, False, 0, 1
    args.grad_accum_steps, args.recovery_interval = 1, 0
    task = train_imagenet.ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    state = train_imagenet.TrainState(
        args=args, device=torch.device('cpu'), model=model, task=task,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loader_train=loader, num_batches=1, updates_per_epoch=1)
    train_imagenet.train_one_epoch(state, 0)
    assert calls and calls[0]['factor'] == 0.1 and calls[0]['target'] == 'gabor'


def test_torchcompile_trains_the_same_model(data_dir, tmp_path):
    """--torchcompile BACKEND (timm's flag) trains the compiled model: the first batch's loss equals the eager
    run's. aot_eager traces forward and backward through the custom conv ops as Inductor does, in a fraction of
    the time; Inductor itself (fullgraph) is checked in test_compile_export.py."""
    common = TINY + ['--data-dir', str(data_dir), '--output', str(tmp_path), '--epochs', '1', '--batch-size', '4',
                     '--grad-accum-steps', '1', '--warmup-epochs', '0']
    eager = run_main(common + ['--experiment', 'eager'])
    res = run_main(common + ['--experiment', 'compiled', '--torchcompile', 'aot_eager'])
    assert eager.returncode == 0 and res.returncode == 0, res.stderr[-2000:]

    def first_loss(out):
        return float(next(line.split('loss ')[1].split()[0] for line in out.splitlines() if '[   1/6] loss' in line))
    assert abs(first_loss(res.stdout) - first_loss(eager.stdout)) < 1e-3 * abs(first_loss(eager.stdout))
    assert (tmp_path / 'compiled' / 'last.pth.tar').exists()


@pytest.mark.parametrize('model,ranks', [('smp_tcn.pdigits', 1), ('flextcn_2.digits', 1),
                                         pytest.param('smp_tcn.pdigits', 2, marks=pytest.mark.slow)])
def test_sequence_preset_trains(tmp_path, model, ranks):
    """The 'seq-digits' preset: the built-in digits read as 64-step sequences (one process, or two ranks under
    torchrun: the DDP pipeline itself is test_torchrun_two_ranks_cpu_full_pipeline's)."""
    args = ['--preset', 'seq-digits', '--model', model, '--epochs', '1', '--output', str(tmp_path),
            '--experiment', 'seq', '--device', 'cpu', '--seed', '1']
    res = run_torchrun(args) if ranks == 2 else run_main(args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / 'seq'
    assert "preset 'seq-digits'" in res.stdout
    assert ('Distributed: 2 processes' in res.stdout) == (ranks == 2)
    row = (out / 'summary.csv').read_text().splitlines()[1].split(',')
    assert 0 <= float(row[3]) <= 100 and float(row[1]) < 2.5  # eval top-1 (%) logged, train loss below ln(10)
    state = load_ckpt(out / 'last.pth.tar')['state_dict']
    assert ('permutation' in state) == model.endswith('pdigits')
    assert any(k.endswith('kernel_size_record') and int(v) == 64 for k, v in state.items())


def test_sequential_mnist_flags_on_a_grey_image_folder(tmp_path):
    """The documented sMNIST command's flags (--input-img-mode L, 28 px, one-channel statistics) on a small
    folder of 28 x 28 grey images: the 784-step model reads them as 1-channel sequences."""
    rng = np.random.RandomState(0)
    for split in ('train', 'val'):
        for ci, c in enumerate(('a', 'b')):
            d = tmp_path / 'data' / split / c
            d.mkdir(parents=True)
            for i in range(6):
                img = rng.randint(0, 60, (28, 28)).astype(np.uint8)
                img[ci * 14:(ci + 1) * 14] += 150
                Image.fromarray(img, mode='L').save(d / f'{i}.png')
    args = ['--preset', 'seq-digits', '--model', 'smp_tcn.smnist', '--data-dir', str(tmp_path / 'data'),
            '--input-img-mode', 'L', '--img-size', '28', '--mean', '0.1307', '--std', '0.3081', '--epochs', '1',
            '--batch-size', '4', '--output', str(tmp_path), '--experiment', 'smnist', '--device', 'cpu']
    res = run_main(args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = load_ckpt(tmp_path / 'smnist' / 'last.pth.tar')['state_dict']
    assert state['blocks.0.conv1.smp.weight'].shape == (30, 1, 30)  # one input channel
    assert int(state['blocks.0.conv1.smp.kernel_size_record']) == 784


@pytest.mark.parametrize('value,expected', [(None, (False, False)), ('pointwise', (True, False)), ('lean', (True, True))])
def test_recompute_flag_sets_the_models_memory_saving(monkeypatch, tmp_path, value, expected):
    """--recompute [pointwise|lean] turns on the model's set_recompute (off by default: the faster step)."""
    from helpers import built_trainer_state
    argv = ['--epochs', '1', '--output', str(tmp_path)] + (['--recompute'] if value == 'pointwise' else [])
    argv += ['--recompute', 'lean'] if value == 'lean' else []
    state = built_trainer_state(monkeypatch, argv)
    assert (state.model.recompute, state.model.recompute_fft_spectra) == expected


def test_recompute_flag_refused_for_a_model_without_it():
    r = run_main(['--model', 'resnet18', '--recompute', '--epochs', '1'])
    assert r.returncode == 2
    assert r.stderr.strip() == 'train_imagenet.py: error: --recompute: resnet18 has no set_recompute (our SMPConv and FlexNet models do)'
