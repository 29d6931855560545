"""Segmentation heads: the paper's RCCA head, the same head with a non-local block, and the FCN head (also
the auxiliary head on layer3).

RCCA head (CCNet paper, Fig. 2):
    x (B, Cin, h, w) -> conv_in: 3x3 Cin->C + norm + act -> attention applied `recurrence` times with shared
    weights -> conv_out: 3x3 C->C + norm + act -> concat [x, context] (input first, as the official code,
    mmsegmentation and sssegmentation all do) -> bottleneck: 3x3 (Cin+C)->C + norm + act -> dropout ->
    classifier: 1x1 C->num_classes.
`recurrence=0` builds no attention module at all: the no-context baseline of the paper's ablation.

Module names (`conv_in`, `attention`, `conv_out`, `bottleneck`, `dropout`, `classifier`) are ours; the table
in `models.checkpoints` maps the released layouts onto them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ops import CrissCrossAttention, NonLocal2d
from ops.non_local import non_local_attention

ACTIVATIONS = ("relu", "leaky_relu")


def _activation(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leaky_relu":
        # InPlaceABNSync's default (slope 0.01): what the official CCNet head used after its norms.
        return nn.LeakyReLU(0.01, inplace=True)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int = 3,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    act: str = "relu",
) -> nn.Sequential:
    """Sequential(conv (no bias), norm, activation): keys `0.weight`, `1.weight`, `1.bias`, `1.running_*`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        norm_layer(out_channels),
        _activation(act),
    )


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
    # Small logits at start (mmsegmentation's init) so the first losses sit near log(num_classes).
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier


def _check_channels(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class _AttentionHead(nn.Module):
    """Shared body of the RCCA and non-local heads; subclasses set `self.attention` and `_context`."""

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int,
        num_classes: int,
        dropout: float,
        norm_layer: Callable[[int], nn.Module],
        act: str,
    ) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, channels=channels, num_classes=num_classes)
        _check_dropout(dropout)
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.conv_in = conv_norm_act(in_channels, channels, norm_layer=norm_layer, act=act)
        self.attention: nn.Module | None = None
        self.conv_out = conv_norm_act(channels, channels, norm_layer=norm_layer, act=act)
        self.bottleneck = conv_norm_act(in_channels + channels, channels, norm_layer=norm_layer, act=act)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def _context(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_gamma(self, value: float) -> None:
        """Set the attention block's residual scale (0 at init, as in the paper)."""
        if self.attention is None:
            raise ValueError("this head has no attention module (recurrence=0); there is no gamma to set")
        with torch.no_grad():
            self.attention.gamma.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, h, w)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, h, w), got {tuple(x.shape)}"
            )
        context = self.conv_out(self._context(self.conv_in(x)))
        out = self.bottleneck(torch.cat([x, context], dim=1))
        return self.classifier(self.dropout(out))


