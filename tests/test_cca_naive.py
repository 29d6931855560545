"""The naive criss-cross backend against an explicit per-pixel reference and the mmcv einsum form, on the
operator tests' device (`op_device`: CUDA when present, else the CPU)."""

import os
import time

import pytest
import torch

from ops import criss_cross_attention
from ops.cca_naive import criss_cross_attention_einsum
from tests.reference import criss_cross_reference

# (B, Cqk, Cv, H, W): 1x1, 1xW, Hx1, non-square, primes, B > 1.
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 2, 3, 1, 7),
    (2, 3, 2, 6, 1),
    (1, 4, 5, 3, 8),
    (3, 5, 7, 7, 5),
    (2, 3, 4, 11, 13),
]
TOLERANCES = {  # (rtol, atol) against an fp64 computation of the same inputs
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (5e-2, 5e-2),
}


def _inputs(shape, dtype=torch.float64, seed=0, requires_grad=False, device="cpu"):
    batch, qk_channels, value_channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)

    def make(channels):
        x = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
        return x.to(device=device, dtype=dtype)

    tensors = make(qk_channels), make(qk_channels), make(value_channels)
    return [t.requires_grad_(requires_grad) for t in tensors]


def _forward_backward(fn, tensors, grad_out):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, grad_out)
    return out, grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_per_pixel_reference(shape, op_device):
    query, key, value = _inputs(shape, device=op_device)
    expected = criss_cross_reference(query, key, value)
    torch.testing.assert_close(criss_cross_attention(query, key, value, backend="naive"), expected)
    torch.testing.assert_close(criss_cross_attention_einsum(query, key, value), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_reference(shape, op_device):
    tensors = _inputs(shape, requires_grad=True, device=op_device)
    grad_out = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64, device=op_device)
    out, grads = _forward_backward(lambda *t: criss_cross_attention(*t, backend="naive"), tensors, grad_out)
    ref_out, ref_grads = _forward_backward(criss_cross_reference, tensors, grad_out)
    torch.testing.assert_close(out, ref_out)
    for name, grad, ref in zip(("query", "key", "value"), grads, ref_grads):
        torch.testing.assert_close(grad, ref, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("shape", [(1, 2, 3, 1, 1), (2, 2, 3, 3, 4), (1, 3, 2, 5, 1), (1, 1, 2, 2, 5)], ids=str)
def test_gradcheck_fp64(shape, op_device):
    tensors = _inputs(shape, requires_grad=True, device=op_device)
    assert torch.autograd.gradcheck(lambda *t: criss_cross_attention(*t, backend="naive"), tensors)


def test_double_backward_is_rejected_clearly(op_device):
    query, key, value = _inputs((1, 2, 2, 3, 3), requires_grad=True, device=op_device)
    out = criss_cross_attention(query, key, value, backend="naive")
    (grad_query,) = torch.autograd.grad(out.square().sum(), query, create_graph=True)
    # The hand-written backward is not itself differentiable; it must say so rather than return wrong zeros.
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_query.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 16, 9, 13), (1, 4, 6, 1, 17), (1, 16, 32, 17, 16)], ids=str)
def test_low_precision_against_fp64(dtype, shape, op_device):
    rtol, atol = TOLERANCES[dtype]
    tensors = _inputs(shape, dtype=dtype, seed=1, requires_grad=True, device=op_device)
    reference = [t.detach().double().requires_grad_(True) for t in tensors]
    grad_out = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64, device=op_device)
    out, grads = _forward_backward(
        lambda *t: criss_cross_attention(*t, backend="naive"), tensors, grad_out.to(dtype)
    )
    ref_out, ref_grads = _forward_backward(criss_cross_reference_fast, reference, grad_out)
    assert out.dtype == dtype
    scale = float(ref_out.detach().abs().max())
    torch.testing.assert_close(out.detach().double(), ref_out.detach(), rtol=rtol, atol=atol * scale)
    for name, grad, ref in zip(("query", "key", "value"), grads, ref_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(
            grad.double(), ref, rtol=rtol, atol=atol * float(ref.abs().max()), msg=lambda m, n=name: f"{n}: {m}"
        )


def criss_cross_reference_fast(query, key, value):
    # The einsum formulation is checked against the per-pixel loop above; reuse it where the loop is slow.
    return criss_cross_attention_einsum(query, key, value)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(layout, op_device):
    query, key, value = _inputs((2, 3, 4, 5, 6), device=op_device)
    if layout == "channels_last":
        views = [t.to(memory_format=torch.channels_last) for t in (query, key, value)]
    elif layout == "transposed":
        # Same values, stored (B, C, W, H) and viewed back as (B, C, H, W).
        views = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (query, key, value)]
    else:
        views = [torch.cat([t, torch.zeros_like(t)], dim=1)[:, : t.shape[1]] for t in (query, key, value)]
    assert not all(v.is_contiguous() for v in views)
    torch.testing.assert_close(
        criss_cross_attention(*views, backend="naive"), criss_cross_reference(query, key, value)
    )


