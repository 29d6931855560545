"""Criss-cross attention in plain PyTorch.

Two implementations:

* `criss_cross_attention_naive`: the backend used by `ops.criss_cross_attention(backend="naive")`. A custom
  autograd function that materialises one (B, H, W, H + W) energy / probability buffer (column branch in
  the first H slots with -inf on its diagonal, row branch in the last W), fills both halves with batched
  matmuls on channels-last views (no `cat`, no layout copies of the map), runs one in-place softmax, and has a
  hand-written backward that recomputes nothing but layout copies and uses the fused softmax backward. It saves
  the query and key as given, the probabilities, and the value (as given when it is channels_last, else one
  channels-last copy per image; nothing when only the value needs a gradient). A value nothing saves (inference,
  or only the value needing a gradient) that is not channels_last is never copied whole (`VALUE_PARTS`).
* `criss_cross_attention_einsum`: the formulation mmcv ships (torch.einsum, materialised map, autograd
  through everything). Kept as the independent reference the benchmark compares against.

Speed on CPU (measured by `python -m repro.bench`): the value-sized work (Cv channels) runs image by image, so
every value-sized temporary (the channels-last copy of the value and of the output gradient) is one image's worth,
and the gradient's copy is reused across the images of a batch; only returned tensors are batch-sized. Large fresh
allocations cost page faults on every call (glibc maps blocks over 32 MB afresh each time), so fewer and smaller
ones are faster. With one thread each matmul writes matrix by matrix straight into the strided views of the
buffers. With several, PyTorch would parallelise each of those hundreds of small matmuls on its own (a barrier
per call, which on a loaded machine costs far more than the work): the forward instead runs the same one-thread
matmuls in the op's own worker threads, each owning a block of rows or columns, one barrier per phase
(`_forward_in_workers`; its 2-thread rows in results/ops_bench.csv against the batched form below). The backward
with several threads runs each branch as one batched matmul into a contiguous temporary (the column products of
the value-sized matmuls in blocks of a quarter image, to keep the peak memory of the one-thread path). Setting
`THP_MEM_ALLOC_ENABLE=1` in the environment before torch starts (PyTorch's CPU allocator then asks for transparent
huge pages) makes every formulation faster; it is a process-wide choice, left to the user.

Cost of one call (B, Cqk, Cv, H, W): 2 * B * H * W * (H + W) * (Cqk + Cv) FLOPs forward, about twice that
backward; the materialised map is B * H * W * (H + W) elements (see `ops.cost`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when x is already channels_last."""
    return x.permute(0, 2, 3, 1).contiguous()


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.permute(0, 2, 3, 1).is_contiguous()


def _image_channels_last(x: torch.Tensor, b: int, buffer: torch.Tensor | None) -> torch.Tensor:
    """Image b of (B, C, H, W) x as a contiguous (H, W, C) tensor: a view when x is channels_last, else a copy
    into `buffer` (an (H, W, C) tensor reused across images) or a new tensor when buffer is None."""
    image = x[b].permute(1, 2, 0)
    if image.is_contiguous():
        return image
    if buffer is None:
        return image.contiguous()
    return buffer.copy_(image)


def _column_view(x: torch.Tensor) -> torch.Tensor:
    """(H, W, X) -> (W, H, X) view: the column j as a batch of H x X matrices."""
    return x.transpose(0, 1)


def _row_view(buffer: torch.Tensor, height: int) -> torch.Tensor:
    """(..., H, W, H + W) -> (..., H, W, W) strided view of the row branch."""
    return buffer[..., height:]


