""" Triton launch settings, timed per conv shape: forward, input gradient and kernel gradient of the depthwise kernels.

    python benchmarks/triton_sweep.py [--out DIR]          # on a CUDA machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/triton_sweep.py --smoke --out DIR    # CPU, Triton's interpreter, tiny shapes: checks the script

For each stage shape of smpconv_t (the large kernels' C x H x W and kernel size, batch 64, bfloat16, NCHW and
channels_last) and each pass, every candidate setting (rows per program, images per program, warps, pipeline
stages; for the kernel gradient, row-block height, programs, warps, stages) is checked against F.conv2d (a wrong
result is dropped, and said) and timed with CUDA events (the median of triton.testing.do_bench); the rules the
launch code uses without settings are timed alike ('rules'). Writes, under --out:
  * triton_configs.json: the fastest setting per launch key where it beats the rules by more than 3% (the file
    `TIMM_SMPCONV_TRITON_CONFIGS=.../triton_configs.json` or `triton_dwconv.set_launch_configs` reads);
  * triton_sweep.md: per shape and pass, the rules' time, the best setting and its time.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

IMPROVEMENT = 0.97  # a setting replaces the rules only where it takes less than 97% of their time
# (label, channels, map, kernel) of smpconv_t's large-kernel convs at 224 px
SHAPES = [('stage 1', 96, 56, 31), ('stage 2', 192, 28, 29), ('stage 3', 384, 14, 27), ('stage 4', 768, 7, 13)]


def candidates(pass_name: str, smoke: bool):
    """Every setting tried for a pass (a small subset in smoke runs)."""
    if pass_name == 'weight_grad':
        grid = dict(block_m=[16, 32, 64], programs=[1024, 2048, 4096], num_warps=[4, 8], num_stages=[1, 2, 3])
    else:
        grid = dict(block_h=[8, 16, 32], imgs=[1, 2, 4], num_warps=[4, 8], num_stages=[1, 2, 3])
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    out = [c for c in out if pass_name == 'weight_grad' or 16 <= c['block_h'] * c['imgs'] <= 64]
    return out[:1] if smoke else out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=Path('benchmarks/results'), help='folder for the two files')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--smoke', action='store_true', help="CPU, Triton's interpreter, tiny shapes and two settings a pass")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ['TRITON_INTERPRET'] = '1'  # before the kernels are imported
    import torch
    import torch.nn.functional as F

    from timm_smpconv.ops import triton_dwconv as k

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit('benchmarks/triton_sweep.py: no CUDA device here; --smoke checks the script on the CPU')
    device, dtype = ('cuda', torch.bfloat16) if cuda else ('cpu', torch.float32)
    shapes = [('stage 1', 2, 6, 5)] if args.smoke else SHAPES
    batch = 2 if args.smoke else args.batch

    def timed(fn):
        if cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median') / 1e3
        times = []
        for _ in range(1):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    found, rows, dropped = {}, [], []
    for (label, c, h, kk), layout in itertools.product(shapes, ('nchw',) if args.smoke else ('nchw', 'channels_last')):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c, h, h, generator=g).to(device, dtype)
        gy = torch.randn(batch, c, h, h, generator=g).to(device, dtype)
        if layout == 'channels_last':
            x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
        w = (torch.randn(c, 1, kk, kk, generator=g) / kk).to(device, dtype)
        wf = w.flip(-2, -1).contiguous()
        pad = kk // 2
        ref = {'forward': F.conv2d(x.float(), w.float(), None, 1, pad, 1, c),
               'input_grad': F.conv2d(gy.float(), wf.float(), None, 1, pad, 1, c),
               'weight_grad': torch.nn.grad.conv2d_weight(x.float(), w.shape, gy.float(), 1, pad, 1, c)}

        def run(pass_name, cfg):
            if pass_name == 'weight_grad':
                launch = k.weight_grad_launch(gy, x, kk, kk, config=cfg)
                launch()
                part = launch.args[2]
                return launch, part
            src, ker = (x, w) if pass_name == 'forward' else (gy, wf)
            launch = k.forward_launch(src, ker, None, torch.empty_like(src), config=cfg)
            launch()
            return launch, launch.args[3]

        def result(pass_name, cfg):
            if pass_name == 'weight_grad':  # the launch's partial products, reduced as dwconv2d_weight_grad does
                prev = k.set_launch_configs({k.launch_key('weight_grad', x, kk, kk): cfg})
                try:
                    return k.dwconv2d_weight_grad(gy, x, kk, kk)
                finally:
                    k.set_launch_configs(prev)
            return run(pass_name, cfg)[1]

        for pass_name in ('forward', 'input_grad', 'weight_grad'):
            key = k.launch_key(pass_name, x, kk, kk)
            want = ref[pass_name]
            tol = 2e-2 * float(want.abs().max())
            times = {}
            for cfg in [None] + candidates(pass_name, args.smoke):
                name = 'rules' if cfg is None else json.dumps(cfg, sort_keys=True)
                try:
                    got = result(pass_name, cfg or {})
                    err = float((got.float() - want).abs().max())
                    if not err <= tol:
                        dropped.append(f'{key} {name}: wrong result (max error {err:.3g})')
                        continue
                    times[name] = timed(run(pass_name, cfg or {})[0])
                except Exception as e:  # a setting the compiler refuses (e.g. out of shared memory)
                    dropped.append(f'{key} {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
            if 'rules' not in times:
                raise SystemExit(f'{key}: the default launch failed: {dropped[-1]}')
            best = min(times, key=times.get)
            if best != 'rules' and times[best] < IMPROVEMENT * times['rules']:
                found[key] = json.loads(best)
            rows.append(f"| {label} | {c}x{h}x{h}, {kk}x{kk} | {layout} | {pass_name} | {1e3 * times['rules']:.3f} | "
                        f"{best} | {1e3 * times[best]:.3f} | {times['rules'] / times[best]:.2f}x |")
            print(rows[-1], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'triton_configs.json').write_text(json.dumps(found, indent=1, sort_keys=True) + '\n')
    dev = torch.cuda.get_device_name() if cuda else 'CPU, Triton interpreter (smoke run: not a measurement)'
    lines = ['# Triton launch settings per shape', '',
             f'Device: {dev}; torch {torch.__version__}. Batch {batch}, {str(dtype).replace("torch.", "")}. Command: '
             f'`python benchmarks/triton_sweep.py{" --smoke" if args.smoke else ""}`. Times: median ms (CUDA events). '
             f'A setting goes into triton_configs.json where it takes < {IMPROVEMENT:.0%} of the rules\' time.', '',
             '| shape | C x H x W, kernel | layout | pass | rules ms | best setting | best ms | speed-up |',
             '|---|---|---|---|---|---|---|---|', *rows, '',
             f'{len(found)} settings written to triton_configs.json.']
    if dropped:
        lines += ['', 'Settings dropped:', ''] + [f'- {d}' for d in dropped]
    (args.out / 'triton_sweep.md').write_text('\n'.join(lines) + '\n')
    print(f'wrote {args.out / "triton_sweep.md"} and {args.out / "triton_configs.json"} ({len(found)} settings)')


if __name__ == '__main__':
    main()
