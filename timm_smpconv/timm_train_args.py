""" timm's train.py command line, as data: every option of the timm train.py our trainer is a drop-in for.

`train_imagenet.py` accepts each of these option strings with timm's nargs and type, and either gives it timm's
meaning or refuses it with a one-line reason (its REFUSED table); `tests/test_train_timm_args.py` holds it to
that, option by option. The defaults are timm's, so a run can list the values in which our recipe differs.

Sources: `train.py` of timm's repository at version 1.0.29.dev0 for the 173 options it had (the variable-resolution
options `--train-img-sizes` ... are named as that script names them, their types follow the arguments of timm
1.0.31's `create_loader` they feed), and the options timm's train.py gained up to the 1.0.31 release we pin. The pip
package ships no train.py, so each of those is marked below with where its name, type and default come from:
  [changelog]  timm 1.0.31's release notes (the package's METADATA: September 25, October 9, October 13, 2026)
  [class_weights.py]  timm's repository script that writes the class stats for train.py; its dataset and weighting
               options are train.py's by its own description ("Dataset arguments match train.py", "as
               --loss-weight-power (default: 1.)")
  [loss docs]  timm's docs page reference/loss.mdx: "train.py maps --loss to loss_type ... The --asl-*, --poly-*,
               --twoway-*, --db-* ... flags map to the factory arguments of the same name"; so their defaults are
               timm 1.0.31's create_classification_loss defaults
  [scheduler docs]  timm's docs page reference/schedulers.mdx, and the defaults of create_scheduler_v2
  [training docs]  the multi-label section of timm's docs page training_script.mdx
Two 1.0.29.dev0 defaults moved with the package: `--decay-epochs` is None (create_scheduler_v2: 90 for step, 0.2 of
the schedule for wsd / rsqrt) and `--eval-metric` is None (the task's evaluator's default_metric: top1, map for
multi-label) [scheduler docs, training docs].
"""
from typing import Any, NamedTuple, Optional, Tuple

__all__ = ['TIMM_TRAIN_VERSION', 'TimmOption', 'TIMM_TRAIN_OPTIONS', 'timm_defaults']

TIMM_TRAIN_VERSION = '1.0.31'


class TimmOption(NamedTuple):
    flags: Tuple[str, ...]  # option strings; a positional has its dest as its only "flag"
    type: Any = str  # None for flags that take no value
    nargs: Any = None  # None (one value), '?', '*', '+' or a count
    default: Any = None
    action: str = 'store'  # 'store', 'store_true' or 'kwargs' (timm's utils.ParseKwargs)
    choices: Optional[Tuple] = None

    @property
    def dest(self) -> str:
        long = [f for f in self.flags if f.startswith('--')] or list(self.flags)
        return long[0].lstrip('-').replace('-', '_')

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith('-')


def _flag(*flags, **kw):
    return TimmOption(flags, **kw)


def _switch(*flags):
    return TimmOption(flags, type=None, default=False, action='store_true')


