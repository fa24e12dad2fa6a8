""" The SMPConv paper's CIFAR-10 experiments on the real data: test top-1 per epoch and training images/s of
smp_flexnet_16, flexnet_16 and ckcnn_16, for a given budget, on any device.

    python benchmarks/cifar10.py (--epochs E | --minutes M) [--models ...] [--data PATH] [--train-per-class N]
                                 [--batch-size 64] [--workers N] [--amp] [--threads 2] [--runs DIR] [--out ...]
                                 [--fixed-points] [--fixed-radius] [--point-std S] [--radius R] [--n-points P] [--smoke]

The SMPConv paper (CVPR 2023) on CIFAR-10: Table 4, top-1 after the full recipes: SMP (smp_flexnet_16) 93.0,
FlexNet-16 92.2, CKCNN-16 72.1; Table 1, training throughput on an RTX 3090 at batch 64, 32 px (mean of the first
10 epochs): SMPConv 4258.4 images/s (40.1 s/epoch), FlexConv 1923.4 images/s (92.9 s/epoch).

Each model trains with the trainer, as a user runs it (a subprocess of train_imagenet.py; the device is the
trainer's default: CUDA where there is one):

    smp_flexnet_16: train_imagenet.py --preset smp-cifar     --dataset '' --data-dir DIR --epochs E --warmup-epochs W
    flexnet_16:     train_imagenet.py --preset flexnet-cifar --dataset '' --data-dir DIR --epochs E --warmup-epochs W
    ckcnn_16:       the flexnet-cifar recipe with --model ckcnn_16 (the CKConv paper's own recipe is not ours)

with the preset's warm-up scaled to the budget (10 of 210 epochs, 5 of 350: W = round(E x that fraction), at
least 1 from 2 epochs on). The test set is the validation set (the papers' protocol); top-1 is read from the run's
summary.csv, and images/s is the trainer's own figure for each epoch's training batches (its last log line of the
epoch: batch size / mean step time, data loading included), s/epoch the training images over it.

--minutes M gives each model about M minutes: a few timed training steps (batch 64, 32 px, random data, on the
device) estimate an epoch (training plus one evaluation) and the number of epochs that fit; FlexNet's masks grow in
training, and its steps with them, so its estimate is optimistic.

Ablations of the SMPConv paper's Tables 6-9 (smp_flexnet_16 only; models kwargs through --model-kwargs):
--fixed-points / --fixed-radius keep the point positions / radii at their initial values (Table 6), --point-std
the spread of the initial positions (Table 7: 0.05 default, 0.2, 0.3, 0.5), --radius the initial radius (Table 8:
0.12 default, 0.18, 0.24, 0.3), --n-points the points per kernel (Table 9: 4, 8, 16 default, 32, 64).

--data is the JPEG archive (default ../shared/data/cifar10-jpeg.tar.gz beside the repository; extracted into a
temporary folder) or an extracted folder (its train/ and test/). A smoke run trains one-block models for two
batches of 4 images at 16 px and evaluates 20 test images.
"""
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import SMOKE_NOTE, bench_parser, cifar10_folder, cifar10_options, machine_line, parse_args, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ('smp_flexnet_16', 'flexnet_16', 'ckcnn_16')
# model -> (preset, the preset's epochs and warm-up epochs)
RECIPES = {'smp_flexnet_16': ('smp-cifar', 210, 10), 'flexnet_16': ('flexnet-cifar', 350, 5),
           'ckcnn_16': ('flexnet-cifar', 350, 5)}
# SMPConv paper: Table 4 top-1; Table 1 images/s and s/epoch on an RTX 3090, batch 64, 32 px
PAPER_TOP1 = {'smp_flexnet_16': '93.0', 'flexnet_16': '92.2', 'ckcnn_16': '72.1'}
PAPER_SPEED = {'smp_flexnet_16': '4258.4 img/s, 40.1 s/epoch', 'flexnet_16': '1923.4 img/s, 92.9 s/epoch',
               'ckcnn_16': '–'}
TRAIN_LINE = re.compile(r'Train (\d+) \[\s*(\d+)/(\d+)\] .* ([\d,.]+) img/s')


def warmup_epochs(model, epochs):
    _, full, warm = RECIPES[model]
    return 0 if epochs < 2 else max(1, round(warm * epochs / full))


