""" Deployed models on CPU: batch-1 latency and batch-8 throughput in PyTorch (NCHW, channels_last) and onnxruntime.

    python benchmarks/deploy.py [--threads 2] [--reps 15] [--models ...] [--out ...] [--smoke]

The models: smpconv_t and smpconv_mobile31 deployed (`timm.create_model(name, inference_mode=True)`, the structure
`python -m timm_smpconv.export` writes), timm's convnext_tiny and resnet50 (`reparameterize_model` leaves them
as they are); 224 px, eval, no gradient. Every timing of a table row set is interleaved in one process: each
round runs every model once, in alternating order, so load drifting on a shared machine hits them alike; the
numbers are medians over --reps rounds after two untimed ones. onnxruntime runs the model exported with
torch.onnx.export (the default, dynamo-based exporter; dynamic batch), with --threads intra-op threads and
every graph optimization.

Where the time goes: batch-1 forwards of deployed smpconv_t and of convnext_tiny split by layer kind (PyTorch
channels_last, timed with forward hooks on the leaf modules; what no leaf module does, e.g. residual adds and
permutes, is 'other'), and by ONNX node kind from onnxruntime's own profiler. Writes
benchmarks/results/deploy.md.
"""
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import timm
import torch
import torch.nn as nn
from harness import bench_parser, interleaved_times, model_kwargs, parse_args, results_head, write_results

import timm_smpconv  # noqa: F401

MODELS = ['smpconv_t', 'smpconv_mobile31', 'convnext_tiny', 'resnet50']
BASELINE = 'convnext_tiny'
OURS = 'smpconv_t'
# (runtime, batch-1 latency goal of smpconv_t / convnext_tiny)
GOALS = {'PyTorch channels_last': 1.0, 'onnxruntime': 1.1}
RUNTIMES = ['PyTorch NCHW', 'PyTorch channels_last', 'onnxruntime']


def build(name: str, smoke: bool) -> nn.Module:
    """The deployed model: ours built in inference mode, timm's reparameterized (a no-op for these two)."""
    from timm.models import reparameterize_model
    torch.manual_seed(0)
    if name.startswith('smpconv'):
        return timm.create_model(name, inference_mode=True, **model_kwargs(name, smoke)).eval()
    return reparameterize_model(timm.create_model(name, **model_kwargs(name, smoke)).eval())


# the layer kinds a forward's time is split into (both runtimes, both models)
LARGE_DW, DW, POINTWISE, DENSE = ('large depthwise conv (>= 13 x 13)', 'depthwise conv (< 13 x 13)',
                                  'pointwise (1 x 1 conv, Linear, MatMul)', 'dense conv (stem, downsampling)')
ACT, NORM, REST = 'activations', 'normalisation', 'rest (residual adds, layout, reshapes, module calls)'
KINDS = [LARGE_DW, DW, POINTWISE, DENSE, ACT, NORM, REST]


def conv_kind(weight_shape, in_channels: int) -> str:
    """The kind of a convolution from its weight shape (O, I / groups, kh, kw) and input channels."""
    k = max(weight_shape[2:])
    if weight_shape[1] == 1 and in_channels > 1:
        return LARGE_DW if k >= 13 else DW
    return POINTWISE if k == 1 else DENSE


