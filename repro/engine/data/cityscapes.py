"""Cityscapes (fine annotations): leftImg8bit images, gtFine label ids mapped to the 19 train ids.

The id -> train id table comes from `cityscapesscripts.helpers.labels`, the dataset's own definition
(train id 255 and -1 -> ignore 255). Predictions are written back as label ids (`train_ids_to_label_ids`)
for the official evaluator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _LABELS

from repro.engine.data.base import not_found, random_image, resolve_root, write_png

ENV_VAR = "CITYSCAPES_DATASET"
NUM_CLASSES = 19
LAYOUT = (
    "    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png\n"
    "    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png   (split: train, val)"
)


# The label ids a gtFine_labelIds.png may hold (the license plate's -1 is never stored).
LABEL_IDS = tuple(sorted(label.id for label in _LABELS if 0 <= label.id < 256))


def label_id_lut() -> np.ndarray:
    """(256,) uint8: Cityscapes label id -> train id (255 = ignore)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label in _LABELS:
        if 0 <= label.id < 256 and 0 <= label.trainId < 255:
            lut[label.id] = label.trainId
    return lut


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids 0..18 -> Cityscapes label ids, the encoding the official evaluator reads."""
    lut = np.zeros(256, dtype=np.uint8)
    for label in _LABELS:
        if 0 <= label.trainId < 255 and label.id >= 0:
            lut[label.trainId] = label.id
    if train_ids.max(initial=0) >= NUM_CLASSES:
        raise ValueError(f"train ids must be in [0, {NUM_CLASSES}), got max {int(train_ids.max())}")
    return lut[train_ids.astype(np.uint8)]


def resolve(root: str | None) -> Path:
    return resolve_root(root=root, env_var=ENV_VAR, dataset="Cityscapes", layout=LAYOUT)


def find_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Sorted (image, label) pairs of `split`; DatasetNotFoundError if the layout is not there."""
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split

    def missing(problem: str, looked_at: Path) -> Exception:
        return not_found(
            dataset="Cityscapes", looked_at=str(looked_at), layout=LAYOUT, env_var=ENV_VAR, problem=problem
        )

    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise missing(f"folder {folder} does not exist", folder)
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise missing(f"no *_leftImg8bit.png under {image_dir}/<city>/", image_dir)
    pairs = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = label_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            raise missing(f"label {label} for image {image} does not exist", label)
        pairs.append((image, label))
    return pairs


def write_fake(root: Path, *, split: str, count: int, size_hw: tuple[int, int], seed: int) -> list[Path]:
    """Write `count` random images and label-id maps in the Cityscapes layout (for tests and --smoke).

    Labels use every label id 0..33 (including ones the evaluation ignores). Returns the label paths.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        city = "aachen" if i % 2 == 0 else "bremen"
        stem = f"{city}_{i:06d}_000019"
        image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        write_png(image_path, random_image(rng, size_hw=size_hw))
        label = rng.integers(0, 34, size=size_hw, dtype=np.uint8)
        path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        write_png(path, label)
        paths.append(path)
    return paths
