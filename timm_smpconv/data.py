""" Datasets: the built-in digits (single- and multi-label), and time series read from .npz or UEA / UCR .ts files.

The built-in real dataset: scikit-learn's handwritten digits. 1,797 real 8x8 grey-level scans of the
digits 0-9 (UCI ML hand-written digits, shipped inside the scikit-learn package, so no download is needed).
A fixed stratified split gives 1,438 training and 359 validation images. Items are (PIL RGB image, label)
like timm's ImageDataset, so timm's transforms and loaders apply unchanged; the images keep their 8x8
resolution and the transform resizes them.

The built-in multi-label task (`DigitPairsDataset`): two of those digits side by side in one 16x16 image, the
target being the set of the two classes (one class when both digits are the same), as the list of class indices
timm's multi-label readers give (`timm.data.MultiLabelTarget` makes it the multi-hot vector).
"""
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['DigitsDataset', 'DIGITS_MEAN', 'DIGITS_STD', 'DIGITS_NUM_CLASSES', 'DigitPairsDataset',
           'DIGIT_PAIRS_MEAN', 'DIGIT_PAIRS_STD', 'SequenceDataset',
           'load_sequence_splits', 'is_sequence_dataset', 'channel_stats', 'allow_zero_bit_posterize',
           'with_pad_crop']

DIGITS_NUM_CLASSES = 10
# per-channel statistics of the training split after scaling to [0, 1] (grey replicated to RGB)
DIGITS_MEAN = (0.3058,) * 3
DIGITS_STD = (0.3764,) * 3
# the same for the digit pairs: half of each 16x16 image is the blank border above and below the two digits
DIGIT_PAIRS_MEAN = (0.1529,) * 3
DIGIT_PAIRS_STD = (0.3070,) * 3
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, also for 0 bits: every value cleared, as Pillow before 13 did."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    from timm.data import auto_augment
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def allow_zero_bit_posterize() -> bool:
    """Make timm's RandAugment / AutoAugment posterize ops take 0 bits with the Pillow installed.

    timm's 'PosterizeIncreasing' keeps 4 - int(4 * magnitude / 10) bits, so 0 at magnitude 10, which
    RandAugment reaches with magnitude noise (the recipe's `rand-m9-mstd0.5-inc1`: about 2% of draws);
    Pillow 13 raises "bits must be between or equal to 1 and 8" where earlier versions returned a black
    image, which stops a training run at a random step. Ops built after this call (timm looks the function
    up when it builds an op) clear every value instead, as before. A no-op where Pillow takes 0 bits.
    Returns whether timm's ops were changed."""
    from PIL import ImageOps
    from timm.data import auto_augment
    try:
        ImageOps.posterize(Image.new('RGB', (1, 1)), 0)
        return False
    except ValueError:
        pass
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize_any_bits
    return True


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError('the built-in digits dataset needs scikit-learn: pip install scikit-learn') from e
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digits_split_indices(targets: np.ndarray, split: str) -> np.ndarray:
    """Indices of a fixed, stratified split (every class contributes 20% to 'val')."""
    rng = np.random.RandomState(_SPLIT_SEED)
    val = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        val.extend(idx[:int(round(len(idx) * _VAL_FRACTION))].tolist())
    val = np.array(sorted(val))
    if split in ('val', 'validation', 'eval', 'test'):
        return val
    if split == 'train':
        return np.setdiff1d(np.arange(len(targets)), val)
    raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")


def _digit_images(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(grey images as uint8 0..255, labels) of a split of the built-in digits."""
    images, targets = _load_digits()
    idx = digits_split_indices(targets, split)
    # 0..16 grey levels -> 0..255 uint8
    return np.clip(np.rint(images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8), targets[idx]


class DigitsDataset:
    """scikit-learn's 8x8 handwritten digits as a map-style image dataset."""

    _name = 'digits'

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None):
        grey, self.targets = _digit_images(split)
        self.images = np.repeat(grey[..., None], 3, axis=-1)  # replicated to RGB
        self.split = split
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def _target(self, index: int):
        return int(self.targets[index])

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], mode='RGB')
        if self.transform is not None:
            img = self.transform(img)
        target = self._target(index)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return f'{self._name}_{self.split}_{index:04d}.png'


