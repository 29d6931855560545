"""Input validation shared by the attention operators: errors name the value and what was expected."""

from __future__ import annotations

import torch


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, op: str) -> None:
    """Check that query, key (B, Cqk, H, W) and value (B, Cv, H, W) fit together.

    Raises TypeError for non-tensors and non-floating dtypes, ValueError for shape, dtype and device
    mismatches.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"{op}: {name} must have rank 4 (B, C, H, W), got rank {tensor.dim()} "
                f"with shape {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(
                f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
                f"got {tensor.dtype}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"{op}: query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"{op}: query, key and value must be on one device, got {query.device}, {key.device}, "
            f"{value.device}"
        )
    if query.shape != key.shape:
        raise ValueError(
            f"{op}: query and key must have the same shape (B, Cqk, H, W), got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    b, _, h, w = query.shape
    if (value.shape[0], value.shape[2], value.shape[3]) != (b, h, w):
        raise ValueError(
            f"{op}: value must be (B, Cv, H, W) with B, H, W = {b}, {h}, {w} as in query, "
            f"got {tuple(value.shape)}"
        )
    if b == 0 or h == 0 or w == 0 or query.shape[1] == 0 or value.shape[1] == 0:
        raise ValueError(
            f"{op}: empty inputs are not supported, got query {tuple(query.shape)}, value {tuple(value.shape)}"
        )
