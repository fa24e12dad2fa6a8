""" The README and docs/*.md stay true to the code: every command in them parses with the parser of the
script or module it names, every relative link and anchor resolves, every `timm_smpconv.` name exists, the
README's Python usage runs, and the README stays a front page (a size budget). """
import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_smpconv  # noqa: F401  (registers the models the pages name)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
PAGES = [README] + sorted((ROOT / 'docs').glob('*.md'))
README_BUDGET = 9000  # bytes

FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```[ \t]*$', re.S | re.M)
INLINE = re.compile(r'`([^`\n]+)`')
LINK = re.compile(r'!?\[[^\]\n]*\]\(([^)\s]+)\)')
SHELL_LANGS = ('', 'bash', 'sh', 'shell', 'console')
SEPARATORS = ('&&', '||', ';', '|')
ENV_ASSIGNMENT = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=')
PYTHON = re.compile(r'^(.*/)?python(3(\.\d+)?)?$')
PLACEHOLDER = re.compile(r'^[A-Z][A-Z0-9_]*$')  # NAME, DATA, FILE, PATH ...


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_fences(text: str) -> str:
    return FENCE.sub('', text)


def _shell_commands(page: Path):
    """(where, tokens) for every command in the page's shell code blocks and inline code spans."""
    text = page.read_text()
    sources = []
    for m in FENCE.finditer(text):
        if m.group(1).strip() in SHELL_LANGS:
            line = text[:m.start()].count('\n') + 2
            for i, cmd in enumerate(m.group(2).replace('\\\n', ' ').splitlines()):
                sources.append((f'{_rel(page)}, code block at line {line}, command {i + 1}', cmd))
    for m in INLINE.finditer(_without_fences(text)):
        span = m.group(1)
        first = span.split(' ', 1)[0]
        if PYTHON.match(first) or first in ('torchrun', 'train_imagenet.py'):
            sources.append((f'{_rel(page)}, inline `{span}`', span))
    commands = []
    for where, line in sources:
        tokens = shlex.split(line, comments=True)
        segment = []
        for tok in tokens + [';']:
            if tok in SEPARATORS:
                if segment:
                    commands.append((where, segment))
                segment = []
            else:
                segment.append(tok)
    out = []
    for where, segment in commands:
        while segment and ENV_ASSIGNMENT.match(segment[0]):
            segment = segment[1:]
        if segment and segment[0] == 'train_imagenet.py':
            segment = ['python'] + segment
        if segment and (PYTHON.match(segment[0]) or segment[0] == 'torchrun'):
            out.append((where, _strip_optional_marks(segment)))
    return out


def _strip_optional_marks(tokens):
    """`[--reparam]`, `[--checkpoint PATH]`, `[--layers ...]`: the usage notation for optional parts."""
    out = []
    for tok in tokens:
        if not tok:
            out.append(tok)  # an empty argument, e.g. --dataset ''
            continue
        tok = tok.lstrip('[').rstrip(']')
        if tok and tok != '...':
            out.append(tok)
    return out


ALL_COMMANDS = [c for page in PAGES for c in _shell_commands(page)]


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__('parsed')
        self.namespace = namespace


def _parse_with_main(main, argv):
    """Run `main(argv)` up to its argparse call and return the namespace (argparse errors: pytest.fail)."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    try:
        argparse.ArgumentParser.parse_args = parse_and_stop
        with contextlib.redirect_stderr(err):
            main(argv)
    except _Parsed as p:
        return p.namespace
    except SystemExit:
        pytest.fail(f'{argv} does not parse: {err.getvalue().strip()}')
    finally:
        argparse.ArgumentParser.parse_args = original
    pytest.fail(f'{main.__module__}.main({argv}) returned without parsing arguments')


def _check_model_name(name, where):
    if name is None or PLACEHOLDER.match(name):
        return
    arch = name.split('.')[0]
    assert timm.is_model(arch), f'{where}: unknown model {name!r}'
    if '.' in name:
        assert name in timm.list_models(arch, include_tags=True), f'{where}: model {arch!r} has no tag {name!r}'


def _check_train_imagenet(argv, where):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train_imagenet
    if '--help' in argv or '-h' in argv:
        return  # prints the flags and exits
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = train_imagenet.parse_args(argv)
    except SystemExit:
        pytest.fail(f'{where}: train_imagenet.py {" ".join(argv)}: {err.getvalue().strip()}')
    _check_model_name(args.model, where)


def _check_benchmark(script, argv, where):
    path = ROOT / script
    assert path.is_file(), f'{where}: {script} does not exist'
    bench_dir = str(path.parent)
    added = bench_dir not in sys.path
    if added:
        sys.path.insert(0, bench_dir)  # the scripts import their shared helpers with `from run import ...`
    try:
        spec = importlib.util.spec_from_file_location(f'_docs_{path.stem}', path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert hasattr(mod, 'main'), f'{where}: {script} has no main(argv)'
        _parse_with_main(mod.main, argv)
    finally:
        if added:
            sys.path.remove(bench_dir)


def _check_python_module(module, argv, where):
    if module == 'pytest':
        for arg in argv:
            if arg.startswith('tests/'):
                assert (ROOT / arg.split('::')[0]).is_file(), f'{where}: {arg} does not exist'
        return
    if not module.startswith('timm_smpconv'):
        return  # venv, pip ...: not ours
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    assert found, f'{where}: no module {module}'
    mod = importlib.import_module(module)
    assert hasattr(mod, 'main'), f'{where}: {module} has no main(argv) to run with -m'
    ns = _parse_with_main(mod.main, argv)
    _check_model_name(getattr(ns, 'model', None), where)


def _check_command(where, tokens):
    if tokens[0] == 'torchrun':
        from torch.distributed.run import get_args_parser
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = get_args_parser().parse_args(tokens[1:])
        except SystemExit:
            pytest.fail(f'{where}: torchrun arguments do not parse: {err.getvalue().strip()}')
        assert ns.training_script == 'train_imagenet.py', f'{where}: torchrun runs {ns.training_script}'
        return _check_train_imagenet(ns.training_script_args, where)
    if len(tokens) < 2:
        return  # a bare `python`
    if tokens[1] == '-m':
        return _check_python_module(tokens[2], tokens[3:], where)
    if tokens[1].startswith('-'):
        return  # python -c ...
    script = tokens[1]
    if script.endswith('train_imagenet.py'):
        return _check_train_imagenet(tokens[2:], where)
    if script.startswith('benchmarks/'):
        return _check_benchmark(script, tokens[2:], where)
    assert (ROOT / script).is_file(), f'{where}: {script} does not exist'


def test_commands_are_found():
    """The parser below sees the commands the pages hold (a regression here would make the next test vacuous)."""
    found = {' '.join(t[:2]) for _, t in ALL_COMMANDS}
    assert '.venv/bin/python train_imagenet.py' in found  # the README's quick start
    assert any(t[0] == 'torchrun' and '--rdzv_endpoint' in ' '.join(t) for _, t in ALL_COMMANDS)
    assert any(t[:3] == ['python', '-m', 'timm_smpconv.flops'] for _, t in ALL_COMMANDS)
    assert any(t[1].startswith('benchmarks/') for _, t in ALL_COMMANDS if len(t) > 1)


@pytest.mark.parametrize('where,tokens', ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_command_parses(where, tokens):
    _check_command(where, tokens)


def test_checker_rejects_wrong_commands():
    """The checks fail on what they should catch: an unknown flag, script, module and model."""
    bad = [
        ['python', 'train_imagenet.py', '--no-such-flag'],
        ['torchrun', '--nproc_per_node=2', 'train_imagenet.py', '--model', 'no_such_model'],
        ['python', '-m', 'timm_smpconv.flops', '--no-such-flag'],
        ['python', '-m', 'timm_smpconv.no_such_module'],
        ['python', 'benchmarks/no_such_script.py'],
        ['python', 'benchmarks/support_crop.py', '--no-such-flag'],
        ['python', 'train_imagenet.py', '--model', 'smp_tcn.no_such_tag'],
    ]
    for tokens in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            _check_command('test', tokens)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(page: Path):
    anchors, seen = set(), {}
    for m in re.finditer(r'^#{1,6}\s+(.+?)\s*#*$', _without_fences(page.read_text()), re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        anchors.add(s if n == 0 else f'{s}-{n}')
    return anchors


@pytest.mark.parametrize('page', PAGES, ids=[_rel(p) for p in PAGES])
def test_relative_links_resolve(page):
    problems = []
    for m in LINK.finditer(_without_fences(page.read_text())):
        target = m.group(1)
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition('#')
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f'{target}: no such file')
        elif anchor and dest.suffix == '.md' and anchor not in _anchors(dest):
            problems.append(f'{target}: no heading with anchor #{anchor} in {_rel(dest)}')
    assert not problems, f'{_rel(page)}: ' + '; '.join(problems)


def _resolve(dotted: str):
    parts = dotted.split('.')
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module('.'.join(parts[:i + 1]))
    return obj


@pytest.mark.parametrize('page', PAGES, ids=[_rel(p) for p in PAGES])
def test_timm_smpconv_names_exist(page):
    text = page.read_text()
    code = [m.group(2) for m in FENCE.finditer(text)] + INLINE.findall(_without_fences(text))
    names = sorted({n for c in code for n in re.findall(r'\btimm_smpconv(?:\.[A-Za-z_]\w*)+', c)})
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f'{_rel(page)} names what timm_smpconv does not have: {missing}'


def test_readme_usage_runs(tmp_path, monkeypatch):
    """The README's Python blocks, run in order as a user would, in a folder holding the files they load."""
    blocks = [m.group(2) for m in FENCE.finditer(README.read_text()) if m.group(1).strip() == 'python']
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        for m in re.finditer(r"create_model\(\s*'([^']+)'(?:(?!create_model).)*?file='([^']+)'", block, re.S):
            if not (tmp_path / m.group(2)).exists():
                torch.save(timm.create_model(m.group(1)).state_dict(), tmp_path / m.group(2))
    torch.manual_seed(0)
    namespace = {'__name__': '__readme__'}
    for block in blocks:
        exec(compile(block, str(README), 'exec'), namespace)


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_BUDGET, f'README.md is {size} bytes, over its {README_BUDGET}-byte budget: move detail to docs/'
    text = README.read_text()
    for page in sorted((ROOT / 'docs').glob('*.md')):
        assert f'](docs/{page.name})' in text, f'README.md does not link {_rel(page)}'
