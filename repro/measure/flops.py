"""FLOP counting that skips nothing silently.

Two independent counters:

* `fvcore_macs(model, inputs)`: fvcore's `FlopCountAnalysis` on the real module (a JIT trace of the
  forward), with handles for the attention ops fvcore does not know: the naive criss-cross autograd
  Function (traced as `prim::PythonOp.CrissCrossNaiveFunction`), the Triton custom op (`ccrepro::cca_triton_forward`,
  when that backend is present) and `aten::scaled_dot_product_attention`; normalisation, upsampling and
  pooling count 0 (no multiply-accumulates, as in the paper and FlopCounterMode). fvcore counts one
  multiply-accumulate (MAC) as one "flop"; after the trace, every op fvcore skipped must be in
  `MAC_FREE_OPS` (elementwise, softmax, pooling, ...) or `SkippedWorkError` is raised, so an op that carries
  matmul work can never vanish from a count again.
* `flop_counter_flops(build, input_shapes)`: `torch.utils.flop_counter.FlopCounterMode` under
  `FakeTensorMode`, which counts 2 x MACs (the CCNet paper's convention) from the aten ops actually
  dispatched, in ~0.1 s even for shapes too large to allocate. It misses in-place `baddbmm_` (the naive
  criss-cross backend's matmuls) unless given a mapping, which this module supplies.

The attention handles use the analytic model in `ops.cost` (H + W - 1 attended pixels for criss-cross), so
fvcore's module count equals `ops.cost` exactly; FlopCounterMode sees the naive backend's real matmuls,
which compute H + W energies per pixel and mask the diagonal, i.e. B * H * W * (Cqk + Cv) MACs more per
loop (+0.13% of a loop at 1x512x97x97).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_flop_count

from ops.cca_naive import CrissCrossNaiveFunction
from ops.cost import criss_cross_attention_cost

# How torch.jit traces the naive backend's autograd Function (fvcore sees the trace).
CRISS_CROSS_NAIVE_OP = f"prim::PythonOp.{CrissCrossNaiveFunction.__name__}"
# The Triton backend's forward custom op (see ops/cca_triton.py); registered whether or not it exists, a
# handle for an op that never appears in a trace costs nothing.
CRISS_CROSS_TRITON_OPS = ("ccrepro::cca_triton_forward",)
SDPA_OP = "aten::scaled_dot_product_attention"

# Ops that fvcore has no handle for and that carry no multiply-accumulates: elementwise arithmetic,
# normalisation of attention maps, masking, pooling by comparison, and layout/creation ops fvcore does not
# already ignore. Anything else skipped is an error.
MAC_FREE_OPS = frozenset(
    {
        "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div",
        "aten::div_", "aten::neg", "aten::exp", "aten::sigmoid", "aten::tanh", "aten::rsub",
        # x + gamma * out of the attention blocks (elementwise; gamma is one scalar)
        "aten::addcmul", "aten::addcmul_",
        "aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::fill_", "aten::fill_diagonal_",
        "aten::diagonal", "aten::diag", "aten::masked_fill_", "aten::max_pool2d", "aten::clone",
        "aten::expand_as", "aten::repeat", "aten::empty_like", "aten::new_ones", "aten::hardtanh_",
        "aten::hardtanh", "aten::leaky_relu", "aten::leaky_relu_", "aten::silu", "aten::silu_",
        "aten::gelu", "aten::sum", "aten::mean", "aten::argmax", "aten::sort", "aten::topk",
        "aten::pad", "aten::contiguous", "aten::dropout_", "aten::feature_dropout",
    }
)


class SkippedWorkError(RuntimeError):
    """fvcore skipped an op that may carry multiply-accumulates."""


@dataclass(frozen=True)
class MacCount:
    """fvcore's count of one forward pass. `macs` is fvcore's "flops" (1 per MAC); `flops` = 2 x MACs."""

    macs: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_operator: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _sizes(value: torch._C.Value) -> list[int]:
    sizes = value.type().sizes()
    if sizes is None:
        raise SkippedWorkError(f"fvcore handle: input {value.debugName()} has no traced shape")
    return list(sizes)


def _criss_cross_handle(inputs: list, outputs: list) -> int:
    """(query, key, value, ...) of shapes (B, Cqk, H, W), (B, Cqk, H, W), (B, Cv, H, W) -> MACs."""
    batch, qk_channels, height, width = _sizes(inputs[0])
    value_channels = _sizes(inputs[2])[1]
    return criss_cross_attention_cost(batch, qk_channels, value_channels, height, width).macs


def _sdpa_handle(inputs: list, outputs: list) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): L * S * E energies + L * S * Ev aggregation MACs."""
    query, key, value = (_sizes(inputs[i]) for i in range(3))
    leading = 1
    for extent in query[:-2]:
        leading *= extent
    length, embed = query[-2:]
    source = key[-2]
    return leading * length * source * (embed + value[-1])


