"""Tests of models.ccnet: build(), train/eval outputs, every output stride, gradients to every parameter."""

import pytest
import torch

import models
from models.heads import FCNHead, NonLocalHead, RCCAHead
from tests.reference import assert_gradients_reach_parameters

SMALL = dict(depth=50, stem="v1c", head_channels=32, num_classes=5, backend="naive")


def test_eval_returns_logits_at_input_size():
    torch.manual_seed(0)
    model = models.build(**SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 33, 47)


def test_train_returns_logits_and_aux_logits():
    torch.manual_seed(0)
    model = models.build(**SMALL).train()
    logits, aux_logits = model(torch.randn(2, 3, 33, 33))
    assert logits.shape == aux_logits.shape == (2, 5, 33, 33)
    no_aux = models.build(**SMALL, aux=False).train()
    logits, aux_logits = no_aux(torch.randn(2, 3, 33, 33))
    assert logits.shape == (2, 5, 33, 33) and aux_logits is None


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_strides(output_stride):
    torch.manual_seed(0)
    model = models.build(**SMALL, output_stride=output_stride).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 5, 65, 65)
    assert model.backbone.output_stride == output_stride


@pytest.mark.parametrize("head", ["rcca", "nonlocal", "fcn"])
def test_gradient_reaches_every_parameter(head):
    torch.manual_seed(0)
    model = models.build(**SMALL, head=head, recurrence=2).train()
    if head != "fcn":
        model.decode_head.set_gamma(0.5)  # gamma 0 would stop the gradient into q/k/v
    logits, aux_logits = model(torch.randn(2, 3, 33, 33))
    (logits.square().mean() + aux_logits.square().mean()).backward()
    # The attention's key_conv.bias gradient is ~0 (exactly 0 in exact arithmetic); every other is non-zero.
    assert_gradients_reach_parameters(model.named_parameters())


def test_head_choice_and_types():
    assert isinstance(models.build(**SMALL).decode_head, RCCAHead)
    assert isinstance(models.build(**SMALL, head="nonlocal").decode_head, NonLocalHead)
    fcn = models.build(**SMALL, head="fcn").decode_head
    assert isinstance(fcn, FCNHead) and fcn.conv_cat is not None
    model = models.build(**SMALL, recurrence=3, qk_channels=8)
    assert model.decode_head.recurrence == 3 and model.decode_head.attention.qk_channels == 8
    assert model.auxiliary_head.convs[0][0].in_channels == 1024
    assert model.auxiliary_head.convs[0][0].out_channels == 256


def test_frozenbn_freezes_backbone_only():
    model = models.build(**SMALL, norm="frozenbn")
    assert not any(".bn" in n or "stem.1" in n for n, _ in model.backbone.named_parameters())
    assert isinstance(model.decode_head.conv_in[1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"head": "psp"}, "rcca"),
        ({"norm": "ln"}, "frozenbn"),
        ({"depth": 34}, "depth"),
        ({"stem": "v2"}, "stem"),
        ({"output_stride": 12}, "output_stride"),
        ({"backend": "cuda"}, "backend"),
        ({"nonlocal_impl": "flash", "head": "nonlocal"}, "impl"),
    ],
)
def test_build_rejects_unknown_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        models.build(**{**SMALL, **kwargs})


def test_parameter_count_r101_d8():
    model = models.build(depth=101, stem="deep", num_classes=19, recurrence=2)
    # Independent arithmetic: torchvision R-101 without fc (42,500,160), deep stem instead of 7x7
    # (-9,408 conv, -128 bn, +112,832), layer1 taking 128 channels (+4,096 conv1, +16,384 downsample);
    # the head: conv_in 2048->512 3x3 + bn, CCA (q, k 512->64, v 512->512, gamma), conv_out 512->512
    # + bn, bottleneck 2560->512 + bn, classifier 512->19; aux 1024->256 3x3 + bn, classifier 256->19.
    backbone = 42_500_160 - 9_408 - 128 + 112_832 + 4_096 + 16_384
    head = (
        2048 * 512 * 9
        + 1024
        + 2 * (512 * 64 + 64)
        + 512 * 512
        + 512
        + 1
        + 512 * 512 * 9
        + 1024
        + 2560 * 512 * 9
        + 1024
        + 512 * 19
        + 19
    )
    aux = 1024 * 256 * 9 + 512 + 256 * 19 + 19
    assert models.count_parameters(model.backbone) == backbone
    assert models.count_parameters(model) == backbone + head + aux == 68_922_727
    frozen = models.build(depth=50, stem="v1c", norm="frozenbn", num_classes=19)
    assert models.count_parameters(frozen, trainable_only=True) == models.count_parameters(frozen)


def test_channels_last_model_computes_the_same_and_feeds_the_attention_channels_last():
    """channels_last=True: the same weights give the NCHW model's logits (up to the convolutions' rounding), and
    the criss-cross attention receives channels-last query / key / value maps (what the Triton kernel reads as
    contiguous channel vectors)."""
    torch.manual_seed(0)
    reference = models.build(**SMALL).eval()
    torch.manual_seed(0)
    model = models.build(**SMALL, channels_last=True).eval()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    model.load_state_dict(reference.state_dict())
    layouts = []
    attention = model.decode_head.attention
    for conv in (attention.query_conv, attention.key_conv, attention.value_conv):
        conv.register_forward_hook(
            lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    images = torch.randn(2, 3, 33, 41)
    with torch.no_grad():
        expected, got = reference(images), model(images)
    assert layouts and all(layouts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
