"""Training and evaluation transforms for segmentation (NumPy + PIL; torchvision is not available).

Images enter as uint8 arrays (H, W, 3) in RGB order and labels as uint8 arrays (H, W) of train ids with
`ignore_index` for pixels that are not evaluated. Both transforms return a float32 image tensor (3, H, W),
normalised as the source normalised it (RGB or BGR channel order, its mean and std), and an int64 label
tensor (H, W).

Randomness comes only from the `np.random.Generator` passed in, so a sample is a pure function of
(index, seed): that is what makes a resumed run see exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _resize(image: np.ndarray, label: np.ndarray | None, *, size_hw: tuple[int, int]):
    """Bilinear resize of the image, nearest of the label (labels are ids, never interpolated)."""
    height, width = size_hw
    if image.shape[:2] == (height, width):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


def keep_ratio_size(height: int, width: int, *, scale: tuple[int, int]) -> tuple[int, int]:
    """Size after mmsegmentation's keep-ratio rescale to `scale` = (long side, short side) bounds."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def normalise(
    image: np.ndarray, *, mean: tuple[float, ...], std: tuple[float, ...], channel_order: str
) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float32 (3, H, W): channel order of the source, minus mean, over std."""
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    array = image.astype(np.float32)
    if channel_order == "bgr":
        array = array[:, :, ::-1]
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def photometric_distortion(image: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion on (H, W, 3) uint8 RGB, each step with probability 1/2:
    brightness +-32, contrast x[0.5, 1.5] (before or after the HSV steps, at random), saturation
    x[0.5, 1.5], hue +-18 on OpenCV's 0..180 scale. Values are clipped to [0, 255] after each step."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    def clip(array: np.ndarray) -> np.ndarray:
        return np.clip(array, 0, 255).astype(np.uint8)

    def contrast(array: np.ndarray) -> np.ndarray:
        return clip(array.astype(np.float32) * rng.uniform(0.5, 1.5)) if rng.integers(2) else array

    if rng.integers(2):
        image = clip(image.astype(np.float32) + rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    saturate, shift_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if saturate or shift_hue:
        hsv = rgb_to_hsv(image.astype(np.float32) / 255.0)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0.0, 1.0)
        if shift_hue:
            hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-18, 19)) / 180.0) % 1.0
        image = clip(np.round(hsv_to_rgb(hsv) * 255.0))
    if not contrast_first:
        image = contrast(image)
    return image


class TrainTransform:
    """Random rescale, pad (image 0 after normalisation, label `ignore_index`), random crop, random flip.

    Scale: the image is first rescaled keep-ratio to `base_size` (long, short) when given, then by a ratio
    drawn uniformly from `scale_range`, or from {low, low + step, ..., high} when `scale_step` is set.
    Crop: re-drawn up to 10 times while a single class covers more than `cat_max_ratio` of the labelled
    pixels of the crop (1.0 switches this off), as mmsegmentation's RandomCrop does.
    `photometric`: mmsegmentation's PhotoMetricDistortion (`photometric_distortion`) on the rescaled image;
    these are whole-image colour changes, so applying them before the crop draws the same distribution.
    """

    def __init__(
        self,
        *,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        channel_order: str,
        base_size: tuple[int, int] | None = None,
        scale_step: float | None = None,
        cat_max_ratio: float = 1.0,
        flip: bool = True,
        photometric: bool = False,
        ignore_index: int = 255,
    ) -> None:
        if min(crop_size) < 1:
            raise ValueError(f"crop_size must be positive (h, w), got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.mean, self.std, self.channel_order = mean, std, channel_order
        self.base_size = base_size
        self.scale_step = scale_step
        self.cat_max_ratio = cat_max_ratio
        self.flip = flip
        self.photometric = photometric
        self.ignore_index = ignore_index

    def _ratio(self, rng: np.random.Generator) -> float:
        low, high = self.scale_range
        if self.scale_step is None:
            return float(rng.uniform(low, high))
        steps = int(round((high - low) / self.scale_step))
        return low + self.scale_step * int(rng.integers(0, steps + 1))

    def _crop_origin(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        crop_h, crop_w = self.crop_size
        height, width = label.shape
        for _ in range(10):
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            if self.cat_max_ratio >= 1.0:
                break
            window = label[top : top + crop_h, left : left + crop_w]
            _, counts = np.unique(window[window != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(
        self, image: np.ndarray, label: np.ndarray, *, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 RGB, (H, W) uint8 -> (3, crop_h, crop_w) float32, (crop_h, crop_w) int64."""
        height, width = label.shape
        if self.base_size is not None:
            height, width = keep_ratio_size(height, width, scale=self.base_size)
        ratio = self._ratio(rng)
        size = (max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5)))
        image, label = _resize(image, label, size_hw=size)
        if self.photometric:
            image = photometric_distortion(image, rng=rng)
        tensor = normalise(image, mean=self.mean, std=self.std, channel_order=self.channel_order)
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(crop_h - size[0], 0), max(crop_w - size[1], 0)
        if pad_h or pad_w:
            tensor = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        top, left = self._crop_origin(label, rng)
        tensor = tensor[:, top : top + crop_h, left : left + crop_w]
        label = label[top : top + crop_h, left : left + crop_w]
        if self.flip and rng.random() < 0.5:
            tensor = tensor.flip(-1)
            label = label[:, ::-1]
        return tensor.contiguous(), torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class EvalTransform:
    """Normalise (and keep-ratio rescale to `scale` when given); the label keeps its native size."""

    def __init__(
        self,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        channel_order: str,
        scale: tuple[int, int] | None = None,
    ) -> None:
        self.mean, self.std, self.channel_order = mean, std, channel_order
        self.scale = scale

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8, (H, W) uint8 -> (3, H', W') float32, (H, W) int64."""
        if self.scale is not None:
            size = keep_ratio_size(*label.shape, scale=self.scale)
            image, _ = _resize(image, None, size_hw=size)
        tensor = normalise(image, mean=self.mean, std=self.std, channel_order=self.channel_order)
        return tensor, torch.from_numpy(label.astype(np.int64))
