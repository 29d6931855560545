"""Fused criss-cross attention in Triton (second generation): forward and deterministic backward, no
materialised attention map.

Layers (each small): Triton kernels -> launchers (`plan_forward` / `plan_backward` allocate outputs and plan
the launches without running anything, `cca_triton_forward` / `cca_triton_backward` check and run them) ->
`torch.library` custom ops `ccrepro::cca_triton_forward` / `ccrepro::cca_triton_backward` (fake
implementations, autograd, FLOP formula, fvcore handle) -> `criss_cross_attention_triton`, which
`ops.criss_cross_attention(..., backend="triton")` calls.

Decomposition. A pixel (i, j) attends the H - 1 other pixels of its column and the W pixels of its row (itself
once, in the row). Both are "lines": a column is a line of length H whose positions are one image row apart, a
row a line of length W whose positions are adjacent. One stride-generic line kernel serves both, with the
strides swapped; only the column pass masks the diagonal.

Design, and why:
* Whole-line tiles. A program owns one line (up to the line tile, 128 positions on a GPU in bf16 / fp16) and
  all value channels: the energies S = q k^T of the line are computed once and its softmax once, P stays in
  registers while the value channels are swept in BLOCK_V blocks. (The first version split the value
  channels over the grid and recomputed S per split: 8x at Cv = 512.) Longer lines loop over key blocks:
  a statistics pass, then S recomputed per value block.
* Two passes merged by log-sum-exp. Pass 1 (columns) writes its normalised output and LSE; pass 2 (rows)
  computes the row LSE, merges the two into the joint LSE, and writes out = out_column * exp(lse_column -
  lse) + P_row v with P_row normalised by the joint LSE. The program of a row reads its own pixels before
  writing them, so out and the LSE buffer serve both passes. Only the (B, H, W) LSE (fp32; fp64 for fp64
  inputs) is saved for backward.
* One backward kernel per pass: per (query block, key block) of its line a program computes S, P = exp(S -
  lse), dP = dO v^T (sweeping Cv, writing dv = P^T dO per value block on the way), dS = P (dP - delta), then
  dq = dS k and dk = dS^T q. A program owns its line, so every gradient element has one owner: no atomics,
  fixed order, deterministic. The column pass writes fp32 partial sums, the row pass adds to them and its
  last contribution stores the gradient in the input dtype (no bf16 rounding between passes). delta = sum_c
  dO * O is one small kernel before the passes.
* bf16 / fp16 dots take half-precision operands with fp32 accumulation; the rounding points are the inputs,
  P (forward and dv) and dS (dq, dk). fp32 dots use "tf32x3" (three tf32 products, about fp32 accuracy), not
  FMA-only "ieee". In the interpreter bf16 operands are rounded to bf16 and multiplied in fp32 (`_operand`).
* Layout. The kernels take arbitrary element strides (NCHW, channels_last, non-contiguous: no copy in the
  launcher). Channels-last inputs (1x1 convs on a channels-last feature map produce them) make every tile row
  a contiguous channel vector; NCHW works but the column pass then touches one element per 32-byte sector.

Cost of one call, per (B, Cqk, Cv, H, W) with P = B * H * W pixels, A = H + W - 1 attended pixels each,
itemsize s, lines no longer than the line tile T_col >= H, T_row >= W (whole tiles are computed), channels in
blocks (Cqk', Cv': rounded up to BLOCK_K, BLOCK_V):
* forward bytes: P * (s (4 Cqk + 5 Cv) + 12): q, k, v read by both passes, out written by pass 1, read and
  written by pass 2, the LSE likewise (the minimum is P * (s (2 Cqk + 2 Cv) + 4)).
  MACs: (B W T_col^2 + B H T_row^2) (Cqk' + Cv') (the minimum P A (Cqk + Cv)).
* backward bytes: P (2 s Cv + 4) for delta, 2 P (8 + s (4 Cqk + 2 Cv)) for the passes' reads, 8 P (2 Cqk + Cv)
  for the fp32 partials written and read back, P s (2 Cqk + Cv) for the gradients (the minimum is
  P (s (4 Cqk + 5 Cv) + 4)). MACs: (B W T_col^2 + B H T_row^2) (3 Cqk' + 2 Cv').
  `tests/test_kernels.py` checks both formulas to the byte against the interpreter's counts.
Floors: where each counted goal of the design meets a limit of the op or of the hardware.
* Forward bytes. out(i, j) needs v of row i and of column j. A program that writes final outputs without an
  intermediate reads v of every row and every column its pixels lie on: for n pixels over r rows and c
  columns that is at least max(r W, c H) >= sqrt(n H W) pixels of v (as n <= r c). With m programs per image
  (equal shares) v, and the keys likewise, are read at least sqrt(m) times: 2x at m = 4 (reached by two
  half-image programs), where the bytes are s (Cqk + 2 Cqk + 2 Cv + Cv) per pixel, 1.5x the minimum
  s (2 Cqk + 2 Cv). Filling a GPU of S SMs at batch B takes m >= S / B programs per image (132 / 8 = 17 on an
  H100 / H200, so reads >= 4.1x and bytes >= 2.5x). The other way
  out, an intermediate, costs its write and read: a Cv vector per pixel handed from one program to another
  (the partial output of the other line, which no smaller summary can replace), 2 s Cv per pixel on top of
  v read by both sides. Hence with line-sized programs the floor is q, k, v read twice and out written, read
  and written: s (4 Cqk + 5 Cv) + the LSE, which is what these kernels move (2.4x at Cqk 64, Cv 512); with q
  and k read once it would be s (2 Cqk + 5 Cv) (2.3x), and we know of no design that fills the GPU below it.
  On a GPU the intermediates of an image can stay in L2 between the passes, so HBM sees less than the
  counted bytes; the counts are L2 and HBM together.
* Multiply-accumulates. tl.dot tiles are powers of two >= 16, so a whole-line tile pads a line of L positions
  to T = next_power_of_2(L) in both the query and key dimensions: (T / L)^2 = 1.74x at L = 97. Splitting the
  line into tiles of 64 + 32 + 16 queries with the keys' remainder done elementwise would reach 1.16x at
  three times the code, for work that is not the bottleneck (the op is memory-bound: about 35 MACs per byte
  moved at bf16 against an H100 / H200 balance of about 100 MACs per byte).
* Backward occupancy. A whole-line backward holds P and dP of a 128 x 128 tile in fp32: 128 KiB of registers,
  half of an SM's 256 KiB register file, before any operand or address; two blocks per SM cannot fit. 64 x 64
  tiles at 4 warps do (238 registers on sm_90, 232 on sm_80, no spills), but a 97-pixel line then takes 2 x 2
  tile pairs that re-read dO and v and pass fp32 partial sums through memory within each pass.
* fp32 backward. "tf32x3" splits each fp32 operand into two tf32 halves; a whole-line (128 x 128) backward
  spills on sm_90 in every arrangement tried (8 or 16 warps, one or two sweeps over the value channels, dq
  and dk from dS^T alone), so fp32 lines take 32-wide tiles and pay for it in re-reads (about 7x the
  minimum). With plain "tf32" a whole-line backward that sweeps the value channels twice (dv, then dP; dO read
  twice, about 2.3x) compiled without spills (254 registers); it was not adopted, as fp32 stays near-exact.
Counted at the issue's shapes and compiled for sm_80 / sm_90 by `python -m repro.kernels`:
`results/kernel_model.csv` (bytes, 32-byte sectors and MACs per kernel against the minimum of `ops.cost`)
and `results/kernel_resources.csv` (registers, spills, shared memory, asynchronous copies, blocks per SM).
The FLOP formula and the fvcore handle report the analytic `ops.cost` counts; the roofline fraction of a
measured time t is max(flops / peak_flops, bytes / peak_bandwidth) / t.
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
def _operand(x, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """`x` as a tl.dot operand. ROUND_BF16 (bf16 in the interpreter, whose bf16 dot multiplies bit patterns and
    whose casts truncate): round to bf16, nearest even, as the GPU's cast does, and keep it in fp32."""
    if ROUND_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        result = bits.to(tl.float32, bitcast=True)
    else:
        result = x.to(DOT_DTYPE)
    return result


