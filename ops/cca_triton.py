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
* Image chunks for L2 reuse (`Blocks.images_per_launch`). The row pass re-reads what the column pass read and
  wrote; over a whole batch that is gone from L2 by then (97 x 97, Cqk 64, Cv 512, bf16: 21.7 MB per image in
  the forward, 45.8 MB in the backward, against 50 MB of L2 on an H100 / H200). With chunks the launchers run
  both passes of a chunk (the backward: delta kernel, column pass, row pass) before the next chunk, passing
  batch-sliced views (strides unchanged, so the same compilations and, per image, the same programs: results
  are bitwise those of one launch). Per image, P = H W, itemsize s, LSE / accumulator itemsize a, the second
  pass re-reads forward P (s (2 Cqk + 2 Cv) + a) and backward P (s (2 Cqk + 2 Cv) + 2 a + a (2 Cqk + Cv))
  (`forward_working_set_bytes`, `backward_working_set_bytes`); "auto" fits chunks into half the device's L2
  (`L2_BUDGET_FRACTION`). Fewer images per launch means fewer programs to fill the GPU, so chunking is a
  choice (off by default) that the tuner makes by timing, never forced.
* Tuning (`blocks="tune"`, or CCREPRO_TRITON_TUNE=1 for calls without `blocks` on CUDA, the custom op included).
  triton.autotune cannot see the plan / launch split nor run in the interpreter, so `Tuner` times the planned
  launches of each of `tuning_candidates` (the default tiles; chunks "auto" and 1; the value-channel block
  doubled; one more stage; forward: the other warp count; backward: half the line tile) with
  triton.testing.do_bench at the first call per `TuneKey` (pass, batch, H, W, Cqk, Cv, dtype, layout,
  allow_tf32, device, capability) and caches the fastest; a candidate that fails to compile or launch is
  skipped, its error kept. CCREPRO_TRITON_TUNE_CACHE names a JSON file that keeps the choices across processes.
  Off by default: tiles then come from `default_blocks` and results are deterministic; tuned tiles may change
  the rounding (another value-channel block changes the order of the backward's sums), so tuned runs are
  reproducible only with the cache file. Tune (one eager call per shape) before capturing a CUDA graph: timing
  synchronises. No candidate has been timed here (no GPU); `results/kernel_resources.csv` lists every
  candidate's compiled resources (column `source`: default / tuner).
* Layout: channels-last internally. Channels-last inputs (1x1 convs on a channels-last feature map produce
  them) make every tile row a contiguous channel vector. Inputs whose channels are not contiguous per pixel
  (NCHW) are copied into channels_last once (`_to_channels_last`): by `criss_cross_attention_triton` before the
  custom op, so that autograd saves the copies and the backward reuses them, and by the launchers for direct
  callers and for dO. The kernels take arbitrary element strides, and `copy_to_channels_last=False` reads NCHW
  in place instead, but then the column pass touches one element per 32-byte sector: in
  results/kernel_model.csv the nchw_in_place rows move more sectors than the copies and the kernels together
  (the nchw rows). A model built with `channels_last=True` (`model.channels_last` in a config) hands the
  kernel channels-last maps with no copy at all.

Cost of one call, per (B, Cqk, Cv, H, W) with P = B * H * W pixels, A = H + W - 1 attended pixels each,
itemsize s, lines no longer than the line tile T_col >= H, T_row >= W (whole tiles are computed), channels in
blocks (Cqk', Cv': rounded up to BLOCK_K, BLOCK_V):
* forward bytes: P * (s (4 Cqk + 5 Cv) + 12): q, k, v read by both passes, out written by pass 1, read and
  written by pass 2, the LSE likewise (the minimum is P * (s (2 Cqk + 2 Cv) + 4)).
  MACs: (B W T_col^2 + B H T_row^2) (Cqk' + Cv') (the minimum P A (Cqk + Cv)).
* backward bytes: P (2 s Cv + 4) for delta, 2 P (8 + s (4 Cqk + 2 Cv)) for the passes' reads, 8 P (2 Cqk + Cv)
  for the fp32 partials written and read back, P s (2 Cqk + Cv) for the gradients (the minimum is
  P (s (4 Cqk + 4 Cv) + 4): q, k, v, out and dO read, dq, dk and dv written, the LSE read).
  MACs: (B W T_col^2 + B H T_row^2) (3 Cqk' + 2 Cv').
  `tests/test_kernels.py` checks both formulas to the byte against the interpreter's counts.
* NCHW inputs add their copies (read and written once): P s 2 (2 Cqk + Cv) in the forward (q, k, v) and
  P s 2 Cv in the backward (dO, when it is not channels-last).
Floors: where each counted goal of the design meets a limit of the op or of the hardware.
* Forward bytes. out(i, j) needs v of row i and of column j. A program that writes final outputs without an
  intermediate reads v of every row and every column its pixels lie on: for n pixels over r rows and c columns
  that is at least max(r W, c H) >= sqrt(n H W) pixels of v (as n <= r c). With m programs per image (equal
  shares) v, and the keys likewise, are read at least sqrt(m) times: 2x at m = 4 (reached by two half-image
  programs), where the bytes are s (Cqk + 2 Cqk + 2 Cv + Cv) per pixel, 1.5x the minimum s (2 Cqk + 2 Cv).
  Filling a GPU of S SMs at batch B takes m >= S / B programs per image (132 / 8 = 17 on an H100 / H200, so
  reads >= 4.1x and bytes >= 2.5x). The other way out, an intermediate, costs its write and read: a Cv vector
  per pixel handed from one program to another (the partial output of the other line, which no smaller summary
  can replace), 2 s Cv per pixel on top of v read by both sides. Hence with line-sized programs the floor is q,
  k, v read twice and out written, read and written: s (4 Cqk + 5 Cv) + the LSE, which is what these kernels
  move (2.4x at Cqk 64, Cv 512); with q and k read once it would be s (2 Cqk + 5 Cv) (2.3x), and we know of no
  design that fills the GPU below it. On a GPU the intermediates of an image can stay in L2 between the passes,
  so HBM sees less than the counted bytes; the counts are L2 and HBM together.
* Multiply-accumulates. tl.dot tiles are powers of two >= 16, so a whole-line tile pads a line of L positions
  to T = next_power_of_2(L) in both the query and key dimensions: (T / L)^2 = 1.74x at L = 97. Splitting the
  line into tiles of 64 + 32 + 16 queries with the keys' remainder done elementwise would reach 1.16x at
  three times the code, for work that is not the bottleneck (the op is memory-bound: about 35 MACs per byte
  moved at bf16 against an H100 / H200 balance of about 100 MACs per byte).
* Backward occupancy. A whole-line backward holds P and dP of a 128 x 128 tile in fp32: 128 KiB of registers,
  half of an SM's 256 KiB register file, before any operand or address; two blocks per SM cannot fit. 64 x 64
  tiles at 4 warps do (sm_80's default, where a 128-wide backward spills anyway; a tuner candidate on sm_90),
  but a 97-pixel line then takes 2 x 2 tile pairs that re-read dO and v and pass fp32 partial sums through
  memory within each pass: counted with sm_80's tiles (`python -m repro.kernels model --target sm_80`, bf16),
  the backward moves about 6.3x the minimum against 2.9x with sm_90's 128-wide tiles, so the two goals
  (2 blocks per SM, 3x bytes) exclude each other; the forward's tiles, and bytes, are the same on both.
* fp32 backward. "tf32x3" splits each fp32 operand into two tf32 halves; a whole-line (128 x 128) backward
  spilled on sm_90 in every arrangement tried while designing (8 or 16 warps, one or two sweeps over the
  value channels, dq and dk from dS^T alone; 0.4 to 1.4 KB per thread, variants not kept), so fp32 lines
  take 32-wide tiles and pay for it in re-reads (about 9x the minimum). With plain "tf32" a whole-line
  backward that sweeps the value channels twice (dv, then dP; dO read twice, about 2.8x) compiled without
  spills (254 registers); it was not adopted, as fp32 stays near-exact.
Counted at the issue's shapes and compiled for sm_80 / sm_90 by `python -m repro.kernels`:
`results/kernel_model.csv` (bytes, 32-byte sectors and MACs per kernel against the minimum of `ops.cost`)
and `results/kernel_resources.csv` (registers, spills, shared memory, asynchronous copies, blocks per SM).
The FLOP formula and the fvcore handle report the analytic `ops.cost` counts; the roofline fraction of a
measured time t is max(flops / peak_flops, bytes / peak_bandwidth) / t.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
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
def _contribution_flags(start, BLOCK: tl.constexpr, length, FIRST: tl.constexpr, LAST: tl.constexpr):
    """(prior, final) of the block at `start` of a line's loop over blocks of BLOCK: whether a partial sum is
    already in memory (a later block, or any block of the row pass) and whether this contribution is the last
    (the last block of the row pass). (The flags compare with `length` so that they are tensors, also in the
    interpreter.)"""
    if FIRST:
        prior = start + length > length
    else:
        prior = start < length
    if LAST:
        final = start + BLOCK >= length
    else:
        final = start >= length
    return prior, final


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
        # dk / dv of a key block: first contribution at the first query block, last at the last one.
        kv_prior, kv_final = _contribution_flags(m_start, BLOCK_M, length, FIRST, LAST)
        for n_start in range(0, length, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < length
            # dq of a query block: first contribution at the first key block, last at the last one.
            q_prior, q_final = _contribution_flags(n_start, BLOCK_N, length, FIRST, LAST)
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
    images_per_launch: images per chunk of the batch; the launchers run both passes of a chunk back to back
    before the next chunk, so the second pass finds the first pass's data in L2 (None: the whole batch in one
    launch per kernel; "auto": as many images as `l2_images_per_launch` fits in the device's L2).
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
    images_per_launch: int | str | None = None

    def __post_init__(self) -> None:
        chunk = self.images_per_launch
        if not (chunk is None or chunk == "auto" or (type(chunk) is int and chunk >= 1)):
            raise ValueError(f"Blocks.images_per_launch must be a positive int, 'auto' or None, got {chunk!r}")
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
        # registers without spills, 2 blocks of 8 warps per SM. The backward holds S, P, dP and dS of a
        # 128 x 128 tile: about 254 registers at 8 warps, one block per SM.
        if capability >= (9, 0):
            return Blocks(line=128, qk_channels=32, v_channels=16, num_warps=8, num_stages=2, max_registers=128)
        # sm_80's ptxas needs about 185 registers for the whole-line forward at 8 warps (one block per SM) and
        # spills the 128-wide backward, so: the forward at 4 warps (about 250 registers, 2 blocks per SM: the same
        # 8 warps per SM in two independent blocks), lines longer than a tile at 8 warps (4 spill), and 64-wide
        # backward tiles at 4 warps (about 235 registers, 2 blocks per SM).
        return Blocks(line=128, qk_channels=32, v_channels=16, num_warps=4, num_stages=2, backward_line=64,
                      backward_warps=4, long_line=128, long_line_warps=8)
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


def _to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when each pixel's channels are contiguous (channel stride 1; 0 for an expanded tensor, one
    element per pixel; or a single channel), else a channels_last copy: one read and one write of the tensor,
    which `repro.measure.kernels.count` adds to the counted traffic. Converting NCHW inputs costs
    2 s C per pixel; reading them in place would make the column pass touch one element per 32-byte sector."""
    if tensor.shape[1] == 1 or tensor.stride(1) in (0, 1):
        return tensor
    return tensor.contiguous(memory_format=torch.channels_last)


def _channels_last_like(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Empty (B, C, H, W) tensor in channels_last memory; the fake implementations use it too, so that the
    strides a compiled graph sees are those the kernels produce."""
    return torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=tensor.device,
                       memory_format=torch.channels_last)


# Share of the L2 the chunks of `images_per_launch="auto"` may fill. Half: the L2 of an A100 / H100 is two
# partitions, and "each L2 partition localizes and caches data for memory accesses from SMs in the GPCs directly
# connected to the partition" (NVIDIA A100 whitepaper,
# https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf), so
# data read from SMs on both sides may be held twice; the rest is headroom for the outputs streaming through and
# for set conflicts. Not measured (no GPU here): the tuner compares chunked and unchunked launches.
L2_BUDGET_FRACTION = 0.5


def forward_working_set_bytes(qk_channels: int, v_channels: int, height: int, width: int,
                              dtype: torch.dtype) -> int:
    """Bytes of one image that the forward's row pass reads again after its column pass wrote or read them:
    P (s (2 Cqk + 2 Cv) + a) with P = H W pixels, s the input itemsize, a the LSE itemsize: q, k and v (read by
    both passes), out (written by the column pass, read and rewritten by the row pass) and the LSE (likewise).
    At 97 x 97, Cqk 64, Cv 512, bf16: 21.7 MB."""
    pixels = height * width
    itemsize, lse_size = dtype.itemsize, lse_dtype(dtype).itemsize
    return pixels * (itemsize * (2 * qk_channels + 2 * v_channels) + lse_size)


def backward_working_set_bytes(qk_channels: int, v_channels: int, height: int, width: int,
                               dtype: torch.dtype) -> int:
    """Bytes of one image that the backward's row pass reads again after the delta kernel and the column pass:
    P (s (2 Cqk + 2 Cv) + 2 a + a (2 Cqk + Cv)): q, k, v and dO (dO also read by the delta kernel), the LSE and
    delta, and the column pass's partial sums of dq, dk, dv (accumulator dtype, itemsize a; for fp32 / fp64
    inputs the gradients themselves). `out` is read only by the delta kernel, first, so it is not counted.
    At 97 x 97, Cqk 64, Cv 512, bf16: 45.8 MB, more than half an H100's 50 MB L2."""
    pixels = height * width
    itemsize, accumulator = dtype.itemsize, lse_dtype(dtype).itemsize
    return pixels * (itemsize * (2 * qk_channels + 2 * v_channels) + 2 * accumulator
                     + accumulator * (2 * qk_channels + v_channels))


def l2_images_per_launch(per_image_bytes: int, batch: int, l2_cache_bytes: int) -> int:
    """Images per chunk that keep a chunk's working set within L2_BUDGET_FRACTION of the L2: the most that fit,
    at most the batch. If one image does not fit, the whole batch: a chunk could not stay in L2, and chunking
    would only cost parallelism."""
    if per_image_bytes <= 0 or l2_cache_bytes <= 0:
        raise ValueError(f"per_image_bytes and l2_cache_bytes must be positive, got {per_image_bytes!r} and "
                         f"{l2_cache_bytes!r}")
    fitting = int(L2_BUDGET_FRACTION * l2_cache_bytes) // per_image_bytes
    return batch if fitting < 1 else min(fitting, batch)


def resolve_images_per_launch(blocks: Blocks, batch: int, per_image_bytes: int, device: torch.device,
                              l2_cache_bytes: int | None = None) -> int:
    """Images per chunk for `blocks.images_per_launch` (None: the whole batch). "auto" fills `l2_cache_bytes`,
    by default the CUDA device's L2 (torch.cuda.get_device_properties(device).L2_cache_size); on other devices
    (the interpreter, meta) there is no cache to fit, so the whole batch."""
    chunk = blocks.images_per_launch
    if chunk is None:
        return max(batch, 1)
    if chunk == "auto":
        if l2_cache_bytes is None:
            if device.type != "cuda":
                return max(batch, 1)
            l2_cache_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        return max(l2_images_per_launch(per_image_bytes, batch, l2_cache_bytes), 1)
    return max(min(chunk, batch), 1)


def image_chunks(batch: int, images_per_launch: int) -> list[tuple[int, int]]:
    """(first, stop) of consecutive chunks of `images_per_launch` images covering the batch, in order."""
    if type(images_per_launch) is not int or images_per_launch < 1:
        raise ValueError(f"images_per_launch must be a positive int, got {images_per_launch!r}")
    return [(first, min(first + images_per_launch, batch)) for first in range(0, max(batch, 1), images_per_launch)]


def _batch_slice(tensor: torch.Tensor, images: tuple[int, int]) -> torch.Tensor:
    """The images [first, stop) of a batch-first tensor: a view with unchanged strides (the tensor itself when
    the chunk is the whole batch, so an unchunked plan passes exactly the launcher's tensors)."""
    first, stop = images
    return tensor if (first, stop) == (0, tensor.shape[0]) else tensor[first:stop]


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
    # (first, stop) of the batch slice the launch covers (its tensor arguments are views of those images).
    images: tuple[int, int] | None = None

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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, blocks: Blocks, allow_tf32: bool = False,
    l2_cache_bytes: int | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs (out, lse) and the launches of the forward, without running anything (any device, `meta`
    included). With `blocks.images_per_launch`, per chunk of images: its column pass, then its row pass
    (l2_cache_bytes: the L2 that "auto" fills; default the CUDA device's, none elsewhere)."""
    batch, qk_channels, height, width = query.shape
    v_channels = value.shape[1]
    out = _channels_last_like(value)
    lse = torch.empty((batch, height, width), dtype=lse_dtype(query.dtype), device=query.device)
    kernel_dtypes = _kernel_dtypes(query.dtype, allow_tf32=allow_tf32)
    per_image = forward_working_set_bytes(qk_channels, v_channels, height, width, query.dtype)
    chunk = resolve_images_per_launch(blocks, batch, per_image, query.device, l2_cache_bytes)
    launches = []
    for images in image_chunks(batch, chunk):
        query_c, key_c, value_c, out_c, lse_c = (_batch_slice(t, images) for t in (query, key, value, out, lse))
        # Pass 1 over columns (diagonal masked), pass 2 over rows merging into it.
        for column in (True, False):
            n_lines, length = (width, height) if column else (height, width)
            block_line, warps = _tile(length, blocks.line), blocks.num_warps
            if length > block_line and blocks.long_line is not None:
                block_line, warps = blocks.long_line, blocks.long_line_warps or blocks.num_warps
            launches.append(Launch(
                _line_forward_kernel, ((images[1] - images[0]) * n_lines, triton.cdiv(length, block_line)),
                (query_c, key_c, value_c, out_c, lse_c,
                 *_line_strides(query, column=column), *_line_strides(key, column=column),
                 *_line_strides(value, column=column), *_line_strides(out, column=column),
                 *_pixel_strides(lse, column=column), n_lines, length, qk_channels, v_channels),
                {"MASK_DIAG": column, "MERGE": not column, "ONE_KEY_BLOCK": length <= block_line,
                 "BLOCK_M": block_line, "BLOCK_N": block_line, "BLOCK_K": _tile(qk_channels, blocks.qk_channels),
                 "BLOCK_V": _tile(v_channels, blocks.v_channels), **kernel_dtypes},
                _warps(block_line, warps), blocks.num_stages,
                blocks.max_registers if length <= block_line else None, images,
            ))
    return (out, lse), launches


def plan_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, *, blocks: Blocks, allow_tf32: bool = False, l2_cache_bytes: int | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[Launch]]:
    """Gradients (dq, dk, dv) and the launches of the backward, without running anything. With
    `blocks.images_per_launch`, per chunk of images: its delta kernel, column pass and row pass."""
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
    per_image = backward_working_set_bytes(qk_channels, v_channels, height, width, query.dtype)
    chunk = resolve_images_per_launch(blocks, batch, per_image, query.device, l2_cache_bytes)
    launches = []
    for images in image_chunks(batch, chunk):
        grad_out_c, query_c, key_c, value_c, out_c, lse_c, delta_c = (
            _batch_slice(t, images) for t in (grad_out, query, key, value, out, lse, delta))
        partials_c, grads_c = (tuple(_batch_slice(t, images) for t in group) for group in (partials, grads))
        images_in_chunk = images[1] - images[0]
        launches.append(Launch(
            _delta_kernel, (images_in_chunk * height, triton.cdiv(width, block_row)),
            (out_c, grad_out_c, delta_c, *_line_strides(out, column=False),
             *_line_strides(grad_out, column=False), *_pixel_strides(delta, column=False), height, width,
             v_channels),
            {"BLOCK_M": block_row, "BLOCK_V": block_v, "ACC": kernel_dtypes["ACC"]},
            blocks.num_warps, blocks.num_stages, images=images,
        ))
        for column in (True, False):
            n_lines, length = (width, height) if column else (height, width)
            block_line = _tile(length, blocks.backward_line or blocks.line)
            launches.append(Launch(
                _line_backward_kernel, (images_in_chunk * n_lines,),
                (query_c, key_c, value_c, grad_out_c, lse_c, delta_c, *partials_c, *grads_c,
                 *_line_strides(query, column=column), *_line_strides(key, column=column),
                 *_line_strides(value, column=column), *_line_strides(grad_out, column=column),
                 *_pixel_strides(lse, column=column), *_line_strides(grads[0], column=column),
                 *_line_strides(grads[2], column=column), n_lines, length, qk_channels, v_channels),
                {"MASK_DIAG": column, "FIRST": column, "LAST": not column, "BLOCK_M": block_line,
                 "BLOCK_N": block_line, "BLOCK_K": block_k, "BLOCK_V": block_v, **kernel_dtypes},
                _warps(block_line, blocks.backward_warps or blocks.num_warps), blocks.num_stages, images=images,
            ))
    return grads, launches


def cca_triton_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    blocks: Blocks | str | None = None,
    allow_tf32: bool = False,
    tuner: Tuner | None = None,
    copy_to_channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused criss-cross attention forward.

    Args:
        query, key: (B, Cqk, H, W), any strides. value: (B, Cv, H, W).
        blocks: tile bounds; None: `default_blocks(device, dtype)`, or the tuner's choice on CUDA when
            CCREPRO_TRITON_TUNE=1; "tune": the fastest of `tuning_candidates`, timed at the first call per
            `TuneKey` (a GPU, or a `tuner` with its own timer).
        allow_tf32: fp32 inputs on a GPU use tf32 products (faster, ~1e-3 relative) instead of tf32x3.
        tuner: the Tuner for "tune" (default `default_tuner()`, one per process).
        copy_to_channels_last: inputs whose channels are not contiguous per pixel (NCHW) are copied into
            channels_last memory first (`_to_channels_last`); False: the kernels read them in place (strided).

    Returns:
        out: (B, Cv, H, W) in the input dtype, channels_last memory.
        lse: (B, H, W) fp32 (fp64 for fp64 inputs), the log-sum-exp of each pixel's H + W - 1 energies.
    """
    _check_inputs(query, key, value, "cca_triton_forward")
    if copy_to_channels_last:
        query, key, value = (_to_channels_last(t) for t in (query, key, value))
    blocks = _choose_blocks(
        blocks, tuner, "forward", query, value, (query, key, value), allow_tf32,
        lambda candidate: plan_forward(query, key, value, blocks=candidate, allow_tf32=allow_tf32)[1])
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
    blocks: Blocks | str | None = None,
    allow_tf32: bool = False,
    tuner: Tuner | None = None,
    copy_to_channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused criss-cross attention backward (deterministic: every gradient element has one owner per pass).

    Args:
        grad_out, out: (B, Cv, H, W); query, key: (B, Cqk, H, W); value: (B, Cv, H, W); lse: (B, H, W) fp32
            (fp64 for fp64 inputs) from `cca_triton_forward`. Any strides.
        blocks, allow_tf32, tuner, copy_to_channels_last: as in `cca_triton_forward` (the backward is tuned on
            its own key; through the custom op q, k, v and out are channels-last already, grad_out may not be).

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
    if copy_to_channels_last:
        grad_out, query, key, value, out = (_to_channels_last(t) for t in (grad_out, query, key, value, out))
    blocks = _choose_blocks(
        blocks, tuner, "backward", query, value, (query, key, value, grad_out), allow_tf32,
        lambda candidate: plan_backward(grad_out, query, key, value, out, lse, blocks=candidate,
                                        allow_tf32=allow_tf32)[1])
    grads, launches = plan_backward(grad_out, query, key, value, out, lse, blocks=blocks, allow_tf32=allow_tf32)
    with _device_guard(query.device):
        for launch in launches:
            launch.launch()
    return grads


# ----------------------------------------------------------------------------------------------------------
# Tuning: the fastest Blocks per problem, timed on the GPU at its first call
# ----------------------------------------------------------------------------------------------------------

# "1": calls without `blocks` on a CUDA device tune (the custom op, hence models, included); "0" (default): they
# use `default_blocks`, so runs are deterministic. CPU / interpreter calls never tune by default.
TUNE_ENV = "CCREPRO_TRITON_TUNE"
# Path of a JSON file that keeps the tuned choices across processes (read at the first tuning, rewritten
# atomically after each new one); unset: the choices live in the process only.
TUNE_CACHE_ENV = "CCREPRO_TRITON_TUNE_CACHE"
PASSES = ("forward", "backward")
_TUNE_FILE_FORMAT = 1


@dataclass(frozen=True)
class TuneKey:
    """What one tuned choice is valid for. Besides the issue's (H, W, Cqk, Cv, dtype, capability, pass): the batch
    (chunking trades programs per launch for L2 hits, so its best setting depends on the batch), the inputs'
    layout (strides decide which loads coalesce), allow_tf32 (another fp32 product) and the device name (GPUs of
    one capability differ in L2 size, SM count and bandwidth)."""

    pass_name: str
    batch: int
    height: int
    width: int
    qk_channels: int
    v_channels: int
    dtype: str
    layout: str
    allow_tf32: bool
    device: str
    capability: tuple[int, int] | None


def _layout(tensors: tuple[torch.Tensor, ...]) -> str:
    if all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return "channels_last"
    return "contiguous" if all(t.is_contiguous() for t in tensors) else "strided"


def tune_key(pass_name: str, query: torch.Tensor, value: torch.Tensor, tensors: tuple[torch.Tensor, ...], *,
             allow_tf32: bool = False) -> TuneKey:
    """The key of a call with these inputs (`tensors`: the (B, C, H, W) inputs whose layout matters)."""
    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
    batch, qk_channels, height, width = query.shape
    if query.device.type == "cuda":
        device, capability = torch.cuda.get_device_name(query.device), torch.cuda.get_device_capability(query.device)
    else:
        device, capability = query.device.type, None
    return TuneKey(pass_name, batch, height, width, qk_channels, value.shape[1],
                   str(query.dtype).removeprefix("torch."), _layout(tensors), bool(allow_tf32), device,
                   tuple(capability) if capability is not None else None)


def tuning_candidates(pass_name: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> tuple[Blocks, ...]:
    """The Blocks the tuner times for a pass, all derived from `default_blocks` for (dtype, capability) (None:
    the CPU's), default first (it wins ties), at most 7: the default; chunked by L2 ("auto") and one image per
    launch; the value-channel block doubled, unchunked and "auto"; one more pipeline stage; and
    * forward: the other warp count (8 <-> 4), without the register cap (which is there to fit two blocks of 8
      warps per SM: at 4 warps two blocks fit uncapped);
    * backward: half the line tile (at least 16) at 4 warps. (At the issue's shape on sm_90 in bf16, the default
      128-wide backward at 4 warps spills 1.3 KB per thread; 64-wide at 4 warps compiles to 238 registers, no
      spill, two blocks per SM: `python -m repro.kernels resources` lists every candidate.)
    """
    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
    base = default_blocks(torch.device("cpu" if capability is None else "cuda"), dtype, capability)
    if pass_name == "forward":
        warps = 4 if base.num_warps > 4 else 8
        reshaped = dataclasses.replace(base, num_warps=warps,
                                       max_registers=base.max_registers if warps > base.num_warps else None)
    else:
        reshaped = dataclasses.replace(base, backward_line=max(16, (base.backward_line or base.line) // 2),
                                       backward_warps=4)
    wide = dataclasses.replace(base, v_channels=2 * base.v_channels)
    variants = (
        base,
        dataclasses.replace(base, images_per_launch="auto"),
        dataclasses.replace(base, images_per_launch=1),
        wide,
        dataclasses.replace(wide, images_per_launch="auto"),
        reshaped,
        dataclasses.replace(base, num_stages=base.num_stages + 1),
    )
    return tuple(dict.fromkeys(variants))


def _plan_signature(launches: list[Launch]) -> tuple:
    """What makes two plans run the same programs: kernels, grids, batch slices, constexprs, launch options."""
    return tuple((launch.kernel.__name__, launch.grid, launch.images,
                  tuple(sorted((name, str(value)) for name, value in launch.constexprs.items())),
                  tuple(sorted(launch.options.items()))) for launch in launches)


def _do_bench(run) -> float:
    """Median milliseconds of `run` with triton's GPU timer (it flushes L2 between repetitions, so each call
    starts cold, as a real call after other layers does)."""
    import triton.testing

    return triton.testing.do_bench(run, return_mode="median")


@dataclass
class Tuning:
    """The outcome of one key: the chosen Blocks, the milliseconds of each candidate timed, and the error of
    each that failed to plan, launch or time (candidates planning the same launches as an earlier one are not
    timed again)."""

    blocks: Blocks
    times_ms: dict[Blocks, float]
    errors: dict[Blocks, str]


class Tuner:
    """Picks the fastest of `tuning_candidates` per TuneKey, timing each once (the first call for the key) and
    caching the choice; `cca_triton_forward(..., blocks="tune")` / `cca_triton_backward` use it.

    timer: callable(run) -> milliseconds of the zero-argument `run` (all launches of one call); default
    triton.testing.do_bench's median, which needs a GPU. cache_path: JSON file of choices shared between
    processes (entries from another Triton version are ignored); None: this process only.
    """

    def __init__(self, *, timer=None, cache_path: str | os.PathLike | None = None) -> None:
        self.timer = timer
        self.cache_path = None if cache_path is None else os.fspath(cache_path)
        self.results: dict[TuneKey, Tuning] = {}
        self._loaded = False

    def best(self, key: TuneKey, candidates, plan) -> Blocks:
        """The chosen Blocks for `key`: cached, or the fastest candidate for which `plan(candidate)` returns
        launches that run (ties: the earlier candidate). Raises RuntimeError, with every candidate's error, if
        none runs."""
        self._load()
        if key in self.results:
            return self.results[key].blocks
        times, errors, planned = {}, {}, set()
        for candidate in candidates:
            try:
                launches = plan(candidate)
                signature = _plan_signature(launches)
                if signature in planned:
                    continue
                planned.add(signature)
                milliseconds = float((self.timer or _do_bench)(lambda launches=launches: _run(launches)))
                if not milliseconds >= 0.0 or milliseconds == float("inf"):
                    raise ValueError(f"the timer returned {milliseconds!r} ms")
                times[candidate] = milliseconds
            except Exception as error:  # a candidate that cannot run is skipped; its error is kept
                errors[candidate] = f"{type(error).__name__}: {error}"
        if not times:
            failures = "; ".join(f"{candidate}: {error}" for candidate, error in errors.items()) or "no candidates"
            raise RuntimeError(f"cca_triton tuning: no candidate ran for {key}: {failures}")
        chosen = min(times, key=times.__getitem__)
        self.results[key] = Tuning(chosen, times, errors)
        self._save(key)
        return chosen

    def _load(self) -> None:
        if self._loaded or self.cache_path is None:
            return
        self._loaded = True
        for key, tuning in _read_tune_file(self.cache_path).items():
            self.results.setdefault(key, tuning)

    def _save(self, key: TuneKey) -> None:
        if self.cache_path is None:
            return
        entries = _read_tune_file(self.cache_path)
        entries[key] = self.results[key]
        document = {"format": _TUNE_FILE_FORMAT, "triton": triton.__version__, "entries": [
            {"key": dataclasses.asdict(entry_key), "blocks": dataclasses.asdict(tuning.blocks),
             "candidates": [{"blocks": dataclasses.asdict(candidate), "ms": tuning.times_ms.get(candidate),
                             "error": tuning.errors.get(candidate)}
                            for candidate in (*tuning.times_ms, *tuning.errors)]}
            for entry_key, tuning in entries.items()]}
        _write_json_atomic(self.cache_path, document)


def _run(launches: list[Launch]) -> None:
    for launch in launches:
        launch.launch()


def _read_tune_file(path: str) -> dict[TuneKey, Tuning]:
    """Entries of a tuning file written by this Triton version ({} if the file does not exist); a file that is
    not one is an error naming it."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
        if document.get("format") != _TUNE_FILE_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {_TUNE_FILE_FORMAT}")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{TUNE_CACHE_ENV} file {path!r} is not a cca_triton tuning file: {error}") from error
    if document.get("triton") != triton.__version__:
        return {}
    entries = {}
    for entry in document.get("entries", []):
        try:
            fields = dict(entry["key"])
            if fields["capability"] is not None:
                fields["capability"] = tuple(fields["capability"])
            key = TuneKey(**fields)
            blocks = Blocks(**entry["blocks"])
            times = {Blocks(**c["blocks"]): c["ms"] for c in entry["candidates"] if c.get("ms") is not None}
            errors = {Blocks(**c["blocks"]): c["error"] for c in entry["candidates"] if c.get("error") is not None}
        except (KeyError, TypeError, ValueError):
            continue  # written by another version of these fields: tuned again
        entries[key] = Tuning(blocks, times, errors)
    return entries


