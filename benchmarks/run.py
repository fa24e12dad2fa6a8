""" Benchmark suite: our models against timm's convnext_tiny and resnet50, measured in one run.

    python benchmarks/run.py [--threads 2] [--reps 3] [--models ...] [--quick]

Each model runs in its own process (so peak memory is its own) and reports:
  * training step (forward + backward + AdamW step) at the stated batch and resolution;
  * eval latency at batch 1, original and reparameterized (timm.utils.reparameterize_model);
  * eval throughput at batch 8 (reparameterized);
  * peak resident memory of the process.
ImageNet models: training batch 8 at 224 px; CIFAR models: batch 64 at 32 px (FlexNet with its masks
fully grown, the 33 x 33 state of a trained model, and at initialisation). For smpconv_t it also
measures the share of a batch-32 training step spent rendering SMP kernels and writes a profile.
Results: benchmarks/results/benchmark.md, benchmark.png, profile_smpconv_t.txt. Times are medians.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / 'results'
IMAGENET = ['smpconv_t', 'smpconv_mobile31', 'convnext_tiny', 'resnet50']
CIFAR = ['smp_flexnet_16', 'flexnet_16', 'flexnet_16@init']


def _median_time(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def worker(name: str, reps: int, threads: int, profile: bool) -> dict:
    import torch
    import timm
    from timm.utils import reparameterize_model
    import timm_smpconv  # noqa: F401
    from timm_smpconv.layers import SMPConv2d

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    grown = name == 'flexnet_16'
    arch = name.split('@')[0]
    cifar = arch in ('smp_flexnet_16', 'flexnet_16')
    size, batch = (32, 64) if cifar else (224, 8)
    model = timm.create_model(arch, num_classes=10 if cifar else 1000)
    if grown:  # masks fully grown: every FlexConv kernel spans the whole 33 x 33 horizon
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, 'mask_params', None) is not None:
                    m.mask_params[:, 1].fill_(1.0)
    res = {'model': name, 'params': sum(p.numel() for p in model.parameters()), 'train_batch': batch, 'size': size}

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10 if cifar else 1000, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    res['train_step_s'] = _median_time(step, 1, reps)
    res['train_img_s'] = batch / res['train_step_s']

    if name == 'smpconv_t':
        # share of a batch-32 training step spent rendering the SMP kernels (forward + backward)
        smp = [m for m in model.modules() if isinstance(m, SMPConv2d)]
        x32 = torch.randn(32, 3, size, size)
        y32 = torch.randint(0, 1000, (32,))

        def step32():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x32), y32).backward()
            opt.step()

        def render():
            sum(m.get_weight().sum() for m in smp).backward()

        res['step32_s'] = _median_time(step32, 1, max(1, reps - 1))
        res['render_s'] = _median_time(render, 1, reps)
        res['render_share'] = res['render_s'] / res['step32_s']
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            (RESULTS / 'profile_smpconv_t.txt').write_text(
                f'smpconv_t training step, batch {batch}, {size} px, {threads} threads\n'
                + prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=20))

    model.eval()
    x1 = torch.randn(1, 3, size, size)
    x8 = torch.randn(8, 3, size, size)
    with torch.no_grad():
        res['latency_ms'] = 1e3 * _median_time(lambda: model(x1), 2, reps * 2)
        fused = reparameterize_model(model)
        res['latency_reparam_ms'] = 1e3 * _median_time(lambda: fused(x1), 2, reps * 2)
        res['infer_img_s'] = 8 / _median_time(lambda: fused(x8), 1, reps)
    res['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _ratio(a, b):
    return f'{a / b:.2f}x' if a and b else '-'


def write_report(rows: dict, threads: int, out_md: Path, out_png: Path):
    import torch
    lines = [
        '# Benchmarks (CPU)',
        '',
        f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads; '
        f'torch {torch.__version__}. Command: `python benchmarks/run.py`. Medians; every number from one run.',
        '',
        '| model | params | train batch @ px | train step s | train img/s | eval latency ms (bs 1) | '
        'reparam latency ms | reparam img/s (bs 8) | peak RSS MB |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for name, r in rows.items():
        lines.append(
            f'| {name} | {r["params"]:,} | {r["train_batch"]} @ {r["size"]} | {r["train_step_s"]:.3f} | '
            f'{r["train_img_s"]:.1f} | {r["latency_ms"]:.1f} | {r["latency_reparam_ms"]:.1f} | '
            f'{r["infer_img_s"]:.1f} | {r["peak_rss_mb"]:.0f} |')
    g = rows.get
    lines += ['', '## Ratios (same run)', '', '| ratio | value | goal |', '|---|---|---|']
    if g('smpconv_t') and g('convnext_tiny'):
        t, c = g('smpconv_t'), g('convnext_tiny')
        lines.append(f'| smpconv_t / convnext_tiny training step (batch 8, 224 px) | '
                     f'{_ratio(t["train_step_s"], c["train_step_s"])} | <= 1.3x |')
        lines.append(f'| smpconv_t reparameterized / convnext_tiny eval latency (batch 1, 224 px) | '
                     f'{_ratio(t["latency_reparam_ms"], c["latency_ms"])} | <= 1.3x |')
        lines.append(f'| smpconv_t (not reparameterized) / convnext_tiny eval latency | '
                     f'{_ratio(t["latency_ms"], c["latency_ms"])} | |')
    if g('smpconv_t') and g('resnet50'):
        lines.append(f'| smpconv_t / resnet50 training step | '
                     f'{_ratio(g("smpconv_t")["train_step_s"], g("resnet50")["train_step_s"])} | |')
    if g('smpconv_mobile31') and g('convnext_tiny'):
        lines.append(f'| smpconv_mobile31 / convnext_tiny training step | '
                     f'{_ratio(g("smpconv_mobile31")["train_step_s"], g("convnext_tiny")["train_step_s"])} | |')
    if g('smp_flexnet_16') and g('flexnet_16'):
        lines.append(f'| smp_flexnet_16 / flexnet_16 training throughput, masks grown (batch 64, 32 px) | '
                     f'{_ratio(g("smp_flexnet_16")["train_img_s"], g("flexnet_16")["train_img_s"])} | >= 3x |')
    if g('smp_flexnet_16') and g('flexnet_16@init'):
        lines.append(f'| smp_flexnet_16 / flexnet_16 training throughput, masks at init | '
                     f'{_ratio(g("smp_flexnet_16")["train_img_s"], g("flexnet_16@init")["train_img_s"])} | '
                     f'(paper: 2.2x on a GPU) |')
    if g('smpconv_t') and 'render_share' in g('smpconv_t'):
        r = g('smpconv_t')
        lines.append(f'| SMP kernel rendering / smpconv_t training step (batch 32) | '
                     f'{100 * r["render_share"]:.2f}% ({r["render_s"] * 1e3:.0f} ms of {r["step32_s"]:.2f} s) | '
                     f'<= 2% |')
    out_md.write_text('\n'.join(lines) + '\n')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ('train_img_s', 'latency_ms', 'latency_reparam_ms'),
                              ('training images/s (higher is better)', 'eval latency ms, batch 1',
                               'reparameterized eval latency ms, batch 1')):
        ax.barh(names, [rows[n][key] for n in names], color=['C7' if n in ('convnext_tiny', 'resnet50') else 'C0' for n in names])
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
    fig.suptitle(f'timm-smpconv vs timm baselines, CPU {threads} threads')
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=IMAGENET + CIFAR)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--no-profile', action='store_true', help='skip the smpconv_t profile table')
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print('RESULT ' + json.dumps(worker(args.worker, args.reps, args.threads, not args.no_profile)))
        return
    rows = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for name in args.models:
        cmd = [sys.executable, __file__, '--worker', name, '--reps', str(args.reps), '--threads', str(args.threads)]
        if args.no_profile:
            cmd.append('--no-profile')
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith('RESULT ')), None)
        if out.returncode or line is None:
            raise SystemExit(f'benchmark of {name} failed:\n{out.stderr[-3000:]}')
        rows[name] = json.loads(line[7:])
        r = rows[name]
        print(f'{name}: step {r["train_step_s"]:.3f} s, latency {r["latency_ms"]:.1f} ms, '
              f'reparam {r["latency_reparam_ms"]:.1f} ms', flush=True)
    write_report(rows, args.threads, RESULTS / 'benchmark.md', RESULTS / 'benchmark.png')
    print((RESULTS / 'benchmark.md').read_text())


if __name__ == '__main__':
    main()
