"""Test-session setup.

The Triton kernels are checked on CPU through the Triton interpreter, which must be switched on before
triton is first imported; on a machine with a CUDA device the kernels run natively instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep runs repeatable and avoid oversubscribing small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))
