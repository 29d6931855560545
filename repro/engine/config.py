"""Experiment configs: one flat YAML per published table row, validated by frozen dataclasses.

`load_config(path, overrides)` reads the YAML, applies `--set section.key=value` overrides, and builds an
`ExperimentConfig`. An unknown key, a missing required key, a value of the wrong type or a value out of
range raises `ConfigError` naming the file and the dotted key (`experiments/x.yaml: train.lr: ...`).

Settings that silently changed published results elsewhere have no defaults here: `model.recurrence`
(the official training script defaults to 0, i.e. no attention), `train.weight_decay` (1e-4 in the official
README, 5e-4 in its run script) and `eval.mode` (the official `--whole` flag turns on for any value).

`model_kwargs(cfg)` is the one place where a config becomes keyword arguments of `models.build`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

# Classes evaluated per dataset (Cityscapes train ids, ADE20K with the zero label reduced, VOC + background).
DATASET_CLASSES = {"cityscapes": 19, "ade20k": 150, "voc": 21}
REPORTED_KEYS = ("mIoU", "mIoU_ms_flip", "memory_gb", "fps")


class ConfigError(ValueError):
    """A config file (or override) has an unknown key, a wrong type or a bad value."""


class _FieldError(ValueError):
    """Raised inside a section's checks; the loader adds the file and the section to the message."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _FieldError(key, message)