def test_gradients_are_finite_for_large_energies(op_device):
    query, key, value = _inputs((1, 4, 3, 6, 5), dtype=torch.float32, requires_grad=True, device=op_device)
    with torch.no_grad():
        query.mul_(30)
    out = criss_cross_attention(query, key, value, backend="naive")
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for tensor in (query, key, value):
        assert torch.isfinite(tensor.grad).all()


def test_attention_rows_are_convex_combinations(op_device):
    # With value = 1 everywhere, every output is exactly 1: the weights over the H + W - 1 pixels sum to 1.
    query, key, _ = _inputs((2, 3, 1, 7, 4), device=op_device)
    value = torch.ones(2, 5, 7, 4, dtype=torch.float64, device=op_device)
    torch.testing.assert_close(criss_cross_attention(query, key, value, backend="naive"), value)


def test_only_the_criss_cross_path_contributes(op_device):
    # Changing value off row i and column j must not change the output at (i, j).
    query, key, value = _inputs((1, 3, 2, 6, 7), device=op_device)
    out = criss_cross_attention(query, key, value, backend="naive")
    perturbed = value.clone()
    perturbed[:, :, 0, 0] += 100.0
    out2 = criss_cross_attention(query, key, perturbed, backend="naive")
    changed = ((out2 - out).abs().amax(dim=1)[0] > 0).cpu()
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[0, :] = True
    expected[:, 0] = True
    assert torch.equal(changed, expected)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Both matmul paths of the naive backend: matrix by matrix (one thread) and batched (several); on the CPU
    the forward with several threads runs in the op's own worker threads (blocks of rows and columns)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


# W = 9 makes column blocks of 3, 3, 3; W = 10 of 3, 3, 3, 1 (a short last block); B = 3 reuses the buffers.
@pytest.mark.parametrize("shape", [(3, 4, 6, 5, 9), (2, 3, 5, 7, 10), (1, 2, 3, 1, 4), (2, 2, 3, 4, 1)], ids=str)
def test_both_matmul_paths_match_the_reference(shape, threads, op_device):
    assert torch.get_num_threads() == threads
    tensors = _inputs(shape, requires_grad=True, device=op_device)
    grad_out = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64, device=op_device)
    out, grads = _forward_backward(lambda *t: criss_cross_attention(*t, backend="naive"), tensors, grad_out)
    ref_out, ref_grads = _forward_backward(criss_cross_reference, tensors, grad_out)
    torch.testing.assert_close(out, ref_out)
    for name, grad, ref in zip(("query", "key", "value"), grads, ref_grads):
        torch.testing.assert_close(grad, ref, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("wanted", [(False, False, True), (True, False, False), (False, True, True)], ids=str)
def test_partial_gradients(wanted, threads, op_device):
    # Only some inputs need a gradient: the function skips the rest (and keeps no value copy when only the
    # value needs one); the gradients it does return are the reference's.
    shape = (2, 3, 4, 5, 6)
    tensors = _inputs(shape, device=op_device)
    tensors = [t.requires_grad_(w) for t, w in zip(tensors, wanted)]
    grad_out = torch.randn(2, 4, 5, 6, dtype=torch.float64, device=op_device)
    needed = [t for t, w in zip(tensors, wanted) if w]
    grads = torch.autograd.grad(criss_cross_attention(*tensors, backend="naive"), needed, grad_out)
    reference = torch.autograd.grad(criss_cross_reference(*tensors), needed, grad_out)
    for grad, ref in zip(grads, reference):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channels_last_inputs_and_gradient(layout, threads, op_device):
    # Channels-last value and output gradient take the copy-free views; NCHW ones the per-image copies.
    shape = (2, 3, 4, 6, 5)
    tensors = _inputs(shape, device=op_device)
    grad_out = torch.randn(2, 4, 6, 5, dtype=torch.float64, device=op_device)
    if layout == "channels_last":
        tensors = [t.to(memory_format=torch.channels_last) for t in tensors]
        grad_out = grad_out.to(memory_format=torch.channels_last)
    tensors = [t.requires_grad_(True) for t in tensors]
    out, grads = _forward_backward(lambda *t: criss_cross_attention(*t, backend="naive"), tensors, grad_out)
    ref_out, ref_grads = _forward_backward(criss_cross_reference, tensors, grad_out)
    torch.testing.assert_close(out, ref_out)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


def test_saved_value_is_the_channels_last_input_itself(op_device):
    # A channels-last value is saved as given (views, no copy); an NCHW one as one channels-last copy per image.
    query, key, value = _inputs((2, 3, 4, 5, 6), requires_grad=True, device=op_device)
    saved = criss_cross_attention(query, key, value, backend="naive").grad_fn.saved_tensors[3:]
    assert len(saved) == 2
    for b, image in enumerate(saved):
        assert image.is_contiguous() and image.shape == (5, 6, 4)
        assert torch.equal(image, value[b].detach().permute(1, 2, 0))
    value_cl = value.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    saved_cl = criss_cross_attention(query, key, value_cl, backend="naive").grad_fn.saved_tensors[3:]
    assert [image.data_ptr() for image in saved_cl] == [value_cl[b].data_ptr() for b in range(2)]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3), (1, 2, 3, 1, 4), (1, 2, 2, 4, 1)], ids=str)
