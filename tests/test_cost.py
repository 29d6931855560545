"""The analytic cost model: exact counts on small shapes, the paper's figures at 97x97."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ops import CrissCrossAttention, NonLocal2d, cost
from ops.cca_naive import criss_cross_attention_einsum


def test_paper_figures_at_97x97():
    # FLOPs = 2 x MACs, the paper's convention. Non-local: 54.08 G MACs (108.15 GFLOPs).
    non_local = cost.non_local_module_cost(1, 512, 64, 97, 97)
    assert non_local.macs == 54_076_006_976
    assert round(non_local.flops / 1e9, 2) == 108.15
    one_loop = cost.criss_cross_module_cost(1, 512, 64, 97, 97, recurrence=1)
    assert round(one_loop.macs / 1e9, 2) == 4.13
    two_loops = cost.criss_cross_module_cost(1, 512, 64, 97, 97, recurrence=2)
    assert two_loops.flops == 2 * one_loop.flops
    assert abs(two_loops.flops / 1e9 - 16.5) / 16.5 < 0.01
    assert abs((1 - two_loops.flops / non_local.flops) - 0.85) < 0.01


def test_attended_pixel_count_is_exact():
    # One pixel attends H + W - 1 pixels; each costs Cqk + Cv MACs.
    c = cost.criss_cross_attention_cost(2, 3, 5, 7, 11)
    assert c.macs == 2 * 7 * 11 * (7 + 11 - 1) * (3 + 5)
    n = cost.non_local_attention_cost(2, 3, 5, 7, 11)
    assert n.macs == 2 * (7 * 11) ** 2 * (3 + 5)
    assert cost.criss_cross_attention_cost(1, 1, 1, 1, 1).macs == 2


def test_matmul_count_of_the_einsum_form_matches_within_the_diagonal():
    # The einsum form computes H + W scores per pixel (the diagonal masked): the model counts H + W - 1.
    batch, qk, value, height, width = 2, 4, 6, 9, 5
    q, k = torch.randn(batch, qk, height, width), torch.randn(batch, qk, height, width)
    v = torch.randn(batch, value, height, width)
    with FlopCounterMode(display=False) as counter:
        criss_cross_attention_einsum(q, k, v)
    counted_macs = counter.get_total_flops() // 2
    assert counted_macs == batch * height * width * (height + width) * (qk + value)
    modelled = cost.criss_cross_attention_cost(batch, qk, value, height, width).macs
    assert counted_macs - modelled == batch * height * width * (qk + value)


def test_module_cost_matches_flop_counter_on_modules():
    x = torch.randn(1, 16, 6, 7)
    for module, expected in (
        (NonLocal2d(16, qk_channels=2), cost.non_local_module_cost(1, 16, 2, 6, 7)),
    ):
        with FlopCounterMode(display=False) as counter:
            module(x)
        assert counter.get_total_flops() == expected.flops
    # The criss-cross module through the einsum form counts the diagonal too; check the convs exactly.
    module = CrissCrossAttention(16, qk_channels=2)
    with FlopCounterMode(display=False) as counter:
        module.query_conv(x), module.key_conv(x), module.value_conv(x)
    projections = cost.criss_cross_module_cost(1, 16, 2, 6, 7).macs - cost.criss_cross_attention_cost(
        1, 2, 16, 6, 7).macs
    assert counter.get_total_flops() == 2 * projections


def test_bytes_and_backward():
    fused = cost.criss_cross_attention_cost(1, 64, 512, 97, 97, itemsize=2)
    materialised = cost.criss_cross_attention_cost(1, 64, 512, 97, 97, itemsize=2, materialised=True)
    assert materialised.bytes - fused.bytes == 4 * 97 * 97 * 194 * 2
    forward = cost.criss_cross_attention_cost(1, 8, 16, 5, 5)
    backward = cost.criss_cross_attention_backward_cost(1, 8, 16, 5, 5, recompute=False)
    assert backward.macs == 2 * forward.macs
    recompute = cost.criss_cross_attention_backward_cost(1, 8, 16, 5, 5)
    assert recompute.macs - backward.macs == 5 * 5 * 9 * 8
    # The least a fused backward moves per pixel: q, k (Cqk each), v, out, dO (Cv each) read and dq, dk, dv
    # written, one value-sized map per tensor, plus the fp32 log-sum-exp read.
    qk, v, item = 8, 16, 2
    per_pixel = item * (qk + qk + v + v + v) + item * (qk + qk + v) + 4
    assert cost.criss_cross_attention_backward_cost(2, qk, v, 5, 3, itemsize=item).bytes == 2 * 5 * 3 * per_pixel


def test_cost_arithmetic_and_errors():
    a, b = cost.Cost(3, 10), cost.Cost(4, 1)
    assert (a + b) == cost.Cost(7, 11) and (2 * a) == cost.Cost(6, 20) and a.flops == 6
    with pytest.raises(ValueError, match="height must be a positive int, got 0"):
        cost.criss_cross_attention_cost(1, 2, 3, 0, 4)
    with pytest.raises(ValueError, match="recurrence must be an int >= 0, got -1"):
        cost.criss_cross_module_cost(1, 8, 2, 4, 4, recurrence=-1)
    assert cost.criss_cross_module_cost(1, 8, 2, 4, 4, recurrence=0).macs == 0
