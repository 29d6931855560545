"""The one training-step helper and the one set of method strings every measurement names.

A measured step is a `StepState` (model, inputs, how to backpropagate, optional optimizer) passed to
`training_step` or `inference_step`. The claims (a context module driven by the output gradient the next
layer would send), the whole-model profile (decode + auxiliary cross-entropy, SGD step) and the synthetic
ablation (cross-entropy) all measure through it, so "a training step" means the same sequence everywhere:
forward, backward, optimizer step if there is one, gradients released.

The method strings are what the `method` / `flops_method` / `memory_method` columns of every CSV say; the
report and the plots recognise methods by these constants, never by retyped text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

# FLOPs.
METHOD_ANALYTIC = "analytic ops.cost (H+W-1 attended pixels for criss-cross)"
METHOD_FVCORE = "fvcore FlopCountAnalysis + attention handles (1 flop per MAC), x2 for FLOPs"
METHOD_COUNTER = (
    "torch.utils.flop_counter.FlopCounterMode under FakeTensorMode (2 x MACs of dispatched aten ops; the "
    "naive criss-cross matmuls compute H+W energies and mask one)"
)
METHOD_COUNTER_EAGER = "torch.utils.flop_counter.FlopCounterMode (2 x MACs of dispatched aten ops)"
METHOD_COUNTER_PLUS_ANALYTIC = f"{METHOD_COUNTER_EAGER} + analytic ops.cost criss-cross core"
# Memory.
METHOD_FAKE_MEMORY = (
    "FakeTensorMode + torch.distributed._tools MemTracker estimate (misses kernel-internal buffers; the Triton "
    "op counts its outputs only)"
)
METHOD_PROFILER_MEMORY = "torch.profiler allocator events"
METHOD_CUDA_MEMORY = "torch.cuda.max_memory_allocated"

# Short names for legends and tables, by the prefix of the method string.
SHORT_METHODS = {
    "analytic": "analytic", "fvcore": "fvcore", "torch.utils.flop_counter": "FlopCounterMode",
    "FakeTensorMode": "fake-mode estimate", "torch.profiler": "measured (profiler)",
    "torch.cuda": "measured (CUDA)",
}


def short_method(method: str) -> str:
    """A legend-sized name of a method string (the string itself when it is none of ours)."""
    return next((name for prefix, name in SHORT_METHODS.items() if method.startswith(prefix)), method)


class StepState(NamedTuple):
    """What one measured step starts from. A NamedTuple, so tracers that flatten pytrees (MemTracker's
    external-state tracking) find every module, optimizer and tensor in it.

    Exactly one of `grad_output` (backward of the output with this gradient) and `loss` (backward of
    `loss(model(*inputs), *targets)`) drives the backward pass.
    """

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...] = ()
    grad_output: torch.Tensor | None = None
    loss: Callable[..., torch.Tensor] | None = None
    optimizer: torch.optim.Optimizer | None = None


def training_step(state: StepState) -> None:
    """Forward, backward, optimizer step (when there is one), gradients released."""
    if (state.grad_output is None) == (state.loss is None):
        raise ValueError("StepState needs exactly one of grad_output and loss")
    # No name holds the outputs: they are freed as soon as backward no longer needs them, as in a real step.
    if state.loss is not None:
        state.loss(state.model(*state.inputs), *state.targets).backward()
    else:
        state.model(*state.inputs).backward(state.grad_output)
    if state.optimizer is not None:
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)


def inference_step(state: StepState) -> None:
    """Forward only, without autograd."""
    with torch.no_grad():
        state.model(*state.inputs)
