"""Criss-cross attention in plain PyTorch.

Two implementations:

* `criss_cross_attention_naive`: the backend used by `ops.criss_cross_attention(backend="naive")`. A custom
  autograd function that materialises one (B, H, W, H + W) energy / probability buffer (column branch in
  the first H slots with -inf on its diagonal, row branch in the last W), fills both halves with in-place
  batched matmuls on channels-last views (no `cat`, no layout copies of the map), runs one in-place softmax,
  and has a hand-written backward that recomputes nothing and uses the fused softmax backward. It saves
  q, k, v (channels-last) and the probabilities.
* `criss_cross_attention_einsum`: the formulation mmcv ships (torch.einsum, materialised map, autograd
  through everything). Kept as the independent reference the benchmark compares against.

Cost of one call (B, Cqk, Cv, H, W): 2 * B * H * W * (H + W) * (Cqk + Cv) FLOPs forward, about twice that
backward; the materialised map is B * H * W * (H + W) elements (see `ops.cost`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when x is already channels_last."""
    return x.permute(0, 2, 3, 1).contiguous()


def _column_view(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B, H, W, X) -> (W, H, X) view of batch b: the column j as a batch of H x X matrices."""
    return x[b].transpose(0, 1)


class CrissCrossNaiveFunction(torch.autograd.Function):
    """The naive backend as one autograd Function (forward and hand-written backward); public so that
    tracers can name it (fvcore sees it as `prim::PythonOp.CrissCrossNaiveFunction`)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = _channels_last(query), _channels_last(key), _channels_last(value)
        probs = _energies(q, k)
        torch._softmax(probs, -1, False, out=probs)
        out = _aggregate(probs, v)
        ctx.save_for_backward(q, k, v, probs)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad_o = _channels_last(grad_out)
        grad_query = grad_key = grad_value = None

        # dP = dO . v over the H + W - 1 attended pixels; the masked diagonal gets a harmless value, its
        # probability is 0 so the softmax backward zeroes it.
        grad_p = torch.empty_like(probs)
        _fill_branches(grad_p, grad_o, v)
        if ctx.needs_input_grad[2]:
            grad_value = _aggregate_transposed(probs, grad_o)
        grad_e = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype, grad_input=grad_p)
        if ctx.needs_input_grad[0]:
            grad_query = _aggregate(grad_e, k)
        if ctx.needs_input_grad[1]:
            grad_key = _aggregate_transposed(grad_e, q)
        return _to_nchw(grad_query), _to_nchw(grad_key), _to_nchw(grad_value)


def _to_nchw(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.permute(0, 3, 1, 2)


def _row_view(buffer: torch.Tensor, height: int) -> torch.Tensor:
    """(B, H, W, H + W) -> (B * H, W, W) strided view of the row branch."""
    batch, _, width, _ = buffer.shape
    return buffer[..., height:].view(batch * height, width, width)


def _fill_branches(buffer: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """buffer[b, i, j, :H] = left[b, i, j] . right[b, :, j]; buffer[b, i, j, H:] = left[b, i, j] . right[b, i, :].

    left, right: (B, H, W, C) contiguous; buffer: (B, H, W, H + W).
    """
    batch, height, width, _ = left.shape
    _row_view(buffer, height).baddbmm_(
        left.view(batch * height, width, -1), right.view(batch * height, width, -1).transpose(1, 2), beta=0
    )
    for b in range(batch):
        _column_view(buffer, b)[..., :height].baddbmm_(
            _column_view(left, b), _column_view(right, b).transpose(1, 2), beta=0
        )


def _energies(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, W, Cqk) x2 -> (B, H, W, H + W) energies with -inf on the column branch's diagonal."""
    batch, height, width, _ = q.shape
    energy = q.new_empty(batch, height, width, height + width)
    _fill_branches(energy, q, k)
    # The pixel itself is in both its row and its column: count it once (in the row branch).
    energy[..., :height].diagonal(dim1=1, dim2=3).fill_(float("-inf"))
    return energy


def _aggregate(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out[b, i, j] = sum_i' weights[b, i, j, i'] x[b, i', j] + sum_j' weights[b, i, j, H + j'] x[b, i, j'].

    weights: (B, H, W, H + W); x: (B, H, W, C) contiguous -> (B, H, W, C) contiguous.
    """
    batch, height, width, channels = x.shape
    out = x.new_empty(batch, height, width, channels)
    out.view(batch * height, width, channels).baddbmm_(
        _row_view(weights, height), x.view(batch * height, width, channels), beta=0
    )
    for b in range(batch):
        _column_view(out, b).baddbmm_(_column_view(weights, b)[..., :height], _column_view(x, b))
    return out


def _aggregate_transposed(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adjoint of `_aggregate` in x: out[b, i', j] = sum_i weights[b, i, j, i'] x[b, i, j] and
    out[b, i, j'] += sum_j weights[b, i, j, H + j'] x[b, i, j].

    weights: (B, H, W, H + W); x: (B, H, W, C) contiguous -> (B, H, W, C) contiguous.
    """
    batch, height, width, channels = x.shape
    out = x.new_empty(batch, height, width, channels)
    out.view(batch * height, width, channels).baddbmm_(
        _row_view(weights, height).transpose(1, 2), x.view(batch * height, width, channels), beta=0
    )
    for b in range(batch):
        _column_view(out, b).baddbmm_(
            _column_view(weights, b)[..., :height].transpose(1, 2), _column_view(x, b)
        )
    return out


def criss_cross_attention_naive(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention, (B, Cqk, H, W) x2 and (B, Cv, H, W) -> (B, Cv, H, W) (channels_last memory).

    Inputs are assumed validated (`ops.criss_cross_attention` does it).
    """
    return CrissCrossNaiveFunction.apply(query, key, value)


def criss_cross_attention_einsum(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The einsum formulation mmcv ships: column energies with -inf on the diagonal, concatenated with the
    row energies, one softmax, einsum aggregation. Autograd through everything."""
    _, _, height, width = query.shape
    diagonal = torch.diag(query.new_full((height,), float("-inf")))
    energy_h = torch.einsum("bchw,bciw->bwhi", query, key) + diagonal
    energy_h = energy_h.transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attention = torch.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", value, attention[..., :height])
    out = out + torch.einsum("bchj,bhwj->bchw", value, attention[..., height:])
    return out
