#!/usr/bin/env python3
""" Train or fine-tune timm_smpconv models (or any timm model) on timm's pipeline.

Single process:   python train_imagenet.py [--data-dir DIR] [--model smpconv_t] ...
Distributed:      torchrun --nproc_per_node=N train_imagenet.py --data-dir DIR ...
                  (CUDA uses NCCL; --device cpu uses gloo)

Without --data-dir the built-in digits dataset (scikit-learn's 1,797 real 8x8 handwritten digits,
fixed 1,438/359 split) is used with the 'digits' preset: a short CPU run of a small SMPConv model.
With --data-dir the defaults are the SMPConv paper's ImageNet recipe for SMPConv-T (300 epochs,
AdamW lr 4e-3 at total batch 2048, weight decay 0.05, cosine with 10 warm-up epochs, RandAugment
rand-m9-mstd0.5-inc1, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, random erasing 0.25, drop path
0.1, EMA 0.9999, radius lr x0.1 and radius clamp [1e-3, 1]). --preset picks other recipes.

Flags follow timm's train.py names. Output (under --output/<experiment>): last.pth.tar,
model_best.pth.tar, checkpoint-N.pth.tar (timm's CheckpointSaver format, EMA inside),
summary.csv, curves.png, args.yaml.
"""
import argparse
import csv
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from functools import partial

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_checkpoint, resume_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter,
    CheckpointSaver,
    ModelEmaV3,
    NativeScaler,
    accuracy,
    dispatch_clip_grad,
    distribute_bn,
    init_distributed_device,
    random_seed,
    reduce_tensor,
    reparameterize_model,
    update_summary,
)

import timm_smpconv  # noqa: F401  (registers our models)
from timm_smpconv import anti_aliasing_penalty, clamp_smp_radius_, param_groups_smp
from timm_smpconv.data import DIGITS_MEAN, DIGITS_NUM_CLASSES, DIGITS_STD, DigitsDataset

_logger = logging.getLogger('train')

# Named recipes: each sets defaults; flags given on the command line still win.
PRESETS = {
    # the SMPConv paper's ImageNet recipe for SMPConv-T (the script's defaults)
    'imagenet': dict(),
    # built-in data: a small SMPConv (mobile layout, kernels sized for 32 px inputs) on the digits
    'digits': dict(
        model='smpconv_mobile31', model_kwargs=dict(kernel_sizes=[13, 7, 5, 5], n_points=[21, 6, 3, 3], small_kernel_size=3),
        img_size=32, batch_size=64, grad_accum_steps=1, epochs=12, lr=4e-3, warmup_epochs=1, min_lr=1e-5,
        weight_decay=0.05, aa=None, mixup=0., cutmix=0., smoothing=0.1, reprob=0., drop_path=0., hflip=0.,
        color_jitter=0., scale=[0.75, 1.0], ratio=[0.9, 1.1], model_ema=True, model_ema_decay=0.998, model_ema_warmup=True,
        log_interval=10, workers=0, crop_pct=1.0, interpolation='bilinear',
    ),
    # built-in data read as sequences: the 8x8 digits as 64 steps of SMP-TCN (the SMPConv paper's sequence
    # recipe: Adam with coupled L2 1e-5, radius lr x0.1 and clamp [1e-4, 1]); `--model flextcn_2.digits`,
    # `--model smp_tcn.pdigits` (a fixed permutation of the steps, pMNIST-style) take the same recipe
    'seq-digits': dict(
        model='smp_tcn.digits', img_size=8, batch_size=64, grad_accum_steps=1, epochs=40, lr=2e-3, warmup_epochs=2,
        min_lr=1e-6, opt='adam', weight_decay=1e-5, aa=None, mixup=0., cutmix=0., smoothing=0., reprob=0.,
        drop_path=0., hflip=0., color_jitter=0., scale=[1.0, 1.0], ratio=[1.0, 1.0], model_ema=True,
        model_ema_decay=0.99, model_ema_warmup=True, radius_clamp=[1e-4, 1.0], no_decay_patterns=['*.points'],
        log_interval=10, workers=0, crop_pct=1.0, interpolation='bilinear',
    ),
    # SMPConv paper, CIFAR-10 (Table 4): Adam with coupled L2 1e-5, lr 5e-3, 210 epochs (the model's
    # block_drop_rate default is the paper's in-block dropout 0.1)
    'smp-cifar': dict(
        model='smp_flexnet_16', dataset='torch/cifar10', num_classes=10, img_size=32, batch_size=64,
        grad_accum_steps=1, epochs=210, warmup_epochs=10, lr=5e-3, min_lr=1e-6, opt='adam', weight_decay=1e-5,
        drop=0., aa=None, mixup=0., cutmix=0., smoothing=0., reprob=0., drop_path=0., color_jitter=0.,
        scale=[0.6, 1.0], model_ema=False, radius_clamp=[1e-4, 1.0], no_decay_patterns=['*.points'],
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=1.0,
    ),
    # FlexConv paper, FlexNet-16 on CIFAR-10: Adam lr 0.01, no weight decay, 350 epochs (in-block dropout
    # 0.2 is the model's block_drop_rate default)
    'flexnet-cifar': dict(
        model='flexnet_16', dataset='torch/cifar10', num_classes=10, img_size=32, batch_size=64,
        grad_accum_steps=1, epochs=350, warmup_epochs=5, lr=0.01, min_lr=1e-6, opt='adam', weight_decay=0.,
        drop=0., aa=None, mixup=0., cutmix=0., smoothing=0., reprob=0., drop_path=0., color_jitter=0.,
        scale=[0.6, 1.0], model_ema=False, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=1.0,
    ),
}


