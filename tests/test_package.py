""" Packaging, quick start and CI wiring. """
import re
import subprocess
import sys
from pathlib import Path

from timm_smpconv import demo

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / 'README.md').read_text()
    block = re.search(r'## Quick start.*?```bash\n(.*?)```', text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith('#')]


def test_readme_has_two_quick_start_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    test_cmd = next(c for c in commands if 'pytest' in c)
    ci_lines = [l for l in (ROOT / '.ci' / 'run').read_text().splitlines() if l and not l.startswith('#')]
    assert test_cmd in ci_lines
    assert 'train_imagenet.py' in next(c for c in commands if 'pytest' not in c)


def test_constraints_pin_torch_and_torchvision_but_requirements_stay_loose():
    pins = dict(l.split('==') for l in (ROOT / 'constraints.txt').read_text().splitlines()
                if '==' in l and not l.startswith('#'))
    assert pins['torch'] == '2.14.1' and pins['torchvision'] == '0.29.1'
    pyproject = (ROOT / 'pyproject.toml').read_text()
    deps = re.search(r'dependencies = \[(.*?)\]', pyproject, re.S).group(1)
    assert '==' not in deps and all(n in deps for n in ('torch', 'torchvision', 'timm', 'fvcore'))


def test_demo_prints_params_and_identical_outputs(capsys):
    rel = demo.main(['--channels', '8', '--kernel-size', '13', '--depth', '2', '--img-size', '32', '--batch-size', '2'])
    out = capsys.readouterr().out
    assert rel <= 1e-5
    assert 'parameters (continuous kernels)' in out and 'parameters (reparameterized)' in out
    assert 'modules left after reparameterization: Conv2d, GELU, LargeKernelConv2d' in out
    assert 'outputs identical (relative error <= 1e-5): yes' in out


def test_demo_runs_as_module():
    res = subprocess.run([sys.executable, '-m', 'timm_smpconv.demo', '--channels', '4', '--kernel-size', '7',
                          '--depth', '1', '--img-size', '16'], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert 'max relative error' in res.stdout
