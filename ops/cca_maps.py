"""Criss-cross attention maps: what each pixel attends to, in one pass and composed over R passes.

For looking at a model, not for training (no autograd). Every map here is computed in the naive formulation
`ops.criss_cross_attention` defines (energies q . k over the pixel's row and column, the pixel itself once,
one softmax, no scaling) from the query and key a block was given, whichever backend ran the block.

* `criss_cross_map(query, key)`: the dense (B, HW, HW) matrix A of one pass (row p: the weights pixel p gives
  every pixel). HW x HW memory: small maps only (tests, the synthetic model).
* `criss_cross_probabilities(query, key)`: the same pass in the compact (B, H, W, H + W) form the naive
  backend materialises (`[..., :H]` the column, diagonal 0; `[..., H:]` the row): B*H*W*(H+W) elements,
  e.g. 12.6 M (50 MB fp32) for a 1024x2048 image at output stride 8 (128 x 256 cells).
* `point_attention(passes, points)`: rows of the per-pass and the composed maps for a few pixels. After r
  passes pixel p has drawn on A_r A_(r-1) ... A_1 (rows: receiving pixels, as the synthetic reach figure and
  the official CCNet visualisation compose them). Its row e_p^T A_r ... A_1 is computed right to left as
  repeated transposed aggregations of a one-hot image through the compact maps: no HW x HW matrix, and
  O(B*H*W*(H+W)*N) work per pass for N points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ops.cca_naive import _aggregate_transposed, _channels_last, _energies


def _check_qk(query: torch.Tensor, key: torch.Tensor) -> None:
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        raise TypeError(f"query and key must be tensors, got {type(query).__name__} and {type(key).__name__}")
    if query.dim() != 4 or query.shape != key.shape:
        raise ValueError(
            "query and key must be (B, C, H, W) of equal shape, "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )


def criss_cross_map(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Dense criss-cross attention matrix of one pass: (B, Cqk, H, W) x2 -> (B, H*W, H*W), rows sum to 1.

    Entry [b, p, p'] is the softmax weight pixel p gives pixel p' (zero unless p' shares p's row or column; p
    itself counted once). Built independently of the op's code (a masked full energy matrix), so it serves as
    a reference for it. Memory (H*W)^2 per image.
    """
    _check_qk(query, key)
    _, _, height, width = query.shape
    query, key = query.float(), key.float()
    energy = torch.einsum("bcp,bcq->bpq", query.flatten(2), key.flatten(2))
    rows = torch.arange(height, device=query.device).repeat_interleave(width)
    cols = torch.arange(width, device=query.device).repeat(height)
    on_cross = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    return torch.softmax(energy.masked_fill(~on_cross, float("-inf")), dim=-1)


def criss_cross_probabilities(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """One pass's attention in compact form: (B, Cqk, H, W) x2 -> (B, H, W, H + W) float32.

    [b, i, j, i'] (i' < H) is the weight pixel (i, j) gives (i', j) (0 for i' = i, which the row counts);
    [b, i, j, H + j'] the weight it gives (i, j'). Each [b, i, j, :] sums to 1.
    """
    _check_qk(query, key)
    with torch.no_grad():
        energy = _energies(_channels_last(query.float()), _channels_last(key.float()))
        return torch.softmax(energy, dim=-1)


def _check_points(points: Sequence[tuple[int, int]], height: int, width: int) -> list[tuple[int, int]]:
    checked = []
    for point in points:
        if len(point) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in point):
            raise ValueError(f"a point must be an (row, col) pair of ints, got {point!r}")
        row, col = point
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"point (row={row}, col={col}) is outside the {height} x {width} attention grid")
        checked.append((row, col))
    if not checked:
        raise ValueError("point_attention needs at least one point")
    return checked


def point_attention(passes: Sequence[torch.Tensor], points: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Where the given pixels' attention lands after 1, 2, ..., R passes.

    Args:
        passes: the R passes in the order they ran, each a compact map (B, H, W, H + W) from
            `criss_cross_probabilities`.
        points: N (row, col) cells of the H x W grid.

    Returns:
        (B, N, R, H, W) float32: [:, n, r - 1] is row p_n of A_r ... A_1 as an H x W image. Each sums to 1;
        [:, n, 0] is zero off p_n's row and column.
    """
    if not passes:
        raise ValueError("point_attention needs at least one pass")
    shape = passes[0].shape
    if len(shape) != 4 or shape[-1] != shape[1] + shape[2]:
        raise ValueError(f"passes must be (B, H, W, H + W) compact maps, got {tuple(shape)}")
    for index, later in enumerate(passes[1:], start=2):
        if later.shape != shape:
            raise ValueError(f"pass {index} has shape {tuple(later.shape)}, pass 1 {tuple(shape)}: all must match")
    batch, height, width, _ = shape
    points = _check_points(points, height, width)
    onehot = passes[0].new_zeros(batch, height, width, len(points))
    for index, (row, col) in enumerate(points):
        onehot[:, row, col, index] = 1.0
    composed = []
    with torch.no_grad():
        for last in range(1, len(passes) + 1):
            # e_p^T A_last ... A_1, right to left: x^T A is A^T x, the op's transposed aggregation.
            weights = onehot
            for probabilities in reversed(passes[:last]):
                weights = _aggregate_transposed(probabilities.float(), weights.contiguous())
            composed.append(weights.permute(0, 3, 1, 2))
    return torch.stack(composed, dim=2)


def off_cross_share(maps: torch.Tensor, points: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Share of each map's attention outside its point's row and column: (B, N, R, H, W) -> (B, N, R)."""
    if maps.dim() != 5 or maps.shape[1] != len(points):
        raise ValueError(f"maps must be (B, N={len(points)}, R, H, W), got {tuple(maps.shape)}")
    _, _, _, height, width = maps.shape
    shares = []
    for index, (row, col) in enumerate(points):
        off_cross = torch.ones(height, width, dtype=torch.bool, device=maps.device)
        off_cross[row, :] = False
        off_cross[:, col] = False
        shares.append((maps[:, index] * off_cross).sum((-2, -1)))
    return torch.stack(shares, dim=1)