class CrissCrossNaiveFunction(torch.autograd.Function):
    """The naive backend as one autograd Function (forward and hand-written backward); public so that
    tracers can name it (fvcore sees it as `prim::PythonOp.CrissCrossNaiveFunction`)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # The backward needs the value only for the gradients of query and key (dP = dO . v).
        keep_value = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        workers = _forward_workers(value)
        if workers > 1:
            out, probs, images = _forward_in_workers(query, key, value, keep_value, workers)
            ctx.save_for_backward(query, key, probs, *images)
            return out.permute(0, 3, 1, 2)
        probs = _energies(_channels_last(query), _channels_last(key))
        torch._softmax(probs, -1, False, out=probs)
        batch, channels, height, width = value.shape
        out = value.new_empty(batch, height, width, channels)
        images = []
        for b in range(batch):
            if not keep_value and not _is_channels_last(value):
                # Nothing saves the value: no whole channels-last copy (half a value map less at the peak: the
                # copy would live beside the value's own map until the call returns).
                _aggregate_image_streamed(probs[b], value[b], out[b])
                continue
            v = _image_channels_last(value, b, None)
            _aggregate_image(probs[b], v, out[b])
            if keep_value:
                images.append(v)
        ctx.save_for_backward(query, key, probs, *images)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        query, key, probs, *values = ctx.saved_tensors
        need_qk = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_v = ctx.needs_input_grad[2]
        batch, height, width, _ = probs.shape
        channels = grad_out.shape[1]
        grad_query = grad_key = None
        grad_p = torch.empty_like(probs) if need_qk else None
        grad_v = grad_out.new_empty(batch, height, width, channels) if need_v else None
        buffer = None if _is_channels_last(grad_out) else grad_out.new_empty(height, width, channels)
        for b in range(batch):
            grad_o = _image_channels_last(grad_out, b, buffer)
            if need_qk:
                # dP = dO . v over the H + W - 1 attended pixels; the masked diagonal gets a harmless value,
                # its probability is 0 so the softmax backward zeroes it.
                _fill_branches_image(grad_p[b], grad_o, values[b])
            if need_v:
                _aggregate_transposed_image(probs[b], grad_o, grad_v[b])
        if need_qk:
            grad_e = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype, grad_input=grad_p)
            if ctx.needs_input_grad[0]:
                grad_query = _aggregate(grad_e, _channels_last(key))
            if ctx.needs_input_grad[1]:
                grad_key = _aggregate_transposed(grad_e, _channels_last(query))
        return _to_nchw(grad_query), _to_nchw(grad_key), _to_nchw(grad_v)


def _forward_workers(value: torch.Tensor) -> int:
    """How many threads run the forward: PyTorch's intra-op thread count for plain CPU tensors, else 1 (one
    stream of work). Tensor subclasses and dispatch modes (FakeTensorMode and FlopCounterMode of the FLOP
    counts, tracing) stay on the calling thread: a mode is per thread, and the workers would run outside it."""
    if value.device.type != "cpu" or type(value) is not torch.Tensor or _get_current_dispatch_mode() is not None:
        return 1
    return torch.get_num_threads()


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads, made on first use, per process: a child made by fork (e.g. a
    DataLoader worker) inherits the parent's pool objects but none of their threads, so it gets its own."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="cca-naive")
        return _POOLS[key]


def _split(length: int, parts: int) -> list[slice]:
    """[0, length) in at most `parts` contiguous, non-empty slices of near-equal length."""
    step = -(-length // parts)
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def _forward_in_workers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep_value: bool,
                        workers: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The forward with several threads: (out (B, H, W, Cv), probabilities, saved value images).

    PyTorch's own intra-op parallelism splits every one of the hundreds of small matmuls (and every copy) across
    the threads, with a barrier per call; on a loaded machine a descheduled thread stalls each of them. Here
    `workers` threads each own a block of rows (or columns) of an image and run the same one-thread matmuls on
    it, with one barrier per phase: (1) channels-last copies of query and key and the row energies of blocks of
    rows, (2) the column energies of blocks of columns, then image by image (3) the value's channels-last copy,
    diagonal mask, softmax and row aggregation of blocks of rows, (4) the column aggregation of blocks of
    columns. PyTorch's intra-op thread count is 1 for the duration of the call (the
    workers replace it) and restored afterwards; the workers run under the caller's grad / inference mode.
    Buffers are the one-thread path's: an NCHW value that is not saved is never copied whole
    (`_rows_out_streamed`, `_copy_rows`, `_stream_columns`).
    """
    query, key, value = query.detach(), key.detach(), value.detach()
    batch, channels, height, width = value.shape
    qk_channels = query.shape[1]
    inference = torch.is_inference_mode_enabled()
    pool = _pool(workers)

    def run(fn, length: int) -> None:
        def task(block: slice) -> None:
            with torch.inference_mode() if inference else torch.no_grad():
                fn(block)
        futures = [pool.submit(task, block) for block in _split(length, workers)]
        errors = [future.exception() for future in futures]  # waits for all before anything is raised
        for error in errors:
            if error is not None:
                raise error

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probs = query.new_empty(batch, height, width, height + width)
        # Energies of every image first, so that the channels-last query and key are freed before the value's
        # copy exists (the one-thread path's peak).
        q, k = (x.permute(0, 2, 3, 1) if _is_channels_last(x) else x.new_empty(batch, height, width, qk_channels)
                for x in (query, key))
        copies = [(x, y) for x, y in ((query, q), (key, k)) if not _is_channels_last(x)]
        for b in range(batch):
            run(partial(_rows_energy, probs[b], q[b], k[b], [(x[b], y[b]) for x, y in copies]), height)
            run(partial(_columns_energy, probs[b], q[b], k[b]), width)
        del q, k, copies
        out = value.new_empty(batch, height, width, channels)
        value_given = _is_channels_last(value)
        streamed = not value_given and not keep_value
        if value_given:
            v_all = value.permute(0, 2, 3, 1)
        elif keep_value:
            v_all = value.new_empty(batch, height, width, channels)
        else:
            parts = _value_parts(height)
            buffer = value.new_empty(parts[0].stop - parts[0].start, width, channels)
        for b in range(batch):
            if streamed:  # nothing saves the value: never copied whole (see VALUE_PARTS)
                run(partial(_rows_out_streamed, probs[b], value[b], out[b]), height)
                column_weights = _column_view(probs[b])[..., :height]
                for part in parts:
                    rows = buffer[: part.stop - part.start]
                    run(partial(_copy_rows, value[b], part, rows), part.stop - part.start)
                    run(partial(_stream_columns, column_weights, part, rows, out[b]), width)
                continue
            run(partial(_rows_out, probs[b], None if value_given else value[b], v_all[b], out[b]), height)
            run(partial(_columns_out, probs[b], v_all[b], out[b]), width)
    finally:
        torch.set_num_threads(previous)
    images = [v_all[b] for b in range(batch)] if keep_value else []
    return out, probs, images


