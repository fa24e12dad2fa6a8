""" The benchmark scripts (benchmarks/*.py) and their shared module (benchmarks/harness.py): the suite's report
(benchmarks/run.py) from given measurements, the shared timers and options, and every script run end to end
at smoke size, writing results files shaped like the committed ones in benchmarks/results/. The measurements
themselves run with `python benchmarks/<script>.py`. """
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
RUN = BENCH / 'run.py'
SMOKE_NOTE = ' (smoke run: tiny sizes, not a measurement)'


@pytest.fixture
def bench(monkeypatch):
    """Loads benchmarks/NAME.py as a module (with benchmarks/ on the path, as when a script runs); torch's
    thread count, which the scripts set, is restored afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()

    def load(name):
        spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    yield load
    torch.set_num_threads(threads)


def _row(step, lat, rep, **extra):
    return dict(params=1000, train_batch=8, size=224, train_step_s=step, train_img_s=8 / step,
                latency_ms=lat, latency_reparam_ms=rep, infer_img_s=10.0, peak_rss_mb=100.0, **extra)


def test_report_has_every_ratio(bench, tmp_path):
    run = bench('run')
    rows = {'smpconv_t': _row(3.0, 120.0, 100.0, render_share=0.002, render_s=0.05, step32_s=25.0),
            'convnext_tiny': _row(2.0, 80.0, 80.0), 'resnet50': _row(1.5, 70.0, 70.0),
            'smpconv_mobile31': _row(1.0, 50.0, 40.0)}
    pairs = {
        'smpconv_t:convnext_tiny:channels_last': dict(
            a='smpconv_t', b='convnext_tiny', format='channels_last', train_ratio=1.25, train_a_s=2.5,
            train_b_s=2.0, latency_ratio=1.2, latency_a_ms=96.0, latency_b_ms=80.0),
        'flexnet_16:smp_flexnet_16:nchw': dict(
            a='flexnet_16', b='smp_flexnet_16', format='nchw', train_ratio=1.1, train_a_s=3.3, train_b_s=3.0),
        'smpconv_mobile31:resnet50:nchw': dict(
            a='smpconv_mobile31', b='resnet50', format='nchw', train_ratio=0.5, train_a_s=1.0, train_b_s=2.0),
    }
    md, png = tmp_path / 'b.md', tmp_path / 'b.png'
    run.write_report(rows, pairs, 2, md, png)
    text = md.read_text()
    assert png.stat().st_size > 1000
    assert '| smpconv_t / convnext_tiny training step (batch 8, 224 px) | channels_last | 1.25x (2.50 s / 2.00 s)' in text
    assert 'both reparameterized (batch 1, 224 px) | channels_last | 1.20x (96.0 ms / 80.0 ms)' in text
    assert 'masks grown (batch 64, 32 px) | nchw | 1.10x (3.00 s / 3.30 s per step) | >= 3x' in text
    assert '| smpconv_mobile31 / resnet50 training step | nchw | 0.50x |' in text  # a pair given on the command line
    assert 'separate processes' not in text  # every ratio is of an interleaved run
    assert '0.20% (50 ms of 25.00 s)' in text


# ---- the shared module

def test_median_time_takes_the_median_of_reps_after_warmup(bench):
    harness = bench('harness')
    sleeps = iter([0.3, 0.0, 0.05, 0.2])  # one warm-up (the slow one), then three timed calls
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(sleeps))

    t = harness.median_time(fn, warmup=1, reps=3)
    assert len(calls) == 4
    assert 0.05 <= t < 0.2


def test_op_time_runs_at_the_current_thread_count(bench):
    """torch.utils.benchmark.Timer runs on one thread unless told otherwise; op_time keeps the scripts' --threads."""
    harness = bench('harness')
    seen = set()
    torch.set_num_threads(2)
    t = harness.op_time(lambda: seen.add(torch.get_num_threads()) or time.sleep(1e-3), min_run_time=0.05)
    assert seen == {2} and 1e-3 <= t < 0.05


def test_interleaved_times_alternate_the_order_each_round(bench):
    harness = bench('harness')
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in 'abc'}
    times = harness.interleaved_times(fns, warmup=1, rounds=3)
    assert ''.join(calls) == 'abc' + 'abc' + 'cba' + 'abc'
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3, 'c': 3}
    medians = harness.interleaved_medians(fns, 0, 3, scale=1e3)
    assert set(medians) == set('abc') and all(v >= 0 for v in medians.values())


