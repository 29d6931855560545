"""Validation: predict every image as the config's protocol says (whole / slide, optionally multi-scale +
flip; see `EvalConfig` for each field and the source it follows), accumulate confusion matrices across ranks,
and report mIoU and per-class IoU.

Predictions are brought to the label's native size before the argmax, so the metric is always taken at the
dataset's own resolution. `protocol_summary` describes the protocol of a metric for the results CSV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from models.inference import predict_multiscale, predict_slide, predict_whole, resize_logits
from repro.engine.config import EvalConfig
from repro.engine.data.base import SegmentationFiles
from repro.engine.data.transforms import EvalTransform
from repro.engine.distributed import DistContext, all_reduce_sum, shard
from repro.engine.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

# ms_resize values whose views the data pipeline builds from the original image, and the tensor resize rule
# of the others (models.inference.TENSOR_RESIZES).
_CV2_VIEWS = {"cv2_scale_bounds": "scale_bounds", "cv2_original_ratio": "original_ratio"}
_TENSOR_VIEWS = {
    "zoom_original_ratio": "zoom", "tensor_input_ratio": "ratio", "tensor_input_scale_factor": "scale_factor",
}


@dataclass(frozen=True)
class EvalResult:
    """One metric's outcome: mIoU in percent, per-class IoU in percent (NaN = class absent), counts."""

    metric: str
    miou: float
    iou_per_class: tuple[float, ...]
    pixel_accuracy: float
    confusion: np.ndarray


def protocol_summary(eval_cfg: EvalConfig, metric: str) -> dict[str, str]:
    """The provenance columns of a results row: eval_mode, eval_scales, eval_flip, eval_average.

    "mIoU" is the single-scale protocol, "mIoU_ms_flip" the multi-scale + flip one. Strings name the
    window placement / padding, the test scale and its resize, and how predictions are averaged."""
    e = eval_cfg

    def mode_text(mode: str) -> str:
        if mode == "whole":
            return "whole"
        crop, stride = e.crop_size, e.stride
        return f"slide {crop[0]}x{crop[1]} stride {stride[0]}x{stride[1]} pad {e.slide_pad}"

    test_scale = "native" if e.scale is None else f"keep-ratio {e.scale[0]}x{e.scale[1]}"
    if e.val_pad_size is not None:
        test_scale += f" padded to {e.val_pad_size[0]}x{e.val_pad_size[1]} with {e.val_pad_value:g}"
    final = f"to label {e.upsample} align_corners={e.resize_align_corners}"
    if metric == "mIoU":
        return {
            "eval_mode": mode_text(e.mode),
            "eval_scales": f"1.0 ({test_scale})",
            "eval_flip": "false",
            "eval_average": f"window logits mean; {final}" if e.mode == "slide" else final,
        }
    if metric == "mIoU_ms_flip":
        scales = " ".join(f"{s:g}" for s in e.ms_scales)
        return {
            "eval_mode": mode_text(e.ms_mode),
            "eval_scales": f"{scales} ({e.ms_resize}; {test_scale})",
            "eval_flip": "true",
            "eval_average": f"{e.ms_average} mean at {e.ms_average_at}; {final}",
        }
    raise ValueError(f"unknown metric {metric!r}; expected 'mIoU' or 'mIoU_ms_flip'")


def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    eval_cfg: EvalConfig,
    num_classes: int,
    multiscale: bool,
    output_size: tuple[int, int] | None = None,
    resized_size: tuple[int, int] | None = None,
    raw_image: np.ndarray | None = None,
    transform: EvalTransform | None = None,
) -> torch.Tensor:
    """Logits (B, num_classes, H, W) for the single-scale input `image` (B, 3, h, w) in the configured mode.

    `output_size`: the label's (H, W); the logits come back at that size (default: the input's size, nothing
    cropped). `resized_size`: the input's size before the val padding (default: the input's size). Views
    built from the original image (ms_resize "cv2_*") need `raw_image` ((H, W, 3) uint8) and `transform`; a
    "zoom_original_ratio" view starts from `raw_image` normalised when given, else from `image`."""
    e = eval_cfg
    input_size = tuple(image.shape[-2:])
    output_size = input_size if output_size is None else tuple(output_size)
    resized_size = input_size if resized_size is None else tuple(resized_size)
    align = e.resize_align_corners
    once = e.upsample == "label_once"

    def to_label(logits: torch.Tensor) -> torch.Tensor:
        """Input-size logits -> label-size: crop the val padding off, then resize."""
        logits = logits[:, :, : resized_size[0], : resized_size[1]]
        return resize_logits(logits, output_size, align_corners=align)

    if not multiscale:
        if e.mode == "slide":
            logits = predict_slide(model, image, crop=e.crop_size, stride=e.stride, num_classes=num_classes,
                                   pad=e.slide_pad)
            return to_label(logits)
        if once and resized_size == input_size:
            return predict_whole(model, image, size=output_size, align_corners=align)
        return to_label(predict_whole(model, image))

    make_view = None
    resize = "ratio"
    base = image
    if e.ms_resize in _CV2_VIEWS:
        if raw_image is None or transform is None:
            raise ValueError(f"ms_resize {e.ms_resize!r} builds views from the original image: pass raw_image "
                             "and transform")
        kind = _CV2_VIEWS[e.ms_resize]

        def make_view(ratio: float) -> torch.Tensor:
            return transform.view(raw_image, ratio, kind).unsqueeze(0).to(image.device)
    else:
        resize = _TENSOR_VIEWS[e.ms_resize]
        if e.ms_resize == "zoom_original_ratio" and raw_image is not None and transform is not None:
            base = transform.normalised(raw_image).unsqueeze(0).to(image.device)
    at_input = e.ms_average_at == "input"
    logits = predict_multiscale(
        model,
        base,
        scales=e.ms_scales,
        flip=True,
        mode=e.ms_mode,
        crop=e.crop_size or (1, 1),
        stride=e.stride or (1, 1),
        num_classes=num_classes,
        average=e.ms_average,
        slide_pad=e.slide_pad,
        resize=resize,
        make_view=make_view,
        size=input_size if at_input else output_size,
        align_corners=align,
        decoder_to_size=once and not at_input,
    )
    return to_label(logits) if at_input else logits


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
    transform = dataset.eval_transform
    if not isinstance(transform, EvalTransform):
        raise ValueError("evaluate needs a validation dataset (built with an EvalTransform)")
    metrics = ["mIoU"] + (["mIoU_ms_flip"] if eval_cfg.ms_flip else [])
    matrices = {m: torch.zeros(num_classes, num_classes, dtype=torch.int64) for m in metrics}
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = shard(count, ctx)
    was_training = model.training
    model.eval()
    with Progress(disable=not (progress and ctx.is_main)) as bar:
        task = bar.add_task("evaluate", total=len(indices))
        for index in indices:
            raw_image, raw_label = dataset.load(index)
            image, label = transform(raw_image, raw_label)
            image = image.unsqueeze(0).to(ctx.device)
            for metric in metrics:
                logits = predict_logits(
                    model, image, eval_cfg=eval_cfg, num_classes=num_classes, multiscale=metric != "mIoU",
                    output_size=tuple(label.shape), resized_size=transform.resized_size(*raw_label.shape),
                    raw_image=raw_image, transform=transform,
                )
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
            miou=100.0 * mean_iou(matrix, zero_union=eval_cfg.zero_union),
            iou_per_class=tuple(float(100.0 * v) for v in iou_per_class(matrix)),
            pixel_accuracy=100.0 * pixel_accuracy(matrix),
            confusion=matrix,
        )
    return results
