"""Peak memory of a callable, measured at the allocator.

* `cpu_peak_bytes`: the PyTorch profiler's allocator events (allocations > 0, frees < 0), sorted by time;
  the peak of the running sum is the peak above what existed before the call. Deterministic run to run.
* `cuda_peak_bytes`: `torch.cuda.max_memory_allocated` above the allocation at the start.
* `fake_peak_bytes`: an estimate without allocating anything: the state is built and the step traced under
  `FakeTensorMode`, and PyTorch's `MemTracker` adds up the storages every dispatched op creates and frees.
  Blind spot: scratch memory a kernel allocates internally (SDPA's fused kernels, a transposed copy inside
  softmax backward) is invisible to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn, optim
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.profiler import ProfilerActivity, profile
from torch.utils._pytree import tree_flatten

State = TypeVar("State")


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU by `fn()` above what was allocated before it ran.

    Everything `fn` returns is released before the profiler stops, so the result covers temporaries and
    outputs alike.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda item: item[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated on a CUDA device by `fn()` above what was allocated before it ran."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_peak_bytes needs a CUDA device; use cpu_peak_bytes on CPU")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> tuple[int, str]:
    """Peak bytes of `fn()` on `device` and the name of the method that measured it."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device), "torch.cuda.max_memory_allocated"
    if device.type == "cpu":
        return cpu_peak_bytes(fn), "torch.profiler allocator events"
    raise ValueError(f"peak memory on device type {device.type!r} is not supported; expected 'cpu' or 'cuda'")


def _trackable(state: object) -> list[nn.Module | optim.Optimizer | torch.Tensor]:
    """The modules, optimizers and tensors inside `state` (nested tuples, lists, dicts)."""
    leaves, _ = tree_flatten(state)
    return [leaf for leaf in leaves if isinstance(leaf, (nn.Module, optim.Optimizer, torch.Tensor))]


@dataclass(frozen=True)
class FakeMemory:
    """A FakeTensorMode + MemTracker trace: bytes of the state before the step and the peak during it (the
    peak includes the state, as `torch.cuda.max_memory_allocated` would)."""

    state_bytes: int
    peak_bytes: int

    @property
    def step_bytes(self) -> int:
        """Peak above the state."""
        return max(self.peak_bytes - self.state_bytes, 0)


def fake_memory(
    build_fn: Callable[[], State], step_fn: Callable[[State], object], *, device: torch.device | str = "cpu"
) -> FakeMemory:
    """Trace `step_fn(build_fn())` under `FakeTensorMode`: nothing of the real size is allocated.

    `build_fn` returns the state the step starts from (modules, inputs, optimizer with its momentum buffers,
    in any nesting of tuples/lists/dicts); everything in it counts as allocated before the step. The root
    module of the step must be called once per step (MemTracker refuses a second call of the root module;
    submodules may be called many times).
    """
    device = torch.device(device)
    with FakeTensorMode():
        state = build_fn()
        tracker = MemTracker()
        tracker.track_external(*_trackable(state))
        base = tracker.get_tracker_snapshot("current").get(device, {}).get("Total", 0)
        with tracker:
            result = step_fn(state)
            del result
        peak = tracker.get_tracker_snapshot("peak").get(device, {}).get("Total", 0)
    return FakeMemory(state_bytes=base, peak_bytes=max(peak, base))


def fake_peak_bytes(
    build_fn: Callable[[], State], step_fn: Callable[[State], object], *, device: torch.device | str = "cpu"
) -> int:
    """Estimated peak bytes that `step_fn(build_fn())` allocates on `device` above what `build_fn` built.

    Both run under `FakeTensorMode`, so tensors have shapes but no storage: sizes far beyond the machine's
    memory can be estimated in well under a second. `build_fn` returns the state the step starts from
    (module, inputs, incoming gradient, optimizer, in any nesting of tuples/lists/dicts); everything in it
    counts as already allocated. The root module of the step must be called once per step (MemTracker
    refuses a second call of the root module; submodules may be called many times).
    """
    return fake_memory(build_fn, step_fn, device=device).step_bytes