def test_shared_options(bench, tmp_path, capsys):
    harness = bench('harness')
    parser = harness.bench_parser('doc', 'x.md', reps=4)
    args = harness.parse_args(parser, ['--threads', '1'])
    assert (args.reps, args.threads, args.out, args.smoke) == (4, 1, harness.RESULTS / 'x.md', False)
    assert torch.get_num_threads() == 1
    args = harness.parse_args(parser, ['--smoke', '--out', str(tmp_path / 'y.md')])
    assert (args.reps, args.out) == (1, tmp_path / 'y.md')
    for flag in ('--reps', '--threads'):
        with pytest.raises(SystemExit):
            harness.parse_args(parser, [flag, '0'])
        assert f'argument {flag}: must be at least 1, got 0' in capsys.readouterr().err
    assert not hasattr(harness.parse_args(harness.bench_parser('doc', 'x.md', threads=False), []), 'threads')
    path = harness.write_results(tmp_path / 'new' / 'r.md', ['a', 'b'])
    assert path.read_text() == 'a\nb\n'


# ---- every script at smoke size: results shaped like the committed ones

def _tables(text):
    """[(header cells, [row cells])] of the markdown tables in text."""
    lines, tables = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith('|---'):
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith('| '):
                    break
                rows.append(row.strip('| ').split(' | '))
            tables.append((lines[i - 1].strip('| ').split(' | '), rows))
    return tables


def _structure(text):
    """What a results file's format fixes: headings, the machine / command line and the table headers, with the
    smoke note dropped and every word holding a digit (numbers, versions, the processor) read as N."""
    lines = text.replace(SMOKE_NOTE, '').splitlines()
    keep = [line for i, line in enumerate(lines) if line.startswith(('#', '|---')) or 'Command: `' in line
            or (i + 1 < len(lines) and lines[i + 1].startswith('|---'))]
    return [re.sub(r'\S*\d\S*', 'N', line) for line in keep]


# script, its committed results file, extra arguments, rows of each table, columns holding timings
SMOKE_RUNS = [
    ('conv_paths', 'conv_paths.md', [], None, {0: [4, 5, 6, 7]}),
    ('conv1d_paths', 'conv1d_paths.md', [], [4], {0: [2, 3, 4, 5]}),
    ('kernel_generation', 'kernel_generation.md', [], [2, 2], {0: [2, 3]}),
    ('sequence', 'sequence.md', [], [3], {0: [5]}),
    ('support_crop', 'support_crop.md', [], [2], {0: [2, 3]}),
    ('reparam_latency', 'reparam.md', ['--models', 'smpconv_mobile31'], [1], {0: [4, 5]}),
    ('train_digits', 'digits.md', [], [1], {}),
    ('bn_stats', 'bn_stats.md', [], None, {1: [3]}),
    ('timeseries', 'timeseries.md', [], [3], {}),
    ('run', 'benchmark.md', ['--models', 'flexnet_16@init', '--pairs'], [1, 0], {0: [3, 5, 6]}),
    ('memory', 'memory.md', [], [8, 10, 12, 12, 5], {0: [2, 3, 4, 5], 2: [2, 3], 4: [2]}),
    ('deploy', 'deploy.md', ['--models', 'smpconv_t', 'convnext_tiny'], [2, 3, 2, 8, 8], {0: [2, 3, 4, 5, 6, 7], 2: [2, 3]}),
    ('bn_kernel_scale', 'bn_kernel_scale.md', ['--models', 'smp_flexnet_16'], [1], {0: [1, 3]}),
]


