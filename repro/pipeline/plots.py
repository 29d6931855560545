"""Plots of results/claims.csv (written by `python -m repro.claims`), rebuilt from the CSV alone.

* claims_flops.png: forward GFLOPs (2 x MACs) against pixel count H*W, log-log, one line per variant
  (analytic), fvcore counts as markers, the paper's numbers as stars.
* claims_memory.png: memory beyond the input (MiB) of a training step (left) and a forward pass (right)
  against H*W, log-log, the fake-mode estimate as lines, allocator measurements as markers, the paper's
  numbers as stars (the paper does not say which of the two steps it measured).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from repro.io import atomic_savefig
from repro.measure.steps import METHOD_ANALYTIC, METHOD_FAKE_MEMORY, METHOD_FVCORE
from repro.measure.steps import short_method as _short
from repro.vocabulary import OP_VARIANTS, variant_label


def _label(row: pd.Series) -> str:
    return variant_label(row.variant, row.recurrence) if row.variant in OP_VARIANTS else row.variant


def _save(figure: Figure, path: Path) -> None:
    atomic_savefig(figure, path, dpi=120, bbox_inches="tight")


def _panel(axes: Axes, frame: pd.DataFrame, *, line_method: str, unit: str, title: str) -> None:
    frame = frame.assign(pixels=frame.height * frame.width, label=frame.apply(_label, axis=1))
    colours: dict[str, str] = {}
    for label, group in frame[frame.method == line_method].groupby("label", sort=False):
        group = group.sort_values("pixels")
        # non_local_sdpa lies on non_local_naive (math kernel): dashed so both stay visible.
        style = "--" if label == "non_local_sdpa" else "-"
        (line,) = axes.plot(group.pixels, group.value, style, label=f"{label}, {_short(line_method)}")
        colours[label] = line.get_color()
    measured = frame[(frame.method != line_method) & frame.value.notna()]
    for (label, method), group in measured.groupby(["label", "method"], sort=False):
        axes.plot(group.pixels, group.value, "o", mfc="none", color=colours.get(label, "black"),
                  label=f"{label}, {_short(method)}")
    reported = frame[pd.to_numeric(frame.reported_value, errors="coerce").notna()].drop_duplicates(
        subset=["label"])
    for _, row in reported.iterrows():
        axes.plot(row.pixels, float(row.reported_value), "*", ms=14, color=colours.get(row.label, "black"),
                  markeredgecolor="black")
        axes.annotate(f"paper: {float(row.reported_value):g}", (row.pixels, float(row.reported_value)),
                      textcoords="offset points", xytext=(8, -4), fontsize=8)
    axes.plot([], [], "*", ms=12, color="grey", markeredgecolor="black", label="paper, 97x97 (stars)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("feature-map pixels H x W (97 x 97 = 9409 is a 769 crop at output stride 8)")
    axes.set_ylabel(unit)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)


def plot_claims(csv_path: Path, out_dir: Path) -> list[Path]:
    """Draw both plots from `csv_path` into `out_dir`; returns the paths written."""
    if not Path(csv_path).is_file():
        raise FileNotFoundError(f"claims CSV {csv_path} does not exist; run `python -m repro.claims` first")
    frame = pd.read_csv(csv_path)
    flops = frame[(frame.claim == "flops") & (frame.metric == "flops")
                  & frame.method.isin([METHOD_ANALYTIC, METHOD_FVCORE])]
    memory = frame[(frame.claim == "memory") & (frame.metric == "train_step_peak_extra")]
    forward = frame[(frame.claim == "memory") & (frame.metric == "forward_peak_extra")]
    paths = []
    figure = Figure(figsize=(9, 6.5))
    axes = figure.subplots()
    _panel(axes, flops, line_method=METHOD_ANALYTIC, unit="forward GFLOPs (2 x multiply-accumulates)",
           title="Context module FLOPs, B=1, C=512, Cqk=64: criss-cross ~ HW(H+W), non-local ~ (HW)^2")
    paths.append(out_dir / "claims_flops.png")
    _save(figure, paths[-1])
    figure = Figure(figsize=(16, 6.5))
    train_axes, forward_axes = figure.subplots(1, 2)
    _panel(train_axes, memory, line_method=METHOD_FAKE_MEMORY, unit="peak beyond the input (MiB; paper: MB)",
           title="Training step (forward + backward), B=1, C=512, Cqk=64, fp32")
    _panel(forward_axes, forward, line_method=METHOD_FAKE_MEMORY, unit="peak beyond the input (MiB; paper: MB)",
           title="Forward only (no autograd), same modules")
    paths.append(out_dir / "claims_memory.png")
    _save(figure, paths[-1])
    return paths
