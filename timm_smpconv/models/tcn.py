""" Sequence models: SMP-TCN and FlexTCN, causal continuous-kernel TCNs whose kernels span the sequence.

Papers:
  * `SMPConv: Self-moving Point Representations for Continuous Convolution`, CVPR 2023 (Kim and Park):
    SMP-TCN, Tables 2 and 3 (sMNIST 99.75, pMNIST 99.10, sCIFAR10 84.86, CharacterTrajectories 99.53,
    SpeechCommands MFCC 97.71, raw 16 kHz audio 94.95).
  * `FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes`, ICLR 2022: FlexTCN-2/4/6
    (105K / 239K / 373K parameters).

Models (parameter counts equal the authors' models, measured on their code):
  smp_tcn      6 blocks, width 30, SMP kernels (30 points, count-normalised) + causal 5-tap branches:
               370,960 (sMNIST / pMNIST / SC raw), 373,480 (sCIFAR10), 373,790 (CharacterTrajectories),
               391,840 (SC MFCC)
  flextcn_2/4/6  2 / 4 / 6 blocks of width 30 with 1-D FlexConvs (MAGNet, Gaussian mask at the present):
               105,548 / 239,436 / 373,324 with one input channel, 375,364 for flextcn_6 with three

Block (Cin -> 30), BatchNorm1d everywhere:
    h   = Dropout(ReLU(branch1(x)))
    out = ReLU(Dropout(ReLU(branch2(h))) + shortcut(x))       shortcut: 1x1 Conv1d with bias if Cin != 30
branch = BN(SMP(x)) + BN(small causal conv(x)) (SMP-TCN) or BN(FlexConv(x)) (FlexTCN). The classifier is a
Linear on the last time step (N(0, 0.01) weight, zero bias).

Inputs: a sequence batch (B, C, L), or an image batch (B, C, H, W) read in raster order as H * W steps of
C channels (sequential images); `permute=True` applies one fixed random permutation of the steps
(pMNIST), stored in the state dict.

Sequence length. Every continuous kernel is sampled at `seq_len` taps over [-1, 1] (the papers' "same"
horizon: as long as the training sequences). The kernels are fixed in time steps, so the model runs on
sequences of any length L >= 1 with the same kernels: a shorter sequence uses the newest L taps (the
older ones only ever meet the causal padding), a longer one sees seq_len steps back per layer.
`model.set_seq_len(L, mode='stretch')` re-samples the continuous kernels at L taps instead (the "same"
horizon at the new length; values scaled by (seq_len - 1) / (L - 1), as for a sampling-rate change). A
permuted model is tied to its length: other lengths raise an error.

Per-dataset settings are pretrained-cfg tags (`timm.create_model('smp_tcn.scifar10')`): input channels,
classes, sequence length, SMP radius (the authors' values, about 2 / length) and conv bias; any of them
can be overridden as kwargs. `.digits` is the built-in task: scikit-learn's 8x8 digits as 64 steps.

The authors' checkpoints ({'model': state_dict, ...}, keys `backbone.{i}.cconv1.Kernel.*`, `finallyr.*`) load
through `pretrained_cfg_overlay=dict(file=...)` or `checkpoint_path=`: the SMPConv authors' SMP-TCNs into
smp_tcn, the FlexConv authors' FlexTCNs (their models/cktcn.py) into flextcn_2/4/6; see `_convert_authors`.
"""
import re
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .._validate import check_choice, check_int
from ..data import DIGITS_MEAN, DIGITS_STD
from ..layers import FlexConv1d, FlexConvBN1d, SMPLargeKernel1d
from ..layers.bn_stats import BatchNormStatsMixin, kernels_changed
from ..layers.flexconv import FLEX_RESIZE_MODES
from ._builder import (
    build_model_naming_file_errors,
    check_state_dict_keys,
    flexconv_from_authors,
    no_decay_patterns,
    saved_kernel_size,
    unwrap_checkpoint,
)
from ._deploy import DeployableMixin, check_checkpoint_form, deployed_conv, deployed_first_conv, parse_kernel_sizes

