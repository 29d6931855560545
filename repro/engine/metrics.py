"""Confusion-matrix segmentation metrics.

The confusion matrix is (num_classes, num_classes) int64 with rows = ground truth, columns = prediction;
pixels whose label is `ignore_index` are not counted. IoU of class c = TP / (TP + FP + FN); a class with
TP + FP + FN = 0 (absent from both labels and predictions) has IoU NaN. The mean over classes either drops
it (`zero_union="drop"`: mmsegmentation and sssegmentation nanmean, the Cityscapes evaluator) or counts it as
0 (`zero_union="zero"`: the official CCNet evaluate.py tp / max(1, union), PaddleSeg metrics.mean_iou).
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(
    predictions: torch.Tensor, labels: torch.Tensor, *, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts from predictions and labels of the same shape (B, H, W).

    Raises ValueError for mismatched shapes or a label / prediction outside [0, num_classes) that is not
    `ignore_index` (a wrong label mapping must not be silently dropped).
    """
    if predictions.shape != labels.shape:
        shapes = f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)}"
        raise ValueError(f"{shapes} differ in shape")
    labels = labels.reshape(-1).long()
    predictions = predictions.reshape(-1).long()
    valid = labels != ignore_index
    labels, predictions = labels[valid], predictions[valid]
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            bad = int(values[(values < 0) | (values >= num_classes)][0])
            expected = f"[0, {num_classes}) and not ignore_index={ignore_index}"
            raise ValueError(f"{name} value {bad} outside {expected}")
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(matrix: torch.Tensor | np.ndarray) -> np.ndarray:
    """(num_classes,) float64 IoU; NaN where the class is in neither labels nor predictions."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)


ZERO_UNION_RULES = ("drop", "zero")


def mean_iou(matrix: torch.Tensor | np.ndarray, *, zero_union: str = "drop") -> float:
    """Mean IoU over classes: a class with zero union dropped ("drop"; NaN if no class is left) or counted
    as IoU 0 ("zero")."""
    if zero_union not in ZERO_UNION_RULES:
        raise ValueError(f"unknown zero_union rule {zero_union!r}; expected one of {ZERO_UNION_RULES}")
    ious = iou_per_class(matrix)
    if zero_union == "zero":
        return float(np.nan_to_num(ious, nan=0.0).mean())
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def pixel_accuracy(matrix: torch.Tensor | np.ndarray) -> float:
    """Correct / counted pixels."""
    matrix = np.asarray(matrix, dtype=np.float64)
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total > 0 else float("nan")