class RCCAHead(_AttentionHead):
    """The recurrent criss-cross attention head.

    Args:
        in_channels: channels of the backbone feature (2048 for ResNet-50/101).
        channels: width of the head (512 in the paper).
        num_classes: output classes.
        recurrence: how many times the one (shared-weight) criss-cross block is applied; 0 = no context.
        qk_channels: query/key width (default channels // 8).
        backend: criss-cross backend ("auto", "naive", "triton").
        dropout: Dropout2d rate before the classifier.
        norm_layer: channels -> norm module.
        act: "relu" or "leaky_relu" (the official code's InPlaceABNSync activation).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int = 512,
        num_classes: int,
        recurrence: int = 2,
        qk_channels: int | None = None,
        backend: str = "auto",
        dropout: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act: str = "relu",
    ) -> None:
        super().__init__(
            in_channels,
            channels=channels,
            num_classes=num_classes,
            dropout=dropout,
            norm_layer=norm_layer,
            act=act,
        )
        if not isinstance(recurrence, int) or isinstance(recurrence, bool) or recurrence < 0:
            raise ValueError(f"recurrence must be an int >= 0, got {recurrence!r}")
        self.recurrence = recurrence
        if recurrence > 0:
            self.attention = CrissCrossAttention(channels, qk_channels=qk_channels, backend=backend)

    def _context(self, features: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            features = self.attention(features)
        return features

    def extra_repr(self) -> str:
        return f"recurrence={self.recurrence}"


NONLOCAL_BLOCKS = ("paper", "mmseg")


class EmbeddedGaussianNonLocal(nn.Module):
    """mmsegmentation's NLHead block (mmcv `NonLocal2d`, mode "embedded_gaussian", use_scale=True, as its docs
    state): theta, phi, g = 1x1 convs with bias C -> Ci, attention softmax(theta . phi / sqrt(Ci)) over all H*W
    pixels applied to g, then conv_out = 1x1 conv Ci -> C (no bias) + norm, added to the input. The norm's
    weight starts at 0 (mmcv's zeros_init), so the block starts as the identity, like the paper block's gamma.

    State keys: `theta.*`, `phi.*`, `g.*`, `conv_out.0.weight`, `conv_out.1.*` (mmseg: `nl_block.theta.conv.*`,
    ..., `nl_block.conv_out.conv.weight`, `nl_block.conv_out.bn.*`).
    """

    def __init__(self, in_channels: int, *, inter_channels: int, impl: str = "naive",
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, inter_channels=inter_channels)
        self.in_channels, self.inter_channels, self.impl = in_channels, inter_channels, impl
        self.theta = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.g = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.conv_out = nn.Sequential(nn.Conv2d(inter_channels, in_channels, kernel_size=1, bias=False),
                                      norm_layer(in_channels))
        for conv in (self.theta, self.phi, self.g):  # mmcv NonLocal2d.init_weights(std=0.01)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        # 1/sqrt(Ci) applied to theta: the same energies as scaling theta . phi afterwards.
        query = self.theta(x) / self.inter_channels**0.5
        context = non_local_attention(query, self.phi(x), self.g(x), impl=self.impl)
        return x + self.conv_out(context)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, impl={self.impl!r}"


class NonLocalHead(_AttentionHead):
    """The RCCA head with one non-local block in place of the criss-cross loop: `block` "paper" is
    `ops.NonLocal2d` (the paper's baseline: the criss-cross block's q/k/v and gamma), "mmseg" is mmsegmentation's
    NLHead block (`EmbeddedGaussianNonLocal`, qk_channels = its inter channels, channels // 2 in NLHead).

    Args: as `RCCAHead`, with `impl` ("naive" materialises the HW x HW map, "sdpa") instead of recurrence and
    backend.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int = 512,
        num_classes: int,
        qk_channels: int | None = None,
        impl: str = "naive",
        dropout: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act: str = "relu",
        block: str = "paper",
    ) -> None:
        super().__init__(
            in_channels,
            channels=channels,
            num_classes=num_classes,
            dropout=dropout,
            norm_layer=norm_layer,
            act=act,
        )
        if block not in NONLOCAL_BLOCKS:
            raise ValueError(f"unknown non-local block {block!r}; expected one of {NONLOCAL_BLOCKS}")
        if block == "paper":
            self.attention = NonLocal2d(channels, qk_channels=qk_channels, impl=impl)
        else:
            inter = channels // 2 if qk_channels is None else qk_channels
            self.attention = EmbeddedGaussianNonLocal(channels, inter_channels=inter, impl=impl, norm_layer=norm_layer)

    def _context(self, features: torch.Tensor) -> torch.Tensor:
        return self.attention(features)


class FCNHead(nn.Module):
    """FCN head: `num_convs` 3x3 conv+norm+act, optional concat with the input and a 3x3 fusion conv, dropout,
    1x1 classifier. The auxiliary head on layer3 is FCNHead(1024, channels=256, num_convs=1).

    Args:
        in_channels, channels, num_classes: widths.
        num_convs: >= 1 conv blocks (keys `convs.{i}.0`, `convs.{i}.1`).
        concat_input: concatenate [x, convs(x)] and fuse with `conv_cat` (mmsegmentation's FCN decode head).
        dropout, norm_layer, act: as in `RCCAHead`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int,
        num_classes: int,
        num_convs: int = 1,
        concat_input: bool = False,
        dropout: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act: str = "relu",
    ) -> None:
        super().__init__()
        _check_channels(
            in_channels=in_channels, channels=channels, num_classes=num_classes, num_convs=num_convs
        )
        _check_dropout(dropout)
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(
            *(
                conv_norm_act(a, b, norm_layer=norm_layer, act=act)
                for a, b in zip(widths, widths[1:], strict=False)
            )
        )
        self.conv_cat = (
            conv_norm_act(in_channels + channels, channels, norm_layer=norm_layer, act=act)
            if concat_input
            else None
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, h, w)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FCNHead expects (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classifier(self.dropout(out))