def _rows_energy(probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 copies: list[tuple[torch.Tensor, torch.Tensor]], block: slice) -> None:
    """Phase 1 on rows `block` of one image: channels-last copies ((C, H, W) source, (H, W, C) target) and the
    row energies into probs (H, W, H + W)."""
    for source, target in copies:
        target[block].copy_(source[:, block].permute(1, 2, 0))
    height = probs.shape[0]
    _row_view(probs, height)[block].baddbmm_(q[block], k[block].transpose(1, 2), beta=0)


def _columns_energy(probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block: slice) -> None:
    """Phase 2 on columns `block`: the column energies (diagonal included; phase 3 masks it)."""
    height = probs.shape[0]
    _column_view(probs)[block, :, :height].baddbmm_(
        _column_view(q)[block], _column_view(k)[block].transpose(1, 2), beta=0)


def _rows_out(probs: torch.Tensor, value: torch.Tensor | None, v: torch.Tensor, out: torch.Tensor,
              block: slice) -> None:
    """Phase 3 on rows `block`: the value's channels-last copy (from `value` (C, H, W) into v unless None), the
    diagonal mask, the softmax in place and the row aggregation into out (H, W, C)."""
    if value is not None:
        v[block].copy_(value[:, block].permute(1, 2, 0))
    _softmax_rows(probs, block)
    height = probs.shape[0]
    torch.bmm(_row_view(probs[block], height), v[block], out=out[block])


