""" FlexNet: residual networks of continuous-kernel convolutions without any downsampling.

Papers:
  * `FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes`, ICLR 2022
    (Romero, Bruintjes, Tomczak, Bekkers, Hoogendoorn, van Gemert): FlexNet-16 on CIFAR-10.
  * `CKConv: Continuous Kernel Convolution For Sequential Data`, ICLR 2022 (Romero et al.): CKCNN-16.
  * `SMPConv: Self-moving Point Representations for Continuous Convolution`, CVPR 2023 (Kim and Park):
    the CIFAR-10 model of Table 4, FlexNet-16 with SMP kernels plus parallel 3x3 branches.

Models (CIFAR-10, 10 classes; parameter counts equal the authors' models):
  flexnet_16      FlexConv (MAGNet kernel, Gaussian mask, horizon 33)   671,650 params
  smp_flexnet_16  SMP 33x33 kernels (16 points) + 3x3 branches          489,646 params (n_points= 4..64)
  ckcnn_16        CKConv (SIREN kernel, no mask)                        627,910 params

Layout: stem y = ReLU(branch(x)); 7 residual blocks
    h = Dropout(ReLU(branch1(x)));  out = ReLU(branch2(h) + shortcut(x))
with widths 24, 24, 36, 36, 36, 48, 48 (1x1 conv shortcuts with bias where the width changes), global
average pooling and a linear classifier. A branch is BN(FlexConv(x)) (FlexNet, CKCNN) or
BN(SMP(x)) + BN(Conv3x3(x)) (SMP FlexNet). Feature maps keep the input resolution throughout.

Resolution. Every continuous kernel is sampled on linspace(-1, 1, img_size + 1) per axis, so it can
reach the whole image. `img_size=` at creation (or `model.set_input_size(img_size)`, or
`timm_smpconv.retarget_resolution(model, img_size)`) sets it; weights saved at another resolution are
re-targeted when they are loaded (FlexConv: sampling-rate factor (source / target)^2; SMP: point weights
times the same), so a model trained at 16 px runs at 32 px without retraining:

    model = timm.create_model('flexnet_16', img_size=32, pretrained=True,
                              pretrained_cfg_overlay=dict(file='flexnet16_16px.pth'))

The authors' checkpoints ({'model': state_dict, ...}) load through `pretrained_cfg_overlay=dict(file=...)`;
see `checkpoint_filter_fn`.

Differences from the authors' networks (decisions): the output is (B, num_classes) also for a batch of
one (theirs is squeezed to (num_classes,)); the classifier is a Linear after average pooling (their
1x1 conv after pooling, same numbers); `drop_rate` is timm's classifier dropout (0 by default, they have
none) and `block_drop_rate` is their dropout inside each block (0.2 FlexNet/CKCNN, 0.1 SMP);
`drop_path_rate` (stochastic depth on the residual branch) is a timm addition, 0 by default.
"""
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models import adapt_input_conv, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .._validate import check_choice, check_image_input, square_size
from ..layers import FlexConv2d, FlexConvBN2d, SMPLargeKernel2d
from ..layers.bn_stats import BatchNormStatsMixin
from ..layers.kernel_bank import batched_kernels
from ..layers.recompute import activation, recompute_activation, recompute_dropout, recompute_scope, recompute_sum
from ..resolution import retarget_resolution
from ._builder import (
    build_model_naming_file_errors,
    check_state_dict_keys,
    flexconv_from_authors,
    no_decay_patterns,
    points_from_authors,
    saved_kernel_size,
    unwrap_checkpoint,
)
from ._deploy import DeployableMixin, check_checkpoint_form, deployed_conv, deployed_first_conv, parse_kernel_sizes, require_deploy_sizes

__all__ = ['FlexNet']

# torch.fx records the input check as one call instead of tracing its shape logic
torch.fx.wrap('check_image_input')

CONV_TYPES = ('flexconv', 'ckconv', 'smp')
# SMP points per kernel of SMP FlexNet-16 (SMPConv paper, CIFAR-10)
SMP_FLEXNET_POINTS = 16