def module_kind(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        return conv_kind(tuple(m.weight.shape), m.in_channels)
    if isinstance(m, nn.Linear):
        return POINTWISE
    if any(a in type(m).__name__.lower() for a in ('relu', 'gelu', 'silu')):  # torch's and timm's own classes
        return ACT
    if 'Norm' in type(m).__name__:
        return NORM
    return None


def ort_kind(op: str, args: dict) -> str:
    """The kind of an onnxruntime node (after its fusions: a conv's kind includes a fused activation or add)."""
    if 'Conv' in op:
        shapes = [list(s.values())[0] for s in args.get('input_type_shape', []) if s]
        return conv_kind(shapes[1], shapes[0][1]) if len(shapes) > 1 and len(shapes[1]) == 4 else DENSE
    if op in ('MatMul', 'Gemm', 'FusedMatMul', 'FusedGemm'):
        return POINTWISE
    if op in ('Relu', 'Gelu', 'BiasGelu', 'FastGelu', 'Erf', 'Tanh', 'Sigmoid'):
        return ACT
    if 'Norm' in op:
        return NORM
    return REST


def torch_breakdowns(models: dict, x: torch.Tensor, reps: int) -> dict:
    """{model: median ms per layer kind of a forward}, from forward hooks on the leaf modules ('rest' is the time no
    leaf module accounts for); the models' forwards interleaved, in alternating order, after two untimed rounds."""
    starts, per_call, handles = {}, defaultdict(float), []
    kinds = {m: module_kind(m) for model in models.values() for m in model.modules()
             if not list(m.children()) and module_kind(m)}

    def pre(m, args):
        starts[m] = time.perf_counter()

    def post(m, args, out):
        per_call[kinds[m]] += time.perf_counter() - starts[m]

    for m in kinds:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    samples = {n: defaultdict(list) for n in models}
    names = list(models)
    try:
        with torch.no_grad():
            for i in range(reps + 2):
                for n in names if i % 2 == 0 else names[::-1]:
                    per_call.clear()
                    t = time.perf_counter()
                    models[n](x)
                    total = time.perf_counter() - t
                    if i >= 2:
                        for k, v in per_call.items():
                            samples[n][k].append(1e3 * v)
                        samples[n][REST].append(1e3 * (total - sum(per_call.values())))
                        samples[n]['total'].append(1e3 * total)
    finally:
        for h in handles:
            h.remove()
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}


def onnx_session(model: nn.Module, x: torch.Tensor, path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort
    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=['x'],
                              dynamic_shapes=({0: torch.export.Dim('batch')},), external_data=False, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(path.with_suffix(''))
    return ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])


def _large_kernel_nodes(path: Path) -> set:
    """The ONNX nodes the exporter wrote for our large-kernel convs (a Conv, or the DFT products' MatMuls and
    the ops around them), by the module each node comes from."""
    import onnx
    return {n.name for n in onnx.load(str(path)).graph.node if any(
        p.key == 'pkg.torch.onnx.class_hierarchy' and 'LargeKernelConv2d' in p.value for p in n.metadata_props)}


def ort_breakdowns(sessions: dict, x: torch.Tensor, reps: int, paths: dict) -> dict:
    """{model: median ms per node kind} from onnxruntime's profiler (sessions created with profiling on), the
    sessions run interleaved, in alternating order, after two untimed rounds. Nodes from our large-kernel convs
    (`paths`: the ONNX files, whose nodes name their module) count as large depthwise convs."""
    feed = {'x': x.numpy()}
    names = list(sessions)
    for i in range(reps + 2):
        for n in names if i % 2 == 0 else names[::-1]:
            sessions[n].run(None, feed)
    out = {}
    for n, sess in sessions.items():
        large = _large_kernel_nodes(paths[n])
        events = json.loads(Path(sess.end_profiling()).read_text())
        runs = [e for e in events if e.get('name') == 'model_run'][2:]
        per_run = [defaultdict(float) for _ in runs]
        for e in events:
            if e.get('cat') != 'Node' or not e.get('name', '').endswith('_kernel_time'):
                continue
            node = e['name'][:-len('_kernel_time')].split('/')[0]
            kind = LARGE_DW if node in large else ort_kind(e.get('args', {}).get('op_name', ''), e.get('args', {}))
            for i, r in enumerate(runs):
                if r['ts'] <= e['ts'] <= r['ts'] + r['dur']:
                    per_run[i][kind] += e['dur'] / 1e3
                    break
        out[n] = {k: statistics.median(r.get(k, 0.) for r in per_run) for k in {k for r in per_run for k in r}}
        out[n]['total'] = statistics.median(r['dur'] / 1e3 for r in runs)
    return out


