""" The linter: ruff (configured in pyproject.toml: pyflakes, pycodestyle, import sorting) over the repository. """
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    pytest.importorskip('ruff')  # in the dev extra
    res = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
