"""The context modules the efficiency claims compare, built the same way for every counter.

Every variant is a `models.context.RecurrentContext` around one attention block (B, C, H, W) -> (B, C, H, W),
so the root module is called once per step while the block, with shared weights, runs `recurrence` times.
Names are the op variants of `repro.vocabulary`:

* `cca_naive` / `cca_triton`: `ops.CrissCrossAttention` with that backend, R = 1..3.
* `non_local_naive`: `ops.NonLocal2d(impl="naive")`, the paper's baseline (materialised HW x HW map).
* `non_local_sdpa`: `ops.NonLocal2d(impl="sdpa")`; with query/key 64 and value 512 channels PyTorch's CPU
  dispatcher picks the math kernel, which materialises the map too.
* `non_local_sdpa_heads`: `ops.NonLocal2d(impl="sdpa_heads")`, the value split into heads so that SDPA can
  use a fused kernel that never stores the map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.context import RecurrentContext
from ops.cost import criss_cross_module_cost, non_local_attention_cost, non_local_module_cost
from ops.criss_cross import CrissCrossAttention
from ops.non_local import NonLocal2d
from repro.vocabulary import split_variant, variant_label

VARIANT_NAMES = ("cca_naive", "cca_triton", "non_local_naive", "non_local_sdpa", "non_local_sdpa_heads")


@dataclass(frozen=True)
class ContextVariant:
    """One context module configuration: `name` from VARIANT_NAMES and its recurrence."""

    name: str
    recurrence: int = 1

    def __post_init__(self) -> None:
        if self.name not in VARIANT_NAMES:
            raise ValueError(f"unknown context variant {self.name!r}; expected one of {VARIANT_NAMES}")
        if not isinstance(self.recurrence, int) or self.recurrence < 1:
            raise ValueError(f"recurrence must be an int >= 1, got {self.recurrence!r}")
        if not self.is_criss_cross and self.recurrence != 1:
            raise ValueError(f"{self.name} has no recurrence; got recurrence={self.recurrence}")

    @property
    def is_criss_cross(self) -> bool:
        return split_variant(self.name)[0] == "cca"

    @property
    def implementation(self) -> str:
        return split_variant(self.name)[1]

    @property
    def label(self) -> str:
        return variant_label(self.name, self.recurrence)

    def build(self, *, channels: int, qk_channels: int) -> RecurrentContext:
        """The module on (B, channels, H, W), gamma 1 so attention contributes to the output."""
        if self.is_criss_cross:
            block: nn.Module = CrissCrossAttention(channels, qk_channels=qk_channels, backend=self.implementation)
        else:
            block = NonLocal2d(channels, qk_channels=qk_channels, impl=self.implementation)
        with torch.no_grad():
            block.gamma.fill_(1.0)
        return RecurrentContext(block, recurrence=self.recurrence)

    def analytic_macs(self, *, batch: int, channels: int, qk_channels: int, height: int, width: int) -> int:
        """Forward multiply-accumulates from `ops.cost`."""
        if self.is_criss_cross:
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
