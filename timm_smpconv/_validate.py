""" Argument checks shared by the layers and models.

Each check returns the normalised value or raises with a message that names the argument, what it
must be and what it got: TypeError for a value of the wrong type, ValueError for one out of range.
"""
import math
from typing import Sequence, Union

import torch

__all__ = ['check_choice', 'check_image_input', 'check_int', 'check_kernel_size', 'check_positive', 'square_size']


def check_int(name: str, value, minimum: int = 1) -> int:
    """An int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int, got {type(value).__name__}')
    if value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value}')
    return value


def check_positive(name: str, value) -> float:
    """A finite real number > 0, returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be a finite number > 0, got {value!r}')
    return float(value)


def check_choice(name: str, value, choices: Sequence):
    """One of `choices`."""
    if value not in choices:
        raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}')
    return value


def check_kernel_size(
        kernel_size: Union[int, Sequence[int]],
        dims: int,
        name: str = 'kernel_size',
        minimum: int = 1,
        what: str = '',
) -> int:
    """One kernel size for every axis: an int, or `dims` equal ints, >= `minimum`.

    2-D kernels are centred (k // 2 padding on each side), so they must be odd; 1-D kernels are causal
    and any length works. `what` is appended to the name in messages, e.g. ' (the horizon)'.
    """
    label = name + what
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != dims or len(set(kernel_size)) != 1:
            shape = 'one int' if dims == 1 else f'one int or {dims} equal ints (one size for every axis)'
            raise ValueError(f'{label} must be {shape}, got {tuple(kernel_size)}')
        kernel_size = kernel_size[0]
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f'{name} must be an int, got {type(kernel_size).__name__}')
    odd = dims == 2
    if kernel_size < minimum or (odd and kernel_size % 2 == 0):
        raise ValueError(f'{label} must be {"an odd" if odd else "an"} int >= {minimum}, got {kernel_size}')
    return kernel_size


def square_size(size: Union[int, Sequence[int]], name: str = 'img_size', minimum: int = 1) -> int:
    """An image size with equal sides (an int or an equal pair) as one int >= `minimum`: the continuous
    kernels here have one horizon for both axes."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f'{name} must be square (one kernel horizon for both axes), got {tuple(size)}')
        size = size[0]
    return check_int(name, size, minimum)


def check_image_input(x: torch.Tensor, in_chans: int, model: str):
    """A model's input: (N, in_chans, H, W) images, else a ValueError naming the shape expected and the one given
    (every image family says it the same way, before its first layer). Reads the static shape only: no host sync,
    a guard (not a graph break) when compiled or exported. Modules calling it from a traced forward register it
    with torch.fx.wrap, so that fx records the check as one call."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'{model} expects (N, {in_chans}, H, W) images, got shape {list(x.shape)}')
