"""The segmentor: ResNet backbone + decode head on layer4 + optional auxiliary FCN head on layer3, and
`build()`, the one place where keyword arguments become a model."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import FCNHead, NonLocalHead, RCCAHead
from models.resnet import NORMS, ResNet, norm_layer_for

HEADS = ("rcca", "nonlocal", "fcn")


class CCNet(nn.Module):
    """Backbone + decode head (+ auxiliary head).

    forward(images (B, 3, H, W)):
        eval mode: logits (B, num_classes, H, W).
        train mode: (logits, aux_logits), both (B, num_classes, H, W); aux_logits is None without an
        auxiliary head.
    Logits are upsampled to the input size with bilinear interpolation (`align_corners`, default False as
    mmsegmentation; the official code used True).

    channels_last: keep the weights and the images in channels-last (NHWC) memory, so every feature map is
    channels-last: what GPU tensor-core convolutions prefer, and the query / key / value maps reach the fused
    Triton criss-cross kernel as contiguous channel vectors (NCHW works, but its column pass then reads one
    element per 32-byte sector). The numbers are those of the NCHW model up to the convolutions' rounding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None = None,
        *,
        align_corners: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.align_corners = align_corners
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _resize(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def logits_at(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Eval-mode decoder logits resized once, straight to `size` (sssegmentation's test resizes the
        stride-8 logits to the original image size in one interpolation)."""
        if images.dim() != 4:
            raise ValueError(f"CCNet expects images (B, 3, H, W), got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._resize(self.decode_head(self.backbone(images)[-1]), tuple(size))

    def forward(self, images: torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"CCNet expects images (B, 3, H, W), got {tuple(images.shape)}")
        size = (images.shape[-2], images.shape[-1])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        logits = self._resize(self.decode_head(features[-1]), size)
        if not self.training:
            return logits
        aux_logits = None
        if self.auxiliary_head is not None:
            aux_logits = self._resize(self.auxiliary_head(features[-2]), size)
        return logits, aux_logits


def build(
    *,
    depth: int = 101,
    stem: str = "deep",
    output_stride: int = 8,
    head: str = "rcca",
    recurrence: int = 2,
    num_classes: int = 19,
    norm: str = "bn",
    backend: str = "auto",
    aux: bool = True,
    pretrained_backbone: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    qk_channels: int | None = None,
    head_channels: int = 512,
    dropout: float = 0.1,
    contract_dilation: bool = True,
    nonlocal_impl: str = "naive",
    nonlocal_block: str = "paper",
    aux_channels: int = 256,
    head_act: str = "relu",
    pool_ceil_mode: bool = False,
    align_corners: bool = False,
    pretrained_source: str | None = None,
    channels_last: bool = False,
) -> CCNet:
    """Build a CCNet.

    Args:
        depth, stem, output_stride, contract_dilation, pool_ceil_mode: the backbone (`models.resnet.ResNet`).
        head: "rcca" (criss-cross, `recurrence` loops; 0 = no context), "nonlocal" (one non-local block,
            `nonlocal_impl`; `nonlocal_block` "paper" or "mmseg": see `models.heads.NonLocalHead`) or "fcn"
            (mmsegmentation's FCN decode head: two 3x3 convs, concat with the input, fusion conv; `recurrence` is
            ignored).
        num_classes: output classes.
        norm: "bn", "syncbn" or "frozenbn". "frozenbn" freezes the backbone's norms only; the heads, trained
            from scratch, keep BatchNorm.
        backend: criss-cross backend ("auto", "naive", "triton").
        aux: add the auxiliary FCN head on layer3 (1024 -> aux_channels -> classes; mmsegmentation uses 256,
            the official code and sssegmentation 512).
        pretrained_backbone: an ImageNet checkpoint (path or state dict) loaded into the backbone with
            `models.load_checkpoint(..., source=pretrained_source)` (source detected when None).
        qk_channels, head_channels, dropout, head_act: the head (see `models.heads.RCCAHead`).
        align_corners: of the final upsampling.
        channels_last: run the network in channels-last memory (see `CCNet`).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if not isinstance(aux_channels, int) or aux_channels < 1:
        raise ValueError(f"aux_channels must be a positive int, got {aux_channels!r}")
    backbone = ResNet(
        depth=depth,
        stem=stem,
        output_stride=output_stride,
        norm=norm,
        contract_dilation=contract_dilation,
        pool_ceil_mode=pool_ceil_mode,
    )
    head_norm = norm_layer_for("bn" if norm == "frozenbn" else norm)
    in_channels = backbone.out_channels[-1]
    common = dict(
        channels=head_channels, num_classes=num_classes, dropout=dropout, norm_layer=head_norm, act=head_act
    )
    if head == "rcca":
        decode_head = RCCAHead(
            in_channels, recurrence=recurrence, qk_channels=qk_channels, backend=backend, **common
        )
    elif head == "nonlocal":
        decode_head = NonLocalHead(
            in_channels, qk_channels=qk_channels, impl=nonlocal_impl, block=nonlocal_block, **common
        )
    else:
        decode_head = FCNHead(in_channels, num_convs=2, concat_input=True, **common)
    auxiliary_head = None
    if aux:
        auxiliary_head = FCNHead(
            backbone.out_channels[-2],
            channels=aux_channels,
            num_classes=num_classes,
            num_convs=1,
            dropout=dropout,
            norm_layer=head_norm,
            act=head_act,
        )
    if pretrained_backbone is not None:
        from models.checkpoints import load_checkpoint

        load_checkpoint(backbone, pretrained_backbone, source=pretrained_source, strict=True)
    # Channels-last after loading: the checkpoint's weights are copied into the NCHW parameters first.
    return CCNet(backbone, decode_head, auxiliary_head, align_corners=align_corners, channels_last=channels_last)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN statistics are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