def smp_kwargs(args):
    """The --model-kwargs of the ablation options (smp_flexnet_16), or []."""
    conv = {}
    if args.fixed_points:
        conv['learn_points'] = False
    if args.fixed_radius:
        conv['learn_radius'] = False
    if args.point_std is not None:
        conv['point_std'] = args.point_std
    if args.radius is not None:
        conv['radius'] = args.radius
    kwargs = [f'n_points={args.n_points}'] if args.n_points else []
    return kwargs + ([f'conv_kwargs={conv!r}'] if conv else [])


def trainer_command(model, data_dir, epochs, args, run_dir):
    preset = RECIPES[model][0]
    cmd = [sys.executable, str(ROOT / 'train_imagenet.py'), '--preset', preset, '--model', model, '--dataset', '',
           '--data-dir', str(data_dir), '--epochs', str(epochs), '--warmup-epochs', str(warmup_epochs(model, epochs)),
           '--batch-size', str(args.batch_size), '--workers', str(args.workers), '--output', str(run_dir.parent),
           '--experiment', run_dir.name, '--log-interval', '50']
    if args.amp:
        cmd.append('--amp')
    kwargs = smp_kwargs(args) if model == 'smp_flexnet_16' else []
    if args.smoke:
        kwargs.append('widths=(24,)')
        cmd += ['--img-size', '16', '--max-train-batches', '2', '--bn-recalibrate', '1']
    if kwargs:
        cmd += ['--model-kwargs'] + kwargs
    return cmd


