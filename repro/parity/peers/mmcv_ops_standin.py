"""Stand-in for mmcv's compiled `mmcv.ops`, for mmcv-lite (which ships the Python files of `mmcv.ops` but not the
compiled `_ext` they load, so `import mmcv.ops` fails and mmseg's CCHead refuses to build).

Runs only in a peer's venv (imports torch alone, so a test can load it by path). `install()` puts a module named
`mmcv.ops` into `sys.modules` before mmseg is imported: nothing is written into the installed packages.

`CrissCrossAttention` follows the formulation mmcv documents for its pure-PyTorch version (mmcv PR 1201,
`mmcv/ops/cc_attention.py` of mmcv 2.1.0): query/key 1x1 convs to C/8 channels and a value 1x1 conv to C (with
biases), for each position one softmax over the H energies of its column (its own position excluded, the
-inf diagonal) and the W energies of its row together, the value-weighted sums of both branches added, then
`gamma * out + x` with gamma an mmcv `Scale` initialised to 0 (state key `gamma.scale`). It is written here
independently: batched matmuls on explicit (B, W, H, C) / (B, H, W, C) layouts.

The other names mmseg 1.2.2 imports from `mmcv.ops` at import time (`point_sample`, `sigmoid_focal_loss`,
`PSAMask`, `DeformConv2d`, `ModulatedDeformConv2d`) are not used by the CCNet, non-local and FCN models; they
raise on use, naming the stand-in.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn


class Scale(nn.Module):
    """A learnable scalar (mmcv.cnn.Scale's state layout: one 0-d parameter `scale`)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def criss_cross(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """query, key (B, Cq, H, W), value (B, C, H, W) -> (B, C, H, W): each position attends to its row and its
    column (itself once, through the row)."""
    height = query.shape[2]
    # Column branch: for each column w, (H queries) x (H keys).
    q_col = query.permute(0, 3, 2, 1)  # (B, W, H, Cq)
    k_col = key.permute(0, 3, 1, 2)  # (B, W, Cq, H)
    energy_col = torch.matmul(q_col, k_col)  # (B, W, H, H)
    diagonal = torch.eye(height, dtype=torch.bool, device=query.device)
    energy_col = energy_col.masked_fill(diagonal, float("-inf")).permute(0, 2, 1, 3)  # (B, H, W, H)
    # Row branch: for each row h, (W queries) x (W keys).
    q_row = query.permute(0, 2, 3, 1)  # (B, H, W, Cq)
    k_row = key.permute(0, 2, 1, 3)  # (B, H, Cq, W)
    energy_row = torch.matmul(q_row, k_row)  # (B, H, W, W)
    weights = torch.softmax(torch.cat([energy_col, energy_row], dim=-1), dim=-1)
    w_col, w_row = weights[..., :height], weights[..., height:]
    v_col = value.permute(0, 3, 2, 1)  # (B, W, H', C)
    out_col = torch.matmul(w_col.permute(0, 2, 1, 3), v_col)  # (B, W, H, C)
    v_row = value.permute(0, 2, 3, 1)  # (B, H, W', C)
    out_row = torch.matmul(w_row, v_row)  # (B, H, W, C)
    return out_col.permute(0, 3, 2, 1) + out_row.permute(0, 3, 1, 2)


class CrissCrossAttention(nn.Module):
    """The criss-cross block with mmcv's parameter names (query_conv, key_conv, value_conv, gamma.scale)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = criss_cross(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma(out) + x


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv.ops.{name} is not available: mmcv-lite has no compiled ops and the parity stand-in "
            "(repro/parity/peers/mmcv_ops_standin.py) provides only CrissCrossAttention"
        )

    fail.__name__ = name
    return fail


UNAVAILABLE = ("point_sample", "sigmoid_focal_loss", "PSAMask", "DeformConv2d", "ModulatedDeformConv2d",
               "DeformConv2dPack", "ModulatedDeformConv2dPack", "batched_nms", "nms", "roi_align",
               "MultiScaleDeformableAttention", "CARAFEPack", "RoIAlign")


def build_module() -> types.ModuleType:
    module = types.ModuleType("mmcv.ops", __doc__)
    module.CrissCrossAttention = CrissCrossAttention
    for name in UNAVAILABLE:
        setattr(module, name, _unavailable(name))
    return module


def install() -> types.ModuleType:
    """Make `import mmcv.ops` / `from mmcv.ops import X` resolve to the stand-in (call before importing mmseg)."""
    module = build_module()
    sys.modules["mmcv.ops"] = module
    import mmcv

    mmcv.ops = module
    return module
