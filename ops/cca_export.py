"""Criss-cross attention as a purely functional graph, for export (ONNX through `torch.onnx.export`).

The naive backend (`ops.cca_naive`) is fast because it writes both branches into one preallocated energy
buffer with in-place batched matmuls on strided views and fills the column diagonal in place. Exporters do
not survive that: the legacy TorchScript exporter drops the in-place writes into views of `new_empty`
buffers (the buffers become zero constants, so the exported model silently runs *without* attention), the
dynamo exporter refuses the non-functional graph (`diagonal().fill_`), and `torch.diag` (mmcv's einsum
formulation) has no ONNX symbolic at opset 17.

This formulation has no in-place op, no view writes and no `diag`:

* column energies (B, H, W, H): `matmul` of q at (b, :, j) with k at (b, :, j), then the diagonal (the pixel
  itself, counted once in the row branch) masked by an *additive* mask built from `arange` comparisons
  (0 off the diagonal, -inf on it), so H and W stay symbolic;
* row energies (B, H, W, W): `matmul` of q at (b, i, :) with k at (b, i, :);
* one softmax over the concatenated H + W energies (no 1/sqrt(d) scaling, as the official op);
* aggregation by two matmuls with v in the column and row layouts.

It is the same function as `criss_cross_attention_naive` (tested equal, forward and gradients, on shapes
down to H = 1 or W = 1). It materialises the same (B, H, W, H + W) map; its speed in eager PyTorch is not
the point (use the naive backend there). Exported graphs hold MatMul and Softmax nodes, which
`repro.engine.export` checks.
"""

from __future__ import annotations

import torch


def column_diagonal_mask(height: int | torch.SymInt, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H, H) additive mask: -inf where row == column (the pixel itself), 0 elsewhere. Built from `arange`
    comparisons and `where` (no `diag`, no in-place fill), so the height may be symbolic."""
    index = torch.arange(height, device=device)
    same = index.unsqueeze(0) == index.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=device)
    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    return torch.where(same, minus_inf, zero)


def criss_cross_attention_export(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention, (B, Cqk, H, W) x2 and (B, Cv, H, W) -> (B, Cv, H, W), functional ops only.

    Inputs are assumed validated (`ops.criss_cross_attention` does it).
    """
    height = query.shape[2]
    # Column layout (B, W, H, C): a batch of columns; row layout (B, H, W, C): a batch of rows.
    q_col, k_col, v_col = (x.permute(0, 3, 2, 1) for x in (query, key, value))
    q_row, k_row, v_row = (x.permute(0, 2, 3, 1) for x in (query, key, value))
    # energy_col[b, j, i, i'] = q[b, :, i, j] . k[b, :, i', j]; -inf where i' == i.
    energy_col = torch.matmul(q_col, k_col.transpose(-1, -2))
    energy_col = energy_col + column_diagonal_mask(height, dtype=energy_col.dtype, device=energy_col.device)
    # energy_row[b, i, j, j'] = q[b, :, i, j] . k[b, :, i, j'].
    energy_row = torch.matmul(q_row, k_row.transpose(-1, -2))
    energy = torch.cat([energy_col.transpose(1, 2), energy_row], dim=-1)  # (B, H, W, H + W)
    attention = torch.softmax(energy, dim=-1)
    att_col = attention[..., :height].transpose(1, 2)  # (B, W, H, H)
    att_row = attention[..., height:]  # (B, H, W, W)
    out_col = torch.matmul(att_col, v_col)  # (B, W, H, Cv)
    out_row = torch.matmul(att_row, v_row)  # (B, H, W, Cv)
    # Both branches added in the row layout, then one (0, 3, 1, 2) permutation: permuting out_col (0, 3, 2, 1)
    # straight to (B, Cv, H, W) ran in OpenVINO's reference (non-JIT) transpose, 32 ms per call for a 64 x 128 x
    # 512 bf16 map on an AMX Xeon (6-8% of a whole R-50-D8 at 512 x 1024, one thread); this form takes 1.5% there
    # and ONNX Runtime the same time as before.
    return (out_col.transpose(1, 2) + out_row).permute(0, 3, 1, 2).contiguous()
