"""The export formulation of criss-cross attention (ops/cca_export.py) is the naive op's function: forward and
gradients, on shapes that break assumptions (a single row or column, non-square, primes)."""

from __future__ import annotations

import pytest
import torch

import ops
from ops.cca_export import column_diagonal_mask, criss_cross_attention_export
from ops.cca_naive import criss_cross_attention_naive

SHAPES = [(1, 4, 1, 1), (2, 3, 1, 7), (1, 5, 7, 1), (2, 4, 5, 11), (1, 2, 13, 3), (3, 1, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_export_formulation_equals_naive_forward_and_gradients(shape):
    batch, qk, height, width = shape
    generator = torch.Generator().manual_seed(sum(shape))
    inputs = [torch.randn(batch, c, height, width, generator=generator, dtype=torch.float64, requires_grad=True)
              for c in (qk, qk, 6)]
    grad = torch.randn(batch, 6, height, width, generator=generator, dtype=torch.float64)
    expected = criss_cross_attention_naive(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    got = criss_cross_attention_export(*inputs)
    got_grads = torch.autograd.grad(got, inputs, grad)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_backend_export_is_selectable_and_counts_the_pixel_once():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 9), torch.randn(2, 4, 6, 9), torch.randn(2, 5, 6, 9)
    torch.testing.assert_close(ops.criss_cross_attention(q, k, v, backend="export"),
                               ops.criss_cross_attention(q, k, v, backend="naive"), rtol=1e-5, atol=1e-5)
    module = ops.CrissCrossAttention(8, backend="export")
    assert module.backend == "export"
    # With the key equal to zero every attended pixel weighs the same: H + W - 1 of them, not H + W.
    out = criss_cross_attention_export(q, torch.zeros_like(k), torch.ones(2, 1, 6, 9))
    torch.testing.assert_close(out, torch.ones(2, 1, 6, 9))
    mask = column_diagonal_mask(4, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.isinf(mask.diagonal()).all() and (mask.sum() == float("-inf"))
    assert int((mask == 0).sum()) == 12
