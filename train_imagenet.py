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

A drop-in for timm's train.py (timm 1.0.31): every option of timm's train.py is accepted with timm's meaning (or
refused with the reason, e.g. the NaFlex loader, which is for ViTs), the step and evaluation run on timm's task API
(timm.task: ClassificationTask, MultiLabelClassificationTask with --task multilabel, logit / feature / token
distillation with --kd-model-name) and its evaluators, the loss is timm's create_classification_loss (--loss), and
-c FILE reads a YAML file of defaults (checked against the flags). --task multilabel without --data-dir trains on
the built-in digit pairs (two digits side by side, the target the set of their classes). The defaults are the
SMPConv paper's recipe, not timm's: a run's first lines list every value that differs from timm's train.py default.
Output (under --output/<experiment>): last.pth.tar, model_best.pth.tar, checkpoint-N.pth.tar (timm's CheckpointSaver
format, EMA inside), milestone-N.pth.tar (--save-epochs), summary.csv, curves.png, args.yaml. --stop-epoch N stops
early with the schedule unchanged; the same command with --resume auto continues the run in place.
"""
import argparse
import csv
import functools
import importlib
import logging
import math
import os
import re
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AugMixDataset,
    FastCollateMixup,
    Mixup,
    MultiLabelTarget,
    create_dataset,
    create_loader,
    resolve_data_config,
)
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import (
    CLASS_WEIGHT_METHOD_KINDS,
    LOSS_TYPES,
    MULTI_LABEL_LOSS_TYPES,
    create_classification_loss,
    load_class_stats,
    resolve_class_weights,
)
from timm.models import reparameterize_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationEvaluator,
    ClassificationTask,
    DistillationTeacher,
    FeatureDistillationTask,
    LogitDistillationTask,
    MultiLabelClassificationEvaluator,
    MultiLabelClassificationTask,
    TokenDistillationTask,
    evaluation_sample_limit,
    load_task_ema_checkpoint,
    resume_task_checkpoint,
)
from timm.utils import (
    AverageMeter,
    CheckpointSaver,
    NativeScaler,
    ParseKwargs,
    distribute_bn,
    init_distributed_device,
    random_seed,
    reduce_tensor,
    set_jit_fuser,
    trim_summary,
    update_summary,
)

import timm_smpconv  # noqa: F401  (registers our models)
from timm_smpconv import anti_aliasing_penalty, clamp_smp_radius_, param_groups_smp
from timm_smpconv.data import (
    DIGIT_PAIRS_MEAN,
    DIGIT_PAIRS_STD,
    DIGITS_MEAN,
    DIGITS_NUM_CLASSES,
    DIGITS_STD,
    DigitPairsDataset,
    DigitsDataset,
    SequenceDataset,
    allow_zero_bit_posterize,
    channel_stats,
    is_sequence_dataset,
    load_sequence_splits,
    with_pad_crop,
)
from timm_smpconv.layers import RESIZE_MODES
from timm_smpconv.models import read_checkpoint, refused_pickle, unknown_model_message
from timm_smpconv.optim import RADIUS_LR_SCALE, RADIUS_RANGE_IMAGENET, RADIUS_RANGE_SMALL
from timm_smpconv.regularizers import ALIASING_TARGETS
from timm_smpconv.timm_train_args import TIMM_TRAIN_OPTIONS, TIMM_TRAIN_VERSION, timm_defaults

_logger = logging.getLogger('train')

# Named recipes: each sets defaults; flags given on the command line still win. A preset's `model_kwargs` belong
# to its own `model`: with another --model they are left out (and the run says so).
PRESETS = {
    # the SMPConv paper's ImageNet recipe for SMPConv-T (the script's defaults)
    'imagenet': dict(),
    # built-in data: a small SMPConv (mobile layout, kernels sized for 32 px inputs) on the digits
    'digits': dict(
        model='smpconv_mobile31', model_kwargs=dict(kernel_sizes=[13, 7, 5, 5], n_points=[21, 6, 3, 3], small_kernel_size=3),
        img_size=32, batch_size=64, grad_accum_steps=1, epochs=12, lr=4e-3, warmup_epochs=1, min_lr=1e-5,
        weight_decay=0.05, aa=None, mixup=0., cutmix=0., smoothing=0.1, reprob=0., drop_path=0., hflip=0.,
        color_jitter=0., scale=[0.75, 1.0], ratio=[0.9, 1.1], model_ema=True, model_ema_decay=0.998, model_ema_warmup=True,
        log_interval=10, workers=0, crop_pct=1.0, interpolation='bilinear', bn_recalibrate=8,
    ),
    # built-in data read as sequences: the 8x8 digits as 64 steps of SMP-TCN (the SMPConv paper's sequence
    # recipe: Adam with coupled L2 1e-5, radius lr x0.1 and clamp [1e-4, 1]); `--model flextcn_2.digits`,
    # `--model smp_tcn.pdigits` (a fixed permutation of the steps, pMNIST-style) take the same recipe
    'seq-digits': dict(
        model='smp_tcn.digits', img_size=8, batch_size=64, grad_accum_steps=1, epochs=40, lr=2e-3, warmup_epochs=2,
        min_lr=1e-6, opt='adam', weight_decay=1e-5, aa=None, mixup=0., cutmix=0., smoothing=0., reprob=0.,
        drop_path=0., hflip=0., color_jitter=0., scale=[1.0, 1.0], ratio=[1.0, 1.0], model_ema=True,
        model_ema_decay=0.99, model_ema_warmup=True, radius_clamp=list(RADIUS_RANGE_SMALL), no_decay_patterns=['*.points'],
        log_interval=10, workers=0, crop_pct=1.0, interpolation='bilinear', bn_recalibrate=8,
    ),
    # time series (--dataset npz or ts/NAME): the SMPConv paper's sequence recipe (its CharacterTrajectories
    # column: Adam with coupled L2 1e-5, lr 1e-4, 300 epochs with 5 warm-up epochs, batch 64, plain
    # cross-entropy, radius lr x0.1 and clamp [1e-4, 1], point positions not decayed); SMP-TCN with its kernels
    # sampled at the data's length; no image augmentation
    'sequence': dict(
        model='smp_tcn', batch_size=64, grad_accum_steps=1, epochs=300, lr=1e-4, warmup_epochs=5, min_lr=1e-6,
        opt='adam', weight_decay=1e-5, smoothing=0., drop=0., drop_path=0., aa=None, mixup=0., cutmix=0., reprob=0.,
        hflip=0., color_jitter=0., scale=None, ratio=None, interpolation='', model_ema=False,
        radius_clamp=list(RADIUS_RANGE_SMALL), no_decay_patterns=['*.points'], log_interval=10, workers=0,
        bn_recalibrate=8,
    ),
    # SMPConv paper, CIFAR-10 (Table 4): Adam with coupled L2 1e-5, lr 5e-3, 210 epochs (the model's
    # block_drop_rate default is the paper's in-block dropout 0.1). Both CIFAR presets: the papers' augmentation
    # (flip, random 32-px crop of the image padded by 4 px, then the resize to --img-size), validation on the test
    # split (torch/cifar10's, or an ImageFolder's test/ with --dataset '')
    'smp-cifar': dict(
        model='smp_flexnet_16', dataset='torch/cifar10', num_classes=10, batch_size=64,
        grad_accum_steps=1, epochs=210, warmup_epochs=10, lr=5e-3, min_lr=1e-6, opt='adam', weight_decay=1e-5,
        drop=0., aa=None, mixup=0., cutmix=0., smoothing=0., reprob=0., drop_path=0., color_jitter=0.,
        pad_crop=[32, 4], val_split='test', model_ema=False, radius_clamp=list(RADIUS_RANGE_SMALL),
        no_decay_patterns=['*.points'], mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD), crop_pct=1.0,
        bn_recalibrate=16,
    ),
    # FlexConv paper, FlexNet-16 on CIFAR-10: Adam lr 0.01, no weight decay, 350 epochs (in-block dropout
    # 0.2 is the model's block_drop_rate default)
    'flexnet-cifar': dict(
        model='flexnet_16', dataset='torch/cifar10', num_classes=10, batch_size=64,
        grad_accum_steps=1, epochs=350, warmup_epochs=5, lr=0.01, min_lr=1e-6, opt='adam', weight_decay=0.,
        drop=0., aa=None, mixup=0., cutmix=0., smoothing=0., reprob=0., drop_path=0., color_jitter=0.,
        pad_crop=[32, 4], val_split='test', model_ema=False, mean=list(IMAGENET_DEFAULT_MEAN),
        std=list(IMAGENET_DEFAULT_STD), crop_pct=1.0, bn_recalibrate=16,
    ),
}
# where each preset's recipe comes from: the run's first line names it
PRESET_SOURCES = {
    'imagenet': "the SMPConv paper's ImageNet recipe for SMPConv-T",
    'digits': "a short CPU run on the built-in digits, after the SMPConv paper's ImageNet recipe",
    'seq-digits': "the SMPConv paper's sequence recipe, on the built-in digits",
    'sequence': "the SMPConv paper's sequence recipe",
    'smp-cifar': "the SMPConv paper's CIFAR-10 recipe for SMP FlexNet-16",
    'flexnet-cifar': "the FlexConv paper's CIFAR-10 recipe for FlexNet-16",
}

# timm train.py options that cannot apply here: dest -> the one-line reason a run that sets them is refused
REFUSED = {
    'naflex_loader': "the NaFlex loader feeds NaFlexViT models patch sequences of variable length; it does not "
                     "apply to convolutional models (train at one --img-size or with --train-img-sizes)",
    'tta': "timm's train.py averages groups of --tta consecutive validation outputs, but its validation loader "
           "makes no augmented copies to average, so the figure would not be a test-time-augmentation accuracy",
}
for _dest in ('naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
              'naflex_loss_scale'):
    REFUSED[_dest] = REFUSED['naflex_loader']


class TrainingError(RuntimeError):
    """A problem with the run's set-up or state, reported with a clear message and exit code 2."""


