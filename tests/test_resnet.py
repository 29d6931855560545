"""Tests of models.resnet: shapes at every output stride, stems, dilations, norms, parameter counts."""

import math

import pytest
import torch
from torch import nn

from models.resnet import FrozenBatchNorm2d, ResNet, strides_and_dilations

# Published torchvision ImageNet parameter counts minus the 2048x1000 classifier (2,049,000): the v1-stem
# backbone must match them exactly.
TORCHVISION_PARAMS = {50: 25_557_032 - 2_049_000, 101: 44_549_160 - 2_049_000}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("stem", ["v1", "v1c", "deep"])
def test_feature_shapes_at_every_output_stride(output_stride, stem):
    torch.manual_seed(0)
    backbone = ResNet(depth=50, stem=stem, output_stride=output_stride).eval()
    size = 65
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, size, size))
    strides = (4, 8, min(16, output_stride), output_stride)
    for feature, channels, stride in zip(features, (256, 512, 1024, 2048), strides, strict=True):
        assert feature.shape == (1, channels, math.ceil(size / stride), math.ceil(size / stride))


def test_dilations_follow_output_stride_and_contraction():
    assert strides_and_dilations(8) == ((1, 2, 1, 1), (1, 1, 2, 4))
    contracted = ResNet(depth=50, stem="v1c", output_stride=8, contract_dilation=True)
    plain = ResNet(depth=50, stem="v1c", output_stride=8, contract_dilation=False)
    assert [b.conv2.dilation[0] for b in contracted.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in contracted.layer4] == [2, 4, 4]
    assert [b.conv2.dilation[0] for b in plain.layer3] == [2] * 6
    assert [b.conv2.dilation[0] for b in plain.layer4] == [4, 4, 4]
    os16 = ResNet(depth=50, stem="v1c", output_stride=16)
    assert os16.layer3[0].conv2.stride == (2, 2) and os16.layer4[0].conv2.stride == (1, 1)
    assert [b.conv2.dilation[0] for b in os16.layer4] == [1, 2, 2]


def test_stems():
    assert ResNet(depth=50, stem="v1").stem[0].kernel_size == (7, 7)
    v1c = ResNet(depth=50, stem="v1c")
    deep = ResNet(depth=50, stem="deep")
    assert [v1c.stem[i].out_channels for i in (0, 3, 6)] == [32, 32, 64]
    assert [deep.stem[i].out_channels for i in (0, 3, 6)] == [64, 64, 128]
    assert deep.layer1[0].conv1.in_channels == 128


@pytest.mark.parametrize("depth", [50, 101])
def test_v1_parameter_count_matches_torchvision(depth):
    assert _count(ResNet(depth=depth, stem="v1")) == TORCHVISION_PARAMS[depth]


def test_pool_ceil_mode_changes_even_sizes():
    x = torch.randn(1, 3, 64, 64)
    floor_model = ResNet(depth=50, stem="deep", pool_ceil_mode=False).eval()
    ceil_model = ResNet(depth=50, stem="deep", pool_ceil_mode=True).eval()
    with torch.no_grad():
        assert floor_model(x)[0].shape[-1] == 16
        assert ceil_model(x)[0].shape[-1] == 17


def test_frozen_batchnorm_matches_eval_batchnorm_and_never_updates():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 6, 5, 5)
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x))
    backbone = ResNet(depth=50, stem="v1c", norm="frozenbn").train()
    before = backbone.layer1[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 33, 33))
    assert torch.equal(backbone.layer1[0].bn1.running_mean, before)
    assert not any("bn" in name for name, _ in backbone.named_parameters())


def test_syncbn_builds_and_runs_on_cpu():
    backbone = ResNet(depth=50, stem="v1c", norm="syncbn")
    assert isinstance(backbone.layer1[0].bn1, nn.SyncBatchNorm)
    assert backbone(torch.randn(2, 3, 33, 33))[-1].shape == (2, 2048, 5, 5)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"depth": 152}, "depth"),
        ({"stem": "v1d"}, "stem"),
        ({"output_stride": 4}, "output_stride"),
        ({"norm": "gn"}, "norm"),
    ],
)
def test_bad_arguments_name_the_choices(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ResNet(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ResNet(depth=50, stem="v1c")(torch.randn(1, 4, 33, 33))
