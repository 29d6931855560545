"""What a run folder shows a researcher: training curves (loss, learning rate, validation mIoU against the
iteration, from `train_log.jsonl`), per-class IoU with class names, and the confusion matrix of each
evaluation (CSV of counts + a PNG normalised per ground-truth class).

`read_log` follows resumes: a "start"/"resume" record at step s drops the earlier records after step s (the
steps a resumed run repeated), so a curve has one point per step, from the run that produced the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from repro.io import atomic_savefig, atomic_write_text, write_csv_atomic

TRAIN_LOG = "train_log.jsonl"
CURVES = "curves.png"


def read_log(path: Path) -> dict[str, list[dict]]:
    """Records of a train_log.jsonl by event ("train", "val", "eval"), resumed steps replaced; torn or
    non-JSON lines are skipped (a log may end on a partial line after a crash)."""
    events: dict[str, list[dict]] = {"train": [], "val": [], "eval": []}
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        event = record.get("event", "train")
        if event in ("start", "resume"):
            step = record.get("step", 0) or 0
            for kind in ("train", "val"):
                events[kind] = [r for r in events[kind] if (r.get("step") or 0) <= step]
            continue
        events.setdefault(event, []).append(record)
    return events


def draw_curves(run_dir: Path, out: Path | None = None) -> Path | None:
    """RUN_DIR/curves.png (or `out`): loss, learning rate and validation mIoU against the iteration; None when
    the log has no training record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_log(Path(run_dir) / TRAIN_LOG)
    train = [r for r in events["train"] if "loss" in r and "step" in r]
    if not train:
        return None
    val = [r for r in events["val"] if r.get("mIoU") is not None]
    final = [r for r in events.get("eval", []) if r.get("metric") == "mIoU" and r.get("mIoU") is not None]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="iteration")
    axes[1].plot(steps, [r["lr"] for r in train], lw=1, color="tab:orange")
    axes[1].set(title="learning rate", xlabel="iteration")
    if val:
        axes[2].plot([r["step"] for r in val], [r["mIoU"] for r in val], marker="o", label="validation")
    if final and final[-1].get("step") is not None:
        axes[2].scatter([final[-1]["step"]], [final[-1]["mIoU"]], color="tab:red", zorder=3, label="final evaluation")
    axes[2].set(title="mIoU (%)", xlabel="iteration")
    if val or final:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no validation logged\n(train.val_every)", ha="center", va="center",
                     transform=axes[2].transAxes)
    name = train[-1].get("experiment", Path(run_dir).name)
    figure.suptitle(f"{name} ({Path(run_dir).as_posix()})", fontsize=10)
    figure.tight_layout()
    path = atomic_savefig(figure, out or Path(run_dir) / CURVES, dpi=110)
    plt.close(figure)
    return path


def write_iou_table(path: Path, names: Sequence[str], results: Mapping[str, object]) -> Path:
    """CSV: one row per class (name), one IoU column (percent) per metric; empty where the class is absent."""
    frame = pd.DataFrame({"class_id": range(len(names)), "class": list(names)})
    for metric, result in results.items():
        frame[f"{metric}_iou"] = [None if math.isnan(v) else round(v, 4) for v in result.iou_per_class]
    return write_csv_atomic(frame, path)


def iou_markdown(path: Path) -> str:
    """A markdown table of an iou_per_class.csv (for the report's run pages)."""
    frame = pd.read_csv(path)
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in frame.itertuples(index=False):
        cells = ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.2f}" if isinstance(v, float) else str(v))
                 for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_confusion(run_dir: Path, metric: str, matrix: np.ndarray, names: Sequence[str]) -> tuple[Path, Path]:
    """RUN_DIR/confusion_METRIC.csv (pixel counts, rows = ground truth, columns = prediction, class names as
    headers) and confusion_METRIC.png (each row divided by its total: the share of the class's pixels
    predicted as each class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, dtype=np.int64)
    frame = pd.DataFrame(matrix, index=pd.Index(list(names), name="ground truth / predicted"), columns=list(names))
    csv_path = Path(run_dir) / f"confusion_{metric}.csv"
    atomic_write_text(csv_path, frame.to_csv())
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)
    count = len(names)
    # Class names at 8 pt up to 30 classes; beyond, 4 pt names need ~5.5 pt each (ADE20K's 150: a 15 inch
    # figure, 1500 px at 100 dpi; drawn at 0.35 inch a class it was 3000 px and 3 s of a run's evaluation).
    fontsize = 8 if count <= 30 else 4
    side = max(4.0, 0.35 * count + 2) if count <= 30 else min(0.085 * count + 2.5, 30.0)
    figure, axis = plt.subplots(figsize=(side, side))
    image = axis.imshow(normalised, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(count), list(names), rotation=90, fontsize=fontsize)
    axis.set_yticks(range(count), list(names), fontsize=fontsize)
    axis.set(xlabel="predicted", ylabel="ground truth", title=f"{metric}: confusion, each row / its pixels")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    png_path = atomic_savefig(figure, Path(run_dir) / f"confusion_{metric}.png", dpi=100)
    plt.close(figure)
    return csv_path, png_path