class _ParseKwargs(ParseKwargs):
    """timm's KEY=VALUE parsing (Python literals, a string where the value is not one), with a clear error for an
    item without '='."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if v and '=' not in v]
        if bad:
            parser.error(f'{option_string} takes KEY=VALUE items, got {" ".join(map(repr, bad))}')
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`train_imagenet.py: error: ...`, exit 2), without the usage
    block, which for this many flags is longer than a screen (`--help` prints it)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message}\n')


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help once: a help text that states its own default (e.g. "the model's") keeps it."""

    def _get_help_string(self, action):
        if '(default:' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def default_workers() -> int:
    """--workers default: timm's 4 DataLoader processes per rank, fewer where this node's ranks share fewer CPU
    cores (the cores this process may run on, split between the LOCAL_WORLD_SIZE ranks torchrun starts here), so
    that no loader has more workers than torch suggests for the machine; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(4, cores // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))))


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: with timm's flag list growing, an abbreviation can silently become another flag
    # (`--task` read as `--task-loss-weight` before timm 1.0.31 added `--task`)
    p = _Parser(prog='train_imagenet.py', description=__doc__, formatter_class=_HelpFormatter, allow_abbrev=False)
    p.add_argument('-c', '--config', default=None, metavar='FILE',
                   help="YAML file of defaults, as timm's train.py -c: its keys are the flags' names with underscores "
                        "(e.g. batch_size: 128) and set the defaults over the preset's; flags on the command line still win; "
                        "a run's args.yaml works as one")
    p.add_argument('--preset', default=None, choices=sorted(PRESETS),
                   help='named recipe whose values become the defaults (default: imagenet with --data-dir, '
                        'digits without)')

    g = p.add_argument_group('Data')
    g.add_argument('data', nargs='?', metavar='DIR', default=None,
                   help="dataset root as a positional argument (timm's deprecated form of --data-dir)")
    g.add_argument('--data-dir', default=None,
                   help='dataset root (ImageFolder / tar, or the download root for torch/ datasets); '
                        'omit to train on the built-in digits')
    g.add_argument('--dataset', default='',
                   help="timm dataset name: '' (folder or tar), torch/NAME, hfds/NAME, hfids/NAME, wds/NAME, tfds/NAME")
    g.add_argument('--train-split', default='train', help='training split (folder name)')
    g.add_argument('--val-split', default='validation', help="validation split ('validation' also finds val/)")
    g.add_argument('--train-num-samples', type=int, default=None,
                   help='samples in the training split, for iterable datasets (wds/, tfds/, hfids/)')
    g.add_argument('--val-num-samples', type=int, default=None,
                   help='samples in the validation split, for iterable datasets')
    g.add_argument('--dataset-download', action='store_true', help='allow torch/ datasets to download')
    g.add_argument('--class-map', default='', help='class map file for the folder dataset')
    g.add_argument('--input-img-mode', default=None, help="image mode, e.g. 'RGB' or 'L' (default: timm's, RGB)")
    g.add_argument('--input-key', default=None, help='dataset key of the input images (hfds/, wds/)')
    g.add_argument('--target-key', default=None,
                   help="dataset key of the labels (hfds/, hfids/, wds/, tfds/); for --task multilabel a comma-separated "
                        "list names one binary field per class ('/' reaches into nested fields)")
    g.add_argument('--task', default='classification', choices=['classification', 'multilabel'],
                   help="'classification': one class per image (cross-entropy); 'multilabel': any set of classes per "
                        "image, as a list of class indices (or --target-format multihot), trained with binary losses "
                        "through timm's MultiLabelClassificationTask and validated by mAP and F1 (timm 1.0.31); "
                        "without --data-dir: the built-in digit pairs")
    g.add_argument('--target-format', default=None, choices=['indices', 'multihot'],
                   help="--task multilabel: the dataset's targets are lists of class indices ('indices') or dense "
                        "multi-hot vectors of --num-classes values in [0, 1] ('multihot') (default: indices)")
    g.add_argument('--dataset-trust-remote-code', action='store_true',
                   help="let a Hugging Face dataset run code from its repository")
    g.add_argument('--epoch-repeats', type=float, default=0.,
                   help='times an iterable dataset (wds/, tfds/, hfids/) is repeated per epoch (0: once)')
    g.add_argument('--workers', '-j', type=int, default=default_workers(),
                   help="data loading processes per rank (default: timm's 4, fewer where the ranks on this machine "
                        "share fewer CPU cores)")
    g.add_argument('--worker-seeding', default='all', help="loader worker seeding ('all' or 'part'), as timm's")
    g.add_argument('--use-multi-epochs-loader', action='store_true',
                   help="timm's MultiEpochsDataLoader (keeps workers across epochs)")
    g.add_argument('--pin-mem', action='store_true', help='pin loader memory (CUDA)')
    g.add_argument('--no-prefetcher', action='store_true', help="disable timm's prefetching loader")

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='smpconv_t', help='timm model name')
    g.add_argument('--pretrained', action='store_true', help="load the model's default pretrained weights")
    g.add_argument('--pretrained-path', default=None,
                   help="fine-tune from this file (ours, timm's, or the authors' format); the classifier is "
                        "re-initialised")
    g.add_argument('--initial-checkpoint', default='', help='load this checkpoint strictly before training')
    g.add_argument('--num-classes', type=int, default=None, help='number of classes (default: the dataset\'s)')
    g.add_argument('--gp', default=None, help="global pool type, e.g. 'avg', 'max', 'avgmax' (default: the model's)")
    g.add_argument('--in-chans', type=int, default=None, help='input channels')
    g.add_argument('--img-size', type=int, default=None, help='square input size (default: the model\'s)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help="input channels and size, e.g. 3 224 224; overrides --img-size (and sets the model's in_chans "
                        "unless --in-chans is given), as timm's resolve_data_config (default: the model's)")
    g.add_argument('--crop-pct', type=float, default=None, help='validation centre crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean per channel')
    g.add_argument('--std', type=float, nargs='+', default=None, help='normalisation std per channel')
    g.add_argument('--interpolation', default='', help='resize interpolation (default: the model\'s)')
    g.add_argument('--kernel-sizes', type=int, nargs='+', default=None,
                   help='SMP kernel size per stage; continuous kernels are re-rendered when loading')
    g.add_argument('--kernel-resize', default=None, choices=RESIZE_MODES,
                   help='how loaded SMP kernels map to new kernel sizes (see README)')
    g.add_argument('--drop', type=float, default=0., help='dropout before the classifier')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--drop-connect', type=float, default=None,
                   help="timm's deprecated name of --drop-path; used as the drop path rate when --drop-path is not given")
    g.add_argument('--drop-block', type=float, default=None, help='DropBlock rate, for models that take one')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum, for models that take one')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon, for models that take one')
    g.add_argument('--head-init-scale', type=float, default=None, help='multiply the initial classifier weights by this')
    g.add_argument('--head-init-bias', type=float, default=None, help='initial classifier bias value')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=_ParseKwargs, metavar='KEY=VALUE',
                   help="extra create_model kwargs, values as Python literals with a string fallback, as timm's "
                        "(e.g. kernel_sizes='(51,49,47,13)' ls_init_value=1e-6)")
    g.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')
    g.add_argument('--torchcompile-mode', default=None,
                   help="torch.compile mode with --torchcompile, e.g. 'reduce-overhead', 'max-autotune' (default: torch's)")
    g.add_argument('--torchscript', action='store_true', help='torch.jit.script the model (not with --torchcompile)')
    g.add_argument('--fuser', default='', help="TorchScript fuser: '', 'te', 'old' or 'nvfuser' (timm's set_jit_fuser)")
    g.add_argument('--fast-norm', action='store_true', help="timm's fast (fused, low-precision) norm layers")
    g.add_argument('--grad-checkpointing', action='store_true',
                   help='gradient checkpointing (model.set_grad_checkpointing): less memory, more compute')
    g.add_argument('--recompute', nargs='?', const='pointwise', default=None, choices=['pointwise', 'lean'],
                   help="ours: keep less for the backward (model.set_recompute): 'pointwise' recomputes BatchNorm and "
                        "activation outputs from the conv outputs (smpconv_t keeps 1.13x convnext_tiny's bytes instead "
                        "of 2.0x), 'lean' also the FFT convs' input spectra; a slower step (docs/performance.md)")
    g.add_argument('--model-dtype', default=None, choices=['float32', 'float16', 'bfloat16'],
                   help='dtype of the model parameters and inputs, for training without --amp (default: float32)')
    g.add_argument('--bn-recalibrate', type=int, default=32, metavar='N',
                   help="before each validation and checkpoint, re-estimate the BatchNorm statistics of the model and "
                        "of its EMA on N training batches (fvcore's PreciseBN; weights unchanged; 0: off): the "
                        "running averages lag the fast-shrinking activations of these models in short runs")
    g.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm (CUDA, distributed)')
    g.add_argument('--dist-bn', default='reduce', choices=['reduce', 'broadcast', ''],
                   help='sync BatchNorm statistics across ranks after each epoch when not using SyncBN')
    g.add_argument('--split-bn', action='store_true',
                   help='separate BatchNorm layers per augmentation split (--aug-splits), as timm')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=_ParseKwargs, metavar='KEY=VALUE',
                   help='extra optimizer arguments, values as Python literals (e.g. amsgrad=True)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    g.add_argument('--no-decay-patterns', nargs='*', default=[],
                   help="extra parameter-name patterns without weight decay (e.g. '*.points')")
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay')
    g.add_argument('--layer-decay-min-scale', type=float, default=0., help='lower bound of the layer-wise lr scale')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layers whose layer-wise lr scale falls below this are frozen (not optimized)')
    g.add_argument('--radius-lr-scale', type=float, default=RADIUS_LR_SCALE,
                   help='lr multiplier of SMP radii and FlexConv mask parameters (no weight decay)')
    g.add_argument('--radius-clamp', type=float, nargs=2, default=list(RADIUS_RANGE_IMAGENET), metavar=('MIN', 'MAX'),
                   help='clamp SMP radii after every optimizer step')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value')
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'], help='gradient clipping mode')
    g.add_argument('--grad-accum-steps', type=int, default=2, help='micro-batches per optimizer step')
    g.add_argument('--aliasing-reg', type=float, default=0.,
                   help='anti-aliasing regulariser factor (lambda) for FlexConv models; the paper uses 0.1 (0: off)')
    g.add_argument('--aliasing-target', default='gabor', choices=ALIASING_TARGETS,
                   help='regulariser target: f_MAGNet+ (gabor) or f_FlexConv+ (gabor+mask)')

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine',
                   help="timm scheduler: cosine, tanh, step, multistep, poly, wsd (warmup-stable-decay), rsqrt, "
                        "constant, none, plateau (deprecated by timm: its state is not checkpointed)")
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                   help='step the schedule on every optimizer update instead of every epoch')
    g.add_argument('--lr', type=float, default=4e-3,
                   help="peak learning rate, used as given (default: the preset's, 0.004 for imagenet; see --lr-base)")
    g.add_argument('--lr-base', type=float, default=None,
                   help="base learning rate, as timm's train.py: without --lr, lr = lr_base * global_batch / "
                        "lr_base_size ('linear') or lr_base * sqrt(global_batch / lr_base_size) ('sqrt'), global_batch "
                        "= batch_size * world_size * grad_accum_steps (default: None, the preset's lr)")
    g.add_argument('--lr-base-size', type=int, default=256, help='global batch size at which lr = --lr-base')
    g.add_argument('--lr-base-scale', default='', choices=['', 'linear', 'sqrt'],
                   help="scaling of --lr-base with the global batch (default: '', i.e. 'sqrt' for optimizers whose "
                        "name contains 'ada' or 'lamb', else 'linear', as timm)")
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='PCT',
                   help='lr noise on/off epoch fractions of the schedule (one or two values)')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, help='lr noise limit (fraction)')
    g.add_argument('--lr-noise-std', type=float, default=1.0, help='lr noise standard deviation')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, help='lr cycle length multiplier')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, help='lr decay per cycle')
    g.add_argument('--lr-cycle-limit', type=int, default=1, help='lr cycles (restarts when > 1)')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of the cosine / poly schedules')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='warm-up start lr')
    g.add_argument('--min-lr', type=float, default=1e-6, help='final lr of the cosine')
    g.add_argument('--epochs', type=int, default=300, help='epochs to train')
    g.add_argument('--warmup-epochs', type=int, default=10, help='warm-up epochs')
    g.add_argument('--warmup-prefix', action='store_true',
                   help='warm-up epochs come before the decay schedule instead of counting towards its length')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at min lr after the schedule')
    g.add_argument('--patience-epochs', type=int, default=10, help="epochs without improvement of the 'plateau' schedule")
    g.add_argument('--decay-epochs', type=float, default=None,
                   help="period of the 'step' schedule; length of the final decay of 'wsd' / 'rsqrt' (a value in (0, 1) "
                        "is a fraction of their stable + decay length) (default: 90 for step, 0.2 for wsd / rsqrt, "
                        "timm's create_scheduler_v2)")
    g.add_argument('--lr-decay-fn', default=None, choices=['1-sqrt', 'linear', 'cosine', 'power', 'exp'],
                   help="shape of the final decay of 'wsd' / 'rsqrt' (default: 1-sqrt for wsd, linear for rsqrt)")
    g.add_argument('--lr-stable-timescale', type=float, default=None,
                   help="'rsqrt': epochs of the reciprocal-square-root timescale (default: --warmup-epochs)")
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                   help="epochs at which the 'multistep' schedule decays, increasing")
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, help='step / multistep / plateau decay factor')
    g.add_argument('--start-epoch', type=int, default=None,
                   help="epoch to start from; also overrides a resumed checkpoint's epoch, as timm (default: 0 or "
                        "the resumed epoch)")
    g.add_argument('--stop-epoch', type=int, default=None, metavar='N',
                   help='stop this invocation before epoch N, the schedule unchanged (continue with --resume auto)')

    g = p.add_argument_group('Augmentation and regularisation')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--train-crop-mode', default=None,
                   help="training crop: timm's 'rrc' (random resized crop, default) or 'rkrc' / 'rkrr' (random keep-ratio)")
    g.add_argument('--pad-crop', type=int, nargs=2, default=None, metavar=('SIZE', 'PAD'),
                   help="the CIFAR papers' training crop instead of timm's random-resized crop (--scale, --ratio): the "
                        "image resized to SIZE x SIZE (CIFAR's 32 x 32: unchanged), a random SIZE x SIZE window of it "
                        "zero-padded by PAD px (torchvision's RandomCrop), then resized to --img-size where that "
                        "differs (the CIFAR presets: 32 4; 0 0: off)")
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random-resized-crop scale: MIN MAX')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random-resized-crop aspect ratio: MIN MAX')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='colour jitter strength')
    g.add_argument('--color-jitter-prob', type=float, default=None, help='apply colour jitter with this probability')
    g.add_argument('--grayscale-prob', type=float, default=None, help='random greyscale probability')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, help='random Gaussian blur probability')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="auto-augment policy ('' or None: off)")
    g.add_argument('--aug-repeats', type=float, default=0,
                   help='repeated augmentation: each image this many times per epoch (distributed runs only)')
    g.add_argument('--aug-splits', type=int, default=0,
                   help='AugMix-style augmentation splits of each batch (0, or >= 2), as timm')
    g.add_argument('--jsd-loss', action='store_true',
                   help='Jensen-Shannon divergence + cross-entropy loss over the --aug-splits')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--resplit', action='store_true', help='no random erasing on the first (clean) augmentation split')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, metavar='RATIO',
                   help='cutmix box ratio MIN MAX; overrides --cutmix and enables it')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'], help='mixup mode')
    g.add_argument('--mixup-off-epoch', type=int, default=0,
                   help='turn Mixup/CutMix off from this epoch on (0: never); label smoothing stays')
    g.add_argument('--smoothing', type=float, default=0.1,
                   help="label smoothing; --task multilabel moves each binary target towards 0.5 and defaults to 0, "
                        "as timm (default: 0.1, 0 for multilabel)")
    g.add_argument('--bce-loss', action='store_true',
                   help="binary cross-entropy training loss (timm's BinaryCrossEntropy), with Mixup/CutMix and "
                        "label smoothing as the cross-entropy")
    g.add_argument('--bce-sum', action='store_true', help='BCE: sum over classes before the batch mean')
    g.add_argument('--bce-target-thresh', type=float, default=None,
                   help='BCE: binarize the (smoothed, mixed) targets at this threshold (default: off)')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='BCE: weight of the positive targets (default: 1)')
    g.add_argument('--train-interpolation', default='',
                   help="interpolation of the training transforms: 'random', 'bilinear', 'bicubic', ... (default: the "
                        "validation interpolation above; timm's train.py defaults to 'random')")

    g = p.add_argument_group('Loss', "timm's create_classification_loss (timm 1.0.31): --loss picks the loss, the "
                             "--asl-* / --poly-* / --twoway-* / --db-* flags are its arguments of the same name")
    g.add_argument('--loss', default=None, choices=list(LOSS_TYPES),
                   help="training loss: ce, bce, asl, poly, jsd (--aug-splits), or for --task multilabel also twoway, "
                        "zlpr, db (default: ce, bce for multilabel; --bce-loss / --jsd-loss are timm's older names)")
    g.add_argument('--class-stats', default=None, metavar='FILE',
                   help="JSON of per-class positive counts (pos_counts, num_samples) as timm's class_weights.py "
                        "writes it, for the weighting methods and --loss db (default: counted from the training "
                        "split where it lists its targets, e.g. the built-in data)")
    g.add_argument('--loss-pos-weight', default=None, metavar='W',
                   help="bce / multilabel asl: weight of each class's positive term: a number, comma-separated "
                        "numbers, a file, or 'neg_pos' (negatives / positives from the class stats)")
    g.add_argument('--loss-class-weight', default=None, metavar='W',
                   help="bce / multilabel asl: weight of each class's loss: numbers, a file, or 'inv_freq' / "
                        "'effective_num' (from the class stats)")
    g.add_argument('--loss-weight-power', type=float, default=1.0,
                   help="exponent of the neg_pos / inv_freq weights (0.5: square-root re-weighting)")
    g.add_argument('--loss-weight-beta', type=float, default=0.999, help='beta of the effective_num weights')
    g.add_argument('--loss-weight-max', type=float, default=None, help='cap of the computed class weights')
    g.add_argument('--asl-gamma-pos', type=float, default=1.0, help='asl: focusing exponent of positive targets')
    g.add_argument('--asl-gamma-neg', type=float, default=4.0, help='asl: focusing exponent of negative targets')
    g.add_argument('--asl-clip', type=float, default=0.05, help='multilabel asl: probability margin on negatives')
    g.add_argument('--asl-reduction', default='batchmean', choices=['batchmean', 'sum', 'mean'],
                   help='multilabel asl: reduction over classes and batch')
    g.add_argument('--poly-epsilon', type=float, default=2.0, help='poly: Poly-1 coefficient (0: plain CE / BCE)')
    g.add_argument('--poly-gamma', type=float, default=0.0, help='multilabel poly: focal exponent (0: off)')
    g.add_argument('--poly-alpha', type=float, default=None, help='multilabel poly: positive / negative balance')
    g.add_argument('--twoway-tp', type=float, default=4.0, help='twoway: positive logit temperature')
    g.add_argument('--twoway-tn', type=float, default=1.0, help='twoway: negative logit temperature')
    g.add_argument('--db-neg-scale', type=float, default=2.0, help='db: negative-tolerant logit scale (1: off)')
    g.add_argument('--db-init-bias', type=float, default=0.05, help='db: class-prior logit shift factor (0: off)')
    g.add_argument('--db-focal-gamma', type=float, default=2.0, help='db: focal exponent (0: off)')
    g.add_argument('--multilabel-threshold', type=float, default=0.5,
                   help='--task multilabel: sigmoid probability at which a class counts as predicted, for the F1 '
                        'metrics (mAP does not depend on it)')

    g = p.add_argument_group('Variable-resolution training', "timm's scheduled input sizes (create_loader's "
                             "input_size_choices): each batch is drawn at one of several sizes")
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None, metavar='N',
                   help='training input sizes to draw batches at (validation stays at --img-size)')
    g.add_argument('--train-batch-sizes', type=int, nargs='+', default=None, metavar='N',
                   help='batch size at each of --train-img-sizes (default: --batch-size for all)')
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None, metavar='P',
                   help='sampling weight of each of --train-img-sizes (default: uniform)')
    g.add_argument('--train-size-schedule', default='constant', choices=['constant', 'progressive'],
                   help="'constant': sizes drawn with fixed weights; 'progressive': a window moving from the first "
                        "size to the last over the run")
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                   help='progressive schedule: width (std, in size-index units) of the moving window')
    g.add_argument('--train-size-random-mix', type=float, default=0.1,
                   help='progressive schedule: fraction of uniformly random size choices')
    g.add_argument('--train-batches-per-epoch', type=int, default=None,
                   help='loader batches per epoch with --train-img-sizes (default: as many as the data gives)')
    g.add_argument('--train-steps-per-epoch', type=int, default=None,
                   help='optimizer steps per epoch with --train-img-sizes (batches = steps x --grad-accum-steps)')
    g.add_argument('--variable-batch-loss-scale', default='none', choices=['none', 'sqrt', 'linear'],
                   help="scale each batch's loss by its size relative to --batch-size ('linear'), by the square root "
                        "of that ('sqrt'), or not")

    g = p.add_argument_group('NaFlex loader (timm train.py options, refused: NaFlexViT only)')
    g.add_argument('--naflex-loader', action='store_true', help='refused: ' + REFUSED['naflex_loader'])
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                   help='refused, as --naflex-loader')
    g.add_argument('--naflex-max-seq-len', type=int, default=576, help='refused, as --naflex-loader')
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None, help='refused, as --naflex-loader')
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None, help='refused, as --naflex-loader')
    g.add_argument('--naflex-loss-scale', default='linear', help='refused, as --naflex-loader')

    g = p.add_argument_group('Knowledge distillation', "timm's task API: the teacher is any timm model, e.g. "
                             "local-dir:DIR (a folder written by save_for_hf or python -m timm_smpconv.export), "
                             "hf-hub:NAME, or a model name with --kd-checkpoint FILE")
    g.add_argument('--kd-model-name', default=None, help='teacher model (a timm name); enables distillation')
    g.add_argument('--kd-checkpoint', default=None, metavar='FILE',
                   help="teacher weights for a plain --kd-model-name (ours: timm has no such flag): a training "
                        "checkpoint of train_imagenet.py (its EMA if it has one), a timm or an authors' file")
    g.add_argument('--kd-model-kwargs', nargs='*', default=None, action=_ParseKwargs, metavar='KEY=VALUE',
                   help="create_model kwargs of the teacher (default: those stored in --kd-checkpoint's args, if any)")
    g.add_argument('--kd-distill-type', default='logit', choices=['logit', 'feature', 'token'],
                   help="'logit': KL divergence of the logits; 'feature': MSE of the pooled pre-logit features "
                        "(a linear projection where the widths differ); 'token': for models with a distillation head")
    g.add_argument('--kd-loss-type', default='kl', choices=['kl'], help="logit distillation loss (timm: only 'kl')")
    g.add_argument('--kd-temperature', type=float, default=4.0, help='softmax temperature of logit distillation')
    g.add_argument('--distill-loss-weight', type=float, default=None,
                   help='weight of the distillation loss (default: 1, or 1 - --task-loss-weight when only that is given)')
    g.add_argument('--task-loss-weight', type=float, default=None, help='weight of the classification loss (default: 1)')
    g.add_argument('--kd-student-feature-dim', type=int, default=None,
                   help="feature distillation: the student's pre-logit width (default: the model's)")
    g.add_argument('--kd-teacher-feature-dim', type=int, default=None,
                   help="feature distillation: the teacher's pre-logit width (default: the model's)")
    g.add_argument('--kd-token-distill-type', default='soft', choices=['soft', 'hard'],
                   help="token distillation: 'soft' (KL with temperature) or 'hard' (CE with the teacher's argmax)")

    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True,
                   help='keep an EMA of the weights (ModelEmaV3) and evaluate it')
    g.add_argument('--model-ema-decay', type=float, default=0.9999, help='EMA decay')
    g.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warm-up')
    g.add_argument('--model-ema-force-cpu', action='store_true',
                   help='keep the EMA on the CPU, as timm: it is then not validated')

    g = p.add_argument_group('Run')
    g.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda if available)")
    g.add_argument('--device-modules', nargs='+', default=None, help='Python modules to import for a device backend')
    g.add_argument('--amp', action='store_true', help='mixed precision (CUDA: bf16/fp16, CPU: bf16 autocast)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'], help='AMP dtype')
    g.add_argument('--batch-size', '-b', type=int, default=256, help='batch size per rank')
    g.add_argument('--validation-batch-size', '-vb', type=int, default=None, help='validation batch size per rank')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--output', default='output/train', help='output root')
    g.add_argument('--experiment', default='', help='run folder name (default: date-model-size)')
    g.add_argument('--resume', default='',
                   help="resume from this checkpoint (model, optimizer, EMA, epoch); 'auto': in place, from the run "
                        "folder's last.pth.tar (--experiment's, else the latest run of this model and size in "
                        "--output), with its checkpoint history and summary.csv")
    g.add_argument('--auto-resume', action='store_true', help='the same as --resume auto (our older flag)')
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore the optimizer when resuming')
    g.add_argument('--checkpoint-hist', type=int, default=3, help='epoch checkpoints kept')
    g.add_argument('--save-epochs', type=int, nargs='+', default=None, metavar='N',
                   help='also keep milestone-N.pth.tar after N completed epochs, outside the ranked history')
    g.add_argument('--recovery-interval', type=int, default=0,
                   help='write a recovery checkpoint every N batches inside an epoch (0: off)')
    g.add_argument('--eval-metric', default=None,
                   help="metric for the best checkpoint: loss, top1, top5; for --task multilabel loss, map, micro_f1, "
                        "macro_f1, sample_f1 (default: top1, map for multilabel)")
    g.add_argument('--val-interval', type=int, default=1,
                   help="validate every N epochs and at the schedule's last epoch; only validated epochs can "
                        "become the best")
    g.add_argument('--tta', type=int, default=0, help='refused when > 0: ' + REFUSED['tta'])
    g.add_argument('--log-interval', type=int, default=50, help='batches between log lines')
    g.add_argument('--save-images', action='store_true',
                   help='save the input batch as an image at every log line (debugging), as timm')
    g.add_argument('--synchronize-step', action='store_true',
                   help='synchronize the device at the end of every step (timing, debugging)')
    g.add_argument('--log-wandb', action='store_true',
                   help='log the per-epoch metrics to Weights & Biases (needs the wandb package; without it a '
                        'warning and the run continues)')
    g.add_argument('--wandb-project', default=None, help="wandb project name (default: wandb's)")
    g.add_argument('--wandb-tags', nargs='+', default=[], help='wandb run tags')
    g.add_argument('--wandb-resume-id', default='', help='wandb run id to continue (with --resume)')
    g.add_argument('--eval-only', action='store_true', help='evaluate --checkpoint and exit')
    g.add_argument('--checkpoint', default='', help='checkpoint for --eval-only')
    g.add_argument('--reparam', action='store_true', help='reparameterize before --eval-only evaluation')
    g.add_argument('--stop-after-epochs', type=int, default=0,
                   help='end this invocation after N epochs (continue later with --resume/--auto-resume)')
    g.add_argument('--max-train-batches', type=int, default=0, help='use only the first N batches of each epoch')
    g.add_argument('--no-ddp-bb', action='store_true', help='DDP without broadcasting buffers from rank 0')
    g.add_argument('--local_rank', '--local-rank', type=int, default=0,
                   help="the rank on this node, as passed by torch.distributed.launch (torchrun sets LOCAL_RANK)")
    g.add_argument('--dist-backend', default=None, help='override the process-group backend')
    g.add_argument('--dist-url', default='env://', help='process-group init url')
    return p


# keys of a run's args.yaml that the run sets itself (not flags): skipped when the file is read back with -c
_RUN_STATE_KEYS = ('config', 'rank', 'world_size', 'local_rank', 'distributed', 'device_id', 'preset_kwargs_dropped',
                   'seq_len', 'class_names', 'data_config')


def load_config(parser, path):
    """The defaults in a -c/--config YAML file (timm's train.py -c), checked against the parser's flags."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        parser.error(f'cannot read config file {path!r}: {e}')
    except yaml.YAMLError as e:
        parser.error(f'config file {path!r} is not valid YAML: {e}')
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        parser.error(f'config file {path!r} must map flag names to values, not hold a {type(cfg).__name__}')
    cfg = {k: v for k, v in cfg.items() if k not in _RUN_STATE_KEYS}
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    unknown = sorted(str(k) for k in cfg if k not in actions)
    if unknown:
        parser.error(f'config file {path!r}: unknown key{"s" if len(unknown) > 1 else ""} {", ".join(unknown)} (keys '
                     f'are the flag names with underscores, e.g. batch_size for --batch-size)')
    for key, value in cfg.items():
        try:
            cfg[key] = _config_value(actions[key], value)
        except ValueError as e:
            parser.error(f'config file {path!r}: {key}: {value!r} {e}')
    return cfg


def _config_value(action, value):
    """A config file's value as the flag's own parsing would give it (numbers converted, YAML's '1e-2' string
    included), or ValueError saying what the flag takes: timm 1.0.31's train.py validates its -c values against its
    arguments the same way."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError('is not true or false')
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise ValueError('is not a mapping of KEY: VALUE')
        return value
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many != isinstance(value, (list, tuple)):
        raise ValueError('is not a list' if many else 'is a list, the flag takes one value')
    values = list(value) if many else [value]
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise ValueError(f'has {len(values)} values, the flag takes {action.nargs}')
    converted = []
    for v in values:
        if action.type in (int, float):
            if isinstance(v, bool) or (action.type is int and isinstance(v, float)):
                raise ValueError(f'is not {"an int" if action.type is int else "a number"}')
            try:
                v = action.type(v)
            except (TypeError, ValueError):
                raise ValueError(f'is not {"an int" if action.type is int else "a number"}') from None
        elif isinstance(v, (dict, list)):
            raise ValueError('is not a single value')
        if action.choices is not None and v not in action.choices:
            raise ValueError(f'is not one of {", ".join(map(repr, action.choices))}')
        converted.append(v)
    return converted if many else converted[0]


def _is_multilabel(args):
    return getattr(args, 'task', 'classification') == 'multilabel'


def _evaluator_class(args):
    return MultiLabelClassificationEvaluator if _is_multilabel(args) else ClassificationEvaluator


def _metric_names(args):
    """The validation metrics of the run's task, as timm's evaluators name them: loss first, then the default."""
    return _evaluator_class(args).metric_names


def _base_name(model_name):
    """The architecture of a timm model name: 'smp_tcn.pdigits' -> 'smp_tcn'."""
    return model_name.split('.')[0]


def parse_args(argv=None):
    """Command-line flags over the -c config file over the preset over the parser's defaults."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config = load_config(parser, pre.config) if pre.config else {}
    has_data = pre.data_dir or pre.data or config.get('data_dir') or config.get('data')
    sequences = is_sequence_dataset(pre.dataset or config.get('dataset') or '')
    preset = pre.preset or config.get('preset') or ('sequence' if sequences else 'imagenet' if has_data else 'digits')
    recipe_lr = PRESETS[preset].get('lr', parser.get_default('lr'))
    parser.set_defaults(**PRESETS[preset])
    parser.set_defaults(**config)
    if 'lr' not in config:
        parser.set_defaults(lr=None)  # tells an --lr given on the command line from the recipe's
    recipe_smoothing = PRESETS[preset].get('smoothing', parser.get_default('smoothing'))
    if 'smoothing' not in config:
        parser.set_defaults(smoothing=None)  # the same for --smoothing, whose default depends on --task
    args = parser.parse_args(argv)
    args.preset = preset
    multilabel = args.task == 'multilabel'
    if args.smoothing is None:
        args.smoothing = 0. if multilabel else recipe_smoothing  # timm: label smoothing defaults to 0 for multilabel
    if args.eval_metric is None:
        args.eval_metric = _evaluator_class(args).default_metric  # timm: the task's evaluator's, top1 or map
    if args.auto_resume and not args.resume:
        args.resume = 'auto'  # one mechanism: --auto-resume is --resume auto
    if args.data and not args.data_dir:
        args.data_dir = args.data  # timm's positional form
    if args.lr is None and args.lr_base is None:
        args.lr = recipe_lr  # else resolve_lr() computes it once the world size is known
    args.preset_kwargs_dropped = {}
    preset_kwargs = PRESETS[preset].get('model_kwargs')
    if preset_kwargs is not None and args.model_kwargs is preset_kwargs:
        args.model_kwargs = dict(preset_kwargs)
        if _base_name(args.model) != _base_name(PRESETS[preset]['model']):
            # the preset's kwargs shape its own model; another architecture is built with its own defaults
            args.preset_kwargs_dropped, args.model_kwargs = args.model_kwargs, {}
    if args.aa in ('', 'none', 'None'):
        args.aa = None
    if args.drop_connect is not None and args.drop_path == parser.get_default('drop_path'):
        args.drop_path = args.drop_connect  # timm's deprecated name of the drop path rate
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if is_sequence_dataset(args.dataset):
        args.no_prefetcher = True  # timm's prefetcher normalises images; series are normalised when loaded
    return args


def timm_differences(args):
    """(flag, our value, timm train.py's default) for every timm option whose value here differs from timm's."""
    ours = vars(args)
    out = []
    for option, timm_value in zip(TIMM_TRAIN_OPTIONS, timm_defaults().values()):
        dest = option.dest
        if dest not in ours or option.positional or dest in ('config',):
            continue
        if dest == 'eval_metric' and timm_value is None:
            timm_value = _evaluator_class(args).default_metric  # timm resolves it from the task, as we do
        if dest == 'smoothing' and _is_multilabel(args):
            timm_value = 0.  # timm's multi-label default
        value = ours[dest]
        same = _as_list(value) == _as_list(timm_value)
        if dest == 'output':
            same = value in ('', 'output/train', './output/train')  # timm's '' means ./output/train
        if not same:
            out.append((option.flags[-1], value, timm_value))
    return out


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value


def check_args(args):
    """Input errors that must stop the run before anything is built."""
    for dest in _set_away_from_default(args, REFUSED):
        raise TrainingError(f'--{dest.replace("_", "-")}: not supported: {REFUSED[dest]}')
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise TrainingError('--batch-size and --grad-accum-steps must be >= 1')
    if args.epochs < 1:
        raise TrainingError(f'--epochs must be >= 1, got {args.epochs}')
    if _mixup_active(args) and args.batch_size % 2:
        raise TrainingError(f'Mixup/CutMix mixes pairs of samples and needs an even --batch-size, got {args.batch_size}')
    for flag in ('scale', 'ratio', 'cutmix_minmax'):
        value = getattr(args, flag)
        if value is not None and len(value) != 2:
            raise TrainingError(f'--{flag.replace("_", "-")} takes two values (MIN MAX), got {len(value)}: {value}')
    if any(b <= a for a, b in zip(args.decay_milestones, args.decay_milestones[1:])):
        raise TrainingError(f'--decay-milestones must increase, got {args.decay_milestones}')
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise TrainingError(f'--data-dir {args.data_dir!r} does not exist or is not a directory')
        if not args.dataset and not any(os.scandir(args.data_dir)):
            raise TrainingError(f'--data-dir {args.data_dir!r} is empty')
    if is_sequence_dataset(args.dataset):
        _check_sequence_args(args)
    if args.epoch_repeats and not args.dataset.startswith(('wds/', 'tfds/', 'hfids/')):
        raise TrainingError('--epoch-repeats repeats an iterable dataset (wds/, tfds/, hfids/) per epoch, as timm; '
                            f'{args.dataset or "a folder dataset"} is map-style and would ignore it')
    for name in (args.model, args.kd_model_name):
        if name and ':' not in name and not timm.is_model(_base_name(name)):
            raise TrainingError(unknown_model_message(name))
    if args.auto_resume and args.resume != 'auto':
        raise TrainingError(f'--auto-resume is --resume auto; it does not combine with --resume {args.resume}')
    for path in (args.resume, args.pretrained_path, args.initial_checkpoint, args.checkpoint, args.kd_checkpoint):
        if path and not (path is args.resume and path == 'auto') and not os.path.isfile(path):
            raise TrainingError(f'checkpoint {path!r} not found')
    if args.eval_only and not args.checkpoint:
        raise TrainingError('--eval-only needs --checkpoint FILE')
    if args.eval_metric not in _metric_names(args):
        raise TrainingError(f'--eval-metric must be one of {", ".join(_metric_names(args))}'
                            f'{" (--task multilabel)" if _is_multilabel(args) else ""}, got {args.eval_metric!r}')
    for flag, value, low in (('--val-interval', args.val_interval, 1), ('--lr-base-size', args.lr_base_size, 1),
                             ('--mixup-off-epoch', args.mixup_off_epoch, 0), ('--start-epoch', args.start_epoch, 0),
                             ('--stop-epoch', args.stop_epoch, 1), ('--save-epochs', min(args.save_epochs or [1]), 1)):
        if value is not None and value < low:
            raise TrainingError(f'{flag} must be >= {low}, got {value}')
    if args.amp and args.model_dtype not in (None, 'float32'):
        raise TrainingError(f'--amp keeps float32 weights and needs --model-dtype float32, got {args.model_dtype} '
                            f'(use one or the other)')
    if args.input_size and args.in_chans and args.input_size[0] != args.in_chans:
        raise TrainingError(f'--input-size has {args.input_size[0]} channels but --in-chans is {args.in_chans}')
    if args.torchcompile_mode and not args.torchcompile:
        raise TrainingError('--torchcompile-mode needs --torchcompile')
    if args.torchscript and args.torchcompile:
        raise TrainingError('--torchscript and --torchcompile exclude each other (as in timm)')
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise TrainingError(f'--aug-splits must be 0 or >= 2, got {args.aug_splits}')
    if args.split_bn and args.aug_splits < 2 and not args.resplit:
        raise TrainingError('--split-bn needs --aug-splits >= 2 or --resplit')
    if args.aug_repeats and not args.distributed:
        raise TrainingError('--aug-repeats repeats augmented copies across ranks: it needs a distributed run (torchrun)')
    if args.wandb_resume_id and not args.resume:
        raise TrainingError('--wandb-resume-id continues a wandb run and needs --resume')
    _check_variable_resolution(args)
    _check_distillation(args)
    _check_task(args)
    _check_loss(args)
    _check_schedule(args)
    _check_pad_crop(args)


# flags that only mean something for images, with their neutral values: refused for time series when set otherwise
IMAGE_ONLY = dict(
    aa=None, reprob=0., remode='pixel', recount=1, hflip=0., vflip=0., color_jitter=0., color_jitter_prob=None,
    grayscale_prob=None, gaussian_blur_prob=None, scale=None, ratio=None, train_crop_mode=None, mixup=0., cutmix=0.,
    cutmix_minmax=None, mixup_off_epoch=0, aug_splits=0, jsd_loss=False, resplit=False, split_bn=False,
    train_img_sizes=None, img_size=None, input_size=None, crop_pct=None, interpolation='', train_interpolation='',
    input_img_mode=None, channels_last=False, save_images=False, class_map='', pad_crop=None,
)


def _check_sequence_args(args):
    if args.data_dir is None:
        raise TrainingError(f'--dataset {args.dataset} reads its files from --data-dir DIR')
    image_flags = [f'--{k.replace("_", "-")} {getattr(args, k)}' for k, v in IMAGE_ONLY.items()
                   if _as_list(getattr(args, k)) != _as_list(v)]
    if image_flags:
        raise TrainingError(f'--dataset {args.dataset} holds time series; these image flags do not apply to them: '
                            f'{", ".join(image_flags)} (the sequence preset leaves them off)')


@functools.lru_cache(maxsize=None)
def _flag_defaults():
    """Each flag's default in the parser itself (before a preset's values)."""
    parser = build_parser()
    return {a.dest: parser.get_default(a.dest) for a in parser._actions}


def _set_away_from_default(args, dests):
    return [d for d in dests if getattr(args, d) != _flag_defaults()[d]]


def _check_variable_resolution(args):
    options = ('train_batch_sizes', 'train_size_probs', 'train_size_schedule', 'train_size_schedule_spread',
               'train_size_random_mix', 'train_batches_per_epoch', 'train_steps_per_epoch', 'variable_batch_loss_scale')
    if not args.train_img_sizes:
        stray = _set_away_from_default(args, options)
        if stray:
            raise TrainingError(f'--{stray[0].replace("_", "-")} needs --train-img-sizes')
        return
    for flag in ('train_batch_sizes', 'train_size_probs'):
        value = getattr(args, flag)
        if value is not None and len(value) != len(args.train_img_sizes):
            raise TrainingError(f'--{flag.replace("_", "-")} needs one value per --train-img-sizes size '
                                f'({len(args.train_img_sizes)}), got {len(value)}')
    if args.train_batches_per_epoch and args.train_steps_per_epoch:
        raise TrainingError('--train-batches-per-epoch and --train-steps-per-epoch set the same thing: give one')
    if args.aug_splits or args.use_multi_epochs_loader:
        raise TrainingError('--train-img-sizes does not combine with --aug-splits or --use-multi-epochs-loader '
                            "(timm's scheduled loader supports neither)")


def _check_distillation(args):
    options = ('kd_checkpoint', 'kd_model_kwargs', 'kd_distill_type', 'kd_loss_type', 'kd_temperature',
               'distill_loss_weight', 'task_loss_weight', 'kd_student_feature_dim', 'kd_teacher_feature_dim',
               'kd_token_distill_type')
    if not args.kd_model_name:
        stray = _set_away_from_default(args, options)
        if stray:
            raise TrainingError(f'--{stray[0].replace("_", "-")} needs --kd-model-name (the teacher)')
        return
    if args.kd_checkpoint and ':' in args.kd_model_name:
        raise TrainingError(f'--kd-checkpoint gives weights to a plain model name; {args.kd_model_name!r} brings its '
                            f'own (local-dir:/hf-hub:)')


_READER_PREFIXES = ('hfds/', 'hfids/', 'wds/', 'tfds/')  # timm's readers with multi-label (list) targets


def _check_task(args):
    """--task multilabel and its flags (timm 1.0.31)."""
    if not _is_multilabel(args):
        for dest in _set_away_from_default(args, ('target_format', 'multilabel_threshold')):
            raise TrainingError(f'--{dest.replace("_", "-")} needs --task multilabel')
        return
    if not 0. < args.multilabel_threshold < 1.:
        raise TrainingError(f'--multilabel-threshold is a sigmoid probability in (0, 1), got {args.multilabel_threshold}')
    if is_sequence_dataset(args.dataset):
        raise TrainingError(f'--task multilabel: --dataset {args.dataset} holds one class per series')
    if not _builtin_data(args) and not args.dataset.lower().startswith(_READER_PREFIXES):
        raise TrainingError(f'--task multilabel: {args.dataset or "a folder or tar dataset"} gives one class per image; '
                            f'multi-label targets come from hfds/, hfids/, wds/ or tfds/ datasets (as in timm), or '
                            f'without --data-dir from the built-in digit pairs')
    if args.target_format and _builtin_data(args):
        raise TrainingError('--target-format: the built-in digit pairs give lists of class indices')
    if args.kd_model_name:
        raise TrainingError("--kd-model-name: timm's distillation tasks train single-label classification, not "
                            "--task multilabel")


# loss -> its create_classification_loss arguments (flags of the same name), refused with another loss
_LOSS_FLAGS = dict(asl=('asl_gamma_pos', 'asl_gamma_neg', 'asl_clip', 'asl_reduction'),
                   poly=('poly_epsilon', 'poly_gamma', 'poly_alpha'), twoway=('twoway_tp', 'twoway_tn'),
                   db=('db_neg_scale', 'db_init_bias', 'db_focal_gamma'),
                   bce=('bce_sum', 'bce_target_thresh', 'bce_pos_weight'))


def _loss_type(args):
    """The training loss of the run: --loss, or timm's older --jsd-loss / --bce-loss, else ce (bce for multilabel)."""
    return args.loss or ('jsd' if args.jsd_loss else 'bce' if args.bce_loss or _is_multilabel(args) else 'ce')


def _weight_method(value, kind):
    """The class-weight method name in a --loss-pos-weight / --loss-class-weight value, or None for given weights."""
    return value.strip() if isinstance(value, str) and value.strip() in CLASS_WEIGHT_METHOD_KINDS else None


def _check_loss(args):
    loss = _loss_type(args)
    for old, name in (('bce_loss', 'bce'), ('jsd_loss', 'jsd')):
        if getattr(args, old) and loss != name:
            raise TrainingError(f'--{old.replace("_", "-")} is --loss {name}; it does not combine with --loss {loss}')
    if loss == 'jsd' and args.aug_splits < 2:
        raise TrainingError(f'--{"jsd-loss" if args.jsd_loss else "loss jsd"} needs --aug-splits >= 2')
    if _is_multilabel(args) and loss not in MULTI_LABEL_LOSS_TYPES:
        raise TrainingError(f'--loss {loss} is single-label; --task multilabel takes {", ".join(MULTI_LABEL_LOSS_TYPES)}')
    if not _is_multilabel(args) and loss in ('twoway', 'zlpr', 'db'):
        raise TrainingError(f'--loss {loss} is a multi-label loss: it needs --task multilabel')
    for family, dests in _LOSS_FLAGS.items():
        stray = _set_away_from_default(args, dests)
        if stray and loss != family:
            flag = f'--{stray[0].replace("_", "-")}'
            if family == 'bce':
                raise TrainingError(f'{flag}: --bce-sum, --bce-target-thresh and --bce-pos-weight need --bce-loss '
                                    f'(--loss bce); this run uses --loss {loss}')
            raise TrainingError(f'{flag} is an argument of --loss {family}; this run uses --loss {loss}')
    weights = [f for f in ('loss_pos_weight', 'loss_class_weight') if getattr(args, f) is not None]
    if weights and not (loss == 'bce' or (loss == 'asl' and _is_multilabel(args))):
        raise TrainingError(f'--{weights[0].replace("_", "-")}: class weights apply to --loss bce and multilabel asl '
                            f'(timm), not to --loss {loss}')
    if args.loss_pos_weight is not None and args.bce_pos_weight is not None:
        raise TrainingError('--bce-pos-weight and --loss-pos-weight set the same weight: give one')
    for dest, kind in (('loss_pos_weight', 'pos_weight'), ('loss_class_weight', 'class_weight')):
        method = _weight_method(getattr(args, dest), kind)
        if method and CLASS_WEIGHT_METHOD_KINDS[method] != kind:
            other = [m for m, k in CLASS_WEIGHT_METHOD_KINDS.items() if k == kind]
            raise TrainingError(f'--{dest.replace("_", "-")} {method}: that method computes '
                                f'{CLASS_WEIGHT_METHOD_KINDS[method]} values; this flag takes {" or ".join(other)}')
    methods = [_weight_method(args.loss_pos_weight, 'pos_weight'), _weight_method(args.loss_class_weight, 'class_weight')]
    stray = _set_away_from_default(args, ('loss_weight_power', 'loss_weight_beta', 'loss_weight_max'))
    if stray and not any(methods):
        raise TrainingError(f'--{stray[0].replace("_", "-")} shapes computed class weights: it needs --loss-pos-weight '
                            f'neg_pos or --loss-class-weight inv_freq / effective_num')
    if args.class_stats and not any(methods) and loss != 'db':
        raise TrainingError('--class-stats is read by the class-weight methods (--loss-pos-weight neg_pos, '
                            '--loss-class-weight inv_freq / effective_num) and --loss db')
    if args.class_stats and not os.path.isfile(args.class_stats):
        raise TrainingError(f'--class-stats {args.class_stats!r} not found')


_SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant', 'none', 'plateau')


def _check_schedule(args):
    """The schedule's flags against --sched (timm's create_scheduler_v2), before anything is built."""
    sched = args.sched
    if sched not in _SCHEDULES:
        raise TrainingError(f'unknown --sched {sched!r}; timm has {", ".join(_SCHEDULES)}')
    if args.lr_decay_fn and sched not in ('wsd', 'rsqrt'):
        raise TrainingError(f'--lr-decay-fn shapes the final decay of --sched wsd / rsqrt, not of --sched {sched}')
    if args.lr_stable_timescale is not None and sched != 'rsqrt':
        raise TrainingError(f'--lr-stable-timescale is the timescale of --sched rsqrt, not of --sched {sched}')
    if sched in ('wsd', 'rsqrt'):
        stable_decay = args.epochs if args.warmup_prefix else args.epochs - args.warmup_epochs
        if stable_decay <= 0:
            raise TrainingError(f'--sched {sched}: --warmup-epochs {args.warmup_epochs} leaves none of --epochs '
                                f'{args.epochs} for the stable and decay phases; lower --warmup-epochs, raise --epochs '
                                f'or add --warmup-prefix')
        decay = args.decay_epochs
        if decay is not None and not (0 < decay < 1 or 0 < decay <= stable_decay):
            raise TrainingError(f'--sched {sched}: --decay-epochs {decay:g} must be a fraction in (0, 1) or 1 to '
                                f'{stable_decay} epochs (--epochs{"" if args.warmup_prefix else " - --warmup-epochs"})')
        if sched == 'rsqrt' and not args.warmup_epochs and not args.lr_stable_timescale:
            raise TrainingError('--sched rsqrt without warm-up needs --lr-stable-timescale (it defaults to '
                                '--warmup-epochs)')


def _check_pad_crop(args):
    if not args.pad_crop or not args.pad_crop[0]:  # --pad-crop 0 0: off
        return
    size, pad = args.pad_crop
    if size < 1 or pad < 0:
        raise TrainingError(f'--pad-crop takes SIZE >= 1 and PAD >= 0, got {size} {pad}')
    crop_flags = _set_away_from_default(args, ('scale', 'ratio', 'train_crop_mode'))
    if crop_flags:
        raise TrainingError(f'--pad-crop {size} {pad} replaces the random-resized crop that --{crop_flags[0].replace("_", "-")} '
                            f'shapes: give one or the other (--pad-crop 0 0 turns the padded crop off, e.g. after a '
                            f'CIFAR preset)')
    if args.train_img_sizes:
        raise TrainingError('--pad-crop does not combine with --train-img-sizes (the scheduled loader builds its own '
                            'crop per size)')


def lr_from_base(lr_base, global_batch_size, lr_base_size=256, lr_base_scale='', opt=''):
    """timm train.py's rule: (lr, scaling used) for a base lr stated at `lr_base_size` images per optimizer step.

    lr = lr_base * r with r = global_batch_size / lr_base_size ('linear') or sqrt(r) ('sqrt'); an empty
    `lr_base_scale` picks 'sqrt' for optimizers whose name contains 'ada' or 'lamb', else 'linear'.
    """
    if not lr_base_scale:
        lr_base_scale = 'sqrt' if any(o in opt.lower() for o in ('ada', 'lamb')) else 'linear'
    ratio = global_batch_size / lr_base_size
    if lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    return lr_base * ratio, lr_base_scale


def resolve_lr(args):
    """--lr as given (or the preset's), else from --lr-base and the global batch, which needs the world size."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    args.lr, args.lr_base_scale = lr_from_base(
        args.lr_base, global_batch, args.lr_base_size, args.lr_base_scale, args.opt)
    if args.rank == 0:
        _logger.info(f'Learning rate {args.lr:g} from --lr-base {args.lr_base:g} at {args.lr_base_size} images, '
                     f'global batch {global_batch}, {args.lr_base_scale} scaling')


def _mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def _builtin_data(args):
    return args.data_dir is None and not args.dataset


def load_datasets(args):
    """(train, val, num_classes) from --data-dir/--dataset, or the built-in digits (the digit pairs for --task
    multilabel)."""
    if _builtin_data(args):
        dataset = DigitPairsDataset if _is_multilabel(args) else DigitsDataset
        return dataset('train'), dataset('val'), DIGITS_NUM_CLASSES
    if is_sequence_dataset(args.dataset):
        return load_sequence_datasets(args)
    chans = args.input_size[0] if args.input_size else args.in_chans
    keys = dict(input_key=args.input_key, target_key=args.target_key)
    if any(keys.values()) and not args.dataset.startswith(('hfds/', 'hfids/', 'wds/', 'tfds/')):
        raise TrainingError('--input-key / --target-key name the fields of hfds/, hfids/, wds/ or tfds/ datasets; '
                            f'{args.dataset or "a folder dataset"} has none')
    common = dict(root=args.data_dir, download=args.dataset_download, batch_size=args.batch_size,
                  class_map=args.class_map, trust_remote_code=args.dataset_trust_remote_code, **keys,
                  input_img_mode=args.input_img_mode or ('L' if chans == 1 else 'RGB'))
    if args.target_format:  # multi-label readers only (create_dataset leaves out None)
        common['target_format'] = args.target_format
    try:
        train_set = create_dataset(args.dataset, split=args.train_split, is_training=True, seed=args.seed,
                                   repeats=args.epoch_repeats, num_samples=args.train_num_samples, **common)
        val_set = create_dataset(args.dataset, split=args.val_split, is_training=False,
                                 num_samples=args.val_num_samples, **common)
    except Exception as e:  # timm raises various types for empty/malformed roots
        raise TrainingError(f'could not read dataset {args.dataset or "folder"} at {args.data_dir!r}: {e}') from e
    if len(train_set) == 0 or len(val_set) == 0:
        raise TrainingError(f'dataset at {args.data_dir!r} has no images ({len(train_set)} train, {len(val_set)} val)')
    num_classes = None
    reader = getattr(train_set, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        num_classes = len(reader.class_to_idx)
    elif hasattr(train_set, 'classes'):
        num_classes = len(train_set.classes)
    return train_set, val_set, num_classes


def load_sequence_datasets(args):
    """Time series (--dataset npz or ts/NAME): normalised per channel with the training split's statistics (or
    --mean/--std), padded at the front to the longest series. The statistics, the length, the channel count and the
    class names go into args, so checkpoints (and --eval-only, and the export) carry them."""
    try:
        x_train, y_train, x_val, y_val, classes = load_sequence_splits(
            args.dataset, args.data_dir, args.train_split, args.val_split)
    except (ValueError, ImportError, OSError) as e:
        raise TrainingError(f'could not read dataset {args.dataset} at {args.data_dir!r}: {e}') from e
    chans = x_train[0].shape[0]
    if args.in_chans and args.in_chans != chans:
        raise TrainingError(f'--in-chans {args.in_chans}, but the {args.dataset} series have {chans} channels')
    if args.mean is None and args.std is None:
        args.mean, args.std = channel_stats(x_train)
    elif args.mean is None or args.std is None or len(args.mean) != chans or len(args.std) != chans:
        raise TrainingError(f'--mean and --std need one value per channel ({chans}), got {args.mean} / {args.std}')
    args.in_chans, args.class_names = chans, classes
    args.seq_len = max(x.shape[1] for x in x_train + x_val)
    lengths = {x.shape[1] for x in x_train + x_val}
    _logger.info(f'{args.dataset}: {len(x_train)} train / {len(x_val)} validation series, {chans} channels, '
                 f'{len(classes)} classes, length {min(lengths)}-{max(lengths)} (padded at the front to {args.seq_len})')
    datasets = [SequenceDataset(x, y, args.mean, args.std, args.seq_len) for x, y in ((x_train, y_train), (x_val, y_val))]
    return datasets[0], datasets[1], len(classes)


def _create_model(name, what, **kwargs):
    """timm.create_model with every failure as a TrainingError naming the model (exit code 2)."""
    try:
        return timm.create_model(name, **kwargs)
    except TrainingError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, TypeError, AssertionError) as e:
        _raise_unsafe_checkpoint((kwargs.get('pretrained_cfg_overlay') or {}).get('file') or name, e)
        raise TrainingError(f'could not create {what} {name}: {e}') from e


def create_training_model(args, num_classes):
    kwargs = dict(args.model_kwargs)
    if _base_name(args.model) in timm.list_models(module='flexnet'):
        _set_model_img_size(args, kwargs)
    if args.kernel_sizes:
        kwargs['kernel_sizes'] = tuple(args.kernel_sizes)
    if args.kernel_resize:
        kwargs['kernel_resize'] = args.kernel_resize
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
    if in_chans:
        kwargs['in_chans'] = in_chans
    if is_sequence_dataset(args.dataset) and _base_name(args.model) in timm.list_models(module='tcn'):
        kwargs.setdefault('seq_len', args.seq_len)  # kernels sampled at the data's length (the papers' rule)
        if args.model == 'smp_tcn':  # no dataset tag: the SMP radius from the length too (2 / seq_len)
            kwargs.setdefault('radius', None)
    if args.pretrained_path:
        # like timm's train.py: load the file, re-initialise the classifier
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    # timm's train.py create_model arguments; create_model drops those left at None
    for key, value in (('drop_block_rate', args.drop_block), ('global_pool', args.gp),
                       ('bn_momentum', args.bn_momentum), ('bn_eps', args.bn_eps)):
        if value is not None:
            kwargs[key] = value
    model = _create_model(
        args.model, 'model', pretrained=args.pretrained or bool(args.pretrained_path), num_classes=num_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, scriptable=args.torchscript or None, **kwargs)
    if args.initial_checkpoint:
        _load_weights(model, args.initial_checkpoint, use_ema=False)
    if args.head_init_scale is not None or args.head_init_bias is not None:
        head = model.get_classifier()
        with torch.no_grad():
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                nn.init.constant_(head.bias, args.head_init_bias)
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(enable=True)
        except (AttributeError, NotImplementedError, AssertionError) as e:
            raise TrainingError(f'{args.model} does not support --grad-checkpointing: {e}') from e
    if args.recompute:
        if not hasattr(model, 'set_recompute'):
            raise TrainingError(f'--recompute: {args.model} has no set_recompute (our SMPConv and FlexNet models do)')
        model.set_recompute(True, fft_spectra=args.recompute == 'lean')
    return model


def _set_model_img_size(args, kwargs):
    """FlexNet / CKCNN / SMP FlexNet are built for the resolution they run at (their kernels' horizon is img_size + 1):
    --img-size / --input-size set the model's img_size, as timm's img_size kwarg does for the models that depend
    on it; a --model-kwargs img_size alone sets the data's size too."""
    given = kwargs.get('img_size')
    if args.input_size:
        size, flag = tuple(args.input_size[1:]), f'--input-size {" ".join(map(str, args.input_size))}'
    elif args.img_size:
        size, flag = (args.img_size,) * 2, f'--img-size {args.img_size}'
    else:
        if isinstance(given, int):
            args.img_size = given
        elif isinstance(given, (list, tuple)) and len(given) == 2 and given[0] == given[1]:
            args.img_size = given[0]
        return
    if given is not None and (tuple(given) if isinstance(given, (list, tuple)) else (given,) * 2) != size:
        raise TrainingError(f'{flag} and --model-kwargs img_size={given} disagree: {args.model} is built for the '
                            f'resolution it runs at (its kernels\' horizon is img_size + 1); give one of them')
    kwargs['img_size'] = size[0] if size[0] == size[1] else size


def _load_weights(model, path, use_ema):
    from timm.models import load_checkpoint
    try:
        load_checkpoint(model, path, use_ema=use_ema)
    except Exception as e:
        _raise_unsafe_checkpoint(path, e)
        raise TrainingError(f'could not load checkpoint {path!r}: {e}') from e


def _raise_unsafe_checkpoint(path, e):
    """A file torch's safe loader refused (pickled objects that can run code): one message on every route, naming
    the file (timm_smpconv's UnsafeCheckpointError), not torch's or timm's, which advise weights_only=False."""
    unsafe = refused_pickle(path, e)
    if unsafe is not None:
        raise TrainingError(str(unsafe)) from None


def _read_checkpoint(path, what='checkpoint'):
    """A checkpoint file as a dict, loaded safely (weights_only; a run's stored args allowed)."""
    try:
        ckpt = read_checkpoint(path)
    except Exception as e:
        _raise_unsafe_checkpoint(path, e)
        raise TrainingError(f'could not read {what} {path!r} (corrupt or not a checkpoint): {e}') from e
    if not isinstance(ckpt, dict):
        raise TrainingError(f'{what} {path!r} holds a {type(ckpt).__name__}, not a state dict')
    return ckpt


def create_teacher(args, student, data_config, device):
    """The distillation teacher (timm's DistillationTeacher), frozen, in eval mode, on the device.

    Any timm name works: `local-dir:DIR` / `hf-hub:NAME` bring their weights and config; a plain name loads
    --kd-checkpoint (for a checkpoint of this trainer: its EMA when it has one, and the model kwargs and the input
    normalisation of the run that wrote it). The teacher sees the inputs normalised as it was trained.
    """
    name = args.kd_model_name
    kwargs = dict(num_classes=student.num_classes, in_chans=getattr(student, 'in_chans', 3))
    teacher_mean_std = None
    if ':' in name:  # local-dir: / hf-hub: carry their weights and their model_args
        model = _create_model(name, 'teacher', pretrained=True, **kwargs)
    elif args.kd_checkpoint:
        ckpt = _read_checkpoint(args.kd_checkpoint, 'teacher checkpoint')
        ckpt_args = ckpt.get('args') if isinstance(ckpt.get('args'), argparse.Namespace) else None
        ours = ckpt_args is not None and _base_name(ckpt_args.model) == _base_name(name)  # a run of this trainer
        model_kwargs = args.kd_model_kwargs
        if model_kwargs is None:
            model_kwargs = dict(getattr(ckpt_args, 'model_kwargs', None) or {}) if ours else {}
        model = _create_model(name, 'teacher', **kwargs, **model_kwargs)
        _load_weights(model, args.kd_checkpoint, use_ema=True)  # the EMA if the file has one (timm's rule)
        if ours and not is_sequence_dataset(getattr(ckpt_args, 'dataset', '') or ''):
            teacher_cfg = build_data_config(ckpt_args, model)  # the normalisation of the teacher's own run
            teacher_mean_std = teacher_cfg['mean'], teacher_cfg['std']
    else:
        try:
            model = _create_model(name, 'teacher', pretrained=True, **kwargs, **(args.kd_model_kwargs or {}))
        except TrainingError as e:
            raise TrainingError(f'{e} (give the teacher weights with --kd-checkpoint FILE, or a local-dir:/hf-hub: '
                                f'name)') from e
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    teacher = DistillationTeacher(model, device=device)
    if teacher_mean_std is not None:
        mean, std = teacher_mean_std
        teacher.mean_kd = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        teacher.std_kd = torch.tensor(std, device=device).view(1, -1, 1, 1)
    _logger.info(f'Distillation teacher {name}: {sum(p.numel() for p in model.parameters()):,} params')
    return teacher


def create_task(args, model, teacher, data_config, device, model_dtype, class_stats=None):
    """timm's training task: ClassificationTask, MultiLabelClassificationTask (--task multilabel), or logit /
    feature / token distillation with a teacher. `class_stats`: (positive counts, samples) for the class weights."""
    criterion_kwargs = create_loss_kwargs(args, class_stats)
    common = dict(criterion_kwargs=criterion_kwargs, device=device, dtype=model_dtype, verbose=args.rank == 0)
    weights = dict(distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight)
    try:
        if teacher is None and _is_multilabel(args):
            task = MultiLabelClassificationTask(model, threshold=args.multilabel_threshold, **common)
        elif teacher is None:
            task = ClassificationTask(model, **common)
        elif args.kd_distill_type == 'logit':
            task = LogitDistillationTask(model, teacher, loss_type=args.kd_loss_type, temperature=args.kd_temperature,
                                         **weights, **common)
        elif args.kd_distill_type == 'feature':
            task = FeatureDistillationTask(model, teacher, student_feature_dim=args.kd_student_feature_dim,
                                           teacher_feature_dim=args.kd_teacher_feature_dim, **weights, **common)
        else:
            task = TokenDistillationTask(model, teacher, distill_type=args.kd_token_distill_type,
                                         temperature=args.kd_temperature, **weights, **common)
    except (ValueError, TypeError, AttributeError) as e:
        if teacher is None:  # the loss factory's refusals, e.g. --loss twoway with label smoothing
            raise TrainingError(f'could not create the --loss {_loss_type(args)} training loss: {e}') from e
        raise TrainingError(f'could not set up {args.kd_distill_type} distillation of {args.model} from '
                            f'{args.kd_model_name}: {e}') from e
    if teacher is not None:
        # the student's inputs are normalised with the data config's statistics, whatever its pretrained_cfg says
        shape = (1, -1) + (1,) * (len(data_config['input_size']) - 1)
        task.student_mean = torch.tensor(data_config['mean'], device=device).view(shape)
        task.student_std = torch.tensor(data_config['std'], device=device).view(shape)
        if is_sequence_dataset(args.dataset):  # a sequence teacher reads the same normalised series
            teacher.mean_kd, teacher.std_kd = task.student_mean.clone(), task.student_std.clone()
    return task


def create_loss_kwargs(args, class_stats=None):
    """create_classification_loss arguments (the task adds multi_label), as timm's train.py maps its flags: --loss
    (or --bce-loss / --jsd-loss) to loss_type, Mixup/CutMix to soft targets that carry the label smoothing,
    --aug-splits to the JSD splits, the --bce-* / --asl-* / --poly-* / --twoway-* / --db-* flags to the arguments of
    the same name, the class weights resolved from numbers, a file or a method over `class_stats`."""
    loss = _loss_type(args)
    kwargs = dict(loss_type=loss, smoothing=args.smoothing, soft_targets=_mixup_active(args))
    if loss == 'jsd':
        return dict(loss_type='jsd', jsd_splits=args.aug_splits, smoothing=args.smoothing)
    multilabel = _is_multilabel(args)
    if loss == 'bce':
        kwargs.update(bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight)
    elif loss == 'asl':
        kwargs.update(asl_gamma_pos=args.asl_gamma_pos, asl_gamma_neg=args.asl_gamma_neg)
        if multilabel:
            kwargs.update(asl_clip=args.asl_clip, asl_reduction=args.asl_reduction)
    elif loss == 'poly':
        kwargs.update(poly_epsilon=args.poly_epsilon)
        if multilabel:
            kwargs.update(poly_gamma=args.poly_gamma, poly_alpha=args.poly_alpha)
    elif loss == 'twoway':
        kwargs.update(twoway_tp=args.twoway_tp, twoway_tn=args.twoway_tn)
    elif loss == 'db':
        counts, num_samples = class_stats if class_stats is not None else (None, None)
        kwargs.update(class_counts=counts, num_samples=num_samples, db_neg_scale=args.db_neg_scale,
                      db_init_bias=args.db_init_bias, db_focal_gamma=args.db_focal_gamma)
    for dest, kind in (('loss_pos_weight', 'pos_weight'), ('loss_class_weight', 'class_weight')):
        value = getattr(args, dest)
        if value is None:
            continue
        try:
            kwargs[kind] = resolve_class_weights(value, kind, class_stats=class_stats, power=args.loss_weight_power,
                                                 beta=args.loss_weight_beta, max_weight=args.loss_weight_max)
        except (ValueError, OSError) as e:
            raise TrainingError(f'--{dest.replace("_", "-")} {value}: {e}') from e
    return kwargs


def create_train_loss(args, class_stats=None):
    """The training loss timm's train.py would use for these flags (the task builds the same)."""
    return create_classification_loss(multi_label=_is_multilabel(args), **create_loss_kwargs(args, class_stats))


def class_stats_for(args, dataset):
    """(positive count per class, samples) for the class-weight methods and --loss db: --class-stats FILE (timm's
    class_weights.py format), else counted over the training split when it lists its targets without reading images
    (the built-in data, timm's folder readers); None when nothing needs them."""
    methods = [_weight_method(args.loss_pos_weight, 'pos_weight'), _weight_method(args.loss_class_weight, 'class_weight')]
    if not any(methods) and _loss_type(args) != 'db':
        return None
    if args.class_stats:
        try:
            counts, num_samples = load_class_stats(args.class_stats)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise TrainingError(f'--class-stats {args.class_stats!r}: {e}') from e
        if counts.numel() != args.num_classes:
            raise TrainingError(f'--class-stats {args.class_stats!r} counts {counts.numel()} classes; the model has '
                                f'{args.num_classes}')
        return counts, num_samples
    reader = getattr(dataset, 'reader', None)
    targets = getattr(dataset, 'targets', None)
    if targets is None and reader is not None:  # as timm's class_weights.py reads them, without the images
        samples = getattr(reader, 'samples', None)
        targets = getattr(reader, 'targets', None) or ([t for _, t in samples] if isinstance(samples, list) else None)
        if targets is None and hasattr(reader, 'iter_targets') and not isinstance(dataset, torch.utils.data.IterableDataset):
            targets = list(reader.iter_targets())
    if targets is None:
        raise TrainingError(f'{" / ".join(f"--loss-{m}" for m in ("pos-weight", "class-weight"))} methods and --loss db '
                            f'need class counts: this dataset does not list its targets, pass --class-stats FILE '
                            f'(timm\'s class_weights.py writes it)')
    encode = MultiLabelTarget(args.num_classes, dense=args.target_format == 'multihot') if _is_multilabel(args) else None
    counts = torch.zeros(args.num_classes, dtype=torch.float64)
    for target in targets:
        if encode is not None:
            counts += encode(target).double()
        else:
            counts[int(target)] += 1
    _logger.info(f'Class stats counted over the {len(targets)} training samples: positives per class '
                 f'{int(counts.min())}-{int(counts.max())}')
    return counts.float(), len(targets)


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
    """timm's data config for the model with the flags applied (digits statistics for the built-in data; for time
    series the channels and length of the data and its normalisation)."""
    if is_sequence_dataset(getattr(args, 'dataset', '') or ''):
        return dict(input_size=(args.in_chans, args.seq_len), mean=tuple(args.mean), std=tuple(args.std),
                    crop_pct=None, interpolation=None)
    chans = args.in_chans or getattr(model, 'in_chans', 3)  # e.g. 1 for the sequential-MNIST models
    input_size = None
    if args.input_size:  # overrides --img-size and --in-chans, as in timm's resolve_data_config
        input_size = tuple(args.input_size)
    elif args.img_size:
        input_size = (chans, args.img_size, args.img_size)
    data_config = resolve_data_config(
        dict(input_size=input_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
             interpolation=args.interpolation), model=model)
    if _builtin_data(args) and args.mean is None:
        data_config['mean'], data_config['std'] = (DIGIT_PAIRS_MEAN, DIGIT_PAIRS_STD) if _is_multilabel(args) else (
            DIGITS_MEAN, DIGITS_STD)
    return data_config


def create_eval_loader(dataset, data_config, args, device, img_dtype=None):
    if isinstance(dataset, SequenceDataset):
        return sequence_loader(dataset, args, training=False)
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher, persistent_workers=False,
        img_dtype=img_dtype or torch.float32)


