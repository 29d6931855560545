"""Test-session setup and the device the operator tests run on.

The Triton kernels are checked on CPU through the Triton interpreter, which must be switched on before
triton is first imported; on a machine with a CUDA device the kernels run natively instead, and the operator
tests run there (the `op_device` fixture). CPU-only tests ask for `torch.device("cpu")` themselves.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep runs repeatable and avoid oversubscribing small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))


def op_device_name() -> str:
    """What the operator tests run on: "cuda" natively, or "cpu (Triton interpreter)"."""
    return "cuda" if CUDA else "cpu (Triton interpreter)"


@pytest.fixture
def op_device() -> torch.device:
    """The device of the operator tests: CUDA when present (kernels run natively), else the CPU, where the
    Triton kernels run in the interpreter."""
    return torch.device("cuda" if CUDA else "cpu")