__all__ = ['SequenceTCN']

CONV_TYPES = ('smp', 'flexconv')
# set_seq_len modes: the ones both layer families support
LENGTH_MODES = FLEX_RESIZE_MODES
GLOBAL_POOLS = ('last', '')


def as_sequence(x: torch.Tensor, in_chans: int, permutation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C, L) sequences as they are, (B, C, H, W) images in raster order (step t = row * W + column), read
    through `permutation` if given; a clear error for anything else."""
    if x.dim() == 4:
        x = x.flatten(2)
    if x.dim() != 3 or x.shape[1] != in_chans:
        raise ValueError(f'SequenceTCN expects (N, {in_chans}, L) sequences or (N, {in_chans}, H, W) images, got '
                         f'shape {list(x.shape)}')
    if x.shape[-1] == 0:
        raise ValueError('the input sequence is empty (length 0)')
    if permutation is not None:
        if x.shape[-1] != permutation.shape[0]:
            raise ValueError(f'this model reads {permutation.shape[0]} steps through a fixed permutation, got '
                             f'{x.shape[-1]} steps')
        x = x[:, :, permutation]
    return x


# torch.fx records the input checks as one call instead of tracing their shape logic
torch.fx.wrap('as_sequence')


class TCNBlock(nn.Module):
    """out = ReLU(DropPath(Dropout(ReLU(branch2(Dropout(ReLU(branch1(x))))))) + shortcut(x))."""

    def __init__(self, in_chs: int, out_chs: int, make_branch, drop: float = 0., drop_path: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        self.conv1 = make_branch(in_chs, out_chs)
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(drop)
        self.conv2 = make_branch(out_chs, out_chs)
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(drop)
        self.shortcut = (nn.Conv1d(in_chs, out_chs, 1, bias=True, device=device, dtype=dtype)
                         if in_chs != out_chs else nn.Identity())
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop1(self.act1(self.conv1(x)))
        h = self.drop2(self.act2(self.conv2(h)))
        return self.act_out(self.drop_path(h) + self.shortcut(x))


class SequenceTCN(BatchNormStatsMixin, DeployableMixin, nn.Module):
    """SMP-TCN / FlexTCN: a causal TCN of continuous-kernel convolutions for sequences and sequential images."""

    def __init__(
            self,
            conv_type: str = 'smp',
            depth: int = 6,
            width: int = 30,
            seq_len: int = 784,
            n_points: Optional[int] = None,
            radius: Optional[float] = None,
            conv_bias: bool = False,
            small_kernel_size: int = 5,
            permute: bool = False,
            permute_seed: int = 0,
            conv_kwargs: Optional[Dict] = None,
            block_drop_rate: float = 0.,
            in_chans: int = 1,
            num_classes: int = 10,
            global_pool: str = 'last',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            inference_mode: bool = False,
            inference_kernel_sizes: Optional[List[int]] = None,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            conv_type: 'smp' (SMP-TCN) or 'flexconv' (FlexTCN).
            depth, width: number of blocks and their width (30 in both papers).
            seq_len: the sequence length the kernels are sampled for (kernel taps; the papers' "same"
                horizon). Image inputs have H * W steps.
            n_points, radius, conv_bias, small_kernel_size: SMP points per kernel (default the 1-D rule, 30), initial radius
                (default 2 / seq_len, the papers' rule), a bias on the SMP convs (the authors' conv.bias),
                the causal small branch's length (5). SMP only.
            permute, permute_seed: read the steps through one fixed random permutation (pMNIST).
            conv_kwargs: extra arguments of every continuous layer (SMPLargeKernel1d / FlexConvBN1d).
            block_drop_rate: the dropout inside every block (the papers' "dropout").
            in_chans, num_classes, drop_rate: as every timm model.
            drop_path_rate: stochastic depth on the residual branches (a timm addition, 0 by default).
            global_pool: 'last' (the classifier reads the last time step, the only pooling these models use).
            bn_momentum, bn_eps: every BatchNorm's momentum (default timm_smpconv.layers.bn_stats.BN_MOMENTUM) and
                eps (default each layer's, 1e-5), as timm's bn_momentum / bn_eps model arguments. BatchNorm running
                statistics start from the network's own (a probe at creation, then the first training batch:
                timm_smpconv.layers.bn_stats), not from 0 / 1.
            inference_mode: build the reparameterized (deployed) network directly, as
                timm.models.reparameterize_model leaves it: one causal conv with bias per branch, no BatchNorm.
            inference_kernel_sizes: FlexTCN with inference_mode: the deployed kernel length of every block's two
                branches in order (their masks decide them in training; default: the crops of freshly
                initialised masks). A deployed model records them, and a checkpoint loaded with pretrained=True
                gives them too. SMP-TCN kernels are seq_len taps.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_choice('conv_type', conv_type, CONV_TYPES)
        for name, v, lo in (('depth', depth, 1), ('width', width, 1), ('seq_len', seq_len, 2),
                            ('in_chans', in_chans, 1), ('num_classes', num_classes, 0)):
            check_int(name, v, lo)
        check_choice('global_pool', global_pool, GLOBAL_POOLS)
        if conv_type != 'smp' and (radius is not None or conv_bias):
            raise ValueError("radius and conv_bias apply to conv_type='smp' only")
        self.conv_type = conv_type
        self.seq_len = seq_len
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        conv_kwargs = dict(conv_kwargs or {})
        # deployed kernel lengths (inference_mode): seq_len, or what FlexConv's masks crop them to in training
        learned = bool(conv_type == 'flexconv' and conv_kwargs.get('mask', True) and conv_kwargs.get('dynamic_cropping', True))
        default_shape = FlexConv1d.initial_kernel_shape(seq_len, **conv_kwargs) if learned else (seq_len,)
        deployed = None
        if inference_kernel_sizes is not None:
            if not (inference_mode and learned):
                raise ValueError('inference_kernel_sizes applies to FlexTCNs with inference_mode=True only (SMP-TCN '
                                 'kernels are seq_len taps)')
            deployed = iter(parse_kernel_sizes(inference_kernel_sizes, [seq_len] * (2 * depth), 1))
        self._init_deploy(sizes_learned=learned, size_source=f'seq_len={seq_len}', sizes_given=deployed is not None)

        def make_branch(cin: int, cout: int) -> nn.Module:
            if inference_mode:
                return deployed_conv(cin, cout, next(deployed) if deployed else default_shape, **dd)
            if conv_type == 'smp':
                args = dict(small_kernel_size=small_kernel_size, smp_bias=conv_bias, normalize=True,
                            n_points=n_points, point_std=0.1, radius=2. / seq_len if radius is None else radius,
                            shared_points=False)
                args.update(conv_kwargs)
                return SMPLargeKernel1d(cin, cout, seq_len, **args, **dd)
            return FlexConvBN1d(cin, cout, seq_len, **conv_kwargs, **dd)

        blocks = []
        self.feature_info = []
        prev = in_chans
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        for i in range(depth):
            blocks.append(TCNBlock(prev, width, make_branch, block_drop_rate, dpr[i], **dd))
            self.feature_info.append(dict(num_chs=width, reduction=1, module=f'blocks.{i}'))
            prev = width
        self.blocks = nn.Sequential(*blocks)
        if permute:
            g = torch.Generator().manual_seed(permute_seed)
            self.register_buffer('permutation', torch.randperm(seq_len, generator=g).to(device))
        else:
            self.permutation = None
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = width
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._init_weights()
        self._init_bn_stats((32, in_chans, seq_len), bn_momentum, bn_eps)  # (layers/bn_stats.py)

    @torch.no_grad()
    def _init_weights(self):
        self._init_head()
        for m in self.modules():
            if isinstance(m, SMPLargeKernel1d) and m.small_conv is not None:
                trunc_normal_(m.small_conv.weight, std=.02)  # the authors' init hook: no other 1-D conv

    @torch.no_grad()
    def _init_head(self):
        if isinstance(self.head, nn.Linear) and not self.head.weight.is_meta:
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def _deploy_branches(self) -> List[Tuple[str, int]]:
        return [(f'blocks.{i}.conv{j}', self.seq_len) for i in range(len(self.blocks)) for j in (1, 2)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^permutation', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return no_decay_patterns(self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            self.global_pool = check_choice('global_pool', global_pool, GLOBAL_POOLS)
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)
        self._init_head()  # (only the new head: the trained layers stay as they are)

    @torch.jit.ignore
    def set_seq_len(self, seq_len: int, mode: str = 'stretch'):
        """Sample every continuous kernel at `seq_len` taps from now on: 'stretch' keeps the continuous kernel
        over [-1, 1] (values times (old - 1) / (new - 1): the same response to the sequence resampled to
        the new length), 'none' leaves the values alone."""
        check_choice('mode', mode, LENGTH_MODES)
        check_int('seq_len', seq_len, 2)
        if self.inference_mode:
            raise ValueError('a deployed (reparameterized) model holds discrete kernels, which cannot be re-sampled: '
                             'set the sequence length on the model before reparameterizing it')
        if self.permutation is not None and seq_len != self.seq_len:
            raise ValueError(f'this model reads its {self.seq_len} steps through a fixed permutation; it cannot be '
                             f're-targeted to {seq_len} steps')
        with kernels_changed(self):  # the BatchNorms keep normalising as at the old length
            for m in self.modules():
                if isinstance(m, SMPLargeKernel1d):
                    m.smp.set_kernel_size(seq_len, mode if mode == 'stretch' else 'none')
                    m.kernel_size = seq_len
                elif isinstance(m, FlexConvBN1d):
                    m.conv.set_kernel_size(seq_len, mode)
        self.seq_len = seq_len

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return as_sequence(x, self.in_chans, self.permutation)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCL',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, also returning the (B, width, L) outputs of the selected blocks.

        Args:
            x: sequences (B, C, L) or images (B, C, H, W).
            indices: last n blocks if int, all if None, else the block indices to return.
            norm: unused (the network has no final norm).
            stop_early: stop after the last requested block.
            output_fmt: 'NCL' only.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt in ('NCL',), 'Output shape must be NCL.'
        intermediates = []
        if not torch.jit.is_scripting():
            self._first_batch_bn_stats(x)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._to_sequence(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for feat_idx, blk in enumerate(blocks):
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and the head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._first_batch_bn_stats(x)
        x = self._to_sequence(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'last':
            x = x[:, :, -1]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------
# Checkpoints

_AUTHORS = re.compile(r'^backbone\.(\d+)\.(cconv([12])s?|norm([12])s?|shortcut\.0)\.(.+)$')


def _convert_authors(state_dict: Dict[str, torch.Tensor], model: SequenceTCN) -> Dict[str, torch.Tensor]:
    """The authors' sequence models -> ours: both follow the FlexConv authors' TCN (`backbone.{i}` blocks with
    `cconv{1,2}`, `norm{1,2}`, `shortcut.0`, and `finallyr`, the classifier on the last step).

    SMP-TCN (the SMPConv authors' files): `cconv{1,2}.Kernel.*` are SMP kernels, with `cconv{1,2}s` and
    `norm{1,2}s` for the causal 5-tap branches. 1-D points need no re-orientation (their tap n sits at
    linspace(-1, 1, k)[n] as ours); radii (Cout, P, 1) lose the trailing axis.
    FlexTCN (the FlexConv authors' files, models/cktcn.py): `cconv{1,2}` are 1-D FlexConvs with the keys of
    their FlexNet files (`flexconv_from_authors`: MAGNet weights (H, C, 1) as Linear weights, mask_params
    (1, 2) = [mean, sigma] of the causal mask).
    Their `train_length` (the horizon they ran at, the sequence length) becomes our kernel-size record in
    both, so weights saved at another length are re-sampled by the layers' resize rule."""
    smp = any(k.endswith('.Kernel.weight_coord') for k in state_dict)
    flex = any('.Kernel.' in k for k in state_dict) and not smp
    if smp != (model.conv_type == 'smp') or flex != (model.conv_type == 'flexconv'):
        kind = 'SMP-TCN' if smp else 'FlexTCN' if flex else 'TCN without continuous kernels'
        ours = 'SMP-TCN' if model.conv_type == 'smp' else 'FlexTCN'
        raise ValueError(f"the checkpoint holds the authors' {kind}, which does not fit this {ours} "
                         f"(conv_type={model.conv_type!r})")
    modules = dict(model.named_modules())
    out = {}
    for k, v in state_dict.items():
        if k.startswith('finallyr.'):
            out['head.' + k[len('finallyr.'):]] = v
            continue
        m = _AUTHORS.match(k)
        if not m:
            out[k] = v  # reported as unexpected by the key check
            continue
        i, module, rest = m.group(1), m.group(2), m.group(5)
        if module == 'shortcut.0':
            out[f'blocks.{i}.shortcut.{rest}'] = v
            continue
        small = module.endswith('s')
        j = module[-2] if small else module[-1]
        branch = f'blocks.{i}.conv{j}'
        if flex:
            if small:
                out[k] = v  # a FlexTCN has no small branches: reported as unexpected
            elif module.startswith('norm'):
                out[f'{branch}.bn.{rest}'] = v
            else:
                out.update(flexconv_from_authors(k, rest, v, f'{branch}.conv.', modules.get(f'{branch}.conv')))
        elif module.startswith('norm'):
            out[f'{branch}.{"small_bn" if small else "smp_bn"}.{rest}'] = v
        elif small:
            out[f'{branch}.small_conv.{rest}'] = v
        elif rest == 'Kernel.weight_coord':
            out[f'{branch}.smp.points'] = v
        elif rest == 'Kernel.radius':
            out[f'{branch}.smp.radius'] = v.reshape(v.shape[0], v.shape[1])
        elif rest == 'Kernel.weights':
            out[f'{branch}.smp.weight'] = v
        elif rest == 'train_length':
            out[f'{branch}.smp.kernel_size_record'] = saved_kernel_size(v, modules.get(f'{branch}.smp'))
        else:
            out[f'{branch}.smp.{rest}'] = v
    for k in [k for k in out if k.endswith('smp.points')]:  # records absent from their file: the model's own
        out.setdefault(k[:-len('points')] + 'kernel_size_record', torch.tensor(model.seq_len))
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SequenceTCN) -> Dict[str, torch.Tensor]:
    """Convert the authors' SMP-TCN and FlexTCN checkpoints (or pass ours through) and check the keys
    (ValueError naming missing, unexpected and mis-shaped keys)."""
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith('backbone.') for k in state_dict) or 'finallyr.weight' in state_dict:
        state_dict = _convert_authors(state_dict, model)
    check_checkpoint_form(state_dict, model, 'SequenceTCN')
    check_state_dict_keys(state_dict, model)
    return state_dict


