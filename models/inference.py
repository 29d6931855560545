"""Test-time inference modes: whole image, sliding window, multi-scale + flip.

What each returns:
* `predict_whole`: logits (B, num_classes, H, W) at the input size, or at `size` in one interpolation from
  the decoder's output (sssegmentation's single resize) when the model offers `logits_at`.
* `predict_slide`: logits averaged over the overlapping windows (official CCNet, mmsegmentation and
  sssegmentation all average window logits), (B, num_classes, H, W). `pad="zero"` pads a window smaller than
  the crop bottom-right with zeros to the crop size and crops its prediction back (official evaluate.py
  pad_image); `pad="none"` feeds the smaller window as it is (mmseg, sssegmentation).
* `predict_multiscale`: the mean over scales and flips of softmax probabilities (`average="probs"`, mmseg) or
  of logits (`average="logits"`: official code, PaddleSeg, sssegmentation), each view resized to `size`.
All run the model in eval mode under no_grad and restore its previous mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("whole", "slide")
AVERAGES = ("probs", "logits")
SLIDE_PADS = ("none", "zero")
# How predict_multiscale resizes the input tensor itself (when no `make_view` builds the views):
# "ratio": sizes int(x * r + 0.5), bilinear with half-pixel centres (PaddleSeg aug_inference);
# "zoom": sizes round(x * r), bilinear aligning corners (scipy ndimage.zoom(order=1, prefilter=False));
# "scale_factor": F.interpolate(scale_factor=r) with `align_corners`, sizes floor(x * r) (sssegmentation).
TENSOR_RESIZES = ("ratio", "zoom", "scale_factor")


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


def resize_logits(logits: torch.Tensor, size: tuple[int, int], *, align_corners: bool) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) logits to `size` (no-op at that size already)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def predict_whole(
    model: nn.Module,
    images: torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Logits (B, num_classes, H, W) from one forward pass over the whole image, at the input size, or at
    `size` when given: straight from the decoder's output in one interpolation when the model offers
    `logits_at(images, size)` (models.ccnet.CCNet), else the input-size logits resized with `align_corners`."""
    _check_images(images)
    with _eval_mode(model):
        return _forward(model, images, size=size, align_corners=align_corners)


def _forward(
    model: nn.Module, images: torch.Tensor, *, size: tuple[int, int] | None = None, align_corners: bool = False
) -> torch.Tensor:
    target = tuple(images.shape[-2:]) if size is None else tuple(size)
    if size is not None and hasattr(model, "logits_at"):
        return model.logits_at(images, target)
    logits = model(images)
    # A model returning another size (e.g. the decoder's stride) is brought to the target here.
    return resize_logits(logits, target, align_corners=align_corners)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every `stride`, the last one moved back to end at the
    border (mmseg / sssegmentation slide_inference, official predict_sliding); one window at 0 when the image
    is smaller than the crop."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(index * stride, length - crop), 0) for index in range(count)})


def predict_slide(
    model: nn.Module,
    images: torch.Tensor,
    *,
    crop: int | tuple[int, int] = (769, 769),
    stride: int | tuple[int, int] = (513, 513),
    num_classes: int,
    pad: str = "none",
) -> torch.Tensor:
    """Sliding-window logits (B, num_classes, H, W): crops of `crop` every `stride` (the official recipe is
    769 crops with stride 513), each window's logits added into place and divided by the window count.

    A window is [start, min(start + crop, size)); where that is smaller than the crop (an image smaller than
    the crop), `pad="none"` predicts it as it is and `pad="zero"` zero-pads it bottom-right to the crop,
    predicts the full crop and keeps the top-left part of its logits."""
    _check_images(images)
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    if pad not in SLIDE_PADS:
        raise ValueError(f"unknown pad {pad!r}; expected one of {SLIDE_PADS}")
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
                window = images[:, :, top:bottom, left:right]
                if pad == "zero" and (bottom - top, right - left) != (crop_h, crop_w):
                    padded = F.pad(window, (0, crop_w - (right - left), 0, crop_h - (bottom - top)))
                    logits = _forward(model, padded)[:, :, : bottom - top, : right - left]
                else:
                    logits = _forward(model, window)
                if logits.shape[1] != num_classes:
                    raise ValueError(
                        f"num_classes={num_classes} but the model returned {logits.shape[1]} channels"
                    )
                out[:, :, top:bottom, left:right] += logits
                count[:, :, top:bottom, left:right] += 1
    return out / count


def scaled_size(height: int, width: int, scale: float, resize: str) -> tuple[int, int]:
    """The (height, width) a view of scale `scale` has under the tensor resize rule `resize`."""
    if resize == "ratio":
        return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)
    if resize == "zoom":
        return max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)
    if resize == "scale_factor":
        # F.interpolate(scale_factor=s) gives floor(size * s).
        return max(int(height * scale), 1), max(int(width * scale), 1)
    raise ValueError(f"unknown resize {resize!r}; expected one of {TENSOR_RESIZES}")


def resize_view(images: torch.Tensor, scale: float, resize: str, *, align_corners: bool = False) -> torch.Tensor:
    """The input resized for one scale as `resize` says (see TENSOR_RESIZES); the input itself at its size."""
    height, width = images.shape[-2:]
    size = scaled_size(height, width, scale, resize)
    if resize == "scale_factor":
        if scale == 1.0:
            return images
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=align_corners)
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=resize == "zoom")


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
    slide_pad: str = "none",
    resize: str = "ratio",
    make_view: Callable[[float], torch.Tensor] | None = None,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
    decoder_to_size: bool = False,
) -> torch.Tensor:
    """Multi-scale (+ horizontal flip) prediction, (B, num_classes, *size) (default: the input size).

    Each scale's view is `make_view(scale)` when given (e.g. the original image resized with OpenCV, as the
    sources' data pipelines do), else the input resized as `resize` says. It is predicted with `mode`
    ("whole", or "slide" with crop/stride/num_classes/slide_pad); with `flip` the mirrored view is predicted
    too and its output mirrored back. Each view's logits are resized to `size` with `align_corners`
    (`decoder_to_size`: in whole mode straight from the decoder's output, one interpolation) and averaged as
    softmax probabilities (`average="probs"`) or logits (`average="logits"`).
    """
    _check_images(images)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; expected one of {AVERAGES}")
    if resize not in TENSOR_RESIZES:
        raise ValueError(f"unknown resize {resize!r}; expected one of {TENSOR_RESIZES}")
    if not scales or any(not isinstance(s, int | float) or s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    if mode == "slide" and num_classes is None:
        raise ValueError("mode='slide' needs num_classes")
    target = tuple(images.shape[-2:]) if size is None else tuple(size)

    def predict(view: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            if decoder_to_size:
                return predict_whole(model, view, size=target, align_corners=align_corners)
            logits = predict_whole(model, view)
        else:
            logits = predict_slide(model, view, crop=crop, stride=stride, num_classes=num_classes, pad=slide_pad)
        return resize_logits(logits, target, align_corners=align_corners)

    total = None
    views = 0
    for scale in scales:
        scaled = make_view(scale) if make_view is not None else resize_view(
            images, scale, resize, align_corners=align_corners)
        _check_images(scaled)
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            logits = predict(view)
            if flipped:
                logits = logits.flip(-1)
            value = torch.softmax(logits, dim=1) if average == "probs" else logits
            total = value if total is None else total + value
            views += 1
    return total / views
