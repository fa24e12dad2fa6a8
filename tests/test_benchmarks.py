""" The benchmark suite's report (benchmarks/run.py) from given measurements: every ratio row present and
computed from the numbers it is given. The measurements themselves run with `python benchmarks/run.py`. """
import importlib.util
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / 'benchmarks' / 'run.py'


@pytest.fixture(scope='module')
def run():
    spec = importlib.util.spec_from_file_location('bench_run', RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(step, lat, rep, **extra):
    return dict(params=1000, train_batch=8, size=224, train_step_s=step, train_img_s=8 / step,
                latency_ms=lat, latency_reparam_ms=rep, infer_img_s=10.0, peak_rss_mb=100.0, **extra)


def test_report_has_every_ratio(run, tmp_path):
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
    assert '| smpconv_t / convnext_tiny training step (batch 8, 224 px) | 1.50x | <= 1.3x |' in text  # 3.0 / 2.0
    assert '| smpconv_t / resnet50 training step | 2.00x |' in text
    assert '0.20% (50 ms of 25.00 s)' in text


def test_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    """`benchmarks/gpu.py --device cpu --smoke` runs end to end and writes every section (tiny sizes; the
    compiled runs use aot_eager to keep the test short; Triton's interpreter is left out: too slow here)."""
    import os
    import subprocess
    import sys
    out = tmp_path / 'gpu.md'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    cmd = [sys.executable, str(RUN.parent / 'gpu.py'), '--device', 'cpu', '--smoke', '--models', 'smpconv_mobile31',
           'smp_flexnet_16', '--compile-backend', 'aot_eager', '--out', str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=RUN.parents[1], timeout=600, capture_output=True)
    text = out.read_text()
    assert text.startswith('# GPU benchmark (smoke run: tiny sizes, not a measurement)')
    rows = {line.split(' | ')[0]: line for line in text.splitlines() if line.startswith('| ')}
    for name in ('smpconv_mobile31', 'smp_flexnet_16'):
        cells = rows[f'| {name}'].strip('| ').split(' | ')
        assert float(cells[1]) >= 0 and cells[2] != '-'  # eager and compiled throughput measured
    assert float(rows['| smpconv_mobile31'].split(' | ')[1]) >= 0
    layer = [line for line in text.splitlines() if line.startswith('| stage 1 |')]
    assert len(layer) == 2 and all(float(line.split(' | ')[3]) > 0 and float(line.split(' | ')[4]) > 0 for line in layer)
    assert '| smp_flexnet_16 / flexnet_16 training throughput, eager | - |' in text  # flexnet_16 not run
    assert 'Device: ' in text and "conv impl 'auto'" in text
