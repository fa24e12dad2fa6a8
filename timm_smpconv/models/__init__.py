""" timm model families; importing this registers them with timm. """
from .flexnet import FlexNet
from .smpconv import SMPConvNet
from .tcn import SequenceTCN