class TrainingError(RuntimeError):
    """A problem with the run's set-up or state, reported with a clear message and exit code 2."""


def _kv(text):
    key, _, value = text.partition('=')
    return key, yaml.safe_load(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help once: a help text that states its own default (e.g. "the model's") keeps it."""

    def _get_help_string(self, action):
        if '(default:' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument('--preset', default=None, choices=sorted(PRESETS),
                   help='named recipe whose values become the defaults (default: imagenet with --data-dir, '
                        'digits without)')

    g = p.add_argument_group('Data')
    g.add_argument('--data-dir', default=None,
                   help='dataset root (ImageFolder / tar, or the download root for torch/ datasets); '
                        'omit to train on the built-in digits')
    g.add_argument('--dataset', default='',
                   help="timm dataset name: '' (folder or tar), torch/NAME, hfds/NAME, wds/NAME")
    g.add_argument('--train-split', default='train', help='training split (folder name)')
    g.add_argument('--val-split', default='validation', help="validation split ('validation' also finds val/)")
    g.add_argument('--dataset-download', action='store_true', help='allow torch/ datasets to download')
    g.add_argument('--class-map', default='', help='class map file for the folder dataset')
    g.add_argument('--input-img-mode', default=None, help="image mode, e.g. 'RGB' or 'L'")
    g.add_argument('--workers', '-j', type=int, default=4, help='data loading processes per rank')
    g.add_argument('--pin-mem', action='store_true', help='pin loader memory (CUDA)')
    g.add_argument('--no-prefetcher', action='store_true', help="disable timm's prefetching loader")

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='smpconv_t', help='timm model name')
    g.add_argument('--pretrained', action='store_true', help="load the model's default pretrained weights")
    g.add_argument('--pretrained-path', default=None,
                   help="fine-tune from this file (ours, timm's, or the authors' format); the classifier is "
                        "re-initialised")
    g.add_argument('--initial-checkpoint', default=None, help='load this checkpoint strictly before training')
    g.add_argument('--num-classes', type=int, default=None, help='number of classes (default: the dataset\'s)')
    g.add_argument('--in-chans', type=int, default=None, help='input channels')
    g.add_argument('--img-size', type=int, default=None, help='square input size (default: the model\'s)')
    g.add_argument('--crop-pct', type=float, default=None, help='validation centre crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean per channel')
    g.add_argument('--std', type=float, nargs='+', default=None, help='normalisation std per channel')
    g.add_argument('--interpolation', default='', help='resize interpolation (default: the model\'s)')
    g.add_argument('--kernel-sizes', type=int, nargs='+', default=None,
                   help='SMP kernel size per stage; continuous kernels are re-rendered when loading')
    g.add_argument('--kernel-resize', default=None, choices=['stretch', 'extend', 'none'],
                   help='how loaded SMP kernels map to new kernel sizes (see README)')
    g.add_argument('--drop', type=float, default=0., help='dropout before the classifier')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--model-kwargs', nargs='*', default={}, type=_kv, metavar='KEY=VALUE',
                   help='extra create_model kwargs, values in YAML (e.g. kernel_sizes=[51,49,47,13])')
    g.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')
    g.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm (CUDA, distributed)')
    g.add_argument('--dist-bn', default='reduce', choices=['reduce', 'broadcast', ''],
                   help='sync BatchNorm statistics across ranks after each epoch when not using SyncBN')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    g.add_argument('--no-decay-patterns', nargs='*', default=[],
                   help="extra parameter-name patterns without weight decay (e.g. '*.points')")
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay')
    g.add_argument('--radius-lr-scale', type=float, default=0.1,
                   help='lr multiplier of SMP radii and FlexConv mask parameters (no weight decay)')
    g.add_argument('--radius-clamp', type=float, nargs=2, default=[1e-3, 1.0], metavar=('MIN', 'MAX'),
                   help='clamp SMP radii after every optimizer step')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value')
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'], help='gradient clipping mode')
    g.add_argument('--grad-accum-steps', type=int, default=2, help='micro-batches per optimizer step')
    g.add_argument('--aliasing-reg', type=float, default=0.,
                   help='anti-aliasing regulariser factor (lambda) for FlexConv models; the paper uses 0.1 (0: off)')
    g.add_argument('--aliasing-target', default='gabor', choices=['gabor', 'gabor+mask'],
                   help='regulariser target: f_MAGNet+ (gabor) or f_FlexConv+ (gabor+mask)')

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                   help='step the schedule on every optimizer update instead of every epoch')
    g.add_argument('--lr', type=float, default=4e-3, help='peak learning rate (not scaled by batch size)')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='warm-up start lr')
    g.add_argument('--min-lr', type=float, default=1e-6, help='final lr of the cosine')
    g.add_argument('--epochs', type=int, default=300, help='epochs to train')
    g.add_argument('--warmup-epochs', type=int, default=10, help='warm-up epochs')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at min lr after the schedule')
    g.add_argument('--decay-epochs', type=float, default=90, help='step schedule period')
    g.add_argument('--decay-rate', type=float, default=0.1, help='step schedule factor')

    g = p.add_argument_group('Augmentation and regularisation')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop scale')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='random-resized-crop ratio')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='colour jitter strength')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="auto-augment policy ('' or None: off)")
    g.add_argument('--aug-repeats', type=int, default=0, help='repeated augmentation count')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float, nargs=2, default=None, help='cutmix min/max ratio')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'], help='mixup mode')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')

    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True,
                   help='keep an EMA of the weights (ModelEmaV3) and evaluate it')
    g.add_argument('--model-ema-decay', type=float, default=0.9999, help='EMA decay')
    g.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warm-up')

    g = p.add_argument_group('Run')
    g.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda if available)")
    g.add_argument('--amp', action='store_true', help='mixed precision (CUDA: bf16/fp16, CPU: bf16 autocast)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'], help='AMP dtype')
    g.add_argument('--batch-size', '-b', type=int, default=256, help='batch size per rank')
    g.add_argument('--validation-batch-size', type=int, default=None, help='validation batch size per rank')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--output', default='output/train', help='output root')
    g.add_argument('--experiment', default='', help='run folder name (default: date-model-size)')
    g.add_argument('--resume', default='', help='resume from this checkpoint (model, optimizer, EMA, epoch)')
    g.add_argument('--auto-resume', action='store_true', help='resume from last.pth.tar in the run folder if any')
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore the optimizer when resuming')
    g.add_argument('--checkpoint-hist', type=int, default=3, help='epoch checkpoints kept')
    g.add_argument('--recovery-interval', type=int, default=0,
                   help='write a recovery checkpoint every N batches inside an epoch (0: off)')
    g.add_argument('--eval-metric', default='top1', help='metric for the best checkpoint')
    g.add_argument('--log-interval', type=int, default=50, help='batches between log lines')
    g.add_argument('--eval-only', action='store_true', help='evaluate --checkpoint and exit')
    g.add_argument('--checkpoint', default='', help='checkpoint for --eval-only')
    g.add_argument('--reparam', action='store_true', help='reparameterize before --eval-only evaluation')
    g.add_argument('--stop-after-epochs', type=int, default=0,
                   help='end this invocation after N epochs (continue later with --resume/--auto-resume)')
    g.add_argument('--max-train-batches', type=int, default=0, help='use only the first N batches of each epoch')
    g.add_argument('--dist-backend', default=None, help='override the process-group backend')
    g.add_argument('--dist-url', default='env://', help='process-group init url')
    return p


def parse_args(argv=None):
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    preset = pre.preset or ('imagenet' if pre.data_dir else 'digits')
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.preset = preset
    if isinstance(args.model_kwargs, list):
        args.model_kwargs = dict(args.model_kwargs)
    if args.aa in ('', 'none', 'None'):
        args.aa = None
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return args


def check_args(args):
    """Input errors that must stop the run before anything is built."""
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise TrainingError('--batch-size and --grad-accum-steps must be >= 1')
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax) and args.batch_size % 2:
        raise TrainingError(f'Mixup/CutMix mixes pairs of samples and needs an even --batch-size, got {args.batch_size}')
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise TrainingError(f'--data-dir {args.data_dir!r} does not exist or is not a directory')
        if not args.dataset and not any(os.scandir(args.data_dir)):
            raise TrainingError(f'--data-dir {args.data_dir!r} is empty')
    if not timm.is_model(args.model.split('.')[0]):
        raise TrainingError(f'unknown model {args.model!r}; ours: {", ".join(timm.list_models(module="smpconv"))}')
    for path in (args.resume, args.pretrained_path, args.initial_checkpoint, args.checkpoint):
        if path and not os.path.isfile(path):
            raise TrainingError(f'checkpoint {path!r} not found')
    if args.eval_only and not args.checkpoint:
        raise TrainingError('--eval-only needs --checkpoint FILE')


def load_datasets(args):
    """(train, val, num_classes) from --data-dir/--dataset, or the built-in digits."""
    if args.data_dir is None and not args.dataset:
        return DigitsDataset('train'), DigitsDataset('val'), DIGITS_NUM_CLASSES
    common = dict(root=args.data_dir, download=args.dataset_download, batch_size=args.batch_size,
                  class_map=args.class_map)
    if args.input_img_mode:
        common['input_img_mode'] = args.input_img_mode
    try:
        train = create_dataset(args.dataset, split=args.train_split, is_training=True,
                               repeats=0, seed=args.seed, **common)
        val = create_dataset(args.dataset, split=args.val_split, is_training=False, **common)
    except Exception as e:  # timm raises various types for empty/malformed roots
        raise TrainingError(f'could not read dataset {args.dataset or "folder"} at {args.data_dir!r}: {e}') from e
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f'dataset at {args.data_dir!r} has no images ({len(train)} train, {len(val)} val)')
    num_classes = None
    reader = getattr(train, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        num_classes = len(reader.class_to_idx)
    elif hasattr(train, 'classes'):
        num_classes = len(train.classes)
    return train, val, num_classes


def create_training_model(args, num_classes):
    kwargs = dict(args.model_kwargs)
    if args.kernel_sizes:
        kwargs['kernel_sizes'] = tuple(args.kernel_sizes)
    if args.kernel_resize:
        kwargs['kernel_resize'] = args.kernel_resize
    if args.in_chans:
        kwargs['in_chans'] = args.in_chans
    if args.pretrained_path:
        # like timm's train.py: load the file, re-initialise the classifier
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained or bool(args.pretrained_path), num_classes=num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, **kwargs)
    except TrainingError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise TrainingError(f'could not create {args.model}: {e}') from e
    if args.initial_checkpoint:
        _load_weights(model, args.initial_checkpoint, use_ema=False)
    return model


def _load_weights(model, path, use_ema):
    try:
        load_checkpoint(model, path, use_ema=use_ema)
    except Exception as e:
        raise TrainingError(f'could not load checkpoint {path!r}: {e}') from e


def setup_logging(rank):
    fmt = '%(asctime)s %(message)s' if rank == 0 else f'%(asctime)s [rank {rank}] %(message)s'
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, datefmt='%H:%M:%S',
                        stream=sys.stdout, force=True)
    for noisy in ('timm', 'fvcore'):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def unwrap(model):
    model = model.module if hasattr(model, 'module') else model
    return getattr(model, '_orig_mod', model)


def build_data_config(args, model):
    """timm's data config for the model with the flags applied (digits statistics for the built-in data)."""
    chans = args.in_chans or getattr(model, 'in_chans', 3)  # e.g. 1 for the sequential-MNIST models
    data_config = resolve_data_config(
        dict(input_size=(chans, args.img_size, args.img_size) if args.img_size else None, crop_pct=args.crop_pct,
             mean=args.mean, std=args.std, interpolation=args.interpolation), model=model)
    if args.data_dir is None and not args.dataset and args.mean is None:
        data_config['mean'], data_config['std'] = DIGITS_MEAN, DIGITS_STD
    return data_config


def create_eval_loader(dataset, data_config, args, device):
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher, persistent_workers=False)