# fvcore's defaults give these ops a per-element count that is not a multiply-accumulate; the paper, ops.cost
# and FlopCounterMode count none of it, so the same convention is used here.
NON_MAC_DEFAULTS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler",
)


def _no_macs(inputs: list, outputs: list) -> int:
    return 0


def fvcore_handles() -> dict[str, Callable]:
    """The handles `fvcore_macs` adds to (or replaces in) fvcore's defaults, by traced op name."""
    handles: dict[str, Callable] = {name: _no_macs for name in NON_MAC_DEFAULTS}
    handles.update({CRISS_CROSS_NAIVE_OP: _criss_cross_handle, SDPA_OP: _sdpa_handle})
    handles.update({name: _criss_cross_handle for name in CRISS_CROSS_TRITON_OPS})
    return handles


def fvcore_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> MacCount:
    """Count the MACs of `model(*inputs)` (forward only) with fvcore, failing on skipped work.

    Raises:
        SkippedWorkError: fvcore met an op with no handle that is not in `MAC_FREE_OPS`.
    """
    if not isinstance(inputs, tuple):
        raise TypeError(f"inputs must be a tuple of tensors, got {type(inputs).__name__}")
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**fvcore_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    # fvcore logs each skipped op; the check below reports them all at once instead.
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        total = analysis.total()
        skipped = dict(analysis.unsupported_ops())
        by_module = dict(analysis.by_module())
        by_operator = dict(analysis.by_operator())
    finally:
        logger.setLevel(level)
    carrying = sorted(op for op in skipped if op not in MAC_FREE_OPS)
    if carrying:
        raise SkippedWorkError(
            f"fvcore skipped ops that may carry multiply-accumulates: {carrying}; register a handle in "
            "repro.measure.flops.fvcore_handles or, if they carry none, add them to MAC_FREE_OPS"
        )
    return MacCount(macs=int(total), by_module=by_module, by_operator=by_operator, skipped=skipped)


def flop_counter_mapping() -> dict:
    """FlopCounterMode formulas for ops outside its registry, which it would count as 0 without a word:
    in-place baddbmm_ (same count as bmm) and the CPU flash-attention kernel that SDPA picks when query/key
    and value widths are equal (same count as the other fused SDPA kernels)."""

    def baddbmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return bmm_flop(a_shape, b_shape)

    def cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # Keyed by the op packet: FlopCounterMode looks ops up by packet, not by `.default`.
    return {
        torch.ops.aten.baddbmm_: baddbmm_inplace_flop,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_flop,
    }


def flop_counter_flops(
    build: Callable[[], nn.Module],
    input_shapes: Sequence[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
) -> int:
    """FLOPs (2 x MACs) of one forward of `build()(*inputs)` counted by FlopCounterMode under FakeTensorMode.

    The module is built inside the fake mode, so nothing of the real size is allocated.
    """
    with FakeTensorMode():
        model = build()
        inputs = [torch.empty(*shape, dtype=dtype) for shape in input_shapes]
        counter = FlopCounterMode(display=False, custom_mapping=flop_counter_mapping())
        with torch.no_grad(), counter:
            model(*inputs)
    return int(counter.get_total_flops())

