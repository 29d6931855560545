"""PASCAL VOC 2012 with the SBD augmented annotations (21 classes with background, 255 = border/ignore).

Split names are file names in `ImageSets/Segmentation/` and may be joined with "+": mmsegmentation's
"voc12aug" training set is `train+aug` (train.txt with SegmentationClass plus aug.txt with
SegmentationClassAug, as its voc_aug conversion script writes them); sssegmentation's is `trainaug`
(trainaug.txt with SegmentationClassAug). Lists named `aug*` or `trainaug*` read SegmentationClassAug.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from repro.engine.data.base import not_found, random_image, resolve_root

ENV_VAR = "VOC_DATASET"
NUM_CLASSES = 21
LAYOUT = (
    "    ROOT/JPEGImages/{id}.jpg\n"
    "    ROOT/SegmentationClass/{id}.png        (VOC 2012 palette PNGs, values 0..20 and 255)\n"
    "    ROOT/SegmentationClassAug/{id}.png     (SBD converted to PNG, for the aug / trainaug lists)\n"
    "    ROOT/ImageSets/Segmentation/{split}.txt (train, val, aug, trainaug; join lists with '+')\n"
    "    ROOT is VOC2012 itself or a folder containing VOCdevkit/VOC2012"
)


def label_lut() -> np.ndarray:
    """(256,) uint8: identity on 0..20, everything else ignore."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[:NUM_CLASSES] = np.arange(NUM_CLASSES, dtype=np.uint8)
    return lut


def resolve(root: str | None) -> Path:
    path = resolve_root(root=root, env_var=ENV_VAR, dataset="PASCAL VOC 2012", layout=LAYOUT)
    nested = path / "VOCdevkit" / "VOC2012"
    return nested if nested.is_dir() else path


def _label_dir(list_name: str) -> str:
    return "SegmentationClassAug" if list_name.startswith(("aug", "trainaug")) else "SegmentationClass"


def find_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of every list in `split` ("a+b"), in list order."""

    def missing(problem: str, looked_at: Path) -> Exception:
        return not_found(
            dataset="VOC 2012", looked_at=str(looked_at), layout=LAYOUT, env_var=ENV_VAR, problem=problem
        )

    pairs = []
    for list_name in split.split("+"):
        list_file = root / "ImageSets" / "Segmentation" / f"{list_name}.txt"
        if not list_file.is_file():
            raise missing(f"split list {list_file} does not exist", list_file)
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise missing(f"split list {list_file} is empty", list_file)
        for image_id in ids:
            image = root / "JPEGImages" / f"{image_id}.jpg"
            label = root / _label_dir(list_name) / f"{image_id}.png"
            for path in (image, label):
                if not path.is_file():
                    raise missing(f"{path} (listed in {list_file.name}) does not exist", path)
            pairs.append((image, label))
    return pairs


def write_fake(root: Path, *, split: str, count: int, size_hw: tuple[int, int], seed: int) -> list[Path]:
    """Write `count` random images, palette labels (0..20 and 255 borders) and the lists of `split`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for list_name in split.split("+"):
        ids = [f"{list_name}_{i:06d}" for i in range(count)]
        for image_id in ids:
            image_path = root / "JPEGImages" / f"{image_id}.jpg"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_image(rng, size_hw=size_hw)).save(image_path, quality=95)
            label = rng.integers(0, NUM_CLASSES, size=size_hw, dtype=np.uint8)
            label[0, :] = 255  # VOC marks object borders 255
            png = Image.fromarray(label, mode="P")
            png.putpalette([(i * 37) % 256 for i in range(768)])
            path = root / _label_dir(list_name) / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            png.save(path)
            paths.append(path)
        list_file = root / "ImageSets" / "Segmentation" / f"{list_name}.txt"
        list_file.parent.mkdir(parents=True, exist_ok=True)
        list_file.write_text("\n".join(ids) + "\n")
    return paths