TIMM_TRAIN_OPTIONS: Tuple[TimmOption, ...] = (
    _flag('-c', '--config', default=''),
    # Dataset parameters
    _flag('data', nargs='?'),  # positional data directory, deprecated in timm for --data-dir
    _flag('--data-dir'),
    _flag('--dataset', default=''),
    _flag('--train-split', default='train'),
    _flag('--val-split', default='validation'),
    _flag('--train-num-samples', type=int),
    _flag('--val-num-samples', type=int),
    _switch('--dataset-download'),
    _flag('--class-map', default=''),
    _flag('--input-img-mode'),
    _flag('--input-key'),
    _flag('--target-key'),  # 1.0.31: comma-separated, one binary field per class [training docs]
    _switch('--dataset-trust-remote-code'),
    # Multi-label classification (1.0.31) [changelog, class_weights.py, training docs]
    _flag('--task', default='classification', choices=('classification', 'multilabel')),
    _flag('--target-format', choices=('indices', 'multihot')),
    _flag('--multilabel-threshold', type=float, default=0.5),
    # Model parameters
    _flag('--model', default='resnet50'),
    _switch('--pretrained'),
    _flag('--pretrained-path'),
    _flag('--initial-checkpoint', default=''),
    _flag('--resume', default=''),
    _switch('--no-resume-opt'),
    _flag('--num-classes', type=int),
    _flag('--gp'),
    _flag('--img-size', type=int),
    _flag('--in-chans', type=int),
    _flag('--input-size', type=int, nargs=3),
    _flag('--crop-pct', type=float),
    _flag('--mean', type=float, nargs='+'),
    _flag('--std', type=float, nargs='+'),
    _flag('--interpolation', default=''),
    _flag('-b', '--batch-size', type=int, default=128),
    _flag('-vb', '--validation-batch-size', type=int),
    _switch('--channels-last'),
    _flag('--fuser', default=''),
    _flag('--grad-accum-steps', type=int, default=1),
    _switch('--grad-checkpointing'),
    _switch('--fast-norm'),
    _flag('--model-kwargs', nargs='*', default={}, action='kwargs'),
    _flag('--head-init-scale', type=float),
    _flag('--head-init-bias', type=float),
    _flag('--torchcompile-mode'),
    _switch('--torchscript'),
    _flag('--torchcompile', nargs='?'),  # const 'inductor'
    # Device parameters
    _flag('--device', default='cuda'),
    _switch('--amp'),
    _flag('--amp-dtype', default='float16'),
    _flag('--model-dtype'),
    _switch('--no-ddp-bb'),
    _switch('--synchronize-step'),
    _flag('--local_rank', type=int, default=0),
    _flag('--device-modules', nargs='+'),
    # Optimizer parameters
    _flag('--opt', default='sgd'),
    _flag('--opt-eps', type=float),
    _flag('--opt-betas', type=float, nargs='+'),
    _flag('--momentum', type=float, default=0.9),
    _flag('--weight-decay', type=float, default=2e-5),
    _flag('--clip-grad', type=float),
    _flag('--clip-mode', default='norm'),
    _flag('--layer-decay', type=float),
    _flag('--layer-decay-min-scale', type=float, default=0.),
    _flag('--layer-decay-no-opt-scale', type=float),
    _flag('--opt-kwargs', nargs='*', default={}, action='kwargs'),
    # Learning rate schedule parameters
    _flag('--sched', default='cosine'),
    _switch('--sched-on-updates'),
    _flag('--lr', type=float),
    _flag('--lr-base', type=float, default=0.1),
    _flag('--lr-base-size', type=int, default=256),
    _flag('--lr-base-scale', default=''),
    _flag('--lr-noise', type=float, nargs='+'),
    _flag('--lr-noise-pct', type=float, default=0.67),
    _flag('--lr-noise-std', type=float, default=1.0),
    _flag('--lr-cycle-mul', type=float, default=1.0),
    _flag('--lr-cycle-decay', type=float, default=0.5),
    _flag('--lr-cycle-limit', type=int, default=1),
    _flag('--lr-k-decay', type=float, default=1.0),
    _flag('--warmup-lr', type=float, default=1e-5),
    _flag('--min-lr', type=float, default=0.),
    _flag('--epochs', type=int, default=300),
    _flag('--epoch-repeats', type=float, default=0.),
    _flag('--start-epoch', type=int),
    _flag('--decay-milestones', type=int, nargs='+', default=[90, 180, 270]),
    _flag('--decay-epochs', type=float),  # 1.0.31: None [scheduler docs]
    _flag('--warmup-epochs', type=int, default=5),
    _switch('--warmup-prefix'),
    _flag('--cooldown-epochs', type=int, default=0),
    _flag('--patience-epochs', type=int, default=10),
    _flag('--decay-rate', '--dr', type=float, default=0.1),
    # WSD / rsqrt schedules (1.0.31) [changelog, scheduler docs]
    _flag('--lr-decay-fn'),
    _flag('--lr-stable-timescale', type=float),
    # Stop, milestones (1.0.31; --resume also takes 'auto') [changelog]
    _flag('--stop-epoch', type=int),
    _flag('--save-epochs', type=int, nargs='+'),
    # Augmentation and regularization parameters
    _switch('--no-aug'),
    _flag('--train-crop-mode'),
    _flag('--scale', type=float, nargs='+', default=[0.08, 1.0]),
    _flag('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.]),
    _flag('--hflip', type=float, default=0.5),
    _flag('--vflip', type=float, default=0.),
    _flag('--color-jitter', type=float, default=0.4),
    _flag('--color-jitter-prob', type=float),
    _flag('--grayscale-prob', type=float),
    _flag('--gaussian-blur-prob', type=float),
    _flag('--aa'),
    _flag('--aug-repeats', type=float, default=0),
    _flag('--aug-splits', type=int, default=0),
    _switch('--jsd-loss'),
    _switch('--bce-loss'),
    _switch('--bce-sum'),
    _flag('--bce-target-thresh', type=float),
    _flag('--bce-pos-weight', type=float),
    _flag('--reprob', type=float, default=0.),
    _flag('--remode', default='pixel'),
    _flag('--recount', type=int, default=1),
    _switch('--resplit'),
    _flag('--mixup', type=float, default=0.),
    _flag('--cutmix', type=float, default=0.),
    _flag('--cutmix-minmax', type=float, nargs='+'),
    _flag('--mixup-prob', type=float, default=1.0),
    _flag('--mixup-switch-prob', type=float, default=0.5),
    _flag('--mixup-mode', default='batch'),
    _flag('--mixup-off-epoch', type=int, default=0),
    _flag('--smoothing', type=float, default=0.1),  # 1.0.31: 0 for multi-label [loss docs]
    _flag('--train-interpolation', default='random'),
    _flag('--drop', type=float, default=0.),
    _flag('--drop-connect', type=float),
    _flag('--drop-path', type=float),
    _flag('--drop-block', type=float),
    # Loss (1.0.31): create_classification_loss [changelog, loss docs, class_weights.py]
    _flag('--loss', choices=('ce', 'bce', 'asl', 'poly', 'jsd', 'twoway', 'zlpr', 'db')),
    _flag('--class-stats'),
    _flag('--loss-pos-weight'),
    _flag('--loss-class-weight'),
    _flag('--loss-weight-power', type=float, default=1.),
    _flag('--loss-weight-beta', type=float, default=0.999),
    _flag('--loss-weight-max', type=float),
    _flag('--asl-gamma-pos', type=float, default=1.),
    _flag('--asl-gamma-neg', type=float, default=4.),
    _flag('--asl-clip', type=float, default=0.05),
    _flag('--asl-reduction', default='batchmean'),
    _flag('--poly-epsilon', type=float, default=2.),
    _flag('--poly-gamma', type=float, default=0.),
    _flag('--poly-alpha', type=float),
    _flag('--twoway-tp', type=float, default=4.),
    _flag('--twoway-tn', type=float, default=1.),
    _flag('--db-neg-scale', type=float, default=2.),
    _flag('--db-init-bias', type=float, default=0.05),
    _flag('--db-focal-gamma', type=float, default=2.),
    # Variable-resolution training (timm 1.0.31 create_loader's scheduled input sizes)
    _flag('--train-img-sizes', type=int, nargs='+'),
    _flag('--train-batch-sizes', type=int, nargs='+'),
    _flag('--train-size-probs', type=float, nargs='+'),
    _flag('--train-size-schedule', default='constant', choices=('constant', 'progressive')),
    _flag('--train-size-schedule-spread', type=float, default=0.65),
    _flag('--train-size-random-mix', type=float, default=0.1),
    _flag('--train-batches-per-epoch', type=int),
    _flag('--train-steps-per-epoch', type=int),
    _flag('--variable-batch-loss-scale', default='none', choices=('none', 'sqrt', 'linear')),
    # Batch norm parameters
    _flag('--bn-momentum', type=float),
    _flag('--bn-eps', type=float),
    _switch('--sync-bn'),
    _flag('--dist-bn', default='reduce'),
    _switch('--split-bn'),
    # Model exponential moving average parameters
    _switch('--model-ema'),
    _switch('--model-ema-force-cpu'),
    _flag('--model-ema-decay', type=float, default=0.9998),
    _switch('--model-ema-warmup'),
    # Miscellaneous parameters
    _flag('--seed', type=int, default=42),
    _flag('--worker-seeding', default='all'),
    _flag('--log-interval', type=int, default=50),
    _flag('--val-interval', type=int, default=1),
    _flag('--recovery-interval', type=int, default=0),
    _flag('--checkpoint-hist', type=int, default=10),
    _flag('-j', '--workers', type=int, default=4),
    _switch('--save-images'),
    _switch('--pin-mem'),
    _switch('--no-prefetcher'),
    _flag('--output', default=''),
    _flag('--experiment', default=''),
    _flag('--eval-metric'),  # 1.0.31: None, the task's default (top1, map) [training docs]
    _flag('--tta', type=int, default=0),
    _switch('--use-multi-epochs-loader'),
    _switch('--log-wandb'),
    _flag('--wandb-project'),
    _flag('--wandb-tags', nargs='+', default=[]),
    _flag('--wandb-resume-id', default=''),
    # NaFlex loader (NaFlexViT models)
    _switch('--naflex-loader'),
    _flag('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024]),
    _flag('--naflex-max-seq-len', type=int, default=576),
    _flag('--naflex-patch-sizes', type=int, nargs='+'),
    _flag('--naflex-patch-size-probs', type=float, nargs='+'),
    _flag('--naflex-loss-scale', default='linear'),
    # Knowledge distillation
    _flag('--kd-model-name'),
    _flag('--kd-distill-type', default='logit', choices=('logit', 'feature', 'token')),
    _flag('--kd-loss-type', default='kl'),
    _flag('--distill-loss-weight', type=float),
    _flag('--task-loss-weight', type=float),
    _flag('--kd-temperature', type=float, default=4.0),
    _flag('--kd-student-feature-dim', type=int),
    _flag('--kd-teacher-feature-dim', type=int),
    _flag('--kd-token-distill-type', default='soft', choices=('soft', 'hard')),
)


def timm_defaults() -> dict:
    """dest -> timm train.py's default value."""
    return {o.dest: o.default for o in TIMM_TRAIN_OPTIONS}