class DigitPairsDataset(DigitsDataset):
    """A real multi-label task from the built-in digits: image i of a split shows its digit i on the left and the
    digit of a fixed random partner (from the same split) on the right, both 8x8, centred in a 16x16 black canvas;
    its target is the sorted list of the two classes (one entry when they are equal).

    Pairs are drawn within a split, so no validation digit is seen in training: 1,438 training and 359 validation
    images (one per digit of the split), 10 classes, about 1.9 positive labels per image. `targets` holds every
    item's class list (for counting label frequencies without reading images). `target_transform` (e.g.
    `timm.data.MultiLabelTarget(10)`) turns the list into the dense vector a loader batches.
    """

    _name = 'digit_pairs'
    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None):
        super().__init__(split, transform, target_transform)
        grey, labels = self.images[..., 0], self.targets
        partner = np.random.RandomState(_SPLIT_SEED + 1).permutation(len(grey))
        canvas = np.zeros((len(grey), 16, 16), dtype=np.uint8)
        canvas[:, 4:12, :8] = grey
        canvas[:, 4:12, 8:] = grey[partner]
        self.images = np.repeat(canvas[..., None], 3, axis=-1)
        self.targets = [sorted({int(labels[i]), int(labels[j])}) for i, j in enumerate(partner)]

    def _target(self, index: int):
        return list(self.targets[index])


# ---- time series: (C, L) arrays with a label -------------------------------------------------------------------
#
# Two sources: `npz` (DIR/train.npz and DIR/val.npz or DIR/test.npz, each with X of shape (N, C, L) and y of shape
# (N,)), and `ts/NAME` (the UEA / UCR archives' DIR/NAME/NAME_TRAIN.ts and NAME_TEST.ts, read with aeon, the
# field's library for them, an optional dependency). The archives' papers (and both of ours) validate on the TEST
# split. Series of unequal length are padded at the front, so that the last step, which our sequence models
# classify from, is always real data; the padding is the channel mean (zero after normalisation).

_TIMESERIES_EXTRA = "pip install 'timm-smpconv[timeseries]'"


def is_sequence_dataset(name: str) -> bool:
    """True for the time-series sources: 'npz' and 'ts/NAME'."""
    return name == 'npz' or name.startswith('ts/')


def _read_npz(path: str) -> Tuple[List[np.ndarray], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            x, y = (f[k] if k in names else None for k in ('X', 'y'))
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {path}: {e}') from e
    if x is None or y is None:
        missing = [k for k, v in (('X', x), ('y', y)) if v is None]
        raise ValueError(f'{path} has no {" or ".join(missing)} array (it holds {", ".join(names) or "none"}); '
                         f'time-series .npz files hold X (N, C, L) and y (N,)')
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f'{path}: X must be (N, C, L) and y (N,) with the same N, got X {tuple(x.shape)} and '
                         f'y {tuple(y.shape)}')
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f'{path}: X must be numeric, got {x.dtype}')
    return list(x.astype(np.float32)), y


def _read_ts(path: str) -> Tuple[List[np.ndarray], np.ndarray]:
    try:
        from aeon.datasets import load_from_ts_file
    except ImportError as e:
        raise ImportError(f'reading .ts files (--dataset ts/NAME) needs aeon: {_TIMESERIES_EXTRA}') from e
    x, y = load_from_ts_file(path)
    return [np.asarray(s, dtype=np.float32) for s in x], np.asarray(y)


