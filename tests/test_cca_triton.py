"""Tests of the fused Triton criss-cross attention (`ops.cca_triton`).

The operator tests run on the `op_device` fixture (tests/conftest.py): natively on CUDA when there is a GPU,
else on CPU in the Triton interpreter (switched on before triton is imported). Tests marked `gpu` add sizes
the interpreter is too slow for. The reference is the naive PyTorch backend evaluated in float64 on the same
(rounded) inputs, so the tolerances measure the kernels' own error.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import ops
import ops.cca_triton as cca_triton  # a broken kernel module fails here, it is not skipped
from ops.cca_naive import criss_cross_attention_naive as _naive

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
interpreter_only = pytest.mark.skipif(CUDA, reason="checks the Triton interpreter path; on CUDA the kernels run "
                                                    "natively")

# Relative to the largest reference magnitude: fp32 is limited by summation order, fp16 / bf16 by rounding
# of inputs to the dot products and of the outputs (bf16 has 8 significant bits). As in flash attention,
# backward's delta = sum(dO * out) uses the output rounded to the input dtype; in bf16 that makes the dq / dk
# error up to ~4x the naive bf16 backend's (measured 2.9e-2 vs 7e-3 at 2x8x16x7x9), hence the bf16 margin.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 5e-2}
SMALL_BLOCKS = cca_triton.Blocks(line=16, qk_channels=16, v_channels=16)


def _inputs(batch, qk_channels, v_channels, height, width, *, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    query, key = randn(batch, qk_channels, height, width), randn(batch, qk_channels, height, width)
    value, grad = randn(batch, v_channels, height, width), randn(batch, v_channels, height, width)
    return query, key, value, grad


def _forward_backward(fn, query, key, value, grad):
    """out and (d query, d key, d value) of sum(fn(q, k, v) * grad); works for non-leaf (view) inputs."""
    query, key, value = (t.detach().requires_grad_() if t.is_leaf else t for t in (query, key, value))
    out = fn(query, key, value)
    grads = torch.autograd.grad(out, (query, key, value), grad)
    return out.detach(), grads


def _reference(query, key, value, grad):
    as_double = [t.detach().double() for t in (query, key, value)]
    return _forward_backward(_naive, *as_double, grad.double())


def _assert_close(actual, expected, *, dtype, what):
    tolerance = TOLERANCE[dtype] * max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tolerance, f"{what}: max abs error {error:.3g} > {tolerance:.3g}"


def _check_against_naive(query, key, value, grad, *, fn=None):
    if query.device.type == "cuda":
        # An exported TRITON_INTERPRET=1 would send CUDA tensors through the interpreter: the kernels must
        # really run natively here.
        assert not cca_triton.INTERPRETED, "TRITON_INTERPRET=1 is set on a CUDA machine"
    fn = fn or (lambda q, k, v: ops.criss_cross_attention(q, k, v, backend="triton"))
    out, grads = _forward_backward(fn, query, key, value, grad)
    ref_out, ref_grads = _reference(query, key, value, grad)
    assert out.shape == ref_out.shape and out.dtype == query.dtype
    _assert_close(out, ref_out, dtype=query.dtype, what="out")
    for name, actual, expected in zip(("d query", "d key", "d value"), grads, ref_grads, strict=True):
        assert actual.shape == expected.shape and actual.dtype == query.dtype
        _assert_close(actual, expected, dtype=query.dtype, what=name)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 8, 16, 12, 12),  # square
        (2, 3, 5, 7, 11),  # primes, batch > 1, small channel counts
        (1, 4, 6, 13, 6),  # odd, non-square
        (2, 4, 6, 1, 9),  # H = 1: the column branch is empty
        (1, 4, 6, 9, 1),  # W = 1: the row branch is the pixel alone
        (1, 2, 3, 1, 1),  # a single pixel attends only itself: out = value, dq = dk = 0
        (1, 1, 1, 3, 2),  # one channel
        (1, 2, 3, 129, 2),  # columns just above the default 128-position tile (rows: see several_blocks)
        (1, 130, 129, 3, 4),  # Cqk and Cv just above the default 128-channel tile
        (1, 16, 64, 33, 33),  # a feature map of realistic proportions
    ],
)
def test_matches_naive_fp32(shape, op_device):
    _check_against_naive(*_inputs(*shape, device=op_device))


@pytest.mark.parametrize(
    "shape",
    [
        (1, 17, 33, 17, 2),  # columns of 17 > one 16-tile; Cqk and Cv span 2 and 3 channel blocks
        (1, 4, 5, 2, 17),  # rows of 17 > one 16-tile
    ],
)
def test_matches_naive_with_several_blocks(shape, op_device):
    """Small tiles force every loop (key blocks, query blocks, channel blocks) through more than one trip."""

    def fused(query, key, value):
        return _launchers(blocks=SMALL_BLOCKS)(query, key, value)

    _check_against_naive(*_inputs(*shape, device=op_device), fn=fused)


def _launchers(**options):
    """The launchers called with `options` (e.g. blocks, copy_to_channels_last) as a differentiable function,
    outside the custom op (whose tiles and layout handling are fixed per device)."""

    class Launchers(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            out, lse = cca_triton.cca_triton_forward(query, key, value, **options)
            ctx.save_for_backward(query, key, value, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            return cca_triton.cca_triton_backward(grad_out, *ctx.saved_tensors, **options)

    return Launchers.apply


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_matches_naive_other_dtypes(dtype, op_device):
    _check_against_naive(*_inputs(2, 8, 16, 7, 9, dtype=dtype, device=op_device))


@pytest.mark.parametrize("shape", [(1, 2, 3, 3, 4), (1, 2, 2, 1, 3)])
def test_gradcheck_fp64(shape, op_device):
    """Numerical derivatives check the backward kernels independently of the naive backend."""
    query, key, value, _ = _inputs(*shape, dtype=torch.float64, device=op_device)
    inputs = tuple(t.requires_grad_() for t in (query, key, value))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.criss_cross_attention(q, k, v, backend="triton"), inputs, fast_mode=True
    )


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "in_place"])
def test_non_contiguous_and_channels_last_inputs(in_place, op_device):
    """Through the op (NCHW and strided inputs copied into channels_last) and with the kernels reading every
    layout in place (the launchers with copy_to_channels_last=False: the kernels' own strides)."""
    query, key, value, grad = _inputs(2, 6, 10, 7, 9, device=op_device)
    wide = torch.randn(2, 12, 7, 9, device=op_device)
    strided_query = wide[:, ::2]  # channel stride 2
    transposed_key = key.transpose(2, 3).contiguous().transpose(2, 3)  # H and W strides swapped
    channels_last_value = value.contiguous(memory_format=torch.channels_last)
    strided_query.copy_(query)
    assert not strided_query.is_contiguous() and not transposed_key.is_contiguous()
    _check_against_naive(strided_query, transposed_key, channels_last_value, grad,
                         fn=_launchers(copy_to_channels_last=False) if in_place else None)


def test_only_inputs_without_contiguous_channels_are_copied():
    nchw = torch.randn(2, 4, 3, 5)
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    copy = cca_triton._to_channels_last(nchw)
    assert copy is not nchw and copy.is_contiguous(memory_format=torch.channels_last) and torch.equal(copy, nchw)
    assert cca_triton._to_channels_last(channels_last) is channels_last
    expanded = torch.ones(1, 1, 1, 1).expand(2, 4, 3, 5)  # `out.sum().backward()`'s gradient: read in place
    assert cca_triton._to_channels_last(expanded) is expanded
    one_channel = torch.randn(2, 1, 3, 5)
    assert cca_triton._to_channels_last(one_channel) is one_channel


@interpreter_only
def test_nchw_inputs_are_copied_once_through_autograd():
    """Through the op, NCHW q, k, v are copied once, before the forward, and autograd saves the copies: the
    backward copies only an NCHW dO (and nothing for a channels-last one)."""
    from repro.measure import kernels

    query, key, value, grad = _inputs(1, 3, 5, 6, 7)
    inputs = tuple(t.requires_grad_() for t in (query, key, value))
    with kernels.count() as forward:
        out = ops.criss_cross_attention(*inputs, backend="triton")
    with kernels.count() as backward:
        grads = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    with kernels.count() as backward_channels_last:
        grads_channels_last = torch.autograd.grad(out, inputs, grad.contiguous(memory_format=torch.channels_last))
    assert forward.kernels[kernels.COPY_KERNEL].launches == 3
    assert backward.kernels[kernels.COPY_KERNEL].launches == 1
    assert kernels.COPY_KERNEL not in backward_channels_last.kernels
    for copied, direct in zip(grads, grads_channels_last, strict=True):
        assert torch.equal(copied, direct)


def test_stride_zero_gradient(op_device):
    """`out.sum().backward()` hands backward an expanded (stride 0) gradient."""
    query, key, value, _ = _inputs(1, 3, 4, 5, 6, device=op_device)
    grad = torch.ones(1, 1, 1, 1, device=op_device).expand(1, 4, 5, 6)
    _check_against_naive(query, key, value, grad)


def test_output_is_channels_last_and_lse_is_the_log_partition(op_device):
    query, key, value, _ = _inputs(1, 3, 4, 5, 6, device=op_device)
    out, lse = cca_triton.cca_triton_forward(query, key, value)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert lse.shape == (1, 5, 6) and lse.dtype == torch.float32
    q, k = query.double().cpu()[0], key.double().cpu()[0]
    for i, j in [(0, 0), (2, 3), (4, 5)]:
        row = torch.einsum("c,cw->w", q[:, i, j], k[:, i, :])
        column = torch.einsum("c,ch->h", q[:, i, j], k[:, :, j])
        energies = torch.cat([row, column[torch.arange(5) != i]])
        assert lse[0, i, j].item() == pytest.approx(torch.logsumexp(energies, 0).item(), rel=1e-5)


def test_backward_is_deterministic(op_device):
    """Two backward runs agree bitwise, also with lines of several tiles (partial sums through memory)."""
    query, key, value, grad = _inputs(2, 5, 7, 17, 8, device=op_device)
    out, lse = cca_triton.cca_triton_forward(query, key, value)
    first = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks=SMALL_BLOCKS)
    second = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks=SMALL_BLOCKS)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_module_with_triton_backend_matches_naive(op_device):
    torch.manual_seed(0)
    fused = ops.CrissCrossAttention(16, qk_channels=4, backend="triton").to(op_device)
    with torch.no_grad():
        fused.gamma.fill_(0.7)  # non-zero, so the attention path carries gradient
    naive = ops.CrissCrossAttention(16, qk_channels=4, backend="naive").to(op_device)
    naive.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 6, 7, device=op_device)
    grad = torch.randn(2, 16, 6, 7, device=op_device)
    outputs = []
    for module in (fused, naive):
        module.zero_grad()
        out = module(x)
        out.backward(grad)
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for (name, p_fused), p_naive in zip(fused.named_parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_naive.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_opcheck_forward_and_backward(op_device):
    query, key, value, grad = _inputs(1, 2, 3, 3, 4, device=op_device)
    torch.library.opcheck(torch.ops.ccrepro.cca_triton_forward.default, (query, key, value))
    out, lse = torch.ops.ccrepro.cca_triton_forward(query, key, value)
    torch.library.opcheck(
        torch.ops.ccrepro.cca_triton_backward.default, (grad, query, key, value, out, lse)
    )


def test_flop_counter_and_fvcore_see_the_cost(op_device):
    from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    query, key, value, grad = _inputs(2, 4, 7, 5, 6, device=op_device)
    forward = ops.cost.criss_cross_attention_cost(2, 4, 7, 5, 6)
    backward = ops.cost.criss_cross_attention_backward_cost(2, 4, 7, 5, 6)
    query.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        ops.criss_cross_attention(query, key, value, backend="triton").backward(grad)
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.ccrepro.cca_triton_forward] == forward.flops
    assert counts[torch.ops.ccrepro.cca_triton_backward] == backward.flops

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return ops.criss_cross_attention(q, k, v, backend="triton")

    analysis = FlopCountAnalysis(Attention(), (query.detach(), key, value))
    analysis.set_op_handle(cca_triton.FORWARD_OP_NAME, cca_triton.fvcore_handle())
    assert analysis.total() == forward.macs
    assert analysis.unsupported_ops() == {}