def validate(model, loader, args, device, amp_ctx):
    loss_fn = nn.CrossEntropyLoss().to(device)
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for inputs, target in loader:
            if args.no_prefetcher:
                inputs, target = inputs.to(device), target.to(device)
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                output = model(inputs)
            output = output.float()
            loss = loss_fn(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            if args.distributed:
                loss = reduce_tensor(loss.detach(), args.world_size)
                acc1 = reduce_tensor(acc1, args.world_size)
                acc5 = reduce_tensor(acc5, args.world_size)
            n = inputs.shape[0]
            losses.update(loss.item(), n)
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
    return OrderedDict([('loss', losses.avg), ('top1', top1.avg), ('top5', top5.avg)])


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, model_ema, scaler,
                    mixup_fn, amp_ctx, saver, num_updates):
    model.train()
    losses, batch_time, data_time = AverageMeter(), AverageMeter(), AverageMeter()
    accum = args.grad_accum_steps
    num_batches = len(loader) if not args.max_train_batches else min(len(loader), args.max_train_batches)
    updates_per_epoch = (num_batches + accum - 1) // accum
    last_batch = num_batches - 1
    end = time.time()
    t_epoch = end
    optimizer.zero_grad()
    for batch_idx, (inputs, target) in enumerate(loader):
        if batch_idx > last_batch:
            break
        need_update = (batch_idx + 1) % accum == 0 or batch_idx == last_batch
        if args.no_prefetcher:
            inputs, target = inputs.to(device), target.to(device)
            if mixup_fn is not None:
                inputs, target = mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        data_time.update(time.time() - end)

        sync_ctx = model.no_sync if (args.distributed and not need_update) else nullcontext
        with sync_ctx():
            with amp_ctx():
                output = model(inputs)
                loss = loss_fn(output, target)
                if args.aliasing_reg > 0:
                    loss = loss + anti_aliasing_penalty(
                        unwrap(model), target=args.aliasing_target, factor=args.aliasing_reg)
            loss_value = loss.item()  # the one host sync per micro-batch: the check and the meter share it
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f'non-finite loss ({loss_value}) at epoch {epoch}, batch {batch_idx}: stopping; the last '
                    f'checkpoint written is intact')
            if scaler is not None:
                scaler(loss / accum, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                       parameters=model.parameters(), need_update=need_update)
            else:
                (loss / accum).backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        losses.update(loss_value, inputs.shape[0])
        if need_update:
            optimizer.zero_grad()
            clamp_smp_radius_(unwrap(model), *args.radius_clamp)
            num_updates += 1
            if model_ema is not None:
                model_ema.update(unwrap(model), step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        batch_time.update(time.time() - end)
        end = time.time()
        if args.rank == 0 and (batch_idx % args.log_interval == 0 or batch_idx == last_batch):
            lr = optimizer.param_groups[0]['lr']
            ips = inputs.shape[0] * args.world_size / max(batch_time.avg, 1e-9)
            done = batch_idx + 1
            eta = (time.time() - t_epoch) / done * (num_batches - done)
            _logger.info(
                f'Train {epoch} [{done:>4d}/{num_batches}] loss {losses.val:.4f} ({losses.avg:.4f}) lr {lr:.3e} '
                f'{ips:,.0f} img/s data {data_time.avg * 1e3:.0f} ms ETA {eta:.0f} s')
        if saver is not None and args.recovery_interval and (batch_idx + 1) % args.recovery_interval == 0 \
                and batch_idx != last_batch:
            saver.save_recovery(epoch, batch_idx=batch_idx)
    if args.distributed:
        loss_avg = reduce_tensor(torch.tensor(losses.avg, device=device), args.world_size).item()
    else:
        loss_avg = losses.avg
    return OrderedDict([('loss', loss_avg)]), num_updates, updates_per_epoch


def plot_curves(summary_csv, out_png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r['epoch']) for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax1.plot(epochs, [float(r['train_loss']) for r in rows], label='train')
    ax1.plot(epochs, [float(r['eval_loss']) for r in rows], label='val')
    if 'eval_ema_loss' in rows[0]:
        ax1.plot(epochs, [float(r['eval_ema_loss']) for r in rows], label='val (EMA)')
    ax1.set_title('loss')
    ax2.plot(epochs, [float(r['eval_top1']) for r in rows], label='val top-1')
    if 'eval_ema_top1' in rows[0]:
        ax2.plot(epochs, [float(r['eval_ema_top1']) for r in rows], label='val top-1 (EMA)')
    ax2.set_title('accuracy (%)')
    ax3.plot(epochs, [float(r['lr']) for r in rows])
    ax3.set_title('learning rate (end of epoch)')
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(args):
    device = init_distributed_device(args)
    setup_logging(args.rank)
    check_args(args)
    if args.distributed:
        _logger.info(f'Distributed: {args.world_size} processes, backend '
                     f'{torch.distributed.get_backend()}, device {device}')
    random_seed(args.seed, args.rank)

    dataset_train, dataset_eval, num_classes = load_datasets(args)
    if args.data_dir is None and not args.dataset:
        _logger.info(f"No --data-dir: training on the built-in digits dataset (scikit-learn, {len(dataset_train)} "
                     f"train / {len(dataset_eval)} val real 8x8 images, 10 classes), preset '{args.preset}'")
    args.num_classes = args.num_classes or num_classes
    if not args.num_classes:
        raise TrainingError('could not infer the number of classes; pass --num-classes')

    model = create_training_model(args, args.num_classes)
    if args.eval_only:
        return evaluate_checkpoint(args, model, dataset_eval, device)
    if args.rank == 0:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} params, '
                     f'{args.num_classes} classes')
    data_config = build_data_config(args, model)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn and device.type == 'cuda':
        model = convert_sync_batchnorm(model)

    no_decay = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    no_decay |= set(args.no_decay_patterns)
    group_fn = partial(param_groups_smp, weight_decay=args.weight_decay, lr_scale=args.radius_lr_scale,
                       no_weight_decay_list=no_decay, layer_decay=args.layer_decay)
    opt_kwargs = optimizer_kwargs(args)
    opt_kwargs.pop('layer_decay', None)
    try:
        optimizer = create_optimizer_v2(model, param_group_fn=group_fn, **opt_kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise TrainingError(f'could not create optimizer {args.opt!r}: {e}') from e

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if args.amp:
        if device.type == 'cpu' and amp_dtype == torch.float16:
            raise TrainingError('--amp on CPU supports --amp-dtype bfloat16 only')
        amp_ctx = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
    else:
        amp_ctx = nullcontext
    scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    run_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    if args.distributed:  # one folder for all ranks, even if their clocks straddle a second
        names = [run_name]
        torch.distributed.broadcast_object_list(names, src=0)
        run_name = names[0]
    output_dir = os.path.join(args.output, run_name)
    os.makedirs(output_dir, exist_ok=True)  # every rank may get here first (timm's get_outdir races)
    resume_path = args.resume
    if not resume_path and args.auto_resume and os.path.isfile(os.path.join(output_dir, 'last.pth.tar')):
        resume_path = os.path.join(output_dir, 'last.pth.tar')
    start_epoch = 0
    if resume_path:
        try:
            start_epoch = resume_checkpoint(
                model, resume_path, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=scaler,
                log_info=args.rank == 0)
        except Exception as e:
            raise TrainingError(f'could not resume from {resume_path!r}: {e}') from e
        if model_ema is not None:
            _load_weights(model_ema.module, resume_path, use_ema=True)
        _logger.info(f'Resumed from {resume_path} at epoch {start_epoch}')

    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn, collate_fn = None, None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.no_prefetcher:
            mixup_fn = Mixup(**mixup_args)
        else:
            collate_fn = FastCollateMixup(**mixup_args)
    loader_common = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        persistent_workers=False,  # fresh worker RNG each epoch: exact resume at epoch boundaries
    )
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, num_aug_repeats=args.aug_repeats, interpolation=data_config['interpolation'],
        collate_fn=collate_fn, **loader_common)
    loader_eval = create_eval_loader(dataset_eval, data_config, args, device)
    if len(loader_train) == 0:
        raise TrainingError(f'{len(dataset_train)} training images give no full batch of {args.batch_size}')

    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device)

    num_batches = len(loader_train) if not args.max_train_batches else min(len(loader_train), args.max_train_batches)
    updates_per_epoch = (num_batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric='loss' in args.eval_metric),
        updates_per_epoch=updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = None
    if args.rank == 0:
        saver = CheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing='loss' in args.eval_metric,
            max_history=args.checkpoint_hist, unwrap_fn=unwrap)
        if resume_path and os.path.dirname(os.path.abspath(resume_path)) == os.path.abspath(output_dir):
            saver.load_state_dict_from_checkpoint(resume_path)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump({k: v for k, v in vars(args).items() if not isinstance(v, torch.device)}, f)
        _logger.info(f'Output: {output_dir}')
        eff = args.batch_size * args.grad_accum_steps * args.world_size
        _logger.info(f'Training {num_epochs} epochs from epoch {start_epoch}: {len(dataset_train)} images, '
                     f'{num_batches} batches/epoch, effective batch {eff} ({args.batch_size} x '
                     f'{args.grad_accum_steps} accumulation x {args.world_size} ranks), lr {args.lr:g}')

    num_updates = start_epoch * updates_per_epoch
    best = None
    t_start = time.time()
    end_epoch = num_epochs if not args.stop_after_epochs else min(num_epochs, start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        # every epoch's randomness depends only on (seed, epoch, rank): resuming reproduces it exactly
        random_seed(args.seed + epoch, args.rank)
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        if mixup_active and collate_fn is not None and hasattr(collate_fn, 'mixup_enabled'):
            collate_fn.mixup_enabled = True
        t0 = time.time()
        train_metrics, num_updates, _ = train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler, model_ema, scaler,
            mixup_fn, amp_ctx, saver, num_updates)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce') and not args.sync_bn:
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = validate(model, loader_eval, args, device, amp_ctx)
        metrics_ema = None
        if model_ema is not None:
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
            metrics_ema = validate(model_ema, loader_eval, args, device, amp_ctx)
        if not args.sched_on_updates:
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        lr = optimizer.param_groups[0]['lr']
        if args.rank == 0:
            msg = (f'Epoch {epoch}: train loss {train_metrics["loss"]:.4f} | val loss {eval_metrics["loss"]:.4f} '
                   f'top-1 {eval_metrics["top1"]:.2f} top-5 {eval_metrics["top5"]:.2f}')
            if metrics_ema is not None:
                msg += f' | EMA top-1 {metrics_ema["top1"]:.2f} top-5 {metrics_ema["top5"]:.2f}'
            _logger.info(msg + f' | {time.time() - t0:.1f} s, {time.time() - t_start:.0f} s total')
            eval_row = OrderedDict(eval_metrics)
            if metrics_ema is not None:
                eval_row.update((f'ema_{k}', v) for k, v in metrics_ema.items())  # -> eval_ema_top1 ...
            update_summary(epoch, train_metrics, eval_row, os.path.join(output_dir, 'summary.csv'), lr=lr,
                           write_header=epoch == 0 or not os.path.exists(os.path.join(output_dir, 'summary.csv')))
            metric = eval_metrics[args.eval_metric]
            if metrics_ema is not None and 'loss' not in args.eval_metric:
                metric = max(metric, metrics_ema[args.eval_metric])
            best = saver.save_checkpoint(epoch, metric=metric)
    if args.rank == 0:
        plot_curves(os.path.join(output_dir, 'summary.csv'), os.path.join(output_dir, 'curves.png'))
        if best and best[0] is not None:
            _logger.info(f'Best {args.eval_metric}: {best[0]:.2f} (epoch {best[1]}); '
                         f'{time.time() - t_start:.0f} s of training; outputs in {output_dir}')
    return best


