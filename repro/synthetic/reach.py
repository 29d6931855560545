"""Attention reach of a trained synthetic model: where one pixel's attention lands after R=1 and R=2.

Like the official CCNet visualisation, the effective attention after two loops is the product of the two
loops' criss-cross attention maps: A_eff = A_2 @ A_1 (rows: query pixels, columns: attended pixels). The maps
are computed *explicitly* from the query/key each loop was given (`ops.criss_cross_map`: a dense (HW x HW)
matrix, -inf off the pixel's row and column, one joint softmax), not through the op, so the figure is an
independent view of what the op does (the tests check `criss_cross_map @ value` equals the op). The same maps
for any model and image, at any size: `python -m repro.predict ... --attention X,Y`.

Writes `results/plots/attention_reach.png` and `results/attention_reach.csv` (the share of the chosen
pixel's attention that lands on the marker after each loop; exactly 0 after one loop because the marker is
off the pixel's row and column).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import models
from models.attention import record_criss_cross
from models.synthetic import SyntheticSegmenter
from ops.cca_maps import criss_cross_map
from repro.io import atomic_savefig, write_csv_atomic
from repro.synthetic.ablation import VAL_SEED, checkpoint_path
from repro.synthetic.data import IGNORE_INDEX, MarkerTask, generate


def loop_maps(model: SyntheticSegmenter, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-loop dense criss-cross maps (B, HW, HW) of a trained `SyntheticSegmenter` with R >= 1, from the query
    and key each loop was given (`models.attention.record_criss_cross`)."""
    if model.variant == "nonlocal" or model.recurrence < 1:
        raise ValueError(
            f"attention reach needs a criss-cross model with R >= 1, got variant {model.variant!r}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_criss_cross(model) as passes:
            model(images)
    finally:
        model.train(was_training)
    return [criss_cross_map(recorded.query, recorded.key) for recorded in passes]


def effective_maps(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cumulative products: [A_1, A_2 A_1, A_3 A_2 A_1, ...]."""
    composed = [maps[0]]
    for later in maps[1:]:
        composed.append(torch.bmm(later, composed[-1]))
    return composed


def _checkpoint_for(out: Path, steps: int, seeds: tuple[int, ...]) -> tuple[Path, int]:
    for seed in sorted(seeds):
        path = checkpoint_path(out, "R2", seed, steps)
        if path.exists():
            return path, seed
    raise FileNotFoundError(
        f"no trained R2 checkpoint under {out / 'synthetic_checkpoints'} for steps={steps}, seeds={seeds}; "
        "run `python -m repro.synthetic` first"
    )


def load_trained_r2(
    *, out: Path, steps: int, seeds: tuple[int, ...], task: MarkerTask | None = None
) -> tuple[SyntheticSegmenter, Path, int]:
    """The trained R=2 model of the lowest seed that has a checkpoint under `out`, in eval mode, with its
    checkpoint path and seed (read weights-only by `models.load_checkpoint`; CheckpointError if unusable)."""
    task = MarkerTask() if task is None else task
    path, seed = _checkpoint_for(out, steps, seeds)
    model = SyntheticSegmenter(variant="R2", num_classes=task.num_classes)
    models.load_checkpoint(model, path, source="ccrepro")
    return model.eval(), path, seed


def plot_attention_reach(
    *, out: Path, steps: int, seeds: tuple[int, ...], task: MarkerTask | None = None
) -> Path:
    """Draw the figure for the R=2 model of the lowest seed; returns the PNG path."""
    task = MarkerTask() if task is None else task
    model, _, seed = load_trained_r2(out=out, steps=steps, seeds=seeds, task=task)
    images, labels = generate(1, seed=VAL_SEED, task=task)
    cells = labels[0, :: task.cell, :: task.cell]
    rect = torch.nonzero((cells > 0) & (cells != IGNORE_INDEX))
    row, col = (int(v) for v in rect.float().mean(0).round())
    pixel = row * task.grid + col
    marker = (cells == IGNORE_INDEX).flatten()
    composed = effective_maps(loop_maps(model, images))
    grids = [m[0, pixel].reshape(task.grid, task.grid) for m in composed]
    shares = [float(m[0, pixel][marker].sum()) for m in composed]

    figure = Figure(figsize=(12, 4.2))
    axes = figure.subplots(1, 3)
    extent = (-0.5, task.grid - 0.5, task.grid - 0.5, -0.5)
    axes[0].imshow(images[0].permute(1, 2, 0).clamp(0, 1).numpy(), extent=extent)
    axes[0].set_title("input (x: chosen pixel)\nmarker colour = class")
    for axis, grid, loop, share in zip(axes[1:], grids, (1, 2), shares, strict=True):
        shown = axis.imshow(grid.numpy(), cmap="magma", extent=extent)
        figure.colorbar(shown, ax=axis, fraction=0.046)
        axis.set_title(f"effective attention after R={loop}\nshare on marker: {share:.3f}")
    for axis in axes:
        axis.plot(col, row, marker="x", color="cyan", markersize=10, mew=2)
        marker_cells = torch.nonzero(cells == IGNORE_INDEX)
        top, left = (int(v) for v in marker_cells.min(0).values)
        size = task.marker_cells
        axis.add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, color="lime", lw=1.5))
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"Criss-cross attention reach, trained R=2 model (seed {seed}, {steps} steps), "
                    "marker outlined in green")
    figure.tight_layout()
    png = out / "plots" / "attention_reach.png"
    atomic_savefig(figure, png, dpi=110)
    write_csv_atomic(
        pd.DataFrame({
            "model": ["R2"] * 2, "seed": [seed] * 2, "steps": [steps] * 2, "pixel_row": [row] * 2,
            "pixel_col": [col] * 2, "after_loops": [1, 2], "attention_share_on_marker": shares,
        }),
        out / "attention_reach.csv",
    )
    return png
