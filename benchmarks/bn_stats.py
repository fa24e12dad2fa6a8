""" BatchNorm statistics in short runs: how far the eval-mode running statistics lag the activations they
normalise, and what re-estimating them (train_imagenet.py --bn-recalibrate) costs and gives.

    python benchmarks/bn_stats.py [--threads 2] [--out ...] [--smoke]

Part 1, the lag. Short runs of the presets with --bn-recalibrate 0 (3 epochs; validation skipped, it is not
what is measured): `digits`, `seq-digits`, and the models and recipes of the two CIFAR presets (`smp-cifar`,
`flexnet-cifar`) on the built-in digits at 32 px (CIFAR-10 cannot be downloaded here; 2 epochs of 8 batches of
16 and an EMA, to keep smp_flexnet_16's 20 GFLOPs an image affordable on a CPU; timm's random-resized crop, scale
0.6-1, with which bn_stats.md was measured, in place of the presets' padded CIFAR crop). At the end of epoch 0 and of
the last epoch, for every BatchNorm of the model and of its EMA: the factor by which eval mode scales its output relative to training,
sqrt((v + eps) / (r + eps)) per channel, with r its running variance and v the variance its input has on the
training data (fvcore's PreciseBN estimate over 8 training batches, train mode, weights unchanged). 1 is
right; 0.1 means eval outputs are 10x too small. Per layer role (the module path with its indices as *):
the median over channels of each layer, then the median and the smallest over the role's layers.

Part 2, the fixes, on `python train_imagenet.py --epochs 3` (digits preset): validation top-1 after epoch 0
and of the final EMA, and seconds per epoch, for no fix, a warm start (BatchNorm momentum None, i.e. a
cumulative average, through epoch 0), and --bn-recalibrate N for several N.
"""
import contextlib
import copy
import csv
import io
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from harness import bench_parser, parse_args, results_head, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = (  # (label, train_imagenet.py arguments of the short run)
    ('digits', ['--preset', 'digits', '--epochs', '3']),
    ('seq-digits', ['--preset', 'seq-digits', '--epochs', '3']),
    ('smp-cifar (smp_flexnet_16) on digits', ['--preset', 'smp-cifar', '--dataset', '', '--epochs', '2',
                                              '--max-train-batches', '8', '--batch-size', '16', '--model-ema',
                                              '--pad-crop', '0', '0', '--scale', '0.6', '1']),
    ('flexnet-cifar (flexnet_16) on digits', ['--preset', 'flexnet-cifar', '--dataset', '', '--epochs', '2',
                                              '--max-train-batches', '8', '--batch-size', '16', '--model-ema',
                                              '--pad-crop', '0', '0', '--scale', '0.6', '1']),
)
FIXES = (  # (label, extra arguments, warm start)
    ('none', ['--bn-recalibrate', '0'], False),
    ('warm start (cumulative BN averages in epoch 0)', ['--bn-recalibrate', '0'], True),
    ('--bn-recalibrate 4', ['--bn-recalibrate', '4'], False),
    ('--bn-recalibrate 8 (the digits default)', ['--bn-recalibrate', '8'], False),
    ('--bn-recalibrate 22 (the whole epoch)', ['--bn-recalibrate', '22'], False),
)


def bn_layers(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def eval_variances(module):
    """{BatchNorm name: the variance eval mode normalises with} where it is not the running variance (the kernel-scale
    factor of KernelScaledBNMixin; the re-estimated reference has factor 1)."""
    from timm_smpconv.layers.bn_stats import KernelScaledBNMixin
    out = {}
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, KernelScaledBNMixin):
                for b in m._kernel_scaled_bns:
                    if m._scaled_bn(b) is not None and m._kernel_sq_name(b) in m._buffers:
                        out[f'{name}.{b}' if name else b] = m.eval_running_var(b)
    return out


def eval_scale(module, state, num_batches=8):
    """{layer role: [median eval/train output scale of each layer]} for `module` (model or EMA)."""
    import train_imagenet
    from timm_smpconv._fvcore import update_bn_stats
    ref = copy.deepcopy(module).train()
    with torch.no_grad():
        update_bn_stats(ref, (x for x, _ in train_imagenet.training_batches(state)),
                        num_iters=min(num_batches, state.num_batches))
    used = eval_variances(module)
    roles = {}
    for (name, bn), (_, bn_ref) in zip(bn_layers(module), bn_layers(ref)):
        scale = ((bn_ref.running_var + bn.eps) / (used.get(name, bn.running_var) + bn.eps)).sqrt()
        roles.setdefault(re.sub(r'\.\d+(?=\.|$)', '.*', name), []).append(scale.median().item())
    return roles


