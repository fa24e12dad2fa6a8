""" Building blocks of timm_smpconv; no model knowledge lives here. """
from .conv import CausalConv1d, ConvBN, DispatchConvMixin, LargeKernelConv2d
from .flexconv import (
    CKConv2d,
    FlexConv1d,
    FlexConv2d,
    FlexConvBN1d,
    FlexConvBN2d,
    MAGNet,
    SIRENKernelNet,
    gaussian_mask_crop,
    gaussian_mask_crop_1d,
)
from .fuse import fold_bn, fold_preceding_bn, pad_kernel, randomize_bn_stats_
from .smp import default_n_points, default_radius, init_smp_points, render_smp_kernel, rescale_factor, support_crop
from .smp_conv import RESIZE_MODES, SMPConv1d, SMPConv2d, SMPLargeKernel1d, SMPLargeKernel2d, resize_smp_params
