""" SMP convolution layers and the RepLKNet-style large-kernel branch.

SMPConv2d / SMPConv1d follow nn.Conv2d / nn.Conv1d conventions (in/out channels, kernel_size,
stride, groups, bias); their kernel is rendered from SMP points (see `smp.py`) on every forward.
SMPConv2d pads 'same' (k // 2 on every side); SMPConv1d is causal.

SMPLargeKernel2d / SMPLargeKernel1d compute BN(SMPConv(x)) + BN(small conv(x)).

Every layer here implements timm's reparameterization protocol with `fuse()`, returning a
plain nn.Conv2d (or a CausalConv1d, an nn.Conv1d subclass that left-pads) with bias, so
`timm.models.reparameterize_model(model)` leaves no SMP machinery behind.
"""
import math
import weakref
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .._validate import check_choice, check_int, check_kernel_size
from ..ops import causal_conv1d
from .bn_stats import KernelScaledBNMixin
from .conv import CausalConv1d, DispatchConvMixin, LargeKernelConv2d
from .fuse import fill_conv_, fold_bn, pad_kernel
from .kernel_bank import captured_kernel, note_kernel, take_kernel
from .recompute import recompute_batch_norm, recompute_sum, recomputing
from .smp import default_n_points, default_radius, init_smp_points, render_smp_kernel, render_smp_kernels, rescale_factor, support_crop

__all__ = ['SMPConv1d', 'SMPConv2d', 'SMPLargeKernel1d', 'SMPLargeKernel2d', 'resize_smp_params']

# torch.fx records these as single calls (leaves) instead of tracing their shape logic
torch.fx.wrap('render_smp_kernel')
torch.fx.wrap('causal_conv1d')


RESIZE_MODES = ('stretch', 'extend', 'none')


def _check_resize_mode(mode: str) -> str:
    return check_choice('resize mode', mode, RESIZE_MODES)


