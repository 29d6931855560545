"""What the dataset loaders share: root resolution, the not-found error, and the file-pair dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the config (or its environment variable) says it is."""


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


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    """(H, W) uint8 as stored (palette PNGs give their indices)."""
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"label image {path} has shape {array.shape}; expected a single-channel (H, W) map")
    return array


class SegmentationFiles(torch.utils.data.Dataset):
    """(image, label) file pairs -> transformed tensors.

    `label_lut` (256,) uint8 maps stored label values to train ids (ignore = 255). An item is an index (for
    evaluation: `eval_transform(image, label)`) or a pair (index, augmentation seed) for training, where the
    seed drives `train_transform` so a sample depends only on (index, seed).
    Returns (image (3, H, W) float32, label (H, W) int64, index).
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        *,
        label_lut: np.ndarray,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
    ) -> None:
        if label_lut.shape != (256,) or label_lut.dtype != np.uint8:
            got = f"{label_lut.shape} {label_lut.dtype}"
            raise ValueError(f"label_lut must be a (256,) uint8 table, got {got}")
        self.pairs = pairs
        self.label_lut = label_lut
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw (H, W, 3) uint8 RGB image and (H, W) uint8 train-id label of sample `index`."""
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        label = self.label_lut[read_label(label_path)]
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


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def random_image(rng: np.random.Generator, *, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 noise, for generated layouts."""
    return rng.integers(0, 256, size=(*size_hw, 3), dtype=np.uint8)