# per-dataset settings (pretrained-cfg tags): SMPConv paper Table 10 and the authors' configs
_DATASETS = {
    'smnist': dict(in_chans=1, num_classes=10, seq_len=784, radius=0.002, conv_bias=False),
    'pmnist': dict(in_chans=1, num_classes=10, seq_len=784, radius=0.002, conv_bias=False, permute=True),
    'scifar10': dict(in_chans=3, num_classes=10, seq_len=1024, radius=0.002, conv_bias=True),
    'char_traj': dict(in_chans=3, num_classes=20, seq_len=182, radius=0.012, conv_bias=True),
    'speech_mfcc': dict(in_chans=20, num_classes=10, seq_len=161, radius=0.012, conv_bias=True),
    'speech_raw': dict(in_chans=1, num_classes=10, seq_len=16000, radius=0.0002, conv_bias=False),
    'digits': dict(in_chans=3, num_classes=10, seq_len=64),
    'pdigits': dict(in_chans=3, num_classes=10, seq_len=64, permute=True),
}
_SMP_ONLY = ('radius', 'conv_bias')


def _create_tcn(variant: str, pretrained: bool = False, default_args: Optional[Dict] = None, **kwargs) -> SequenceTCN:
    model_args = dict(default_args or {})
    tag = kwargs.get('pretrained_cfg')
    if isinstance(tag, dict):  # a saved config (local-dir:, hf-hub:) names the tag it was created with
        tag = tag.get('tag')
    tag = tag if isinstance(tag, str) else _DEFAULT_TAG
    for k, v in _DATASETS.get(tag, {}).items():
        if model_args.get('conv_type') == 'smp' or k not in _SMP_ONLY:
            model_args[k] = v
    model_args.update(kwargs)
    if model_args.get('inference_mode'):
        deployed_first_conv(model_args, 'blocks.0.conv1')
    return build_model_naming_file_errors(
        SequenceTCN, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(model_args.get('depth', 6))), feature_cls='getter',
                         output_fmt='NCL'),
        **model_args)


