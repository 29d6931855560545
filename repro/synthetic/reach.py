"""Attention reach of a trained synthetic model: where one pixel's attention lands after R=1 and R=2.

Like the official CCNet visualisation, the effective attention after two loops is the product of the two
loops' criss-cross attention maps: A_eff = A_2 @ A_1 (rows: query pixels, columns: attended pixels). The maps
are computed *explicitly* here from the trained module's query/key projections (`criss_cross_map`: a dense
(HW x HW) matrix, -inf off the pixel's row and column, one joint softmax), not through the op, so the figure
is an independent view of what the op does (the tests check `criss_cross_map @ value` equals the op).

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
from models.synthetic import SyntheticSegmenter
from repro.io import atomic_savefig, write_csv_atomic
from repro.synthetic.ablation import VAL_SEED, checkpoint_path
from repro.synthetic.data import IGNORE_INDEX, MarkerTask, generate


def criss_cross_map(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Dense criss-cross attention matrix: (B, Cqk, H, W) x2 -> (B, H*W, H*W), rows sum to 1.

    Entry [b, p, p'] is the softmax weight pixel p gives pixel p' (zero unless p' shares p's row or
    column; p itself counted once), with no scaling, as `ops.criss_cross_attention` defines it.
    """
    if query.dim() != 4 or query.shape != key.shape:
        raise ValueError(
            "query and key must be (B, C, H, W) of equal shape, "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    _, _, height, width = query.shape
    energy = torch.einsum("bcp,bcq->bpq", query.flatten(2), key.flatten(2))
    rows = torch.arange(height, device=query.device).repeat_interleave(width)
    cols = torch.arange(width, device=query.device).repeat(height)
    on_cross = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    return torch.softmax(energy.masked_fill(~on_cross, float("-inf")), dim=-1)


def loop_maps(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-loop criss-cross maps (B, HW, HW) of a trained `SyntheticSegmenter` with R >= 1."""
    if model.variant == "nonlocal" or model.recurrence < 1:
        raise ValueError(
            f"attention reach needs a criss-cross model with R >= 1, got variant {model.variant!r}"
        )
    attention = model.context
    maps = []
    with torch.no_grad():
        features = model.features(images)
        for _ in range(model.recurrence):
            maps.append(criss_cross_map(attention.query_conv(features), attention.key_conv(features)))
            features = attention(features)
    return maps


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


def plot_attention_reach(
    *, out: Path, steps: int, seeds: tuple[int, ...], task: MarkerTask | None = None
) -> Path:
    """Draw the figure for the R=2 model of the lowest seed; returns the PNG path."""
    task = MarkerTask() if task is None else task
    path, seed = _checkpoint_for(out, steps, seeds)
    model = SyntheticSegmenter(variant="R2", num_classes=task.num_classes)
    models.load_checkpoint(model, path, source="ccrepro")  # weights-only, CheckpointError if unusable
    model.eval()
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
