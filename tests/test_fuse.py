"""models.fuse: BatchNorm folded into the convolutions gives the same predictions (eval mode, random norm
statistics), for every convolution kind the models use: the deep and plain stems, strided and dilated 3x3,
1x1 and the downsample projections, and the heads' conv-norm-activation blocks (criss-cross, both non-local
blocks, FCN); and the large 3x3 convolutions on Winograd F(4x4, 3x3) give the direct kernel's outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import fuse
from models.fuse import (
    NORMS,
    WinogradConv2d,
    conv_norm_pairs,
    count_norms,
    fold_batchnorm,
    inference_model,
    use_winograd,
    winograd_eligible,
)
from models.resnet import FrozenBatchNorm2d


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NORMS):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.3, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)


def _model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(depth=50, num_classes=5, backend="naive", head_channels=16, aux_channels=8,
                   pretrained_backbone=None)
    model = models.build(**{**options, **kwargs})
    _randomise_norms(model)
    return model.eval()


def _assert_same_predictions(model: nn.Module, folded: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = model(images), folded(images)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)
    assert (got.argmax(1) == expected.argmax(1)).double().mean() >= 0.999


@pytest.mark.parametrize("kwargs", [
    dict(head="rcca", stem="deep", output_stride=8),  # dilated layer3/4, deep stem
    dict(head="rcca", stem="v1", output_stride=16, norm="frozenbn"),  # frozen backbone norms, 7x7 stem
    dict(head="nonlocal", nonlocal_block="paper"),
    dict(head="nonlocal", nonlocal_block="mmseg"),
    dict(head="fcn"),
], ids=lambda kwargs: "-".join(str(v) for v in kwargs.values()))
def test_folding_keeps_the_predictions(kwargs):
    model = _model(**kwargs)
    images = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model, images[:1, :, :33, :33])
    _assert_same_predictions(model, folded, images)
    # The original is untouched (a pure function) and still trains.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    # Every norm the eval forward runs is folded: what is left is the auxiliary head's (not run in eval).
    left = [name for name, module in folded.named_modules() if isinstance(module, NORMS)]
    assert all(name.startswith("auxiliary_head.") for name in left), left
    assert count_norms(folded) < count_norms(model)


def test_every_conv_kind_is_paired():
    model = _model(head="rcca", stem="deep", output_stride=8)
    pairs = dict(conv_norm_pairs(model, torch.randn(1, 3, 33, 33)))
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    dilated = [name for name in pairs if convs[name].dilation != (1, 1)]
    strided = [name for name in pairs if convs[name].stride != (1, 1)]
    one_by_one = [name for name in pairs if convs[name].kernel_size == (1, 1)]
    assert dilated and strided and one_by_one
    assert any(name.startswith("decode_head.") for name in pairs)
    assert any("downsample" in name for name in pairs)


def test_inference_model_is_eval_only_and_channels_last_on_request():
    model = _model(head="rcca")
    images = torch.randn(1, 3, 41, 37)
    folded = inference_model(model, images)
    assert not folded.channels_last and folded.backbone.stem[0].weight.is_contiguous()
    _assert_same_predictions(model, folded, images)
    fast = inference_model(model, images, channels_last=True)
    _assert_same_predictions(model, fast, images)
    assert fast.channels_last
    assert fast.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(parameter.requires_grad for parameter in fast.parameters())
    fast.eval()  # allowed
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


class _SharedOutput(nn.Module):
    """A conv whose output is read by a norm and by a second module: folding it would change the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.other = nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.norm2 = FrozenBatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.conv2(self.norm(y) + self.other(y))

    def forward_tail(self, x):
        return self.norm2(self.conv2(x))


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = _SharedOutput()

    def forward(self, x):
        return self.shared.norm2(self.shared(x))


def test_a_conv_read_twice_keeps_its_norm_and_conv_bias_is_folded():
    model = _Chain()
    _randomise_norms(model, seed=3)
    model.eval()
    images = torch.randn(2, 3, 9, 11)
    pairs = conv_norm_pairs(model, images)
    assert pairs == [("shared.conv2", "shared.norm2")]  # shared.conv's output is also read by shared.other
    folded = fold_batchnorm(model, images)
    assert isinstance(folded.shared.norm, nn.BatchNorm2d) and isinstance(folded.shared.norm2, nn.Identity)
    assert folded.shared.conv2.bias is not None  # a bias-free conv gains the folded shift
    _assert_same_predictions(model, folded, images)


def test_fold_rejects_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm("model", torch.zeros(1))