def evaluate_checkpoint(args, model, dataset_eval, device):
    """--eval-only: top-1/top-5 of the checkpoint's model and, if present, its EMA."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's saver stores the run's args
            ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    except Exception as e:
        raise TrainingError(f'could not read checkpoint {args.checkpoint!r} (corrupt or not a checkpoint): {e}') from e
    if not isinstance(ckpt, dict):
        raise TrainingError(f'checkpoint {args.checkpoint!r} holds a {type(ckpt).__name__}, not a state dict')
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    weights = [('model', ckpt.get('state_dict', ckpt.get('model', ckpt)))]
    for key in ('state_dict_ema', 'model_ema'):
        if key in ckpt:
            weights.append(('EMA', ckpt[key]))
    data_config = build_data_config(args, model)
    loader = create_eval_loader(dataset_eval, data_config, args, device)
    results = {}
    for name, sd in weights:
        sd = {k[7:] if k.startswith('module.') else k: v for k, v in sd.items()}
        if filter_fn is not None:
            sd = filter_fn(sd, model)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise TrainingError(f'checkpoint {args.checkpoint!r} does not fit {args.model}: {e}') from e
        net = reparameterize_model(model.eval()) if args.reparam else model
        net.to(device)
        metrics = validate(net, loader, args, device, nullcontext)
        results[name] = metrics
        if args.rank == 0:
            _logger.info(f'{name}{" (reparameterized)" if args.reparam else ""}: top-1 {metrics["top1"]:.2f} '
                         f'top-5 {metrics["top5"]:.2f} loss {metrics["loss"]:.4f}')
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except TrainingError as e:
        logging.getLogger('train').error(f'error: {e}')
        print(f'train_imagenet.py: error: {e}', file=sys.stderr)
        raise SystemExit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