def sequence_loader(dataset, args, training):
    """A DataLoader of time series (already normalised tensors): shuffled (DistributedSampler under torchrun) with
    full batches for training; in order for validation (timm's OrderedDistributedSampler under torchrun, whose
    padding the evaluator leaves out)."""
    from timm.data.distributed_sampler import OrderedDistributedSampler
    sampler = None
    if args.distributed:
        sampler = (torch.utils.data.distributed.DistributedSampler(dataset, seed=args.seed) if training
                   else OrderedDistributedSampler(dataset))
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size if training else (args.validation_batch_size or args.batch_size),
        shuffle=training and sampler is None, sampler=sampler, drop_last=training, num_workers=args.workers,
        pin_memory=args.pin_mem)


def fit_sequence_batch(args, num_series):
    """Training batches are full (drop_last). A training split with fewer series per rank than the preset's batch
    (the small UEA / UCR archives: BasicMotions has 40 series, the sequence preset's batch is the paper's 64 for
    CharacterTrajectories' 1,422) trains at the largest power of two that gives four batches per rank an epoch (at
    least 1), and the run says so; a batch the user chose (other than the preset's), or one that sets the lr through
    --lr-base, is kept, and if it gives no full batch the error names the -b that fits."""
    per_rank = math.ceil(num_series / args.world_size)
    if per_rank >= args.batch_size:
        return
    fit = 2 ** int(math.log2(max(1, per_rank // 4)))
    where = f'{num_series} training series' + (f' ({per_rank} per rank)' if args.world_size > 1 else '')
    if args.batch_size != PRESETS[args.preset].get('batch_size') or args.lr_base is not None:
        raise TrainingError(f'{where} give no full batch of {args.batch_size}: pass a smaller -b/--batch-size, '
                            f'e.g. -b {fit} (four batches an epoch)')
    if args.rank == 0:
        _logger.info(f"Batch size {fit}: {where} give no full batch of the preset's {args.batch_size} (four batches "
                     f'an epoch at {fit}; -b sets it)')
    args.batch_size = fit


@dataclass
class TrainState:
    """What the set-up steps of run() build, in their order, and the epoch loop uses."""
    args: argparse.Namespace
    device: torch.device
    model: nn.Module  # the model being trained (the student), never wrapped
    dataset_train: Any = None
    dataset_eval: Any = None
    # setup_model
    data_config: dict = field(default_factory=dict)
    model_dtype: Optional[torch.dtype] = None  # None: float32
    # setup_task: timm's training task (step: task(input, target) -> {'loss', 'output', ...}), its EMA
    task: Any = None
    model_ema: Any = None  # the task's ModelEmaV3 of the trainable module
    # setup_optimizer
    optimizer: Optional[torch.optim.Optimizer] = None
    amp_ctx: Callable = nullcontext
    scaler: Optional[NativeScaler] = None
    # setup_output, resume
    output_dir: str = ''
    resume_path: str = ''
    start_epoch: int = 0
    # setup_loaders
    mixup_fn: Optional[Mixup] = None  # Mixup/CutMix on the device (--no-prefetcher)
    collate_fn: Optional[FastCollateMixup] = None  # Mixup/CutMix in the prefetching loader's collation
    loader_train: Any = None
    loader_eval: Any = None
    # setup_schedule: the per-epoch counts, computed once
    num_batches: int = 0  # training batches per epoch (--max-train-batches applied)
    updates_per_epoch: int = 0  # optimizer steps per epoch (--grad-accum-steps applied)
    lr_scheduler: Any = None
    num_epochs: int = 0  # of the schedule
    end_epoch: int = 0  # this invocation stops before it (--stop-after-epochs)
    num_updates: int = 0  # optimizer steps so far, the schedule's clock
    # setup_saver (rank 0)
    saver: Optional[CheckpointSaver] = None
    log_wandb: bool = False

    @property
    def train_loss_fn(self):
        return getattr(self.task, 'criterion', None)


def run(args):
    """The set-up steps, then the epoch loop (or the --eval-only evaluation)."""
    device = setup_device(args)
    dataset_train, dataset_eval = setup_datasets(args)
    model = create_training_model(args, args.num_classes)
    if args.eval_only:
        return evaluate_checkpoint(args, model, dataset_eval, device)
    state = TrainState(args=args, device=device, model=model, dataset_train=dataset_train, dataset_eval=dataset_eval)
    setup_model(state)  # data config, device, dtype, memory format, SyncBN / split BN, TorchScript
    setup_task(state)  # timm's task (classification or distillation), its EMA
    setup_optimizer(state)  # optimizer over the task's trainable module, AMP
    setup_output(state)  # run folder, checkpoint to resume
    resume(state)  # weights, optimizer, EMA, task state; start epoch
    wrap_model(state)  # torch.compile, DDP (through the task)
    setup_loaders(state)  # Mixup/CutMix, loaders
    setup_schedule(state)  # per-epoch counts, lr schedule
    setup_saver(state)  # checkpoints, args.yaml, wandb (rank 0)
    return train(state)


def setup_device(args):
    """Device and process group, logging, input checks, seed, and the lr (which may depend on the world size)."""
    for module in args.device_modules or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TrainingError(f'--device-modules: cannot import {module!r}: {e}') from e
    device = init_distributed_device(args)
    setup_logging(args.rank)
    check_args(args)
    if args.rank == 0:
        log_defaults(args)
    if args.distributed:
        _logger.info(f'Distributed: {args.world_size} processes, backend '
                     f'{torch.distributed.get_backend()}, device {device}')
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    random_seed(args.seed, args.rank)
    resolve_lr(args)
    return device


def log_defaults(args):
    """The run's first lines: the recipe, and each value that differs from timm's train.py default."""
    diffs = timm_differences(args)
    _logger.info(f"Recipe: preset '{args.preset}' ({PRESET_SOURCES[args.preset]}, not timm's defaults); {len(diffs)} values "
                 f"differ from timm {TIMM_TRAIN_VERSION} train.py's defaults:")
    for flag, ours, theirs in diffs:
        _logger.info(f'  {flag} {ours!r} (timm: {theirs!r})')
    if args.preset_kwargs_dropped:
        kw = ' '.join(f'{k}={v}' for k, v in args.preset_kwargs_dropped.items())
        _logger.info(f"Preset '{args.preset}' model kwargs ({kw}) are for {PRESETS[args.preset]['model']}; "
                     f"{args.model} is built with its own defaults")


def setup_datasets(args):
    """(train, val) datasets; sets args.num_classes from the dataset unless given."""
    dataset_train, dataset_eval, num_classes = load_datasets(args)
    if _builtin_data(args) and _is_multilabel(args):
        _logger.info(f"No --data-dir, --task multilabel: training on the built-in digit pairs (two of scikit-learn's "
                     f"real 8x8 digits side by side, the target the set of their classes; {len(dataset_train)} train / "
                     f"{len(dataset_eval)} val images, 10 classes), preset '{args.preset}'")
    elif _builtin_data(args):
        _logger.info(f"No --data-dir: training on the built-in digits dataset (scikit-learn, {len(dataset_train)} "
                     f"train / {len(dataset_eval)} val real 8x8 images, 10 classes), preset '{args.preset}'")
    args.num_classes = args.num_classes or num_classes
    if not args.num_classes:
        raise TrainingError('could not infer the number of classes; pass --num-classes')
    if _is_multilabel(args):
        # timm's multi-label pipeline: class-index lists (or multi-hot vectors) -> float multi-hot vectors
        encode = MultiLabelTarget(args.num_classes, dense=args.target_format == 'multihot')
        for dataset in (dataset_train, dataset_eval):
            dataset.target_transform = encode
    return dataset_train, dataset_eval


def setup_model(state):
    args, model = state.args, state.model
    if args.rank == 0:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} params, '
                     f'{args.num_classes} classes')
    state.data_config = build_data_config(args, model)
    # stored with the run (args.yaml, every checkpoint's args): the export writes it into the deployed config
    args.data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in state.data_config.items()}
    if args.split_bn:
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    if args.model_dtype:
        state.model_dtype = getattr(torch, args.model_dtype)
        if state.model_dtype == torch.float16:
            _logger.warning('--model-dtype float16: half-precision training is unstable; bfloat16 is safer')
    model.to(device=state.device, dtype=state.model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn and state.device.type == 'cuda':
        model = convert_sync_batchnorm(model)
    if args.torchscript:
        try:
            model = torch.jit.script(model)
        except Exception as e:
            raise TrainingError(f'--torchscript: could not torch.jit.script {args.model}: {e}'.split('\n')[0]) from e
    state.model = model


def setup_task(state):
    """timm's training task around the model (a teacher for --kd-model-name) and, with --model-ema, its EMA."""
    args = state.args
    teacher = None
    if args.kd_model_name:
        teacher = create_teacher(args, state.model, state.data_config, state.device)
    class_stats = class_stats_for(args, state.dataset_train)
    state.task = create_task(args, state.model, teacher, state.data_config, state.device, state.model_dtype, class_stats)
    if args.model_ema:
        state.model_ema = state.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                               device='cpu' if args.model_ema_force_cpu else None)