# the large depthwise convs of smpconv_t and smpconv_mobile51 at 224 px: (channels, map size, kernel size)
LARGE_DW_SHAPES = [(96, 56, 31), (192, 28, 29), (384, 14, 27), (768, 7, 13),
                   (64, 56, 51), (128, 28, 49), (256, 14, 47), (320, 7, 13)]


def ort_large_dw(threads: int, rounds: int, tmp: Path, smoke: bool) -> list:
    """onnxruntime batch-1 times of each large depthwise conv exported as a Conv node and as DFT matrix products
    (the export's two forms), with the form the export rule picks."""
    import onnxruntime as ort

    from timm_smpconv.layers import LargeKernelConv2d
    from timm_smpconv.ops import conv_impl, default_export_backend
    rows = []
    shapes = [(8, 16, 15), (8, 8, 7)] if smoke else LARGE_DW_SHAPES
    for c, size, k in shapes:
        conv = LargeKernelConv2d(c, c, k, groups=c).eval()
        x = torch.randn(1, c, size, size)
        fns = {}
        for impl in ('direct', 'dft'):
            path = tmp / f'dw_{impl}_{c}_{size}_{k}.onnx'
            with torch.no_grad(), conv_impl(impl):
                torch.onnx.export(conv, (x,), str(path), dynamo=True, input_names=['x'], external_data=False,
                                  verbose=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])
            fns[impl] = (lambda s=sess, f={'x': x.numpy()}: s.run(None, f))
        t = {i: 1e3 * statistics.median(v) for i, v in interleaved_times(fns, 2, rounds).items()}
        rows.append((c, size, k, t['direct'], t['dft'], default_export_backend(True, (k, k), (size, size))))
    return rows