def _expect(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise `key: expected EXPECTED, got VALUE` unless `condition`."""
    _require(condition, key, f"expected {expected}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Arguments of `models.build` (see `model_kwargs`)."""

    depth: int
    stem: Literal["deep", "v1c", "v1"]
    output_stride: int
    head: Literal["rcca", "nonlocal", "fcn"]
    # No default: the official training script silently used 0 (no attention) when it was not passed.
    recurrence: int
    num_classes: int
    norm: Literal["bn", "syncbn", "frozenbn"] = "bn"
    backend: Literal["auto", "naive", "triton"] = "auto"
    aux: bool = True
    pretrained_backbone: str | None = None
    qk_channels: int | None = None
    head_channels: int = 512
    dropout: float = 0.1
    contract_dilation: bool = True
    nonlocal_impl: Literal["naive", "sdpa", "sdpa_heads"] = "naive"
    # "paper": the criss-cross block's q/k/v and gamma over all pixels (the paper's baseline); "mmseg":
    # mmsegmentation's NLHead block (mmcv NonLocal2d embedded_gaussian, scaled, conv_out + norm).
    nonlocal_block: Literal["paper", "mmseg"] = "paper"
    # mmsegmentation's auxiliary FCN head has 256 channels, the official code's and sssegmentation's 512.
    aux_channels: int = 256
    # Final bilinear upsampling: mmsegmentation False, the official code True.
    align_corners: bool = False
    # Activation after the head's norms: the official code's InPlaceABNSync used leaky ReLU (slope 0.01).
    head_act: Literal["relu", "leaky_relu"] = "relu"
    # Stem max-pool ceil_mode: True in the official ResNet.
    pool_ceil_mode: bool = False
    # Run the network in channels-last (NHWC) memory: faster convolutions on GPUs, and the Triton criss-cross
    # kernel reads contiguous channel vectors (a runtime layout: the same numbers up to rounding).
    channels_last: bool = False

    def __post_init__(self) -> None:
        _expect(self.depth in (50, 101), "depth", "50 or 101", self.depth)
        _expect(self.output_stride in (8, 16, 32), "output_stride", "8, 16 or 32", self.output_stride)
        _expect(self.recurrence >= 0, "recurrence", ">= 0", self.recurrence)
        _expect(self.num_classes >= 1, "num_classes", ">= 1", self.num_classes)
        _expect(self.aux_channels >= 1, "aux_channels", ">= 1", self.aux_channels)
        _expect(self.head_channels >= 1, "head_channels", ">= 1", self.head_channels)
        _expect(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        _expect(self.qk_channels is None or self.qk_channels >= 1, "qk_channels", ">= 1", self.qk_channels)


@dataclass(frozen=True)
class DataConfig:
    """Dataset, augmentation and normalisation of the training pipeline.

    Each training image is rescaled by a random ratio from `scale_range` (continuous, or in steps of
    `scale_step` as the official code's 0.7 + randint(0, 14) / 10) following `rescale`, randomly cropped to
    at most `crop_size` (re-drawn up to 10 times while one class covers `cat_max_ratio` or more of the
    labelled pixels of the crop, then `crop_fallback`), flipped, colour-jittered as `photometric_distortion`
    says, normalised, and padded to `crop_size` (image as `pad_fill` says; label `ignore_index`) at
    `pad_position`. Resizing is OpenCV's (bilinear for images, nearest for labels), as in every source.

    The recipe fields below have no default: the sources differ on each of them (see
    `repro.pipeline.recipes` for the table), so every row states its source's choice.
    """

    dataset: Literal["cityscapes", "ade20k", "voc"]
    train_split: str
    val_split: str
    crop_size: tuple[int, int]
    batch_size: int
    scale_range: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["rgb", "bgr"]
    # "factor": cv2.resize(image, None, fx=ratio, fy=ratio) (official datasets.py generate_scale_label).
    # "keep_ratio_bounds": bounds (int(long * ratio), int(short * ratio)) of `base_size`, then a keep-ratio
    # rescale into them with sizes int(x * f + 0.5) (mmcv RandomResize + imrescale; sssegmentation Resize).
    rescale: Literal["factor", "keep_ratio_bounds"]
    # (long side, short side) of the keep-ratio rescale; required with rescale "keep_ratio_bounds".
    base_size: tuple[int, int] | None
    # None: ratio uniform in scale_range; else low + step * randint over the steps (both ends included).
    scale_step: float | None
    # 1.0 switches the re-drawn crop off (official code).
    cat_max_ratio: float
    # The crop when 10 windows in a row were rejected by cat_max_ratio: "fresh_draw" (mmseg RandomCrop.crop_bbox
    # draws an 11th, unchecked), "last_draw" (sssegmentation RandomCrop keeps the 10th); "none" with
    # cat_max_ratio 1.0, where nothing is rejected.
    crop_fallback: Literal["none", "fresh_draw", "last_draw"]
    # "none"; "hsv": mmseg PhotoMetricDistortion (OpenCV BGR->HSV of the true colours); "hsv_red_blue_swapped":
    # sssegmentation's, which applies COLOR_RGB2HSV to OpenCV's BGR image (hue turns the other way).
    photometric_distortion: Literal["none", "hsv", "hsv_red_blue_swapped"]
    # "bottom_right" (official copyMakeBorder(0, pad_h, 0, pad_w); mmseg stack_batch) or "centre"
    # (sssegmentation Padding: top = (out - h) // 2).
    pad_position: Literal["bottom_right", "centre"]
    # The image value of the padding: "normalised_zero" (0 after normalisation, i.e. the mean colour: official
    # copyMakeBorder after image -= mean, mmseg 0.x Pad after Normalize, mmseg 1.x SegDataPreProcessor
    # stack_batch, sssegmentation Padding after Normalize) or "raw_zero" (a black pixel, normalised afterwards:
    # mmseg 1.x pascal_voc12_aug.py's Pad before PackSegInputs).
    pad_fill: Literal["normalised_zero", "raw_zero"]
    root: str | None = None
    flip: bool = True
    ignore_index: int = 255
    num_workers: int = 4

    def __post_init__(self) -> None:
        _expect(min(self.crop_size) >= 1, "crop_size", "positive (h, w)", self.crop_size)
        _expect(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        low, high = self.scale_range
        _expect(0 < low <= high, "scale_range", "0 < low <= high", self.scale_range)
        _expect(self.scale_step is None or self.scale_step > 0, "scale_step", "> 0", self.scale_step)
        _expect(all(s > 0 for s in self.std), "std", "positive values", self.std)
        _expect(0 < self.cat_max_ratio <= 1, "cat_max_ratio", "in (0, 1]", self.cat_max_ratio)
        _expect(0 <= self.ignore_index <= 255, "ignore_index", "in [0, 255]", self.ignore_index)
        _expect(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        _expect(self.base_size is None or min(self.base_size) >= 1, "base_size", "positive", self.base_size)
        no_check = self.cat_max_ratio >= 1.0
        expected = "'none' exactly when cat_max_ratio is 1.0" if no_check else "'fresh_draw' or 'last_draw'"
        _expect((self.crop_fallback == "none") == no_check, "crop_fallback", expected, self.crop_fallback)
        if self.rescale == "keep_ratio_bounds":
            _require(self.base_size is not None, "base_size", "required when rescale is 'keep_ratio_bounds'")
        else:
            _expect(self.base_size is None, "base_size", "null when rescale is 'factor'", self.base_size)


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum; poly schedule lr(s) = (lr - min_lr) * (1 - s / T) ** lr_power + min_lr at step s
    (0-based), T = iterations or iterations - 1 as `poly_horizon` says, lr(s) = min_lr for s >= T.

    The recipe fields below have no default: the sources differ on each of them.
    """

    iterations: int
    lr: float
    # No default: the official README uses 1e-4, its run script 5e-4.
    weight_decay: float
    loss: Literal["ce", "ohem"]
    # GPUs of the source's run: batch_size x source_gpus is the published total batch.
    source_gpus: int
    # Official lr_poly: 0; mmseg PolyLR eta_min 1e-4; sssegmentation BaseScheduler: lr * 0.01.
    min_lr: float
    # "iterations": official lr_poly(base_lr, i_iter, num_steps) and sssegmentation PolyScheduler
    # (cur_iter / max_iters); "iterations_minus_one": mmengine PolyLR (total_iters = end - begin - 1).
    poly_horizon: Literal["iterations", "iterations_minus_one"]
    # Cross-entropy mean over "valid_pixels" (official nn.CrossEntropyLoss, sssegmentation) or over
    # "all_pixels" of the crop, ignored ones counting 0 (mmseg CrossEntropyLoss avg_non_ignore=False).
    loss_average: Literal["valid_pixels", "all_pixels"]
    lr_power: float = 0.9
    momentum: float = 0.9
    # OHEM (loss "ohem" only, and then required): the official OhemCrossEntropy2d's thresh and min_kept.
    ohem_thresh: float | None = None
    ohem_min_kept: int | None = None
    aux_weight: float = 0.4
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_accum_steps: int = 1
    checkpoint_every: int = 2000
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        _expect(self.iterations >= 1, "iterations", ">= 1", self.iterations)
        _expect(self.lr > 0, "lr", "> 0", self.lr)
        _expect(0 <= self.min_lr < self.lr, "min_lr", f"in [0, lr={self.lr})", self.min_lr)
        _expect(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _expect(self.source_gpus >= 1, "source_gpus", ">= 1", self.source_gpus)
        _expect(self.lr_power > 0, "lr_power", "> 0", self.lr_power)
        _expect(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        if self.poly_horizon == "iterations_minus_one":
            _expect(self.iterations >= 2, "iterations", ">= 2 with poly_horizon iterations_minus_one", self.iterations)
        if self.loss == "ohem":
            _require(self.ohem_thresh is not None, "ohem_thresh", "required when loss is 'ohem'")
            _require(self.ohem_min_kept is not None, "ohem_min_kept", "required when loss is 'ohem'")
            _expect(0 < self.ohem_thresh <= 1, "ohem_thresh", "in (0, 1]", self.ohem_thresh)
            _expect(self.ohem_min_kept >= 0, "ohem_min_kept", ">= 0", self.ohem_min_kept)
            # The official OhemCrossEntropy2d averages over the kept (labelled) pixels.
            _expect(self.loss_average == "valid_pixels", "loss_average", "'valid_pixels' with loss 'ohem'",
                    self.loss_average)
        else:
            for key in ("ohem_thresh", "ohem_min_kept"):
                _expect(getattr(self, key) is None, key, "null unless loss is 'ohem'", getattr(self, key))
        _expect(self.aux_weight >= 0, "aux_weight", ">= 0", self.aux_weight)
        _expect(self.grad_accum_steps >= 1, "grad_accum_steps", ">= 1", self.grad_accum_steps)
        _expect(self.checkpoint_every >= 1, "checkpoint_every", ">= 1", self.checkpoint_every)
        _expect(self.log_every >= 1, "log_every", ">= 1", self.log_every)


@dataclass(frozen=True)
class EvalConfig:
    """How the validation set is predicted and scored: each source's protocol, stated field by field.

    Single scale ("mIoU"): the image is keep-ratio rescaled to `scale` (long side, short side; None = native
    size) with OpenCV, normalised, padded bottom-right to `val_pad_size` (height, width) with the raw pixel
    value `val_pad_value` when set (PaddleSeg), and predicted in `mode`: "whole" (one forward pass) or "slide"
    (windows of `crop_size` every `stride`, placed as mmseg / the official code place them: every stride, the
    last one moved back to end at the border; a window larger than the image is either shrunk to the image,
    `slide_pad` "none" (mmseg, sssegmentation), or the image part is zero-padded bottom-right to the window
    and the prediction cropped back, "zero" (official evaluate.py pad_image)). Overlapping window logits are
    averaged. `upsample` says how the decoder's stride-8 logits reach the label's size: "input_then_label"
    (to the network input, then, after the padding is cropped off, to the label's size: mmseg, PaddleSeg,
    official) or "label_once" (straight to the label's size in one interpolation: sssegmentation; in slide
    mode windows always go to the window size first). Every resize of logits uses `resize_align_corners`.

    Multi-scale + flip ("mIoU_ms_flip", measured when `ms_flip`; `repro.predict --mode ms_flip` uses the same
    fields on any row): for each of `ms_scales` and {image, mirror}, a view is built as `ms_resize` says,
    predicted in `ms_mode`, mirrored back, resized to `ms_average_at` ("original": the label's size; "input":
    the single-scale network input, cropped and resized like a single-scale prediction afterwards) and
    averaged as softmax probabilities or logits (`ms_average`).

    `zero_union`: a class absent from both labels and predictions of the whole split is "drop"ped from the
    mean (mmseg, sssegmentation: nanmean) or counts as IoU 0 ("zero": official evaluate.py, PaddleSeg).

    The sources differ on every one of these, so none has a default: each row states its source's values.
    """

    mode: Literal["whole", "slide"]
    scale: tuple[int, int] | None
    slide_pad: Literal["none", "zero"]
    val_pad_size: tuple[int, int] | None
    val_pad_value: float | None
    upsample: Literal["input_then_label", "label_once"]
    resize_align_corners: bool
    zero_union: Literal["drop", "zero"]
    ms_flip: bool
    ms_scales: tuple[float, ...]
    ms_mode: Literal["whole", "slide"]
    # How each scale's view is made:
    # "cv2_scale_bounds": the original image keep-ratio rescaled with OpenCV into (int(long * r), int(short * r))
    #   of `scale`, or of the image's own (width, height) when `scale` is null (mmseg 0.x MultiScaleFlipAug
    #   img_ratios, its modes 2 and 1);
    # "cv2_original_ratio": the original image rescaled with OpenCV by r, sizes int(x * r + 0.5) (mmseg 1.x
    #   tta_pipeline Resize scale_factor=r);
    # "zoom_original_ratio": the normalised original image resized by r with bilinear interpolation aligning
    #   corners, sizes round(x * r) (official evaluate.py ndimage.zoom(order=1, prefilter=False));
    # "tensor_input_ratio": the normalised single-scale input (after `scale` and `val_pad_size`) resized to
    #   int(x * r + 0.5) with bilinear interpolation, half-pixel centres (PaddleSeg aug_inference);
    # "tensor_input_scale_factor": the normalised single-scale input resized with F.interpolate(scale_factor=r,
    #   align_corners=resize_align_corners), sizes floor(x * r) (sssegmentation auginference).
    ms_resize: Literal[
        "cv2_scale_bounds", "cv2_original_ratio", "zoom_original_ratio", "tensor_input_ratio",
        "tensor_input_scale_factor",
    ]
    ms_average: Literal["probs", "logits"]
    ms_average_at: Literal["original", "input"]
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    @classmethod
    def native_whole(cls, **changes: Any) -> EvalConfig:
        """A protocol of no source, for synthetic data and tests: the whole image at its native size, logits
        to the input then the label, align_corners False, zero-union classes dropped; multi-scale views are
        the input resized by the ratio, probabilities averaged at the original size. `changes` replace fields."""
        values: dict[str, Any] = dict(
            mode="whole", scale=None, slide_pad="none", val_pad_size=None, val_pad_value=None,
            upsample="input_then_label", resize_align_corners=False, zero_union="drop", ms_flip=False,
            ms_scales=(0.75, 1.0, 1.25), ms_mode="whole", ms_resize="tensor_input_ratio", ms_average="probs",
            ms_average_at="original",
        )
        values.update(changes)
        return cls(**values)

    def __post_init__(self) -> None:
        if "slide" in (self.mode, self.ms_mode):
            which = "mode" if self.mode == "slide" else "ms_mode"
            _require(self.crop_size is not None, "crop_size", f"required when {which} is 'slide'")
            _require(self.stride is not None, "stride", f"required when {which} is 'slide'")
        _expect(self.crop_size is None or min(self.crop_size) >= 1, "crop_size", "positive", self.crop_size)
        _expect(self.stride is None or min(self.stride) >= 1, "stride", "positive", self.stride)
        _expect(self.scale is None or min(self.scale) >= 1, "scale", "positive", self.scale)
        if self.crop_size is not None and self.stride is not None:
            fits = all(s <= c for s, c in zip(self.stride, self.crop_size, strict=True))
            _expect(fits, "stride", f"<= crop_size {self.crop_size} (windows must overlap or touch)", self.stride)
        _expect(len(self.ms_scales) >= 1 and min(self.ms_scales) > 0, "ms_scales", "> 0", self.ms_scales)
        _expect(self.val_pad_size is None or min(self.val_pad_size) >= 1, "val_pad_size", "positive (h, w)",
                self.val_pad_size)
        if self.val_pad_size is None:
            _expect(self.val_pad_value is None, "val_pad_value", "null when val_pad_size is null", self.val_pad_value)
        else:
            _require(self.val_pad_value is not None, "val_pad_value", "required when val_pad_size is set")
            _expect(0 <= self.val_pad_value <= 255, "val_pad_value", "a raw pixel value in [0, 255]",
                    self.val_pad_value)
        if self.upsample == "label_once":
            # One interpolation to the label's size cannot also crop a padded input.
            _expect(self.val_pad_size is None, "upsample", "'input_then_label' with val_pad_size set", self.upsample)
        if self.ms_resize.startswith("cv2_") or self.ms_resize == "zoom_original_ratio":
            # Views of the original image: the val padding of the single-scale input does not apply to them.
            _expect(self.val_pad_size is None, "ms_resize", "a 'tensor_input_*' view with val_pad_size set",
                    self.ms_resize)


@dataclass(frozen=True)
class ExperimentConfig:
    """One published table row: what to train and evaluate, and what the source reported for it."""

    name: str
    # Document and table the `reported` numbers come from.
    source: str
    reported: dict[str, float]
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    notes: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", "expected a non-empty name")
        _require(bool(self.source.strip()), "source", "expected the source document and table")
        for key, value in self.reported.items():
            _expect(key in REPORTED_KEYS, f"reported.{key}", f"a metric among {REPORTED_KEYS}", key)
            _require(math.isfinite(value), f"reported.{key}", f"expected a finite number, got {value}")
        expected = DATASET_CLASSES[self.data.dataset]
        _require(
            self.model.num_classes == expected,
            "model.num_classes",
            f"{self.data.dataset} has {expected} classes, got {self.model.num_classes}",
        )

    @property
    def backbone(self) -> str:
        """Short backbone name as the tables write it, e.g. "R-101-D8"."""
        return f"R-{self.model.depth}-D{self.model.output_stride}"


def model_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments of `models.build` for this experiment (the only config -> model translation)."""
    m = cfg.model
    return dict(
        depth=m.depth,
        stem=m.stem,
        output_stride=m.output_stride,
        head=m.head,
        recurrence=m.recurrence,
        num_classes=m.num_classes,
        norm=m.norm,
        backend=m.backend,
        aux=m.aux,
        pretrained_backbone=m.pretrained_backbone,
        qk_channels=m.qk_channels,
        head_channels=m.head_channels,
        dropout=m.dropout,
        contract_dilation=m.contract_dilation,
        nonlocal_impl=m.nonlocal_impl,
        nonlocal_block=m.nonlocal_block,
        aux_channels=m.aux_channels,
        align_corners=m.align_corners,
        head_act=m.head_act,
        pool_ceil_mode=m.pool_ceil_mode,
        channels_last=m.channels_last,
    )


# ---------------------------------------------------------------------------------------------------------
# Generic validation of YAML values against the dataclass annotations.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max; NaN fails the comparison as well


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples; raise _FieldError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _require(type(None) in args, key, "expected a value, got null")
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        _require(value in args, key, f"expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, f"expected a mapping (section), got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _require(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        key_type, value_type = args
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        _require(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        # Every integer of a config ends in torch or NumPy (seeds, sizes, steps): 64 bits at most.
        _expect(-(2**63) <= value < 2**63, key, "an integer of at most 64 bits", value)
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, f"expected a number, got {value!r}")
        _require(abs(value) <= _FLOAT_MAX, key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config annotation {_type_name(tp)} of {key} is not supported")


def _build(cls: type, raw: dict[str, Any], *, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _FieldError(f"{prefix}{key}", f"unknown key; expected one of {sorted(fields)}")
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            no_default = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            _require(not no_default, f"{prefix}{name}", "required key is missing")
            continue
        values[name] = _convert(raw[name], hints[name], f"{prefix}{name}")
    try:
        return cls(**values)
    except _FieldError as err:
        raise _FieldError(f"{prefix}{err.key}", str(err)) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to the raw mapping in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.lr=0.02")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem})") from None


def config_from_dict(raw: dict[str, Any], *, origin: str = "<dict>") -> ExperimentConfig:
    """Validate a raw mapping (as read from YAML); errors name `origin` and the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return _build(ExperimentConfig, raw)
    except _FieldError as err:
        raise ConfigError(f"{origin}: {err.key}: {err}") from None


def read_yaml_mapping(path: str | Path, *, what: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file at `path`; `what` names the kind of file in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_dataclass(path: str | Path, cls: type, *, what: str) -> Any:
    """Read the YAML at `path` and validate it into the frozen dataclass `cls` with the same rules as an
    experiment config: unknown keys, missing required keys, wrong types and bad values raise ConfigError
    naming the file and the dotted key."""
    raw = read_yaml_mapping(path, what=what)
    try:
        return _build(cls, raw)
    except _FieldError as err:
        raise ConfigError(f"{path}: {err.key}: {err}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate the experiment YAML at `path`.

    `overrides` are `section.key=value` strings (values parsed as YAML, e.g. `data.crop_size=[65,65]`).
    The experiment `name` must equal the file's stem, so results can always be traced to their file.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, what="experiment config")
    for override in overrides:
        try:
            _apply_override(raw, override)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    cfg = config_from_dict(raw, origin=str(path))
    if cfg.name != path.stem:
        raise ConfigError(f"{path}: name: expected the file stem {path.stem!r}, got {cfg.name!r}")
    return cfg


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with dotted keys replaced (validated again), e.g. {"train.iterations": 2}."""
    raw = dataclasses.asdict(cfg)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = raw
        for part in parts[:-1]:
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {dotted!r}: unknown key")
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(_lists(raw), origin=f"{cfg.name} (overridden)")


def _lists(value: Any) -> Any:
    """asdict() keeps tuples; the validator expects YAML-like lists."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "DATASET_CLASSES",
    "REPORTED_KEYS",
    "load_config",
    "load_dataclass",
    "read_yaml_mapping",
    "model_kwargs",
    "with_overrides",
]