def setup_optimizer(state):
    """The optimizer over the task's trainable parameters (SMP parameter groups), the AMP context and loss scaler."""
    args, device = state.args, state.device
    trainable = state.task.get_trainable_module()
    no_decay = set(trainable.no_weight_decay()) if hasattr(trainable, 'no_weight_decay') else set()
    no_decay |= set(args.no_decay_patterns)
    group_fn = partial(param_groups_smp, weight_decay=args.weight_decay, lr_scale=args.radius_lr_scale,
                       no_weight_decay_list=no_decay, layer_decay=args.layer_decay,
                       layer_decay_min_scale=args.layer_decay_min_scale,
                       layer_decay_no_opt_scale=args.layer_decay_no_opt_scale)
    opt_kwargs = optimizer_kwargs(args)
    for key in ('layer_decay', 'layer_decay_min_scale', 'layer_decay_no_opt_scale'):
        opt_kwargs.pop(key, None)  # applied by param_groups_smp
    clash = sorted(set(opt_kwargs) & set(args.opt_kwargs))
    if clash:
        raise TrainingError(f'--opt-kwargs {", ".join(clash)}: set these with their own flags (--lr, --opt-eps, ...)')
    opt_kwargs.update(args.opt_kwargs)
    try:
        state.optimizer = create_optimizer_v2(trainable, param_group_fn=group_fn, **opt_kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise TrainingError(f'could not create optimizer {args.opt!r}: {e}') from e

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if args.amp:
        if device.type == 'cpu' and amp_dtype == torch.float16:
            raise TrainingError('--amp on CPU supports --amp-dtype bfloat16 only')
        state.amp_ctx = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
    state.scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None


def setup_output(state):
    """The run folder (one name for all ranks) and the checkpoint to resume from, if any.

    --resume auto (or --auto-resume) resumes in place from the run folder's last.pth.tar: --experiment's folder, or
    without --experiment the latest run of this model at this size in --output (a folder named DATE-TIME-MODEL-SIZE,
    as a run without --experiment names its own), so a relaunch of the same command continues the run."""
    args = state.args
    size = str(state.data_config['input_size'][-1])
    run_name = args.experiment
    if not run_name:
        if args.resume == 'auto' and args.rank == 0:  # rank 0 looks; every rank gets its answer below
            run_name = latest_run(args.output, args.model, size)
        run_name = run_name or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), size])
    if args.distributed:  # one folder for all ranks, even if their clocks straddle a second
        names = [run_name]
        torch.distributed.broadcast_object_list(names, src=0)
        run_name = names[0]
    state.output_dir = os.path.join(args.output, run_name)
    state.resume_path = args.resume
    if args.resume == 'auto':
        last = os.path.join(state.output_dir, 'last.pth.tar')
        state.resume_path = last if os.path.isfile(last) else ''
        if args.rank == 0 and state.resume_path and not args.experiment:
            _logger.info(f'--resume auto: continuing {state.output_dir}, the latest run of {args.model} at {size} px in '
                         f'--output {args.output} (--experiment NAME picks another run folder)')
        elif args.rank == 0 and not state.resume_path:
            where = state.output_dir if args.experiment else f'an earlier run of {args.model} at {size} px in {args.output}'
            _logger.info(f'--resume auto: no last.pth.tar in {where}; starting a new run in {state.output_dir}')