_DEFAULT_TAG = 'smnist'
_SMP_PAPER = dict(paper_ids='CVPR 2023', paper_name='SMPConv: Self-moving Point Representations for Continuous Convolution')
_FLEX_PAPER = dict(paper_ids='ICLR 2022',
                   paper_name='FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes')


def _cfg(tag: str, **kwargs):
    d = _DATASETS[tag]
    n = d['seq_len']
    size = {784: (28, 28), 1024: (32, 32), 64: (8, 8)}.get(n, (1, n))
    mnist = ((0.1307,), (0.3081,))  # the MNIST statistics the authors normalise with
    mean, std = {'smnist': mnist, 'pmnist': mnist, 'scifar10': (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                 'digits': (DIGITS_MEAN, DIGITS_STD), 'pdigits': (DIGITS_MEAN, DIGITS_STD),
                 }.get(tag, ((0.,) * d['in_chans'], (1.,) * d['in_chans']))
    return {
        'url': '', 'num_classes': d['num_classes'], 'input_size': (d['in_chans'],) + size, 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': mean, 'std': std,
        'classifier': 'head', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f'smp_tcn.{t}': _cfg(t, first_conv='blocks.0.conv1.smp', **_SMP_PAPER) for t in _DATASETS},
    **{f'flextcn_{n}.{t}': _cfg(t, first_conv='blocks.0.conv1.conv.kernel_net.output', **_FLEX_PAPER)
       for n in (2, 4, 6) for t in _DATASETS},
})


