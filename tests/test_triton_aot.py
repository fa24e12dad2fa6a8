""" The Triton kernels compiled ahead of time for real GPUs on this CPU machine (`pytest -k aot`): every launch
configuration the backend makes for the large-kernel convs of every registered model compiles for sm_80, sm_90
and sm_100 (where the triton wheel's ptxas has it) within the architecture's limits and on tensor cores. """
from pathlib import Path

import pytest
import timm
import torch

from timm_smpconv import triton_aot

REASON = triton_aot.tools_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f'no ahead-of-time compile: {REASON}')
DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'performance.md'


def _over_the_limits():
    """Two launches that break the checks on sm_80: the kernel gradient with 4 warps for the 51 x 51 tile (it spills:
    the reason it gets 8) and the float32 forward without TF32 (FMA units, no tensor-core instruction)."""
    from timm_smpconv.ops import triton_dwconv as k
    x = torch.empty(2, 64, 56, 56, device='meta')
    launch = k.weight_grad_launch(x, x, 51, 51, arch=80)
    assert launch.kwargs['num_warps'] == 8
    four = launch._replace(kwargs={**launch.kwargs, 'num_warps': 4})
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        ieee = k.forward_launch(x[:, :, :14, :14], torch.empty(64, 1, 13, 13, device='meta'), None,
                                torch.empty(2, 64, 14, 14, device='meta'), arch=80)
    return [triton_aot.AotConfiguration('kernel grad', 'fp32', 'NCHW', {80: four}, ['test 51x51 on 56x56: kernel grad']),
            triton_aot.AotConfiguration('forward', 'fp32 ieee', 'NCHW', {80: ieee}, ['test 13x13 on 14x14: forward'])]


@pytest.fixture(scope='module')
def compiled():
    """Every configuration for every supported arch, and the two bad launches, in one pool of compiler processes."""
    archs = triton_aot.supported_archs()
    configs = triton_aot.aot_configurations(archs=archs)
    bad = _over_the_limits()
    reports = triton_aot.compile_configurations(configs + bad, archs)
    return archs, configs, reports[:len(configs)], reports[len(configs):]


def test_aot_every_configuration_compiles_within_the_limits_on_tensor_cores(compiled):
    archs, configs, reports, _ = compiled
    assert {80, 90} <= set(archs)
    bad = []
    for c, row in zip(configs, reports):
        for r in row:
            if r.registers > 255 or r.spill_stores or r.spill_loads or r.shared > r.shared_limit or not r.tensor_core:
                bad.append(f'{c.describe()} on sm_{r.arch}: {r}')
            assert 0 < r.occupancy <= 1
    assert not bad, '\n'.join(bad)


def test_aot_covers_every_large_kernel_conv_direction_dtype_and_layout(compiled):
    archs, configs, _, _ = compiled
    covered = {(u, c.precision, c.layout) for c in configs for u in c.uses}
    expected = set()
    for name in ('smpconv_t', 'smpconv_b', 'smpconv_mobile31', 'smpconv_mobile51'):
        model = timm.create_model(name, device='meta')
        h = model.pretrained_cfg['input_size'][-1] // 4
        for i, k in enumerate(model.kernel_sizes):
            where = f'{name} {k}x{k} on {h >> i}x{h >> i}'
            for direction in ('forward', 'input grad', 'kernel grad', 'forward +bias'):  # +bias: reparameterized
                for prec, _, _ in triton_aot.PRECISIONS:
                    for layout in ('NCHW', 'channels_last'):
                        expected.add((f'{where}: {direction}', prec, layout))
    assert expected <= covered, sorted(expected - covered)[:5]
    # the other models have no depthwise large-kernel convs (FlexConv and SMP FlexNet convs are full, the
    # sequence models' 1-D): nothing else reaches the Triton backend
    assert {u.split(' ')[0] for c in configs for u in c.uses} == {'smpconv_t', 'smpconv_b', 'smpconv_mobile31',
                                                                  'smpconv_mobile51'}


def test_aot_table_in_the_docs_is_what_the_script_writes(compiled):
    archs, configs, reports, _ = compiled
    text = DOCS.read_text()
    block = triton_aot.docs_block(configs, reports)
    lines = text.split('\n')
    documented = lines[lines.index(triton_aot.DOCS_BEGIN):lines.index(triton_aot.DOCS_END) + 1]
    if documented[2] == block[2]:  # same triton version and configurations: the same numbers
        assert documented == block, 'docs/performance.md is stale: run python benchmarks/triton_aot.py'
    else:  # another triton: other register counts, but the same configurations
        assert [row.split(' | ')[:5] for row in documented[4:-2]] == [row.split(' | ')[:5] for row in block[4:-2]]
    assert triton_aot.replace_docs_block(text, block).count(triton_aot.DOCS_BEGIN) == 1


def test_aot_check_detects_spills_and_missing_tensor_cores(compiled):
    """The limits are real checks (`_over_the_limits`)."""
    (r_spill,), (r_fma,) = compiled[3]
    assert r_spill.arch == r_fma.arch == 80
    assert r_spill.spill_stores > 0 and r_spill.tensor_core
    assert r_fma.spill_stores == 0 and not r_fma.tensor_core and r_fma.mma == {}


def test_aot_occupancy_arithmetic():
    # sm_90: 128 threads at 96 registers -> 5 blocks by registers (65536 / (96 * 128)), 20 of 64 warps
    assert triton_aot.occupancy(90, 96, 9216, 4) == 20 / 64
    # shared memory binds: 100 KiB per block -> 2 blocks in 228 KiB
    assert triton_aot.occupancy(90, 32, 100 * 1024, 4) == 8 / 64
    assert triton_aot.occupancy(80, 255, 0, 8) == 8 / 64


def test_aot_script_smoke_run(tmp_path, monkeypatch):
    """`python benchmarks/triton_aot.py --smoke` writes a results file shaped like the committed one (one model,
    bf16, sm_80) and leaves the docs alone."""
    import importlib.util
    bench = Path(__file__).resolve().parents[1] / 'benchmarks'
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location('bench_triton_aot', bench / 'triton_aot.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = DOCS.read_text()
    out = tmp_path / 'triton_aot.md'
    configs, reports = mod.main(['--smoke', '--jobs', '1', '--out', str(out)])
    text = out.read_text()
    committed = (bench / 'results' / 'triton_aot.md').read_text()
    header = '| kernel | tile | dtype | layout | serves | sm_80 |'  # (the committed run: and sm_90, sm_100)
    assert text.startswith('# Triton kernels compiled ahead of time (smoke run') and header + '\n' in text
    assert committed.count(header) == 1
    rows = [line for line in text.splitlines() if line.startswith(('| forward |', '| kernel grad |'))]
    assert len(rows) == len(configs) > 0 and all(row.count(' | ') == 5 and 'regs' in row for row in rows)
    assert all(len(row) == 1 and row[0].tensor_core for row in reports)
    assert DOCS.read_text() == docs