def _softmax_rows(probs: torch.Tensor, block: slice) -> None:
    """The diagonal mask and the in-place softmax of rows `block` of probs (H, W, H + W)."""
    height = probs.shape[0]
    rows = probs[block]
    # The pixel itself is in both its row and its column: count it once (in the row branch).
    rows[..., :height].diagonal(offset=block.start, dim1=0, dim2=2).fill_(float("-inf"))
    torch._softmax(rows, -1, False, out=rows)


def _columns_out(probs: torch.Tensor, v: torch.Tensor, out: torch.Tensor, block: slice) -> None:
    """Phase 4 on columns `block`: the column aggregation added into out."""
    height = probs.shape[0]
    _column_view(out)[block].baddbmm_(_column_view(probs)[block, :, :height], _column_view(v)[block])


# A value that nothing saves and that is not channels_last is never copied whole (inference on an NCHW model): the
# row branch reads it in place (row i of an NCHW image, as a (W, C) matrix, has unit stride along W: a column-major
# operand BLAS reads as it is), and the column branch, whose (H, C) matrices have no unit stride in NCHW, sums over
# VALUE_PARTS blocks of source rows, each copied channels-last in turn into one buffer. Timed at 97x97, C = 512,
# one thread, against one whole copy: the aggregation alone took the same time with 2 parts (half a value map less
# at the peak) and 1.35x longer with 4 (the column products' inner dimension, H / 4, becomes too small); the whole
# inference forward of the op measured 1.17-1.25x the whole-copy form's time (interleaved, CPU time, under load).
VALUE_PARTS = 2


def _value_parts(height: int) -> list[slice]:
    return _split(height, VALUE_PARTS)


def _stream_rows(row_weights: torch.Tensor, value: torch.Tensor, out: torch.Tensor, block: slice) -> None:
    """out[block] = row_weights[block] @ value's rows `block` (value (C, H, W), out (H, W, C)), read in place."""
    torch.bmm(row_weights[block], value[:, block].permute(1, 2, 0), out=out[block])


def _copy_rows(value: torch.Tensor, part: slice, buffer: torch.Tensor, block: slice) -> None:
    """Rows `block` (relative to `part`) of the value's rows `part`, channels-last into buffer (rows, W, C)."""
    rows = slice(part.start + block.start, part.start + block.stop)
    buffer[block].copy_(value[:, rows].permute(1, 2, 0))


def _stream_columns(column_weights: torch.Tensor, part: slice, rows: torch.Tensor, out: torch.Tensor,
                    block: slice) -> None:
    """out's columns `block` += the column branch's terms from source rows `part` (copied in rows (len, W, C))."""
    _column_view(out)[block].baddbmm_(column_weights[block, :, part], _column_view(rows)[block])