@pytest.mark.parametrize('script,committed,extra,rows,timings', SMOKE_RUNS, ids=[r[0] for r in SMOKE_RUNS])
def test_script_smoke_run(bench, tmp_path, script, committed, extra, rows, timings):
    mod = bench(script)
    out = tmp_path / committed
    mod.main(['--smoke', '--threads', '1', '--out', str(out)] + extra)
    text = out.read_text()
    assert text.splitlines()[0].endswith(SMOKE_NOTE)
    assert _structure(text) == _structure((BENCH / 'results' / committed).read_text())
    assert re.search(r'\b1 threads\b', text)
    tables = _tables(text)
    if script == 'conv_paths':
        rows = [2 * len(mod.SHAPES), len(mod.GRIDS)]
    if script == 'bn_stats':  # a smoke run measures one preset and two fixes
        rows = [len(tables[0][1]), 2]
        assert rows[0] > 0
    assert [len(r) for _, r in tables] == rows
    for header, body in tables:
        assert all(len(cells) == len(header) for cells in body)
    for t, cols in timings.items():
        for cells in tables[t][1]:
            assert all(float(cells[c]) >= 0 for c in cols), cells
    if script == 'run':
        assert out.with_suffix('.png').stat().st_size > 1000
    if script == 'train_digits':
        assert tables[0][1][0][0] == '1'  # one epoch


def test_digits_spread_smoke_run(bench, tmp_path):
    """The figures docs/training.md quotes for `python train_imagenet.py --epochs 3` (seeds x thread counts) and
    the check of tests/test_bn_recalibrate.py, at smoke size: one seed, one thread count."""
    out = tmp_path / 'digits_spread.md'
    bench('digits_spread').main(['--smoke', '--threads-list', '1', '--seeds', '0', '--out', str(out)])
    text = out.read_text()
    assert text.splitlines()[0].endswith(SMOKE_NOTE)
    assert _structure(text) == _structure((BENCH / 'results' / 'digits_spread.md').read_text())
    tables = _tables(text)
    assert [len(r) for _, r in tables] == [1, 1, 1]
    assert tables[0][1][0][:2] == ['1', '0'] and all(0 <= float(c) <= 100 for c in tables[0][1][0][2:])
    assert re.search(r'Largest gap: \d+\.\d\d points', text)


def test_run_pair_worker_smoke(bench):
    """A ratio run of two ImageNet models at smoke size: training-step and batch-1 latency ratios."""
    run = bench('run')
    torch.set_num_threads(1)
    r = run.pair_worker('smpconv_mobile31:resnet50:channels_last', 1, smoke=True)
    assert (r['a'], r['b'], r['format']) == ('smpconv_mobile31', 'resnet50', 'channels_last')
    assert r['train_ratio'] > 0 and r['latency_ratio'] > 0 and r['latency_a_ms'] > 0


