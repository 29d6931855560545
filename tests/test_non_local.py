"""NonLocal2d: naive (materialised map) vs SDPA vs an explicit per-pixel reference, on the operator tests'
device (`op_device`: CUDA when present, else the CPU)."""

import pytest
import torch

from ops import NonLocal2d, non_local_attention
from tests.reference import assert_gradients_reach_parameters, non_local_reference

SHAPES = [(1, 1, 1, 1, 1), (2, 3, 4, 1, 6), (1, 2, 5, 7, 1), (2, 4, 3, 5, 7), (1, 8, 8, 11, 13)]


def _inputs(shape, dtype=torch.float64, seed=0, requires_grad=False, device="cpu"):
    batch, qk_channels, value_channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(batch, c, height, width, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        for c in (qk_channels, qk_channels, value_channels)
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_reference(impl, shape, op_device):
    tensors = _inputs(shape, requires_grad=True, device=op_device)
    out = non_local_attention(*tensors, impl=impl)
    expected = non_local_reference(*tensors)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref_grads = torch.autograd.grad(expected, tensors, grad_out)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
def test_gradcheck_fp64(impl, op_device):
    tensors = _inputs((2, 2, 3, 3, 2), requires_grad=True, device=op_device)
    assert torch.autograd.gradcheck(lambda *t: non_local_attention(*t, impl=impl), tensors)


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-2, 5e-3),
                                (torch.bfloat16, 5e-2, 5e-2)], ids=str
)
def test_naive_and_sdpa_agree_in_low_precision(dtype, rtol, atol, op_device):
    tensors = _inputs((2, 8, 16, 9, 7), dtype=dtype, seed=3, device=op_device)
    expected = non_local_attention(*[t.double() for t in tensors], impl="naive")
    scale = float(expected.abs().max())
    for impl in ("naive", "sdpa"):
        out = non_local_attention(*tensors, impl=impl)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol * scale)


def test_non_contiguous_and_channels_last_inputs(op_device):
    tensors = _inputs((2, 3, 4, 5, 6), device=op_device)
    expected = non_local_reference(*tensors)
    for impl in ("naive", "sdpa"):
        channels_last = [t.to(memory_format=torch.channels_last) for t in tensors]
        torch.testing.assert_close(non_local_attention(*channels_last, impl=impl), expected)
        transposed = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in tensors]
        torch.testing.assert_close(non_local_attention(*transposed, impl=impl), expected)


def test_module_naive_and_sdpa_same_result_and_gradients(op_device):
    torch.manual_seed(0)
    naive = NonLocal2d(16, qk_channels=4, impl="naive").double().to(op_device)
    with torch.no_grad():
        naive.gamma.fill_(0.5)
    sdpa = NonLocal2d(16, qk_channels=4, impl="sdpa").double().to(op_device)
    sdpa.load_state_dict(naive.state_dict())
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, device=op_device)
    out_naive, out_sdpa = naive(x), sdpa(x)
    torch.testing.assert_close(out_naive, out_sdpa)
    out_naive.square().sum().backward()
    out_sdpa.square().sum().backward()
    # key_conv.bias: ~0 (exactly 0 in exact arithmetic, the softmax is shift-invariant); every other is non-zero.
    assert_gradients_reach_parameters(naive.named_parameters())
    for (name, p_naive), p_sdpa in zip(naive.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p_naive.grad, p_sdpa.grad, msg=lambda m, n=name: f"{n}: {m}")


def test_module_defaults_and_errors():
    module = NonLocal2d(64)
    assert module.query_conv.out_channels == 8 and module.gamma.item() == 0.0
    with pytest.raises(ValueError, match=r"unknown non-local impl 'flash'.*\('naive', 'sdpa', 'sdpa_heads'\)"):
        NonLocal2d(8, impl="flash")
    with pytest.raises(ValueError, match=r"expects \(B, 8, H, W\)"):
        NonLocal2d(8)(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="rank 4"):
        non_local_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_head_split_non_local_equals_non_local(op_device):
    torch.manual_seed(0)
    naive = NonLocal2d(16, qk_channels=4).to(op_device)
    split = NonLocal2d(16, qk_channels=4, impl="sdpa_heads").to(op_device)
    split.load_state_dict(naive.state_dict())
    with torch.no_grad():
        naive.gamma.fill_(0.7)
        split.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 7, device=op_device)
    torch.testing.assert_close(split(x), naive(x), rtol=1e-5, atol=1e-5)


def test_head_split_non_local_needs_divisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        NonLocal2d(10, qk_channels=4, impl="sdpa_heads")
