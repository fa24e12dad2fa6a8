""" Real CIFAR-10 through the trainer: the CIFAR presets and the cross-resolution source (--img-size 16) read the
ImageFolder (`--dataset '' --data-dir DIR`, validation on its test/ split) with the papers' augmentation (flip, random
32-px crop of the image padded by 4 px, then the resize to --img-size) and evaluate the test images resized the same
way (no crop); FlexNet models are built for --img-size. The runs use a per-class subset of
../shared/data/cifar10-jpeg.tar.gz and skip, naming the file, where it is absent (a user's clone). """
import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import load_ckpt, run_main
from timm.data import create_transform
from torchvision import transforms

import train_imagenet
from timm_smpconv.data import with_pad_crop

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location('bench_harness', ROOT / 'benchmarks' / 'harness.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def cifar_subset(tmp_path_factory):
    """The first 8 training and 4 test images of each class, extracted from the archive into a temporary folder."""
    harness = _harness()
    if not harness.CIFAR10_ARCHIVE.is_file():
        pytest.skip(f'{harness.CIFAR10_ARCHIVE} is absent (the CIFAR-10 JPEG archive beside the repository)')
    return harness.cifar10_folder(harness.CIFAR10_ARCHIVE, tmp_path_factory.mktemp('cifar'), 8, 4)


def _timm_train_transform(size, interpolation='bilinear'):
    return create_transform(size, is_training=True, scale=(0.08, 1.0), hflip=0.5, interpolation=interpolation,
                            color_jitter=None, use_prefetcher=True)


def test_pad_crop_replaces_timms_random_resized_crop():
    t = with_pad_crop(_timm_train_transform(16), 32, 4)
    kinds = [type(op).__name__ for op in t.transforms]
    assert kinds == ['Resize', 'RandomCrop', 'Resize', 'RandomHorizontalFlip', 'MaybePILToTensor']
    to_crop, crop, resize = t.transforms[:3]
    assert (to_crop.size, crop.size, crop.padding, resize.size, resize.interpolation) == \
        ((32, 32), (32, 32), 4, (16, 16), transforms.InterpolationMode.BILINEAR)
    # at the crop's own size there is no resize after it, and the one before leaves 32 x 32 images as they are:
    # without padding and flips the output is the image itself
    t32 = with_pad_crop(_timm_train_transform(32), 32, 0)
    assert [type(op).__name__ for op in t32.transforms][:3] == ['Resize', 'RandomCrop', 'RandomHorizontalFlip']
    img = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    t32.transforms[2].p = 0.
    assert torch.equal(t32(img), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    # padded by 4: every output is the image shifted by at most 4 px, zeros brought in at the borders
    t4 = with_pad_crop(_timm_train_transform(32), 32, 4)
    t4.transforms[2].p = 0.
    ref = torch.nn.functional.pad(torch.from_numpy(np.array(img)).permute(2, 0, 1), (4,) * 4)
    for _ in range(5):
        out = t4(img)
        assert any(torch.equal(out, ref[:, i:i + 32, j:j + 32]) for i in range(9) for j in range(9))
    # images of another size are resized to the crop's size first (the built-in 8 x 8 digits)
    assert t4(img.resize((8, 8))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="one interpolation, not 'random'"):
        with_pad_crop(_timm_train_transform(16, 'random'), 32, 4)
    with pytest.raises(ValueError, match='no random-resized crop'):
        with_pad_crop(transforms.Compose([transforms.ToTensor()]), 32, 4)


def _args(argv):
    args = train_imagenet.parse_args(argv)
    args.distributed, args.rank, args.world_size = False, 0, 1
    return args


@pytest.mark.parametrize('flags,model_kwargs,img_size', [
    (['--img-size', '16'], [], 16),
    (['--input-size', '3', '16', '16'], [], 16),
    ([], ['img_size=16'], 16),  # the data follows the model
    (['--img-size', '16'], ['img_size=16'], 16),
    ([], [], 32),  # the model's default: CIFAR's 32 px
])
def test_img_size_builds_flexnet_for_that_resolution(flags, model_kwargs, img_size):
    args = _args(['--preset', 'flexnet-cifar'] + flags + ['--model-kwargs', 'widths=(24,)'] + model_kwargs)
    model = train_imagenet.create_training_model(args, 10)
    assert model.img_size == img_size and model.stem.conv.kernel_size == img_size + 1  # the horizon
    assert train_imagenet.build_data_config(args, model)['input_size'] == (3, img_size, img_size)


@pytest.mark.parametrize('argv,message', [
    (['--img-size', '16', '--model-kwargs', 'img_size=32'],
     '--img-size 16 and --model-kwargs img_size=32 disagree: flexnet_16 is built for the resolution it runs at'),
    (['--input-size', '3', '16', '16', '--model-kwargs', 'img_size=24'], '--input-size 3 16 16 and --model-kwargs img_size=24'),
    (['--img-size', '15'], 'could not create model flexnet_16: img_size must be an even int'),
])
def test_img_size_is_refused_naming_the_kwarg(argv, message):
    args = _args(['--preset', 'flexnet-cifar'] + argv)
    with pytest.raises(train_imagenet.TrainingError, match=message):
        train_imagenet.create_training_model(args, 10)


def test_img_size_is_not_passed_to_other_models():
    args = _args(['--model', 'smpconv_mobile31', '--img-size', '32', '--model-kwargs', 'kernel_sizes=[5,5,5,5]'])
    model = train_imagenet.create_training_model(args, 10)  # SMPConvNet takes no img_size
    assert train_imagenet.build_data_config(args, model)['input_size'] == (3, 32, 32)


@pytest.mark.parametrize('argv,message', [
    (['--scale', '0.5', '1'], '--pad-crop 32 4 replaces the random-resized crop that --scale shapes'),
    (['--train-crop-mode', 'rkrc'], 'that --train-crop-mode shapes'),
    (['--train-img-sizes', '16', '32'], '--pad-crop does not combine with --train-img-sizes'),
    (['--pad-crop', '32', '-1'], '--pad-crop takes SIZE >= 1 and PAD >= 0'),
])
def test_pad_crop_conflicts_are_refused(argv, message):
    with pytest.raises(train_imagenet.TrainingError, match=message):
        train_imagenet.check_args(_args(['--preset', 'smp-cifar'] + argv))


def test_cifar_presets_use_the_papers_crop_unless_turned_off():
    for preset in ('smp-cifar', 'flexnet-cifar'):
        args = _args(['--preset', preset])
        assert (args.pad_crop, args.val_split, args.crop_pct, args.img_size) == ([32, 4], 'test', 1.0, None)
    train_imagenet.check_args(_args(['--preset', 'smp-cifar', '--pad-crop', '0', '0', '--scale', '0.5', '1']))


def _loaders(argv):
    """The run's datasets, model and loaders as train_imagenet.run() sets them up (on the CPU)."""
    args = _args(argv + ['--device', 'cpu', '--workers', '0'])
    train_imagenet.check_args(args)
    train_set, eval_set = train_imagenet.setup_datasets(args)
    model = train_imagenet.create_training_model(args, args.num_classes)
    state = train_imagenet.TrainState(args=args, device=torch.device('cpu'), model=model, dataset_train=train_set,
                                      dataset_eval=eval_set)
    train_imagenet.setup_model(state)
    train_imagenet.setup_loaders(state)
    return state


def test_cifar_image_folder_at_16_px_gets_the_papers_transforms(cifar_subset):
    """flip, RandomCrop(32, padding 4), bilinear Resize(16) for training; the test images resized the same way, no
    crop; ImageNet mean / std; 10 classes in CIFAR-10's order, validation on the test split."""
    state = _loaders(['--preset', 'flexnet-cifar', '--dataset', '', '--data-dir', str(cifar_subset), '--img-size', '16'])
    train_t, eval_t = state.dataset_train.transform, state.dataset_eval.transform
    assert [type(op).__name__ for op in train_t.transforms] == \
        ['Resize', 'RandomCrop', 'Resize', 'RandomHorizontalFlip', 'ColorJitter', 'MaybePILToTensor']
    _, crop, resize, flip, jitter, to_tensor = train_t.transforms
    assert (crop.size, crop.padding, resize.size, flip.p) == ((32, 32), 4, (16, 16), 0.5)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (None,) * 4  # --color-jitter 0: none
    assert (len(state.dataset_train), len(state.dataset_eval), state.args.num_classes) == (80, 40, 10)
    assert state.dataset_train.reader.class_to_idx['airplane'] == 0 and state.dataset_train.reader.class_to_idx['truck'] == 9
    img, _ = state.dataset_eval.reader[0]
    img = Image.open(img).convert('RGB')
    assert img.size == (32, 32)
    assert torch.equal(eval_t(img), to_tensor(resize(img)))  # the same resize, no crop
    assert state.data_config['mean'] == (0.485, 0.456, 0.406) and state.data_config['crop_pct'] == 1.0
    x, _ = next(iter(state.loader_train))
    assert x.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize('preset,size', [('smp-cifar', 32), ('flexnet-cifar', 16)])
def test_cifar_presets_train_from_the_image_folder(cifar_subset, tmp_path, preset, size):
    """A few batches of each CIFAR preset on the real images; the saved checkpoint, reloaded, gives the top-1 the run
    reported; the 16-px FlexNet is built with horizon 17 and runs at 32 px re-targeted."""
    common = ['--preset', preset, '--dataset', '', '--data-dir', str(cifar_subset), '--workers', '0', '--device', 'cpu']
    res = run_main(common + ['--img-size', str(size), '--epochs', '1', '--max-train-batches', '2', '--batch-size', '4',
                             '--bn-recalibrate', '1', '--output', str(tmp_path), '--experiment', 'run'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert '80 images, 2 batches/epoch' in res.stdout
    ckpt = tmp_path / 'run' / 'last.pth.tar'
    sd = load_ckpt(ckpt)['state_dict']
    key = 'stem.smp.kernel_size_record' if preset == 'smp-cifar' else 'stem.conv.kernel_size_record'
    assert int(sd[key]) == size + 1
    with open(tmp_path / 'run' / 'summary.csv') as f:
        reported = float(list(csv.DictReader(f))[-1]['eval_top1'])
    for eval_size in (size, 32) if size != 32 else (32,):
        out = run_main(common + ['--eval-only', '--checkpoint', str(ckpt), '--img-size', str(eval_size)])
        assert out.returncode == 0, out.stderr[-3000:]
        top1 = float(out.stdout.split('model: top-1 ')[1].split()[0])
        if eval_size == size:
            assert top1 == reported


def test_smp_ablations_are_kwargs_of_smp_flexnet_16():
    """The SMPConv paper's CIFAR ablations (Tables 6-9): fixed positions / radii stay at their initial values through
    a training step (and are left out of the optimizer), the initial spread and radius and the point count are set."""
    import timm

    from timm_smpconv import param_groups_smp
    torch.manual_seed(0)
    model = timm.create_model('smp_flexnet_16', img_size=16, widths=(24,), n_points=8,
                              conv_kwargs=dict(learn_points=False, radius=0.18, point_std=0.3))
    smp = model.stem.smp
    assert 'learn_points=False' in repr(smp) and 'learn_radius' not in repr(smp)
    assert smp.points.shape[1] == 8 and torch.all(smp.radius == 0.18) and 0.2 < smp.points.std() < 0.4
    points, radius = smp.points.detach().clone(), smp.radius.detach().clone()
    groups = param_groups_smp(model)
    assert not any(p is smp.points for g in groups for p in g['params'])
    opt = torch.optim.Adam(groups, lr=1e-2)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(smp.points, points) and not torch.equal(smp.radius, radius)
    fixed_r = timm.create_model('smp_flexnet_16', img_size=16, widths=(24,), conv_kwargs=dict(learn_radius=False))
    assert not fixed_r.stem.smp.radius.requires_grad and fixed_r.stem.smp.points.requires_grad
