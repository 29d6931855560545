"""Test-time inference modes: whole image, sliding window, multi-scale + flip.

What each returns:
* `predict_whole`: logits (B, num_classes, H, W).
* `predict_slide`: logits averaged over the overlapping windows (official CCNet and mmsegmentation both
  average window logits), (B, num_classes, H, W).
* `predict_multiscale`: by default the mean of softmax probabilities over scales and flips (mmsegmentation's
  aug_test); `average="logits"` averages logits instead (the official code sums logits; the argmax is the
  same as their mean).
All run the model in eval mode under no_grad and restore its previous mode.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("whole", "slide")
AVERAGES = ("probs", "logits")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point (B, C, H, W) tensor, got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def predict_whole(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits (B, num_classes, H, W) from one forward pass over the whole image."""
    _check_images(images)
    with _eval_mode(model):
        return _forward(model, images)


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    if tuple(logits.shape[-2:]) != tuple(images.shape[-2:]):
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every `stride`, the last one moved back to end at the
    border; one window of size min(crop, length) when the image is smaller than the crop (no padding)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(index * stride, length - crop), 0) for index in range(count)})


def predict_slide(
    model: nn.Module,
    images: torch.Tensor,
    *,
    crop: int | tuple[int, int] = (769, 769),
    stride: int | tuple[int, int] = (513, 513),
    num_classes: int,
) -> torch.Tensor:
    """Sliding-window logits (B, num_classes, H, W): crops of `crop` every `stride` (the official recipe is
    769 crops with stride 513), each window's logits added into place and divided by the window count."""
    _check_images(images)
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            f"stride {(stride_h, stride_w)} larger than crop {(crop_h, crop_w)} would leave gaps"
        )
    batch, _, height, width = images.shape
    out = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    with _eval_mode(model):
        for top in window_starts(height, crop_h, stride_h):
            for left in window_starts(width, crop_w, stride_w):
                bottom, right = min(top + crop_h, height), min(left + crop_w, width)
                logits = _forward(model, images[:, :, top:bottom, left:right])
                if logits.shape[1] != num_classes:
                    raise ValueError(
                        f"num_classes={num_classes} but the model returned {logits.shape[1]} channels"
                    )
                out[:, :, top:bottom, left:right] += logits
                count[:, :, top:bottom, left:right] += 1
    return out / count


def predict_multiscale(
    model: nn.Module,
    images: torch.Tensor,
    *,
    scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 1.75),
    flip: bool = True,
    mode: str = "whole",
    crop: int | tuple[int, int] = (769, 769),
    stride: int | tuple[int, int] = (513, 513),
    num_classes: int | None = None,
    average: str = "probs",
) -> torch.Tensor:
    """Multi-scale (+ horizontal flip) prediction, (B, num_classes, H, W) at the input size.

    Each scale resizes the image by `scale` (bilinear, align_corners=False, sizes rounded), predicts with
    `mode` ("whole", or "slide" with crop/stride/num_classes), resizes the logits back to (H, W); with `flip`
    the mirrored image is predicted too and its output mirrored back. Returns the mean of softmax
    probabilities (`average="probs"`) or of logits (`average="logits"`).
    """
    _check_images(images)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; expected one of {AVERAGES}")
    if not scales or any(not isinstance(s, int | float) or s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    if mode == "slide" and num_classes is None:
        raise ValueError("mode='slide' needs num_classes")
    height, width = images.shape[-2:]

    def predict(batch: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return predict_whole(model, batch)
        return predict_slide(model, batch, crop=crop, stride=stride, num_classes=num_classes)

    total = None
    views = 0
    for scale in scales:
        size = (max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1))
        scaled = (
            images
            if size == (height, width)
            else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        )
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            logits = predict(view)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            value = torch.softmax(logits, dim=1) if average == "probs" else logits
            total = value if total is None else total + value
            views += 1
    return total / views
