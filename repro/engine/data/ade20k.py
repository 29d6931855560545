"""ADE20K scene parsing (ADEChallengeData2016): 150 classes, label 0 ("other") reduced to ignore.

Stored labels are 0..150 with 0 meaning unlabelled; training and evaluation use class k-1 for stored k and
ignore (255) for stored 0, as mmsegmentation's `reduce_zero_label` and sssegmentation do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from repro.engine.data.base import not_found, random_image, resolve_root, write_png

ENV_VAR = "ADE20K_DATASET"
NUM_CLASSES = 150
LAYOUT = (
    "    ROOT/images/{split}/ADE_{split}_XXXXXXXX.jpg\n"
    "    ROOT/annotations/{split}/ADE_{split}_XXXXXXXX.png   (split: training, validation)\n"
    "    ROOT may be ADEChallengeData2016 itself or the folder that contains it"
)


def label_lut() -> np.ndarray:
    """(256,) uint8: stored label -> class (0 -> 255, k -> k - 1, 255 stays ignore)."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
    return lut


def resolve(root: str | None) -> Path:
    path = resolve_root(root=root, env_var=ENV_VAR, dataset="ADE20K", layout=LAYOUT)
    nested = path / "ADEChallengeData2016"
    return nested if nested.is_dir() else path


def find_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Sorted (image, label) pairs of `split`; DatasetNotFoundError if the layout is not there."""
    image_dir, label_dir = root / "images" / split, root / "annotations" / split

    def missing(problem: str, looked_at: Path) -> Exception:
        return not_found(
            dataset="ADE20K", looked_at=str(looked_at), layout=LAYOUT, env_var=ENV_VAR, problem=problem
        )

    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise missing(f"folder {folder} does not exist", folder)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise missing(f"no *.jpg in {image_dir}", image_dir)
    pairs = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise missing(f"label {label} for image {image} does not exist", label)
        pairs.append((image, label))
    return pairs


def write_fake(root: Path, *, split: str, count: int, size_hw: tuple[int, int], seed: int) -> list[Path]:
    """Write `count` random JPEG images and labels 0..150 in the ADEChallengeData2016 layout."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        stem = f"ADE_{split}_{i + 1:08d}"
        image_path = root / "images" / split / f"{stem}.jpg"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(random_image(rng, size_hw=size_hw)).save(image_path, quality=95)
        path = root / "annotations" / split / f"{stem}.png"
        write_png(path, rng.integers(0, NUM_CLASSES + 1, size=size_hw, dtype=np.uint8))
        paths.append(path)
    return paths
