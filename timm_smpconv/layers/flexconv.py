""" FlexConv: continuous kernels with a learned Gaussian mask (Romero, Bruintjes et al., ICLR 2022).

A FlexConv2d generates its (Cout, Cin, h, w) kernel on every forward from a small network evaluated
on a grid of relative positions in [-1, 1]^2 (the "horizon" k = kernel_size samples per axis):

    K[o, i, x] = s * k(x)[o * Cin + i] * m(x)

with k(x) the kernel network (MAGNet, or SIREN for CKConv), s the sampling-rate factor and m(x) the
separable Gaussian mask prod_d exp(-0.5 ((x_d - mean_d) / sigma_d)^2). Positions where the mask is
below a threshold (0.1) are cropped away before the kernel network runs ("dynamic cropping"), so the
kernel is h x w <= k x k and the conv is a 'same' conv with per-axis padding (h // 2, w // 2).

Whole-model helpers built on these layers live outside `layers/`: the FlexConv paper's anti-aliasing
regulariser in `timm_smpconv.regularizers`, cross-resolution deployment in `timm_smpconv.resolution`.
The FFT path is `fft_conv2d` from `timm_smpconv.ops`, exact for non-square kernels.

Decisions about the authors' code (quirks found reading their repository, rjbruin/flexconv):
  1. Regulariser broadcasting: see `timm_smpconv.regularizers` (their form is the default).
  2. init_spatial_value override: the MAGNet mu init range is 1.667 * mask_init (0.125 for the 0.075
     mask) for masked layers, whatever else is asked, as their FlexConv does; unmasked (CKConv) layers
     use `init_spatial_value` (default 1.0). We keep their literal 1.667.
  3. mask_threshold vs temperature: the threshold is 0.1 (their docstring's 15.0 is the temperature).
     The temperature only affects a sigmoid mask, which they never implemented; we do not keep it.
  4. bias_init 'uniform' bug: never reached in their runs; every MAGNet linear keeps PyTorch's default
     bias init (except the Gabor filter biases, U(-pi, pi)), as in their runs.
  5. LimitLnLoss bug: the mask L2 loss is inactive in every run; not implemented.
  6. FFT padding: theirs pads every axis by the last kernel dim (wrong for non-square kernels). Ours
     pads each axis by its own size (`fft_conv2d`); the path is taken under their rule (use_fft and
     every cropped kernel dim > 50). CIFAR never takes it.
  7. Persistent `train_length`: in their code a loaded checkpoint's horizon silently replaces the
     constructor's until reset to 0, and the position grid is cached. Ours: the layer's kernel_size is
     always the one it was built (or re-targeted) with; a state dict saved at another kernel size is
     re-targeted on load (the `kernel_size_record` and `sampling_rate_norm` buffers, see
     `FlexConv2d._load_from_state_dict`), which is what their cross-resolution script does by hand.
     The grid is rebuilt on each forward (a linspace), so nothing goes stale. The cropped kernel size
     is data-dependent (one host sync per forward), as theirs; `fuse()` removes it for inference.
  8. Row/column naming in their cropping code: naming only; mask row d applies to spatial axis d here.
  9. 1-D FlexConv mu init centred at 0 while the mask starts at +1 (the present): kept as theirs in FlexConv1d.
 12. Their sampling-rate factor multiplies the network output before the mask: a scalar, so the order
     is immaterial; it is a buffer here so that a re-targeted model saves and reloads it.
"""
import inspect
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .._validate import check_choice, check_int, check_kernel_size, check_positive
from ..ops import causal_conv1d, fft_conv2d
from .bn_stats import KernelScaledBNMixin
from .conv import CausalConv1d, DispatchConvMixin, LargeKernelConv2d
from .fuse import fill_conv_, fold_bn
from .kernel_bank import captured_kernel, note_kernel, take_kernel
from .recompute import recompute_batch_norm
from .smp import rescale_factor

__all__ = [
    'MAGNet', 'SIRENKernelNet', 'FlexConv1d', 'FlexConv2d', 'CKConv2d', 'FlexConvBN1d', 'FlexConvBN2d',
    'gaussian_mask_crop_1d', 'gaussian_mask_crops',
    'gaussian_mask_crop', 'FLEX_RESIZE_MODES', 'KERNEL_NETS',
]

FLEX_RESIZE_MODES = ('stretch', 'none')
KERNEL_NETS = ('magnet', 'siren')
# the authors' literal factor between the mask init sigma and the MAGNet mu init range
MU_RANGE_PER_MASK_SIGMA = 1.667


