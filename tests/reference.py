"""Independent slow references for the attention ops: explicit loops over each pixel's attended set."""

from __future__ import annotations

import torch


def criss_cross_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel: softmax over the H + W - 1 pixels of row i and column j (the pixel once)."""
    batch, _, height, width = query.shape
    out = value.new_zeros(value.shape)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                positions = [(i, jj) for jj in range(width)] + [(ii, j) for ii in range(height) if ii != i]
                rows = torch.tensor([p[0] for p in positions])
                cols = torch.tensor([p[1] for p in positions])
                energies = (query[b, :, i, j, None] * key[b][:, rows, cols]).sum(0)
                weights = torch.softmax(energies, dim=0)
                out[b, :, i, j] = (value[b][:, rows, cols] * weights).sum(1)
    return out


def non_local_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel: softmax over all H * W pixels."""
    batch, _, height, width = query.shape
    out = value.new_zeros(value.shape)
    for b in range(batch):
        keys = key[b].flatten(1)
        values = value[b].flatten(1)
        for i in range(height):
            for j in range(width):
                weights = torch.softmax((query[b, :, i, j, None] * keys).sum(0), dim=0)
                out[b, :, i, j] = (values * weights).sum(1)
    return out
