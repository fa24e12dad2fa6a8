""" The built-in real dataset: scikit-learn's handwritten digits.

1,797 real 8x8 grey-level scans of the digits 0-9 (UCI ML hand-written digits, shipped inside the
scikit-learn package, so no download is needed). A fixed stratified split gives 1,438 training
and 359 validation images. Items are (PIL RGB image, label) like timm's ImageDataset, so timm's
transforms and loaders apply unchanged; the images keep their 8x8 resolution and the transform
resizes them.
"""
from typing import Callable, Optional

import numpy as np
from PIL import Image

__all__ = ['DigitsDataset', 'DIGITS_MEAN', 'DIGITS_STD', 'DIGITS_NUM_CLASSES']

DIGITS_NUM_CLASSES = 10
# per-channel statistics of the training split after scaling to [0, 1] (grey replicated to RGB)
DIGITS_MEAN = (0.3058,) * 3
DIGITS_STD = (0.3764,) * 3
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


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


class DigitsDataset:
    """scikit-learn's 8x8 handwritten digits as a map-style image dataset."""

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None):
        images, targets = _load_digits()
        idx = digits_split_indices(targets, split)
        # 0..16 grey levels -> 0..255 uint8, replicated to RGB
        grey = np.clip(np.rint(images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.images = np.repeat(grey[..., None], 3, axis=-1)
        self.targets = targets[idx]
        self.split = split
        self.transform = transform
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], mode='RGB')
        if self.transform is not None:
            img = self.transform(img)
        target = int(self.targets[index])
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return f'digits_{self.split}_{index:04d}.png'