def measure_lag(argv, smoke):
    """Run train_imagenet.main(argv) and measure the eval scales after the first and the last epoch."""
    import train_imagenet
    found = {}
    real = train_imagenet.recalibrate_bn

    def measuring(state):
        epoch = state.num_updates // max(state.updates_per_epoch, 1) - 1
        if epoch in (0, state.end_epoch - 1):
            found[epoch] = {'model': eval_scale(state.model, state)}
            if state.model_ema is not None:
                found[epoch]['EMA'] = eval_scale(state.model_ema.module, state)
        real(state)

    train_imagenet.recalibrate_bn = measuring
    real_validate = train_imagenet.should_validate
    train_imagenet.should_validate = lambda state, epoch: False
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            train_imagenet.main(argv + ['--bn-recalibrate', '0', '--output', tmp, '--experiment', 'r']
                                + (['--max-train-batches', '2', '--epochs', '1'] if smoke else []))
    finally:
        train_imagenet.recalibrate_bn = real
        train_imagenet.should_validate = real_validate
    return found


def run_fix(extra, warm_start, smoke):
    """(epoch-0 val top-1, final EMA top-1, seconds per epoch, of which re-estimating statistics) of the 3-epoch
    digits run with a fix."""
    import train_imagenet
    real_begin, real_recalibrate = train_imagenet.begin_epoch, train_imagenet.recalibrate_bn
    spent = []

    def timed_recalibrate(state):
        t = time.perf_counter()
        real_recalibrate(state)
        spent.append(time.perf_counter() - t)

    def begin(state, epoch):
        real_begin(state, epoch)
        for _, bn in bn_layers(state.model):
            if epoch == 0:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average of the epoch's batch statistics
            else:
                bn.momentum = 0.1

    if warm_start:
        train_imagenet.begin_epoch = begin
    train_imagenet.recalibrate_bn = timed_recalibrate
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            train_imagenet.main(['--epochs', '3', '--output', tmp, '--experiment', 'f'] + extra
                                + (['--max-train-batches', '2', '--epochs', '1'] if smoke else []))
            seconds = time.perf_counter() - t0
            with open(Path(tmp) / 'f' / 'summary.csv') as f:
                rows = list(csv.DictReader(f))
    finally:
        train_imagenet.begin_epoch, train_imagenet.recalibrate_bn = real_begin, real_recalibrate
    return float(rows[0]['eval_top1']), float(rows[-1]['eval_ema_top1']), seconds / len(rows), sum(spent) / len(rows)


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'bn_stats.md'), argv)
    lines = results_head('BatchNorm statistics in short runs', 'python benchmarks/bn_stats.py', args)
    lines += ['## The lag: eval/train output scale of each BatchNorm, --bn-recalibrate 0', '',
              'Per layer role: median over its layers (of each layer\'s median over channels), and the smallest '
              'layer. 1 is right; below 1, eval-mode outputs are that much smaller than in training.', '',
              '| run | weights | epoch | BatchNorm role | layers | median | smallest |', '|---|---|---|---|---|---|---|']
    for label, preset_argv in PRESETS[:1] if args.smoke else PRESETS:
        t0 = time.perf_counter()
        found = measure_lag(preset_argv, args.smoke)
        for epoch, by_weights in sorted(found.items()):
            for weights, roles in by_weights.items():
                for role, scales in sorted(roles.items()):
                    lines.append(f'| {label} | {weights} | {epoch} | `{role}` | {len(scales)} | '
                                 f'{statistics.median(scales):.3g} | {min(scales):.3g} |')
        print(f'{label}: {time.perf_counter() - t0:.0f} s', flush=True)
    lines += ['', '## The fixes: `python train_imagenet.py --epochs 3` (digits preset)', '',
              'Seconds per epoch of the whole run (training, re-estimation, validation, checkpoint; the machine\'s '
              'load varies from run to run) and of the re-estimation alone (model and EMA).', '',
              '| fix | val top-1 after epoch 0 | final EMA top-1 | s per epoch | of which re-estimation |',
              '|---|---|---|---|---|']
    for label, extra, warm in FIXES[:2] if args.smoke else FIXES:
        top1, ema, seconds, recal = run_fix(extra, warm, args.smoke)
        lines.append(f'| {label} | {top1:.2f}% | {ema:.2f}% | {seconds:.1f} | {recal:.2f} |')
        print(lines[-1], flush=True)
    lines += ['', f'Load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.']
    write_results(args.out, lines)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