def test_gpu_check_smoke_run(tmp_path):
    """`bash benchmarks/gpu_check.sh OUTDIR --smoke`, the prepared GPU command at tiny sizes on the CPU: every step
    runs and reports ok (the CIFAR step where the archive is present), within the 8 files the device tool returns;
    benchmarks/gpu.py writes every section (eager and compiled, with aot_eager here; Triton's interpreter left out
    of it, too slow), the Triton sweep its table and settings (which the kernels read), the trainer stops after 2
    of 3 epochs and resumes to the end."""
    out = tmp_path / 'gpu'
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(['bash', str(BENCH / 'gpu_check.sh'), str(out), '--smoke'], env=env, cwd=BENCH.parent,
                          timeout=1200, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / 'gpu_check.log').read_text()
    status = dict(line[3:].split(': ', 1) for line in proc.stdout.splitlines() if line.startswith('## '))
    steps = ['tests', 'gpu.py', 'triton_sweep', 'triton-settings', 'train-eager', 'train-resume']
    cifar = (BENCH.parent.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz').exists()
    for name in steps + (['cifar10'] if cifar else []):
        assert status.get(name, '').startswith('ok'), (name, status, log[-3000:])
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert {'gpu_check.log', 'pytest.log', 'gpu.md', 'triton_sweep.md', 'triton_configs.json', 'train.log'} <= set(files)
    assert 'torch ' in log and 'timm ' in log  # the environment
    assert json.loads((out / 'triton_configs.json').read_text()) is not None
    train = (out / 'train.log').read_text()
    assert 'Epoch 1:' in train and 'Epoch 2:' in train and 'resum' in train.lower()
    text = (out / 'gpu.md').read_text()
    assert text.startswith('# GPU benchmark' + SMOKE_NOTE)
    rows = {line.split(' | ')[0]: line for line in text.splitlines() if line.startswith('| ')}
    for name in ('smpconv_mobile31', 'smp_flexnet_16'):
        cells = rows[f'| {name}'].strip('| ').split(' | ')
        assert float(cells[1]) >= 0 and cells[2] != '-'  # eager and compiled throughput measured
    layer = [line for line in text.splitlines() if line.startswith('| stage 1 |')]
    assert len(layer) == 2 and all(float(line.split(' | ')[3]) > 0 and float(line.split(' | ')[4]) > 0 for line in layer)
    assert '| smp_flexnet_16 / flexnet_16 training throughput, eager | - |' in text  # flexnet_16 not run
    assert 'Device: ' in text and "conv impl 'auto'" in text


# ---- the papers' CIFAR-10 experiments (benchmarks/crossres.py, benchmarks/cifar10.py) at smoke size, on a subset of
# the real data (skipped, naming the file, where ../shared/data is absent)

@pytest.fixture
def cifar_archive(bench):
    archive = bench('harness').CIFAR10_ARCHIVE
    if not archive.is_file():
        pytest.skip(f'{archive} is absent (the CIFAR-10 JPEG archive beside the repository)')
    return archive


def test_crossres_smoke_run(bench, cifar_archive, tmp_path):
    """Three settings trained at 16 px through the trainer, each checkpoint reloaded at 16 and 32 px (the reloaded
    16-px top-1 equal to the run's, the 32-px model equal to retarget_resolution's: the script raises otherwise)."""
    out = tmp_path / 'crossres.md'
    bench('crossres').main(['--smoke', '--threads', '1', '--out', str(out)])
    text = out.read_text()
    assert text.splitlines()[0].endswith(SMOKE_NOTE) and re.search(r'\b1 threads\b', text)
    runs, summary = _tables(text)
    assert [r[0] for r in runs[1]] == ['none', 'gabor', 'gabor+mask'] and [r[0] for r in summary[1]] == \
        ['none', 'gabor', 'gabor+mask']
    for cells in runs[1]:
        top16, top32, change = (float(c.rstrip('%')) for c in cells[2:5])
        assert abs(top32 - top16 - change) < 0.02 and cells[6] == '17' and float(cells[8]) <= 1e-4
    assert summary[1][0][3:] == ['FlexNet-16 w/o reg.', '86.4 +- 0.4', '-34.4 +- 14.3']
    assert re.search(r'the claim (holds|does not hold|is not tested) at this budget', text)


def test_cifar10_smoke_run(bench, cifar_archive, tmp_path):
    """The three models through the trainer (subprocesses), test top-1 per epoch and training images/s."""
    out = tmp_path / 'cifar10.md'
    bench('cifar10').main(['--smoke', '--threads', '1', '--out', str(out), '--fixed-radius', '--n-points', '8'])
    text = out.read_text()
    assert text.splitlines()[0].endswith(SMOKE_NOTE) and 'Device: CPU.' in text
    assert "`--model-kwargs n_points=8 conv_kwargs={'learn_radius': False}`" in text
    (header, rows), = _tables(text)
    assert [r[0] for r in rows] == ['smp_flexnet_16', 'flexnet_16', 'ckcnn_16']
    assert all(float(r[5].replace(',', '')) > 0 for r in rows) and [r[4] for r in rows] == ['93.0', '92.2', '72.1']
    assert re.search(r'smp_flexnet_16 / flexnet_16: \d+\.\d\dx', text)


def test_cifar10_options(bench):
    cifar10 = bench('cifar10')
    assert [cifar10.warmup_epochs('smp_flexnet_16', e) for e in (1, 2, 30, 210)] == [0, 1, 1, 10]
    assert [cifar10.warmup_epochs('flexnet_16', e) for e in (30, 350)] == [1, 5]
    args = argparse.Namespace(fixed_points=True, fixed_radius=False, point_std=0.2, radius=None, n_points=None)
    assert cifar10.smp_kwargs(args) == ["conv_kwargs={'learn_points': False, 'point_std': 0.2}"]
    with pytest.raises(SystemExit):
        cifar10.main(['--out', '/dev/null'])  # no budget
    torch.set_num_threads(1)
    epochs, img_s = cifar10.probe_epochs('flexnet_16', 10, 1000, 100, argparse.Namespace(batch_size=4, amp=False))
    assert isinstance(epochs, int) and epochs >= 1 and img_s > 0  # --minutes: epochs from timed steps
    assert cifar10.probe_epochs('flexnet_16', 1e-3, 1000, 100, argparse.Namespace(batch_size=4, amp=False))[0] == 1
