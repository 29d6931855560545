"""Predict label maps for any images with a config and a checkpoint, and show the criss-cross attention of
chosen points (the CCNet paper's R=1 / R=2 figure).

    python -m repro.predict CONFIG.yaml --checkpoint PATH [--checkpoint-source mmseg] IMAGE... --out DIR
        [--mode whole|slide|ms_flip] [--attention X,Y [X,Y ...]] [--set eval.scale=[2048,1024]] [--threads N]
        [--engine torch|onnxruntime|openvino] [--precision fp32|bf16]
    python -m repro.predict MODEL.onnx IMAGE... --out DIR [--engine onnxruntime|openvino]

`--engine` runs the model in torch (the default), ONNX Runtime or OpenVINO (`repro.engine.engines`; a config
and checkpoint are exported first, verified, see `repro.engine.export`); `--precision bf16` needs a CPU with
native bf16. An .onnx file written by `python -m repro.export` runs alone: its metadata gives the classes,
palette, normalisation and eval settings (default engine onnxruntime). The engine used is printed.

IMAGE is a file, a folder (its images, recursively) or a glob pattern. Per image STEM, DIR receives:
* `STEM_labels.png`: the predicted class ids (Cityscapes train ids, VOC 0..20, ADE20K 0..149) as a "P" mode
  PNG whose palette is the dataset's (`repro.engine.data.palettes`);
* `STEM_overlay.png`: the colours blended over the image; `STEM_legend.png` and `STEM_classes.csv`: the
  classes present with their share of the pixels;
* with `--attention`: `STEM_attention.png` (per point: the image with the point, where its attention lands
  after the first pass and after each further pass, composed A_r ... A_1, overlaid on the image, with the
  share falling outside the point's row and column and the peak ringed) and `STEM_attention.csv` (those
  shares, each map's largest weight and where it is).

The image is read as RGB (EXIF orientation applied) and prepared and predicted exactly as `repro.run`
evaluates the config's validation images (`EvalConfig`: rescaled keep-ratio to `eval.scale` with OpenCV,
normalised, padded as `eval.val_pad_size` says), in the config's `eval.mode` (whole or slide windows) or
`--mode` (`ms_flip`: `eval.ms_scales` x {image, mirror}, views made, predicted and averaged as the config's
ms fields say); logits are brought back to the image's size before the argmax. The attention comes from one
whole-image forward at the same scale (in whole mode, the same forward as the prediction), its maps
recomputed in the naive formulation from the query and key each pass was given, so any backend and any
recurrence can be shown.
On the CPU the model is
`models.fuse.inference_model` of the checkpoint's (BatchNorm folded; 3x3 convolutions of >= 256 channels on
Winograd F(4x4, 3x3); the ResNet blocks' residual accumulated in place; NCHW at every thread count);
`--threads N` sets torch's CPU thread count.

Nothing half-written lands in DIR: every file of the run is written into a temporary folder beside DIR
and moved in only when every image has succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import models
from models.attention import PointAttention, attention_at_points
from models.checkpoints import KEY_RULES, CheckpointError, detect_source, read_state_dict
from models.fuse import inference_model
from repro.engine.config import ConfigError, EvalConfig, ExperimentConfig, load_config, model_kwargs
from repro.engine.data.palettes import Palette, palette_for
from repro.engine.data.transforms import EvalTransform
from repro.engine.engines import ENGINES, PRECISIONS, EngineError, describe, make_engine
from repro.engine.evaluate import predict_logits
from repro.engine.export import ExportError, engine_model, metadata_for_config, read_metadata
from repro.engine.predict_figures import (
    attention_dpi,
    attention_figure,
    class_counts,
    legend_figure,
    overlay,
    peak_xy,
)
from repro.engine.runner import load_weights
from repro.io import atomic_savefig, atomic_write_bytes, write_csv_atomic
from repro.vocabulary import (
    CHECKPOINT_SOURCES,
    EXIT_BAD_INPUT,
    EXIT_CANNOT_WRITE,
    EXIT_CONFIG,
    EXIT_OK,
    checkpoint_source,
    error_line,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
MODES = ("whole", "slide", "ms_flip")
PROG = "python -m repro.predict"


class PredictError(ValueError):
    """Bad input to a prediction run (image, point, checkpoint, mode); the message says which and why.
    `exit_code`: 4 for an unusable input file (the default), 2 for a bad option, 5 for an output that cannot
    be written (the README's codes, `repro.vocabulary`)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------
# Inputs


def collect_images(inputs: Sequence[str | os.PathLike], *, exclude: Path | None = None) -> list[Path]:
    """Image files named by `inputs`: files as given, folders searched recursively for image suffixes, glob
    patterns expanded; in order, without repeats. Folder searches skip `exclude` (the output folder, so a
    rerun into a folder inside the inputs does not predict its own outputs). Raises PredictError for an
    input that names nothing."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and (skip is None or not p.resolve().is_relative_to(skip))
            )
            if not matches:
                raise PredictError(f"folder {text!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise PredictError(f"no files match the pattern {text!r}")
        else:
            raise PredictError(f"image {text!r} does not exist")
        found.extend(matches)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise PredictError("no images given")
    stems: dict[str, Path] = {}
    for path in unique:
        if path.stem in stems:
            raise PredictError(
                f"{stems[path.stem]} and {path} would write the same output files ({path.stem}_*); "
                "predict them in separate runs"
            )
        stems[path.stem] = path
    return unique


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of the image at `path` as it will be read (EXIF rotation applied); PredictError if the
    file is not an image PIL can open."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PredictError(f"cannot read image {str(path)!r}: {err}") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied; PredictError if unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PredictError(f"cannot read image {str(path)!r}: {err}") from None


def parse_point(text: str) -> tuple[int, int]:
    """"X,Y" (pixel column, pixel row of the input image) -> (x, y)."""
    parts = text.split(",")
    try:
        x, y = (int(part) for part in parts)
    except ValueError:
        raise PredictError(
            f"--attention expects X,Y pixel coordinates such as 512,300, got {text!r} "
            "(list the images before --attention)", exit_code=EXIT_CONFIG,
        ) from None
    if x < 0 or y < 0:
        raise PredictError(f"--attention point {text!r}: coordinates must be >= 0", exit_code=EXIT_CONFIG)
    return x, y


# ---------------------------------------------------------------------------------------------------------
# Model


def _classifier_classes(checkpoint: Path, source: str | None) -> tuple[str, int] | None:
    """(key, classes) of the checkpoint's decode classifier, or None when it cannot be read or found."""
    try:
        state = read_state_dict(checkpoint)
        source = source or detect_source(state)
    except Exception:  # noqa: BLE001 - only a hint for an error already being raised
        return None
    candidates = ["decode_head.classifier.weight"] + [
        rule[0].replace("{p}", "weight")
        for rule in KEY_RULES.get(source, ())
        if rule[1] == "decode_head.classifier.{p}"
    ]
    for key in candidates:
        if key in state and state[key].dim() >= 1:
            return key, int(state[key].shape[0])
    return None


def load_model(cfg: ExperimentConfig, checkpoint: Path, *, source: str | None = None) -> nn.Module:
    """`models.build` from the config with the checkpoint's weights (through the runner's `load_weights`, the
    same path as `python -m repro.run --eval-only`), in eval mode on the CPU.

    The config's ImageNet backbone is not loaded: the checkpoint replaces every weight. PredictError names
    the keys and shapes when the checkpoint does not fit, and says so when its class count differs.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise PredictError(f"checkpoint {str(checkpoint)!r} does not exist")
    source = checkpoint_source(source)
    model = models.build(**{**model_kwargs(cfg), "pretrained_backbone": None})
    try:
        state = models.safe_load(checkpoint)
    except CheckpointError as err:
        raise PredictError(f"cannot read checkpoint {str(checkpoint)!r}: {err}") from err
    try:
        load_weights(model, checkpoint, source=source, state=state)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        found = _classifier_classes(checkpoint, source)
        expected = cfg.model.num_classes
        if found is not None and found[1] != expected:
            key, classes = found
            raise PredictError(
                f"class count mismatch: checkpoint {str(checkpoint)!r} predicts {classes} classes ({key}), but "
                f"config {cfg.name!r} is {cfg.data.dataset} with {expected}; use a config of the dataset the "
                "checkpoint was trained on"
            ) from err
        raise PredictError(f"checkpoint {str(checkpoint)!r} does not fit config {cfg.name!r}: {err}") from err
    return model.eval()


@dataclass(frozen=True)
class Prediction:
    """labels: (H, W) uint8 class ids at the image's size; attention: the points' maps, or None."""

    labels: np.ndarray
    attention: PointAttention | None


@dataclass(frozen=True)
class Predictor:
    """A model with everything needed to predict one image as its config says.

    mode: "whole", "slide" (windows of eval_cfg.crop_size every eval_cfg.stride) or "ms_flip" (eval_cfg's
    ms_scales and mirror, each view in eval_cfg.ms_mode). Images are prepared by the validation transform
    (`transform`: eval_cfg's scale and val padding, mean / std in channel_order).
    """

    model: nn.Module
    palette: Palette
    eval_cfg: EvalConfig
    mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    device: torch.device
    title: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PredictError(f"unknown mode {self.mode!r}; expected one of {MODES}", exit_code=EXIT_CONFIG)

    @property
    def num_classes(self) -> int:
        return self.palette.num_classes

    @property
    def transform(self) -> EvalTransform:
        """The validation transform of the config: the same input as `repro.run` evaluates."""
        e = self.eval_cfg
        return EvalTransform(mean=self.mean, std=self.std, channel_order=self.channel_order, scale=e.scale,
                             pad_size=e.val_pad_size, pad_value=e.val_pad_value)

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, H', W') normalised, rescaled to eval_cfg.scale (OpenCV bilinear, as
        the evaluation) and padded to eval_cfg.val_pad_size when set."""
        return self.transform.input(image).unsqueeze(0).to(self.device)

    def predict(self, image: np.ndarray, points_xy: Sequence[tuple[int, int]] = ()) -> Prediction:
        """Labels of one (H, W, 3) uint8 RGB image, and the attention of `points_xy` ((x, y) image pixels)."""
        height, width = image.shape[:2]
        for x, y in points_xy:
            if not (0 <= x < width and 0 <= y < height):
                raise PredictError(f"--attention point ({x},{y}) is outside the image ({width} x {height} pixels)",
                                   exit_code=EXIT_CONFIG)
        transform = self.transform
        tensor = self.input_tensor(image)
        scaled_h, scaled_w = transform.resized_size(height, width)
        attention = None
        if points_xy and describe(self.model) != "torch fp32":
            raise PredictError(f"--attention reads the torch model's attention maps; the model runs on "
                               f"{describe(self.model)}: use --engine torch --precision fp32 for attention")
        if points_xy:
            # Image pixel centres onto the rescaled input the model sees.
            scaled = [((x + 0.5) * scaled_w / width - 0.5, (y + 0.5) * scaled_h / height - 0.5) for x, y in points_xy]
            try:
                attention = attention_at_points(self.model, tensor, scaled)
            except ValueError as err:
                raise PredictError(f"--attention: {err}", exit_code=EXIT_CONFIG) from None
            attention = dataclasses.replace(
                attention, points_xy=tuple((float(x), float(y)) for x, y in points_xy),
                maps=attention.maps.cpu(), off_cross=attention.off_cross.cpu(),
            )
        if attention is not None and self.mode == "whole":
            logits = attention.logits[:, :, :scaled_h, :scaled_w]
        else:
            logits = predict_logits(self.model, tensor, eval_cfg=self.eval_cfg, num_classes=self.num_classes,
                                    multiscale=self.mode == "ms_flip", output_size=(height, width),
                                    resized_size=(scaled_h, scaled_w), raw_image=image, transform=transform)
        if logits.shape[1] != self.num_classes:
            raise PredictError(
                f"class count mismatch: the model predicts {logits.shape[1]} classes, the "
                f"{self.palette.dataset} palette has {self.num_classes}"
            )
        if tuple(logits.shape[-2:]) != (height, width):
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear",
                                   align_corners=self.eval_cfg.resize_align_corners)
        labels = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        if attention is not None:
            attention = dataclasses.replace(attention, logits=torch.empty(0))
        return Prediction(labels=labels, attention=attention)


def eval_config_for(cfg: ExperimentConfig, mode: str | None) -> tuple[EvalConfig, str]:
    """The eval section and the mode to predict with: the config's own `eval.mode` unless `mode` says
    otherwise ("ms_flip" predicts each view in the config's `eval.ms_mode`)."""
    if mode is None or mode == "ms_flip":
        return cfg.eval, mode or cfg.eval.mode
    if mode not in MODES:
        raise PredictError(f"unknown mode {mode!r}; expected one of {MODES}", exit_code=EXIT_CONFIG)
    try:
        return dataclasses.replace(cfg.eval, mode=mode), mode
    except ValueError as err:
        raise PredictError(
            f"--mode {mode}: {err} in config {cfg.name!r} (set it, e.g. --set eval.crop_size=[769,769] "
            "--set eval.stride=[513,513])", exit_code=EXIT_CONFIG,
        ) from None


def predictor_from_config(
    cfg: ExperimentConfig,
    checkpoint: Path,
    *,
    source: str | None = None,
    mode: str | None = None,
    device: torch.device | str = "cpu",
    engine: str = "torch",
    precision: str = "fp32",
) -> Predictor:
    """A `Predictor` for an experiment config and a checkpoint (ours or a released one), on `engine` at
    `precision` (`repro.engine.engines`; engines other than torch run on the CPU)."""
    eval_cfg, mode = eval_config_for(cfg, mode)
    device = torch.device(device if engine == "torch" else "cpu")
    model = load_model(cfg, checkpoint, source=source).to(device)
    if engine != "torch" or precision != "fp32":
        metadata = metadata_for_config(cfg, checkpoint=checkpoint) if engine != "torch" else None
        model = engine_model(model, engine=engine, precision=precision, metadata=metadata)
    elif device.type == "cpu":  # BatchNorm folded, Winograd, residuals in place: see models.fuse
        model = inference_model(model, torch.zeros(1, 3, 65, 65))
    return Predictor(
        model=model, palette=palette_for(cfg.data.dataset), eval_cfg=eval_cfg, mode=mode,
        mean=cfg.data.mean, std=cfg.data.std, channel_order=cfg.data.channel_order, device=device,
        title=f"{cfg.name} ({cfg.backbone}, R={cfg.model.recurrence}), {Path(checkpoint).name}, mode {mode}, "
              f"engine {describe(model)}",
    )


def predictor_from_onnx(path: Path, *, mode: str | None = None, engine: str = "onnxruntime",
                        precision: str = "fp32") -> Predictor:
    """A `Predictor` for a file written by `python -m repro.export`: classes, palette, normalisation and eval
    settings from its metadata (ExportError when it has none)."""
    meta = read_metadata(path)
    if engine == "torch":
        raise PredictError(f"{str(path)!r} is an ONNX file: run it with --engine onnxruntime or openvino "
                           "(torch needs the config and the checkpoint)")
    raw = meta.raw
    eval_cfg = meta.eval_cfg
    if mode not in (None, "ms_flip"):
        if mode not in MODES:
            raise PredictError(f"unknown mode {mode!r}; expected one of {MODES}")
        try:
            eval_cfg = dataclasses.replace(eval_cfg, mode=mode)
        except ValueError as err:
            raise PredictError(f"--mode {mode}: {err} in the metadata of {str(path)!r}") from None
    model = make_engine(engine, onnx_path=path, precision=precision)
    return Predictor(
        model=model, palette=meta.palette, eval_cfg=eval_cfg, mode=mode or eval_cfg.mode,
        mean=tuple(raw["mean"]), std=tuple(raw["std"]), channel_order=raw["channel_order"],
        device=torch.device("cpu"),
        title=f"{raw['config']} ({Path(path).name}), mode {mode or eval_cfg.mode}, engine {describe(model)}",
    )


# ---------------------------------------------------------------------------------------------------------
# Outputs


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_png(labels: np.ndarray, palette: Palette) -> Image.Image:
    """(H, W) class ids -> "P" mode image whose pixel values are the ids and whose palette is the dataset's."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got {labels.shape}")
    palette.colourise(labels)  # checks the value range
    image = Image.fromarray(labels.astype(np.uint8))
    image.putpalette(palette.png_palette())
    return image


def write_prediction(
    folder: Path, stem: str, image: np.ndarray, prediction: Prediction, *, palette: Palette, title: str
) -> list[Path]:
    """Write one image's files (see the module docstring) into `folder`; returns their paths."""
    folder = Path(folder)
    labels = prediction.labels
    written = [
        atomic_write_bytes(folder / f"{stem}_labels.png", _png_bytes(label_png(labels, palette))),
        atomic_write_bytes(folder / f"{stem}_overlay.png",
                           _png_bytes(Image.fromarray(overlay(image, labels, palette)))),
    ]
    counts = class_counts(labels, palette.num_classes)
    present = np.flatnonzero(counts)
    written.append(write_csv_atomic(pd.DataFrame({
        "image": stem, "class_id": present, "class_name": [palette.names[i] for i in present],
        "pixels": counts[present], "share": counts[present] / max(int(counts.sum()), 1),
    }), folder / f"{stem}_classes.csv"))
    legend = legend_figure(palette, counts, title=f"{stem}: classes present")
    written.append(atomic_savefig(legend, folder / f"{stem}_legend.png", dpi=120))
    attention = prediction.attention
    if attention is not None:
        maps = attention.maps[0].numpy()
        shares = attention.off_cross[0].numpy()
        figure = attention_figure(
            image, maps=maps, points_xy=list(attention.points_xy), cells=list(attention.cells),
            off_cross=shares, title=f"{stem}: criss-cross attention, {title}",
        )
        written.append(atomic_savefig(figure, folder / f"{stem}_attention.png",
                                      dpi=attention_dpi(attention.grid_hw)))
        rows = []
        for index, ((x, y), (row, col)) in enumerate(zip(attention.points_xy, attention.cells, strict=True)):
            for loop in range(attention.passes):
                peak = peak_xy(maps[index, loop], image_hw=image.shape[:2])
                rows.append({
                    "image": stem, "point_x": int(x), "point_y": int(y), "cell_row": row, "cell_col": col,
                    "grid_h": attention.grid_hw[0], "grid_w": attention.grid_hw[1], "after_passes": loop + 1,
                    "share_off_row_column": float(shares[index, loop]),
                    "max_weight": float(maps[index, loop].max()),
                    "peak_x": round(peak[0], 1), "peak_y": round(peak[1], 1),
                })
        written.append(write_csv_atomic(pd.DataFrame(rows), folder / f"{stem}_attention.csv"))
    return written


def check_inputs(images: Sequence[Path], out: Path, points_xy: Sequence[tuple[int, int]] = ()) -> None:
    """Before any work: every image opens and holds every point, and `out` is (or can become) a folder."""
    if Path(out).exists() and not Path(out).is_dir():
        raise PredictError(f"--out {str(out)!r} exists and is not a folder", exit_code=EXIT_CANNOT_WRITE)
    for path in images:
        height, width = image_size(Path(path))
        for x, y in points_xy:
            if not (x < width and y < height):
                raise PredictError(
                    f"--attention point ({x},{y}) is outside image {str(path)!r} ({width} x {height} pixels)",
                    exit_code=EXIT_CONFIG,
                )


def predict_to_folder(
    predictor: Predictor,
    images: Sequence[Path],
    out: Path,
    *,
    points_xy: Sequence[tuple[int, int]] = (),
    progress: bool = True,
) -> list[Path]:
    """Predict every image and write its files into `out`, all or nothing; returns the paths in `out`.

    Every image is checked first (readable, points inside); the files are then written into a temporary
    folder beside `out` and moved into `out` only after the last image succeeded. On any error (or Ctrl-C)
    the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    images = [Path(path) for path in images]
    check_inputs(images, out, points_xy)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("predict", total=len(images))
            for path in images:
                bar.update(task, description=f"predict {path.name}")
                image = read_image(path)
                prediction = predictor.predict(image, points_xy)
                write_prediction(staging, path.stem, image, prediction, palette=predictor.palette,
                                 title=predictor.title)
                bar.advance(task)
        out.mkdir(parents=True, exist_ok=True)
        moved = []
        for produced in sorted(staging.iterdir()):
            target = out / produced.name
            os.replace(produced, target)
            moved.append(target)
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Colour label maps and criss-cross attention figures for any images.",
        epilog="Exit codes: 0 done, 2 config or option error, 4 unusable checkpoint or image, 5 cannot write.",
    )
    parser.add_argument("config", type=Path,
                        help="experiment YAML naming the model and dataset, or an .onnx from repro.export")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--checkpoint", type=Path, help="weights: ours or a released checkpoint (with a YAML)")
    parser.add_argument("--checkpoint-source", choices=CHECKPOINT_SOURCES, default=None,
                        help="layout of the checkpoint: ccrepro (this project's; alias ours), mmseg, "
                             "sssegmentation, official, ...; detected from its keys when omitted")
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="inference mode (default: the config's eval.mode; ms_flip: multi-scale + flip)")
    parser.add_argument("--attention", nargs="+", default=[], metavar="X,Y",
                        help="pixel coordinates (column,row) of points whose attention to draw")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set eval.scale=[1024,512] (repeatable)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="inference engine (default torch; onnxruntime for an .onnx)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: torch autocast / OpenVINO hint, only on a CPU with native bf16")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.config.suffix != ".onnx" and args.checkpoint is None:
        parser.error("--checkpoint PATH is required with a config (an .onnx file runs alone)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        points = [parse_point(text) for text in args.attention]
        images = collect_images(args.images, exclude=args.out)
        # Cheap checks first: a bad image or point should not wait for a large checkpoint to load.
        check_inputs(images, args.out, points)
        if args.config.suffix == ".onnx":
            predictor = predictor_from_onnx(args.config, mode=args.mode, engine=args.engine or "onnxruntime",
                                            precision=args.precision)
        else:
            cfg = load_config(args.config, args.overrides)
            device = args.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            elif device == "cuda" and not torch.cuda.is_available():
                raise PredictError("--device cuda: no CUDA device is available", exit_code=EXIT_CONFIG)
            predictor = predictor_from_config(cfg, args.checkpoint, source=args.checkpoint_source, mode=args.mode,
                                              device=device, engine=args.engine or "torch",
                                              precision=args.precision)
        written = predict_to_folder(predictor, images, args.out, points_xy=points, progress=not args.no_progress)
    except (PredictError, ExportError) as err:
        print(error_line(PROG, err), file=sys.stderr)
        return err.exit_code
    except (ConfigError, FileNotFoundError, EngineError) as err:
        print(error_line(PROG, err), file=sys.stderr)
        return EXIT_CONFIG
    except OSError as err:
        print(error_line(PROG, f"cannot write {err.filename or args.out}: {err.strerror or err}"), file=sys.stderr)
        return EXIT_CANNOT_WRITE
    print(f"wrote {len(written)} files for {len(images)} image(s) to {args.out} (engine {describe(predictor.model)})")
    return EXIT_OK
