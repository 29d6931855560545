"""The small CCNet-style segmenter of the synthetic marker task (`repro.synthetic`).

It keeps the CCNet structure at a toy scale: a two-conv backbone to output stride 2, then the RCCA head's
layout (3x3 conv "conva" -> context module -> 3x3 conv "convb" -> 3x3 "bottleneck" on [features, context]
-> dropout -> 1x1 classifier), nearest upsampling back to the image. The context module is
`ops.CrissCrossAttention` applied `recurrence` times with shared weights (R=0: none), or `ops.NonLocal2d`.

Why a local head and not `models.heads.RCCAHead`: the task's separation property needs the receptive field
before attention (r1) plus after attention (r2), in cells, to stay within the task's gap. Here r1 = 2
(backbone 1, conva 1) and r2 = 2 (convb 1, bottleneck 1), and nearest (not bilinear) upsampling adds
nothing, so r1 + r2 = 4, the task's minimum gap. `receptive_radius_cells()` states it and the tests check
with autograd that marker pixels have exactly zero influence on rectangle outputs for R=0 and R=1.

Why gamma starts at 1 (the paper and `ops` start it at 0): with gamma = 0 the attention branch receives
gradient only through gamma itself, and within the ablation's step budget R=2 stayed at chance; starting at
1 makes the attention path carry signal from the first step. The comparison between variants is
unaffected: every attention variant starts the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ops.criss_cross import CrissCrossAttention
from ops.non_local import NonLocal2d

VARIANTS = ("R0", "R1", "R2", "R3", "nonlocal")


def recurrence_of(variant: str) -> int | None:
    """R for "R0".."R3"; None for "nonlocal"."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; expected one of {VARIANTS}")
    return None if variant == "nonlocal" else int(variant[1:])


def _conv_bn_relu(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SyntheticSegmenter(nn.Module):
    """Small CCNet-style segmenter: (B, 3, H, W) images -> (B, num_classes, H, W) logits.

    Args:
        variant: one of VARIANTS ("R0".."R3": criss-cross attention applied R times with shared weights;
            "nonlocal": one non-local block).
        num_classes: output classes.
        channels: width of the backbone output and the head.
        qk_channels: query/key width of the attention. 32 (= channels), not the paper's channels / 8 = 4:
            with 8, R=2 stayed at chance on 2 of 2 seeds in 600 steps (unscaled energies of few channels
            start almost uniform over the 31 attended cells and learn to focus slowly).
        gamma_init: initial residual scale of the attention (1 here, see the module docstring).
        backend: criss-cross backend (see `ops.criss_cross_attention`).
        dropout: before the classifier; 0 here (the paper's 0.1 drops whole channels of a 32-channel map,
            which hides the weak marker signal the attention must first learn to amplify).
    """

    def __init__(
        self,
        *,
        variant: str,
        num_classes: int,
        channels: int = 32,
        qk_channels: int = 32,
        gamma_init: float = 1.0,
        backend: str = "naive",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.recurrence = recurrence_of(variant)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        # Backbone to output stride 2: one output cell per 2x2 task cell; receptive radius 1 cell.
        self.backbone = nn.Sequential(
            _conv_bn_relu(3, channels // 2), _conv_bn_relu(channels // 2, channels, stride=2)
        )
        self.conva = _conv_bn_relu(channels, channels)
        if variant == "nonlocal":
            self.context: nn.Module | None = NonLocal2d(channels, qk_channels=qk_channels, impl="naive")
        elif self.recurrence > 0:
            self.context = CrissCrossAttention(channels, qk_channels=qk_channels, backend=backend)
        else:
            self.context = None
        if self.context is not None:
            with torch.no_grad():
                self.context.gamma.fill_(gamma_init)
        self.convb = _conv_bn_relu(channels, channels)
        self.bottleneck = _conv_bn_relu(2 * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/2, W/2): the input of the context module."""
        return self.conva(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SyntheticSegmenter expects (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[2] % 2 or images.shape[3] % 2:
            raise ValueError(f"image height and width must be even, got {tuple(images.shape[2:])}")
        backbone = self.backbone(images)
        context = self.conva(backbone)
        if self.variant == "nonlocal":
            context = self.context(context)
        else:
            for _ in range(self.recurrence):
                context = self.context(context)
        context = self.convb(context)
        fused = self.bottleneck(torch.cat([backbone, context], dim=1))
        logits = self.classifier(self.dropout(fused))
        # Nearest, not bilinear: labels are constant on 2x2 cells, and bilinear would widen the receptive
        # field by one cell.
        return F.interpolate(logits, scale_factor=2, mode="nearest")


def receptive_radius_cells() -> tuple[int, int]:
    """(before attention, after attention) receptive radius of `SyntheticSegmenter` in task cells.

    Before: the stride-2 backbone reaches 1 cell, conva one more. After: convb and bottleneck one each.
    Their sum must not exceed `MarkerTask.min_gap_cells` for R=1 to be blind to the marker.
    """
    return 2, 2
