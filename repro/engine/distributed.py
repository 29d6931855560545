"""Process groups, model wrapping and per-rank sampling for `torchrun` runs (and single-process runs).

`torchrun --nproc-per-node N -m repro.run CONFIG.yaml` sets WORLD_SIZE / RANK / LOCAL_RANK; with a world
size above 1 a process group is created (nccl on CUDA, gloo on CPU), BatchNorm becomes SyncBatchNorm on
CUDA and the model is wrapped in DistributedDataParallel. Only rank 0 writes files.

Training batches come from `StepBatchSampler`, which plays the role of `DistributedSampler` (a shuffled
permutation per epoch, disjoint per-rank slices) but is indexed by the global step: sample `p` of the run
(p = step * world * batch + rank * batch + j) is item `p mod n` of the permutation of epoch `p // n`, with its
own augmentation seed. A run resumed at step s therefore draws exactly the samples an uninterrupted run
draws from step s on, which `DistributedSampler` (epoch granularity) cannot do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: rank / world size / device; `backend` None when not distributed."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(*, device: str = "auto") -> DistContext:
    """Read torchrun's environment and start the process group when WORLD_SIZE > 1.

    `device`: "auto" (CUDA if available), "cpu" or "cuda". The backend is nccl on CUDA and gloo on CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device, backend=backend
    )


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group this context created (no-op when not distributed)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """SyncBatchNorm (CUDA, world > 1) and DistributedDataParallel (world > 1); the model itself otherwise."""
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index])
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity when not distributed."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shard(count: int, ctx: DistContext) -> list[int]:
    """Indices 0..count-1 this rank evaluates: every world_size-th (no padding, so no pixel counts twice)."""
    return list(range(ctx.rank, count, ctx.world_size))


def augmentation_seed(seed: int, position: int) -> int:
    """A 32-bit seed for global sample `position` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class StepBatchSampler:
    """Per-rank batches of (dataset index, augmentation seed) for micro-steps start_step .. total_steps-1.

    Args:
        dataset_size: n, the number of training samples.
        batch_size: samples per rank per micro-step.
        rank, world_size: this process's slice of each global batch.
        seed: run seed (permutations and augmentation seeds derive from it).
        start_step, total_steps: the micro-steps to yield (a resumed run starts later).
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step {start_step} outside [0, total_steps={total_steps}]")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.start_step, self.total_steps = start_step, total_steps
        self._epoch = -1
        self._permutation: list[int] = []

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.dataset_size, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[offset]

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.total_steps):
            first = step * global_batch + self.rank * self.batch_size
            positions = range(first, first + self.batch_size)
            yield [(self._index(p), augmentation_seed(self.seed, p)) for p in positions]
