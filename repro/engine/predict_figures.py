"""Pictures of a prediction: the colour overlay, the legend of the classes present, and the attention figure
(the image with the point, where its attention lands after each criss-cross pass, overlaid on the image).

Figures are `matplotlib.figure.Figure` objects (no pyplot state); the callers write them with
`repro.io.atomic_savefig`.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from repro.engine.data.palettes import Palette

OVERLAY_ALPHA = 0.5


def overlay(image: np.ndarray, labels: np.ndarray, palette: Palette, *, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 image blended with the colours of (H, W) labels: (1 - alpha) image + alpha colour."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * palette.colourise(labels).astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) pixel count of every class in `labels`."""
    return np.bincount(np.asarray(labels).ravel(), minlength=num_classes)[:num_classes]


def legend_figure(palette: Palette, counts: np.ndarray, *, title: str) -> Figure:
    """A legend of the classes present (count > 0), largest first: colour, id, name, share of the pixels."""
    present = [int(index) for index in np.argsort(-counts, kind="stable") if counts[index] > 0]
    total = max(int(counts.sum()), 1)
    rows = max(len(present), 1)
    figure = Figure(figsize=(4.2, 0.6 + 0.28 * rows))
    axis = figure.add_axes((0.02, 0.02, 0.96, 0.96 - 0.35 / (0.6 + 0.28 * rows)))
    axis.set_xlim(0, 10)
    axis.set_ylim(rows, 0)
    axis.axis("off")
    figure.suptitle(title, fontsize=9)
    for row, index in enumerate(present):
        colour = palette.colours[index] / 255.0
        axis.add_patch(Rectangle((0.1, row + 0.15), 1.2, 0.7, facecolor=colour, edgecolor="black", lw=0.5))
        share = 100.0 * counts[index] / total
        axis.text(1.6, row + 0.5, f"{index:>3}  {palette.names[index]}  ({share:.1f}%)", va="center", fontsize=8)
    return figure


PANEL_INCHES = 3.6


def attention_dpi(grid_hw: tuple[int, int], *, low: int = 110, high: int = 220) -> int:
    """Resolution at which every grid cell gets about 2 screen pixels in a panel (within [low, high])."""
    return int(min(max(2 * max(grid_hw) / PANEL_INCHES, low), high))


def peak_xy(weights: np.ndarray, *, image_hw: tuple[int, int]) -> tuple[float, float]:
    """(x, y) image pixel at the centre of the grid cell where the (h, w) map `weights` is largest."""
    grid_h, grid_w = weights.shape
    row, col = np.unravel_index(int(np.argmax(weights)), weights.shape)
    height, width = image_hw
    return (col + 0.5) * width / grid_w - 0.5, (row + 0.5) * height / grid_h - 0.5


def attention_figure(
    image: np.ndarray,
    *,
    maps: np.ndarray,
    points_xy: list[tuple[float, float]],
    cells: list[tuple[int, int]],
    off_cross: np.ndarray,
    title: str,
) -> Figure:
    """The paper's attention figure, one row per point.

    Args:
        image: (H, W, 3) uint8, the image as given.
        maps: (N, R, h, w) attention after 1..R passes on the model's grid; drawn over the image with each
            cell covering the pixels it stands for.
        points_xy: N (x, y) points in image pixels; cells: their (row, col) grid cells.
        off_cross: (N, R) share of each map outside the point's row and column.
    """
    count, passes = maps.shape[:2]
    height, width = image.shape[:2]
    grid_h, grid_w = maps.shape[-2:]
    panel_w = PANEL_INCHES
    panel_h = max(panel_w * height / width, 1.6) + 0.7
    figure = Figure(figsize=(panel_w * (passes + 1) + 0.6, panel_h * count + 0.5), layout="constrained")
    axes = np.asarray(figure.subplots(count, passes + 1, squeeze=False))
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    grey = np.repeat(image.astype(np.float32).mean(-1, keepdims=True), 3, axis=-1) / 255.0
    for index in range(count):
        x, y = points_xy[index]
        row, col = cells[index]
        axes[index, 0].imshow(image, extent=extent)
        axes[index, 0].set_title(f"input, point (x={x:g}, y={y:g})\ncell ({row}, {col}) of {grid_h} x {grid_w}",
                                 fontsize=8)
        for loop in range(passes):
            axis = axes[index, loop + 1]
            weights = maps[index, loop]
            axis.imshow(grey, extent=extent)
            shown = axis.imshow(
                weights, extent=extent, cmap="jet", alpha=0.6, interpolation="nearest",
                vmin=0.0, vmax=max(float(weights.max()), 1e-12),
            )
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            # A peaked map on a large grid can be a cell smaller than a screen pixel: ring its maximum.
            peak_x, peak_y = peak_xy(weights, image_hw=(height, width))
            axis.plot(peak_x, peak_y, marker="o", markersize=11, mfc="none", mec="white", mew=1.5)
            which = "first pass" if loop == 0 else f"effective, A{loop + 1}" + "".join(
                f"·A{earlier}" for earlier in range(loop, 0, -1))
            axis.set_title(f"after R={loop + 1} ({which}), o: peak\noff row/column: {off_cross[index, loop]:.3f}",
                           fontsize=8)
        for axis in axes[index]:
            axis.plot(x, y, marker="x", color="white", markersize=9, mew=2.5)
            axis.plot(x, y, marker="x", color="black", markersize=7, mew=1.2)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    return figure