class FlexNetBlock(nn.Module):
    """out = ReLU(DropPath(branch2(Dropout(ReLU(branch1(x))))) + shortcut(x))."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            make_branch: Callable[..., nn.Module],
            drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = make_branch(in_chs, out_chs)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(drop)
        self.conv2 = make_branch(out_chs, out_chs)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, bias=True, **dd) if in_chs != out_chs else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            h = self.drop(self.act1(self.conv1(x)))
            return self.act2(self.drop_path(self.conv2(h)) + self.shortcut(x))
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # in a recompute scope only the conv outputs (and dropout's noise) are kept: the BN, ReLU, dropout and sum
        # results are recomputed from them in the backward (timm_smpconv.layers.recompute)
        y = self.conv1(x)
        z = activation(self.act1, y)
        recompute_activation(z, self.act1, y)
        h = self.drop(z)
        recompute_dropout(h, z)
        y2 = self.drop_path(self.conv2(h))
        s = self.shortcut(x)
        j = y2 + s
        if isinstance(self.drop_path, nn.Identity):
            recompute_sum(j, y2, s)
        out = activation(self.act2, j)
        recompute_activation(out, self.act2, j)
        return out


def _img_size(img_size: Union[int, Sequence[int]]) -> int:
    img_size = square_size(img_size, 'img_size')
    if img_size % 2:
        raise ValueError(f'img_size must be an even int (the horizon img_size + 1 must be odd), got {img_size}')
    return img_size


class FlexNet(BatchNormStatsMixin, DeployableMixin, nn.Module):
    """FlexNet / CKCNN / SMP FlexNet (CIFAR-scale, no downsampling)."""

    def __init__(
            self,
            conv_type: str = 'flexconv',
            stem_width: int = 24,
            widths: Sequence[int] = (24, 24, 36, 36, 36, 48, 48),
            img_size: Union[int, Tuple[int, int]] = 32,
            kernel_size: Optional[int] = None,
            n_points: Optional[int] = None,
            sampling_rate_norm: float = 1.0,
            conv_kwargs: Optional[Dict] = None,
            block_drop_rate: float = 0.2,
            in_chans: int = 3,
            num_classes: int = 10,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            inference_mode: bool = False,
            inference_kernel_sizes: Optional[Sequence[Union[int, Sequence[int]]]] = None,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            conv_type: 'flexconv' (FlexNet), 'ckconv' (CKCNN) or 'smp' (SMP FlexNet).
            stem_width, widths: output width of the stem and of each residual block.
            img_size: the input resolution the continuous kernels are sampled for (horizon img_size + 1).
                Inputs of any size run; this sets how finely the kernels are sampled.
            kernel_size: the horizon itself (odd), instead of img_size + 1.
            n_points: SMP points per kernel ('smp' only; default SMP_FLEXNET_POINTS = 16).
            sampling_rate_norm: FlexConv/CKConv kernel value factor at this horizon. 1 for models trained
                at their resolution; the authors' cross-resolution fine-tuned checkpoints were trained with
                0.25 (their checkpoints do not store it, ours do).
            conv_kwargs: extra arguments of every continuous layer (FlexConv2d / SMPLargeKernel2d), e.g.
                dict(mask_init=0.1) or dict(radius=0.18).
            block_drop_rate: dropout after the first ReLU of every block (the papers' "dropout").
            in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as every timm model.
            bn_momentum, bn_eps: every BatchNorm's momentum (default timm_smpconv.layers.bn_stats.BN_MOMENTUM) and
                eps (default each layer's, 1e-5), as timm's bn_momentum / bn_eps model arguments. BatchNorm running
                statistics start from the network's own (a probe at creation, then the first training batch:
                timm_smpconv.layers.bn_stats), not from 0 / 1.
            inference_mode: build the reparameterized (deployed) network directly, as
                timm.models.reparameterize_model leaves it: one plain conv with bias per branch, no BatchNorm.
            inference_kernel_sizes: with inference_mode, the deployed kernel size of the stem and of every
                block's two branches in order (an int or [h, w]), where training decides them (FlexConv's
                masks; SMP with crop_to_support). Default: the crops of freshly initialised masks (FlexConv),
                the horizon (CKConv, SMP). A deployed model records them, and a checkpoint loaded with
                pretrained=True gives them too.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_choice('conv_type', conv_type, CONV_TYPES)
        if n_points is not None and conv_type != 'smp':
            raise ValueError(f"n_points applies to conv_type='smp' only, got conv_type={conv_type!r}")
        if sampling_rate_norm != 1.0 and conv_type == 'smp':
            raise ValueError(
                'sampling_rate_norm applies to FlexConv/CKConv layers; SMP layers carry it in their weights')
        if not len(widths):
            raise ValueError('widths must list at least one block')
        img_size = _img_size(img_size)
        explicit_horizon = kernel_size is not None
        if kernel_size is None:
            kernel_size = img_size + 1
        self.conv_type = conv_type
        self.img_size = img_size
        self._deploy_horizon = kernel_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        conv_kwargs = dict(conv_kwargs or {})

        def branch_args(stem: bool = False) -> Dict:
            if conv_type == 'smp':
                args = dict(small_kernel_size=3, small_bias=stem, normalize=True, n_points=n_points or SMP_FLEXNET_POINTS,
                            point_std=0.05, radius=0.12, shared_points=False)
            else:
                args = dict(sampling_rate_norm=sampling_rate_norm)
                if conv_type == 'ckconv':
                    args.update(kernel_net='siren', mask=False)
            args.update(conv_kwargs)
            return args

        # deployed kernel sizes (inference_mode): fixed by the horizon unless FlexConv masks or SMP support
        # cropping decide them in training
        args = branch_args()
        if conv_type == 'smp':
            learned = bool(args.get('crop_to_support', False))
            default_shape, smallest = (kernel_size, kernel_size), args.get('small_kernel_size') or 1
        else:
            learned = bool(args.get('mask', True) and args.get('dynamic_cropping', True))
            default_shape, smallest = FlexConv2d.initial_kernel_shape(kernel_size, **args), 1
        n_branches = 1 + 2 * len(widths)
        deployed = None
        if inference_kernel_sizes is not None:
            if not (inference_mode and learned):
                raise ValueError('inference_kernel_sizes applies with inference_mode=True to layers whose deployed '
                                 'size training decides (FlexConv masks, SMP crop_to_support) only')
            deployed = iter(parse_kernel_sizes(inference_kernel_sizes, [kernel_size] * n_branches, 2,
                                               [smallest] * n_branches))
        self._init_deploy(sizes_learned=learned, sizes_given=deployed is not None,
                          size_source=f'kernel_size={kernel_size}' if explicit_horizon else f'img_size={img_size}')

        def make_branch(cin: int, cout: int, stem: bool = False) -> nn.Module:
            if inference_mode:
                return deployed_conv(cin, cout, next(deployed) if deployed else default_shape, **dd)
            if conv_type == 'smp':
                return SMPLargeKernel2d(cin, cout, kernel_size, **branch_args(stem), **dd)
            return FlexConvBN2d(cin, cout, kernel_size, **branch_args(stem), **dd)

        self.stem = make_branch(in_chans, stem_width, stem=True)
        self.stem_act = nn.ReLU()
        dpr = calculate_drop_path_rates(drop_path_rate, len(widths))
        blocks = []
        self.feature_info = []
        prev = stem_width
        for i, w in enumerate(widths):
            blocks.append(FlexNetBlock(prev, w, make_branch, block_drop_rate, dpr[i], **dd))
            self.feature_info.append(dict(num_chs=w, reduction=1, module=f'blocks.{i}'))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False
        # set_recompute: off by default here, the kernel spectra dominate these models' memory (docs/performance.md)
        self.recompute = False
        self.recompute_fft_spectra = False
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self._init_weights()
        self._init_bn_stats((32, in_chans, img_size, img_size), bn_momentum, bn_eps)  # (layers/bn_stats.py)

    @torch.jit.ignore
    def _deploy_branches(self) -> List[Tuple[str, int]]:
        k = self._deploy_horizon
        return [('stem', k)] + [(f'blocks.{i}.conv{j}', k) for i in range(len(self.blocks)) for j in (1, 2)]

    @torch.no_grad()
    def _init_weights(self):
        if self.conv_type == 'smp':
            # the SMP authors' init hook re-initialises the 1x1 shortcuts; FlexNet keeps PyTorch's default
            for blk in self.blocks:
                if isinstance(blk.shortcut, nn.Conv2d):
                    trunc_normal_(blk.shortcut.weight, std=.02)
                    nn.init.zeros_(blk.shortcut.bias)
        fc = self.head.fc
        if isinstance(fc, nn.Linear):
            nn.init.kaiming_normal_(fc.weight, mode='fan_in', nonlinearity='relu')  # std sqrt(2 / C)
            nn.init.zeros_(fc.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return no_decay_patterns(self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None):
        """Re-target the continuous kernels to another input resolution (see `retarget_resolution`)."""
        if img_size is not None:
            if self.inference_mode:
                raise ValueError('a deployed (reparameterized) FlexNet holds discrete kernels, which cannot be '
                                 're-sampled: set the input size before reparameterizing it')
            retarget_resolution(self, _img_size(img_size))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, also returning the outputs of the selected blocks (all at input resolution).

        Args:
            x: input images.
            indices: last n blocks if int, all if None, else the block indices to return.
            norm: unused (the network has no final norm).
            stop_early: stop after the last requested block.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        check_image_input(x, self.in_chans, 'FlexNet')
        if not torch.jit.is_scripting():
            self._first_batch_bn_stats(x)
        x = self.stem_act(self.stem(x))
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for feat_idx, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
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
        prune_end = max_index < len(self.blocks) - 1
        self.blocks = self.blocks[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, 'FlexNet')
        if torch.jit.is_scripting():
            return self.blocks(self.stem_act(self.stem(x)))
        self._first_batch_bn_stats(x)
        if self.grad_checkpointing:
            return checkpoint_seq(self.blocks, self.stem_act(self.stem(x)))
        if torch.compiler.is_compiling():
            return self.blocks(self.stem_act(self.stem(x)))  # (compiled: Inductor fuses the kernel generation)
        return self._forward_features(x)

    @torch.jit.unused
    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # every layer's kernel from one batched kernel-network (or SMP) evaluation, not one per layer
        traced = isinstance(x, torch.fx.Proxy)
        with batched_kernels(self.modules(), enabled=not traced), \
                recompute_scope(self.recompute and not traced, fft_spectra=self.recompute_fft_spectra):
            y = self.stem(x)
            z = activation(self.stem_act, y)
            recompute_activation(z, self.stem_act, y)
            return self.blocks(z)

    @torch.jit.ignore
    def set_recompute(self, enable: bool = True, fft_spectra: bool = False):
        """What the training forward keeps for the backward (docs/performance.md, training memory).

        enable: BatchNorm, ReLU, dropout and residual-sum results are recomputed in the backward from the conv
            outputs kept anyway instead of being kept. Outputs and gradients are unchanged.
        fft_spectra: the FFT convs also keep only their input and kernel, not their float32 spectra; the backward
            transforms them again.

        Off by default in these models: the FFT spectra are most of what they keep, so the pointwise results alone
        save about 5% (and add their recomputation's ops to a launch-bound step); `set_recompute(True, True)` about
        halves the memory for a step about 5% slower on CPU (benchmarks/results/memory.md).
        """
        self.recompute = enable
        self.recompute_fft_spectra = fft_spectra

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# ---------------------------------------------------------------------------------------------------
# Checkpoints

_AUTHORS_PREFIX = [
    # (authors' module, ours, role): role 'main' = the continuous conv, 'bn' its BN, 'small' / 'small_bn'
    # the SMP model's 3x3 branch and its BN
    (re.compile(r'^cconv1\.(.+)$'), 'stem', 'main'),
    (re.compile(r'^cconv1s\.(.+)$'), 'stem', 'small'),
    (re.compile(r'^norm1\.(.+)$'), 'stem', 'bn'),
    (re.compile(r'^norm1s\.(.+)$'), 'stem', 'small_bn'),
    (re.compile(r'^blocks\.(\d+)\.cconv([12])\.(.+)$'), 'blocks.{0}.conv{1}', 'main'),
    (re.compile(r'^blocks\.(\d+)\.cconv([12])s\.(.+)$'), 'blocks.{0}.conv{1}', 'small'),
    (re.compile(r'^blocks\.(\d+)\.norm([12])\.(.+)$'), 'blocks.{0}.conv{1}', 'bn'),
    (re.compile(r'^blocks\.(\d+)\.norm([12])s\.(.+)$'), 'blocks.{0}.conv{1}', 'small_bn'),
]
_ROLE_FLEX = {'main': 'conv', 'bn': 'bn'}
_ROLE_SMP = {'main': 'smp', 'bn': 'smp_bn', 'small': 'small_conv', 'small_bn': 'small_bn'}
def _convert_authors(state_dict: Dict[str, torch.Tensor], model: FlexNet) -> Dict[str, torch.Tensor]:
    """The authors' saved state dicts (FlexNet-16 from rjbruin/flexconv, the SMP CIFAR model from
    sangnekim/SMPConv; keys without a `module.` prefix) -> ours."""
    smp = any('.Kernel.weight_coord' in k for k in state_dict)
    if smp != (model.conv_type == 'smp'):
        kind = 'SMP' if smp else 'FlexConv (MAGNet)'
        raise ValueError(
            f"the checkpoint is an authors' {kind} model, which does not fit conv_type={model.conv_type!r}")
    roles = _ROLE_SMP if smp else _ROLE_FLEX
    modules = dict(model.named_modules())
    out, smp_bias = {}, {}
    for k, v in state_dict.items():
        if k.startswith('out_layer.'):
            out['head.fc.' + k[len('out_layer.'):]] = v.flatten(1) if v.ndim == 4 else v
            continue
        m = re.match(r'^blocks\.(\d+)\.shortcut\.0\.(.+)$', k)
        if m:
            out[f'blocks.{m.group(1)}.shortcut.{m.group(2)}'] = v
            continue
        for pattern, ours, role in _AUTHORS_PREFIX:
            m = pattern.match(k)
            if m:
                break
        else:
            out[k] = v  # reported as unexpected by the key check
            continue
        *idx, rest = m.groups()
        branch = ours.format(*idx)
        prefix = f'{branch}.{roles.get(role, role)}.'
        layer = modules.get(prefix[:-1])
        if role != 'main':
            out[prefix + rest] = v
        elif not smp:
            out.update(flexconv_from_authors(k, rest, v, prefix, layer))
        elif rest == 'train_length':
            out[prefix + 'kernel_size_record'] = saved_kernel_size(v, layer)
        else:
            if rest == 'Kernel.weight_coord':
                out[prefix + 'points'] = points_from_authors(v)
            elif rest == 'Kernel.radius':
                out[prefix + 'radius'] = v.reshape(v.shape[0], v.shape[1])
            elif rest == 'Kernel.weights':
                out[prefix + 'weight'] = v
            elif rest == 'bias':
                smp_bias[branch] = v  # conv.bias=True runs: folded into the following BN below
            else:
                out[prefix + rest] = v
    for branch, bias in smp_bias.items():
        # BN(conv(x) + b) == BN'(conv(x)) with running_mean' = running_mean - b (train mode: identical)
        key = f'{branch}.smp_bn.running_mean'
        if key in out:
            out[key] = out[key] - bias
    return out


def _adapt_stem_in_chans(state_dict: Dict[str, torch.Tensor], model: FlexNet) -> Dict[str, torch.Tensor]:
    """Adapt the stem's continuous kernel to the model's in_chans (timm's rule: sum for one channel, else
    repeat and scale), before timm's own first-conv step, which cannot handle these layouts."""
    stem = model.stem.smp if model.conv_type == 'smp' else model.stem.conv
    c_out, c_in = stem.out_channels, stem.in_channels
    if model.conv_type == 'smp':
        keys = ['stem.smp.weight', 'stem.small_conv.weight']
        for key in keys:
            w = state_dict.get(key)
            if w is not None and w.ndim >= 3 and w.shape[1] != c_in:
                w4 = w.unsqueeze(-1) if w.ndim == 3 else w
                w4 = adapt_input_conv(c_in, w4, base_chans=w.shape[1])
                state_dict[key] = w4.squeeze(-1) if w.ndim == 3 else w4
        return state_dict
    wkey, bkey = 'stem.conv.kernel_net.output.weight', 'stem.conv.kernel_net.output.bias'
    w, b = state_dict.get(wkey), state_dict.get(bkey)
    if w is None or w.shape[0] % c_out or w.shape[0] // c_out == c_in:
        return state_dict
    src = w.shape[0] // c_out
    # row j = o * Cin + i: (Cout * Cin, H) -> (Cout, Cin, H, 1), a conv-shaped weight
    state_dict[wkey] = adapt_input_conv(c_in, w.reshape(c_out, src, -1, 1), base_chans=src).reshape(c_out * c_in, -1)
    if b is not None and b.numel() == c_out * src:
        state_dict[bkey] = adapt_input_conv(c_in, b.reshape(c_out, src, 1, 1), base_chans=src).reshape(-1)
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: FlexNet) -> Dict[str, torch.Tensor]:
    """Convert the authors' FlexNet-16 / SMP-CIFAR checkpoints (or pass ours through), adapt the stem to
    in_chans, and check the keys (ValueError naming missing, unexpected and mis-shaped keys).

    Their persistent `train_length` buffer (the horizon the weights ran at) becomes our
    `kernel_size_record`: weights trained at 17 (16 px) loaded into a model with img_size=32 are
    re-targeted to the 33 horizon (FlexConv factor x0.25, SMP weights x0.25) instead of silently
    running with a 17-sample kernel, which is what their code does unless train_length is reset to 0.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any('.Kernel.' in k for k in state_dict) or 'out_layer.weight' in state_dict:
        state_dict = _convert_authors(state_dict, model)
    check_checkpoint_form(state_dict, model, 'FlexNet')
    if not model.inference_mode:  # (a deployed stem is a plain conv: timm's own first-conv step adapts it)
        state_dict = _adapt_stem_in_chans(state_dict, model)
    check_state_dict_keys(state_dict, model)
    return state_dict


def _create_flexnet(variant: str, pretrained: bool = False, default_args: Optional[Dict] = None, **kwargs) -> FlexNet:
    model_args = dict(default_args or {})
    model_args.update(kwargs)
    crop = model_args.get('conv_type') == 'smp' and (model_args.get('conv_kwargs') or {}).get('crop_to_support')
    require_deploy_sizes(variant, pretrained, bool(model_args.get('inference_mode') and crop) and model_args.get(
        'inference_kernel_sizes') is None, "conv_kwargs=dict(crop_to_support=True)")
    num_blocks = len(model_args.get('widths', (24, 24, 36, 36, 36, 48, 48)))
    if model_args.get('inference_mode'):
        deployed_first_conv(model_args, 'stem')
    return build_model_naming_file_errors(
        FlexNet, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(num_blocks)), flatten_sequential=True), **model_args)


def _cfg(**kwargs):
    # CIFAR-10 at 32 px, normalised with ImageNet mean/std as both papers' code does
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (32, 32),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv.kernel_net.output', 'classifier': 'head.fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'flexnet_16.untrained': _cfg(
        paper_ids='ICLR 2022', paper_name='FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes'),
    'smp_flexnet_16.untrained': _cfg(
        first_conv='stem.smp', paper_ids='CVPR 2023',
        paper_name='SMPConv: Self-moving Point Representations for Continuous Convolution'),
    'ckcnn_16.untrained': _cfg(
        paper_ids='ICLR 2022', paper_name='CKConv: Continuous Kernel Convolution For Sequential Data'),
})


@register_model
def flexnet_16(pretrained: bool = False, **kwargs) -> FlexNet:
    """FlexNet-16 (the FlexConv repo's "FlexNet-7"): 671,650 params, 92.2 +- 0.1 on CIFAR-10 (paper)."""
    args = dict(conv_type='flexconv', block_drop_rate=0.2)
    return _create_flexnet('flexnet_16', pretrained=pretrained, default_args=args, **kwargs)


@register_model
def smp_flexnet_16(pretrained: bool = False, **kwargs) -> FlexNet:
    """SMP CIFAR-10 model (SMPConv paper Table 4): 489,646 params, 93.0 (paper). `n_points=` 4..64 gives the
    points ablation (250,318 / 330,094 / 489,646 / 808,750 / 1,446,958 params)."""
    args = dict(conv_type='smp', block_drop_rate=0.1)
    return _create_flexnet('smp_flexnet_16', pretrained=pretrained, default_args=args, **kwargs)


@register_model
def ckcnn_16(pretrained: bool = False, **kwargs) -> FlexNet:
    """CKCNN-16: FlexNet-16 with unmasked SIREN-kernel CKConvs; 627,910 params (72.1 in SMPConv Table 4)."""
    args = dict(conv_type='ckconv', block_drop_rate=0.2)
    return _create_flexnet('ckcnn_16', pretrained=pretrained, default_args=args, **kwargs)