def test_winograd_eligibility():
    for conv in (nn.Conv2d(512, 8, 3, padding=1), nn.Conv2d(512, 8, 3, padding=2, dilation=2),
                 nn.Conv2d(512, 8, 3, padding=4, dilation=4, bias=False)):
        assert winograd_eligible(conv), conv
    for conv in (nn.Conv2d(511, 8, 3, padding=1), nn.Conv2d(512, 8, 3, padding=1, stride=2),
                 nn.Conv2d(512, 8, 3, padding=1, dilation=2), nn.Conv2d(512, 8, 3, padding=(2, 4), dilation=(2, 4)),
                 nn.Conv2d(512, 8, 1), nn.Conv2d(512, 8, 3, padding=0),
                 nn.Conv2d(512, 8, 3, padding=1, groups=2), nn.Conv2d(512, 8, 3, padding="same"),
                 nn.Conv2d(512, 8, 3, padding=1, padding_mode="reflect")):
        assert not winograd_eligible(conv), conv


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_winograd_convs_keep_the_outputs_and_the_layout(memory_format, monkeypatch):
    monkeypatch.setattr(fuse, "WINOGRAD_MIN_PHASE_SIDE", 1)  # these maps are small, to keep the test fast
    # The eligible 3x3 convolutions (bias and no bias, dilated or not) are replaced, the others are kept; outputs
    # match the direct kernel up to the transforms' rounding, in the input's layout, with the same state-dict keys.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(512, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1),
                          nn.Conv2d(8, 512, 1), nn.Conv2d(512, 520, 3, padding=1, bias=False),
                          nn.Conv2d(520, 4, 3, padding=2, dilation=2)).eval()
    reference = copy.deepcopy(model)
    model.to(memory_format=memory_format)
    assert use_winograd(model) == 3
    assert [type(m).__name__ for m in model] == ["WinogradConv2d", "ReLU", "Conv2d", "Conv2d", "WinogradConv2d",
                                                 "WinogradConv2d"]
    assert model[0].workspace is model[4].workspace is model[5].workspace  # one scratch memory per model
    assert model.state_dict().keys() == reference.state_dict().keys()
    images = torch.randn(2, 512, 9, 13).contiguous(memory_format=memory_format)
    with torch.no_grad():
        got, expected = model(images), reference(images)
    assert got.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # An input that needs gradients takes nn.Conv2d's path too (the Winograd one writes into scratch memory).
    leaf = images.clone().requires_grad_(True)
    model(leaf).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == images.shape
    with torch.no_grad():  # a non-float32 input takes nn.Conv2d's path, the same function
        torch.testing.assert_close(model.double()(images.double()), reference.double()(images.double()))


def test_winograd_conv_follows_weight_changes_and_copies(monkeypatch):
    monkeypatch.setattr(fuse, "WINOGRAD_MIN_PHASE_SIDE", 1)
    # The transformed kernel is recomputed when the weight changes (load_state_dict), and a deep copy gets its own
    # workspace, still shared among its convolutions.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(512, 6, 3, padding=1), nn.Conv2d(6, 512, 1), nn.Conv2d(512, 5, 3, padding=1))
    model.eval()
    use_winograd(model)
    other = nn.Sequential(nn.Conv2d(512, 6, 3, padding=1), nn.Conv2d(6, 512, 1), nn.Conv2d(512, 5, 3, padding=1))
    images = torch.randn(1, 512, 7, 10)
    with torch.no_grad():
        model(images)  # the old kernel is transformed and used once
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(images), other(images), rtol=1e-4, atol=1e-4)
    twin = copy.deepcopy(model)
    assert twin[0].workspace is twin[2].workspace and twin[0].workspace is not model[0].workspace
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model(images))


def test_no_winograd_when_turned_off_or_unavailable(monkeypatch):
    model = nn.Sequential(nn.Conv2d(512, 4, 3, padding=1)).eval()
    images = torch.randn(1, 512, 5, 6)
    assert not any(isinstance(m, WinogradConv2d) for m in inference_model(model, images, winograd=False).modules())
    monkeypatch.setattr(fuse, "winograd_available", lambda: False)
    assert use_winograd(model) == 0 and type(model[0]) is nn.Conv2d


def test_winograd_runs_only_on_maps_large_enough_per_dilation_phase(monkeypatch):
    # Below WINOGRAD_MIN_PHASE_SIDE pixels per phase (ceil(H / d) x ceil(W / d)) the direct kernel runs: a sliding
    # window of a few feature pixels would pay the tiles' padding and transforms for nothing.
    calls = []
    real = fuse.winograd_conv3x3

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fuse, "winograd_conv3x3", counting)
    model = nn.Sequential(nn.Conv2d(512, 4, 3, padding=2, dilation=2)).eval()
    use_winograd(model)
    side = fuse.WINOGRAD_MIN_PHASE_SIDE
    with torch.no_grad():
        small = torch.randn(1, 512, 2 * side - 2, 40)  # 15 px per phase in height
        torch.testing.assert_close(model(small), F.conv2d(small, model[0].weight, model[0].bias, padding=2,
                                                          dilation=2), rtol=1e-4, atol=1e-4)
        assert calls == []
        model(torch.randn(1, 512, 2 * side, 2 * side))
    assert len(calls) == 1


def test_residual_blocks_accumulate_in_place_without_touching_what_others_read():
    # Every folded Bottleneck becomes a ResidualBottleneck (same keys); only the blocks fed by the block before
    # them may overwrite their input, so the images and every layer output the backbone returns are intact.
    model = _model(head="rcca", stem="v1c", output_stride=8)
    images = torch.randn(2, 3, 47, 38, generator=torch.Generator().manual_seed(4))
    plain = inference_model(model, images[:1], residuals=False)
    fused = inference_model(model, images[:1])
    blocks = [m for m in fused.modules() if isinstance(m, fuse.ResidualBottleneck)]
    assert len(blocks) == 16 and fused.state_dict().keys() == plain.state_dict().keys()
    first = {id(layer[0]) for layer in (fused.backbone.layer1, fused.backbone.layer2, fused.backbone.layer3,
                                        fused.backbone.layer4)}
    assert all(block.overwrite_input == (id(block) not in first) for block in blocks)
    kept = images.clone()
    with torch.no_grad():
        expected, got = plain.backbone(images), fused.backbone(images)
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
        assert torch.equal(images, kept)
        block = fused.backbone.layer1[1]  # a block that may overwrite: its input is written, the result is right
        features = got[0].clone()
        reference = plain.backbone.layer1[1](features.clone())
        result = block(features)
        assert result.data_ptr() == features.data_ptr()
        torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
        block.overwrite_input = False  # then it does not
        features = got[0].clone()
        assert block(features).data_ptr() != features.data_ptr() and torch.equal(features, got[0])
    _assert_same_predictions(model, fused, images)