def latest_run(output, model, size):
    """The folder name of the latest run (by its last.pth.tar) of `model` at `size` px under `output`, among the
    folders named as a run without --experiment names its own (DATE-TIME-MODEL-SIZE); '' if there is none."""
    pattern = re.compile(r'\d{8}-\d{6}-' + re.escape(f'{safe_model_name(model)}-{size}'))
    runs = []
    if os.path.isdir(output):
        for entry in os.scandir(output):
            last = os.path.join(entry.path, 'last.pth.tar')
            if entry.is_dir() and pattern.fullmatch(entry.name) and os.path.isfile(last):
                runs.append((os.path.getmtime(last), entry.name))
    return max(runs)[1] if runs else ''


def resume(state):
    """Restore model, optimizer, loss scaler, EMA and task state; the start epoch is the checkpoint's unless
    --start-epoch."""
    args = state.args
    resume_epoch = None
    if state.resume_path:
        try:
            resume_epoch = resume_task_checkpoint(
                state.task, state.resume_path, optimizer=None if args.no_resume_opt else state.optimizer,
                loss_scaler=None if args.no_resume_opt else state.scaler, log_info=args.rank == 0)
            if state.model_ema is not None:
                load_task_ema_checkpoint(state.task, state.resume_path)
        except Exception as e:
            _raise_unsafe_checkpoint(state.resume_path, e)
            raise TrainingError(f'could not resume from {state.resume_path!r}: {e}') from e
        _logger.info(f'Resumed from {state.resume_path} at epoch {resume_epoch}')
    state.start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if args.start_epoch is not None:
        _logger.info(f'Starting at epoch {args.start_epoch} (--start-epoch)')


