"""A context module applied R times with shared weights, as the paper's RCCA loop applies its block."""

from __future__ import annotations

import torch
from torch import nn


class RecurrentContext(nn.Module):
    """Apply `block` `recurrence` times with shared weights: (B, C, H, W) -> (B, C, H, W).

    The root module is called once per step while the block runs `recurrence` times, which is what memory
    tracers that follow module calls (MemTracker) need.
    """

    def __init__(self, block: nn.Module, *, recurrence: int) -> None:
        super().__init__()
        if not isinstance(recurrence, int) or recurrence < 1:
            raise ValueError(f"recurrence must be an int >= 1, got {recurrence!r}")
        self.block = block
        self.recurrence = recurrence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.block(x)
        return x

    def extra_repr(self) -> str:
        return f"recurrence={self.recurrence}"
