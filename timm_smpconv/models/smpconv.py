""" SMPConvNet: RepLKNet-style ImageNet networks with self-moving point (SMP) large kernels.

Paper: `SMPConv: Self-moving Point Representations for Continuous Convolution`, CVPR 2023
(Kim and Park). Architecture as in the paper's ImageNet models (RepLKNet-31 layout, every large
depthwise kernel an SMP kernel), parameter counts identical to the authors' models.

Models: smpconv_t, smpconv_b, smpconv_mobile31, smpconv_mobile51.

Loading the authors' checkpoints: `timm.create_model('smpconv_t', pretrained=True,
pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth'))` converts their layout (EMA weights
preferred), including the orientation of their rendered kernels (see `_convert_authors`).

Changing kernel sizes at load time: the kernels are continuous, so a checkpoint trained with
kernel sizes k1 renders at any odd k2 (`kernel_sizes=(51, 49, 47, 13)`). The number of points
stays the variant's, so the checkpoint fits. Every SMP layer saves the kernel size its parameters
are calibrated for; on loading at another size `kernel_resize` maps them (see
`timm_smpconv.layers.resize_smp_params`):
  * 'stretch' (default): the same function over the same [-1, 1] extent, sampled more densely;
    values times ((k1 - 1) / (k2 - 1))^2. The response matches the trained model's on an input
    upsampled by (k2 - 1) / (k1 - 1): the choice for fine-tuning at a higher resolution.
  * 'extend': the same kernel in pixels, zero-padded to k2 (positions and radii times
    (k1 - 1) / (k2 - 1)); the network's outputs are unchanged at the trained resolution and the
    points can move into the new border: the choice for fine-tuning at the same resolution.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, get_device_dtype, to_ntuple, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .._validate import check_choice, check_image_input
from ..layers import RESIZE_MODES, ConvBN, SMPLargeKernel2d, default_n_points, fold_preceding_bn
from ..layers.bn_stats import BatchNormStatsMixin, capturing_graph
from ..layers.recompute import activation, recompute_activation, recompute_batch_norm, recompute_scope
from ._builder import build_model_naming_file_errors, check_state_dict_keys, no_decay_patterns, points_from_authors, unwrap_checkpoint
from ._deploy import DeployableMixin, check_checkpoint_form, deployed_conv, parse_kernel_sizes, require_deploy_sizes

__all__ = ['SMPConvNet']

# torch.fx records the input check as one call instead of tracing its shape logic
torch.fx.wrap('check_image_input')


def _pre_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bn(x); in a recompute scope the output, which the next 1x1 conv keeps, is recomputed from x (kept for the
    residual path's BN anyway)."""
    y = bn(x)
    if isinstance(bn, nn.BatchNorm2d):
        recompute_batch_norm(x, y, bn)
    return y