def _aggregate_image_streamed(weights: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> None:
    """`_aggregate_image` of an NCHW value image (C, H, W) that nothing saves, without its whole channels-last copy
    (see VALUE_PARTS)."""
    height, width = out.shape[:2]
    _stream_rows(_row_view(weights, height), value, out, slice(0, height))
    parts = _value_parts(height)
    buffer = value.new_empty(parts[0].stop - parts[0].start, width, value.shape[0])
    column_weights = _column_view(weights)[..., :height]
    for part in parts:
        rows = buffer[: part.stop - part.start]
        _copy_rows(value, part, rows, slice(0, part.stop - part.start))
        _stream_columns(column_weights, part, rows, out, slice(0, width))


def _rows_out_streamed(probs: torch.Tensor, value: torch.Tensor, out: torch.Tensor, block: slice) -> None:
    """Phase 3 on rows `block` for an NCHW value (C, H, W) that nothing saves: mask, softmax, and the row
    aggregation read in place."""
    _softmax_rows(probs, block)
    _stream_rows(_row_view(probs, probs.shape[0]), value, out, block)


def _to_nchw(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.permute(0, 3, 1, 2)


def _batched() -> bool:
    """Whether to run each branch as batched matmuls into contiguous results (see the module docstring): with
    several threads; with one, matrix by matrix straight into the strided buffers is as fast and needs no
    temporaries."""
    return torch.get_num_threads() > 1


def _column_chunks(width: int) -> list[slice]:
    """Column blocks for the batched column branch: the temporary holds a quarter of an image at most."""
    step = max(1, -(-width // 4))
    return [slice(start, min(start + step, width)) for start in range(0, width, step)]


def _fill_branches_image(buffer: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """buffer[i, j, :H] = left[i, j] . right[:, j]; buffer[i, j, H:] = left[i, j] . right[i, :].

    left, right: (H, W, C) with unit channel stride; buffer: (H, W, H + W).
    """
    height = left.shape[0]
    rows, columns = _row_view(buffer, height), _column_view(buffer)[..., :height]
    left_columns, right_columns = _column_view(left), _column_view(right).transpose(1, 2)
    if not _batched():
        rows.baddbmm_(left, right.transpose(1, 2), beta=0)
        columns.baddbmm_(left_columns, right_columns, beta=0)
        return
    rows.copy_(torch.bmm(left, right.transpose(1, 2)))
    columns.copy_(torch.bmm(left_columns, right_columns))


def _energies(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, W, Cqk) x2 -> (B, H, W, H + W) energies with -inf on the column branch's diagonal."""
    batch, height, width, _ = q.shape
    energy = q.new_empty(batch, height, width, height + width)
    for b in range(batch):
        _fill_branches_image(energy[b], q[b], k[b])
    # The pixel itself is in both its row and its column: count it once (in the row branch).
    energy[..., :height].diagonal(dim1=1, dim2=3).fill_(float("-inf"))
    return energy


def _aggregate_image(weights: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i, j] = sum_i' weights[i, j, i'] x[i', j] + sum_j' weights[i, j, H + j'] x[i, j'].

    weights: (H, W, H + W); x: (H, W, C) with unit channel stride; out: contiguous (H, W, C).
    """
    height = x.shape[0]
    _rows_and_columns(out, _row_view(weights, height), x, _column_view(weights)[..., :height], _column_view(x))
    return out


def _aggregate_transposed_image(weights: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The adjoint of `_aggregate_image` in x: out[i', j] = sum_i weights[i, j, i'] x[i, j] and
    out[i, j'] += sum_j weights[i, j, H + j'] x[i, j]."""
    height = x.shape[0]
    _rows_and_columns(out, _row_view(weights, height).transpose(1, 2), x,
                      _column_view(weights)[..., :height].transpose(1, 2), _column_view(x))
    return out


def _rows_and_columns(out: torch.Tensor, row_weights: torch.Tensor, x: torch.Tensor, column_weights: torch.Tensor,
                      x_columns: torch.Tensor) -> None:
    """out = row_weights @ x (batched over rows) + (column_weights @ x_columns) seen through the column view.

    The row product lands in out directly (contiguous: one batched gemm). The column product's natural layout is
    (W, H, C): matrix by matrix into out's column view with one thread; with several, batched into a contiguous
    temporary of a block of columns, added through a transposed view.
    """
    torch.bmm(row_weights, x, out=out)
    out_columns = _column_view(out)
    if not _batched():
        out_columns.baddbmm_(column_weights, x_columns)
        return
    for block in _column_chunks(out_columns.shape[0]):
        out_columns[block].add_(torch.bmm(column_weights[block], x_columns[block]))


def _aggregate(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched `_aggregate_image`: weights (B, H, W, H + W), x (B, H, W, C) contiguous -> (B, H, W, C)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for b in range(x.shape[0]):
        _aggregate_image(weights[b], x[b], out[b])
    return out


def _aggregate_transposed(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched `_aggregate_transposed_image`: weights (B, H, W, H + W), x (B, H, W, C) -> (B, H, W, C)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for b in range(x.shape[0]):
        _aggregate_transposed_image(weights[b], x[b], out[b])
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
