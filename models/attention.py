"""What a model's criss-cross attention does on an image: the query and key each pass of each CCA block was
given, recorded during one forward, and the maps of chosen points after 1..R passes (`ops.cca_maps`).

Works for any model that contains `ops.CrissCrossAttention` blocks (the RCCA head of `models.build`, the
synthetic segmenter), whichever backend the blocks run: the hook records the block's input and applies the
block's own query / key projections, and the maps are recomputed in the naive formulation from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ops.cca_maps import criss_cross_probabilities, off_cross_share, point_attention
from ops.criss_cross import CrissCrossAttention


@dataclass(frozen=True)
class CrissCrossPass:
    """One call of a criss-cross block: its name in the model and the query / key it computed, (B, Cqk, h, w)."""

    module: str
    query: torch.Tensor
    key: torch.Tensor


@contextlib.contextmanager
def record_criss_cross(model: nn.Module) -> Iterator[list[CrissCrossPass]]:
    """Record every criss-cross pass `model` runs inside the `with` block, in call order.

    An RCCA head with recurrence R gives R passes per forward (one shared block called R times). The hooks
    are removed on exit, also on an error.
    """
    passes: list[CrissCrossPass] = []

    def hook_for(name: str):
        def record(module: CrissCrossAttention, args: tuple, kwargs: dict) -> None:
            features = args[0] if args else kwargs["x"]
            with torch.no_grad():
                passes.append(CrissCrossPass(name, module.query_conv(features), module.key_conv(features)))

        return record

    handles = [
        module.register_forward_pre_hook(hook_for(name), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, CrissCrossAttention)
    ]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def cell_of(point_xy: tuple[float, float], *, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the attention-grid cell that covers pixel (x, y) of an image of size `image_hw`.

    The grid spans the image: cell (r, c) of an h x w grid covers pixels [r H / h, (r + 1) H / h) x
    [c W / w, (c + 1) W / w), measured at pixel centres.
    """
    x, y = point_xy
    height, width = image_hw
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"point (x={x}, y={y}) is outside the image of width {width} and height {height}")
    rows, cols = grid_hw
    return min(int((y + 0.5) * rows / height), rows - 1), min(int((x + 0.5) * cols / width), cols - 1)


@dataclass(frozen=True)
class PointAttention:
    """Attention of N points of a batch after each pass.

    logits: the model's output of the recorded forward, (B, num_classes, H, W) as the model returns it.
    points_xy: the points in input pixels; cells: their (row, col) on the h x w attention grid.
    maps: (B, N, R, h, w); [:, n, r - 1] is where point n's attention lands after r passes (A_r ... A_1).
    off_cross: (B, N, R) share of each map outside the point's row and column (0 after one pass).
    modules: the block of each pass.
    """

    logits: torch.Tensor
    points_xy: tuple[tuple[float, float], ...]
    cells: tuple[tuple[int, int], ...]
    maps: torch.Tensor
    off_cross: torch.Tensor
    modules: tuple[str, ...]

    @property
    def passes(self) -> int:
        return self.maps.shape[2]

    @property
    def grid_hw(self) -> tuple[int, int]:
        return tuple(self.maps.shape[-2:])


def attention_at_points(
    model: nn.Module, images: torch.Tensor, points_xy: Sequence[tuple[float, float]]
) -> PointAttention:
    """Run `model` once on `images` (B, 3, H, W) in eval mode and return the attention of `points_xy`
    ((x, y) pixel coordinates of `images`) after each of its criss-cross passes.

    Raises ValueError when the model runs no criss-cross attention (recurrence 0, an FCN or non-local head).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    points_xy = tuple((float(x), float(y)) for x, y in points_xy)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_criss_cross(model) as passes:
            logits = model(images)
    finally:
        model.train(was_training)
    if not passes:
        raise ValueError(
            f"{type(model).__name__} ran no criss-cross attention (no CrissCrossAttention block, or recurrence 0): "
            "there is no attention map to show"
        )
    grid = tuple(passes[0].query.shape[-2:])
    for recorded in passes[1:]:
        if tuple(recorded.query.shape[-2:]) != grid:
            other = tuple(recorded.query.shape[-2:])
            raise ValueError(f"criss-cross passes run on different grids: {grid} and {other}")
    image_hw = tuple(images.shape[-2:])
    cells = tuple(cell_of(point, image_hw=image_hw, grid_hw=grid) for point in points_xy)
    probabilities = [criss_cross_probabilities(recorded.query, recorded.key) for recorded in passes]
    maps = point_attention(probabilities, cells)
    return PointAttention(
        logits=logits,
        points_xy=points_xy,
        cells=cells,
        maps=maps,
        off_cross=off_cross_share(maps, cells),
        modules=tuple(recorded.module for recorded in passes),
    )
