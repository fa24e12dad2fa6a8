""" The shared argument checks, and the package's layering (layers/ knows no model). """
import ast
import math
from pathlib import Path

import pytest

from timm_smpconv._validate import check_choice, check_int, check_kernel_size, check_positive, square_size

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_smpconv'


def test_check_int():
    assert check_int('depth', 3) == 3
    assert check_int('num_classes', 0, minimum=0) == 0
    with pytest.raises(ValueError, match='depth must be an int >= 1, got 0'):
        check_int('depth', 0)
    with pytest.raises(TypeError, match='depth must be an int, got bool'):
        check_int('depth', True)
    with pytest.raises(TypeError, match='depth must be an int, got float'):
        check_int('depth', 2.0)


def test_check_positive():
    assert check_positive('sigma', 2) == 2.0 and isinstance(check_positive('sigma', 2), float)
    for bad in (0, -1., math.nan, math.inf, True, '1'):
        with pytest.raises(ValueError, match='sigma must be a finite number > 0'):
            check_positive('sigma', bad)


def test_check_choice():
    assert check_choice('mode', 'none', ('stretch', 'none')) == 'none'
    with pytest.raises(ValueError, match=r"mode must be one of \('stretch', 'none'\), got 'extend'"):
        check_choice('mode', 'extend', ['stretch', 'none'])


def test_check_kernel_size():
    assert check_kernel_size(5, 2) == 5 and check_kernel_size((7, 7), 2) == 7 and check_kernel_size([4], 1) == 4
    assert check_kernel_size(4, 1) == 4  # 1-D kernels are causal: even lengths are fine
    with pytest.raises(ValueError, match='kernel_size must be an odd int >= 1, got 4'):
        check_kernel_size(4, 2)
    with pytest.raises(ValueError, match=r'kernel_size \(the horizon\) must be an odd int >= 3, got 1'):
        check_kernel_size(1, 2, minimum=3, what=' (the horizon)')
    with pytest.raises(ValueError, match='must be an int >= 2, got 1'):
        check_kernel_size(1, 1, minimum=2)
    with pytest.raises(ValueError, match=r'one int or 2 equal ints .* got \(5, 7\)'):
        check_kernel_size((5, 7), 2)
    with pytest.raises(ValueError, match=r'must be one int, got \(5, 5\)'):
        check_kernel_size((5, 5), 1)
    with pytest.raises(TypeError, match='small_kernel_size must be an int, got float'):
        check_kernel_size(5.0, 2, 'small_kernel_size')


def test_square_size():
    assert square_size(32) == 32 and square_size((16, 16)) == 16
    with pytest.raises(ValueError, match=r'img_size must be square .* got \(32, 16\)'):
        square_size((32, 16))
    with pytest.raises(ValueError, match='source_img_size must be an int >= 1, got 0'):
        square_size(0, 'source_img_size')


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield '.' * node.level + (node.module or '')
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_layers_know_no_model():
    """layers/ holds building blocks: nothing in it imports a model family or the whole-model helpers,
    and none reads a model attribute such as img_size."""
    for path in (PACKAGE / 'layers').glob('*.py'):
        for mod in _imports(path):
            assert not mod.startswith(('..models', '..resolution', '..regularizers', 'timm_smpconv.models')), \
                f'{path.name} imports {mod}'
        assert 'img_size' not in path.read_text(), f'{path.name} mentions img_size'


def test_model_families_import_no_private_helper_of_another():
    """models/*.py share code through models/_builder.py only, never through each other's private names."""
    families = {p.stem for p in (PACKAGE / 'models').glob('*.py') if not p.stem.startswith('_')}
    for path in (PACKAGE / 'models').glob('*.py'):
        if path.stem == '__init__':
            continue
        for mod in _imports(path):
            assert mod.lstrip('.') not in families - {path.stem}, f'{path.name} imports from {mod}'
