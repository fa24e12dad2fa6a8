""" Test-session setup. Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter
(the tests in test_triton.py); triton.jit chooses the interpreter when a kernel (and Triton's own
library, imported with timm) is defined, so the switch is set here, before anything imports Triton. """
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module's tests (as the trainer's subprocess runs get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