def test_gradcheck_fp64_with_threads(shape, threads, op_device):
    tensors = _inputs(shape, requires_grad=True, device=op_device)
    assert torch.autograd.gradcheck(lambda *t: criss_cross_attention(*t, backend="naive"), tensors)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_worker_forward_keeps_thread_count_and_grad_mode(mode, threads, op_device):
    # The several-thread forward sets PyTorch's thread count to 1 while its workers run: it is restored, and
    # the workers follow the caller's mode (in-place writes into inference tensors need inference mode there).
    shape = (2, 3, 4, 7, 5)
    query, key, value = _inputs(shape, device=op_device)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = criss_cross_attention(query, key, value.to(memory_format=torch.channels_last), backend="naive")
    assert torch.get_num_threads() == threads
    assert not out.requires_grad
    assert out.is_inference() == (mode == "inference_mode")
    torch.testing.assert_close(out, criss_cross_reference(query, key, value))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_forward_runs_in_a_forked_child(op_device):
    # A child made by fork after the parent used the worker pool (a DataLoader worker, multiprocessing's
    # default on Linux) inherits the pool object but none of its threads: it must get its own, not hang.
    if op_device.type != "cpu":
        pytest.skip("the worker forward is the CPU path")
    query, key, value = _inputs((2, 3, 4, 7, 5), device=op_device)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = criss_cross_attention(query, key, value, backend="naive")
        pid = os.fork()
        if pid == 0:  # child: exit code 0 when the forward returns the parent's result
            code = 1
            try:
                torch.set_num_threads(2)
                with torch.no_grad():
                    got = criss_cross_attention(query, key, value, backend="naive")
                code = 0 if torch.allclose(got, expected) else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forward in a forked child did not return within 60 s (the parent's pool was reused)")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("mode", ["fake", "flop_counter"])
def test_forward_with_threads_under_dispatch_modes(mode, threads, op_device):
    # The FLOP counts (repro.profile, repro.claims) run the op on fake tensors / under FlopCounterMode: a mode is
    # per thread, so the several-thread forward must stay on the calling thread there (it raised "fake_mode.
    # in_kernel_invocation must be False" in the main job's profile steps at 2 threads).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    shape = (2, 3, 4, 7, 5)
    if mode == "fake":
        with FakeTensorMode():
            query, key, value = _inputs(shape, device=op_device)
            out = criss_cross_attention(query, key, value, backend="naive")
        assert out.shape == value.shape
    else:
        query, key, value = _inputs(shape, device=op_device)
        with FlopCounterMode(display=False) as counter:
            out = criss_cross_attention(query, key, value, backend="naive")
        torch.testing.assert_close(out, criss_cross_reference(query, key, value))
        assert counter.get_total_flops() > 0  # the matmuls ran under the mode, on this thread
    assert torch.get_num_threads() == threads


# H = 1 and W = 1 lines, an odd H (halves of 4 and 3 rows), B = 2 (the buffers reused across images).
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 6), (1, 2, 3, 1, 5), (1, 2, 3, 4, 1)], ids=str)
@pytest.mark.parametrize("mode", ["no_grad", "value_grad_only"])
def test_unsaved_nchw_value_is_streamed(shape, mode, threads, op_device):
    # A value nothing saves (no gradient at all, or only the value's) that is NCHW takes the streamed path
    # (rows read in place, columns from row halves): same results as the reference at 1 and 2 threads.
    query, key, value = _inputs(shape, device=op_device)
    if mode == "no_grad":
        with torch.no_grad():
            out = criss_cross_attention(query, key, value, backend="naive")
        torch.testing.assert_close(out, criss_cross_reference(query, key, value))
        return
    value.requires_grad_(True)
    grad_out = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64, device=op_device)
    out = criss_cross_attention(query, key, value, backend="naive")
    assert len(out.grad_fn.saved_tensors) == 3  # query, key, probabilities: no value copy
    reference = criss_cross_reference(query, key, value)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(torch.autograd.grad(out, value, grad_out)[0],
                               torch.autograd.grad(reference, value, grad_out)[0])


def test_inference_peak_holds_no_whole_value_copy(threads):
    # The forward's allocator peak on an NCHW value nothing saves: the output, the probabilities, the query and
    # key copies and half an image of value rows, never a whole channels-last copy of the value.
    from repro.measure.memory import cpu_peak_bytes

    batch, qk_channels, channels, height, width = 1, 4, 64, 16, 12
    query, key, value = _inputs((batch, qk_channels, channels, height, width), dtype=torch.float32)
    with torch.no_grad():
        peak = cpu_peak_bytes(lambda: criss_cross_attention(query, key, value, backend="naive"))
    item = 4
    value_map = channels * height * width * item
    fixed = (value_map                                          # the output
             + height * width * (height + width) * item         # the probabilities
             + 2 * qk_channels * height * width * item)         # channels-last query and key
    assert peak < fixed + value_map  # a whole copy of the value would reach fixed + value_map
    assert peak <= fixed + value_map // 2 + 4096