@triton.jit
def _line_scores(
    q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c, sk_pos, sk_c, channels,
    MASK_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) energies q[offs_m] . k[offs_n] over `channels` (looped in BLOCK_K blocks); -inf where
    the pair is not attended: out of range, or the diagonal in the column pass (the pixel itself is counted
    once, in the row pass)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for c_start in range(0, channels, BLOCK_K):
        offs_c = c_start + tl.arange(0, BLOCK_K)
        c_mask = offs_c < channels
        a = tl.load(q_base + offs_m[:, None] * sq_pos + offs_c[None, :] * sq_c,
                    mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        b = tl.load(k_base + offs_c[:, None] * sk_c + offs_n[None, :] * sk_pos,
                    mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(_operand(a, DOT_DTYPE, ROUND_BF16), _operand(b, DOT_DTYPE, ROUND_BF16), acc,
                     input_precision=PRECISION)
    valid = m_mask[:, None] & n_mask[None, :]
    if MASK_DIAG:
        valid = valid & (offs_m[:, None] != offs_n[None, :])
    return tl.where(valid, acc, float("-inf"))


@triton.jit
def _line_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sq_b, sq_line, sq_pos, sq_c,
    sk_b, sk_line, sk_pos, sk_c,
    sv_b, sv_line, sv_pos, sv_c,
    so_b, so_line, so_pos, so_c,
    sl_b, sl_line, sl_pos,
    n_lines, length, qk_channels, v_channels,
    MASK_DIAG: tl.constexpr, MERGE: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One line pass of the forward for a block of query positions and all value channels.
    Grid: (B * n_lines, query blocks); one query block covers a whole line up to the line tile.

    MERGE=False (column pass): write this branch's normalised output to o and its LSE to lse.
    MERGE=True (row pass): read the column output and LSE, write the joint output and LSE over them (the
    program reads its own pixels before writing them, so one buffer serves both passes).
    ONE_KEY_BLOCK: the whole line is one key block, so the energies are computed once and kept; longer lines
    take a statistics pass over the key blocks and recompute the energies per value-channel block.
    """
    pid_line = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    q_base = q_ptr + batch * sq_b + line * sq_line
    k_base = k_ptr + batch * sk_b + line * sk_line
    v_base = v_ptr + batch * sv_b + line * sv_line
    o_base = o_ptr + batch * so_b + line * so_line
    lse_ptrs = lse_ptr + batch * sl_b + line * sl_line

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length

    # Softmax statistics of this branch. A query with nothing attended (the column of an H = 1 image, the
    # padding rows) has max -inf: shifting by 0 instead keeps exp(-inf - -inf) = NaN out.
    if ONE_KEY_BLOCK:
        offs_n = tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        scores = _line_scores(q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c, sk_pos, sk_c,
                              qk_channels, MASK_DIAG, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, ROUND_BF16,
                              PRECISION, ACC)
        row_max = tl.max(scores, axis=1)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_sum = tl.sum(tl.exp(scores - shift[:, None]), axis=1)
    else:
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        row_sum = tl.zeros([BLOCK_M], dtype=ACC)
        for n_start in range(0, length, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < length
            block_scores = _line_scores(q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c, sk_pos,
                                        sk_c, qk_channels, MASK_DIAG, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE,
                                        ROUND_BF16, PRECISION, ACC)
            new_max = tl.maximum(row_max, tl.max(block_scores, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(block_scores - shift[:, None]), axis=1)
            row_max = new_max
    # An empty branch (sum 0) has LSE -inf: it carries no weight in the merge and its output is 0.
    nonempty = row_sum > 0.0
    lse = tl.where(nonempty, row_max + tl.log(tl.where(nonempty, row_sum, 1.0)), float("-inf"))
    if MERGE:
        lse_column = tl.load(lse_ptrs + offs_m * sl_pos, mask=m_mask, other=float("-inf"))
        top = tl.maximum(lse, lse_column)
        top = tl.where(top == float("-inf"), 0.0, top)
        # The row branch holds the pixel itself, so a real pixel's total is > 0; padding rows get 1.
        total = tl.where(m_mask, tl.exp(lse - top) + tl.exp(lse_column - top), 1.0)
        lse = top + tl.log(total)
        weight_column = tl.exp(lse_column - lse)
    tl.store(lse_ptrs + offs_m * sl_pos, lse, mask=m_mask)
    # Probabilities are normalised by the LSE written above (the joint one in the row pass).
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    if ONE_KEY_BLOCK:
        probs = _operand(tl.exp(scores - shift[:, None]), DOT_DTYPE, ROUND_BF16)

    for v_start in range(0, v_channels, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_channels
        if ONE_KEY_BLOCK:
            values = tl.load(v_base + offs_n[:, None] * sv_pos + offs_v[None, :] * sv_c,
                             mask=n_mask[:, None] & v_mask[None, :], other=0.0)
            acc = tl.dot(probs, _operand(values, DOT_DTYPE, ROUND_BF16), input_precision=PRECISION,
                         out_dtype=ACC)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=ACC)
            for n_start in range(0, length, BLOCK_N):
                offs_n = n_start + tl.arange(0, BLOCK_N)
                n_mask = offs_n < length
                block_scores = _line_scores(q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c,
                                            sk_pos, sk_c, qk_channels, MASK_DIAG, BLOCK_M, BLOCK_N, BLOCK_K,
                                            DOT_DTYPE, ROUND_BF16, PRECISION, ACC)
                block_probs = _operand(tl.exp(block_scores - shift[:, None]), DOT_DTYPE, ROUND_BF16)
                values = tl.load(v_base + offs_n[:, None] * sv_pos + offs_v[None, :] * sv_c,
                                 mask=n_mask[:, None] & v_mask[None, :], other=0.0)
                acc = tl.dot(block_probs, _operand(values, DOT_DTYPE, ROUND_BF16), acc,
                             input_precision=PRECISION)
        o_ptrs = o_base + offs_m[:, None] * so_pos + offs_v[None, :] * so_c
        o_mask = m_mask[:, None] & v_mask[None, :]
        if MERGE:
            acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(ACC) * weight_column[:, None]
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    so_b, so_line, so_pos, so_c,
    sd_b, sd_line, sd_pos, sd_c,
    sl_b, sl_line, sl_pos,
    n_lines, length, v_channels,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """delta[pixel] = sum_c out[pixel, c] * grad_out[pixel, c], over rows. Grid: (B * H, W blocks)."""
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
def _add_gradient(partial_ptrs, final_ptrs, tile, mask, has_prior, is_final):
    """Add `tile` to the fp32 partial sum already at `partial_ptrs` (if `has_prior`), then store the sum to the
    final gradient (on its last contribution, `is_final`) or back to the partial buffer. Masked-off accesses
    move no data, so each element is read and written once per contribution. (The masks are combined through
    integers: the interpreter's `&` of a block and a scalar flag yields int32, which loads reject.)"""
    selected = mask.to(tl.int32)
    total = tile + tl.load(partial_ptrs, mask=(selected * has_prior.to(tl.int32)) != 0, other=0.0).to(tile.dtype)
    final = is_final.to(tl.int32)
    tl.store(final_ptrs, total.to(final_ptrs.dtype.element_ty), mask=(selected * final) != 0)
    tl.store(partial_ptrs, total.to(partial_ptrs.dtype.element_ty), mask=(selected * (1 - final)) != 0)


@triton.jit
def _line_backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_part_ptr, dk_part_ptr, dv_part_ptr, dq_ptr, dk_ptr, dv_ptr,
    sq_b, sq_line, sq_pos, sq_c,
    sk_b, sk_line, sk_pos, sk_c,
    sv_b, sv_line, sv_pos, sv_c,
    sd_b, sd_line, sd_pos, sd_c,
    sl_b, sl_line, sl_pos,
    sg_b, sg_line, sg_pos, sg_c,
    sgv_b, sgv_line, sgv_pos, sgv_c,
    n_lines, length, qk_channels, v_channels,
    MASK_DIAG: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dq, dk and dv of one line pass from one S / P / dP / dS computation per (query block, key block).
    Grid: (B * n_lines,): a program owns its line, so every gradient element of the line has one owner and
    the sums run in a fixed order (no atomics, deterministic).

    P = exp(S - lse) with the joint LSE, dP = dO . v, dS = P * (dP - delta); dv += P^T dO, dq += dS k,
    dk += dS^T q. Sums are fp32 partials (sg_* strides for dq / dk, sgv_* for dv, shared by the partial and
    final buffers); FIRST: the column pass, which starts them; LAST: the row pass, whose last contribution to
    an element stores the final gradient in the input dtype.
    """
    pid_line = tl.program_id(0).to(tl.int64)
    batch = pid_line // n_lines
    line = pid_line % n_lines
    q_base = q_ptr + batch * sq_b + line * sq_line
    k_base = k_ptr + batch * sk_b + line * sk_line
    v_base = v_ptr + batch * sv_b + line * sv_line
    do_base = do_ptr + batch * sd_b + line * sd_line
    pixel_offset = batch * sl_b + line * sl_line
    grad_offset = batch * sg_b + line * sg_line
    grad_v_offset = batch * sgv_b + line * sgv_line

    for m_start in range(0, length, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        lse = tl.load(lse_ptr + pixel_offset + offs_m * sl_pos, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + pixel_offset + offs_m * sl_pos, mask=m_mask, other=0.0)
        # dk / dv of a key block: first contribution at the first query block, last at the last one. (The
        # flags compare with `length` so that they are tensors, also in the interpreter.)
        if FIRST:
            kv_prior = m_start + length > length
        else:
            kv_prior = m_start < length
        if LAST:
            kv_final = m_start + BLOCK_M >= length
        else:
            kv_final = m_start >= length
        for n_start in range(0, length, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < length
            if FIRST:
                q_prior = n_start + length > length
            else:
                q_prior = n_start < length
            if LAST:
                q_final = n_start + BLOCK_N >= length
            else:
                q_final = n_start >= length
            scores = _line_scores(q_base, k_base, offs_m, offs_n, m_mask, n_mask, sq_pos, sq_c, sk_pos, sk_c,
                                  qk_channels, MASK_DIAG, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, ROUND_BF16,
                                  PRECISION, ACC)
            probs = tl.exp(scores - lse[:, None])
            probs_t = _operand(tl.trans(probs), DOT_DTYPE, ROUND_BF16)
            grad_probs = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for v_start in range(0, v_channels, BLOCK_V):
                offs_v = v_start + tl.arange(0, BLOCK_V)
                v_mask = offs_v < v_channels
                grad_out = _operand(tl.load(do_base + offs_m[:, None] * sd_pos + offs_v[None, :] * sd_c,
                                            mask=m_mask[:, None] & v_mask[None, :], other=0.0),
                                    DOT_DTYPE, ROUND_BF16)
                values_t = tl.load(v_base + offs_v[:, None] * sv_c + offs_n[None, :] * sv_pos,
                                   mask=v_mask[:, None] & n_mask[None, :], other=0.0)
                grad_probs = tl.dot(grad_out, _operand(values_t, DOT_DTYPE, ROUND_BF16), grad_probs,
                                    input_precision=PRECISION)
                grad_v = tl.dot(probs_t, grad_out, input_precision=PRECISION, out_dtype=ACC)
                dv_offsets = grad_v_offset + offs_n[:, None] * sgv_pos + offs_v[None, :] * sgv_c
                _add_gradient(dv_part_ptr + dv_offsets, dv_ptr + dv_offsets, grad_v,
                              n_mask[:, None] & v_mask[None, :], kv_prior, kv_final)
            grad_scores = probs * (grad_probs - delta[:, None])
            grad_scores_t = _operand(tl.trans(grad_scores), DOT_DTYPE, ROUND_BF16)
            grad_scores = _operand(grad_scores, DOT_DTYPE, ROUND_BF16)
            for c_start in range(0, qk_channels, BLOCK_K):
                offs_c = c_start + tl.arange(0, BLOCK_K)
                c_mask = offs_c < qk_channels
                keys = tl.load(k_base + offs_n[:, None] * sk_pos + offs_c[None, :] * sk_c,
                               mask=n_mask[:, None] & c_mask[None, :], other=0.0)
                queries = tl.load(q_base + offs_m[:, None] * sq_pos + offs_c[None, :] * sq_c,
                                  mask=m_mask[:, None] & c_mask[None, :], other=0.0)
                grad_q = tl.dot(grad_scores, _operand(keys, DOT_DTYPE, ROUND_BF16), input_precision=PRECISION,
                                out_dtype=ACC)
                grad_k = tl.dot(grad_scores_t, _operand(queries, DOT_DTYPE, ROUND_BF16),
                                input_precision=PRECISION, out_dtype=ACC)
                dq_offsets = grad_offset + offs_m[:, None] * sg_pos + offs_c[None, :] * sg_c
                _add_gradient(dq_part_ptr + dq_offsets, dq_ptr + dq_offsets, grad_q,
                              m_mask[:, None] & c_mask[None, :], q_prior, q_final)
                dk_offsets = grad_offset + offs_n[:, None] * sg_pos + offs_c[None, :] * sg_c
                _add_gradient(dk_part_ptr + dk_offsets, dk_ptr + dk_offsets, grad_k,
                              n_mask[:, None] & c_mask[None, :], kv_prior, kv_final)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Blocks:
    """Upper bounds of the tile sizes; the launcher shrinks each to the problem (never below 16, the minimum
    tl.dot accepts on a GPU).

    line: query and key positions per tile (BLOCK_M, BLOCK_N); a line up to this long is one tile, so its
    energies are computed once. qk_channels: BLOCK_K, the query/key channel block. v_channels: BLOCK_V, the
    value channel block. num_warps, num_stages: GPU launch settings of the forward kernels. backward_line,
    backward_warps: the line tile and warps of the backward line kernel (default line, num_warps).
    long_line, long_line_warps: the forward's line tile and warps for lines longer than `line` (default line,
    num_warps). max_registers: a per-thread register cap for ptxas in the forward kernels when a line is one tile (None:
    its choice; longer lines, which keep more live values, are never capped).
    """

    line: int
    qk_channels: int
    v_channels: int
    num_warps: int = 4
    num_stages: int = 2
    backward_line: int | None = None
    backward_warps: int | None = None
    long_line: int | None = None
    long_line_warps: int | None = None
    max_registers: int | None = None

    def __post_init__(self) -> None:
        for name in ("line", "qk_channels", "v_channels", "backward_line", "long_line"):
            value = getattr(self, name)
            if name in ("backward_line", "long_line") and value is None:
                continue
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Blocks.{name} must be a power of two >= 16, got {value!r}")


def default_blocks(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> Blocks:
    """Tile bounds for inputs of `dtype` on `device` (on CUDA for `capability`, default the device's).

    Interpreter cost grows with programs x loop iterations, not with tile size, so CPU (CI) uses large tiles.
    On a GPU no candidate could be timed (no GPU was available); these are settings whose kernels compile for
    sm_80 and sm_90 without register spills (results/kernel_resources.csv, `python -m repro.kernels`).
    """
    if device.type != "cuda":
        return Blocks(line=128, qk_channels=128, v_channels=128)
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if dtype in (torch.float16, torch.bfloat16):
        # A 97-pixel line is one tile: energies computed once per pass. sm_90: the whole-line forward fits 128
        # registers without spills, 2 blocks of 8 warps per SM (sm_80's ptxas needs ~185). The backward holds
        # S, P, dP and dS of a 128 x 128 tile: about 254 registers at 8 warps, one block per SM; sm_80's ptxas
        # spills there, so its backward lines take 64-wide tiles.
        if capability >= (9, 0):
            return Blocks(line=128, qk_channels=32, v_channels=16, num_warps=8, num_stages=2, max_registers=128)
        return Blocks(line=128, qk_channels=32, v_channels=16, num_warps=8, num_stages=2, backward_line=64)
    # fp32 products in tf32x3 split every operand in two: on sm_90 a whole 128-wide forward tile fits (about 250
    # registers at 8 warps, one block per SM), longer lines loop over 64-wide tiles; sm_80 spills above 64. The
    # backward spills above 32-wide tiles at 4 warps, so its lines take several tiles with the partial sums
    # going through memory.
    if capability >= (9, 0):
        return Blocks(line=128, qk_channels=16, v_channels=16, num_warps=8, num_stages=2, backward_line=32,
                      backward_warps=4, long_line=64, long_line_warps=4)
    return Blocks(line=64, qk_channels=16, v_channels=16, num_warps=8, num_stages=2, backward_line=32,
                  backward_warps=4)


def _warps(block_line: int, warps: int) -> int:
    """Warps for a line tile: at most 4 for tiles of 32 positions or fewer (a 16 x 16 tile has 256 elements)."""
    return min(warps, 4) if block_line <= 32 else warps


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
    """tl.dot operand dtype, bf16 emulation, fp32 product precision and accumulator dtype for `dtype`.

    fp32 products use "tf32x3" (three tf32 tensor-core products, about fp32 accuracy) unless plain tf32 is
    allowed; the interpreter ignores the precision and multiplies in fp32. bf16 in the interpreter: operands
    rounded to bf16 (the GPU's rounding points: inputs, P, dS) and multiplied in fp32 (see `_operand`).
    """
    if dtype == torch.float64:
        return {"DOT_DTYPE": tl.float64, "ROUND_BF16": False, "PRECISION": "ieee", "ACC": tl.float64}
    if dtype == torch.float32:
        return {"DOT_DTYPE": tl.float32, "ROUND_BF16": False, "PRECISION": "tf32" if allow_tf32 else "tf32x3",
                "ACC": tl.float32}
    if dtype == torch.bfloat16 and INTERPRETED:
        # The precision is the GPU's (the interpreter ignores it), so planned launches name the same
        # configuration in and out of the interpreter.
        return {"DOT_DTYPE": tl.float32, "ROUND_BF16": True, "PRECISION": "tf32", "ACC": tl.float32}
    half = tl.float16 if dtype == torch.float16 else tl.bfloat16
    return {"DOT_DTYPE": half, "ROUND_BF16": False, "PRECISION": "tf32", "ACC": tl.float32}


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


def _channels_last_like(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Empty (B, C, H, W) tensor in channels_last memory; the fake implementations use it too, so that the
    strides a compiled graph sees are those the kernels produce."""
    return torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=tensor.device,
                       memory_format=torch.channels_last)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher plans it: what `repro.measure.kernels` compiles ahead of time with the
    same arguments (so the same specialisation) and what `launch()` runs."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    max_registers: int | None = None

    @property
    def options(self) -> dict:
        """Launch options as triton takes them."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options

    def launch(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def plan_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, blocks: Blocks, allow_tf32: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs (out, lse) and the launches of the forward, without running anything (any device, `meta`
    included)."""
    batch, qk_channels, height, width = query.shape
    v_channels = value.shape[1]
    out = _channels_last_like(value)
    lse = torch.empty((batch, height, width), dtype=lse_dtype(query.dtype), device=query.device)
    kernel_dtypes = _kernel_dtypes(query.dtype, allow_tf32=allow_tf32)
    launches = []
    # Pass 1 over columns (diagonal masked), pass 2 over rows merging into it.
    for column in (True, False):
        n_lines, length = (width, height) if column else (height, width)
        block_line, warps = _tile(length, blocks.line), blocks.num_warps
        if length > block_line and blocks.long_line is not None:
            block_line, warps = blocks.long_line, blocks.long_line_warps or blocks.num_warps
        launches.append(Launch(
            _line_forward_kernel, (batch * n_lines, triton.cdiv(length, block_line)),
            (query, key, value, out, lse,
             *_line_strides(query, column=column), *_line_strides(key, column=column),
             *_line_strides(value, column=column), *_line_strides(out, column=column),
             *_pixel_strides(lse, column=column), n_lines, length, qk_channels, v_channels),
            {"MASK_DIAG": column, "MERGE": not column, "ONE_KEY_BLOCK": length <= block_line,
             "BLOCK_M": block_line, "BLOCK_N": block_line, "BLOCK_K": _tile(qk_channels, blocks.qk_channels),
             "BLOCK_V": _tile(v_channels, blocks.v_channels), **kernel_dtypes},
            _warps(block_line, warps), blocks.num_stages, blocks.max_registers if length <= block_line else None,
        ))
    return (out, lse), launches


def plan_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, *, blocks: Blocks, allow_tf32: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[Launch]]:
    """Gradients (dq, dk, dv) and the launches of the backward, without running anything."""
    batch, qk_channels, height, width = query.shape
    v_channels = value.shape[1]
    kernel_dtypes = _kernel_dtypes(query.dtype, allow_tf32=allow_tf32)
    accumulate = lse_dtype(query.dtype)
    grads = tuple(_channels_last_like(t) for t in (query, key, value))
    # fp32 partial sums between and within passes; for fp32 / fp64 inputs the gradients themselves.
    partials = grads if query.dtype == accumulate else tuple(_channels_last_like(t, accumulate) for t in grads)
    lse = lse.contiguous()  # the kernels index LSE and delta with one set of strides
    delta = torch.empty_like(lse)
    block_row = _tile(width, blocks.line)
    block_k, block_v = _tile(qk_channels, blocks.qk_channels), _tile(v_channels, blocks.v_channels)
    launches = [Launch(
        _delta_kernel, (batch * height, triton.cdiv(width, block_row)),
        (out, grad_out, delta, *_line_strides(out, column=False), *_line_strides(grad_out, column=False),
         *_pixel_strides(delta, column=False), height, width, v_channels),
        {"BLOCK_M": block_row, "BLOCK_V": block_v, "ACC": kernel_dtypes["ACC"]},
        blocks.num_warps, blocks.num_stages,
    )]
    for column in (True, False):
        n_lines, length = (width, height) if column else (height, width)
        block_line = _tile(length, blocks.backward_line or blocks.line)
        launches.append(Launch(
            _line_backward_kernel, (batch * n_lines,),
            (query, key, value, grad_out, lse, delta, *partials, *grads,
             *_line_strides(query, column=column), *_line_strides(key, column=column),
             *_line_strides(value, column=column), *_line_strides(grad_out, column=column),
             *_pixel_strides(lse, column=column), *_line_strides(grads[0], column=column),
             *_line_strides(grads[2], column=column), n_lines, length, qk_channels, v_channels),
            {"MASK_DIAG": column, "FIRST": column, "LAST": not column, "BLOCK_M": block_line,
             "BLOCK_N": block_line, "BLOCK_K": block_k, "BLOCK_V": block_v, **kernel_dtypes},
            _warps(block_line, blocks.backward_warps or blocks.num_warps), blocks.num_stages,
        ))
    return grads, launches


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
        allow_tf32: fp32 inputs on a GPU use tf32 products (faster, ~1e-3 relative) instead of tf32x3.

    Returns:
        out: (B, Cv, H, W) in the input dtype, channels_last memory.
        lse: (B, H, W) fp32 (fp64 for fp64 inputs), the log-sum-exp of each pixel's H + W - 1 energies.
    """
    _check_inputs(query, key, value, "cca_triton_forward")
    blocks = blocks or default_blocks(query.device, query.dtype)
    outputs, launches = plan_forward(query, key, value, blocks=blocks, allow_tf32=allow_tf32)
    with _device_guard(query.device):
        for launch in launches:
            launch.launch()
    return outputs


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
    batch, _, height, width = query.shape
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if tensor.shape != value.shape or tensor.device != value.device:
            raise ValueError(f"cca_triton_backward: {name} must be {tuple(value.shape)} on {value.device}, "
                             f"got {tuple(tensor.shape)} on {tensor.device}")
    if lse.shape != (batch, height, width) or lse.dtype != lse_dtype(query.dtype):
        raise ValueError(f"cca_triton_backward: lse must be {lse_dtype(query.dtype)} {(batch, height, width)}, "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    blocks = blocks or default_blocks(query.device, query.dtype)
    grads, launches = plan_backward(grad_out, query, key, value, out, lse, blocks=blocks, allow_tf32=allow_tf32)
    with _device_guard(query.device):
        for launch in launches:
            launch.launch()
    return grads


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