def run_trainer(cmd, batch_size, threads):
    """Runs the trainer, echoing its progress lines; returns {epoch: (training images/s, images trained)}.

    Images/s of an epoch: the images of its batches 2..N over the time between the log lines of batch 1 and batch N
    as they arrive (the first batch, which pays for warm-up, left out; data loading included); the trainer's own
    figure (whole images/s) for an epoch of one batch."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    speed, first, tail = {}, {}, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            tail = (tail + [line])[-30:]
            m = TRAIN_LINE.search(line)
            if m:
                epoch, done, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
                if done == 1:
                    first[epoch] = now
                if done == total:
                    ips = (total - 1) * batch_size / (now - first[epoch]) if total > 1 else \
                        float(m.group(4).replace(',', ''))
                    speed[epoch] = (ips, total * batch_size)
            if m or 'Epoch ' in line or 'error' in line.lower():
                print(line, end='', flush=True)
    if proc.returncode:
        raise RuntimeError(f'the trainer stopped with exit code {proc.returncode}: {" ".join(cmd)}\n{"".join(tail)}')
    return speed


def probe_epochs(model, minutes, n_train, n_test, args):
    """Epochs of `model` that fit in `minutes`: training steps timed on random batches (batch, 32 px, the device),
    an epoch = its training steps x 1.1 (data) + an evaluation at a third of a step per batch."""
    import timm

    import timm_smpconv  # noqa: F401
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    net = timm.create_model(model).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = min(times[1:])
    epoch_s = math.ceil(n_train / args.batch_size) * step * 1.1 + math.ceil(n_test / args.batch_size) * step / 3
    return max(1, int(minutes * 60 // epoch_s)), args.batch_size / step


def report(results, args, n_train, n_test, wall_s, command):
    ablation = ' '.join(smp_kwargs(args))
    lines = [
        '# SMPConv paper CIFAR-10 experiments on real data: test top-1 per epoch and training throughput'
        + (SMOKE_NOTE if args.smoke else ''),
        '',
        machine_line(command, args.threads) + ' Device: '
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU') + '.',
        '',
        f'Data: {n_train:,} training images' + (f' ({args.train_per_class} per class)' if args.train_per_class else '')
        + f', {n_test:,} test images (the test set is the validation set, as in both papers); a JPEG copy of CIFAR-10 '
        '(about quality 75): accuracies sit a little below the lossless original\'s. Each model trains with its '
        'paper\'s recipe (`--preset smp-cifar`; `--preset flexnet-cifar`, also for ckcnn_16) for the budget below, '
        f'batch {args.batch_size}' + (', bf16 autocast' if args.amp else '') + '; the whole script took '
        f'{wall_s / 60:.1f} min.' + (f' Ablation (smp_flexnet_16): `--model-kwargs {ablation}`.' if ablation else ''),
        '',
        '| model | epochs (warm-up) | best test top-1 | final test top-1 | paper top-1 (Table 4, full recipe) '
        '| training img/s, mean over epochs | s/epoch (training) | paper (Table 1, RTX 3090) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    mean_speed = {}
    for r in results:
        top1, speeds = r['top1'], list(r['speed'].values())
        speed = mean_speed[r['model']] = sum(ips for ips, _ in speeds) / len(speeds)
        epoch_s = sum(n / ips for ips, n in speeds) / len(speeds)
        lines.append(f'| {r["model"]} | {r["epochs"]} ({r["warmup"]}) | {max(top1):.2f}% (epoch {top1.index(max(top1))}) '
                     f'| {top1[-1]:.2f}% | {PAPER_TOP1[r["model"]]} | {speed:,.1f} | {epoch_s:,.1f} | '
                     f'{PAPER_SPEED[r["model"]]} |')
    if 'smp_flexnet_16' in mean_speed and 'flexnet_16' in mean_speed:
        ratio = mean_speed['smp_flexnet_16'] / mean_speed['flexnet_16']
        lines += ['', f'Training throughput smp_flexnet_16 / flexnet_16: {ratio:.2f}x (paper, Table 1: 4258.4 / 1923.4 '
                  '= 2.21x on an RTX 3090).']
    lines += ['', 'Test top-1 (%) and training img/s per epoch (images/s: batches 2..N of the epoch over their wall '
              'time as the trainer logs them, data loading included):', '']
    for r in results:
        per = ', '.join(f'{e}: {t:.2f} ({r["speed"][e][0]:,.1f})' if e in r['speed'] else f'{e}: {t:.2f}'
                        for e, t in enumerate(r['top1']))
        lines.append(f'- {r["model"]}: {per}')
    return lines


def main(argv=None):
    parser = bench_parser(__doc__, 'cifar10.md')
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument('--epochs', type=int, default=None, help='epochs per model')
    budget.add_argument('--minutes', type=float, default=None, help='about this many minutes per model')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS, help='models to train')
    cifar10_options(parser, train_per_class=0, workers=2)
    parser.add_argument('--batch-size', type=int, default=64, help='batch size (default: 64, the papers\')')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast (the trainer\'s --amp)')
    g = parser.add_argument_group('SMPConv paper ablations (smp_flexnet_16), Tables 6-9')
    g.add_argument('--fixed-points', action='store_true', help='point positions not learned (Table 6)')
    g.add_argument('--fixed-radius', action='store_true', help='radii not learned (Table 6)')
    g.add_argument('--point-std', type=float, default=None, help='std of the initial positions (Table 7; default 0.05)')
    g.add_argument('--radius', type=float, default=None, help='initial radius (Table 8; default 0.12)')
    g.add_argument('--n-points', type=int, default=None, help='points per kernel (Table 9; default 16)')
    args = parse_args(parser, argv)
    if args.epochs is None and args.minutes is None and not args.smoke:
        parser.error('give the budget: --epochs E or --minutes M')
    test_per_class = None
    if args.smoke:
        args.epochs, args.minutes, args.train_per_class, test_per_class, args.batch_size = 1, None, 2, 2, 4
    command = ' '.join(['python benchmarks/cifar10.py'] + list(sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = cifar10_folder(args.data, Path(tmp) / 'data', args.train_per_class or None, test_per_class)
        n_train = sum(1 for _ in (data_dir / 'train').glob('*/*.jpg'))
        n_test = sum(1 for _ in (data_dir / 'test').glob('*/*.jpg'))
        runs = args.runs or Path(tmp) / 'runs'
        for model in args.models:
            epochs = args.epochs
            if epochs is None:
                epochs, probe = probe_epochs(model, args.minutes, n_train, n_test, args)
                print(f'cifar10: {model}: {probe:,.1f} img/s in the probe: {epochs} epochs in {args.minutes:g} min',
                      flush=True)
            run_dir = runs / model
            speed = run_trainer(trainer_command(model, data_dir, epochs, args, run_dir), args.batch_size, args.threads)
            with open(run_dir / 'summary.csv') as f:
                top1 = [float(r['eval_top1']) for r in csv.DictReader(f)]
            results.append(dict(model=model, epochs=epochs, warmup=warmup_epochs(model, epochs), top1=top1,
                                speed=speed))
    lines = report(results, args, n_train, n_test, time.perf_counter() - t_start, command)
    write_results(args.out, lines)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
