""" timm model families; importing this registers them with timm. """
from ._builder import UnsafeCheckpointError, create_model_or_exit, package_models, read_checkpoint, refused_pickle, unknown_model_message
from .flexnet import FlexNet
from .smpconv import SMPConvNet
from .tcn import SequenceTCN
