""" timm model families; importing this registers them with timm. """
from ._builder import UnsafeCheckpointError, package_models, read_checkpoint, refused_pickle
from .flexnet import FlexNet
from .smpconv import SMPConvNet
from .tcn import SequenceTCN