def _write_json_atomic(path: str, document: dict) -> None:
    """Temp file in the same directory, fsync, rename: a reader sees the old file or the new one, never part.
    (ops/ cannot use repro.io, the project's writer, which sits above it.)"""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@functools.cache
def default_tuner() -> Tuner:
    """The process's tuner: one cache per process (as triton.autotune keeps one per kernel), persisted to the
    file named by CCREPRO_TRITON_TUNE_CACHE when that is set at its first use."""
    return Tuner(cache_path=os.environ.get(TUNE_CACHE_ENV) or None)


def _tuning_switched_on(device: torch.device) -> bool:
    value = os.environ.get(TUNE_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{TUNE_ENV} must be '0' or '1', got {value!r}")
    return value == "1" and device.type == "cuda"


def _choose_blocks(blocks, tuner: Tuner | None, pass_name: str, query: torch.Tensor, value: torch.Tensor,
                   tensors: tuple[torch.Tensor, ...], allow_tf32: bool, plan) -> Blocks:
    """The Blocks of a call: given; "tune" (or None with CCREPRO_TRITON_TUNE=1 on CUDA): the tuner's choice;
    None: `default_blocks`."""
    if blocks is None:
        if not _tuning_switched_on(query.device):
            return default_blocks(query.device, query.dtype)
        blocks = "tune"
    if isinstance(blocks, Blocks):
        return blocks
    if not (isinstance(blocks, str) and blocks == "tune"):
        raise ValueError(f"blocks must be a Blocks, 'tune' or None, got {blocks!r}")
    tuner = tuner or default_tuner()
    if tuner.timer is None and query.device.type != "cuda":
        raise RuntimeError(f"blocks='tune' times candidates with triton.testing.do_bench, which needs a CUDA "
                           f"device; got a tensor on {query.device} (pass Blocks or None, or a Tuner with a timer)")
    key = tune_key(pass_name, query, value, tensors, allow_tf32=allow_tf32)
    with _device_guard(query.device):
        return tuner.best(key, tuning_candidates(pass_name, query.dtype, key.capability), plan)


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
    (channels_last memory), differentiable in all three inputs. NCHW inputs are copied into channels_last here,
    before the op, so that the copies are what autograd saves for the backward (converted once, not per pass)."""
    query, key, value = (_to_channels_last(t) for t in (query, key, value))
    out, _ = torch.ops.ccrepro.cca_triton_forward(query, key, value)
    return out