def test_fake_tensor_flop_count_at_the_paper_size():
    """Under FakeTensorMode no kernel runs, so the 1x512x97x97 feature map (Cqk 64) is counted in well under a
    second: the attention's forward is 2.09 GFLOPs of the paper's ~8.3 per loop (the rest is the convs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        query = torch.randn(1, 64, 97, 97, requires_grad=True)
        key = torch.randn(1, 64, 97, 97, requires_grad=True)
        value = torch.randn(1, 512, 97, 97, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            out = cca_triton.criss_cross_attention_triton(query, key, value)
            out.backward(torch.randn_like(out))
        assert out.is_contiguous(memory_format=torch.channels_last)
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.ccrepro.cca_triton_forward] == 2 * 97 * 97 * (97 + 97 - 1) * (64 + 512)
    assert counts[torch.ops.ccrepro.cca_triton_backward] == (
        ops.cost.criss_cross_attention_backward_cost(1, 64, 512, 97, 97).flops
    )


@pytest.mark.slow
def test_torch_compile_fullgraph(op_device):
    """The compiled graph (custom op, fake, autograd) against the independent fp64 naive reference."""
    query, key, value, grad = _inputs(1, 4, 6, 5, 7, device=op_device)

    def block(q, k, v):
        return ops.criss_cross_attention(q, k, v, backend="triton") * 2.0 + v

    def reference(q, k, v):
        return _naive(q, k, v) * 2.0 + v

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out, grads = _forward_backward(compiled, query, key, value, grad)
    as_double = [t.double() for t in (query, key, value, grad)]
    ref_out, ref_grads = _forward_backward(reference, *as_double)
    _assert_close(out, ref_out, dtype=torch.float32, what="compiled out")
    for name, actual, expected in zip(("d query", "d key", "d value"), grads, ref_grads, strict=True):
        _assert_close(actual, expected, dtype=torch.float32, what=f"compiled {name}")


def test_bad_inputs_raise_clear_errors(op_device):
    query, key, value, grad = _inputs(1, 2, 3, 4, 5, device=op_device)
    eight_bit = [t.to(torch.float8_e4m3fn) for t in (query, key, value)]
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        cca_triton.cca_triton_forward(*eight_bit)
    with pytest.raises(TypeError, match="floating-point"):
        ops.criss_cross_attention(query.int(), key.int(), value.int(), backend="triton")
    with pytest.raises(ValueError, match="same shape"):
        cca_triton.cca_triton_forward(query, key[:, :1], value)
    with pytest.raises(ValueError, match="value must be"):
        cca_triton.cca_triton_forward(query, key, value[:, :, :3])
    out, lse = cca_triton.cca_triton_forward(query, key, value)
    with pytest.raises(ValueError, match="lse must be"):
        cca_triton.cca_triton_backward(grad, query, key, value, out, lse.double())
    with pytest.raises(ValueError, match="grad_out must be"):
        cca_triton.cca_triton_backward(grad[:, :2], query, key, value, out, lse)
    with pytest.raises(ValueError, match="power of two"):
        cca_triton.Blocks(line=24, qk_channels=16, v_channels=16)


@triton.jit
def _round_as_operand(source, target, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    values = tl.load(source + offsets, mask=mask)
    tl.store(target + offsets, cca_triton._operand(values, tl.float32, True), mask=mask)


@interpreter_only
def test_bf16_rounding_points_are_emulated_in_the_interpreter():
    """On a GPU, bf16 dots take bf16 operands: inputs, P and dS are rounded to bf16 (nearest even) before each
    dot. The interpreter's bf16 dot is wrong and its casts truncate, so the kernels round the operands
    themselves and multiply in fp32: the rounding must be exactly torch's."""
    assert cca_triton._kernel_dtypes(torch.bfloat16, allow_tf32=False)["ROUND_BF16"]
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1000, generator=generator) * torch.logspace(-6, 6, 1000)
    values[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1.99999, -(1 + 2**-8 + 2**-20)])  # ties and carries
    rounded = torch.empty_like(values)
    _round_as_operand[(1,)](values, rounded, 1000, BLOCK=1024)
    assert torch.equal(rounded, values.bfloat16().float())


