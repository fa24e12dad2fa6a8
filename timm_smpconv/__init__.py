""" timm-smpconv: continuous-kernel convolutions (SMPConv, FlexConv) for timm.

`import timm_smpconv` registers the package's models with timm; the layers and optimizer
helpers are re-exported here.
"""
from . import models  # registers the models with timm
from .layers import (
    CausalConv1d,
    CKConv2d,
    FlexConv2d,
    FlexConvBN2d,
    MAGNet,
    SMPConv1d,
    SMPConv2d,
    SMPLargeKernel1d,
    SMPLargeKernel2d,
    render_smp_kernel,
    rescale_factor,
)
from .ops import conv_impl, large_kernel_conv2d, set_conv_impl
from .optim import RADIUS_LR_SCALE, RADIUS_RANGE_IMAGENET, RADIUS_RANGE_SMALL, clamp_smp_radius_, param_groups_smp
from .regularizers import anti_aliasing_penalty
from .resolution import retarget_resolution

__version__ = '0.1.0'