class AnisotropicGaborFilter(nn.Module):
    """One MAGNet filter: exp(-0.5 sum_d (gamma_hd (x_d - mu_hd))^2) * sin(sum_d W_hd x_d + b_h), h = 1..H."""

    def __init__(
            self,
            dims: int,
            hidden_dim: int,
            gamma_alpha: float,
            weight_scale: float,
            init_spatial_value: float,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.gamma_alpha = gamma_alpha
        self.weight_scale = weight_scale
        self.init_spatial_value = init_spatial_value
        self.mu = nn.Parameter(torch.empty(hidden_dim, dims, **dd))
        self.gamma = nn.Parameter(torch.empty(hidden_dim, dims, **dd))
        self.linear = nn.Linear(dims, hidden_dim, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The authors' MAGNet init: mu ~ U(+-rho), gamma ~ Gamma(alpha_l, 1), W = u * scale * gamma with u the default
        Linear init (U(+-1/sqrt(D))), b ~ U(-pi, pi). W and gamma are independent parameters afterwards."""
        nn.init.uniform_(self.mu, -self.init_spatial_value, self.init_spatial_value)
        alpha = torch.full(self.gamma.shape, self.gamma_alpha, device=self.gamma.device, dtype=torch.float32)
        self.gamma.copy_(torch._standard_gamma(alpha))  # rate 1
        self.linear.reset_parameters()
        self.linear.weight.mul_(self.weight_scale * self.gamma)
        nn.init.uniform_(self.linear.bias, -math.pi, math.pi)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """pos: (N, D) positions -> (N, H)."""
        diff = pos.unsqueeze(1) - self.mu  # (N, H, D)
        envelope = torch.exp(-0.5 * (self.gamma * diff).pow(2).sum(-1))
        return envelope * torch.sin(self.linear(pos))


class MAGNet(nn.Module):
    """Multiplicative Anisotropic Gabor Network (FlexConv paper; as the authors' code builds it), evaluated on (N, D) positions.

        z_0 = g_0(x);  z_l = g_l(x) * (A_l z_{l-1} + c_l), l = 1..L;  k(x) = A_out z_L + c_out
    """

    def __init__(
            self,
            dims: int,
            out_features: int,
            hidden_dim: int = 32,
            num_layers: int = 3,
            input_scale: float = 25.6,
            init_spatial_value: float = 1.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if num_layers < 1:
            raise ValueError(f'MAGNet needs num_layers >= 1, got {num_layers}')
        self.dims = dims
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.input_scale = input_scale
        scale = input_scale / math.sqrt(num_layers + 1)
        self.filters = nn.ModuleList([
            AnisotropicGaborFilter(dims, hidden_dim, 6.0 / (l + 1), scale, init_spatial_value, **dd)
            for l in range(num_layers + 1)])
        self.hidden = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim, **dd) for _ in range(num_layers)])
        self.output = nn.Linear(hidden_dim, out_features, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        bound = math.sqrt(1.0 / self.hidden_dim)
        for lin in self.hidden:
            lin.reset_parameters()  # default bias init
            nn.init.uniform_(lin.weight, -bound, bound)
        self.output.reset_parameters()  # PyTorch default, U(+-1/sqrt(H)) for weight and bias

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        gabor = [filt(pos) for filt in self.filters]
        z = gabor[0]
        for l, lin in enumerate(self.hidden):
            z = gabor[l + 1] * lin(z)
        return self.output(z)

    def batch_key(self) -> tuple:
        return ('magnet', self.dims, self.hidden_dim, self.num_layers)

    @staticmethod
    def hidden_batched(nets: List['MAGNet'], pos: torch.Tensor) -> torch.Tensor:
        """z_L of every net in `nets` (same batch_key) at positions pos (P, D): (len(nets), P, H), each net's
        parameters stacked into one tensor per kind, so the ops do not grow with the number of nets."""
        n, f, h, d = len(nets), nets[0].num_layers + 1, nets[0].hidden_dim, nets[0].dims
        filters = [filt for net in nets for filt in net.filters]
        mu = torch.stack([filt.mu for filt in filters]).view(n, f, 1, h, d)
        gamma = torch.stack([filt.gamma for filt in filters]).view(n, f, 1, h, d)
        w = torch.stack([filt.linear.weight for filt in filters]).view(n, f, h, d)
        b = torch.stack([filt.linear.bias for filt in filters]).view(n, f, 1, h)
        envelope = torch.exp(-0.5 * (gamma * (pos.view(1, 1, -1, 1, d) - mu)).pow(2).sum(-1))  # (n, f, P, H)
        gabor = envelope * torch.sin(torch.matmul(pos, w.transpose(-1, -2)) + b)
        z = gabor[:, 0]
        if nets[0].num_layers:
            a = torch.stack([lin.weight for net in nets for lin in net.hidden]).view(n, -1, h, h)
            c = torch.stack([lin.bias for net in nets for lin in net.hidden]).view(n, -1, 1, h)
            for l in range(nets[0].num_layers):
                z = gabor[:, l + 1] * torch.baddbmm(c[:, l], z, a[:, l].transpose(1, 2))
        return z


class SIRENKernelNet(nn.Module):
    """SIREN kernel network of CKConv: sin(w0 (W x + b)) layers, then a linear output.

    num_layers counts the linear layers: D -> H, (num_layers - 2) x H -> H, H -> out (CKCNN-16: 3, so
    one hidden layer; this gives the measured 627,910 parameters). CKConv's own init was not available to us;
    we use the SIREN paper's: first layer U(+-1/D), later layers U(+-sqrt(6/H)/w0), default biases.
    """

    def __init__(
            self,
            dims: int,
            out_features: int,
            hidden_dim: int = 32,
            num_layers: int = 3,
            omega_0: float = 30.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if num_layers < 2:
            raise ValueError(f'SIRENKernelNet needs num_layers >= 2, got {num_layers}')
        self.dims = dims
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.omega_0 = omega_0
        self.first = nn.Linear(dims, hidden_dim, **dd)
        self.hidden = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim, **dd) for _ in range(num_layers - 2)])
        self.output = nn.Linear(hidden_dim, out_features, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for lin in [self.first, *self.hidden, self.output]:
            lin.reset_parameters()
        nn.init.uniform_(self.first.weight, -1.0 / self.dims, 1.0 / self.dims)
        bound = math.sqrt(6.0 / self.hidden_dim) / self.omega_0
        for lin in [*self.hidden, self.output]:
            nn.init.uniform_(lin.weight, -bound, bound)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        z = torch.sin(self.omega_0 * self.first(pos))
        for lin in self.hidden:
            z = torch.sin(self.omega_0 * lin(z))
        return self.output(z)

    def batch_key(self) -> tuple:
        return ('siren', self.dims, self.hidden_dim, self.num_layers, self.omega_0)

    @staticmethod
    def hidden_batched(nets: List['SIRENKernelNet'], pos: torch.Tensor) -> torch.Tensor:
        """The last hidden activations of every net in `nets` (same batch_key) at pos (P, D): (len(nets), P, H)."""
        n, h, omega = len(nets), nets[0].hidden_dim, nets[0].omega_0
        w = torch.stack([net.first.weight for net in nets])
        b = torch.stack([net.first.bias for net in nets]).unsqueeze(1)
        z = torch.sin(omega * (torch.matmul(pos, w.transpose(1, 2)) + b))
        if nets[0].hidden:
            a = torch.stack([lin.weight for net in nets for lin in net.hidden]).view(n, -1, h, h)
            c = torch.stack([lin.bias for net in nets for lin in net.hidden]).view(n, -1, 1, h)
            for l in range(a.shape[1]):
                z = torch.sin(omega * torch.baddbmm(c[:, l], z, a[:, l].transpose(1, 2)))
        return z


def _outputs_batched(nets: List[nn.Module], z: torch.Tensor) -> List[torch.Tensor]:
    """Each net's output layer on its rows of z (len(nets), P, H): [(P, out_features)], one batched matmul per
    group of nets with the same output width."""
    groups = {}
    for i, net in enumerate(nets):
        groups.setdefault(net.output.out_features, []).append(i)
    outs: List[Optional[torch.Tensor]] = [None] * len(nets)
    rows = z.unbind(0)
    for idx in groups.values():
        w = torch.stack([nets[i].output.weight for i in idx])
        b = torch.stack([nets[i].output.bias for i in idx]).unsqueeze(1)
        # rows picked by Python index (views): an index tensor built from a list would be a blocking copy on CUDA
        zi = z if len(idx) == len(nets) else torch.stack([rows[i] for i in idx])
        for i, o in zip(idx, torch.baddbmm(b, zi, w.transpose(1, 2)).unbind(0)):
            outs[i] = o
    return outs


def gaussian_mask_crop(mask_params: torch.Tensor, kernel_size: int, threshold: float = 0.1) -> List[int]:
    """Dynamic cropping (the authors' rule, from their code): how many grid positions to drop at each end of each axis.

    The mask falls below `threshold` outside mean_d +- sigma_d c, c = sqrt(-2 ln threshold). With
    r_d = max(|mean_d - sigma_d c|, |mean_d + sigma_d c|): an axis with r_d >= 1 keeps all k positions;
    otherwise it keeps p[i : k - i] where i is the first index with p_i > -r_d (p = linspace(-1, 1, k)),
    a symmetric crop of odd length k - 2 i. If r_d is 0 (sigma 0 at mean 0, where their code finds no
    such index) we keep the centre position alone. Computed in float32, as their fp32 code does.

    Returns [i_0, i_1] (one entry per row of `mask_params`).
    """
    mp = mask_params.detach().float()
    c = math.sqrt(-2.0 * math.log(threshold))
    r = _mask_extent(mp[:, 0], mp[:, 1], c)
    half = torch.linspace(-1., 1., kernel_size, device=mp.device)[:kernel_size // 2 + 1]
    starts = (half.unsqueeze(0) <= -r.unsqueeze(1)).sum(1).clamp(max=kernel_size // 2)
    starts = starts * (r < 1.).long()
    return torch.jit.annotate(List[int], starts.tolist())  # the one host sync of a forward


def _mask_extent(mean: torch.Tensor, sigma: torch.Tensor, c: float) -> torch.Tensor:
    return torch.maximum((mean - sigma * c).abs(), (mean + sigma * c).abs())


def gaussian_mask_crops(layers: List['FlexConv2d']) -> List[List[int]]:
    """`gaussian_mask_crop` of every layer (same horizon and mask threshold: one batch_key) with one host read
    for all: [[i_0, i_1] per layer]."""
    k = layers[0].kernel_size
    mp = torch.stack([m.mask_params.detach().float() for m in layers])  # (L, 2, 2)
    c = math.sqrt(-2.0 * math.log(layers[0].mask_threshold))
    r = _mask_extent(mp[:, :, 0], mp[:, :, 1], c)  # (L, 2)
    half = torch.linspace(-1., 1., k, device=mp.device)[:k // 2 + 1]
    starts = (half <= -r.unsqueeze(-1)).sum(-1).clamp(max=k // 2) * (r < 1.).long()
    return starts.tolist()


@register_notrace_module  # data-dependent kernel shape: a leaf for torch.fx
class FlexConv2d(DispatchConvMixin, nn.Module):
    """2-D FlexConv: a continuous kernel from a kernel network times a learned Gaussian mask.

    'Same' convolution with stride 1 and a per-output-channel bias. Every forward regenerates the
    kernel on the (cropped) grid; `fuse()` returns the equivalent plain nn.Conv2d.
    """
    # parameters (by attribute name) the optimizer helpers give 0.1x lr and no weight decay
    reduced_lr_param_names = ('mask_params',)
    dims: int = 2
    min_kernel_size: int = 3  # the smallest horizon
    mask_init_mean: float = 0.  # the mask's initial mean on every axis (the kernel centre)

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 33,
            bias: bool = True,
            kernel_net: str = 'magnet',
            hidden_dim: int = 32,
            num_layers: int = 3,
            input_scale: float = 25.6,
            omega_0: float = 30.0,
            mask: bool = True,
            mask_init: float = 0.075,
            mask_threshold: float = 0.1,
            dynamic_cropping: bool = True,
            init_spatial_value: Optional[float] = None,
            sampling_rate_norm: float = 1.0,
            use_fft: bool = False,
            fft_threshold: int = 50,
            resize_mode: str = 'stretch',
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels, out_channels, bias: as nn.Conv2d.
            kernel_size: the horizon k, an odd int >= 3: samples per axis of the grid linspace(-1, 1, k).
                FlexNet uses input resolution + 1, so the kernel can reach the whole image.
            kernel_net: 'magnet' (FlexConv) or 'siren' (CKConv).
            hidden_dim, num_layers: kernel network width H and depth L (MAGNet: L multiplicative layers,
                L + 1 Gabor filters; SIREN: L linear layers).
            input_scale: MAGNet input scale (the filter weights are initialised with scale
                input_scale / sqrt(L + 1)).
            omega_0: SIREN frequency.
            mask: learn a Gaussian mask (FlexConv); False gives a CKConv.
            mask_init: initial mask sigma (mean 0) on both axes.
            mask_threshold: dynamic cropping threshold.
            dynamic_cropping: crop the grid where the mask is below the threshold.
            init_spatial_value: MAGNet mu init range; default 1.667 * mask_init with a mask (the authors
                always override it so), 1.0 without.
            sampling_rate_norm: factor on the kernel values (s above), e.g. (source / target res)^2 for
                cross-resolution deployment (see `set_kernel_size`).
            use_fft, fft_threshold: convolve through the FFT when every kernel dim exceeds fft_threshold.
            resize_mode: how a state dict saved at another kernel size is mapped ('stretch': same continuous
                kernel over [-1, 1], sampling_rate_norm times ((k1 - 1) / (k2 - 1))^2; 'none': unchanged).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_int('in_channels', in_channels)
        check_int('out_channels', out_channels)
        kernel_size = self._check_horizon(kernel_size)
        check_choice('kernel_net', kernel_net, KERNEL_NETS)
        check_choice('resize mode', resize_mode, FLEX_RESIZE_MODES)
        mask_init = check_positive('mask_init', mask_init)
        sampling_rate_norm = check_positive('sampling_rate_norm', sampling_rate_norm)
        if not 0. < mask_threshold < 1.:
            raise ValueError(f'mask_threshold must be in (0, 1), got {mask_threshold}')
        if init_spatial_value is None:
            init_spatial_value = MU_RANGE_PER_MASK_SIGMA * mask_init if mask else 1.0
        self.layer_name = type(self).__name__
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.kernel_net_type = kernel_net
        self.mask_init = mask_init
        self.mask_threshold = float(mask_threshold)
        self.dynamic_cropping = dynamic_cropping and mask
        self.use_fft = use_fft
        self.fft_threshold = fft_threshold
        self.resize_mode = resize_mode

        out_features = in_channels * out_channels
        if kernel_net == 'magnet':
            self.kernel_net = MAGNet(
                self.dims, out_features, hidden_dim, num_layers, input_scale, init_spatial_value, **dd)
        else:
            self.kernel_net = SIRENKernelNet(self.dims, out_features, hidden_dim, num_layers, omega_0, **dd)
        # rows: spatial axes (0 = H, 1 = W); columns: [mean, sigma]
        self.mask_params = nn.Parameter(torch.empty(self.dims, 2, **dd)) if mask else None
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        # the kernel size and sampling-rate factor the parameters are calibrated for, saved with them:
        # a state dict saved at another size is re-targeted on load (see _load_from_state_dict)
        self.register_buffer('kernel_size_record', torch.tensor(kernel_size, device=device, dtype=torch.long))
        self.register_buffer('sampling_rate_norm', torch.tensor(sampling_rate_norm, **dd))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        self.kernel_net.reset_parameters()
        if self.mask_params is not None:
            self.mask_params.copy_(torch.tensor([[self.mask_init_mean, self.mask_init]] * self.dims))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_horizon(self, kernel_size, name: str = 'kernel_size') -> int:
        return check_kernel_size(kernel_size, self.dims, name, minimum=self.min_kernel_size, what=' (the horizon)')

    @classmethod
    def initial_kernel_shape(cls, kernel_size: int, **kwargs) -> Tuple[int, ...]:
        """The kernel shape, (h, w) in 2D or (length,) in 1D, that a freshly built layer with these constructor
        arguments generates and fuses to: the horizon cropped by the initial mask (mean `mask_init_mean`,
        sigma `mask_init`) under dynamic cropping. Computed without building the layer."""
        args = {}
        for klass in (FlexConv2d, cls):  # subclasses may change defaults (CKConv2d: no mask)
            args.update({n: p.default for n, p in inspect.signature(klass.__init__).parameters.items()
                         if p.default is not inspect.Parameter.empty})
        args.update(kwargs)
        k = check_kernel_size(kernel_size, cls.dims, 'kernel_size', minimum=cls.min_kernel_size, what=' (the horizon)')
        if not (args['mask'] and args['dynamic_cropping']):
            return (k,) * cls.dims
        mp = torch.tensor([[cls.mask_init_mean, float(args['mask_init'])]] * cls.dims, device='cpu')  # (not meta)
        if cls.dims == 1:
            return (k - gaussian_mask_crop_1d(mp, k, args['mask_threshold']),)
        return tuple(k - 2 * i for i in gaussian_mask_crop(mp, k, args['mask_threshold']))

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'kernel_net={self.kernel_net_type}')
        if self.mask_params is None:
            s += ', mask=False'
        elif self.dynamic_cropping:
            s += f', mask_threshold={self.mask_threshold}'
        if self.bias is None:
            s += ', bias=False'
        return s

    def crop(self) -> List[int]:
        """Positions dropped at each end of axis 0 and axis 1 (dynamic cropping), [0, 0] if none."""
        mp = self.mask_params
        if mp is None:
            return [0, 0]
        if not self.dynamic_cropping or mp.is_meta:
            return [0, 0]
        return gaussian_mask_crop(mp, self.kernel_size, self.mask_threshold)

    def kernel_positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The retained 1-D grid coordinates of axis 0 (rows) and axis 1 (columns)."""
        ref = self.kernel_net.output.weight
        k = self.kernel_size
        grid = torch.linspace(-1., 1., k, device=ref.device, dtype=ref.dtype)
        i0, i1 = self.crop()
        return grid[i0:k - i0], grid[i1:k - i1]

    def get_weight(self) -> torch.Tensor:
        """The conv weight (out_channels, in_channels, h, w) for the current parameters."""
        p0, p1 = self.kernel_positions()
        h, w = p0.shape[0], p1.shape[0]
        pos = torch.stack(torch.meshgrid(p0, p1, indexing='ij'), dim=-1).reshape(h * w, 2)
        kernel = self.kernel_net(pos)  # (h*w, Cout*Cin), column j = o * Cin + i
        kernel = kernel.t().reshape(self.out_channels, self.in_channels, h, w)
        kernel = kernel * self.sampling_rate_norm.to(kernel.dtype)
        mp = self.mask_params
        if mp is not None:
            m0 = torch.exp(-0.5 * ((p0 - mp[0, 0]) / mp[0, 1]).pow(2))
            m1 = torch.exp(-0.5 * ((p1 - mp[1, 0]) / mp[1, 1]).pow(2))
            kernel = kernel * (m0.unsqueeze(1) * m1.unsqueeze(0))
        return kernel

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        kh, kw = weight.shape[-2], weight.shape[-1]
        if torch.jit.is_scripting():
            return F.conv2d(x, weight, bias, 1, (kh // 2, kw // 2))
        if self.use_fft and kh > self.fft_threshold and kw > self.fft_threshold:
            return fft_conv2d(x, weight, bias)
        return self._dispatch_conv(x, weight, bias, 1, 1)  # the measured backend dispatch (same result)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'{self.layer_name} expects (N, {self.in_channels}, H, W) inputs, got shape {list(x.shape)}')
        if torch.jit.is_scripting():
            return self._conv(x, self.get_weight(), self.bias)
        w = self._weight()
        note_kernel(self, w)  # (for the BatchNorm after it: `captured_kernel`)
        return self._conv(x, w, self.bias)

    @torch.jit.unused
    def _weight(self) -> torch.Tensor:
        """The kernel a `batched_kernels` block generated for this layer, else this layer's own."""
        w = take_kernel(self)
        return self.get_weight() if w is None else w

    @torch.jit.unused
    def batch_key(self) -> tuple:
        """Layers with the same key can generate their kernels in one batched evaluation (`batched_weights`)."""
        masked = self.mask_params is not None
        ref = self.kernel_net.output.weight
        return (self.dims, self.kernel_size, masked, masked and self.dynamic_cropping, self.mask_threshold, ref.dtype,
                ref.device, ref.is_meta) + self.kernel_net.batch_key()

    @staticmethod
    @torch.jit.unused
    def batched_weights(layers: List['FlexConv2d']) -> List[torch.Tensor]:
        """`get_weight()` of every layer (same `batch_key`) from one batched kernel-network evaluation: the
        cropped grids are nested windows of one grid (each centred), so every net runs on the largest window
        and each layer keeps its own; one host read for all the crops."""
        ref = layers[0]
        k = ref.kernel_size
        crops = gaussian_mask_crops(layers) if ref.mask_params is not None and ref.dynamic_cropping and \
            not ref.mask_params.is_meta else [[0, 0]] * len(layers)
        i0, i1 = min(c[0] for c in crops), min(c[1] for c in crops)
        w_ref = ref.kernel_net.output.weight
        grid = torch.linspace(-1., 1., k, device=w_ref.device, dtype=w_ref.dtype)
        p0, p1 = grid[i0:k - i0], grid[i1:k - i1]
        h, w = p0.shape[0], p1.shape[0]
        pos = torch.stack(torch.meshgrid(p0, p1, indexing='ij'), dim=-1).reshape(h * w, 2)
        nets = [m.kernel_net for m in layers]
        outs = _outputs_batched(nets, type(nets[0]).hidden_batched(nets, pos))
        factor = torch.stack([m.sampling_rate_norm for m in layers]).to(w_ref.dtype).view(-1, 1, 1)
        if ref.mask_params is not None:
            mp = torch.stack([m.mask_params for m in layers])  # (L, 2, 2)
            m0 = torch.exp(-0.5 * ((p0 - mp[:, 0, 0:1]) / mp[:, 0, 1:2]).pow(2))  # (L, h)
            m1 = torch.exp(-0.5 * ((p1 - mp[:, 1, 0:1]) / mp[:, 1, 1:2]).pow(2))  # (L, w)
            factor = factor * (m0.unsqueeze(2) * m1.unsqueeze(1))  # (L, h, w)
        weights = []
        for m, (c0, c1), out, fac in zip(layers, crops, outs, factor.unbind(0)):
            kernel = out.view(h, w, -1)[c0 - i0:h - (c0 - i0), c1 - i1:w - (c1 - i1)]
            fac = fac[c0 - i0:h - (c0 - i0), c1 - i1:w - (c1 - i1)] if fac.dim() == 2 else fac
            kernel = (kernel * fac.unsqueeze(-1) if fac.dim() == 2 else kernel * fac).permute(2, 0, 1)
            weights.append(kernel.reshape(m.out_channels, m.in_channels, kernel.shape[1], kernel.shape[2]))
        return weights

    @torch.no_grad()
    def set_kernel_size(self, kernel_size: int, mode: Optional[str] = None):
        """Sample the continuous kernel at a new horizon from now on.

        'stretch' (default): the same function over [-1, 1], values times ((k1 - 1) / (k2 - 1))^2 (for a
        resolution change: a model trained at 16 px, horizon 17, runs at 32 px with horizon 33 and
        factor 0.25). 'none': the factor is left alone.
        """
        kernel_size = self._check_horizon(kernel_size)
        mode = self.resize_mode if mode is None else check_choice('resize mode', mode, FLEX_RESIZE_MODES)
        if mode == 'stretch' and kernel_size != self.kernel_size:
            self.sampling_rate_norm.mul_(rescale_factor(self.kernel_size, kernel_size, self.dims))
        self.kernel_size = kernel_size
        self.kernel_size_record.fill_(kernel_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a state dict calibrated for another horizon is re-targeted to this layer's (resize_mode)
        key, norm_key = prefix + 'kernel_size_record', prefix + 'sampling_rate_norm'
        if key in state_dict:
            saved = int(state_dict[key])
            if saved != self.kernel_size:
                try:
                    self._check_horizon(saved)
                except (TypeError, ValueError):
                    error_msgs.append(f'{key}: invalid saved kernel size {saved}')
                    return
                if self.resize_mode == 'stretch' and norm_key in state_dict:
                    state_dict[norm_key] = state_dict[norm_key] * rescale_factor(saved, self.kernel_size, self.dims)
            state_dict[key] = torch.tensor(self.kernel_size)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @torch.no_grad()
    def to_plain_conv(self, weight: torch.Tensor, bias: Optional[torch.Tensor], training: bool = False) -> nn.Conv2d:
        """A plain 'same' conv (LargeKernelConv2d, an nn.Conv2d with bias) holding `weight` (any odd h x w) and
        `bias`."""
        kh, kw = weight.shape[-2], weight.shape[-1]
        conv = LargeKernelConv2d(self.in_channels, self.out_channels, (kh, kw), bias=True, device=weight.device,
                          dtype=weight.dtype)
        return fill_conv_(conv, weight, bias, training)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """timm reparameterization: the kernel generated (and masked/cropped) once, in a plain conv."""
        return self.to_plain_conv(self.get_weight(), self.bias, training=self.training)


@register_notrace_module
class CKConv2d(FlexConv2d):
    """CKConv: a continuous kernel without mask (SIREN kernel network by default), 'same' conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 33, kernel_net: str = 'siren',
                 mask: bool = False, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, kernel_net=kernel_net, mask=mask, **kwargs)


def gaussian_mask_crop_1d(mask_params: torch.Tensor, kernel_size: int, threshold: float = 0.1) -> int:
    """Dynamic cropping of a causal 1-D kernel: how many of the oldest grid positions to drop.

    With r = min(mean - sigma c, mean + sigma c), c = sqrt(-2 ln threshold): if |r| < 1 the positions
    p <= r (p = linspace(-1, 1, k)) are dropped, a one-sided crop; the +1 end (the current step) is always
    kept. Computed in float32 (their code does so); one host sync.
    """
    mp = mask_params.detach().float()
    c = math.sqrt(-2.0 * math.log(threshold))
    mean, sigma = mp[0, 0], mp[0, 1]
    r = torch.minimum(mean - sigma * c, mean + sigma * c)
    grid = torch.linspace(-1., 1., kernel_size, device=mp.device)
    drop = ((grid <= r).sum() * (r.abs() < 1.).long()).clamp(max=kernel_size - 1)
    return int(drop)


@register_notrace_module  # data-dependent kernel length: a leaf for torch.fx
class FlexConv1d(FlexConv2d):
    """Causal 1-D FlexConv (FlexTCN): kernel network times a 1-D Gaussian mask over the past.

    The kernel is sampled on linspace(-1, 1, k) (k = `kernel_size`, the horizon; the sequence models use
    the sequence length); tap k - 1 (coordinate +1) multiplies the current step and the output at t sees
    inputs up to t. The mask starts at mean +1 (the present) with sigma `mask_init`; dynamic cropping
    drops the oldest positions where the mask is below the threshold (`gaussian_mask_crop_1d`). Any
    k >= 2 works (an even horizon is what the authors' code pads with one zero tap at the far past: the
    same outputs). The kernel network's mu init is centred at 0 as in the authors' 1-D FlexConv (their
    mask starts at +1 all the same). `fuse()` returns a CausalConv1d.
    """
    dims = 1
    min_kernel_size = 2
    mask_init_mean = 1.0
    batched_weights = None  # (1-D kernels are generated layer by layer)

    def crop(self) -> List[int]:
        """[oldest positions dropped], [0] without a mask or dynamic cropping."""
        mp = self.mask_params
        if mp is None or not self.dynamic_cropping or mp.is_meta:
            return [0]
        return [gaussian_mask_crop_1d(mp, self.kernel_size, self.mask_threshold)]

    def get_weight(self) -> torch.Tensor:
        """The causal conv weight (out_channels, in_channels, length) for the current parameters."""
        ref = self.kernel_net.output.weight
        grid = torch.linspace(-1., 1., self.kernel_size, device=ref.device, dtype=ref.dtype)[self.crop()[0]:]
        kernel = self.kernel_net(grid.unsqueeze(-1))  # (len, Cout*Cin), column j = o * Cin + i
        kernel = kernel.t().reshape(self.out_channels, self.in_channels, grid.shape[0])
        kernel = kernel * self.sampling_rate_norm.to(kernel.dtype)
        mp = self.mask_params
        if mp is not None:
            kernel = kernel * torch.exp(-0.5 * ((grid - mp[0, 0]) / mp[0, 1]).pow(2))
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'{self.layer_name} expects (N, {self.in_channels}, L) inputs, got shape {list(x.shape)}')
        w = self.get_weight()
        if not torch.jit.is_scripting():
            note_kernel(self, w)  # (for the BatchNorm after it: `captured_kernel`)
        return causal_conv1d(x, w, self.bias)

    @torch.no_grad()
    def to_plain_conv(self, weight: torch.Tensor, bias: Optional[torch.Tensor], training: bool = False) -> nn.Conv1d:
        """A CausalConv1d (an nn.Conv1d with bias) holding `weight` (any length) and `bias`."""
        conv = CausalConv1d(self.in_channels, self.out_channels, weight.shape[-1], bias=True, device=weight.device,
                            dtype=weight.dtype)
        return fill_conv_(conv, weight, bias, training)


def _init_output_variance(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, the variance of conv(x, weight) (no bias) for zero-mean inputs whose channels are
    independent, each the sum of a unit-variance value constant over the kernel's extent and unit-variance
    white noise: sum_{i,x} K[o, i, x]^2 + sum_i (sum_x K[o, i, x])^2. Any kernel layout (Cout, Cin, *taps)."""
    w = weight.detach().float().flatten(2)
    return w.pow(2).sum((1, 2)) + w.sum(2).pow(2).sum(1)


@register_notrace_module  # a leaf for torch.fx, as the FlexConv in it (data-dependent kernel shape)
class FlexConvBN2d(KernelScaledBNMixin, nn.Module):
    """BN(FlexConv2d(x)); fuses to one nn.Conv2d with bias.

    `flex_kwargs` go to FlexConv2d (kernel_net='siren', mask=False for a CKConv branch).

    The BN's running variance starts at the conv's output variance at init (`reset_running_stats`), not
    at 1. Generated kernels are not scaled to the conv's fan-in: per output channel that variance is up
    to 9e5 in CKCNN-16 and 60 in FlexNet-16 (horizon 33), 700 in FlexTCN-6 (784 steps), so with BatchNorm's
    default a fresh or barely trained network explodes in eval mode, each branch passing on its conv's
    gain. Train-mode outputs and gradients do not depend on the running statistics, and checkpoints load
    their own: training and the authors' checkpoints are unaffected.
    """
    conv_cls = FlexConv2d
    bn_cls = nn.BatchNorm2d

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 33,
            bn_eps: float = 1e-5,
            device=None,
            dtype=None,
            **flex_kwargs,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = self.conv_cls(in_channels, out_channels, kernel_size, **flex_kwargs, **dd)
        self.bn = self.bn_cls(out_channels, eps=bn_eps, **dd)
        self.reset_running_stats()
        self._init_kernel_sq()  # the eval variance follows the generated kernel's scale (KernelScaledBNMixin)

    def _kernel(self, bn_name: str) -> torch.Tensor:
        return self.conv.get_weight()

    @torch.no_grad()
    def reset_running_stats(self):
        """Reset the BN's running statistics to those of the conv's current kernel: mean 0 and, per channel,
        the output variance for unit-variance inputs (`_init_output_variance`), so that eval mode normalises
        a freshly initialised branch as train mode does. Nothing to compute on the meta device."""
        self.bn.reset_running_stats()
        if self.bn.running_var is not None and not self.bn.running_var.is_meta:
            self.bn.running_var.copy_(_init_output_variance(self.conv.get_weight()))
            self.reset_kernel_sq_()  # (once registered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.bn(self.conv(x))
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with captured_kernel(self.conv) as cap:  # the kernel the conv generated: not generated twice
            c = self.conv(x)
        y = self._bn_forward(c, 'bn', cap.kernel)
        recompute_batch_norm(c, y, self.bn)  # in a recompute scope: the BN output is recomputed from the conv output
        return y

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """One plain conv equal to the branch in eval mode (BN folded into the generated kernel)."""
        w, b = fold_bn(self.conv.get_weight(), self.conv.bias, self.bn, self.eval_running_var('bn'))
        return self.conv.to_plain_conv(w, b, training=self.training)


@register_notrace_module
class FlexConvBN1d(FlexConvBN2d):
    """BN(FlexConv1d(x)) (the FlexTCN branch); fuses to one CausalConv1d with bias."""
    conv_cls = FlexConv1d
    bn_cls = nn.BatchNorm1d
