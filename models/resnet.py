"""Dilated ResNet-50/101 backbones for segmentation (our own code; torchvision is not used).

Stems, as the released CCNet models used them:
* "v1":   one 7x7 stride-2 conv 3->64 (torchvision / original ResNet).
* "v1c":  three 3x3 convs 3->32->32->64, the first with stride 2 (mmsegmentation's ResNetV1c, also
          sssegmentation's "conv3x3 stem").
* "deep": three 3x3 convs 3->64->64->128 (the official CCNet repository's MIT ImageNet weights); layer1
          then takes 128 input channels.

Output stride is the user-facing knob; the strides and dilations of layer1..layer4 follow from it:
OS 8 -> strides (1, 2, 1, 1), dilations (1, 1, 2, 4); OS 16 -> (1, 2, 2, 1), (1, 1, 1, 2); OS 32 -> no
dilation.
`contract_dilation=True` halves the dilation of the first block of a dilated layer (mmsegmentation and
sssegmentation do this; the official CCNet code does not).

Module names (`stem.0`, `stem.1`, ..., `layer3.5.conv2`, `layer1.0.downsample.1`) follow mmsegmentation's
ResNetV1c so that its checkpoints map one to one (see `models.checkpoints`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

STEMS = ("v1", "v1c", "deep")
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NORMS = ("bn", "syncbn", "frozenbn")
OUTPUT_STRIDES = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}
EXPANSION = 4


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all buffers, never updated).

    State-dict keys: weight, bias, running_mean, running_var (a `num_batches_tracked` in a checkpoint is
    accepted and dropped).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    """The norm-layer constructor (channels -> module) for "bn", "syncbn" or "frozenbn"."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "syncbn":
        return nn.SyncBatchNorm
    if norm == "frozenbn":
        return FrozenBatchNorm2d
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def strides_and_dilations(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and dilations of layer1..layer4 for an output stride of 8, 16 or 32."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"unknown output_stride {output_stride!r}; expected one of {tuple(OUTPUT_STRIDES)}")
    return OUTPUT_STRIDES[output_stride]


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1, 3x3 (with the stride and dilation: "pytorch" style), 1x1 to 4x planes."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place: one map fewer to allocate (and page in) per block
        return self.relu(out)


def _stem(stem: str, norm_layer: Callable[[int], nn.Module]) -> tuple[nn.Sequential, int]:
    if stem == "v1":
        layers = [nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False), norm_layer(64)]
        return nn.Sequential(*layers, nn.ReLU(inplace=True)), 64
    if stem not in ("v1c", "deep"):
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
    mid, out = (32, 64) if stem == "v1c" else (64, 128)
    return (
        nn.Sequential(
            nn.Conv2d(3, mid, kernel_size=3, stride=2, padding=1, bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out, kernel_size=3, padding=1, bias=False),
            norm_layer(out),
            nn.ReLU(inplace=True),
        ),
        out,
    )


class ResNet(nn.Module):
    """Dilated ResNet backbone.

    Args:
        depth: 50 or 101.
        stem: "v1", "v1c" or "deep" (see the module docstring).
        output_stride: 8, 16 or 32: the stride of layer4's output relative to the input.
        norm: "bn", "syncbn" or "frozenbn".
        contract_dilation: halve the first block's dilation in dilated layers (mmsegmentation).
        pool_ceil_mode: ceil_mode of the stem max-pool (the official CCNet code uses True, which changes the
            feature size for even inputs).

    forward(images (B, 3, H, W)) returns the outputs of layer1..layer4:
    (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 1024, H/OS3, W/OS3), (B, 2048, H/OS, W/OS) (sizes rounded up).
    """

    def __init__(
        self,
        *,
        depth: int = 101,
        stem: str = "deep",
        output_stride: int = 8,
        norm: str = "bn",
        contract_dilation: bool = True,
        pool_ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unknown depth {depth!r}; expected one of {tuple(DEPTHS)}")
        norm_layer = norm_layer_for(norm)
        strides, dilations = strides_and_dilations(output_stride)
        self.depth = depth
        self.stem_type = stem
        self.output_stride = output_stride
        self.norm = norm
        self.stem, in_channels = _stem(stem, norm_layer)
        self.stem_channels = in_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=pool_ceil_mode)
        self.out_channels = tuple(64 * 2**i * EXPANSION for i in range(4))
        for index, (blocks, stride, dilation) in enumerate(
            zip(DEPTHS[depth], strides, dilations, strict=True)
        ):
            planes = 64 * 2**index
            first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
            layer = [
                Bottleneck(in_channels, planes, stride=stride, dilation=first_dilation, norm_layer=norm_layer)
            ]
            in_channels = planes * EXPANSION
            layer += [
                Bottleneck(in_channels, planes, dilation=dilation, norm_layer=norm_layer)
                for _ in range(1, blocks)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ResNet expects images (B, 3, H, W), got {tuple(images.shape)}")
        x = self.maxpool(self.stem(images))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, stem={self.stem_type!r}, output_stride={self.output_stride}, "
            f"norm={self.norm!r}"
        )
