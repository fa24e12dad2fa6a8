""" Test-session setup. Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter
(the tests in test_triton.py); triton.jit chooses the interpreter when a kernel (and Triton's own
library, imported with timm) is defined, so the switch is set here, before anything imports Triton. """
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
