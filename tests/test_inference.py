"""Tests of models.inference: whole, sliding window, multi-scale + flip."""

import pytest
import torch
from torch import nn

import models
from models.inference import predict_multiscale, predict_slide, predict_whole, window_starts


class Pointwise(nn.Module):
    """A 1x1 conv: every output pixel depends on its input pixel only, so any tiling must reproduce the whole
    image exactly, and mirroring commutes with it."""

    def __init__(self, num_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, kernel_size=1)

    def forward(self, images):
        return self.conv(images)


def _small_ccnet():
    torch.manual_seed(0)
    model = models.build(depth=50, stem="v1c", head_channels=32, num_classes=5, backend="naive")
    model.decode_head.set_gamma(0.5)
    return model


def test_window_starts():
    assert window_starts(769, 769, 513) == [0]
    assert window_starts(500, 769, 513) == [0]
    assert window_starts(1024, 769, 513) == [0, 255]
    assert window_starts(2048, 769, 513) == [0, 513, 1026, 1279]


def test_whole_equals_eval_forward_and_restores_mode():
    model = _small_ccnet().train()
    images = torch.randn(1, 3, 33, 41)
    out = predict_whole(model, images)
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(images))


def test_slide_equals_whole_when_the_window_covers_the_image():
    model = _small_ccnet()
    images = torch.randn(1, 3, 33, 41)
    whole = predict_whole(model, images)
    torch.testing.assert_close(
        predict_slide(model, images, crop=(33, 41), stride=(20, 20), num_classes=5), whole
    )
    torch.testing.assert_close(predict_slide(model, images, crop=64, stride=32, num_classes=5), whole)


def test_slide_tiles_a_pointwise_model_exactly():
    model = Pointwise()
    images = torch.randn(2, 3, 37, 50)
    torch.testing.assert_close(
        predict_slide(model, images, crop=(16, 20), stride=(11, 13), num_classes=4),
        predict_whole(model, images),
    )


def test_slide_on_ccnet_with_small_windows_has_input_size():
    model = _small_ccnet()
    out = predict_slide(model, torch.randn(1, 3, 49, 65), crop=33, stride=24, num_classes=5)
    assert out.shape == (1, 5, 49, 65) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="num_classes"):
        predict_slide(model, torch.randn(1, 3, 33, 33), crop=33, stride=33, num_classes=7)
    with pytest.raises(ValueError, match="gaps"):
        predict_slide(model, torch.randn(1, 3, 33, 33), crop=16, stride=17, num_classes=5)


def test_multiscale_single_scale_is_softmax_of_whole():
    model = _small_ccnet()
    images = torch.randn(1, 3, 33, 33)
    probs = predict_multiscale(model, images, scales=(1.0,), flip=False)
    torch.testing.assert_close(probs, torch.softmax(predict_whole(model, images), dim=1))
    logits = predict_multiscale(model, images, scales=(1.0,), flip=False, average="logits")
    torch.testing.assert_close(logits, predict_whole(model, images))


def test_multiscale_flip_averages_mirrored_predictions():
    model = _small_ccnet()
    images = torch.randn(1, 3, 33, 33)
    both = predict_multiscale(model, images, scales=(1.0,), flip=True, average="logits")
    mirrored = predict_whole(model, images.flip(-1)).flip(-1)
    torch.testing.assert_close(both, (predict_whole(model, images) + mirrored) / 2)
    # A pointwise model commutes with mirroring, so flip changes nothing.
    pointwise = Pointwise()
    torch.testing.assert_close(
        predict_multiscale(pointwise, images, scales=(1.0,), flip=True),
        torch.softmax(predict_whole(pointwise, images), dim=1),
    )


def test_multiscale_all_scales_and_slide_mode():
    model = _small_ccnet()
    images = torch.randn(1, 3, 33, 37)
    probs = predict_multiscale(model, images, scales=(0.75, 1.0, 1.25), flip=True)
    assert probs.shape == (1, 5, 33, 37)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 33, 37))
    slide = predict_multiscale(
        model, images, scales=(1.0,), flip=False, mode="slide", crop=64, stride=32, num_classes=5
    )
    torch.testing.assert_close(slide, torch.softmax(predict_whole(model, images), dim=1))
    with pytest.raises(ValueError, match="mode"):
        predict_multiscale(model, images, mode="tiles")
    with pytest.raises(ValueError, match="num_classes"):
        predict_multiscale(model, images, mode="slide")
    with pytest.raises(ValueError, match="scales"):
        predict_multiscale(model, images, scales=())
