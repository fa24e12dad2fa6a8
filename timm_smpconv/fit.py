""" SMP function fitting (SMPConv paper Sec. 4.1, Fig. 3): moving points against fixed points.

    python -m timm_smpconv.fit [--steps 3000] [--points 204] [--grid 51] [--points-lr 1e-3 3e-3 1e-2]
        [--out-dir benchmarks/results] [--threads 1]

One SMP kernel (our `render_smp_kernel`, count-normalised as the paper's Eq. 1: a weighted average of
the tents covering each sample) of `--points` points is fitted to a target function sampled on a
`--grid` x `--grid` grid over [-1, 1]^2, minimising the mean squared error over the grid:
  * fixed points: positions on a regular rows x cols lattice (cell centres; 204 = 12 x 17, the factor
    pair closest to square), never updated; point weights and radii learned;
  * moving points: the same start, the same weights and radii learning, and the positions learned too.
So the number of points and everything else is equal; the only difference is whether the points move.

The paper names its two targets only "sinusoidal-based". Ours are of that kind (x: column, y: row):
  * product  f(x, y) = sin(2 pi x) cos(2 pi y): the same level of detail everywhere;
  * chirp    f(x, y) = sin(3 pi (x^2 + y^2)): a radial chirp, detail growing towards the corners.

Recipe (ours; the paper gives none): full-batch Adam for `--steps` steps with cosine decay to 0; learning
rates 3e-2 for the point weights, 1e-3 for the radii (clamped to [1e-4, 1] after each step, as the SMP
authors clamp them), and each of `--points-lr` for the positions (moving fits); weights start at 0, radii
at the lattice's row + column spacing (so each sample is covered by its four nearest points).

Writes `fit.md` (final MSE of every fit, steps, wall time, the verdict on the paper's claim) and `fit.png`
(per target: target, moving fit, fixed fit, point positions) to `--out-dir`.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .layers.smp import render_smp_kernel

__all__ = ['TARGETS', 'lattice_points', 'fit_smp', 'run', 'main']

# name -> (formula as written in the results, function of (x, y))
TARGETS: Dict[str, Tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    'product': ('sin(2 pi x) cos(2 pi y)', lambda x, y: torch.sin(2 * math.pi * x) * torch.cos(2 * math.pi * y)),
    'chirp': ('sin(3 pi (x^2 + y^2))', lambda x, y: torch.sin(3 * math.pi * (x * x + y * y))),
}
WEIGHT_LR = 3e-2
RADIUS_LR = 1e-3
RADIUS_RANGE = (1e-4, 1.0)


def lattice_shape(n_points: int) -> Tuple[int, int]:
    """(rows, cols) with rows * cols = n_points, rows <= cols as close as possible (204 -> 12 x 17)."""
    rows = max(r for r in range(1, math.isqrt(n_points) + 1) if n_points % r == 0)
    return rows, n_points // rows


def lattice_points(n_points: int) -> torch.Tensor:
    """(n_points, 2) (row, col) positions at the cell centres of a regular rows x cols lattice on [-1, 1]^2."""
    rows, cols = lattice_shape(n_points)
    r = (torch.arange(rows) + 0.5) / rows * 2 - 1
    c = (torch.arange(cols) + 0.5) / cols * 2 - 1
    grid_r, grid_c = torch.meshgrid(r, c, indexing='ij')
    return torch.stack([grid_r.flatten(), grid_c.flatten()], -1)


def target_grid(name: str, grid: int) -> torch.Tensor:
    """The target sampled at (row y, column x) on linspace(-1, 1, grid) per axis ('ij')."""
    lin = torch.linspace(-1., 1., grid)
    y, x = torch.meshgrid(lin, lin, indexing='ij')
    return TARGETS[name][1](x, y)


def fit_smp(target: torch.Tensor, n_points: int, steps: int, points_lr: Optional[float]) -> Dict:
    """Fit one count-normalised SMP kernel to `target` (k x k); points_lr None keeps the positions fixed.

    Returns dict(mse, steps, seconds, points (Np, 2), radius (Np,), weight (Np,), fit (k, k),
    history [(step, mse)])."""
    k = target.shape[-1]
    rows, cols = lattice_shape(n_points)
    points = lattice_points(n_points).unsqueeze(0)  # (1, Np, 2): one kernel
    radius = torch.full((1, n_points), 2. / rows + 2. / cols)
    weight = torch.zeros(1, 1, n_points)
    groups = [dict(params=[weight.requires_grad_()], lr=WEIGHT_LR), dict(params=[radius.requires_grad_()], lr=RADIUS_LR)]
    if points_lr is not None:
        groups.append(dict(params=[points.requires_grad_()], lr=points_lr))
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    start = time.perf_counter()
    for step in range(steps):
        loss = (render_smp_kernel(points, radius, weight, k, normalize=True)[0, 0] - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            radius.clamp_(*RADIUS_RANGE)
        if step % max(1, steps // 20) == 0:
            history.append((step, loss.item()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        fit = render_smp_kernel(points, radius, weight, k, normalize=True)[0, 0]
        mse = (fit - target).pow(2).mean().item()
    history.append((steps, mse))
    return dict(mse=mse, steps=steps, seconds=seconds, points=points[0].detach(), radius=radius[0].detach(),
                weight=weight[0, 0].detach(), fit=fit, history=history)


def run(steps: int = 3000, n_points: int = 204, grid: int = 51, points_lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
        targets: Sequence[str] = tuple(TARGETS)) -> Dict[str, Dict]:
    """Every target: one fixed-points fit and one moving-points fit per points learning rate.
    Returns {target: {'target': grid values, 'fixed': result, 'moving': {lr: result}}}."""
    results = {}
    for name in targets:
        target = target_grid(name, grid)
        results[name] = dict(target=target, fixed=fit_smp(target, n_points, steps, None),
                             moving={lr: fit_smp(target, n_points, steps, lr) for lr in points_lrs})
    return results


def _verdict(res: Dict, lrs: Sequence[float]) -> str:
    """Whether the moving fits beat the fixed one, over the points learning rates tried."""
    fixed = res['fixed']['mse']
    better = [lr for lr in lrs if res['moving'][lr]['mse'] < fixed]
    if len(better) == len(lrs):
        return 'confirmed (moving better at every points lr)'
    if not better:
        return 'not confirmed (fixed better at every points lr)'
    return 'mixed (moving better at points lr ' + ', '.join(f'{lr:g}' for lr in better) + ' only)'


def write_markdown(results: Dict, path: Path, command: str, n_points: int, grid: int, png_name: str,
                   load: float = 0.) -> str:
    rows, cols = lattice_shape(n_points)
    lrs = list(next(iter(results.values()))['moving'])
    lines = [
        '# SMP function fitting: moving points against fixed points (SMPConv paper Sec. 4.1, Fig. 3)',
        '',
        f'Command: `{command}`; torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; load average '
        f'{load:.1f} on {os.cpu_count()} cores at the start (wall times are shared-machine times).',
        '',
        f'One count-normalised SMP kernel of {n_points} points fitted to each target on a {grid} x {grid} grid '
        f'over [-1, 1]^2 (mean squared error over the grid, full-batch Adam, cosine decay). Fixed: positions on a '
        f'regular {rows} x {cols} lattice, weights and radii learned. Moving: the same start and the same '
        f'weight / radius learning, positions learned too (points lr as listed). Weights lr {WEIGHT_LR:g}, radii lr '
        f'{RADIUS_LR:g}. The targets are ours: the paper names only "sinusoidal-based" functions (x: column, y: row).',
        '',
        '| target | f(x, y) | variance of f | fit | points lr | steps | final MSE | fixed MSE / this MSE | wall s |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for name, res in results.items():
        formula = TARGETS[name][0]
        var = res['target'].var(unbiased=False).item()
        f = res['fixed']
        lines.append(f'| {name} | {formula} | {var:.4f} | fixed | - | {f["steps"]} | {f["mse"]:.3e} | 1.00 | '
                     f'{f["seconds"]:.1f} |')
        for lr, m in res['moving'].items():
            lines.append(f'| {name} | {formula} | {var:.4f} | moving | {lr:g} | {m["steps"]} | {m["mse"]:.3e} | '
                         f'{f["mse"] / max(m["mse"], 1e-30):.2f} | {m["seconds"]:.1f} |')
    lines += ['', 'The paper\'s claim, "at an equal number of points, moving points approximate better":', '']
    for name, res in results.items():
        fixed_mse = res['fixed']['mse']
        ratios = ', '.join(f'{fixed_mse / max(m["mse"], 1e-30):.2f}' for m in res['moving'].values())
        lines.append(f'- {name}: {_verdict(res, lrs)}; fixed MSE / moving MSE {ratios} at points lr '
                     f'{", ".join(f"{lr:g}" for lr in lrs)}.')
    lines += ['', f'Picture: [{png_name}]({png_name}) (per target: the target, the moving fit at points lr {lrs[0]:g}, the '
              'fixed fit, and the point positions: the moving points at the end as dots sized by their radius, the fixed '
              'lattice as crosses).', '']
    text = '\n'.join(lines)
    path.write_text(text)
    return text


def plot(results: Dict, path: Path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 4, figsize=(13, 3.3 * len(names)), squeeze=False)
    extent = (-1, 1, -1, 1)
    for row, name in enumerate(names):
        res = results[name]
        lr = next(iter(res['moving']))
        moving, fixed = res['moving'][lr], res['fixed']
        vmin, vmax = res['target'].min().item(), res['target'].max().item()
        panels = [('target: ' + TARGETS[name][0], res['target']),
                  (f'moving points, MSE {moving["mse"]:.2e}', moving['fit']),
                  (f'fixed points, MSE {fixed["mse"]:.2e}', fixed['fit'])]
        for col, (title, img) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img.numpy(), origin='lower', extent=extent, cmap='viridis', vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[row, 3]
        fp, mp = fixed['points'], moving['points']
        ax.scatter(fp[:, 1], fp[:, 0], marker='x', s=12, c='0.6', label='fixed')
        sizes = (moving['radius'] / moving['radius'].max() * 30).clamp(min=2)
        ax.scatter(mp[:, 1], mp[:, 0], s=sizes, c='tab:red', label='moving')
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_aspect('equal')
        ax.set_title('point positions', fontsize=9)
        ax.legend(fontsize=7, loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
    return value


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict]:
    parser = argparse.ArgumentParser(prog='python -m timm_smpconv.fit', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=_positive_int, default=3000, help='optimizer steps per fit (default: 3000)')
    parser.add_argument('--points', type=_positive_int, default=204, help='SMP points (default: 204, the paper\'s)')
    parser.add_argument('--grid', type=_positive_int, default=51, help='samples per axis (default: 51, the paper\'s)')
    parser.add_argument('--points-lr', type=_positive_float, nargs='+', default=[1e-3, 3e-3, 1e-2],
                        help='learning rates of the moving points\' positions; the first is the headline and the '
                             'picture (default: 1e-3 3e-3 1e-2)')
    parser.add_argument('--targets', nargs='+', choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument('--out-dir', type=Path, default=Path('benchmarks') / 'results',
                        help='where fit.md and fit.png go (default: benchmarks/results)')
    parser.add_argument('--threads', type=_positive_int, default=1,
                        help='torch CPU threads (default: 1; the tensors are small)')
    args = parser.parse_args(argv)
    if args.grid < 2:
        parser.error('--grid must be at least 2')
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    results = run(args.steps, args.points, args.grid, args.points_lr, args.targets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else list(argv)
    command = ' '.join(['python -m timm_smpconv.fit'] + given)
    plot(results, args.out_dir / 'fit.png')
    print(write_markdown(results, args.out_dir / 'fit.md', command, args.points, args.grid, 'fit.png', load))
    return results


if __name__ == '__main__':
    main()
