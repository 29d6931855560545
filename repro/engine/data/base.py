"""What the dataset loaders share: root resolution, the not-found error, and the file-pair dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the config (or its environment variable) says it is."""


class DatasetError(ValueError):
    """A dataset file cannot be used: an image that cannot be decoded, a label with values outside the classes."""


def not_found(
    *, dataset: str, looked_at: str, layout: str, env_var: str, problem: str
) -> DatasetNotFoundError:
    """One clear error: what is missing, the path looked at, the layout expected and how to point at it."""
    return DatasetNotFoundError(
        f"{dataset} dataset not found: {problem}\n"
        f"  looked at: {looked_at}\n"
        f"  expected layout:\n{layout}\n"
        f"  point at it with the config key `data.root` (or `--set data.root=PATH`) "
        f"or the environment variable {env_var}=PATH"
    )


def resolve_root(*, root: str | None, env_var: str, dataset: str, layout: str) -> Path:
    """The dataset root: the config's `data.root` if set, else `$env_var`; an error if neither is set."""
    if root:
        return Path(os.path.expanduser(root))
    from_env = os.environ.get(env_var)
    if from_env:
        return Path(os.path.expanduser(from_env))
    raise not_found(
        dataset=dataset,
        looked_at=f"(nothing: data.root is null and {env_var} is not set)",
        layout=layout,
        env_var=env_var,
        problem="no location configured",
    )


def _decode(path: Path, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open and fully decode an image file; DatasetError naming the file when it cannot be."""
    try:
        with Image.open(path) as image:
            return convert(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL raises OSError for truncated data, SyntaxError / ValueError for broken headers.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(f"cannot decode image {path}: {reason}") from None


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return _decode(path, lambda image: np.asarray(image.convert("RGB")))


def read_label(path: Path) -> np.ndarray:
    """(H, W) uint8 as stored (palette PNGs give their indices)."""
    array = _decode(path, np.asarray)
    if array.ndim != 2:
        raise DatasetError(f"label image {path} has shape {array.shape}; expected a single-channel (H, W) map")
    if array.dtype != np.uint8:
        raise DatasetError(f"label image {path} holds {array.dtype} values; expected 8-bit (uint8) label ids")
    return array


class SegmentationFiles(torch.utils.data.Dataset):
    """(image, label) file pairs -> transformed tensors.

    `label_lut` (256,) uint8 maps stored label values to train ids (ignore = 255). `label_known` (256,) bool
    marks the stored values the dataset defines (its classes and its ignore values); a label file holding any
    other value is a DatasetError naming the file, not silently ignored pixels. An item is an index (for
    evaluation: `eval_transform(image, label)`) or a pair (index, augmentation seed) for training, where the
    seed drives `train_transform` so a sample depends only on (index, seed).
    Returns (image (3, H, W) float32, label (H, W) int64, index).
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        *,
        label_lut: np.ndarray,
        label_known: np.ndarray | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
    ) -> None:
        if label_lut.shape != (256,) or label_lut.dtype != np.uint8:
            got = f"{label_lut.shape} {label_lut.dtype}"
            raise ValueError(f"label_lut must be a (256,) uint8 table, got {got}")
        if label_known is not None and (label_known.shape != (256,) or label_known.dtype != np.bool_):
            raise ValueError(f"label_known must be a (256,) bool table, got {label_known.shape} {label_known.dtype}")
        self.pairs = pairs
        self.label_lut = label_lut
        self.label_known = label_known
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw (H, W, 3) uint8 RGB image and (H, W) uint8 train-id label of sample `index`."""
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        raw = read_label(label_path)
        if self.label_known is not None and not self.label_known[raw].all():
            unknown = np.unique(raw[~self.label_known[raw]])
            known = np.flatnonzero(self.label_known)
            raise DatasetError(
                f"label file {label_path} holds values {unknown[:10].tolist()} that are neither a class nor the "
                f"ignore value of this dataset (expected {_ranges(known)}); a label of another dataset or "
                "encoding (e.g. colour or train-id PNGs)?"
            )
        label = self.label_lut[raw]
        if image.shape[:2] != label.shape:
            raise ValueError(f"{image_path} is {image.shape[:2]} but its label {label_path} is {label.shape}")
        return image, label

    def __getitem__(self, item: int | tuple[int, int]):
        if isinstance(item, tuple):
            index, seed = item
            if self.train_transform is None:
                raise ValueError("this dataset has no train_transform; index it with an int")
            image, label = self.load(index)
            image_t, label_t = self.train_transform(image, label, rng=np.random.default_rng(seed))
        else:
            index = item
            if self.eval_transform is None:
                raise ValueError("this dataset has no eval_transform; index it with (index, seed)")
            image, label = self.load(index)
            image_t, label_t = self.eval_transform(image, label)
        return image_t, label_t, index


def _ranges(values: np.ndarray) -> str:
    """[0, 1, 2, 5, 255] -> "0..2, 5, 255"."""
    parts, start = [], None
    for i, value in enumerate(values.tolist()):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}..{value}")
            start = None
    return ", ".join(parts)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def random_image(rng: np.random.Generator, *, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 noise, for generated layouts."""
    return rng.integers(0, 256, size=(*size_hw, 3), dtype=np.uint8)
