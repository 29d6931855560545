"""Tests of models.heads: shapes, recurrence 0..3 with shared weights, attention hooks and gamma, backends."""

import pytest
import torch
from torch import nn

import ops
from models.heads import FCNHead, NonLocalHead, RCCAHead
from tests.reference import assert_gradients_reach_parameters


def _x(channels=16, size=9, batch=2, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, channels, size, size + 2)


@pytest.mark.parametrize("recurrence", [0, 1, 2, 3])
def test_rcca_head_shapes_and_attention_calls(recurrence):
    torch.manual_seed(0)
    head = RCCAHead(16, channels=8, num_classes=5, recurrence=recurrence, backend="naive").eval()
    calls = []
    if recurrence:
        head.attention.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
        head.set_gamma(0.5)
    out = head(_x())
    assert out.shape == (2, 5, 9, 11)
    assert len(calls) == recurrence
    if recurrence == 0:
        assert head.attention is None
        assert not any("attention" in name for name, _ in head.named_parameters())


def test_recurrence_shares_weights_and_changes_output():
    torch.manual_seed(0)
    heads = {
        r: RCCAHead(16, channels=8, num_classes=5, recurrence=r, backend="naive").eval() for r in (1, 2, 3)
    }
    counts = {r: sum(p.numel() for p in h.parameters()) for r, h in heads.items()}
    assert counts[1] == counts[2] == counts[3]
    state = heads[1].state_dict()
    state["attention.gamma"] = torch.tensor([0.7])
    outputs = {}
    for r, head in heads.items():
        head.load_state_dict(state)
        with torch.no_grad():
            outputs[r] = head(_x())
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-5)
    assert not torch.allclose(outputs[2], outputs[3], atol=1e-5)


def test_gamma_zero_attention_is_identity():
    torch.manual_seed(0)
    with_attention = RCCAHead(16, channels=8, num_classes=5, recurrence=2, backend="naive").eval()
    baseline = RCCAHead(16, channels=8, num_classes=5, recurrence=0).eval()
    baseline.load_state_dict({k: v for k, v in with_attention.state_dict().items() if "attention" not in k})
    with torch.no_grad():
        torch.testing.assert_close(with_attention(_x()), baseline(_x()))


def test_backend_reaches_the_attention_module():
    for backend in ops.BACKENDS:
        head = RCCAHead(16, channels=8, num_classes=5, backend=backend)
        assert isinstance(head.attention, ops.CrissCrossAttention)
        assert head.attention.backend == backend
    with pytest.raises(ValueError, match="backend"):
        RCCAHead(16, channels=8, num_classes=5, backend="cuda")


@pytest.mark.parametrize("backend", ["naive", "triton", "auto"])
def test_head_runs_the_backend_it_resolves_to(backend, op_device, monkeypatch):
    """Each recurrence calls the implementation `resolve_backend` picks for the device (auto: naive on CPU, and
    on CUDA until a benchmark proves Triton faster), and the Triton head matches the naive one."""
    from ops import criss_cross

    calls = []
    naive_fn, triton_fn = criss_cross.criss_cross_attention_naive, criss_cross._triton
    monkeypatch.setattr(criss_cross, "criss_cross_attention_naive",
                        lambda *t: calls.append("naive") or naive_fn(*t))
    monkeypatch.setattr(criss_cross, "_triton", lambda *t: calls.append("triton") or triton_fn(*t))
    reference = RCCAHead(16, channels=8, num_classes=5, recurrence=2, backend="naive").eval()
    reference.set_gamma(1.0)
    head = RCCAHead(16, channels=8, num_classes=5, recurrence=2, backend=backend).eval()
    head.load_state_dict(reference.state_dict())
    reference, head = reference.to(op_device), head.to(op_device)
    x = _x().to(op_device)
    with torch.no_grad():
        expected = reference(x)
        calls.clear()
        out = head(x)
    assert calls == [ops.resolve_backend(backend, op_device, x.dtype)] * 2
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_qk_channels_and_leaky_relu():
    head = RCCAHead(16, channels=16, num_classes=3, qk_channels=4, act="leaky_relu")
    assert head.attention.query_conv.out_channels == 4
    assert isinstance(head.conv_in[2], nn.LeakyReLU)
    with pytest.raises(ValueError, match="activation"):
        RCCAHead(16, channels=8, num_classes=3, act="gelu")


