"""Validation: predict every image as the config says (whole / slide, optionally multi-scale + flip),
accumulate confusion matrices across ranks, and report mIoU and per-class IoU.

Logits are computed on the (optionally rescaled) image and resized bilinearly to the label's native size
before the argmax, so the metric is always taken at the dataset's own resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from models.inference import predict_multiscale, predict_slide, predict_whole
from repro.engine.config import EvalConfig
from repro.engine.data.base import SegmentationFiles
from repro.engine.distributed import DistContext, all_reduce_sum, shard
from repro.engine.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


@dataclass(frozen=True)
class EvalResult:
    """One metric's outcome: mIoU in percent, per-class IoU in percent (NaN = class absent), counts."""

    metric: str
    miou: float
    iou_per_class: tuple[float, ...]
    pixel_accuracy: float
    confusion: np.ndarray


def predict_logits(
    model: nn.Module, image: torch.Tensor, *, eval_cfg: EvalConfig, num_classes: int, multiscale: bool
) -> torch.Tensor:
    """Logits (B, num_classes, H, W) for images (B, 3, H, W) in the configured mode."""
    slide = dict(crop=eval_cfg.crop_size, stride=eval_cfg.stride)
    if multiscale:
        extra = slide if eval_cfg.mode == "slide" else {}
        return predict_multiscale(
            model,
            image,
            scales=eval_cfg.ms_scales,
            flip=True,
            mode=eval_cfg.mode,
            num_classes=num_classes,
            **extra,
        )
    if eval_cfg.mode == "slide":
        return predict_slide(model, image, num_classes=num_classes, **slide)
    return predict_whole(model, image)


def evaluate(
    model: nn.Module,
    dataset: SegmentationFiles,
    *,
    eval_cfg: EvalConfig,
    num_classes: int,
    ignore_index: int,
    ctx: DistContext,
    limit: int | None = None,
    on_prediction: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Evaluate `model` on `dataset` (this rank's shard, summed over ranks).

    Returns {"mIoU": ...} and, when `eval_cfg.ms_flip`, {"mIoU_ms_flip": ...}. `limit` evaluates only the
    first `limit` images; `on_prediction(index, train_ids (H, W) uint8)` receives each single-scale
    prediction (e.g. to write Cityscapes result files).
    """
    metrics = ["mIoU"] + (["mIoU_ms_flip"] if eval_cfg.ms_flip else [])
    matrices = {m: torch.zeros(num_classes, num_classes, dtype=torch.int64) for m in metrics}
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = shard(count, ctx)
    was_training = model.training
    model.eval()
    with Progress(disable=not (progress and ctx.is_main)) as bar:
        task = bar.add_task("evaluate", total=len(indices))
        for index in indices:
            image, label, _ = dataset[index]
            image = image.unsqueeze(0).to(ctx.device)
            for metric in metrics:
                logits = predict_logits(
                    model, image, eval_cfg=eval_cfg, num_classes=num_classes, multiscale=metric != "mIoU"
                )
                if tuple(logits.shape[-2:]) != tuple(label.shape):
                    size = tuple(label.shape)
                    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
                prediction = logits.argmax(dim=1)[0].cpu()
                matrices[metric] += confusion_matrix(
                    prediction, label, num_classes=num_classes, ignore_index=ignore_index
                )
                if metric == "mIoU" and on_prediction is not None:
                    on_prediction(index, prediction.numpy().astype(np.uint8))
            bar.advance(task)
    model.train(was_training)
    results = {}
    for metric, matrix in matrices.items():
        matrix = all_reduce_sum(matrix.to(ctx.device), ctx).cpu().numpy()
        results[metric] = EvalResult(
            metric=metric,
            miou=100.0 * mean_iou(matrix),
            iou_per_class=tuple(float(100.0 * v) for v in iou_per_class(matrix)),
            pixel_accuracy=100.0 * pixel_accuracy(matrix),
            confusion=matrix,
        )
    return results


def protocol_summary(eval_cfg: EvalConfig, metric: str) -> dict[str, str]:
    """How `metric` ("mIoU" or "mIoU_ms_flip") is predicted, as the provenance columns of results/miou.csv:
    `eval_mode` (whole / slide), `eval_scales` (space-separated ratios; "1.0" = the test size),
    `eval_flip` ("true" / "false"), `eval_average` (how the scales' outputs are combined)."""
    multiscale = metric != "mIoU"
    scales = eval_cfg.ms_scales if multiscale else (1.0,)
    return {
        "eval_mode": eval_cfg.mode,
        "eval_scales": " ".join(f"{float(scale):g}" for scale in scales),
        "eval_flip": "true" if multiscale else "false",
        "eval_average": "softmax probabilities at the test size" if multiscale else "none (one scale)",
    }
