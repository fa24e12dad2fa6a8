""" Knowledge distillation in train_imagenet.py (timm's LogitDistillationTask / FeatureDistillationTask): a tiny
teacher trained on the built-in digits, a smaller student distilled from it through each teacher route (a plain
name with --kd-checkpoint, local-dir:), the distillation loss in use, exact resume with the task's state. """
import argparse
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import run_trainer  # noqa: E402

import train_imagenet  # noqa: E402

COMMON = ['--workers', '0', '--device', 'cpu', '--seed', '5', '--log-interval', '5', '--validation-batch-size', '128',
          '--batch-size', '16', '--warmup-epochs', '0']
TEACHER = ['--model', 'smpconv_mobile31', '--model-kwargs', 'kernel_sizes=[9,7,5,5]', 'n_points=[8,6,3,3]',
           'small_kernel_size=3', 'channels=[16,24,32,40]', 'layers=[1,1,1,1]']
STUDENT = ['--model', 'smpconv_mobile31', '--model-kwargs', 'kernel_sizes=[9,7,5,5]', 'n_points=[6,4,3,3]',
           'small_kernel_size=3', 'channels=[12,16,24,32]', 'layers=[1,1,1,1]']


pytestmark = pytest.mark.usefixtures('one_thread')


def run_main(argv):
    """(exit code, stdout + stderr) of the trainer run in this process."""
    return run_trainer(argv)[:2]


