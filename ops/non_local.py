"""Non-local block (Wang et al. 2018) in the form the CCNet paper compares against: the same 1x1 q/k/v
convs and residual gamma as the criss-cross block, attention over all H * W pixels, no scaling.

`impl="naive"` materialises the (B, HW, HW) attention map as the paper's baseline did; `impl="sdpa"` uses
`torch.nn.functional.scaled_dot_product_attention` (scale 1), which may pick a fused kernel that never
stores the map (on CPU only when the query/key and value widths are equal; otherwise the math kernel).
`impl="sdpa_heads"` is the same attention with the value split into Cv / Cqk heads of Cqk channels, each
head reusing the one query/key map: mathematically identical to "naive", but the equal head widths let SDPA
use a fused (flash) kernel that never stores the map, paying for it by recomputing the energies per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ops._checks import check_qkv

IMPLS = ("naive", "sdpa", "sdpa_heads")


def non_local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, impl: str = "naive"
) -> torch.Tensor:
    """Full spatial attention: (B, Cqk, H, W) x2 and (B, Cv, H, W) -> (B, Cv, H, W).

    out[:, :, p] = sum_p' softmax_p'(query[:, :, p] . key[:, :, p']) value[:, :, p'] over all pixels.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown non-local impl {impl!r}; expected one of {IMPLS}")
    check_qkv(query, key, value, "non_local_attention")
    batch, _, height, width = query.shape
    if impl == "sdpa_heads":
        return _head_split_attention(query, key, value)
    # (B, HW, C) pixel-major views; contiguous so that fused SDPA kernels accept them.
    q = query.flatten(2).transpose(1, 2).contiguous()
    k = key.flatten(2).transpose(1, 2).contiguous()
    v = value.flatten(2).transpose(1, 2).contiguous()
    if impl == "naive":
        attention = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        # A . V (not V . A^T): the transposed form costs one more HW x HW copy in backward.
        out = torch.bmm(attention, v)
    else:
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0)
        out = out.squeeze(1)
    return out.transpose(1, 2).reshape(batch, -1, height, width)


def _head_split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """out[:, h * Cqk:(h + 1) * Cqk] = softmax(q^T k) v[:, h * Cqk:(h + 1) * Cqk], one SDPA call over all heads."""
    batch, qk_channels, height, width = query.shape
    value_channels = value.shape[1]
    if value_channels % qk_channels:
        raise ValueError(
            f"non_local_attention(impl='sdpa_heads') needs value channels divisible by query/key channels, got "
            f"{value_channels} and {qk_channels}"
        )
    heads, pixels = value_channels // qk_channels, height * width
    shape = (batch, heads, pixels, qk_channels)
    # (B, HW, Cqk) shared by all heads; contiguous last dimension, as the fused kernels require.
    q = query.flatten(2).transpose(1, 2).unsqueeze(1).expand(shape).contiguous()
    k = key.flatten(2).transpose(1, 2).unsqueeze(1).expand(shape).contiguous()
    v = value.reshape(batch, heads, qk_channels, pixels).transpose(2, 3).contiguous()
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return out.transpose(2, 3).reshape(batch, value_channels, height, width)


class NonLocal2d(nn.Module):
    """`gamma * non_local_attention(q(x), k(x), v(x)) + x`, the paper's non-local baseline block.

    Args:
        in_channels: C of the input (B, C, H, W); the value projection keeps C.
        qk_channels: channels of query and key (default in_channels // 8).
        impl: "naive" (materialised map), "sdpa" or "sdpa_heads" (see the module docstring; needs
            in_channels divisible by qk_channels).
    """

    def __init__(self, in_channels: int, *, qk_channels: int | None = None, impl: str = "naive") -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        qk_channels = max(in_channels // 8, 1) if qk_channels is None else qk_channels
        if qk_channels < 1:
            raise ValueError(f"qk_channels must be >= 1, got {qk_channels}")
        if impl not in IMPLS:
            raise ValueError(f"unknown non-local impl {impl!r}; expected one of {IMPLS}")
        if impl == "sdpa_heads" and in_channels % qk_channels:
            raise ValueError(
                f"NonLocal2d(impl='sdpa_heads') needs in_channels divisible by qk_channels, got {in_channels} and "
                f"{qk_channels}"
            )
        self.in_channels = in_channels
        self.qk_channels = qk_channels
        self.impl = impl
        self.query_conv = nn.Conv2d(in_channels, qk_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, qk_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"NonLocal2d expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = non_local_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x), impl=self.impl)
        return self.gamma * out + x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, qk_channels={self.qk_channels}, impl={self.impl!r}"