def resize_smp_params(
        points: torch.Tensor,
        radius: torch.Tensor,
        weight: torch.Tensor,
        from_size: int,
        to_size: int,
        mode: str = 'stretch',
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map SMP parameters calibrated for kernel size `from_size` to `to_size`.

    'stretch': the same function on the same [-1, 1] extent, sampled more (or less) densely; the
        values are multiplied by ((k1 - 1) / (k2 - 1)) ** d (`rescale_factor`), so the response to an
        input resized by (k2 - 1) / (k1 - 1) is the trained one. For a resolution change.
    'extend': the same kernel in pixels: positions and radii times (k1 - 1) / (k2 - 1), so a larger
        kernel is the old one zero-padded (exact at the trained resolution). For a same-resolution
        fine-tune with a larger support.
    'none': parameters unchanged (the same function, values as they are).
    """
    _check_resize_mode(mode)
    if from_size == to_size or mode == 'none':
        return points, radius, weight
    if mode == 'stretch':
        return points, radius, weight * rescale_factor(from_size, to_size, points.shape[-1])
    if from_size < 2 or to_size < 2:
        raise ValueError(f"'extend' needs kernel sizes >= 2, got {from_size} -> {to_size}")
    ratio = (from_size - 1) / (to_size - 1)
    return points * ratio, radius * ratio, weight


def _check_channels(in_channels: int, out_channels: int, groups: int):
    check_int('in_channels', in_channels)
    check_int('out_channels', out_channels)
    check_int('groups', groups)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f'in_channels ({in_channels}) and out_channels ({out_channels}) must both be divisible '
            f'by groups ({groups})')


def _check_input(x: torch.Tensor, rank: int, channels: int, name: str):
    if x.dim() != rank:
        raise ValueError(f'{name} expects a {rank}-D input (N, C, ...), got shape {list(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(f'{name} expects {channels} input channels, got {x.shape[1]}')


torch.fx.wrap('_check_input')


class _SMPConvNd(nn.Module):
    dims: int = 2
    # parameters (by attribute name) that the optimizer helpers put in the reduced-lr, no-decay group
    reduced_lr_param_names = ('radius',)

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Union[int, Tuple[int, ...]],
            stride: int = 1,
            groups: int = 1,
            bias: bool = True,
            n_points: Optional[int] = None,
            shared_points: Optional[bool] = None,
            normalize: bool = False,
            point_std: Optional[float] = None,
            radius: Optional[float] = None,
            weight_std: float = 0.02,
            resize_mode: str = 'stretch',
            crop_to_support: bool = False,
            learn_points: bool = True,
            learn_radius: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels, out_channels, kernel_size, stride, groups, bias: as for nn.Conv2d.
                kernel_size must be odd; it is the size the continuous kernel is rendered at.
            n_points: number of points Np (default floor(k^2/4) for 2D, 30 for 1D).
            shared_points: one set of positions/radii for all filters of the layer (the ImageNet
                depthwise form) or a set per output filter (the small-scale form). Default: shared
                for depthwise convs (groups == in_channels == out_channels), per filter otherwise.
            normalize: count-normalised average (paper Eq. 1) instead of the plain sum.
            point_std: std of the truncated-normal position init (default 0.2 for 2D, 0.1 for 1D).
            radius: initial radius (default 2d / k).
            weight_std: std of the truncated-normal init of the point weights.
            resize_mode: how parameters calibrated for another kernel size are mapped to this one, in
                `set_kernel_size` and when loading a state dict saved at another size: 'stretch',
                'extend' or 'none' (see `resize_smp_params`).
            crop_to_support: (2D) render and convolve only over the odd, centred bounding box of the
                points' supports: the same output, a smaller kernel (one host sync per forward).
            learn_points, learn_radius: False keeps the point positions / radii at their initial values
                (parameters without gradient, which optimizers built from the trainable parameters leave out:
                the SMPConv paper's Table 6 ablation).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_channels(in_channels, out_channels, groups)
        kernel_size = check_kernel_size(kernel_size, self.dims)
        check_int('stride', stride)
        n_points = default_n_points(kernel_size, self.dims) if n_points is None else n_points
        check_int('n_points', n_points)
        radius = default_radius(kernel_size, self.dims) if radius is None else radius
        if isinstance(radius, bool) or not isinstance(radius, (int, float)):
            raise TypeError(f'radius must be a float, got {type(radius).__name__}')
        if not math.isfinite(radius) or radius <= 0:
            raise ValueError(f'radius must be finite and > 0, got {radius}')
        if shared_points is None:
            shared_points = groups == in_channels == out_channels
        if point_std is None:
            point_std = 0.2 if self.dims == 2 else 0.1
        _check_resize_mode(resize_mode)

        self.layer_name = type(self).__name__  # plain attributes, readable by TorchScript
        self.input_rank = self.dims + 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.n_points = n_points
        self.shared_points = shared_points
        self.normalize = normalize
        self.point_std = point_std
        self.init_radius = float(radius)
        self.weight_std = weight_std
        self.resize_mode = resize_mode
        self.crop_to_support = crop_to_support

        num_f = 1 if shared_points else out_channels
        self.points = nn.Parameter(torch.empty(num_f, n_points, self.dims, **dd))
        self.radius = nn.Parameter(torch.empty(num_f, n_points, **dd))
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, n_points, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.points.requires_grad_(learn_points)
        self.radius.requires_grad_(learn_radius)
        # the kernel size the parameters are calibrated for, saved with them so that a state dict
        # loaded into a layer of another size is resized (see _load_from_state_dict)
        self.register_buffer('kernel_size_record', torch.tensor(kernel_size, device=device, dtype=torch.long))
        # Optional (d, k) sample coordinates per axis, rendered on instead of linspace(-1, 1, k). None (and then
        # absent from the state dict, so our models' keys are unchanged) except in a layer loaded from an SMPConv
        # authors' checkpoint whose stored grid is not our linspace: a file saved in half precision holds their
        # grid rounded to fp16 and their model renders on those values, so we carry them to reproduce it. A
        # buffer, so it follows .to(), deepcopy and our own state dict save/load (as the `render_grid` key);
        # it only means something at the size it was stored for: set_kernel_size or loading at another size
        # drops it (back to the exact linspace).
        self.register_buffer('render_grid', None)
        self.reset_parameters()

    def reset_parameters(self):
        init_smp_points(self.points, self.point_std, causal=self.dims == 1)
        nn.init.constant_(self.radius, self.init_radius)
        trunc_normal_(self.weight, std=self.weight_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
             f'n_points={self.n_points}, shared_points={self.shared_points}, normalize={self.normalize}')
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        if self.render_grid is not None:
            s += ', render_grid=stored'
        if not self.points.requires_grad:
            s += ', learn_points=False'
        if not self.radius.requires_grad:
            s += ', learn_radius=False'
        return s

    @torch.no_grad()
    def set_kernel_size(self, kernel_size: int, mode: Optional[str] = None):
        """Render at a new kernel size from now on, mapping the parameters by `mode`
        (default: the layer's resize_mode; see `resize_smp_params`)."""
        kernel_size = check_kernel_size(kernel_size, self.dims)
        mode = self.resize_mode if mode is None else _check_resize_mode(mode)
        points, radius, weight = resize_smp_params(
            self.points, self.radius, self.weight, self.kernel_size, kernel_size, mode)
        self.points.copy_(points)
        self.radius.copy_(radius)
        self.weight.copy_(weight)
        if kernel_size != self.kernel_size:
            self.render_grid = None  # a stored grid belongs to the size it was stored for
        self.kernel_size = kernel_size
        self.kernel_size_record.fill_(kernel_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # parameters saved at another kernel size are mapped to this layer's size by resize_mode
        key = prefix + 'kernel_size_record'
        names = [prefix + n for n in ('points', 'radius', 'weight')]
        saved = self.kernel_size
        if key in state_dict and all(n in state_dict for n in names):
            saved = int(state_dict[key])
            if saved != self.kernel_size:
                if saved < 1 or (self.dims == 2 and saved % 2 == 0):
                    error_msgs.append(f'{key}: invalid saved kernel size {saved}')
                    return
                state_dict[names[0]], state_dict[names[1]], state_dict[names[2]] = resize_smp_params(
                    state_dict[names[0]], state_dict[names[1]], state_dict[names[2]], saved, self.kernel_size,
                    self.resize_mode)
            state_dict[key] = torch.tensor(self.kernel_size)
        if names[0] in state_dict:
            self._load_render_grid(state_dict, prefix, saved)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _load_render_grid(self, state_dict, prefix, saved_size: int):
        """The render grid follows the state dict being loaded: its `render_grid` entry; none there, or one stored
        at another kernel size than this layer's: linspace."""
        key = prefix + 'render_grid'
        grid = state_dict.pop(key, None)
        if grid is None or saved_size != self.kernel_size:
            self.render_grid = None
            return
        # an empty buffer of this layer's shape and dtype for the base class to fill (or assign), so a grid of
        # another shape is reported as a size mismatch like any other entry
        state_dict[key] = grid
        self.render_grid = torch.empty(self.dims, self.kernel_size, device=self.points.device, dtype=self.points.dtype)

    def get_weight(self) -> torch.Tensor:
        """The rendered conv weight, (out_channels, in_channels // groups, k[, k]).

        In eval mode without autograd the rendered kernel is cached, keyed by the parameters themselves (weak
        references), their version counters (an optimizer step, load_state_dict or .to() invalidates it) and
        the kernel size; train() drops it.
        """
        if torch.jit.is_scripting():
            return self._render()
        return self._cached_weight()

    def _render(self) -> torch.Tensor:
        return render_smp_kernel(
            self.points, self.radius, self.weight, self.kernel_size, normalize=self.normalize, grid=self.render_grid)

    @torch.jit.unused
    def _cached_weight(self) -> torch.Tensor:
        params = (self.points, self.radius, self.weight)
        if (self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or isinstance(params[0], torch.fx.Proxy)):  # (fx hands out proxies while tracing)
            return self._render()
        if self.render_grid is not None:
            params = params + (self.render_grid,)
        key = (self.kernel_size,) + tuple((p._version, p.dtype, p.device) for p in params)
        cache = self.__dict__.get('_weight_cache')
        # weak references, not addresses: a replaced parameter may reuse a freed tensor's memory
        if cache is None or cache[1] != key or any(r() is not p for r, p in zip(cache[0], params)):
            # a normal tensor (not an inference tensor), so the FFT backend can cache its spectrum too;
            # inference_mode(False) alone would turn autograd back on
            with torch.inference_mode(False), torch.no_grad():
                cache = (tuple(weakref.ref(p) for p in params), key, self._render())
            self.__dict__['_weight_cache'] = cache
        return cache[2]

    def __getstate__(self):
        # the render cache holds weak references (not picklable) and is derived state: pickles go without it
        state = dict(super().__getstate__())
        state.pop('_weight_cache', None)
        return state

    def train(self, mode: bool = True):
        self.__dict__.pop('_weight_cache', None)
        return super().train(mode)

    def _check_input(self, x: torch.Tensor):
        _check_input(x, self.input_rank, self.in_channels, self.layer_name)

    def _plain_conv(self, kernel_size: int) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def deployed_weight(self, min_size: int = 1) -> torch.Tensor:
        """The kernel the reparameterized conv holds: the rendered kernel, or with `crop_to_support` (2D) only
        its support's odd, centred bounding box (outside it the kernel is exactly zero, so the conv's output is
        the same), never smaller than `min_size` per axis."""
        if self.dims != 2 or not self.crop_to_support:
            return self.get_weight()
        k = self.kernel_size
        crop = min(support_crop(self.points, self.radius, k, grid=self.render_grid), max(0, (k - min_size) // 2))
        if not crop:
            return self.get_weight()
        return render_smp_kernel(self.points, self.radius, self.weight, k, normalize=self.normalize, crop=crop,
                                 grid=self.render_grid)

    @torch.no_grad()
    def to_plain_conv(self, weight: torch.Tensor, bias: Optional[torch.Tensor], training: bool = False) -> nn.Module:
        """A plain conv with this layer's geometry (stride, padding, groups) holding `weight` (its size sets
        the conv's kernel size) and `bias`."""
        return fill_conv_(self._plain_conv(weight.shape[-1]), weight, bias, training)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """timm reparameterization: the plain conv with the rendered kernel (zero bias if the layer had none)."""
        return self.to_plain_conv(self.deployed_weight(), self.bias, training=self.training)


class SMPConv2d(DispatchConvMixin, _SMPConvNd):
    """2D convolution with an SMP continuous kernel, 'same' padding (k // 2); convolves through
    `timm_smpconv.ops.large_kernel_conv2d` (direct, FFT or Triton, the same result)."""
    dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if torch.jit.is_scripting():
            k = self.kernel_size
            return F.conv2d(x, self.get_weight(), self.bias, self.stride, (k // 2, k // 2), 1, self.groups)
        if self.crop_to_support:
            y, w = self._forward_cropped(x)
        else:
            w = take_kernel(self)  # rendered by a `batched_kernels` block, if any
            w = self.get_weight() if w is None else w
            y = self._dispatch_conv(x, w, self.bias, self.stride, self.groups)
        note_kernel(self, w)  # (for the BatchNorm after it: `captured_kernel`)
        return y

    @torch.jit.unused
    def batch_key(self) -> Optional[tuple]:
        """Layers with the same key can render their kernels in one batched evaluation (`batched_weights`); None:
        this one renders its own (shared points, support cropping, a stored grid, or the eval cache applies)."""
        if (self.shared_points or self.crop_to_support or self.render_grid is not None
                or not (self.training or torch.is_grad_enabled())):
            return None
        return (self.kernel_size, self.n_points, self.normalize, self.points.dtype, self.points.device,
                self.points.is_meta)

    @staticmethod
    @torch.jit.unused
    def batched_weights(layers: List['SMPConv2d']) -> List[torch.Tensor]:
        """`get_weight()` of every layer (same `batch_key`), rendered together (`render_smp_kernels`)."""
        ref = layers[0]
        return render_smp_kernels([m.points for m in layers], [m.radius for m in layers], [m.weight for m in layers],
                                  ref.kernel_size, normalize=ref.normalize)

    @torch.jit.unused
    def _forward_cropped(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Render and convolve over the support's bounding box only (exactly the same output); and that kernel."""
        crop = 0 if isinstance(self.points, torch.fx.Proxy) else support_crop(
            self.points, self.radius, self.kernel_size, grid=self.render_grid)
        if crop:
            w = render_smp_kernel(self.points, self.radius, self.weight, self.kernel_size, normalize=self.normalize,
                                  crop=crop, grid=self.render_grid)
        else:
            w = self.get_weight()
        return self._dispatch_conv(x, w, self.bias, self.stride, self.groups), w

    def _plain_conv(self, kernel_size: int) -> LargeKernelConv2d:
        return LargeKernelConv2d(
            self.in_channels, self.out_channels, kernel_size, stride=self.stride, groups=self.groups,
            bias=True, device=self.points.device, dtype=self.points.dtype)


class SMPConv1d(_SMPConvNd):
    """Causal 1D convolution with an SMP continuous kernel.

    Kernel tap k-1 (coordinate +1) multiplies the current time step; the input is left-padded
    by k - 1 zeros, so the output at t depends only on inputs up to t. Any k >= 1 (even too: the
    sequence models' kernel is as long as the sequence); stride 1 convolves through
    `timm_smpconv.ops.causal_conv1d` (direct or FFT by the measured rule, the same result).
    """
    dims = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        w = self.get_weight()
        if not torch.jit.is_scripting():
            note_kernel(self, w)  # (for the BatchNorm after it: `captured_kernel`)
        if self.stride == 1:
            return causal_conv1d(x, w, self.bias, self.groups)
        x = F.pad(x, (self.kernel_size - 1, 0))
        return F.conv1d(x, w, self.bias, self.stride, 0, 1, self.groups)

    def _plain_conv(self, kernel_size: int) -> CausalConv1d:
        return CausalConv1d(
            self.in_channels, self.out_channels, kernel_size, stride=self.stride,
            groups=self.groups, bias=True, device=self.points.device, dtype=self.points.dtype)


class _SMPLargeKernelNd(KernelScaledBNMixin, nn.Module):
    dims: int = 2
    _kernel_scaled_bns = ('smp_bn', 'small_bn')  # eval variances follow the kernels' scale (KernelScaledBNMixin)

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            small_kernel_size: Optional[int] = 5,
            stride: int = 1,
            groups: int = 1,
            small_bias: bool = False,
            smp_bias: bool = False,
            bn_eps: float = 1e-5,
            device=None,
            dtype=None,
            **smp_kwargs,
    ):
        """
        Args:
            in_channels, out_channels, kernel_size, stride, groups: of both branches; depthwise is
                groups == in_channels == out_channels.
            small_kernel_size: odd size of the parallel small conv (<= kernel_size); None for an
                SMP conv + BN without a small branch.
            small_bias: give the small conv a bias (the SMP CIFAR stem has one).
            smp_bias: give the SMP conv a bias (the authors' sequence models with conv.bias=True have one;
                the BN after it makes it redundant, but it is their parameter count and checkpoint layout).
            bn_eps: eps of both BatchNorms.
            **smp_kwargs: n_points, shared_points, normalize, point_std, radius, weight_std, learn_points,
                learn_radius of the SMP conv (which has no bias: the BN follows it).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        smp_cls = SMPConv2d if self.dims == 2 else SMPConv1d
        bn_cls = nn.BatchNorm2d if self.dims == 2 else nn.BatchNorm1d
        self.smp = smp_cls(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=smp_bias, **smp_kwargs, **dd)
        self.smp_bn = bn_cls(out_channels, eps=bn_eps, **dd)
        self.kernel_size = self.smp.kernel_size
        self.small_kernel_size = small_kernel_size
        if small_kernel_size is not None:
            small_kernel_size = check_kernel_size(small_kernel_size, self.dims, 'small_kernel_size')
            if small_kernel_size > self.kernel_size:
                raise ValueError(
                    f'small_kernel_size ({small_kernel_size}) must not exceed kernel_size ({self.kernel_size})')
            if self.dims == 2:
                self.small_conv = nn.Conv2d(
                    in_channels, out_channels, small_kernel_size, stride=stride, padding=small_kernel_size // 2,
                    groups=groups, bias=small_bias, **dd)
            else:
                self.small_conv = CausalConv1d(
                    in_channels, out_channels, small_kernel_size, stride=stride, groups=groups,
                    bias=small_bias, **dd)
            trunc_normal_(self.small_conv.weight, std=0.02)
            if self.small_conv.bias is not None:
                nn.init.zeros_(self.small_conv.bias)
            self.small_bn = bn_cls(out_channels, eps=bn_eps, **dd)
        else:
            self.small_conv = None
            self.small_bn = None
        self._init_kernel_sq()

    def _kernel(self, bn_name: str) -> torch.Tensor:
        return self.smp.get_weight() if bn_name == 'smp_bn' else self.small_conv.weight

    def _kernel_conv(self, bn_name: str) -> str:
        return 'smp' if bn_name == 'smp_bn' else 'small_conv'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            out = self.smp_bn(self.smp(x))
            if self.small_conv is not None and self.small_bn is not None:
                out = out + self.small_bn(self.small_conv(x))
            return out
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with captured_kernel(self.smp) as cap:  # the kernel the conv rendered: not rendered twice
            f = self.smp(x)
        out = self._bn_forward(f, 'smp_bn', cap.kernel)
        if recomputing():  # keep the conv outputs: the BN outputs and their sum are recomputed from them
            recompute_batch_norm(f, out, self.smp_bn)
        if self.small_conv is not None and self.small_bn is not None:
            h = self.small_conv(x)
            small = self._bn_forward(h, 'small_bn')
            total = out + small
            if recomputing():
                recompute_batch_norm(h, small, self.small_bn)
                recompute_sum(total, out, small)
            out = total
        return out

    @torch.no_grad()
    def get_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The single (weight, bias) equivalent to the whole branch with BNs in inference mode (with the SMP
        layer's `crop_to_support`, over its support's bounding box, at least the small kernel's size)."""
        w, b = fold_bn(self.smp.deployed_weight(self.small_kernel_size or 1), self.smp.bias, self.smp_bn,
                       self.eval_running_var('smp_bn'))
        if self.small_conv is not None:
            ws, bs = fold_bn(self.small_conv.weight, self.small_conv.bias, self.small_bn,
                             self.eval_running_var('small_bn'))
            w = w + pad_kernel(ws, w.shape[-1], causal=self.dims == 1)
            b = b + bs
        return w, b

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """One plain conv with bias (nn.Conv2d, or CausalConv1d for 1D) equal to the branch in eval mode."""
        return self.smp.to_plain_conv(*self.get_kernel_bias(), training=self.training)


class SMPLargeKernel2d(_SMPLargeKernelNd):
    """BN(SMPConv2d(x)) + BN(small k x k Conv2d(x)): RepLKNet's large-kernel branch with an SMP kernel.

    Fuses into one k x k nn.Conv2d with bias (the small kernel zero-padded into the large one).
    """
    dims = 2


class SMPLargeKernel1d(_SMPLargeKernelNd):
    """BN(SMPConv1d(x)) + BN(small causal Conv1d(x)), as in the SMP sequence models; fuses to one causal conv."""
    dims = 1