def load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A tiny SMPConv trained for 2 epochs on the digits (no EMA): its checkpoint."""
    out = tmp_path_factory.mktemp('teacher')
    code, log = run_main(TEACHER + COMMON + ['--epochs', '2', '--no-model-ema', '--output', str(out),
                                             '--experiment', 't'])
    assert code == 0, log[-3000:]
    return out / 't' / 'last.pth.tar'


def val_batch():
    """The first 128 validation digits, normalised as the trainer does (32 px, digits statistics)."""
    args = train_imagenet.parse_args(STUDENT + COMMON)
    args.distributed = False
    model = timm.create_model('resnet10t', num_classes=10)
    loader = train_imagenet.create_eval_loader(train_imagenet.DigitsDataset('val'),
                                               train_imagenet.build_data_config(args, model), args, torch.device('cpu'))
    return next(iter(loader))


def agreement(student_ckpt, teacher_model, x):
    """Fraction of inputs on which the student's predicted class is the teacher's."""
    ckpt = load(student_ckpt)
    student = timm.create_model('smpconv_mobile31', num_classes=10, **ckpt['args'].model_kwargs)
    student.load_state_dict(ckpt['state_dict'])
    with torch.no_grad():
        return (student.eval()(x).argmax(-1) == teacher_model.eval()(x).argmax(-1)).float().mean().item()


@pytest.fixture(scope='module')
def shifted_teacher(teacher, tmp_path_factory):
    """The teacher with its classifier rows rolled by one: it predicts digit d + 1 for a d. Distilled from it, a
    student learns that shifted labelling, which the labels alone never teach."""
    ckpt = load(teacher)
    for key in ('head.fc.weight', 'head.fc.bias'):
        ckpt['state_dict'][key] = ckpt['state_dict'][key].roll(1, 0)
    path = tmp_path_factory.mktemp('shifted') / 'teacher.pth.tar'
    torch.save(ckpt, path)
    return path


def test_logit_distillation_moves_the_student_towards_the_teacher(shifted_teacher, tmp_path):
    base = STUDENT + COMMON + ['--epochs', '1', '--no-model-ema', '--output', str(tmp_path)]
    code, log = run_main(base + ['--experiment', 'plain'])
    assert code == 0, log[-3000:]
    code, log = run_main(base + ['--experiment', 'kd', '--kd-model-name', 'smpconv_mobile31', '--kd-checkpoint',
                                 str(shifted_teacher), '--kd-distill-type', 'logit', '--task-loss-weight', '0', '--kd-temperature', '1'])
    assert code == 0, log[-3000:]
    assert 'Distillation teacher smpconv_mobile31' in log
    assert ' kd_loss ' in log and ' task_loss ' in log  # the task's loss parts are logged
    ckpt = load(shifted_teacher)
    t_model = timm.create_model('smpconv_mobile31', num_classes=10, **ckpt['args'].model_kwargs)
    t_model.load_state_dict(ckpt['state_dict'])
    x, y = val_batch()
    with torch.no_grad():
        assert (t_model.eval()(x).argmax(-1) == (y + 1) % 10).float().mean() > 0.6  # a teacher worth following
    plain = agreement(tmp_path / 'plain' / 'last.pth.tar', t_model, x)
    kd = agreement(tmp_path / 'kd' / 'last.pth.tar', t_model, x)
    assert kd > plain + 0.3, (kd, plain)


def test_teacher_routes_build_the_same_teacher_seeing_the_students_inputs(teacher, tmp_path):
    """--kd-checkpoint (the run's model kwargs and digits normalisation from its args) and local-dir: (a
    save_for_hf folder whose pretrained_cfg carries the normalisation) give the same teacher outputs."""
    from timm.models import save_for_hf
    args = train_imagenet.parse_args(STUDENT + COMMON + ['--kd-model-name', 'smpconv_mobile31', '--kd-checkpoint',
                                                         str(teacher)])
    args.rank = 0
    student = train_imagenet.create_training_model(args, 10)
    cfg = train_imagenet.build_data_config(args, student)
    by_file = train_imagenet.create_teacher(args, student, cfg, torch.device('cpu'))
    assert torch.allclose(by_file.mean_kd.flatten(), torch.tensor(cfg['mean']))  # trained on the same digits
    t_args = load(teacher)['args']
    model = timm.create_model('smpconv_mobile31', num_classes=10, **t_args.model_kwargs)
    model.load_state_dict(load(teacher)['state_dict'])
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=cfg['mean'], std=cfg['std'])
    save_for_hf(model, tmp_path / 'hf', model_args=dict(t_args.model_kwargs, num_classes=10))
    args.kd_model_name, args.kd_checkpoint = f'local-dir:{tmp_path / "hf"}', None
    by_dir = train_imagenet.create_teacher(args, student, cfg, torch.device('cpu'))
    x = torch.randn(4, 3, 32, 32)
    task = train_imagenet.create_task(args, student, by_dir, cfg, torch.device('cpu'), None)
    assert torch.equal(by_dir.normalize_input(x, task.student_mean, task.student_std), x)  # same normalisation
    with torch.no_grad():
        assert torch.allclose(by_file(x), by_dir(x), atol=1e-6)
    assert not any(p.requires_grad for p in by_dir.parameters()) and not by_dir.model.training


def test_feature_distillation_resumes_exactly_with_its_projection(teacher, tmp_path):
    common = STUDENT + COMMON + ['--epochs', '2', '--max-train-batches', '3', '--output', str(tmp_path),
                                 '--model-ema', '--model-ema-decay', '0.9', '--kd-model-name', 'smpconv_mobile31',
                                 '--kd-checkpoint', str(teacher), '--kd-distill-type', 'feature']
    code, log = run_main(common + ['--experiment', 'full'])
    assert code == 0, log[-3000:]
    assert run_main(common + ['--experiment', 'parts', '--stop-after-epochs', '1'])[0] == 0
    code, log = run_main(common + ['--experiment', 'parts', '--auto-resume'])
    assert code == 0 and 'Resumed from' in log, log[-3000:]
    a, b = load(tmp_path / 'full' / 'last.pth.tar'), load(tmp_path / 'parts' / 'last.pth.tar')
    proj = a['task_state']['projection']
    assert proj['weight'].shape == (40, 32)  # student width 32 -> teacher width 40
    for key in ('state_dict', 'state_dict_ema'):
        assert max((a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key]) <= 1e-6, key
    for key in ('task_state', 'task_state_ema'):
        for k, v in a[key]['projection'].items():
            assert torch.allclose(v, b[key]['projection'][k], atol=1e-6), (key, k)
    # the projection learned: it moved from its initialisation in both the model's and the EMA's task state
    assert not torch.equal(a['task_state']['projection']['weight'], a['task_state_ema']['projection']['weight'])


@pytest.mark.parametrize('argv,message', [
    (['--kd-model-name', 'smpconv_mobile31'], 'could not create teacher smpconv_mobile31'),
    (['--kd-model-name', 'smpconv_mobile31', '--kd-distill-type', 'token', '--kd-checkpoint', 'TEACHER'],
     'could not set up token distillation of smpconv_mobile31'),
    (['--kd-model-name', 'local-dir:/no/such/dir'], 'could not create teacher local-dir:/no/such/dir'),
    (['--kd-model-name', 'local-dir:/x', '--kd-checkpoint', 'TEACHER'], '--kd-checkpoint gives weights to a plain'),
])
def test_bad_teachers_exit_2_with_a_message(teacher, tmp_path, argv, message):
    argv = [str(teacher) if a == 'TEACHER' else a for a in argv]
    code, log = run_main(STUDENT + COMMON + ['--epochs', '1', '--output', str(tmp_path)] + argv)
    assert code == 2 and message in log, log[-2000:]
    assert not any(tmp_path.iterdir())
