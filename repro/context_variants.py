"""The context modules the efficiency claims compare, built the same way for every counter.

Every variant is a `RecurrentContext` around one attention block (B, C, H, W) -> (B, C, H, W), so the root
module is called once per step (MemTracker needs that) while the block, with shared weights, runs
`recurrence` times, as the paper's RCCA loop does.

Variants:
* `criss_cross_naive` / `criss_cross_triton`: `ops.CrissCrossAttention` with that backend, R = 1..3.
* `non_local_naive`: `ops.NonLocal2d(impl="naive")`, the paper's baseline (materialised HW x HW map).
* `non_local_sdpa`: `ops.NonLocal2d(impl="sdpa")`; with query/key 64 and value 512 channels PyTorch's CPU
  dispatcher picks the math kernel, which materialises the map too.
* `non_local_sdpa_heads`: the same attention with the value split into C / Cqk heads of Cqk channels, each
  head reusing the one query/key map. Mathematically identical to `non_local_naive` (same weights, same
  output), but the equal head widths let SDPA use a fused (flash) kernel that never stores the map; it pays
  for that by recomputing the energies once per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ops.cost import criss_cross_module_cost, non_local_attention_cost, non_local_module_cost
from ops.criss_cross import CrissCrossAttention
from ops.non_local import NonLocal2d

VARIANT_NAMES = (
    "criss_cross_naive", "criss_cross_triton", "non_local_naive", "non_local_sdpa", "non_local_sdpa_heads",
)


class RecurrentContext(nn.Module):
    """Apply `block` `recurrence` times with shared weights: (B, C, H, W) -> (B, C, H, W)."""

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


class HeadSplitNonLocal(NonLocal2d):
    """Non-local attention with the value split into heads of `qk_channels` channels sharing one query/key.

    out[:, h * Cqk:(h + 1) * Cqk] = softmax(q^T k) v[:, h * Cqk:(h + 1) * Cqk], i.e. exactly
    `NonLocal2d(impl="naive")` on the same weights, computed by SDPA with equal head widths.
    """

    def __init__(self, in_channels: int, *, qk_channels: int | None = None) -> None:
        super().__init__(in_channels, qk_channels=qk_channels, impl="sdpa")
        if in_channels % self.qk_channels:
            raise ValueError(
                f"HeadSplitNonLocal needs in_channels divisible by qk_channels, got {in_channels} and "
                f"{self.qk_channels}"
            )

    @property
    def heads(self) -> int:
        return self.in_channels // self.qk_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"HeadSplitNonLocal expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        pixels = height * width
        shape = (batch, self.heads, pixels, self.qk_channels)
        # (B, HW, Cqk) shared by all heads; contiguous last dimension, as the fused kernels require.
        query = self.query_conv(x).flatten(2).transpose(1, 2).unsqueeze(1).expand(shape).contiguous()
        key = self.key_conv(x).flatten(2).transpose(1, 2).unsqueeze(1).expand(shape).contiguous()
        value = self.value_conv(x).reshape(batch, self.heads, self.qk_channels, pixels).transpose(2, 3)
        out = F.scaled_dot_product_attention(query, key, value.contiguous(), scale=1.0)
        out = out.transpose(2, 3).reshape(batch, channels, height, width)
        return self.gamma * out + x


@dataclass(frozen=True)
class Variant:
    """One context module configuration: `name` from VARIANT_NAMES and its recurrence."""

    name: str
    recurrence: int = 1

    def __post_init__(self) -> None:
        if self.name not in VARIANT_NAMES:
            raise ValueError(f"unknown context variant {self.name!r}; expected one of {VARIANT_NAMES}")
        if not isinstance(self.recurrence, int) or self.recurrence < 1:
            raise ValueError(f"recurrence must be an int >= 1, got {self.recurrence!r}")
        if not self.name.startswith("criss_cross") and self.recurrence != 1:
            raise ValueError(f"{self.name} has no recurrence; got recurrence={self.recurrence}")

    @property
    def label(self) -> str:
        return f"{self.name} R={self.recurrence}" if self.name.startswith("criss_cross") else self.name

    def build(self, *, channels: int, qk_channels: int) -> RecurrentContext:
        """The module on (B, channels, H, W), gamma 1 so attention contributes to the output."""
        if self.name.startswith("criss_cross"):
            backend = self.name.removeprefix("criss_cross_")
            block: nn.Module = CrissCrossAttention(channels, qk_channels=qk_channels, backend=backend)
        elif self.name == "non_local_sdpa_heads":
            block = HeadSplitNonLocal(channels, qk_channels=qk_channels)
        else:
            block = NonLocal2d(channels, qk_channels=qk_channels, impl=self.name.removeprefix("non_local_"))
        with torch.no_grad():
            block.gamma.fill_(1.0)
        return RecurrentContext(block, recurrence=self.recurrence)

    def analytic_macs(self, *, batch: int, channels: int, qk_channels: int, height: int, width: int) -> int:
        """Forward multiply-accumulates from `ops.cost`."""
        if self.name.startswith("criss_cross"):
            return criss_cross_module_cost(
                batch, channels, qk_channels, height, width, recurrence=self.recurrence
            ).macs
        module = non_local_module_cost(batch, channels, qk_channels, height, width).macs
        if self.name != "non_local_sdpa_heads":
            return module
        heads = channels // qk_channels
        single = non_local_attention_cost(batch, qk_channels, channels, height, width).macs
        split = non_local_attention_cost(batch * heads, qk_channels, qk_channels, height, width).macs
        return module - single + split
