"""Training and evaluation transforms for segmentation (NumPy + OpenCV, as every source's own pipeline).

Images enter as uint8 arrays (H, W, 3) in RGB order and labels as uint8 arrays (H, W) of train ids with
`ignore_index` for pixels that are not evaluated. Both transforms return a float32 image tensor (3, H, W),
normalised as the source normalised it (RGB or BGR channel order, its mean and std), and an int64 label
tensor (H, W).

Resizing is OpenCV's `cv2.resize` (bilinear for images, nearest for labels) called the way each source calls
it, so the pixels match bit for bit: the official code scales by a factor (`fx=fy=ratio`, sizes rounded by
OpenCV), mmcv / mmsegmentation and sssegmentation resize to an explicit size computed with `int(x + 0.5)`.
PIL's bilinear filter (which antialiases when shrinking) is not used anywhere.

Randomness comes only from the `np.random.Generator` passed in, so a sample is a pure function of
(index, seed): that is what makes a resumed run see exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

RESCALES = ("factor", "keep_ratio_bounds")
PHOTOMETRIC = ("none", "hsv", "hsv_red_blue_swapped")
PAD_POSITIONS = ("bottom_right", "centre")
PAD_FILLS = ("normalised_zero", "raw_zero")
CROP_FALLBACKS = ("none", "fresh_draw", "last_draw")
# PhotoMetricDistortion defaults of mmsegmentation and sssegmentation (identical).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


def resize_to(array: np.ndarray, size_hw: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """cv2.resize to (height, width): bilinear (INTER_LINEAR) or nearest (labels)."""
    height, width = size_hw
    if array.shape[:2] == (height, width):
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(array, (width, height), interpolation=interpolation)


def resize_by_factor(array: np.ndarray, factor: float, *, nearest: bool = False) -> np.ndarray:
    """cv2.resize(array, None, fx=factor, fy=factor): OpenCV rounds the size and maps coordinates with the
    factor itself (not size / size), as the official CCNet `generate_scale_label` calls it."""
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(array, None, fx=factor, fy=factor, interpolation=interpolation)


def keep_ratio_size(height: int, width: int, *, scale: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after a keep-ratio rescale into `scale` = (long side, short side) bounds: factor
    min(long / max(h, w), short / min(h, w)), sizes int(x * factor + 0.5) (mmcv `rescale_size`,
    sssegmentation `Resize`)."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_bounds(base_size: tuple[int, int], ratio: float) -> tuple[int, int]:
    """The bounds a random ratio gives: (int(base[0] * ratio), int(base[1] * ratio)), truncated, as mmcv
    `RandomResize._random_sample_ratio` and sssegmentation `Resize` compute them."""
    return int(base_size[0] * ratio), int(base_size[1] * ratio)


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


def _convert(array: np.ndarray, *, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """float32 array * alpha + beta, clipped to [0, 255], truncated to uint8 (the sources' `convert`)."""
    return np.clip(array.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, *, rng: np.random.Generator, mode: str = "hsv") -> np.ndarray:
    """PhotoMetricDistortion of mmsegmentation / sssegmentation on an (H, W, 3) uint8 RGB image.

    Brightness (+-32), then contrast (x[0.5, 1.5]) either here or last, saturation (x[0.5, 1.5] on the
    OpenCV uint8 S channel) and hue (+randint(-18, 18), i.e. -18..17, modulo 180 on OpenCV's H channel), each
    with probability 1/2; every step clips and truncates to uint8, and saturation and hue convert to HSV and
    back separately, as the sources do. `mode` "hsv": OpenCV's HSV of the true colours (mmsegmentation
    converts its BGR image with BGR2HSV); "hsv_red_blue_swapped": sssegmentation applies RGB2HSV to its
    BGR image, i.e. BGR2HSV of our RGB array.
    """
    if mode == "hsv":
        to_hsv, from_hsv = cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB
    elif mode == "hsv_red_blue_swapped":
        to_hsv, from_hsv = cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR
    else:
        raise ValueError(f"photometric mode must be 'hsv' or 'hsv_red_blue_swapped', got {mode!r}")

    def contrast(array: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return _convert(array, alpha=rng.uniform(*CONTRAST_RANGE))
        return array

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = int(rng.integers(2)) == 1
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, to_hsv)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*SATURATION_RANGE))
        image = cv2.cvtColor(hsv, from_hsv)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, to_hsv)
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-HUE_DELTA, HUE_DELTA))) % 180
        image = cv2.cvtColor(hsv, from_hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def pad_offsets(size: int, target: int, position: str) -> tuple[int, int]:
    """(before, after) padding of one dimension from `size` to `target`."""
    total = max(target - size, 0)
    if position == "bottom_right":
        return 0, total
    if position == "centre":
        return total // 2, total - total // 2
    raise ValueError(f"pad position must be one of {PAD_POSITIONS}, got {position!r}")


def normalised_value(raw: float, *, mean, std) -> tuple[float, ...]:
    """The normalised per-channel value of a raw grey pixel `raw` ((raw - mean) / std in float32, as
    `normalise` computes it; a grey pixel is the same in RGB and BGR order)."""
    return tuple(float((np.float32(raw) - np.float32(m)) / np.float32(s)) for m, s in zip(mean, std, strict=True))


def pad_image(tensor: torch.Tensor, pads: tuple[int, int, int, int], *, fill: tuple[float, ...]) -> torch.Tensor:
    """Pad a (C, H, W) tensor by (top, bottom, left, right) with the per-channel values `fill`."""
    top, bottom, left, right = pads
    channels, height, width = tensor.shape
    out = tensor.new_empty(channels, height + top + bottom, width + left + right)
    out[:] = torch.tensor(fill, dtype=tensor.dtype).view(-1, 1, 1)
    out[:, top : top + height, left : left + width] = tensor
    return out


class TrainTransform:
    """Random rescale, random crop, flip, photometric distortion, normalise, pad (see `DataConfig`).

    The crop window is drawn on the rescaled image (offsets in [0, max(size - crop, 0)], re-drawn up to 10
    times while one class covers `cat_max_ratio` or more of the labelled pixels, then `crop_fallback`: mmseg /
    sssegmentation RandomCrop), then the normalised image is padded to `crop_size` as `pad_fill` says (0 after
    normalisation, the mean colour, or a raw black pixel) and the label with `ignore_index`, at `pad_position`.
    For the official code, which pads bottom-right before cropping, this is the same distribution: a dimension
    smaller than the crop is always taken whole at offset 0.
    """

    def __init__(
        self,
        *,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        channel_order: str,
        rescale: str,
        base_size: tuple[int, int] | None,
        scale_step: float | None,
        cat_max_ratio: float,
        photometric: str,
        pad_position: str,
        crop_fallback: str,
        pad_fill: str = "normalised_zero",
        flip: bool = True,
        ignore_index: int = 255,
    ) -> None:
        if pad_fill not in PAD_FILLS:
            raise ValueError(f"pad_fill must be one of {PAD_FILLS}, got {pad_fill!r}")
        if min(crop_size) < 1:
            raise ValueError(f"crop_size must be positive (h, w), got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
        if (rescale == "keep_ratio_bounds") != (base_size is not None):
            raise ValueError(f"base_size is required with rescale 'keep_ratio_bounds' only, got {base_size!r}")
        if photometric not in PHOTOMETRIC:
            raise ValueError(f"photometric must be one of {PHOTOMETRIC}, got {photometric!r}")
        if crop_fallback not in CROP_FALLBACKS:
            raise ValueError(f"crop_fallback must be one of {CROP_FALLBACKS}, got {crop_fallback!r}")
        if (crop_fallback == "none") != (cat_max_ratio >= 1.0):
            raise ValueError(
                f"crop_fallback {crop_fallback!r} does not fit cat_max_ratio {cat_max_ratio}: 'none' exactly when "
                "cat_max_ratio is 1.0"
            )
        if pad_position not in PAD_POSITIONS:
            raise ValueError(f"pad_position must be one of {PAD_POSITIONS}, got {pad_position!r}")
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.mean, self.std, self.channel_order = mean, std, channel_order
        self.rescale = rescale
        self.base_size = base_size
        self.scale_step = scale_step
        self.cat_max_ratio = cat_max_ratio
        self.photometric = photometric
        self.pad_position = pad_position
        self.pad_fill = pad_fill
        self.crop_fallback = crop_fallback
        self.flip = flip
        self.ignore_index = ignore_index

    def _pad_values(self) -> tuple[float, ...]:
        if self.pad_fill == "normalised_zero":
            return (0.0,) * len(self.mean)
        return normalised_value(0.0, mean=self.mean, std=self.std)

    def _ratio(self, rng: np.random.Generator) -> float:
        low, high = self.scale_range
        if self.scale_step is None:
            return float(rng.uniform(low, high))
        steps = int(round((high - low) / self.scale_step))
        # k / (1 / step): for step 0.1 this is k / 10.0, bit for bit the official 0.7 + randint(0, 14) / 10.0.
        return low + int(rng.integers(0, steps + 1)) / (1.0 / self.scale_step)

    def _rescale(self, image: np.ndarray, label: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
        if self.rescale == "factor":
            return resize_by_factor(image, ratio), resize_by_factor(label, ratio, nearest=True)
        size = keep_ratio_size(*label.shape, scale=random_bounds(self.base_size, ratio))
        return resize_to(image, size), resize_to(label, size, nearest=True)

    def _crop_window(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop in `label`'s frame."""
        height, width = label.shape
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))

        top, left = draw()
        if self.cat_max_ratio >= 1.0:
            return top, left, crop_h, crop_w
        for attempt in range(10):
            window = label[top : top + crop_h, left : left + crop_w]
            _, counts = np.unique(window[window != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
            # mmseg draws again after every rejection, the 11th unchecked; sssegmentation keeps the 10th.
            if attempt < 9 or self.crop_fallback == "fresh_draw":
                top, left = draw()
        return top, left, crop_h, crop_w

    def __call__(
        self, image: np.ndarray, label: np.ndarray, *, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 RGB, (H, W) uint8 -> (3, crop_h, crop_w) float32, (crop_h, crop_w) int64."""
        image, label = self._rescale(image, label, self._ratio(rng))
        top, left, crop_h, crop_w = self._crop_window(label, rng)
        image = image[top : top + crop_h, left : left + crop_w]
        label = label[top : top + crop_h, left : left + crop_w]
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image = np.ascontiguousarray(image)
        if self.photometric != "none":
            image = photometric_distortion(image, rng=rng, mode=self.photometric)
        tensor = normalise(image, mean=self.mean, std=self.std, channel_order=self.channel_order)
        (top_pad, bottom_pad), (left_pad, right_pad) = (
            pad_offsets(size, target, self.pad_position)
            for size, target in zip(label.shape, self.crop_size, strict=True)
        )
        if top_pad or bottom_pad or left_pad or right_pad:
            tensor = pad_image(tensor, (top_pad, bottom_pad, left_pad, right_pad), fill=self._pad_values())
            label = np.pad(
                label, ((top_pad, bottom_pad), (left_pad, right_pad)), constant_values=self.ignore_index
            )
        return tensor.contiguous(), torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class EvalTransform:
    """The single-scale network input of a validation image: keep-ratio rescale to `scale` with cv2 bilinear
    when given, normalise, pad bottom-right to `pad_size` (height, width) with the raw value `pad_value` when
    given (PaddleSeg Padding before Normalize); the label keeps its native size. `view` builds the
    multi-scale views the sources build from the original image with OpenCV."""

    def __init__(
        self,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        channel_order: str,
        scale: tuple[int, int] | None = None,
        pad_size: tuple[int, int] | None = None,
        pad_value: float | None = None,
    ) -> None:
        if (pad_size is None) != (pad_value is None):
            raise ValueError(f"pad_size and pad_value go together, got {pad_size!r} and {pad_value!r}")
        self.mean, self.std, self.channel_order = mean, std, channel_order
        self.scale = scale
        self.pad_size = pad_size
        self.pad_value = pad_value

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the input before the padding: the test scale's keep-ratio size, or native."""
        return (height, width) if self.scale is None else keep_ratio_size(height, width, scale=self.scale)

    def normalised(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H, W) float32 in the source's channel order, mean and std."""
        return normalise(image, mean=self.mean, std=self.std, channel_order=self.channel_order)

    def input(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H', W') float32: rescaled, normalised and padded as configured. A side
        already longer than `pad_size` is not padded (PaddleSeg refuses such an image)."""
        image = resize_to(image, self.resized_size(*image.shape[:2]))
        tensor = self.normalised(image)
        if self.pad_size is not None:
            bottom = max(self.pad_size[0] - tensor.shape[1], 0)
            right = max(self.pad_size[1] - tensor.shape[2], 0)
            if bottom or right:
                fill = normalised_value(self.pad_value, mean=self.mean, std=self.std)
                tensor = pad_image(tensor, (0, bottom, 0, right), fill=fill)
        return tensor

    def view(self, image: np.ndarray, ratio: float, base: str) -> torch.Tensor:
        """(3, h, w) normalised view of the original (H, W, 3) uint8 image for one multi-scale ratio, resized
        with OpenCV bilinear: base "scale_bounds" keep-ratio into (int(long * ratio), int(short * ratio)) of
        `scale`, or of (width, height) without one (mmseg 0.x MultiScaleFlipAug), "original_ratio" keep-ratio
        into the bounds (int(w * ratio + 0.5), int(h * ratio + 0.5)) (mmseg 1.x Resize(scale_factor=ratio,
        keep_ratio=True): mmcv 2.1.0 transforms/processing.py Resize.transform sets scale = _scale_size(...), then
        _resize_img calls imrescale(img, scale), which rescales by one factor min(long / long side, short / short
        side) (rescale_size): one side can end 1 px short of int(x * ratio + 0.5), e.g. 83 x 157 at 0.75 ->
        62 x 117)."""
        height, width = image.shape[:2]
        if base == "scale_bounds":
            # mmseg 0.x test_time_aug.py: (int(scale[0] * r), int(scale[1] * r)); without a scale, the image's
            # own (int(w * r), int(h * r)) (its "mode 1").
            long_side, short_side = (max(self.scale), min(self.scale)) if self.scale else (width, height)
            size = keep_ratio_size(height, width, scale=(int(long_side * ratio), int(short_side * ratio)))
        elif base == "original_ratio":
            size = keep_ratio_size(height, width, scale=(int(width * ratio + 0.5), int(height * ratio + 0.5)))
        else:
            raise ValueError(f"unknown view base {base!r}; expected 'scale_bounds' or 'original_ratio'")
        return self.normalised(resize_to(image, size))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8, (H, W) uint8 -> (3, H', W') float32, (H, W) int64."""
        return self.input(image), torch.from_numpy(label.astype(np.int64))