def main(argv=None):
    parser = bench_parser(__doc__, 'deploy.md', reps=15)
    parser.add_argument('--models', nargs='+', default=MODELS, help='models to time (ours and timm\'s)')
    args = parse_args(parser, argv)
    size = 64 if args.smoke else 224
    names = list(dict.fromkeys(args.models))
    models = {n: build(n, args.smoke) for n in names}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    tmp = Path(tempfile.mkdtemp(prefix='deploy_onnx_'))
    x1, x8 = torch.randn(1, 3, size, size), torch.randn(8, 3, size, size)

    # the callables of each runtime, per model and batch
    def torch_fns(fmt, x):
        fns = {}
        for n, m in models.items():
            mm = m.to(memory_format=fmt)
            xx = x.contiguous(memory_format=fmt)
            fns[n] = (lambda mm=mm, xx=xx: mm(xx))
        return fns

    sessions = {n: onnx_session(m.to(memory_format=torch.contiguous_format), x8, tmp / f'{n}.onnx', args.threads)
                for n, m in models.items()}

    def ort_fns(x):
        feed = {'x': x.numpy()}
        return {n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}

    load_start = os.getloadavg()[0]
    latency, throughput, ratios = {}, {}, {}
    warmup, rounds = (0, 1) if args.smoke else (2, args.reps)
    for runtime in RUNTIMES:
        for batch, x in ((1, x1), (8, x8)):
            if runtime == 'onnxruntime':
                fns = ort_fns(x)
            else:
                fns = torch_fns(torch.channels_last if 'channels_last' in runtime else torch.contiguous_format, x)
            with torch.no_grad():
                times = interleaved_times(fns, warmup, rounds)
            for n, t in times.items():
                if batch == 1:
                    latency[(n, runtime)] = 1e3 * statistics.median(t)
                else:
                    throughput[(n, runtime)] = batch / statistics.median(t)
            if OURS in times and BASELINE in times:  # the ratio of each round, whose two runs were back to back
                ratios[(runtime, batch)] = statistics.median(a / b for a, b in zip(times[OURS], times[BASELINE]))
            print(runtime, f'batch {batch}', {n: f'{1e3 * statistics.median(t):.1f} ms' for n, t in times.items()},
                  flush=True)

    dw_rows = ort_large_dw(args.threads, max(rounds, 3), tmp, args.smoke)

    # where the time goes (batch 1)
    profiles = {}
    pair = [n for n in (OURS, BASELINE) if n in models]
    if pair:
        cl = {n: models[n].to(memory_format=torch.channels_last) for n in pair}
        for n, p in torch_breakdowns(cl, x1.contiguous(memory_format=torch.channels_last), max(3, rounds)).items():
            profiles[(n, 'PyTorch channels_last')] = p
        sessions = {n: onnx_session(None, None, tmp / f'{n}.onnx', args.threads, profile=True) for n in pair}
        paths = {n: tmp / f'{n}.onnx' for n in pair}
        for n, p in ort_breakdowns(sessions, x1, max(3, rounds), paths).items():
            profiles[(n, 'onnxruntime')] = p

    lines = results_head(f'Deployed models on CPU (batch 1 latency, batch 8 throughput, {size} px)',
                         'python benchmarks/deploy.py', args)
    import onnxruntime
    lines += [f'timm {timm.__version__}, onnxruntime {onnxruntime.__version__}. Ours deployed with '
              '`create_model(name, inference_mode=True)`; medians of interleaved rounds (all models of a column '
              'timed back to back in each round; the ratios below are medians of per-round ratios). The machine is '
              f'shared: load average {load_start:.1f} when the timings started, {os.getloadavg()[0]:.1f} at the end '
              f'(on {os.cpu_count()} cores).', '',
              '| model | params | ' + ' | '.join(f'{r} ms (bs 1)' for r in RUNTIMES) + ' | '
              + ' | '.join(f'{r} img/s (bs 8)' for r in RUNTIMES) + ' |',
              '|---|---|' + '---|' * (2 * len(RUNTIMES))]
    for n in names:
        lines.append(f'| {n} | {params[n]:,} | ' + ' | '.join(f'{latency[(n, r)]:.1f}' for r in RUNTIMES) + ' | '
                     + ' | '.join(f'{throughput[(n, r)]:.1f}' for r in RUNTIMES) + ' |')
    if OURS in models and BASELINE in models:
        lines += ['', f'## {OURS} / {BASELINE}', '', '| runtime | latency ratio (bs 1) | throughput ratio (bs 8) | goal '
                  '(latency) | met |', '|---|---|---|---|---|']
        for r in RUNTIMES:
            ratio = ratios[(r, 1)]
            tput = 1 / ratios[(r, 8)]
            goal = GOALS.get(r)
            met = '-' if goal is None else ('yes' if ratio <= goal else 'no')
            lines.append(f'| {r} | {ratio:.2f}x ({latency[(OURS, r)]:.1f} / {latency[(BASELINE, r)]:.1f} ms) | '
                         f'{tput:.2f}x | {"-" if goal is None else f"<= {goal:.1f}x"} | {met} |')
    lines += ['', '## Large depthwise convs in onnxruntime (batch 1)', '',
              'Each conv exported alone as a Conv node (`conv_impl(\'direct\')`) and as DFT matrix products '
              '(`conv_impl(\'dft\')`, `timm_smpconv.ops.dft`); the export picks by `default_export_backend`.', '',
              '| channels x map | kernel | Conv node ms | DFT products ms | DFT speed-up | export picks |',
              '|---|---|---|---|---|---|']
    for c, hw, k, td, tf, pick in dw_rows:
        lines.append(f'| {c} x {hw} x {hw} | {k} x {k} | {td:.2f} | {tf:.2f} | {td / tf:.2f}x | {pick} |')
    if profiles:
        lines += ['', '## Where the time goes (batch 1)', '',
                  'PyTorch channels_last: each leaf module timed with forward hooks (the hooks add a little to every '
                  'module); onnxruntime: its profiler\'s node times (after its graph optimizations and fusions).', '']
        for runtime in ('PyTorch channels_last', 'onnxruntime'):
            kinds = KINDS
            cols = [n for n in (OURS, BASELINE) if (n, runtime) in profiles]
            lines += [f'| {runtime}: layer kind | ' + ' | '.join(f'{n} ms (share)' for n in cols) + ' |',
                      '|---|' + '---|' * len(cols)]
            for k in kinds + ['total']:
                cells = []
                for n in cols:
                    p = profiles[(n, runtime)]
                    v = p.get(k, 0.)
                    cells.append(f'{v:.2f} ({100 * v / p["total"]:.0f}%)' if k != 'total' else f'{v:.2f}')
                lines.append(f'| {k} | ' + ' | '.join(cells) + ' |')
            lines.append('')
    if profiles and (OURS, 'onnxruntime') in profiles and (BASELINE, 'onnxruntime') in profiles:
        lines += limits_section(models, size, ratios, profiles)
    print(f'wrote {write_results(args.out, lines)}')
    return latency, throughput, profiles


