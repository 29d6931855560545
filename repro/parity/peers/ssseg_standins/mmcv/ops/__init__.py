"""mmcv.ops.CrissCrossAttention in plain torch, with mmcv's parameter names (query_conv, key_conv,
value_conv, gamma.scale). Other mmcv.ops names are absent: sssegmentation imports them inside try/except."""

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    """mmcv.cnn.Scale: multiplies by a learnable 0-d parameter `scale`."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """Each position attends to its column and its row (its own position counted once, in the row); one
    softmax over the H + W energies; out = gamma * sum + x."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        query, key, value = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        # column energies (b, h, w, h'): query at (h, w) with key at (h', w); the own position masked
        column = torch.einsum("bchw,bciw->bhwi", query, key)
        diagonal = torch.eye(height, dtype=torch.bool, device=x.device)
        column = column.masked_fill(diagonal[:, None, :], float("-inf"))
        row = torch.einsum("bchw,bchj->bhwj", query, key)  # (b, h, w, w')
        attention = F.softmax(torch.cat([column, row], dim=-1), dim=-1)
        out = torch.einsum("bciw,bhwi->bchw", value, attention[..., :height])
        out = out + torch.einsum("bchj,bhwj->bchw", value, attention[..., height:])
        return self.gamma(out) + x


__all__ = ["CrissCrossAttention", "Scale"]
