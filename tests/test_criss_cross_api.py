"""The public criss-cross API: backend dispatch, input validation, and the CrissCrossAttention module, on the
operator tests' device (`op_device`: CUDA when present, else the CPU)."""

import os
import subprocess
import sys

import pytest
import torch

import ops
from ops import CrissCrossAttention, criss_cross_attention, resolve_backend
from tests.reference import assert_gradients_reach_parameters, criss_cross_reference


def _qkv(batch=2, qk_channels=3, value_channels=4, height=5, width=6, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(batch, qk_channels, height, width, dtype=dtype, device=device),
        torch.randn(batch, qk_channels, height, width, dtype=dtype, device=device),
        torch.randn(batch, value_channels, height, width, dtype=dtype, device=device),
    )


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"'cuda_kernel'.*\('auto', 'naive', 'triton', 'export'\)"):
        criss_cross_attention(*_qkv(), backend="cuda_kernel")
    with pytest.raises(ValueError, match="'fast'"):
        CrissCrossAttention(8, backend="fast")


def test_auto_picks_naive_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "naive"
    assert resolve_backend("naive", torch.device("cpu")) == "naive"


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"query must have rank 4.*got rank 3"),
        (lambda q, k, v: (q, k, v.unsqueeze(0)), ValueError, r"value must have rank 4.*rank 5"),
        (lambda q, k, v: (q, k[:, :2], v), ValueError, r"query and key must have the same shape"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"value must be \(B, Cv, H, W\) with B, H, W = 2, 5, 6"),
        (lambda q, k, v: (q, k, v[:1]), ValueError, r"value must be \(B, Cv, H, W\)"),
        (lambda q, k, v: (q[:, :, :, :5], k[:, :, :, :5], v), ValueError, r"with B, H, W = 2, 5, 5"),
        (lambda q, k, v: (q, k, v.double()), TypeError, r"share one dtype.*float32.*float64"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, r"floating-point.*torch.int64"),
        (lambda q, k, v: (q, k.numpy(), v), TypeError, r"key must be a torch.Tensor, got ndarray"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, r"one device.*cpu.*meta"),
        (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, r"empty inputs"),
    ],
)
@pytest.mark.parametrize("backend", ["naive", "auto"])
def test_bad_inputs_raise_clear_errors(change, error, pattern, backend, op_device):
    if op_device.type != "cpu":
        pattern = pattern.replace("cpu", op_device.type)
    with pytest.raises(error, match=pattern):
        criss_cross_attention(*change(*_qkv(device=op_device)), backend=backend)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    # In a fresh interpreter with TRITON_INTERPRET unset, CPU tensors cannot run the Triton kernels.
    code = (
        "import torch, ops\n"
        "q = torch.randn(1, 2, 3, 3)\n"
        "try:\n"
        "    ops.criss_cross_attention(q, q, q, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print('ERROR', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "ERROR backend='triton' needs a CUDA tensor" in result.stdout, result.stderr


def test_importing_ops_does_not_import_triton():
    code = "import sys, ops; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.strip() == "False", result.stderr


def test_module_structure_and_init():
    module = CrissCrossAttention(64)
    assert module.query_conv.out_channels == module.key_conv.out_channels == 8
    assert module.value_conv.out_channels == 64
    assert module.gamma.shape == (1,) and module.gamma.item() == 0.0
    assert CrissCrossAttention(64, qk_channels=5).key_conv.out_channels == 5
    assert "qk_channels=8" in repr(module)
    # gamma = 0: the block starts as the identity.
    x = torch.randn(2, 64, 4, 5)
    torch.testing.assert_close(module(x), x)


def test_module_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expects \(B, 16, H, W\), got \(2, 8, 4, 4\)"):
        CrissCrossAttention(16)(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        CrissCrossAttention(0)


def test_module_forward_and_all_parameter_gradients(op_device):
    torch.manual_seed(0)
    module = CrissCrossAttention(16, qk_channels=4, backend="naive").double().to(op_device)
    with torch.no_grad():
        module.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, device=op_device, requires_grad=True)

    def reference(inp):
        attn = criss_cross_reference(module.query_conv(inp), module.key_conv(inp), module.value_conv(inp))
        return module.gamma * attn + inp

    out = module(x)
    torch.testing.assert_close(out, reference(x))
    grad_out = torch.randn_like(out)
    params = [x, *module.parameters()]
    grads = torch.autograd.grad(out, params, grad_out)
    ref_grads = torch.autograd.grad(reference(x), params, grad_out)
    names = ["x"] + [name for name, _ in module.named_parameters()]
    assert set(names) == {"x", "gamma", "query_conv.weight", "query_conv.bias", "key_conv.weight",
                          "key_conv.bias", "value_conv.weight", "value_conv.bias"}
    for name, grad, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(grad, ref, msg=lambda m, n=name: f"{n}: {m}")
    for parameter, grad in zip(module.parameters(), grads[1:]):
        parameter.grad = grad
    # key_conv.bias: ~0 (exactly 0 in exact arithmetic, the softmax is shift-invariant); every other is non-zero.
    assert_gradients_reach_parameters(module.named_parameters())
    assert grads[0].abs().sum() > 0


def test_module_gradcheck_with_nonzero_gamma(op_device):
    torch.manual_seed(1)
    module = CrissCrossAttention(8, qk_channels=2, backend="naive").double().to(op_device)
    with torch.no_grad():
        module.gamma.fill_(1.3)
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, device=op_device, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


def test_public_names_are_the_documented_objects():
    """Every name of `ops.__all__` exists and is the object of the module that defines it."""
    from ops import cca_maps, cost, criss_cross, non_local

    expected = {
        "BACKENDS": criss_cross.BACKENDS, "CrissCrossAttention": criss_cross.CrissCrossAttention,
        "criss_cross_attention": criss_cross.criss_cross_attention, "resolve_backend": criss_cross.resolve_backend,
        "NonLocal2d": non_local.NonLocal2d, "non_local_attention": non_local.non_local_attention, "cost": cost,
        "criss_cross_map": cca_maps.criss_cross_map, "criss_cross_probabilities": cca_maps.criss_cross_probabilities,
        "point_attention": cca_maps.point_attention, "off_cross_share": cca_maps.off_cross_share,
    }
    assert set(ops.__all__) == set(expected)
    for name, obj in expected.items():
        assert getattr(ops, name) is obj, name
    assert callable(ops.criss_cross_attention) and isinstance(ops.CrissCrossAttention(8), torch.nn.Module)
    assert ops.BACKENDS == ("auto", "naive", "triton", "export")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_output_keeps_the_input_layout(memory_format, op_device):
    # The naive op returns channels_last memory; the block's residual output is laid out like its input, so an
    # NCHW model's next convolution and concatenation see one layout (mixed layouts are slow on the CPU).
    module = CrissCrossAttention(8, qk_channels=2, backend="naive").to(op_device)
    with torch.no_grad():
        module.gamma.fill_(0.5)
    x = torch.randn(2, 8, 5, 6, device=op_device).contiguous(memory_format=memory_format)
    out = module(x)
    assert out.is_contiguous(memory_format=memory_format)