def limits_section(models: dict, size: int, ratios: dict, profiles: dict) -> list:
    """What the deployed smpconv_t's time goes to, against convnext_tiny's, from the counts and the profiles."""
    from timm_smpconv.flops import count_flops
    counts = {n: count_flops(models[n].to(memory_format=torch.contiguous_format), size) for n in (OURS, BASELINE)}
    large = 0.
    shapes = {}

    def record(m, args):
        shapes[m] = tuple(args[0].shape)

    convs = [m for m in models[OURS].modules() if isinstance(m, nn.Conv2d) and conv_kind(tuple(m.weight.shape),
                                                                                      m.in_channels) == LARGE_DW]
    handles = [m.register_forward_pre_hook(record) for m in convs]
    with torch.no_grad():
        models[OURS](torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    for m in convs:
        large += shapes[m][1] * shapes[m][2] * shapes[m][3] * m.weight.shape[-2] * m.weight.shape[-1]
    g = 1e9
    ours, base = counts[OURS]['conv'] + counts[OURS]['linear'], counts[BASELINE]['conv'] + counts[BASELINE]['linear']
    lines = ['', '## What limits it', '',
             f'Multiply-adds per image (fvcore, `timm_smpconv.flops`): deployed {OURS} {ours / g:.2f} G, of which its '
             f'large depthwise kernels {large / g:.2f} G (their direct form); {BASELINE} {base / g:.2f} G. Without '
             f'the large kernels, {OURS} does {(ours - large) / g:.2f} G.', '']
    for runtime in ('PyTorch channels_last', 'onnxruntime'):
        p, q = profiles[(OURS, runtime)], profiles[(BASELINE, runtime)]
        ratio = ratios[(runtime, 1)]
        goal = GOALS[runtime]
        rest = p['total'] - p[LARGE_DW]
        lines.append(
            f'- {runtime}: {ratio:.2f}x against a goal of <= {goal:.1f}x ({"met" if ratio <= goal else "missed"}). '
            f'In the profile, {OURS}\'s large depthwise convs take {p[LARGE_DW]:.1f} ms of {p["total"]:.1f} '
            f'({100 * p[LARGE_DW] / p["total"]:.0f}%); everything else {rest:.1f} ms, {rest / q["total"]:.2f}x '
            f'{BASELINE}\'s whole forward ({q["total"]:.1f} ms); pointwise {p[POINTWISE]:.1f} ms against '
            f'{q[POINTWISE]:.1f} ms, activations {p[ACT]:.1f} ms against {q[ACT]:.1f} ms.')
    lines += ['', 'How the large kernels run: PyTorch convolves each directly or through the FFT (pocketfft), as '
              'the measured rule picks (benchmarks/results/conv_paths.md); for onnxruntime the export writes them '
              'as Conv nodes or as DFT matrix products, as its rule picks (table above; onnxruntime\'s own DFT '
              'node is naive for lengths that are not powers of two). Deployed kernel size is the remaining '
              'lever: SMP layers trained with `crop_to_support=True` deploy to their points\' support '
              '(docs/deployment.md), which this benchmark of untrained models does not measure.']
    return lines


if __name__ == '__main__':
    main()
