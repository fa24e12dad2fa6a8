""" GPU benchmark: our models against convnext_tiny and resnet50, and the large-kernel conv backends, in one process.

    python benchmarks/gpu.py                         # on a CUDA machine: writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --device cpu --smoke    # tiny sizes on CPU: checks the script itself (CI)

Measured, each with warm-up and the median of CUDA-event timings (host clock on CPU; CUDA events clock the
GPU work alone, which is why this script does not use torch.utils.benchmark, whose timer synchronizes the device):
  * training throughput (forward + backward + AdamW step), eager and under torch.compile, and the peak
    device memory of the eager step: smpconv_t, smpconv_mobile31, convnext_tiny, resnet50 at batch 128,
    224 px, bf16 autocast, channels_last; smp_flexnet_16 and flexnet_16 at batch 64, 32 px, float32;
  * inference of the reparameterized models (timm.models.reparameterize_model): throughput at batch 256 and
    latency at batch 1, bf16, channels_last;
  * one depthwise layer, forward + backward at batch 64, bf16, per backend (direct = F.conv2d, fft, triton)
    for the four smpconv_t stage shapes and a 5 x 5, NCHW and channels_last.
Then the goals of the GPU issue, one line each, as ratios measured here.
"""
import gc
import sys
import time

import timm
import torch
from harness import CIFAR_MODELS, SMOKE_NOTE, bench_parser, host, median_time, model_kwargs, train_step, write_results
from timm.models import reparameterize_model

import timm_smpconv  # noqa: F401
from timm_smpconv.ops import conv_backends, get_conv_impl, large_kernel_conv2d, select_conv_backend, set_conv_impl, triton_available

IMAGENET = ['smpconv_t', 'smpconv_mobile31', 'convnext_tiny', 'resnet50']
CIFAR = list(CIFAR_MODELS)
# (label, channels, map, kernel) at batch 64
LAYERS = [('stage 1', 96, 56, 31), ('stage 2', 192, 28, 29), ('stage 3', 384, 14, 27), ('stage 4', 768, 7, 13),
          ('5 x 5', 96, 56, 5)]
# the paper's RTX 3090 training throughput (SMPConv, Table 1), img/s
PAPER_IMG_S = {'smp_flexnet_16': 4258, 'flexnet_16': 1923}


def _free(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _setup(name, args, device):
    cifar = name in CIFAR
    batch, size = (args.cifar_batch, 32) if cifar else (args.batch, args.img_size)
    fmt = torch.contiguous_format if cifar else torch.channels_last
    amp = (not cifar) and args.amp
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10 if cifar else 1000, **model_kwargs(name, args.smoke))
    model = model.to(device, memory_format=fmt)
    return model, batch, size, fmt, amp


