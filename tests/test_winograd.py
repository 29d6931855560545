"""models.winograd: F(4x4, 3x3) Winograd convolution equals the direct convolution (float64 reference) for every
shape the tiling has to handle: sizes that are and are not multiples of the 4x4 block, dilations 1-4 (phase
split), batches, channels_last, no bias, chunked tiles, and a workspace reused across shapes (stale borders)."""

import pytest
import torch
import torch.nn.functional as F

from models import winograd
from models.winograd import Workspace, conv3x3, kernel_transform


def _case(batch, channels, out_channels, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) / (9 * channels) ** 0.5
    bias = torch.randn(out_channels, generator=generator)
    return x, weight, bias


def _check(got, x, weight, bias, dilation):
    expected = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=dilation,
                        dilation=dilation)
    assert got.shape == expected.shape and got.dtype == x.dtype
    scale = float(expected.abs().max())
    assert float((got.double() - expected).abs().max()) <= 5e-5 * scale


@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(16, 32), (13, 22), (1, 1), (5, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_equals_the_direct_convolution(dilation, size):
    x, weight, bias = _case(2, 7, 5, *size, seed=dilation)
    _check(conv3x3(x, kernel_transform(weight), bias, dilation=dilation), x, weight, bias, dilation)


def test_layouts_bias_chunks_and_a_shared_workspace(monkeypatch):
    workspace = Workspace()
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # one row of tiles per chunk
    for seed, (size, dilation) in enumerate([((24, 20), 2), ((9, 11), 1), ((30, 17), 3), ((9, 11), 1)]):
        x, weight, bias = _case(1, 6, 3, *size, seed=seed)
        for images in (x, x.contiguous(memory_format=torch.channels_last)):
            for b in (bias, None):
                got = conv3x3(images, kernel_transform(weight), b, dilation=dilation, workspace=workspace)
                _check(got, x, weight, b, dilation)
                assert got.is_contiguous(memory_format=torch.channels_last) == (images is not x)
    assert workspace.nbytes() > 0


def test_bad_arguments():
    x, weight, _ = _case(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        conv3x3(x[:, :3], kernel_transform(weight))
    with pytest.raises(ValueError, match="dilation"):
        conv3x3(x, kernel_transform(weight), dilation=0)
    with pytest.raises(ValueError, match=r"\(O, C, 3, 3\)"):
        kernel_transform(torch.zeros(2, 4, 1, 1))
