"""Fused criss-cross attention in Triton: forward and deterministic backward, no materialised attention map.

Layers (each small): Triton kernels -> launchers (`cca_triton_forward`, `cca_triton_backward`: checks,
allocation, grid) -> `torch.library` custom ops `ccrepro::cca_triton_forward` / `ccrepro::cca_triton_backward`
(fake implementations, autograd, FLOP formula, fvcore handle) -> `criss_cross_attention_triton`, which
`ops.criss_cross_attention(..., backend="triton")` calls.

Decomposition. A pixel (i, j) attends the H - 1 other pixels of its column and the W pixels of its row (itself
once, in the row). Both are "lines": a column is a line of length H whose positions are one image row apart, a
row a line of length W whose positions are adjacent. One stride-generic line kernel serves both, with the
strides swapped; only the column pass masks the diagonal.

* Forward, pass 1 (columns): a program owns a block of query positions on one line of one image and one
  block of value channels; it runs an online softmax over key blocks of its line and writes the normalised
  column output and the column log-sum-exp (LSE) into its own buffer. Pass 2 (rows) does the same over the
  row and merges with pass 1 by log-sum-exp, so the softmax is joint over the H + W - 1 pixels. Only the
  final (B, H, W) LSE (fp32; fp64 for fp64 inputs) is saved for backward: the (B, H, W, H + W) map never
  exists in memory.
* Backward: delta = sum_c dO * O per pixel; probabilities are recomputed as exp(q.k - lse). Per pass, a dq
  kernel owns query pixels, a dk kernel owns key pixels and a dv kernel owns key pixels x a block of value
  channels; the row pass adds onto what the column pass wrote. Every output element has exactly one owner in
  each pass, so there are no atomics and the result is deterministic. As in flash attention, delta uses the
  output as stored (rounded to the input dtype); in bf16 that rounding dominates the error of dq and dk.
* Channels are looped over in blocks (BLOCK_K for query/key, BLOCK_V for value), so Cqk and Cv are not
  limited by registers. The kernels take arbitrary element strides, so NCHW, channels_last and
  non-contiguous inputs need no copy; channels_last makes every tile row a contiguous channel vector (NCHW
  cannot coalesce the column pass).

Cost of one call, per (B, Cqk, Cv, H, W) with P = B * H * W pixels, A = H + W - 1 attended pixels each and
itemsize s (see `ops.cost`, which the FLOP formula and fvcore handle below use):
* forward: P * A * (Cqk + Cv) multiply-accumulates (FLOPs = 2x that); the energies are recomputed once per
  value-channel block (ceil(Cv / BLOCK_V) times), which the analytic count does not include. Bytes at the
  minimum: read q, k, v, write out = P * (2 Cqk + 2 Cv) * s, plus the fp32 LSE (4 P). In addition pass 1
  writes the column output that pass 2 re-reads and overwrites (2 P Cv s) and the column LSE (8 P), and q, k
  are re-read once per value-channel block (mostly from cache).
* backward: 2 * P * A * (Cqk + Cv) multiply-accumulates plus one energy recomputation P * A * Cqk
  (`ops.cost.criss_cross_attention_backward_cost(recompute=True)`).
The roofline fraction of a measured time t is then max(flops / peak_flops, bytes / peak_bandwidth) / t.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ops import cost
from ops._checks import check_qkv

# Whether triton.jit produced interpreted kernels: decided when triton sees the environment at decoration
# time, so it is read once here, not per call.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# float64 is for checking (gradcheck); it runs the same kernels with float64 accumulators and LSE.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _line_dot(
    a_base, b_base, offs_a, offs_b, a_mask, b_mask, sa_pos, sa_c, sb_pos, sb_c, channels,
    LEN_A: tl.constexpr, LEN_B: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """(LEN_A, LEN_B) fp32 block of sum_c a[offs_a, c] * b[offs_b, c], looping over channel blocks."""
    acc = tl.zeros([LEN_A, LEN_B], dtype=ACC)
    for c_start in range(0, channels, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        c_mask = offs_c < channels
        a = tl.load(a_base + offs_a[:, None] * sa_pos + offs_c[None, :] * sa_c,
                    mask=a_mask[:, None] & c_mask[None, :], other=0.0)
        b = tl.load(b_base + offs_c[:, None] * sb_c + offs_b[None, :] * sb_pos,
                    mask=c_mask[:, None] & b_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _attended(offs_q, offs_k, q_mask, k_mask, MASK_DIAG: tl.constexpr):
    """(queries, keys) mask of the pairs a line pass attends: in range, and off the diagonal in the column
    pass (the pixel itself is counted once, in the row pass)."""
    valid = q_mask[:, None] & k_mask[None, :]
    if MASK_DIAG:
        valid = valid & (offs_q[:, None] != offs_k[None, :])
    return valid


@triton.jit
def _line_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_in_ptr, lse_out_ptr,
    sq_b, sq_line, sq_pos, sq_c,
    sk_b, sk_line, sk_pos, sk_c,
    sv_b, sv_line, sv_pos, sv_c,
    so_b, so_line, so_pos, so_c,
    sl_b, sl_line, sl_pos,
    n_lines, length, qk_channels, v_channels,
    MASK_DIAG: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One line pass of the forward. Grid: (B * n_lines, query blocks, value-channel blocks).

    MERGE=False (column pass): write the normalised output of this branch to o and its LSE to lse_out.
    MERGE=True (row pass): merge with the output already in o and the LSE in lse_in, write o and lse_out.
    """
    pid_line = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_v = tl.program_id(2)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    q_base = q_ptr + batch * sq_b + line * sq_line
    k_base = k_ptr + batch * sk_b + line * sk_line
    v_base = v_ptr + batch * sv_b + line * sv_line
    o_base = o_ptr + batch * so_b + line * so_line
    lse_offset = batch * sl_b + line * sl_line

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_mask = offs_m < length
    v_mask = offs_v < v_channels

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=ACC)
    for n_start in range(0, length, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        scores = _line_dot(q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c, sk_pos, sk_c,
                           qk_channels, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION, ACC)
        scores = tl.where(_attended(offs_m, offs_n, m_mask, n_mask, MASK_DIAG), scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A query with nothing attended so far (the column of an H = 1 image, or a fully masked block) has
        # max -inf; subtracting 0 instead keeps exp(-inf - -inf) = NaN out.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - shift[:, None])
        rescale = tl.exp(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        values = tl.load(v_base + offs_n[:, None] * sv_pos + offs_v[None, :] * sv_c,
                         mask=n_mask[:, None] & v_mask[None, :], other=0.0)
        acc = tl.dot(probs.to(DOT_DTYPE), values.to(DOT_DTYPE), acc * rescale[:, None],
                     input_precision=PRECISION)
        row_max = new_max

    # An empty branch (sum 0) has LSE -inf and output 0; it then carries no weight in the merge.
    nonempty = row_sum > 0.0
    safe_sum = tl.where(nonempty, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(nonempty, row_max + tl.log(safe_sum), float("-inf"))

    o_ptrs = o_base + offs_m[:, None] * so_pos + offs_v[None, :] * so_c
    o_mask = m_mask[:, None] & v_mask[None, :]
    if MERGE:
        # The row branch always holds the pixel itself, so a real pixel has a finite merged LSE; only the
        # padding rows past the line's end are empty in both branches and need the guards.
        lse_other = tl.load(lse_in_ptr + lse_offset + offs_m * sl_pos, mask=m_mask, other=float("-inf"))
        out_other = tl.load(o_ptrs, mask=o_mask, other=0.0).to(ACC)
        merged_max = tl.maximum(lse, lse_other)
        merged_max = tl.where(merged_max == float("-inf"), 0.0, merged_max)
        weight = tl.exp(lse - merged_max)
        weight_other = tl.exp(lse_other - merged_max)
        total = tl.where(m_mask, weight + weight_other, 1.0)
        out = (out * weight[:, None] + out_other * weight_other[:, None]) / total[:, None]
        lse = merged_max + tl.log(total)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    # Every value-channel block computes the same LSE; one of them writes it.
    if pid_v == 0:
        tl.store(lse_out_ptr + lse_offset + offs_m * sl_pos, lse, mask=m_mask)


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    so_b, so_line, so_pos, so_c,
    sd_b, sd_line, sd_pos, sd_c,
    sl_b, sl_line, sl_pos,
    n_lines, length, v_channels,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """delta[pixel] = sum_c out[pixel, c] * grad_out[pixel, c] (fp32), over rows. Grid: (B * H, W blocks)."""
    pid_line = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    o_base = o_ptr + batch * so_b + line * so_line
    do_base = do_ptr + batch * sd_b + line * sd_line
    total = tl.zeros([BLOCK_M], dtype=ACC)
    for c_start in range(0, v_channels, BLOCK_V):
        offs_c = c_start + tl.arange(0, BLOCK_V)
        mask = m_mask[:, None] & (offs_c < v_channels)[None, :]
        out = tl.load(o_base + offs_m[:, None] * so_pos + offs_c[None, :] * so_c, mask=mask, other=0.0)
        grad = tl.load(do_base + offs_m[:, None] * sd_pos + offs_c[None, :] * sd_c, mask=mask, other=0.0)
        total += tl.sum(out.to(ACC) * grad.to(ACC), axis=1)
    tl.store(delta_ptr + batch * sl_b + line * sl_line + offs_m * sl_pos, total, mask=m_mask)


@triton.jit
def _line_grad_query_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sq_b, sq_line, sq_pos, sq_c,
    sk_b, sk_line, sk_pos, sk_c,
    sv_b, sv_line, sv_pos, sv_c,
    sd_b, sd_line, sd_pos, sd_c,
    sl_b, sl_line, sl_pos,
    sdq_b, sdq_line, sdq_pos, sdq_c,
    n_lines, length, qk_channels, v_channels,
    MASK_DIAG: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dq[query] (+)= sum_key dS[query, key] k[key] over one line.
    Grid: (B * n_lines, query blocks, Cqk blocks).

    dS = P * (dP - delta), P = exp(q.k - lse), dP = dO.v. BLOCK_K is both the reduction block of q.k and
    the width of the dq channel block this program owns.
    """
    pid_line = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    q_base = q_ptr + batch * sq_b + line * sq_line
    k_base = k_ptr + batch * sk_b + line * sk_line
    v_base = v_ptr + batch * sv_b + line * sv_line
    do_base = do_ptr + batch * sd_b + line * sd_line
    lse_offset = batch * sl_b + line * sl_line

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < length
    c_mask = offs_c < qk_channels
    lse = tl.load(lse_ptr + lse_offset + offs_m * sl_pos, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + lse_offset + offs_m * sl_pos, mask=m_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    for n_start in range(0, length, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        scores = _line_dot(q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c, sk_pos, sk_c,
                           qk_channels, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION, ACC)
        scores = tl.where(_attended(offs_m, offs_n, m_mask, n_mask, MASK_DIAG), scores, float("-inf"))
        probs = tl.exp(scores - lse[:, None])
        grad_probs = _line_dot(do_base, v_base, offs_m, offs_n, m_mask, n_mask, sd_pos, sd_c, sv_pos, sv_c,
                               v_channels, BLOCK_M, BLOCK_N, BLOCK_V, DOT_DTYPE, PRECISION, ACC)
        grad_scores = probs * (grad_probs - delta[:, None])
        keys = tl.load(k_base + offs_n[:, None] * sk_pos + offs_c[None, :] * sk_c,
                       mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(grad_scores.to(DOT_DTYPE), keys.to(DOT_DTYPE), acc, input_precision=PRECISION)

    dq_ptrs = dq_ptr + batch * sdq_b + line * sdq_line + offs_m[:, None] * sdq_pos + offs_c[None, :] * sdq_c
    dq_mask = m_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(dq_ptrs, mask=dq_mask, other=0.0).to(ACC)
    tl.store(dq_ptrs, acc.to(dq_ptr.dtype.element_ty), mask=dq_mask)


@triton.jit
def _line_grad_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr,
    sq_b, sq_line, sq_pos, sq_c,
    sk_b, sk_line, sk_pos, sk_c,
    sv_b, sv_line, sv_pos, sv_c,
    sd_b, sd_line, sd_pos, sd_c,
    sl_b, sl_line, sl_pos,
    sdk_b, sdk_line, sdk_pos, sdk_c,
    n_lines, length, qk_channels, v_channels,
    MASK_DIAG: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dk[key] (+)= sum_query dS[query, key] q[query] over one line.
    Grid: (B * n_lines, key blocks, Cqk blocks).

    Works on transposed tiles (keys x queries) so that the key block it owns is the row index.
    """
    pid_line = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    q_base = q_ptr + batch * sq_b + line * sq_line
    k_base = k_ptr + batch * sk_b + line * sk_line
    v_base = v_ptr + batch * sv_b + line * sv_line
    do_base = do_ptr + batch * sd_b + line * sd_line
    lse_offset = batch * sl_b + line * sl_line

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < length
    c_mask = offs_c < qk_channels

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    for m_start in range(0, length, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        lse = tl.load(lse_ptr + lse_offset + offs_m * sl_pos, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + lse_offset + offs_m * sl_pos, mask=m_mask, other=0.0)
        scores_t = _line_dot(k_base, q_base, offs_n, offs_m, n_mask, m_mask, sk_pos, sk_c, sq_pos, sq_c,
                             qk_channels, BLOCK_N, BLOCK_M, BLOCK_K, DOT_DTYPE, PRECISION, ACC)
        scores_t = tl.where(_attended(offs_n, offs_m, n_mask, m_mask, MASK_DIAG), scores_t, float("-inf"))
        probs_t = tl.exp(scores_t - lse[None, :])
        grad_probs_t = _line_dot(v_base, do_base, offs_n, offs_m, n_mask, m_mask, sv_pos, sv_c, sd_pos, sd_c,
                                 v_channels, BLOCK_N, BLOCK_M, BLOCK_V, DOT_DTYPE, PRECISION, ACC)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        queries = tl.load(q_base + offs_m[:, None] * sq_pos + offs_c[None, :] * sq_c,
                          mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(grad_scores_t.to(DOT_DTYPE), queries.to(DOT_DTYPE), acc, input_precision=PRECISION)

    dk_ptrs = dk_ptr + batch * sdk_b + line * sdk_line + offs_n[:, None] * sdk_pos + offs_c[None, :] * sdk_c
    dk_mask = n_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(dk_ptrs, mask=dk_mask, other=0.0).to(ACC)
    tl.store(dk_ptrs, acc.to(dk_ptr.dtype.element_ty), mask=dk_mask)


@triton.jit
def _line_grad_value_kernel(
    q_ptr, k_ptr, do_ptr, lse_ptr, dv_ptr,
    sq_b, sq_line, sq_pos, sq_c,
    sk_b, sk_line, sk_pos, sk_c,
    sd_b, sd_line, sd_pos, sd_c,
    sl_b, sl_line, sl_pos,
    sdv_b, sdv_line, sdv_pos, sdv_c,
    n_lines, length, qk_channels, v_channels,
    MASK_DIAG: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dv[key] (+)= sum_query P[query, key] dO[query] over one line.
    Grid: (B * n_lines, key blocks, value-channel blocks)."""
    pid_line = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_v = tl.program_id(2)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    q_base = q_ptr + batch * sq_b + line * sq_line
    k_base = k_ptr + batch * sk_b + line * sk_line
    do_base = do_ptr + batch * sd_b + line * sd_line
    lse_offset = batch * sl_b + line * sl_line

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < length
    v_mask = offs_v < v_channels

    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    for m_start in range(0, length, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        lse = tl.load(lse_ptr + lse_offset + offs_m * sl_pos, mask=m_mask, other=0.0)
        scores_t = _line_dot(k_base, q_base, offs_n, offs_m, n_mask, m_mask, sk_pos, sk_c, sq_pos, sq_c,
                             qk_channels, BLOCK_N, BLOCK_M, BLOCK_K, DOT_DTYPE, PRECISION, ACC)
        scores_t = tl.where(_attended(offs_n, offs_m, n_mask, m_mask, MASK_DIAG), scores_t, float("-inf"))
        probs_t = tl.exp(scores_t - lse[None, :])
        grad_out = tl.load(do_base + offs_m[:, None] * sd_pos + offs_v[None, :] * sd_c,
                           mask=m_mask[:, None] & v_mask[None, :], other=0.0)
        acc = tl.dot(probs_t.to(DOT_DTYPE), grad_out.to(DOT_DTYPE), acc, input_precision=PRECISION)

    dv_ptrs = dv_ptr + batch * sdv_b + line * sdv_line + offs_n[:, None] * sdv_pos + offs_v[None, :] * sdv_c
    dv_mask = n_mask[:, None] & v_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(dv_ptrs, mask=dv_mask, other=0.0).to(ACC)
    tl.store(dv_ptrs, acc.to(dv_ptr.dtype.element_ty), mask=dv_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Blocks:
    """Upper bounds of the tile sizes; the launcher shrinks each to the problem (never below 16, the minimum
    tl.dot accepts on a GPU).

    line: query and key positions per tile (BLOCK_M, BLOCK_N). qk_channels: BLOCK_K, the query/key channel
    block. v_channels: BLOCK_V, the value channel block. num_warps, num_stages: GPU launch settings.
    """

    line: int
    qk_channels: int
    v_channels: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("line", "qk_channels", "v_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Blocks.{name} must be a power of two >= 16, got {value!r}")


def default_blocks(device: torch.device, dtype: torch.dtype) -> Blocks:
    """Tile bounds for inputs of `dtype` on `device`.

    Interpreter cost grows with programs x loop iterations, not with tile size, so CPU (CI) uses large tiles.
    On a GPU the tiles must keep the accumulators in registers. No GPU was available to time candidates, so
    these are the largest settings that compiled for sm_90 (triton 3.9, ptxas -v) without register spills in
    any kernel: 64-wide tiles with 8 warps for fp16 / bf16 (tensor-core dots); 32-wide tiles with 4 warps for
    exact fp32 / fp64, whose FMA dots hold both operands in registers (64-wide ones spilled 250+ bytes).
    """
    if device.type != "cuda":
        return Blocks(line=128, qk_channels=128, v_channels=128)
    if dtype in (torch.float16, torch.bfloat16):
        return Blocks(line=64, qk_channels=64, v_channels=64, num_warps=8, num_stages=2)
    return Blocks(line=32, qk_channels=32, v_channels=32, num_warps=4, num_stages=2)


def _tile(extent: int, upper: int) -> int:
    return max(16, min(upper, triton.next_power_of_2(extent)))


def _line_strides(tensor: torch.Tensor, *, column: bool) -> tuple[int, int, int, int]:
    """Element strides (batch, line, position, channel) of a (B, C, H, W) tensor seen as lines: a column line
    is indexed by j with positions i, a row line by i with positions j."""
    s_b, s_c, s_h, s_w = tensor.stride()
    return (s_b, s_w, s_h, s_c) if column else (s_b, s_h, s_w, s_c)


def _pixel_strides(tensor: torch.Tensor, *, column: bool) -> tuple[int, int, int]:
    """Like `_line_strides` for a (B, H, W) per-pixel tensor (LSE, delta)."""
    s_b, s_h, s_w = tensor.stride()
    return (s_b, s_w, s_h) if column else (s_b, s_h, s_w)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp (and of the kernels' accumulators) for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_dtypes(dtype: torch.dtype, *, allow_tf32: bool) -> dict[str, object]:
    """tl.dot operand dtype, fp32 product precision and accumulator dtype for inputs of `dtype`.

    The interpreter multiplies bf16 bit patterns as integers, so bf16 operands are upcast to fp32 there; fp32
    uses exact ("ieee") products unless tf32 is allowed.
    """
    if dtype == torch.float64:
        return {"DOT_DTYPE": tl.float64, "PRECISION": "ieee", "ACC": tl.float64}
    if dtype == torch.float32:
        return {"DOT_DTYPE": tl.float32, "PRECISION": "tf32" if allow_tf32 else "ieee", "ACC": tl.float32}
    if dtype == torch.bfloat16 and INTERPRETED:
        return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee", "ACC": tl.float32}
    half = tl.float16 if dtype == torch.float16 else tl.bfloat16
    return {"DOT_DTYPE": half, "PRECISION": "tf32", "ACC": tl.float32}


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, op: str) -> None:
    check_qkv(query, key, value, op)
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: backend='triton' supports {SUPPORTED_DTYPES}, got {query.dtype}")
    if query.device.type == "cuda":
        return
    if query.device.type == "cpu" and INTERPRETED:
        return
    raise RuntimeError(
        f"{op}: backend='triton' needs a CUDA tensor, got a tensor on {query.device}; to run the kernels on "
        "CPU set TRITON_INTERPRET=1 before triton is first imported (the Triton interpreter), or use "
        "backend='naive'"
    )


def _device_guard(device: torch.device):
    """Launch on the inputs' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _channels_last_like(tensor: torch.Tensor) -> torch.Tensor:
    """Empty (B, C, H, W) tensor in channels_last memory; the fake implementations use it too, so that the
    strides a compiled graph sees are those the kernels produce."""
    return torch.empty(
        tensor.shape, dtype=tensor.dtype, device=tensor.device, memory_format=torch.channels_last
    )


def cca_triton_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    blocks: Blocks | None = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused criss-cross attention forward.

    Args:
        query, key: (B, Cqk, H, W), any strides. value: (B, Cv, H, W).
        blocks: tile bounds (default `default_blocks(device, dtype)`).
        allow_tf32: fp32 inputs on a GPU use tf32 products (faster, ~1e-3 relative) instead of exact ones.

    Returns:
        out: (B, Cv, H, W) in the input dtype, channels_last memory.
        lse: (B, H, W) fp32 (fp64 for fp64 inputs), the log-sum-exp of each pixel's H + W - 1 energies.
    """
    _check_inputs(query, key, value, "cca_triton_forward")
    blocks = blocks or default_blocks(query.device, query.dtype)
    batch, qk_channels, height, width = query.shape
    v_channels = value.shape[1]
    out = _channels_last_like(value)
    lse_column = torch.empty((batch, height, width), dtype=lse_dtype(query.dtype), device=query.device)
    lse = torch.empty_like(lse_column)
    kernel_dtypes = _kernel_dtypes(query.dtype, allow_tf32=allow_tf32)
    block_k = _tile(qk_channels, blocks.qk_channels)
    block_v = _tile(v_channels, blocks.v_channels)
    with _device_guard(query.device):
        # Pass 1 over columns (diagonal masked), pass 2 over rows merging into it.
        for column, lse_in, lse_out in ((True, lse_column, lse_column), (False, lse_column, lse)):
            n_lines, length = (width, height) if column else (height, width)
            block_line = _tile(length, blocks.line)
            grid = (batch * n_lines, triton.cdiv(length, block_line), triton.cdiv(v_channels, block_v))
            _line_forward_kernel[grid](
                query, key, value, out, lse_in, lse_out,
                *_line_strides(query, column=column), *_line_strides(key, column=column),
                *_line_strides(value, column=column), *_line_strides(out, column=column),
                *_pixel_strides(lse_out, column=column),
                n_lines, length, qk_channels, v_channels,
                MASK_DIAG=column, MERGE=not column,
                BLOCK_M=block_line, BLOCK_N=block_line, BLOCK_K=block_k, BLOCK_V=block_v,
                **kernel_dtypes,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            )
    return out, lse


def cca_triton_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    blocks: Blocks | None = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused criss-cross attention backward (deterministic: every gradient element has one owner per pass).

    Args:
        grad_out, out: (B, Cv, H, W); query, key: (B, Cqk, H, W); value: (B, Cv, H, W); lse: (B, H, W) fp32
            (fp64 for fp64 inputs) from `cca_triton_forward`. Any strides.

    Returns:
        grad_query, grad_key, grad_value in the input dtype, channels_last memory.
    """
    _check_inputs(query, key, value, "cca_triton_backward")
    batch, qk_channels, height, width = query.shape
    v_channels = value.shape[1]
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if tensor.shape != value.shape or tensor.device != value.device:
            raise ValueError(f"cca_triton_backward: {name} must be {tuple(value.shape)} on {value.device}, "
                             f"got {tuple(tensor.shape)} on {tensor.device}")
    if lse.shape != (batch, height, width) or lse.dtype != lse_dtype(query.dtype):
        raise ValueError(f"cca_triton_backward: lse must be {lse_dtype(query.dtype)} {(batch, height, width)}, "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    blocks = blocks or default_blocks(query.device, query.dtype)
    kernel_dtypes = _kernel_dtypes(query.dtype, allow_tf32=allow_tf32)
    block_k = _tile(qk_channels, blocks.qk_channels)
    block_v = _tile(v_channels, blocks.v_channels)
    launch = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}

    grad_query, grad_key, grad_value = (_channels_last_like(t) for t in (query, key, value))
    # The kernels index LSE and delta with one set of strides.
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    with _device_guard(query.device):
        block_row = _tile(width, blocks.line)
        _delta_kernel[(batch * height, triton.cdiv(width, block_row))](
            out, grad_out, delta,
            *_line_strides(out, column=False), *_line_strides(grad_out, column=False),
            *_pixel_strides(delta, column=False),
            height, width, v_channels,
            BLOCK_M=block_row, BLOCK_V=block_v, ACC=kernel_dtypes["ACC"], **launch,
        )
        # Column pass writes, row pass adds: sequential kernels on one stream, so no atomics are needed.
        for column in (True, False):
            n_lines, length = (width, height) if column else (height, width)
            block_line = _tile(length, blocks.line)
            lines = batch * n_lines
            line_blocks = triton.cdiv(length, block_line)
            q_strides, k_strides = _line_strides(query, column=column), _line_strides(key, column=column)
            v_strides = _line_strides(value, column=column)
            do_strides = _line_strides(grad_out, column=column)
            pixel_strides = _pixel_strides(lse, column=column)
            tiles = {"BLOCK_M": block_line, "BLOCK_N": block_line, "BLOCK_K": block_k, "BLOCK_V": block_v,
                     "MASK_DIAG": column, "ACCUMULATE": not column, **kernel_dtypes}
            sizes = (n_lines, length, qk_channels, v_channels)
            _line_grad_query_kernel[(lines, line_blocks, triton.cdiv(qk_channels, block_k))](
                query, key, value, grad_out, lse, delta, grad_query,
                *q_strides, *k_strides, *v_strides, *do_strides, *pixel_strides,
                *_line_strides(grad_query, column=column), *sizes, **tiles, **launch,
            )
            _line_grad_key_kernel[(lines, line_blocks, triton.cdiv(qk_channels, block_k))](
                query, key, value, grad_out, lse, delta, grad_key,
                *q_strides, *k_strides, *v_strides, *do_strides, *pixel_strides,
                *_line_strides(grad_key, column=column), *sizes, **tiles, **launch,
            )
            _line_grad_value_kernel[(lines, line_blocks, triton.cdiv(v_channels, block_v))](
                query, key, grad_out, lse, grad_value,
                *q_strides, *k_strides, *do_strides, *pixel_strides,
                *_line_strides(grad_value, column=column), *sizes, **tiles, **launch,
            )
    return grad_query, grad_key, grad_value


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops: fake implementations (same strides as the real ones), autograd, FLOP counting
# ----------------------------------------------------------------------------------------------------------

FORWARD_OP_NAME = "ccrepro::cca_triton_forward"
BACKWARD_OP_NAME = "ccrepro::cca_triton_backward"


@torch.library.custom_op(FORWARD_OP_NAME, mutates_args=())
def _forward_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return cca_triton_forward(query, key, value)


@_forward_op.register_fake
def _forward_fake(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, height, width = query.shape
    return _channels_last_like(value), query.new_empty((batch, height, width), dtype=lse_dtype(query.dtype))


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cca_triton_backward(grad_out, query, key, value, out, lse)


@_backward_op.register_fake
def _backward_fake(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _channels_last_like(query), _channels_last_like(key), _channels_last_like(value)


def _setup_context(ctx, inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    query, key, value = inputs
    out, lse = output
    # The LSE is an internal by-product saved for backward; gradients do not flow through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, out, lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
    query, key, value, out, lse = ctx.saved_tensors
    return torch.ops.ccrepro.cca_triton_backward(grad_out, query, key, value, out, lse)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _shape_cost(query_shape: torch.Size, value_shape: torch.Size, *, backward: bool) -> cost.Cost:
    batch, qk_channels, height, width = query_shape
    v_channels = value_shape[1]
    if backward:
        return cost.criss_cross_attention_backward_cost(batch, qk_channels, v_channels, height, width)
    return cost.criss_cross_attention_cost(batch, qk_channels, v_channels, height, width)


@register_flop_formula(torch.ops.ccrepro.cca_triton_forward)
def _forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 x multiply-accumulates) for torch.utils.flop_counter.FlopCounterMode."""
    return _shape_cost(query_shape, value_shape, backward=False).flops


@register_flop_formula(torch.ops.ccrepro.cca_triton_backward)
def _backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """Backward FLOPs including the recomputation of the energies (the work the kernels do)."""
    return _shape_cost(query_shape, value_shape, backward=True).flops


def fvcore_handle():
    """fvcore op handle for FORWARD_OP_NAME: multiply-accumulates from `ops.cost` (fvcore counts one flop per
    multiply-accumulate). Register with
    `FlopCountAnalysis(model, inputs).set_op_handle(FORWARD_OP_NAME, fvcore_handle())`."""
    from fvcore.nn.jit_handles import get_shape

    def handle(inputs, outputs) -> int:
        query_shape, value_shape = get_shape(inputs[0]), get_shape(inputs[2])
        return _shape_cost(query_shape, value_shape, backward=False).macs

    return handle


def criss_cross_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention through the fused Triton op: (B, Cqk, H, W) x2, (B, Cv, H, W) -> (B, Cv, H, W)
    (channels_last memory), differentiable in all three inputs."""
    out, _ = torch.ops.ccrepro.cca_triton_forward(query, key, value)
    return out