def train_throughput(name: str, args, device, compiled: bool) -> dict:
    _free(device)
    model, batch, size, fmt, amp = _setup(name, args, device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model, backend=args.compile_backend) if compiled else model
    step = train_step(fwd, x, y, opt, amp)

    t0 = time.perf_counter()  # the first step, compile included: timed once, by the host clock
    step()
    compile_s = time.perf_counter() - t0
    s = median_time(step, args.warmup, args.reps, device)
    res = {'img_s': batch / s, 'step_ms': 1e3 * s, 'first_step_s': compile_s}
    if device.type == 'cuda':
        res['peak_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return res


def inference(name: str, args, device) -> dict:
    _free(device)
    model, _, size, fmt, amp = _setup(name, args, device)
    model = reparameterize_model(model.eval())
    res = {}
    for key, batch in (('img_s', args.infer_batch), ('latency_ms', 1)):
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model(x)

        s = median_time(run, args.warmup, args.reps, device)
        res[key] = batch / s if key == 'img_s' else 1e3 * s
    return res


def layer_times(args, device) -> list:
    """Forward + backward of one depthwise layer per backend, ms (None where a backend does not apply)."""
    rows = []
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    for label, c, h, k in LAYERS:
        if args.smoke:
            c, h = min(c, 8), min(h, 16)
        for fmt_name, fmt in (('NCHW', torch.contiguous_format), ('channels_last', torch.channels_last)):
            x = torch.randn(args.layer_batch, c, h, h, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w = (torch.randn(c, 1, k, k, device=device, dtype=dtype) / k).requires_grad_()
            x.requires_grad_()
            gy = torch.randn_like(x)
            row = {'layer': label, 'shape': f'{c}x{h}x{h}, {k}x{k}', 'format': fmt_name}
            for backend in conv_backends():
                prev = set_conv_impl(backend) if backend != 'triton' or triton_available(device.type) else None
                try:
                    if prev is None or select_conv_backend(x, w, 1, c) != backend:
                        row[backend] = None
                        continue

                    def fb():
                        torch.autograd.grad(large_kernel_conv2d(x, w, None, 1, c), (x, w), gy)

                    row[backend] = 1e3 * median_time(fb, args.warmup, args.reps, device)
                finally:
                    if prev is not None:
                        set_conv_impl(prev)
            rows.append(row)
            print(row, flush=True)
    return rows


def _fmt(v, spec='.0f'):
    return '-' if v is None else format(v, spec)


def _goal(ok):
    return '-' if ok is None else ('yes' if ok else 'no')


def main(argv=None):
    p = bench_parser(__doc__, 'gpu.md', threads=False)
    p.add_argument('--device', default='cuda')
    p.add_argument('--models', nargs='+', default=IMAGENET + CIFAR)
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile runs')
    p.add_argument('--compile-backend', default='inductor', help='torch.compile backend (aot_eager compiles fast)')
    p.add_argument('--conv-impl', default=None, help="set_conv_impl for the model runs (default: 'auto')")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            sys.exit('benchmarks/gpu.py: no CUDA device here; use --device cpu --smoke to check the script')
        torch.backends.cudnn.benchmark = True
    args.batch, args.img_size, args.cifar_batch, args.infer_batch, args.layer_batch = 128, 224, 64, 256, 64
    args.warmup, args.reps, args.amp = 3, 20, True
    if args.smoke:
        args.batch, args.img_size, args.cifar_batch, args.infer_batch, args.layer_batch = 2, 64, 2, 2, 2
        args.warmup, args.reps = 1, 2
    if args.conv_impl:
        set_conv_impl(args.conv_impl)

    train, infer = {}, {}
    for name in args.models:
        train[name] = {'eager': train_throughput(name, args, device, False)}
        if not args.no_compile:
            train[name]['compiled'] = train_throughput(name, args, device, True)
        if name not in CIFAR:
            infer[name] = inference(name, args, device)
        print(name, train[name], infer.get(name), flush=True)
    layers = layer_times(args, device)

    dev = torch.cuda.get_device_name(device) if device.type == 'cuda' else host()
    cudnn = torch.backends.cudnn.version() if device.type == 'cuda' else None
    triton_v = None
    if triton_available(device.type):
        import triton
        triton_v = triton.__version__
    lines = [
        '# GPU benchmark' + (SMOKE_NOTE if args.smoke else ''), '',
        f'Device: {dev}; torch {torch.__version__}, timm {timm.__version__}, cuDNN {cudnn}, Triton {triton_v}; '
        f"conv impl '{get_conv_impl()}'. Command: `python benchmarks/gpu.py {' '.join(argv or sys.argv[1:])}`.", '',
        f'## Training (batch {args.batch} @ {args.img_size} px bf16 channels_last; CIFAR batch {args.cifar_batch} @ 32 px '
        'float32), img/s', '',
        '| model | eager | compiled | peak GiB (eager) | first compiled step s |', '|---|---|---|---|---|',
    ]
    for name, r in train.items():
        c = r.get('compiled', {})
        lines.append(f"| {name} | {r['eager']['img_s']:.0f} | {_fmt(c.get('img_s'))} | "
                     f"{_fmt(r['eager'].get('peak_gib'), '.1f')} | {_fmt(c.get('first_step_s'), '.0f')} |")
    lines += ['', '## Inference, reparameterized (bf16 channels_last)', '',
              f'| model | img/s at batch {args.infer_batch} | latency ms at batch 1 |', '|---|---|---|']
    for name, r in infer.items():
        lines.append(f"| {name} | {r['img_s']:.0f} | {r['latency_ms']:.2f} |")
    lines += ['', f'## One depthwise layer, forward + backward, batch {args.layer_batch}, ms', '',
              '| layer | C x H x W, kernel | format | ' + ' | '.join(conv_backends()) + ' |',
              '|---|---|---|' + '---|' * len(conv_backends())]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['format']} | "
                     + ' | '.join(_fmt(r[b], '.2f') for b in conv_backends()) + ' |')

    def ratio(a, b):
        return a / b if a and b else None

    def tr(name, mode):
        return train.get(name, {}).get(mode, {}).get('img_s')

    goals = []
    for mode in ('eager', 'compiled'):
        r = ratio(tr('smpconv_t', mode), tr('convnext_tiny', mode))
        goals.append((f'smpconv_t / convnext_tiny training throughput, {mode}', r, '>= 0.77', r and r >= 0.77))
    r = ratio(infer.get('smpconv_t', {}).get('img_s'), infer.get('convnext_tiny', {}).get('img_s'))
    goals.append(('reparameterized smpconv_t / convnext_tiny inference throughput, batch 256', r, '>= 0.77',
                  r and r >= 0.77))
    r = ratio(infer.get('smpconv_t', {}).get('latency_ms'), infer.get('convnext_tiny', {}).get('latency_ms'))
    goals.append(('reparameterized smpconv_t / convnext_tiny latency, batch 1', r, '<= 1.3', r and r <= 1.3))
    for mode in ('eager', 'compiled'):
        r = ratio(tr('smp_flexnet_16', mode), tr('flexnet_16', mode))
        goals.append((f'smp_flexnet_16 / flexnet_16 training throughput, {mode}', r, '>= 2.2', r and r >= 2.2))
        for name, paper in PAPER_IMG_S.items():
            v = tr(name, mode)
            goals.append((f'{name} training img/s, {mode}, against the paper (RTX 3090)', v and v / paper,
                          f'>= 1 ({paper} img/s)', v and v >= paper))
    r = ratio(train.get('smpconv_t', {}).get('eager', {}).get('peak_gib'),
              train.get('convnext_tiny', {}).get('eager', {}).get('peak_gib'))
    goals.append(('smpconv_t / convnext_tiny peak training memory', r, '<= 1.3', r and r <= 1.3))
    for row in layers:
        t = row.get('triton')
        others = [row[b] for b in ('direct', 'fft') if row.get(b) is not None]
        if row['layer'].startswith('stage'):
            r = t / min(others) if t and others else None
            goals.append((f"Triton / best other backend, {row['layer']} {row['format']}", r, '< 1', r and r < 1))
    lines += ['', '## Goals (ratios measured above)', '', '| goal | measured | target | met |', '|---|---|---|---|']
    for label, r, target, ok in goals:
        lines.append(f'| {label} | {_fmt(r, ".2f")} | {target} | {_goal(None if r is None else bool(ok))} |')
    write_results(args.out, lines)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
