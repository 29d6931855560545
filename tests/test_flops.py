"""repro.measure.flops: fvcore with attention handles equals the analytic model exactly; nothing carrying work is
skipped silently; FlopCounterMode under FakeTensorMode agrees up to the naive backend's masked diagonal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops.cost import criss_cross_module_cost, non_local_module_cost
from repro.measure.flops import (
    CRISS_CROSS_NAIVE_OP,
    SDPA_OP,
    SkippedWorkError,
    flop_counter_flops,
    fvcore_handles,
    fvcore_macs,
)
from repro.measure.variants import ContextVariant

BATCH, CHANNELS, QK, HEIGHT, WIDTH = 2, 16, 4, 7, 5  # non-square, odd: breaks row/column mix-ups


def _fvcore(variant: ContextVariant) -> int:
    torch.manual_seed(0)
    module = variant.build(channels=CHANNELS, qk_channels=QK)
    with torch.no_grad():
        return fvcore_macs(module, (torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH),)).macs


@pytest.mark.parametrize("recurrence", [1, 2, 3])
def test_fvcore_criss_cross_equals_analytic(recurrence):
    expected = criss_cross_module_cost(BATCH, CHANNELS, QK, HEIGHT, WIDTH, recurrence=recurrence).macs
    assert _fvcore(ContextVariant("cca_naive", recurrence)) == expected


@pytest.mark.parametrize("name", ["non_local_naive", "non_local_sdpa"])
def test_fvcore_non_local_equals_analytic(name):
    assert _fvcore(ContextVariant(name)) == non_local_module_cost(BATCH, CHANNELS, QK, HEIGHT, WIDTH).macs


def test_fvcore_head_split_non_local_counts_energies_per_head():
    variant = ContextVariant("non_local_sdpa_heads")
    expected = variant.analytic_macs(batch=BATCH, channels=CHANNELS, qk_channels=QK, height=HEIGHT, width=WIDTH)
    heads, pixels = CHANNELS // QK, HEIGHT * WIDTH
    # Energies once per head (heads x Cqk) plus the aggregation of all C value channels.
    single = non_local_module_cost(BATCH, CHANNELS, QK, HEIGHT, WIDTH).macs
    assert expected - single == BATCH * pixels * pixels * QK * (heads - 1)
    assert _fvcore(variant) == expected


def test_fvcore_attention_ops_go_through_handles():
    torch.manual_seed(0)
    x = torch.randn(1, CHANNELS, HEIGHT, WIDTH)
    cc = fvcore_macs(ContextVariant("cca_naive", 1).build(channels=CHANNELS, qk_channels=QK), (x,))
    sdpa = fvcore_macs(ContextVariant("non_local_sdpa").build(channels=CHANNELS, qk_channels=QK), (x,))
    assert cc.by_operator[CRISS_CROSS_NAIVE_OP.split("::", 1)[1]] > 0
    assert sdpa.by_operator[SDPA_OP.split("::", 1)[1]] > 0
    # Only work-free ops were skipped, and they were recorded.
    assert set(cc.skipped) == {"aten::addcmul"}  # x + gamma * out
    assert cc.flops == 2 * cc.macs


class _Baddbmm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(x, x, x)


def test_skipped_op_with_work_raises():
    with pytest.raises(SkippedWorkError, match="aten::baddbmm"):
        fvcore_macs(_Baddbmm(), (torch.randn(2, 3, 3),))


def test_fvcore_macs_rejects_non_tuple_inputs():
    with pytest.raises(TypeError, match="tuple"):
        fvcore_macs(_Baddbmm(), [torch.randn(2, 3, 3)])


@pytest.mark.parametrize("recurrence", [1, 2])
def test_flop_counter_sees_the_masked_diagonal(recurrence):
    variant = ContextVariant("cca_naive", recurrence)
    counted = flop_counter_flops(lambda: variant.build(channels=CHANNELS, qk_channels=QK),
                                 [(BATCH, CHANNELS, HEIGHT, WIDTH)])
    analytic = criss_cross_module_cost(BATCH, CHANNELS, QK, HEIGHT, WIDTH, recurrence=recurrence).macs
    # The naive backend's matmuls compute H + W energies per pixel (one masked): one extra pixel each.
    masked = recurrence * BATCH * HEIGHT * WIDTH * (QK + CHANNELS)
    assert counted == 2 * (analytic + masked)


@pytest.mark.parametrize("name", ["non_local_naive", "non_local_sdpa", "non_local_sdpa_heads"])
def test_flop_counter_non_local_equals_analytic(name):
    variant = ContextVariant(name)
    counted = flop_counter_flops(lambda: variant.build(channels=CHANNELS, qk_channels=QK),
                                 [(BATCH, CHANNELS, HEIGHT, WIDTH)])
    expected = variant.analytic_macs(batch=BATCH, channels=CHANNELS, qk_channels=QK, height=HEIGHT, width=WIDTH)
    assert counted == 2 * expected


def test_flop_counter_counts_cpu_flash_attention():
    """With equal head widths SDPA on CPU dispatches the flash kernel, which FlopCounterMode alone counts 0."""
    query = torch.randn(1, 2, 16, 8)

    class Attention(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    assert flop_counter_flops(Attention, [tuple(query.shape)]) == 2 * 2 * 16 * 16 * (8 + 8)


def test_triton_handle_registered_when_op_exists():
    handles = fvcore_handles()
    assert handles["ccrepro::cca_triton_forward"] is handles[CRISS_CROSS_NAIVE_OP]


def test_triton_backend_counts_like_naive(op_device):
    import ops.cca_triton  # noqa: F401  (triton is a dependency: a broken kernel module must fail, not skip)
    from ops.criss_cross import CrissCrossAttention

    torch.manual_seed(0)
    module = CrissCrossAttention(8, qk_channels=4, backend="triton").to(op_device)
    with torch.no_grad():
        count = fvcore_macs(module, (torch.randn(1, 8, 3, 5, device=op_device),))
    assert count.macs == criss_cross_module_cost(1, 8, 4, 3, 5).macs
