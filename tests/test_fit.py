""" SMP function fitting (python -m timm_smpconv.fit; SMPConv paper Sec. 4.1): run at a small size, and the
committed full-size results shaped like what the script writes. """
import re
from pathlib import Path

import pytest
import torch

from timm_smpconv import fit
from timm_smpconv.layers.smp import render_smp_kernel

RESULTS = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
HEADER = '| target | f(x, y) | variance of f | fit | points lr | steps | final MSE | fixed MSE / this MSE | wall s |'


def test_lattice():
    assert fit.lattice_shape(204) == (12, 17) and fit.lattice_shape(12) == (3, 4) and fit.lattice_shape(7) == (1, 7)
    pts = fit.lattice_points(204)
    assert pts.shape == (204, 2) and pts.abs().max() < 1 and len({tuple(p) for p in pts.tolist()}) == 204
    assert sorted(set(pts[:, 0].tolist()))[:2] == pytest.approx([-11 / 12, -9 / 12])  # cell centres, 12 rows


def test_fit_cli_small(tmp_path, capsys):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        results = fit.main(['--steps', '60', '--points', '12', '--grid', '11', '--points-lr', '0.01', '0.001',
                            '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / 'fit.md').read_text()
    assert text in capsys.readouterr().out
    png = (tmp_path / 'fit.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    assert HEADER in text and '12 points' in text and '11 x 11 grid' in text and '3 x 4 lattice' in text
    assert set(results) == set(fit.TARGETS)
    for name, res in results.items():
        target = fit.target_grid(name, 11)
        fixed, moving = res['fixed'], res['moving']
        assert set(moving) == {0.01, 0.001}
        assert torch.equal(fixed['points'], fit.lattice_points(12))  # fixed: the positions never move
        assert not torch.equal(moving[0.01]['points'], fit.lattice_points(12))
        for r in [fixed, *moving.values()]:
            # the reported fit and MSE are what the returned points give (our SMP kernel, count-normalised)
            again = render_smp_kernel(r['points'][None], r['radius'][None], r['weight'].view(1, 1, 12), 11, normalize=True)
            assert torch.equal(again[0, 0], r['fit'])
            assert r['mse'] == pytest.approx((r['fit'] - target).pow(2).mean().item())
            assert r['mse'] < r['history'][0][1] and r['steps'] == 60
            assert f'{r["mse"]:.3e}' in text
        assert re.search(rf'- {name}: (confirmed|not confirmed|mixed)', text)
    with pytest.raises(SystemExit):
        fit.main(['--points', '0'])


def test_committed_results_are_the_full_size_run():
    text = (RESULTS / 'fit.md').read_text()
    assert 'Command: `python -m timm_smpconv.fit`' in text and HEADER in text
    assert '204 points' in text and '51 x 51 grid' in text and '12 x 17 lattice' in text
    rows = [line for line in text.splitlines() if line.startswith('| ') and ' | 3000 | ' in line]
    assert len(rows) == 2 * 4  # two targets: fixed and three points learning rates
    assert (RESULTS / 'fit.png').stat().st_size > 10_000