class LargeKernelBlock(nn.Module):
    """x + DropPath(PW2(ReLU(LK(PW1(BN(x)))))) with LK = BN(SMP k x k) + BN(DW 5 x 5)."""

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            n_points: int,
            small_kernel_size: int = 5,
            dw_ratio: float = 1.,
            drop_path: float = 0.,
            kernel_resize: str = 'stretch',
            crop_to_support: bool = False,
            inference_mode: bool = False,
            deployed_kernel_size: Optional[Tuple[int, int]] = None,
            device=None,
            dtype=None,
    ):
        """inference_mode: build the reparameterized block (no BatchNorm, one plain depthwise conv of
        `deployed_kernel_size`, default `kernel_size`, for the large-kernel branch)."""
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = int(dim * dw_ratio)
        self.prelkb_bn = nn.Identity() if inference_mode else nn.BatchNorm2d(dim, **dd)
        self.pw1 = ConvBN(dim, hidden, 1, act_layer=nn.ReLU, inference_mode=inference_mode, **dd)
        if inference_mode:
            size = deployed_kernel_size or (kernel_size, kernel_size)
            self.large_kernel = deployed_conv(hidden, hidden, size, groups=hidden, **dd)
        else:
            self.large_kernel = SMPLargeKernel2d(
                hidden, hidden, kernel_size, small_kernel_size=small_kernel_size, groups=hidden,
                n_points=n_points, resize_mode=kernel_resize, crop_to_support=crop_to_support, **dd)
        self.lk_act = nn.ReLU()
        self.pw2 = ConvBN(hidden, dim, 1, inference_mode=inference_mode, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return x + self.drop_path(self.pw2(self.lk_act(self.large_kernel(self.pw1(self.prelkb_bn(x))))))
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _pre_norm(self.prelkb_bn, x)
        j = self.large_kernel(self.pw1(h))
        k = activation(self.lk_act, j)
        recompute_activation(k, self.lk_act, j)  # in a recompute scope: from the branch's conv outputs
        return x + self.drop_path(self.pw2(k))

    def reparameterize(self):
        """Fold the pre-block BN into the first 1x1 conv; timm's walk then fuses the children."""
        if not isinstance(self.prelkb_bn, nn.Identity):
            self.pw1.fold_input_bn_(self.prelkb_bn)
            self.prelkb_bn = nn.Identity()


class FFNBlock(nn.Module):
    """x + DropPath(PW2(GELU(PW1(BN(x))))), PW = 1x1 conv + BN."""

    def __init__(
            self,
            dim: int,
            ffn_ratio: float = 4.,
            drop_path: float = 0.,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = int(dim * ffn_ratio)
        self.preffn_bn = nn.Identity() if inference_mode else nn.BatchNorm2d(dim, **dd)
        self.pw1 = ConvBN(dim, hidden, 1, inference_mode=inference_mode, **dd)
        self.act = nn.GELU()
        self.pw2 = ConvBN(hidden, dim, 1, inference_mode=inference_mode, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return x + self.drop_path(self.pw2(self.act(self.pw1(self.preffn_bn(x)))))
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.pw1(_pre_norm(self.preffn_bn, x))
        e = activation(self.act, d)
        recompute_activation(e, self.act, d)  # in a recompute scope: GELU(BN(conv output)) from the conv output
        return x + self.drop_path(self.pw2(e))

    def reparameterize(self):
        if not isinstance(self.preffn_bn, nn.Identity):
            self.pw1.fold_input_bn_(self.preffn_bn)
            self.preffn_bn = nn.Identity()


class SMPConvStage(nn.Module):
    """Optional downsample (1x1 conv-BN-ReLU, DW 3x3 s2 conv-BN-ReLU), then depth x (LK block, FFN block)."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            kernel_size: int,
            n_points: int,
            downsample: bool = True,
            small_kernel_size: int = 5,
            dw_ratio: float = 1.,
            ffn_ratio: float = 4.,
            drop_path_rates: Optional[Sequence[float]] = None,
            kernel_resize: str = 'stretch',
            crop_to_support: bool = False,
            inference_mode: bool = False,
            deployed_kernel_sizes: Optional[Sequence[Tuple[int, int]]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                ConvBN(in_dim, dim, 1, act_layer=nn.ReLU, inference_mode=inference_mode, **dd),
                ConvBN(dim, dim, 3, stride=2, groups=dim, act_layer=nn.ReLU, inference_mode=inference_mode, **dd),
            )
        else:
            self.downsample = nn.Identity()
        drop_path_rates = drop_path_rates or [0.] * depth
        blocks = []
        for i in range(depth):
            blocks.append(LargeKernelBlock(
                dim, kernel_size, n_points, small_kernel_size, dw_ratio, drop_path_rates[i], kernel_resize,
                crop_to_support, inference_mode, deployed_kernel_sizes[i] if deployed_kernel_sizes else None, **dd))
            blocks.append(FFNBlock(dim, ffn_ratio, drop_path_rates[i], inference_mode, **dd))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class NormClassifierHead(ClassifierHead):
    """BatchNorm -> global pool -> dropout -> fc (the reference's final norm lives in the head).

    `reparameterize()` folds the BatchNorm into the fc when pooling is 'avg' (an affine per-channel
    map commutes with averaging), leaving no BatchNorm behind; `inference_mode=True` builds that form.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            pool_type: str = 'avg',
            drop_rate: float = 0.,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__(in_features, num_classes, pool_type, drop_rate, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(in_features, device=device, dtype=dtype)
        if inference_mode and self._norm_foldable():
            self.norm = nn.Identity()

    def reset(
            self,
            num_classes: int,
            pool_type: Optional[str] = None,
            reset_other: bool = False,
            in_features: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        if reset_other:
            self.norm = nn.Identity().train(self.training)
        elif in_features is not None and in_features != self.in_features and not isinstance(self.norm, nn.Identity):
            raise ValueError('the head norm is sized for the final features; pass reset_other=True to change them')
        super().reset(num_classes, pool_type, reset_other, in_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(self.norm(x))
        x = self.drop(x)
        if pre_logits:
            return self.flatten(x)
        x = self.fc(x)
        return self.flatten(x)

    def _norm_foldable(self) -> bool:
        # max/other pooling does not commute with a negative scale; without a classifier nothing takes it
        return isinstance(self.fc, nn.Linear) and getattr(self.global_pool, 'pool_type', '') == 'avg'

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.norm, nn.Identity) or not self._norm_foldable():
            return
        w, b = fold_preceding_bn(self.fc.weight, self.fc.bias, self.norm)
        self.fc.weight.copy_(w)
        self.fc.bias.copy_(b)
        self.norm = nn.Identity().train(self.training)


class SMPConvNet(BatchNormStatsMixin, DeployableMixin, nn.Module):
    """SMPConv ImageNet network (RepLKNet layout with SMP large kernels)."""

    def __init__(
            self,
            layers: Sequence[int] = (2, 2, 8, 2),
            channels: Sequence[int] = (96, 192, 384, 768),
            kernel_sizes: Union[int, Sequence[int]] = (31, 29, 27, 13),
            n_points: Optional[Union[int, Sequence[int]]] = None,
            points_div: int = 4,
            small_kernel_size: int = 5,
            dw_ratio: float = 1.,
            ffn_ratio: float = 4.,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            kernel_resize: str = 'stretch',
            crop_to_support: bool = False,
            inference_mode: bool = False,
            inference_kernel_sizes: Optional[Sequence[Union[int, Sequence[int]]]] = None,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            layers: (LK block, FFN block) repetitions per stage.
            channels: width per stage.
            kernel_sizes: SMP kernel size per stage (odd), or one int for every stage; the size kernels are
                rendered at.
            n_points: SMP points per stage, or one int for every stage; default floor(k^2 / points_div). (The registered models keep
                the variant's points when only kernel_sizes is overridden, so checkpoints fit.)
            points_div: 4 for SMPConv-T/B, 8 for the mobile models.
            small_kernel_size: the parallel depthwise conv of every large-kernel branch.
            dw_ratio, ffn_ratio: hidden width of the large-kernel block and of the FFN.
            in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as every timm model.
            kernel_resize: 'stretch', 'extend' or 'none': how SMP parameters saved at another kernel size
                are mapped when loaded (module docstring).
            crop_to_support: render/convolve SMP kernels only over their support's bounding box (same
                output; see timm_smpconv.layers.support_crop). Reparameterized, each large kernel keeps only
                that box (a trained model's deployed kernel sizes then differ per block).
            bn_momentum, bn_eps: every BatchNorm's momentum (default timm_smpconv.layers.bn_stats.BN_MOMENTUM) and
                eps (default each layer's, 1e-5), as timm's bn_momentum / bn_eps model arguments. BatchNorm running
                statistics start from the network's own (a probe at creation, then the first training batch:
                timm_smpconv.layers.bn_stats), not from 0 / 1.
            inference_mode: build the reparameterized (deployed) network directly, as
                timm.models.reparameterize_model leaves it: plain convs with bias, no BatchNorm, no SMP layer.
            inference_kernel_sizes: with inference_mode and crop_to_support, the deployed kernel size of every
                large-kernel block in order (an int or [h, w]); a deployed model records them, and a checkpoint
                loaded with pretrained=True gives them too. Without crop_to_support they are kernel_sizes.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(layers)
        kernel_sizes = to_ntuple(num_stages)(kernel_sizes)  # one int: the same for every stage
        if n_points is None:
            n_points = [default_n_points(k, 2, points_div) for k in kernel_sizes]
        n_points = to_ntuple(num_stages)(n_points)
        for name, seq in (('channels', channels), ('kernel_sizes', kernel_sizes), ('n_points', n_points)):
            if len(seq) != num_stages:
                raise ValueError(f'{name} has {len(seq)} entries but layers has {num_stages} stages (give one value per '
                                 f'stage{"" if name == "channels" else ", or one int for every stage"})')
        check_choice('kernel_resize', kernel_resize, RESIZE_MODES)
        deployed = None
        if inference_kernel_sizes is not None:
            if not (inference_mode and crop_to_support):
                raise ValueError('inference_kernel_sizes applies with inference_mode=True and crop_to_support=True '
                                 'only (otherwise the deployed kernels are kernel_sizes)')
            horizons = [k for k, d in zip(kernel_sizes, layers) for _ in range(d)]
            deployed = parse_kernel_sizes(inference_kernel_sizes, horizons, 2, [small_kernel_size] * len(horizons))
        self._init_deploy(sizes_learned=crop_to_support, size_source=f'kernel_sizes={tuple(kernel_sizes)}',
                          sizes_given=deployed is not None)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.recompute = False  # set_recompute: keep less for the backward, at a slower step (off by default)
        self.cpu_channels_last = True  # _compute_in_channels_last
        self.recompute_fft_spectra = False
        self.kernel_sizes = tuple(kernel_sizes)
        self.n_points = tuple(n_points)

        c0 = channels[0]
        im = inference_mode
        self.stem = nn.Sequential(
            ConvBN(in_chans, c0, 3, stride=2, act_layer=nn.ReLU, inference_mode=im, **dd),
            ConvBN(c0, c0, 3, groups=c0, act_layer=nn.ReLU, inference_mode=im, **dd),
            ConvBN(c0, c0, 1, act_layer=nn.ReLU, inference_mode=im, **dd),
            ConvBN(c0, c0, 3, stride=2, groups=c0, act_layer=nn.ReLU, inference_mode=im, **dd),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, list(layers), stagewise=True)  # per-stage lists, linear overall
        stages = []
        self.feature_info = []
        prev = c0
        for i in range(num_stages):
            first = sum(layers[:i])
            stages.append(SMPConvStage(
                prev, channels[i], layers[i], kernel_sizes[i], n_points[i], downsample=i > 0,
                small_kernel_size=small_kernel_size, dw_ratio=dw_ratio, ffn_ratio=ffn_ratio,
                drop_path_rates=dpr[i], kernel_resize=kernel_resize, crop_to_support=crop_to_support,
                inference_mode=im, deployed_kernel_sizes=deployed[first:first + layers[i]] if deployed else None,
                **dd))
            prev = channels[i]
            self.feature_info.append(dict(num_chs=prev, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = NormClassifierHead(
            prev, num_classes, pool_type=global_pool, drop_rate=drop_rate, inference_mode=im, **dd)
        self.apply(self._init_weights)
        self._init_bn_stats((4, in_chans, 224, 224), bn_momentum, bn_eps)  # (layers/bn_stats.py)

    @torch.jit.ignore
    def _deploy_branches(self) -> List[Tuple[str, int]]:
        return [(f'stages.{i}.blocks.{j}.large_kernel', k)
                for i, (stage, k) in enumerate(zip(self.stages, self.kernel_sizes))
                for j, blk in enumerate(stage.blocks) if isinstance(blk, LargeKernelBlock)]

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^head\.norm', (99999,)),
            ]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        # SMP radii: no decay (they also get a 0.1x lr through timm_smpconv.param_groups_smp)
        return no_decay_patterns(self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
                        **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, also returning the outputs of the selected stages.

        Args:
            x: input images.
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: apply the head's BatchNorm to the last stage's output if it is returned.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        check_image_input(x, self.in_chans, 'SMPConvNet')
        nchw = False
        if not torch.jit.is_scripting():
            self._first_batch_bn_stats(x)
            nchw = self._compute_in_channels_last(x)
            if nchw:
                x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        last_idx = len(self.stages) - 1
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                y = self.head.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(y.contiguous() if nchw else y)
        if intermediates_only:
            return intermediates
        return (x.contiguous() if nchw else x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head parts) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        elif prune_norm:
            self.head.norm = nn.Identity()
        return take_indices

    @torch.jit.ignore
    def set_recompute(self, enable: bool = True, fft_spectra: bool = False):
        """What the training forward keeps for the backward (docs/performance.md, training memory), as timm's
        `set_grad_checkpointing` a switch that trades step time for memory; off on a new model.

        enable: BatchNorm, ReLU and GELU outputs are recomputed in the backward from the conv outputs kept anyway
            instead of being kept (`timm_smpconv.layers.recompute`): smpconv_t keeps 1.13x convnext_tiny's bytes per
            image instead of 2.0x (fp32; 1.28x instead of 1.96x in bf16), for a slower step (benchmarks/results/
            memory.md). Outputs and gradients are unchanged.
        fft_spectra: with enable, the large-kernel FFT convs also keep only their input, not its float32 spectrum;
            the backward transforms it again: less memory still, a slower step.
        """
        self.recompute = enable
        self.recompute_fft_spectra = fft_spectra

    @torch.jit.unused
    def _compute_in_channels_last(self, x: torch.Tensor) -> bool:
        """Compute an NCHW input in channels_last (CPU, eager): on the CPU this network's convolutions and
        BatchNorms run 1.3-4x faster in channels_last than in NCHW (oneDNN): an NCHW training step of smpconv_t
        went from 1.47x convnext_tiny's to 1.20x computed in channels_last (interleaved, wall clock;
        benchmarks/results/ab_step_time.md). The results come back in the input's layout. Not on other devices
        (unmeasured), nor while a graph is captured (`capturing_graph`: graphs see the plain model);
        `model.cpu_channels_last = False` computes in the input's layout."""
        return (not capturing_graph(x) and self.cpu_channels_last and x.device.type == 'cpu' and x.dim() == 4
                and not x.is_contiguous(memory_format=torch.channels_last))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, 'SMPConvNet')
        if torch.jit.is_scripting():
            return self.stages(self.stem(x))
        self._first_batch_bn_stats(x)
        if self._compute_in_channels_last(x):
            return self._forward_features(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self._forward_features(x)

    @torch.jit.unused
    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recompute or torch.compiler.is_compiling():
            return self.stages(self.stem(x))  # (compiled: Inductor decides what to recompute)
        return self._forward_features_recompute(x)

    @torch.jit.unused
    def _forward_features_recompute(self, x: torch.Tensor) -> torch.Tensor:
        with recompute_scope(not isinstance(x, torch.fx.Proxy), fft_spectra=self.recompute_fft_spectra):
            return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _convert_authors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The authors' ImageNet layout -> ours.

    Their constant grid buffer `kernel_coord` becomes our kernel-size record. Their model renders on the stored
    grid values, and a file saved in half precision holds them rounded (fp16: up to 2.4e-4 off linspace(-1, 1, k),
    which moves smpconv_t's logits by a few 1e-4 relative). A grid that is not exactly the linspace our layers
    render on is therefore handed to the layer (its `render_grid`) through the state dict's per-module metadata,
    the channel torch provides for what a module's loader needs besides its tensors: the converted dict itself
    holds only the keys a fresh model has. A grid that is not a meshgrid of one 1-D linspace(-1, 1, k) (up to
    the rounding of the file's dtype) raises ValueError.
    """

    def render_grid(key: str, coord: torch.Tensor) -> Optional[torch.Tensor]:
        # theirs: (1, 2, k, k) = meshgrid(lin, lin, 'ij'); checked exactly (a rounded meshgrid is still a meshgrid)
        k = coord.shape[-1]
        if coord.shape != (1, 2, k, k) or not coord.is_floating_point():
            raise ValueError(f'{key}: expected a floating-point grid of shape (1, 2, k, k), got {coord.dtype} '
                             f'{tuple(coord.shape)}')
        lin = coord[0, 0, :, 0]
        if not (torch.equal(coord[0, 0], lin[:, None].expand(k, k)) and torch.equal(coord[0, 1], lin.expand(k, k))):
            raise ValueError(f'{key}: not a sampling grid (a meshgrid of one 1-D coordinate vector, as the authors\' '
                             f'rel_pos({k}) builds): the file is corrupt or not an SMPConv checkpoint')
        # their linspace is computed in fp32, then possibly rounded to the file's dtype
        tol = 2 * max(torch.finfo(coord.dtype).eps, torch.finfo(torch.float32).eps)
        dev = (lin.double() - torch.linspace(-1, 1, k, dtype=torch.float64)).abs().max().item()
        if not dev <= tol:
            raise ValueError(f'{key}: the grid is {dev:.3g} off linspace(-1, 1, {k}), more than {coord.dtype} '
                             f'rounding ({tol:.3g}): the file is corrupt or not an SMPConv checkpoint')
        lin = lin.float()  # their model loads the values into its fp32 buffer
        if torch.equal(lin, torch.linspace(-1, 1, k)):
            return None  # our own grid: nothing to carry, the layer keeps its state dict keys
        # the sample at our (row i, col j) is theirs at (c0, c1) = (lin[j], lin[k-1-i]), and our points are
        # (row, col) = (-c1, c0) (_authors_to_points): rows sample -lin[k-1-i], columns lin[j], bit for bit
        return torch.stack([-lin.flip(0), lin])

    out = {}
    for k, v in state_dict.items():
        if k.startswith('transitions.'):
            _, s, rest = k.split('.', 2)
            k = f'stages.{int(s) + 1}.downsample.{rest}'
        elif k.startswith('norm.'):
            k = 'head.' + k
        elif k in ('head.weight', 'head.bias'):
            k = k.replace('head.', 'head.fc.')
        if '.large_kernel.' in k:
            prefix = k[:k.index('.large_kernel.')] + '.large_kernel.'
            if k.endswith('smp.conv.kernel_coord'):
                grid = render_grid(k, v)
                if grid is not None:
                    out[prefix + 'smp.render_grid'] = grid
                k, v = prefix + 'smp.kernel_size_record', torch.tensor(v.shape[-1])
            elif k.endswith('smp.conv.weight_coord'):
                k, v = prefix + 'smp.points', points_from_authors(v)
            elif k.endswith('smp.conv.radius'):
                k, v = prefix + 'smp.radius', v.reshape(v.shape[0], v.shape[1])
            elif k.endswith('smp.conv.weights'):
                k, v = prefix + 'smp.weight', v[0].unsqueeze(1)  # (1, C, Np) -> (C, 1, Np)
            else:
                k = (k.replace('.smp.bn.', '.smp_bn.').replace('.small_conv.conv.', '.small_conv.')
                     .replace('.small_conv.bn.', '.small_bn.'))
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SMPConvNet) -> Dict[str, torch.Tensor]:
    """Convert the authors' checkpoints (or pass ours through) and check the keys.

    Kernel sizes are re-mapped by the SMP layers themselves when the state dict is loaded."""
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.endswith('smp.conv.weight_coord') for k in state_dict):
        state_dict = _convert_authors(state_dict)
    check_checkpoint_form(state_dict, model, 'SMPConvNet')
    if isinstance(model.head.norm, nn.BatchNorm2d) and model.inference_mode and not any(
            k.startswith('head.norm.') for k in state_dict):
        raise ValueError(
            'the deployed checkpoint has its final BatchNorm folded into its classifier, which this model has not '
            f'(num_classes={model.num_classes}, global_pool={model.head.global_pool.pool_type!r}): load it with '
            'the classifier it was deployed with, or deploy the training checkpoint without a classifier')
    check_state_dict_keys(state_dict, model)
    return state_dict


def _create_smpconv(variant: str, pretrained: bool = False, default_args: Optional[Dict] = None, **kwargs):
    model_args = dict(default_args or {})
    if 'kernel_sizes' in kwargs and 'n_points' not in kwargs and 'kernel_sizes' in model_args:
        # new kernel sizes render the variant's continuous kernels: keep its points (and checkpoints)
        div = kwargs.get('points_div', model_args.get('points_div', 4))
        model_args['n_points'] = [default_n_points(k, 2, div) for k in model_args['kernel_sizes']]
    model_args.update(kwargs)
    require_deploy_sizes(variant, pretrained, model_args.get('inference_mode', False) and model_args.get(
        'crop_to_support', False) and model_args.get('inference_kernel_sizes') is None, 'crop_to_support=True')
    return build_model_naming_file_errors(
        SMPConvNet, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **model_args)


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv', 'classifier': 'head.fc',
        'paper_ids': 'CVPR 2023', 'paper_name': 'SMPConv: Self-moving Point Representations for Continuous Convolution',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'smpconv_t.untrained': _cfg(),
    'smpconv_b.untrained': _cfg(),
    'smpconv_mobile31.untrained': _cfg(),
    'smpconv_mobile51.untrained': _cfg(),
})


@register_model
def smpconv_t(pretrained: bool = False, **kwargs) -> SMPConvNet:
    """SMPConv-T: 26.7M params, 5.7 GFLOPs, 82.5 top-1 (paper)."""
    args = dict(layers=(2, 2, 8, 2), channels=(96, 192, 384, 768), kernel_sizes=(31, 29, 27, 13),
                points_div=4, ffn_ratio=4)
    return _create_smpconv('smpconv_t', pretrained=pretrained, default_args=args, **kwargs)


@register_model
def smpconv_b(pretrained: bool = False, **kwargs) -> SMPConvNet:
    """SMPConv-B: 79.5M params, 16.6 GFLOPs, 83.8 top-1 (paper)."""
    args = dict(layers=(2, 2, 20, 2), channels=(128, 256, 512, 1024), kernel_sizes=(31, 29, 27, 13),
                points_div=4, ffn_ratio=4)
    return _create_smpconv('smpconv_b', pretrained=pretrained, default_args=args, **kwargs)


@register_model
def smpconv_mobile31(pretrained: bool = False, **kwargs) -> SMPConvNet:
    """SMPConv-mobile31: 2.9M params, 73.5 top-1 (paper)."""
    args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 320), kernel_sizes=(31, 29, 27, 13),
                points_div=8, ffn_ratio=2)
    return _create_smpconv('smpconv_mobile31', pretrained=pretrained, default_args=args, **kwargs)


@register_model
def smpconv_mobile51(pretrained: bool = False, **kwargs) -> SMPConvNet:
    """SMPConv-mobile51: 3.1M params, 73.7 top-1 (paper)."""
    args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 320), kernel_sizes=(51, 49, 47, 13),
                points_div=8, ffn_ratio=2)
    return _create_smpconv('smpconv_mobile51', pretrained=pretrained, default_args=args, **kwargs)
