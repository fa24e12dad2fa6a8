""" timm model families; importing this registers them with timm. """
from .smpconv import SMPConvNet
from .flexnet import FlexNet
from .tcn import SequenceTCN
