"""Analytic cost model of the attention ops: multiply-accumulates (MACs), FLOPs (= 2 x MACs, the
convention of the CCNet paper; fvcore counts 1 flop per MAC) and bytes moved.

Conventions:
* The attention op alone (`*_attention_cost`): energies (one dot product of Cqk per attended pair) and
  aggregation (one of Cv per attended pair). Criss-cross attends H + W - 1 pixels per pixel (the pixel
  itself once); non-local attends all H * W. Softmax and elementwise work are not MACs and are not counted,
  as in the paper.
* The module (`*_module_cost`): the three 1x1 convs (in -> Cqk, Cqk, C) plus the op, times the recurrence
  (the paper's R loops share weights but recompute everything).
* Bytes: the minimum a fused kernel must move (read q, k, v, write out, plus the fp32 log-sum-exp for
  backward) versus what a materialising implementation moves in addition (write the (.., H + W) or
  (HW, HW) energy map, read it for softmax, write probabilities, read them for aggregation).
* Backward: every matmul has two gradient matmuls, so 2x the forward MACs; a flash-style kernel that
  recomputes probabilities adds one more energy pass.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32_BYTES = 4


@dataclass(frozen=True)
class Cost:
    """MACs and bytes moved by one call; `flops` is 2 x MACs."""

    macs: int
    bytes: int = 0

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.bytes + other.bytes)

    def __mul__(self, factor: int) -> Cost:
        return Cost(self.macs * factor, self.bytes * factor)

    __rmul__ = __mul__


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def criss_cross_attention_cost(
    batch: int,
    qk_channels: int,
    value_channels: int,
    height: int,
    width: int,
    *,
    itemsize: int = FP32_BYTES,
    materialised: bool = False,
) -> Cost:
    """Forward cost of `ops.criss_cross_attention` on (B, Cqk, H, W) query/key and (B, Cv, H, W) value.

    materialised=False: the fused kernel's minimum traffic (q, k, v in, out and fp32 LSE out).
    materialised=True: plus the (B, H, W, H + W) map written, read, written and read again.
    """
    _check_positive(batch=batch, qk_channels=qk_channels, value_channels=value_channels, height=height,
                    width=width, itemsize=itemsize)
    pixels = batch * height * width
    attended = height + width - 1
    macs = pixels * attended * (qk_channels + value_channels)
    moved = pixels * (2 * qk_channels + 2 * value_channels) * itemsize + pixels * FP32_BYTES
    if materialised:
        moved += 4 * pixels * (height + width) * itemsize
    return Cost(macs, moved)


def criss_cross_attention_backward_cost(
    batch: int,
    qk_channels: int,
    value_channels: int,
    height: int,
    width: int,
    *,
    itemsize: int = FP32_BYTES,
    recompute: bool = True,
) -> Cost:
    """Backward cost: dP, dV (aggregation), dQ, dK (energies) = 2x forward MACs, plus one energy pass when
    probabilities are recomputed (recompute=True, the fused kernel). Bytes: read q, k, v, out, dO, LSE;
    write dq, dk, dv."""
    _check_positive(batch=batch, qk_channels=qk_channels, value_channels=value_channels, height=height,
                    width=width, itemsize=itemsize)
    pixels = batch * height * width
    attended = height + width - 1
    macs = 2 * pixels * attended * (qk_channels + value_channels)
    if recompute:
        macs += pixels * attended * qk_channels
    moved = pixels * (4 * qk_channels + 4 * value_channels) * itemsize + pixels * FP32_BYTES
    return Cost(macs, moved)


def non_local_attention_cost(
    batch: int,
    qk_channels: int,
    value_channels: int,
    height: int,
    width: int,
    *,
    itemsize: int = FP32_BYTES,
    materialised: bool = True,
) -> Cost:
    """Forward cost of `ops.non_local.non_local_attention`: every pixel attends all H * W pixels."""
    _check_positive(batch=batch, qk_channels=qk_channels, value_channels=value_channels, height=height,
                    width=width, itemsize=itemsize)
    pixels = height * width
    macs = batch * pixels * pixels * (qk_channels + value_channels)
    moved = batch * pixels * (2 * qk_channels + 2 * value_channels) * itemsize
    if materialised:
        moved += 4 * batch * pixels * pixels * itemsize
    return Cost(macs, moved)


def conv1x1_cost(
    batch: int, in_channels: int, out_channels: int, height: int, width: int, *, itemsize: int = FP32_BYTES
) -> Cost:
    """A 1x1 convolution: in_channels MACs per output element (bias adds not counted)."""
    _check_positive(batch=batch, in_channels=in_channels, out_channels=out_channels, height=height,
                    width=width)
    pixels = batch * height * width
    return Cost(pixels * in_channels * out_channels, pixels * (in_channels + out_channels) * itemsize)


def _projections_cost(batch: int, in_channels: int, qk_channels: int, height: int, width: int) -> Cost:
    return (
        conv1x1_cost(batch, in_channels, qk_channels, height, width) * 2
        + conv1x1_cost(batch, in_channels, in_channels, height, width)
    )


def criss_cross_module_cost(
    batch: int, in_channels: int, qk_channels: int, height: int, width: int, *, recurrence: int = 1
) -> Cost:
    """Forward cost of `recurrence` passes of `ops.CrissCrossAttention(in_channels, qk_channels=...)`."""
    if not isinstance(recurrence, int) or recurrence < 0:
        raise ValueError(f"recurrence must be an int >= 0, got {recurrence!r}")
    one = _projections_cost(batch, in_channels, qk_channels, height, width) + criss_cross_attention_cost(
        batch, qk_channels, in_channels, height, width
    )
    return one * recurrence


def non_local_module_cost(batch: int, in_channels: int, qk_channels: int, height: int, width: int) -> Cost:
    """Forward cost of one `ops.NonLocal2d(in_channels, qk_channels=...)`."""
    return _projections_cost(batch, in_channels, qk_channels, height, width) + non_local_attention_cost(
        batch, qk_channels, in_channels, height, width
    )