def wrap_model(state):
    """torch.compile the task's train and eval modules, then DDP (the task wraps its trainable module only)."""
    args, task = state.args, state.task
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if state.model_ema is not None and not args.model_ema_force_cpu:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        device = state.device
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)


def setup_loaders(state):
    """Mixup/CutMix, AugMix splits, the training (optionally variable-resolution) and validation loaders."""
    args, data_config = state.args, state.data_config
    dataset_train = state.dataset_train
    if isinstance(dataset_train, SequenceDataset):
        fit_sequence_batch(args, len(dataset_train))
        state.loader_train = sequence_loader(dataset_train, args, training=True)
        state.loader_eval = sequence_loader(state.dataset_eval, args, training=False)
        return
    if _mixup_active(args):
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=args.num_classes,
                          multi_label=_is_multilabel(args))  # multi-hot targets mixed, smoothed towards 0.5
        if args.no_prefetcher:
            state.mixup_fn = Mixup(**mixup_args)
        else:
            if args.aug_splits:
                raise TrainingError('--aug-splits with Mixup/CutMix needs --no-prefetcher (as timm)')
            state.collate_fn = FastCollateMixup(**mixup_args)
    allow_zero_bit_posterize()  # timm's RandAugment can ask for 0 bits, which Pillow 13 refuses
    if args.aug_splits > 1:
        dataset_train = AugMixDataset(dataset_train, num_splits=args.aug_splits)
    img_dtype = state.model_dtype or torch.float32
    train_interpolation = data_config['interpolation']
    if args.train_interpolation and not args.no_aug:
        train_interpolation = args.train_interpolation
    scheduled = {}
    if args.train_img_sizes:
        num_batches = args.train_batches_per_epoch
        if args.train_steps_per_epoch:
            num_batches = args.train_steps_per_epoch * args.grad_accum_steps
        scheduled = dict(input_size_choices=args.train_img_sizes, batch_size_choices=args.train_batch_sizes,
                         batch_choice_weights=args.train_size_probs, batch_choice_seed=args.seed,
                         batch_choice_schedule=args.train_size_schedule, batch_schedule_epochs=args.epochs,
                         batch_schedule_spread=args.train_size_schedule_spread,
                         batch_schedule_random_mix=args.train_size_random_mix, num_batches=num_batches)
    try:
        state.loader_train = create_loader(
            dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
            no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
            train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
            grayscale_prob=args.grayscale_prob or 0., gaussian_blur_prob=args.gaussian_blur_prob or 0.,
            auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats), num_aug_splits=args.aug_splits,
            interpolation=train_interpolation, collate_fn=state.collate_fn, mean=data_config['mean'],
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem,
            device=state.device, use_prefetcher=not args.no_prefetcher, img_dtype=img_dtype,
            use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding,
            persistent_workers=False,  # fresh worker RNG each epoch: exact resume at epoch boundaries
            **scheduled)
    except (ValueError, TypeError, AssertionError) as e:
        raise TrainingError(f'could not build the training loader: {e}') from e
    if args.pad_crop and args.pad_crop[0] and not args.no_aug:
        # the CIFAR papers' crop in place of timm's random-resized crop, in the transform create_loader set
        holder = dataset_train.dataset if isinstance(dataset_train, AugMixDataset) else dataset_train
        try:
            holder.transform = with_pad_crop(holder.transform, *args.pad_crop)
        except ValueError as e:
            raise TrainingError(f'--pad-crop: {e}') from e
    state.loader_eval = create_eval_loader(state.dataset_eval, data_config, args, state.device, img_dtype)
    if len(state.loader_train) == 0:
        raise TrainingError(f'{len(state.dataset_train)} training images give no full batch of {args.batch_size}')