@register_model
def smp_tcn(pretrained: bool = False, **kwargs) -> SequenceTCN:
    """SMP-TCN (SMPConv paper, Tables 2-3): 6 blocks of width 30, 30-point SMP kernels as long as the sequence
    plus causal 5-tap branches; 370,960 params for sMNIST (tags: .smnist .pmnist .scifar10 .char_traj
    .speech_mfcc .speech_raw .digits .pdigits)."""
    return _create_tcn('smp_tcn', pretrained, dict(conv_type='smp', depth=6), **kwargs)


@register_model
def flextcn_2(pretrained: bool = False, **kwargs) -> SequenceTCN:
    """FlexTCN-2 (FlexConv paper): 2 blocks of width 30, causal FlexConvs; 105,548 params with one channel."""
    return _create_tcn('flextcn_2', pretrained, dict(conv_type='flexconv', depth=2), **kwargs)


@register_model
def flextcn_4(pretrained: bool = False, **kwargs) -> SequenceTCN:
    """FlexTCN-4: 4 blocks of width 30; 239,436 params with one channel."""
    return _create_tcn('flextcn_4', pretrained, dict(conv_type='flexconv', depth=4), **kwargs)


@register_model
def flextcn_6(pretrained: bool = False, **kwargs) -> SequenceTCN:
    """FlexTCN-6: 6 blocks of width 30; 373,324 params with one channel, 375,364 with three (sCIFAR10)."""
    return _create_tcn('flextcn_6', pretrained, dict(conv_type='flexconv', depth=6), **kwargs)