def test_nonlocal_head():
    torch.manual_seed(0)
    head = NonLocalHead(16, channels=8, num_classes=5, impl="naive").eval()
    assert isinstance(head.attention, ops.NonLocal2d)
    head.set_gamma(0.5)
    assert head.attention.gamma.item() == 0.5
    sdpa = NonLocalHead(16, channels=8, num_classes=5, impl="sdpa").eval()
    sdpa.load_state_dict(head.state_dict())
    with torch.no_grad():
        out = head(_x())
        torch.testing.assert_close(out, sdpa(_x()), rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 5, 9, 11)


def test_fcn_head_variants():
    x = _x()
    aux = FCNHead(16, channels=8, num_classes=4, num_convs=1).eval()
    assert aux(x).shape == (2, 4, 9, 11) and aux.conv_cat is None and len(aux.convs) == 1
    fcn = FCNHead(16, channels=8, num_classes=4, num_convs=2, concat_input=True).eval()
    assert fcn(x).shape == (2, 4, 9, 11) and fcn.conv_cat[0].in_channels == 24 and len(fcn.convs) == 2


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"recurrence": -1}, "recurrence"), ({"channels": 0}, "channels"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_head_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RCCAHead(16, **{"channels": 8, "num_classes": 3, **kwargs})


def test_wrong_input_channels_and_gamma_without_attention():
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        RCCAHead(16, channels=8, num_classes=3)(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="recurrence=0"):
        RCCAHead(16, channels=8, num_classes=3, recurrence=0).set_gamma(1.0)


@pytest.mark.parametrize("recurrence", [0, 1, 2, 3])
def test_gradient_reaches_every_head_parameter(recurrence):
    torch.manual_seed(0)
    head = RCCAHead(16, channels=8, num_classes=5, recurrence=recurrence, backend="naive").train()
    if recurrence:
        head.set_gamma(0.5)
    x = _x().requires_grad_()
    head(x).square().mean().backward()
    assert x.grad.abs().sum() > 0
    # attention.key_conv.bias: ~0 (exactly 0 in exact arithmetic, the softmax is shift-invariant); the rest not.
    assert_gradients_reach_parameters(head.named_parameters())


def test_mmseg_nonlocal_block_matches_the_embedded_gaussian_formula():
    """NLHead's block (mmcv NonLocal2d, embedded_gaussian, use_scale): x + BN(W_out softmax(theta^T phi / sqrt(Ci)) g),
    checked against the formula written out with einsum in float64."""
    from models.heads import EmbeddedGaussianNonLocal

    torch.manual_seed(0)
    block = EmbeddedGaussianNonLocal(12, inter_channels=6).double().eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
        block.conv_out[1].running_mean.normal_(0.0, 0.1)
        block.conv_out[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    theta, phi, g = block.theta(x).flatten(2), block.phi(x).flatten(2), block.g(x).flatten(2)
    weights = torch.softmax(torch.einsum("bcp,bcq->bpq", theta, phi) / 6**0.5, dim=-1)
    context = torch.einsum("bpq,bcq->bcp", weights, g).reshape(2, 6, 5, 7)
    expected = x + block.conv_out(context)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    fresh = EmbeddedGaussianNonLocal(12, inter_channels=6)
    torch.testing.assert_close(fresh(x.float()), x.float())  # zero-initialised output norm: identity at start


def test_mmseg_nonlocal_head_round_trips_through_the_mmseg_layout():
    import models
    from models.checkpoints import export_state_dict, load_checkpoint

    kwargs = dict(depth=50, stem="v1c", head="nonlocal", nonlocal_block="mmseg", num_classes=5, head_channels=32,
                  qk_channels=16, aux_channels=8)
    original = models.build(**kwargs)
    with torch.no_grad():
        for param in original.decode_head.attention.parameters():
            param.normal_()
    exported = export_state_dict(original, source="mmseg")
    assert {"decode_head.nl_block.theta.conv.weight", "decode_head.nl_block.g.conv.bias",
            "decode_head.nl_block.conv_out.conv.weight", "decode_head.nl_block.conv_out.bn.weight"} <= set(exported)
    copy = models.build(**kwargs)
    report = load_checkpoint(copy, exported, source="mmseg")
    assert not report.missing and not report.unexpected
    for key, value in original.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[key], value)