def setup_schedule(state):
    """Batches and optimizer updates per epoch (once), the lr schedule moved to the start epoch."""
    args = state.args
    num_batches = len(state.loader_train)
    state.num_batches = min(num_batches, args.max_train_batches) if args.max_train_batches else num_batches
    state.updates_per_epoch = (state.num_batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    if args.sched == 'plateau':
        args.sched_on_updates = False  # timm's plateau schedule steps once per epoch, on the eval metric
        if args.rank == 0:
            _logger.warning('--sched plateau is deprecated by timm (1.0.31): its state (best metric, patience) is not '
                            'saved in checkpoints, so a resumed run restarts it; prefer --sched cosine or wsd')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # timm's plateau deprecation, said once above
            state.lr_scheduler, state.num_epochs = create_scheduler_v2(
                state.optimizer, **scheduler_kwargs(args, decreasing_metric='loss' in args.eval_metric),
                updates_per_epoch=state.updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise TrainingError(f'--sched {args.sched}: {e} ({state.updates_per_epoch} updates per epoch)') from e
    if state.lr_scheduler is not None and state.start_epoch > 0:
        if args.sched_on_updates:
            state.lr_scheduler.step_update(state.start_epoch * state.updates_per_epoch)
        else:
            state.lr_scheduler.step(state.start_epoch)
    state.num_updates = state.start_epoch * state.updates_per_epoch
    state.end_epoch = state.num_epochs
    if args.stop_after_epochs:
        state.end_epoch = min(state.num_epochs, state.start_epoch + args.stop_after_epochs)
    if args.stop_epoch:
        state.end_epoch = min(state.end_epoch, args.stop_epoch)  # timm's --stop-epoch: the schedule unchanged
    late = [n for n in args.save_epochs or () if n > state.num_epochs]
    if late:
        raise TrainingError(f'--save-epochs {late[0]}: the schedule has {state.num_epochs} epochs')
    warn_unfinished_warmup(state)


def warn_unfinished_warmup(state):
    """A warning when the warm-up covers the whole run: the lr then never reaches its peak (timm runs on without a
    word). wsd / rsqrt always put their warm-up first and refuse a run without room after it (_check_schedule)."""
    args = state.args
    if (state.lr_scheduler is None or getattr(args, 'rank', 0) != 0 or args.warmup_prefix or args.sched in ('wsd', 'rsqrt')
            or not 0 < args.epochs <= args.warmup_epochs):
        return
    last = args.epochs * state.updates_per_epoch - 1 if args.sched_on_updates else args.epochs - 1
    end_lr = state.lr_scheduler._get_lr(last)[0]
    _logger.warning(f'--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the warm-up is still rising when '
                    f'the run ends, so the lr never reaches --lr {args.lr:g} (it ends at {end_lr:.3g}); lower '
                    f'--warmup-epochs or add --warmup-prefix')


def setup_saver(state):
    """Rank 0: the run folder, the checkpoint saver (with its history when resuming in the run folder), args.yaml,
    wandb. The folder is made only now, once everything that can fail on bad input has run."""
    args = state.args
    os.makedirs(state.output_dir, exist_ok=True)  # every rank may get here first (timm's get_outdir races)
    if args.rank != 0:
        return
    state.saver = CheckpointSaver(
        model=state.model, optimizer=state.optimizer, args=args, model_ema=state.model_ema, amp_scaler=state.scaler,
        checkpoint_dir=state.output_dir, recovery_dir=state.output_dir, decreasing='loss' in args.eval_metric,
        max_history=args.checkpoint_hist, unwrap_fn=unwrap, task=state.task)
    if state.resume_path and os.path.dirname(os.path.abspath(state.resume_path)) == os.path.abspath(state.output_dir):
        state.saver.load_state_dict_from_checkpoint(state.resume_path)
    # rows of epochs this run trains again (a kill between the summary row and the checkpoint) go: no duplicates
    trim_summary(os.path.join(state.output_dir, 'summary.csv'), state.start_epoch)
    with open(os.path.join(state.output_dir, 'args.yaml'), 'w') as f:
        yaml.safe_dump({k: v for k, v in vars(args).items() if not isinstance(v, torch.device)}, f)
    state.log_wandb = init_wandb(args, os.path.basename(state.output_dir))
    _logger.info(f'Output: {state.output_dir}')
    eff = args.batch_size * args.grad_accum_steps * args.world_size
    _logger.info(f'Training {state.num_epochs} epochs from epoch {state.start_epoch}: {len(state.dataset_train)} '
                 f'images, {state.num_batches} batches/epoch, effective batch {eff} ({args.batch_size} x '
                 f'{args.grad_accum_steps} accumulation x {args.world_size} ranks), lr {args.lr:g}')


def init_wandb(args, run_name):
    """--log-wandb on rank 0: wandb.init; without the wandb package a warning and the run goes on (as timm)."""
    if not args.log_wandb or args.rank != 0:
        return False
    try:
        import wandb
    except ImportError:
        _logger.warning('--log-wandb: the wandb package is not installed (pip install wandb); the metrics are not '
                        'logged to wandb')
        return False
    wandb.init(project=args.wandb_project, name=run_name, config=args, tags=args.wandb_tags,
               resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None)
    return True


def train(state):
    """The epoch loop: train, validate (every --val-interval epochs and the last), log, checkpoint."""
    args = state.args
    best = None
    t_start = time.time()
    if state.start_epoch >= state.end_epoch and args.rank == 0:
        _logger.info(f'Nothing to train: the run starts at epoch {state.start_epoch} and its schedule (or --stop-epoch) '
                     f'ends before epoch {state.end_epoch}')
    for epoch in range(state.start_epoch, state.end_epoch):
        begin_epoch(state, epoch)
        t0 = time.time()
        train_metrics = train_one_epoch(state, epoch)
        recalibrate_bn(state)  # every epoch: validation and every checkpoint see statistics of the current weights
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            if not args.sync_bn:
                distribute_bn(state.model, args.world_size, args.dist_bn == 'reduce')
            if state.model_ema is not None:
                distribute_bn(state.model_ema, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = metrics_ema = None
        if should_validate(state, epoch):
            eval_metrics = validate(state, ema=False)
            if state.model_ema is not None and not args.model_ema_force_cpu:
                metrics_ema = validate(state, ema=True)
        if not args.sched_on_updates and state.lr_scheduler is not None:
            state.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
        if args.rank == 0:
            best = log_and_save(state, epoch, train_metrics, eval_metrics, metrics_ema,
                                time.time() - t0, time.time() - t_start)
            if epoch + 1 in (args.save_epochs or ()):
                state.saver.save_milestone(epoch + 1)  # milestone-N.pth.tar after N epochs, never evicted
    if args.rank == 0 and state.start_epoch < state.end_epoch < state.num_epochs:
        flag = '--stop-epoch' if args.stop_epoch == state.end_epoch else '--stop-after-epochs'
        _logger.info(f'Stopped before epoch {state.end_epoch} of {state.num_epochs} ({flag}); the same command with '
                     f'--resume auto{"" if args.experiment else f" --experiment {os.path.basename(state.output_dir)}"} '
                     f'continues it')
    if args.rank == 0:
        plot_curves(os.path.join(state.output_dir, 'summary.csv'), os.path.join(state.output_dir, 'curves.png'))
        if best and best[0] is not None:
            source = best_source(os.path.join(state.output_dir, 'summary.csv'), best[1], args.eval_metric)
            _logger.info(f'Best {args.eval_metric}: {best[0]:.2f} (epoch {best[1]}, {source}); '
                         f'{time.time() - t_start:.0f} s of training; outputs in {state.output_dir}')
            _logger.info('Deploy the best checkpoint (reparameterized, checked, timm local-dir: / Hub folder): '
                         + export_command(state.output_dir, source))

    return best


def export_command(output_dir, source):
    """The `python -m timm_smpconv.export` command line for the run's best checkpoint, with the weights that gave
    its metric (`source`: 'model' or 'EMA'; the export takes the EMA weights unless told --no-ema)."""
    best = os.path.join(output_dir, 'model_best.pth.tar')
    out = os.path.join(output_dir, 'deployed')
    return f'python -m timm_smpconv.export --checkpoint {best} --out {out}' + (' --no-ema' if source == 'model' else '')


def best_source(summary_csv, epoch, metric):
    """'model' or 'EMA': which of the two gave the best epoch's ranked metric (the better one, see log_and_save)."""
    with open(summary_csv) as f:
        row = next((r for r in csv.DictReader(f) if int(r['epoch']) == epoch), {})
    model_value, ema_value = row.get(f'eval_{metric}'), row.get(f'eval_ema_{metric}')
    if not ema_value or not model_value:
        return 'model'
    return 'EMA' if _better(float(ema_value), float(model_value), metric) else 'model'


def _better(a, b, metric):
    """Whether value a of the ranked metric beats b (lower for a loss, higher otherwise)."""
    return a < b if 'loss' in metric else a > b


def recalibrate_bn(state):
    """--bn-recalibrate N: the BatchNorm running statistics of the model and of its EMA re-estimated on N training
    batches with fvcore's PreciseBN (update_bn_stats: the true average of the batch statistics, weights unchanged).

    Why: these models' branch activations shrink by orders of magnitude during training (SMP and small-kernel
    branches start with variances of 1e-2 to 1e-4 and fall to 1e-5 to 1e-8), while BatchNorm's running variance
    starts at 1 and moves 10% per step, and the EMA averages those lagging buffers further; evaluated with them, a
    short run reports chance accuracy while its weights are good. Runs on every rank (then --dist-bn averages the
    ranks' statistics); the EMA's BatchNorm layers are put in train mode for it and back in eval mode.
    """
    args = state.args
    num = min(args.bn_recalibrate, state.num_batches)
    if num <= 0:
        return
    from timm_smpconv._fvcore import update_bn_stats
    modules = [state.model]
    if state.model_ema is not None:
        modules.append(unwrap(state.task.get_eval_model(ema=True)))  # the EMA's model (a student, when distilling)
    for module in modules:
        device = next(module.parameters()).device
        was_training = module.training
        module.train()
        with torch.no_grad(), state.amp_ctx():
            update_bn_stats(module, (x.to(device) for x, _ in training_batches(state)), num_iters=num)
        module.train(was_training)


def training_batches(state):
    """The training loader's (inputs, targets), as the step takes them (device, dtype, Mixup/CutMix, memory format)."""
    args = state.args
    for inputs, target in state.loader_train:
        if args.no_prefetcher:
            inputs, target = inputs.to(device=state.device, dtype=state.model_dtype), target.to(state.device)
            if state.mixup_fn is not None:
                inputs, target = state.mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        yield inputs, target


def should_validate(state, epoch):
    """Every --val-interval epochs and the schedule's last epoch: an interrupted run validates the same epochs."""
    return (epoch + 1) % state.args.val_interval == 0 or epoch == state.num_epochs - 1


def begin_epoch(state, epoch):
    args = state.args
    # every epoch's randomness depends only on (seed, epoch, rank): resuming reproduces it exactly
    random_seed(args.seed + epoch, args.rank)
    loader = state.loader_train
    for holder in (loader, getattr(loader, 'loader', None)):  # timm's PrefetchLoader wraps the DataLoader
        for part in (getattr(holder, 'sampler', None), getattr(holder, 'batch_sampler', None)):
            if hasattr(part, 'set_epoch'):
                part.set_epoch(epoch)
    mixup_on = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
    for mix in (state.mixup_fn, state.collate_fn):
        if mix is not None:
            if mix.mixup_enabled and not mixup_on and args.rank == 0:
                _logger.info(f'Mixup/CutMix off from epoch {epoch} (--mixup-off-epoch {args.mixup_off_epoch})')
            mix.mixup_enabled = mixup_on


def step_loss(state, result, batch_size):
    """Our hooks around the task's loss: FlexConv's anti-aliasing regulariser and the variable-batch loss scale."""
    args = state.args
    loss = result['loss']
    if args.aliasing_reg > 0:
        loss = loss + anti_aliasing_penalty(state.model, target=args.aliasing_target, factor=args.aliasing_reg)
    if args.variable_batch_loss_scale != 'none' and batch_size != args.batch_size:
        scale = batch_size / args.batch_size
        loss = loss * (scale ** 0.5 if args.variable_batch_loss_scale == 'sqrt' else scale)
    return loss


def after_update(state):
    """Our hooks after each optimizer update: the SMP radius clamp, the EMA, the lr schedule's clock."""
    clamp_smp_radius_(state.model, *state.args.radius_clamp)
    state.num_updates += 1
    if state.model_ema is not None:
        state.task.update_ema(step=state.num_updates)


def train_one_epoch(state, epoch):
    args, task, optimizer, device = state.args, state.task, state.optimizer, state.device
    task.train()
    losses, batch_time, data_time = AverageMeter(), AverageMeter(), AverageMeter()
    accum = args.grad_accum_steps
    num_batches = state.num_batches
    last_batch = num_batches - 1
    end = time.time()
    t_epoch = end
    optimizer.zero_grad()
    for batch_idx, (inputs, target) in enumerate(training_batches(state)):
        if batch_idx > last_batch:
            break
        need_update = (batch_idx + 1) % accum == 0 or batch_idx == last_batch
        data_time.update(time.time() - end)

        sync_ctx = task.no_sync if (args.distributed and not need_update) else nullcontext
        with sync_ctx():
            with state.amp_ctx():
                result = task(inputs, target)
                loss = step_loss(state, result, inputs.shape[0])
            loss_value = loss.item()  # the one host sync per micro-batch: the check and the meter share it
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f'non-finite loss ({loss_value}) at epoch {epoch}, batch {batch_idx}: stopping; the last '
                    f'checkpoint written is intact')
            if state.scaler is not None:
                state.scaler(loss / accum, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                             parameters=task.get_clip_parameters(), need_update=need_update)
            else:
                (loss / accum).backward()
                if need_update:
                    if args.clip_grad is not None:
                        from timm.utils import dispatch_clip_grad
                        dispatch_clip_grad(task.get_clip_parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        losses.update(loss_value, inputs.shape[0])
        if need_update:
            optimizer.zero_grad()
            after_update(state)
            if state.lr_scheduler is not None:
                state.lr_scheduler.step_update(num_updates=state.num_updates, metric=losses.avg)
        if args.synchronize_step and device.type != 'cpu':
            torch.accelerator.synchronize()
        batch_time.update(time.time() - end)
        end = time.time()
        if args.rank == 0 and (batch_idx % args.log_interval == 0 or batch_idx == last_batch):
            lr = optimizer.param_groups[0]['lr']
            ips = inputs.shape[0] * args.world_size / max(batch_time.avg, 1e-9)
            done = batch_idx + 1
            eta = (time.time() - t_epoch) / done * (num_batches - done)
            extra = ''.join(f' {k} {v.item():.4f}' for k, v in result.items() if k.endswith('_loss') and v.numel() == 1)
            _logger.info(
                f'Train {epoch} [{done:>4d}/{num_batches}] loss {losses.val:.4f} ({losses.avg:.4f}){extra} lr {lr:.3e} '
                f'{ips:,.0f} img/s data {data_time.avg * 1e3:.0f} ms ETA {eta:.0f} s')
            if args.save_images and state.output_dir:
                import torchvision.utils
                torchvision.utils.save_image(inputs.float(), os.path.join(state.output_dir, f'train-batch-{batch_idx}.jpg'),
                                             padding=0, normalize=True)
        if state.saver is not None and args.recovery_interval and (batch_idx + 1) % args.recovery_interval == 0 \
                and batch_idx != last_batch:
            state.saver.save_recovery(epoch, batch_idx=batch_idx)
    if args.distributed:
        loss_avg = reduce_tensor(torch.tensor(losses.avg, device=device), args.world_size).item()
    else:
        loss_avg = losses.avg
    return OrderedDict([('loss', loss_avg)])


def validate(state, ema=False):
    """The validation metrics of the task's eval model (or its EMA): loss, top-1 and top-5, or for --task multilabel
    loss, mAP and micro / macro / sample F1 (timm's evaluators)."""
    model = state.task.get_eval_model(ema=ema)
    return evaluate(model, state.loader_eval, state.args, state.device, state.amp_ctx, state.model_dtype)


def evaluate(model, loader, args, device, amp_ctx=nullcontext, input_dtype=None):
    """timm's dataset-level evaluator of the task over a loader, sampler padding excluded: ClassificationEvaluator
    (counts on the device, all-reduced once) or MultiLabelClassificationEvaluator (the predictions of the whole
    validation set, gathered across ranks, for the exact mAP; F1 at --multilabel-threshold)."""
    kwargs = dict(threshold=args.multilabel_threshold) if _is_multilabel(args) else {}
    evaluator = _evaluator_class(args)(device=device, max_samples=evaluation_sample_limit(loader), **kwargs)
    model.eval()
    with torch.no_grad():
        for inputs, target in loader:
            if args.no_prefetcher:
                inputs, target = inputs.to(device=device, dtype=input_dtype), target.to(device)
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                output = model(inputs)
            evaluator.update(output, target)
    return evaluator.compute(distributed=args.distributed)


def log_and_save(state, epoch, train_metrics, eval_metrics, metrics_ema, epoch_time, total_time):
    """Rank 0, end of an epoch: log line, summary.csv row (and wandb), checkpoint; returns (best metric, epoch)."""
    args = state.args
    msg = f'Epoch {epoch}: train loss {train_metrics["loss"]:.4f}'
    names = _metric_names(args)
    eval_keys = list(names) + ([f'ema_{k}' for k in names] if state.model_ema is not None else [])
    eval_row = OrderedDict((k, None) for k in eval_keys)  # blank in epochs without validation
    metric = None  # only validated epochs are ranked (and can become the best)
    if eval_metrics is None:
        msg += f' | not validated (--val-interval {args.val_interval})'
    else:
        msg += f' | val loss {eval_metrics["loss"]:.4f} {format_metrics(eval_metrics)}'
        eval_row.update(eval_metrics)
        metric = eval_metrics[args.eval_metric]
        if metrics_ema is not None:
            msg += f' | EMA {format_metrics(metrics_ema)}'
            eval_row.update((f'ema_{k}', v) for k, v in metrics_ema.items())  # -> eval_ema_top1 ...
            ema_metric = metrics_ema[args.eval_metric]
            if _better(ema_metric, metric, args.eval_metric):
                metric = ema_metric  # the checkpoint holds both: it ranks by the better (best_source says which)
    _logger.info(msg + f' | {epoch_time:.1f} s, {total_time:.0f} s total')
    summary = os.path.join(state.output_dir, 'summary.csv')
    update_summary(epoch, train_metrics, eval_row, summary, lr=state.optimizer.param_groups[0]['lr'],
                   write_header=epoch == 0 or not os.path.exists(summary), log_wandb=state.log_wandb)
    return state.saver.save_checkpoint(epoch, metric=metric)


_METRIC_LABELS = dict(top1='top-1', top5='top-5', map='mAP', micro_f1='micro-F1', macro_f1='macro-F1',
                      sample_f1='sample-F1')


def format_metrics(metrics):
    """'top-1 A top-5 B', or 'mAP A micro-F1 B macro-F1 C sample-F1 D' for multi-label metrics (loss left out)."""
    return ' '.join(f'{label} {metrics[k]:.2f}' for k, label in _METRIC_LABELS.items() if k in metrics)


def plot_curves(summary_csv, out_png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return

    def plot(ax, key, label=None):  # epochs without validation have blank eval columns
        points = [(int(r['epoch']), float(r[key])) for r in rows if r.get(key)]
        if points:
            ax.plot(*zip(*points), label=label, marker='.' if len(points) < len(rows) else None)

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.6))
    plot(ax1, 'train_loss', 'train')
    plot(ax1, 'eval_loss', 'val')
    plot(ax1, 'eval_ema_loss', 'val (EMA)')
    ax1.set_title('loss')
    metric = 'map' if 'eval_map' in rows[0] else 'top1'  # --task multilabel: mAP
    label = _METRIC_LABELS[metric]
    plot(ax2, f'eval_{metric}', f'val {label}')
    plot(ax2, f'eval_ema_{metric}', f'val {label} (EMA)')
    ax2.set_title('mAP (%)' if metric == 'map' else 'accuracy (%)')
    plot(ax3, 'lr')
    ax3.set_title('learning rate (end of epoch)')
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def evaluate_checkpoint(args, model, dataset_eval, device):
    """--eval-only: the validation metrics (top-1/top-5, or mAP and F1 for --task multilabel) of the checkpoint's
    model and, if present, its EMA."""
    ckpt = _read_checkpoint(args.checkpoint)
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
        metrics = evaluate(net, loader, args, device)
        results[name] = metrics
        if args.rank == 0:
            _logger.info(f'{name}{" (reparameterized)" if args.reparam else ""}: {format_metrics(metrics)} '
                         f'loss {metrics["loss"]:.4f}')
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except TrainingError as e:  # one line, once (not also as a log line), exit 2
        rank = getattr(args, 'rank', 0)
        print(f'train_imagenet.py: error{f" (rank {rank})" if rank else ""}: {e}', file=sys.stderr)
        raise SystemExit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