def load_sequence_splits(name: str, root: str, train_split: str = 'train', val_split: str = 'validation'):
    """(train series, train labels, validation series, validation labels, class names) of a time-series source.

    Series are lists of (C, L_i) float32 arrays (L_i may vary); labels are class indices into the sorted class
    names of the training split (strings in .ts files, numbers in .npz files).
    """
    if not os.path.isdir(root):
        raise ValueError(f'time-series data folder {root!r} does not exist')
    if name == 'npz':
        names = [f'{val_split}.npz'] + [n for n in ('val.npz', 'test.npz') if n != f'{val_split}.npz']
        val_path = next((os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))), None)
        train_path = os.path.join(root, f'{train_split}.npz')
        if not os.path.isfile(train_path) or val_path is None:
            raise ValueError(f'--dataset npz reads {train_split}.npz and {" or ".join(names)} from {root!r}; found '
                             f'{", ".join(sorted(os.listdir(root))) or "nothing"}')
        (x_train, y_train), (x_val, y_val) = _read_npz(train_path), _read_npz(val_path)
    elif name.startswith('ts/') and len(name) > 3:
        archive = name[3:]
        paths = [os.path.join(root, archive, f'{archive}_{s}.ts') for s in ('TRAIN', 'TEST')]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f'--dataset {name} reads {archive}/{archive}_TRAIN.ts and _TEST.ts under --data-dir; '
                             f'missing: {", ".join(missing)}')
        (x_train, y_train), (x_val, y_val) = _read_ts(paths[0]), _read_ts(paths[1])
    else:
        raise ValueError(f"unknown time-series dataset {name!r}: use 'npz' or 'ts/NAME'")
    if not x_train or not x_val:
        raise ValueError(f'{name} at {root!r} has an empty split ({len(x_train)} train, {len(x_val)} validation series)')
    chans = {s.shape[0] for s in x_train + x_val}
    if len(chans) != 1:
        raise ValueError(f'{name}: series with different channel counts {sorted(chans)}')
    classes = sorted(set(y_train.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(y_val.tolist()) - set(classes), key=str)
    if unknown:
        raise ValueError(f'{name}: validation labels {unknown[:5]} never occur in the training split')
    as_index = lambda y: np.array([index[c] for c in y.tolist()], dtype=np.int64)  # noqa: E731
    return x_train, as_index(y_train), x_val, as_index(y_val), [str(c) for c in classes]


def channel_stats(series: Sequence[np.ndarray]) -> Tuple[List[float], List[float]]:
    """Per-channel mean and standard deviation over every real (non-missing) step of the series."""
    flat = np.concatenate([s.reshape(s.shape[0], -1) for s in series], axis=1).astype(np.float64)
    mean = np.nanmean(flat, axis=1)
    std = np.nanstd(flat, axis=1)
    std = np.where(std > 0, std, 1.0)  # a constant channel stays at zero
    return mean.tolist(), std.tolist()


class SequenceDataset(torch.utils.data.Dataset):
    """Labelled time series as one (N, C, length) float tensor: normalised per channel with `mean` / `std`, missing
    values (NaN) at the mean, shorter series padded at the front with the mean so that they end at the last step."""

    def __init__(self, series: Sequence[np.ndarray], labels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 length: int):
        chans = series[0].shape[0]
        if len(mean) != chans or len(std) != chans:
            raise ValueError(f'normalisation has {len(mean)} means and {len(std)} stds for {chans}-channel series')
        mean = np.asarray(mean, dtype=np.float32)[:, None]
        std = np.asarray(std, dtype=np.float32)[:, None]
        data = np.zeros((len(series), chans, length), dtype=np.float32)
        for i, s in enumerate(series):
            if s.shape[1] > length:
                raise ValueError(f'a series has {s.shape[1]} steps, more than the padded length {length}')
            data[i, :, length - s.shape[1]:] = np.nan_to_num((s - mean) / std, nan=0.0)
        self.data = torch.from_numpy(data)
        self.targets = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.data[index], self.targets[index]


def with_pad_crop(transform, size: int, padding: int):
    """timm's training transform with its random-resized crop replaced by the CIFAR papers' crop.

    `transform` is the torchvision Compose that timm's `create_transform(is_training=True)` builds (as
    `create_loader` sets it on the dataset). Its `RandomResizedCropAndInterpolation` becomes: a `Resize` to
    size x size (which leaves images of that size, CIFAR's 32 x 32, untouched), torchvision's
    `RandomCrop(size, padding=padding)` (a random size x size window of the image zero-padded by `padding` pixels on
    each side: the papers' `RandomCrop(32, padding=4)`), and a `Resize` to the output size the random-resized crop
    had, where that differs from `size` (the FlexConv paper's 16-px source resolution: crop at 32, then resize to
    16), both with its interpolation. timm's flips, auto-augment, colour jitter, tensor conversion, normalisation and
    random erasing stay as they were.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms
    ops, found = [], False
    for t in transform.transforms:
        if not isinstance(t, RandomResizedCropAndInterpolation):
            ops.append(t)
            continue
        if isinstance(t.interpolation, (list, tuple)):
            raise ValueError("the resizes around the padded crop need one interpolation, not 'random'")
        found = True
        ops += [transforms.Resize((size, size), interpolation=t.interpolation),
                transforms.RandomCrop(size, padding=padding)]
        if tuple(t.size) != (size, size):
            ops.append(transforms.Resize(t.size, interpolation=t.interpolation))
    if not found:
        raise ValueError('the training transform has no random-resized crop to replace')
    return transforms.Compose(ops)
