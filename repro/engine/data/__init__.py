"""Dataset loaders for the published tables: Cityscapes, ADE20K, PASCAL VOC 2012 + SBD.

`build_dataset(data_cfg, split=...)` gives a `SegmentationFiles` dataset with the transform the config
describes; `check_dataset(data_cfg)` raises the one clear `DatasetNotFoundError` when the data is not there;
`write_fake_dataset` writes a tiny random dataset in the real layout (tests and `--smoke`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from repro.engine.config import DataConfig, EvalConfig
from repro.engine.data import ade20k, cityscapes, voc
from repro.engine.data.base import DatasetError, DatasetNotFoundError, SegmentationFiles, read_label, write_png
from repro.engine.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "SegmentationFiles",
    "build_dataset",
    "check_dataset",
    "dataset_module",
    "prediction_path",
    "read_prediction",
    "write_fake_dataset",
    "write_prediction",
]


def dataset_module(name: str) -> ModuleType:
    """The loader module of dataset `name` (cityscapes, ade20k, voc)."""
    modules = {"cityscapes": cityscapes, "ade20k": ade20k, "voc": voc}
    if name not in modules:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(modules)}")
    return modules[name]


def _label_lut(name: str) -> np.ndarray:
    module = dataset_module(name)
    return module.label_id_lut() if name == "cityscapes" else module.label_lut()


def _label_known(name: str) -> np.ndarray:
    """(256,) bool: the stored label values dataset `name` defines (classes and ignore values)."""
    known = np.zeros(256, dtype=bool)
    if name == "cityscapes":
        known[list(cityscapes.LABEL_IDS)] = True  # label ids 0..33; those outside the 19 classes map to ignore
    elif name == "ade20k":
        known[: ade20k.NUM_CLASSES + 1] = True  # 0 (other) is reduced to ignore
    else:
        known[: voc.NUM_CLASSES] = True
        known[255] = True  # object borders
    return known


def check_dataset(data: DataConfig, *, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """The resolved root if the config's splits named in `splits` ("train", "val") are present;
    DatasetNotFoundError (naming the split, the path looked at and the layout expected) otherwise.
    Evaluating a checkpoint needs only ("val",)."""
    unknown = [s for s in splits if s not in ("train", "val")]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of ('train', 'val'), got {splits!r}")
    module = dataset_module(data.dataset)
    root = module.resolve(data.root)
    for split in splits:
        name = data.train_split if split == "train" else data.val_split
        try:
            module.find_pairs(root, name)
        except DatasetNotFoundError as err:
            which = "training" if split == "train" else "validation"
            raise DatasetNotFoundError(f"{which} split {name!r} (config key data.{split}_split): {err}") from None
    return root


def build_dataset(data: DataConfig, *, split: str, eval_cfg: EvalConfig | None = None) -> SegmentationFiles:
    """The training (`split="train"`) or validation (`split="val"`) dataset of the config.

    Training items are indexed by (index, augmentation seed); validation items by index, rescaled and padded
    as `eval_cfg` says (its `scale`, `val_pad_size`, `val_pad_value`).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    module = dataset_module(data.dataset)
    root = module.resolve(data.root)
    pairs = module.find_pairs(root, data.train_split if split == "train" else data.val_split)
    norm = dict(mean=data.mean, std=data.std, channel_order=data.channel_order)
    if split == "train":
        transform = TrainTransform(
            crop_size=data.crop_size,
            scale_range=data.scale_range,
            rescale=data.rescale,
            base_size=data.base_size,
            scale_step=data.scale_step,
            cat_max_ratio=data.cat_max_ratio,
            crop_fallback=data.crop_fallback,
            photometric=data.photometric_distortion,
            pad_position=data.pad_position,
            pad_fill=data.pad_fill,
            flip=data.flip,
            ignore_index=data.ignore_index,
            **norm,
        )
        return SegmentationFiles(
            pairs, label_lut=_label_lut(data.dataset), label_known=_label_known(data.dataset),
            train_transform=transform,
        )
    transform = EvalTransform(**norm) if eval_cfg is None else EvalTransform(
        scale=eval_cfg.scale, pad_size=eval_cfg.val_pad_size, pad_value=eval_cfg.val_pad_value, **norm
    )
    return SegmentationFiles(
        pairs, label_lut=_label_lut(data.dataset), label_known=_label_known(data.dataset), eval_transform=transform
    )


def write_fake_dataset(
    data: DataConfig, root: Path, *, count: int, size_hw: tuple[int, int], seed: int = 0
) -> Path:
    """Write `count` random samples for both splits of the config in its dataset's layout under `root`.

    Returns the root to put in `data.root`.
    """
    module = dataset_module(data.dataset)
    root = Path(root)
    for offset, split in enumerate(dict.fromkeys((data.train_split, data.val_split))):
        module.write_fake(root, split=split, count=count, size_hw=size_hw, seed=seed + offset)
    return root


# --save-predictions: one PNG per validation image in the encoding of the dataset's own annotations, so the
# dataset's label decoding (`_label_lut`) reads a prediction back exactly as it reads a label:
#   cityscapes  CITY/STEM_pred_labelIds.png  label ids (what cityscapesscripts' evaluator reads)
#   ade20k      STEM.png                     class + 1 (the annotations' 1..150; mmseg's IoUMetric(format_only)
#                                            writes pred + 1 for reduce_zero_label datasets too)
#   voc         STEM.png                     class 0..20 (SegmentationClass values, as single-channel PNG)


def prediction_path(dataset: str, image_path: Path, folder: Path) -> Path:
    """Where --save-predictions writes the prediction of the validation image `image_path`."""
    image_path = Path(image_path)
    if dataset == "cityscapes":
        stem = image_path.name.removesuffix("_leftImg8bit.png")
        return Path(folder) / image_path.parent.name / f"{stem}_pred_labelIds.png"
    dataset_module(dataset)  # names an unknown dataset
    return Path(folder) / f"{image_path.stem}.png"


def write_prediction(dataset: str, image_path: Path, folder: Path, train_ids: np.ndarray) -> Path:
    """Write the (H, W) train-id prediction of `image_path` in the dataset's annotation encoding; the path."""
    num_classes = dataset_module(dataset).NUM_CLASSES
    train_ids = np.asarray(train_ids)
    if train_ids.ndim != 2 or train_ids.size and not 0 <= int(train_ids.min()) <= int(train_ids.max()) < num_classes:
        raise ValueError(f"a prediction must be (H, W) train ids in [0, {num_classes}); got shape "
                         f"{train_ids.shape}, values {int(train_ids.min(initial=0))}..{int(train_ids.max(initial=0))}")
    if dataset == "cityscapes":
        encoded = cityscapes.train_ids_to_label_ids(train_ids)
    elif dataset == "ade20k":
        encoded = train_ids.astype(np.uint8) + 1
    else:
        encoded = train_ids.astype(np.uint8)
    path = prediction_path(dataset, image_path, folder)
    write_png(path, encoded)
    return path


def read_prediction(dataset: str, path: Path) -> np.ndarray:
    """(H, W) uint8 train ids of a file `write_prediction` wrote, decoded as the dataset decodes its labels."""
    return _label_lut(dataset)[read_label(Path(path))]