@needs_cuda
def test_kernels_run_natively_on_cuda():
    """With a GPU the suite must exercise the compiled kernels, not the interpreter."""
    assert not cca_triton.INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") != "1"


def test_cpu_tensor_without_interpreter_is_a_clear_error():
    """Without TRITON_INTERPRET=1 the kernels are compiled for a GPU: a CPU tensor is refused up front."""
    script = (
        "import torch, ops\n"
        "x = torch.randn(1, 2, 3, 4)\n"
        "for call in (lambda: ops.criss_cross_attention(x, x, x, backend='triton'),\n"
        "             lambda: __import__('ops.cca_triton').cca_triton.cca_triton_forward(x, x, x)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as error:\n"
        "        assert 'TRITON_INTERPRET=1' in str(error) and 'cpu' in str(error), error\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('refused')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert result.returncode == 0 and "refused" in result.stdout, result.stderr


# ----------------------------------------------------------------------------------------------------------
# GPU-only: the same checks natively, plus sizes the interpreter is too slow for, compile and autocast.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(2, 3, 5, 7, 11), (2, 4, 6, 1, 9), (1, 4, 6, 9, 1), (1, 2, 3, 1, 1), (2, 64, 512, 65, 97)]
)
def test_cuda_matches_naive(shape, dtype):
    _check_against_naive(*_inputs(*shape, dtype=dtype, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_large_channel_counts():
    _check_against_naive(*_inputs(1, 2048, 2048, 9, 10, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_torch_compile_fullgraph():
    query, key, value, grad = _inputs(2, 16, 64, 33, 35, device="cuda")

    def block(q, k, v):
        return ops.criss_cross_attention(q, k, v, backend="triton") * 2.0 + v

    compiled = torch.compile(block, fullgraph=True)
    out, grads = _forward_backward(compiled, query, key, value, grad)
    ref_out, ref_grads = _forward_backward(block, query, key, value, grad)
    torch.testing.assert_close(out, ref_out)
    for actual, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_module(dtype):
    torch.manual_seed(0)
    fused = ops.CrissCrossAttention(64, qk_channels=16, backend="triton").cuda()
    with torch.no_grad():
        fused.gamma.fill_(0.5)
    naive = ops.CrissCrossAttention(64, qk_channels=16, backend="naive").cuda()
    naive.load_state_dict(fused.state_dict())
    x = torch.randn(2, 64, 33, 41, device="cuda")
    results = []
    for module in (fused, naive):
        with torch.autocast("cuda", dtype=dtype):
            out = module(x)
        out.float().square().mean().backward()
        results.append((out.float(), module.query_conv.weight.grad.clone()))
    scale = TOLERANCE[dtype] * 4
    torch.testing.assert_close(results[0][0], results[1][0], rtol=scale, atol=scale)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=scale, atol=scale * 10)
