"""Each source's evaluation protocol (EvalConfig fields) against small independent references: window placement
and padding, multi-scale view sizes, averaging, the final resize's align_corners, validation padding, the
zero-union rule, the training pad fill, the results-CSV summary, and --eval-only with only a validation split."""

import math
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

import models
from models.inference import predict_slide, resize_view, scaled_size, window_starts
from repro.engine.config import EvalConfig, load_config, model_kwargs, with_overrides
from repro.engine.data import write_fake_dataset
from repro.engine.data.transforms import EvalTransform, TrainTransform, normalise
from repro.engine.evaluate import predict_logits, protocol_summary
from repro.engine.metrics import mean_iou
from repro.engine.runner import main
from tests.configs import EXPERIMENTS

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


class GlobalContext(nn.Module):
    """Logits = a 1x1 conv of each pixel plus the image mean: zero padding changes every output, so a
    padded window and an unpadded one give different logits."""

    def __init__(self, num_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, kernel_size=1)
        self.shapes = []

    def forward(self, images):
        self.shapes.append(tuple(images.shape[-2:]))
        return self.conv(images) + images.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


class Strided(nn.Module):
    """Logits at a quarter of the input (like a decoder at output stride 4); `logits_at` resizes them once."""

    def __init__(self, num_classes=4, align_corners=False):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_classes, kernel_size=3, padding=1)
        self.align_corners = align_corners

    def decoder(self, images):
        return self.conv(F.avg_pool2d(images, 4, ceil_mode=True))

    def logits_at(self, images, size):
        return F.interpolate(self.decoder(images), size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, images):
        return self.logits_at(images, tuple(images.shape[-2:]))


def _cfg(name, **overrides):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    return with_overrides(cfg, overrides) if overrides else cfg


# --- window placement and padding ---------------------------------------------------------------------------


def official_tiles(length, tile, stride):
    """speedinghzl/CCNet evaluate.py predict_sliding, one axis: int(ceil((L - tile) / stride) + 1) tiles at
    i * stride, moved back to end at the border."""
    starts = []
    for i in range(int(math.ceil((length - tile) / stride) + 1)):
        end = min(i * stride + tile, length)
        starts.append(max(end - tile, 0))
    return starts


@pytest.mark.parametrize("length", [769, 770, 1025, 1281, 2049, 1537])
def test_window_starts_match_the_official_and_mmseg_formulas(length):
    assert window_starts(length, 769, 513) == official_tiles(length, 769, 513)
    # mmseg 0.30.0 encoder_decoder.py slide_inference: h_grids = max(h - crop + stride - 1, 0) // stride + 1.
    grids = max(length - 769 + 513 - 1, 0) // 513 + 1
    assert window_starts(length, 769, 513) == sorted({max(min(i * 513, length - 769), 0) for i in range(grids)})


def test_window_starts_by_hand_for_odd_sizes():
    assert window_starts(1025, 769, 513) == [0, 256]
    assert window_starts(2049, 769, 513) == [0, 513, 1026, 1280]
    assert window_starts(11, 9, 6) == [0, 2]
    assert window_starts(5, 9, 6) == [0]
    assert math.ceil(769 * (1 - 1 / 3)) == 513  # the official stride


def official_predict_sliding(model, image, tile, num_classes):
    """An independent reimplementation of the official predict_sliding (NumPy, pad_image, crop back)."""
    _, _, height, width = image.shape
    stride = math.ceil(tile[0] * (1 - 1 / 3))
    full = np.zeros((height, width, num_classes))
    count = np.zeros((height, width, 1))
    for y1 in official_tiles(height, tile[0], stride):
        for x1 in official_tiles(width, tile[1], stride):
            y2, x2 = min(y1 + tile[0], height), min(x1 + tile[1], width)
            crop = image[:, :, y1:y2, x1:x2].numpy()
            padded = np.pad(crop, ((0, 0), (0, 0), (0, tile[0] - crop.shape[2]), (0, tile[1] - crop.shape[3])))
            with torch.no_grad():
                out = model(torch.from_numpy(padded))[0].numpy().transpose(1, 2, 0)
            full[y1:y2, x1:x2] += out[: crop.shape[2], : crop.shape[3]]
            count[y1:y2, x1:x2] += 1
    return full / count


def test_official_slide_protocol_equals_its_reference_with_zero_padded_tiles():
    stride = math.ceil(9 * (1 - 1 / 3))  # 7: 9 * 0.6666666666666667 rounds above 6 in floating point
    cfg = _cfg("cityscapes_r2", **{"eval.crop_size": (9, 9), "eval.stride": (stride, stride)})
    model = GlobalContext()
    image = torch.randn(1, 3, 7, 20)  # shorter than the tile: every window is padded
    logits = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=False)
    reference = official_predict_sliding(model, image, (9, 9), 4)
    np.testing.assert_allclose(logits[0].numpy().transpose(1, 2, 0), reference, rtol=1e-5, atol=1e-5)
    assert set(model.shapes[-3:]) == {(9, 9)}


def test_slide_pad_none_feeds_the_small_window_and_differs():
    model = GlobalContext()
    image = torch.randn(1, 3, 7, 20)
    shrunk = predict_slide(model, image, crop=(9, 9), stride=(6, 6), num_classes=4, pad="none")
    assert model.shapes[-1] == (7, 9)
    padded = predict_slide(model, image, crop=(9, 9), stride=(6, 6), num_classes=4, pad="zero")
    assert model.shapes[-1] == (9, 9)
    assert not torch.allclose(shrunk, padded)
    with pytest.raises(ValueError, match="unknown pad"):
        predict_slide(model, image, crop=9, stride=6, num_classes=4, pad="reflect")


# --- multi-scale view sizes ---------------------------------------------------------------------------------


def test_mmseg_0x_views_rescale_the_original_into_ratio_times_the_test_scale():
    transform = EvalTransform(mean=MEAN, std=STD, channel_order="rgb", scale=(2049, 1025))
    image = np.zeros((1024, 2048, 3), np.uint8)
    # MultiScaleFlipAug img_scale (int(2049 r), int(1025 r)), then keep-ratio sizes int(x * f + 0.5).
    assert tuple(transform.view(image, 0.75, "scale_bounds").shape[1:]) == (768, 1536)
    assert tuple(transform.view(image, 1.0, "scale_bounds").shape[1:]) == (1025, 2049)
    # ratio 1.75: bounds (3585, 1793), factor min(3585 / 2048, 1793 / 1024) = 3585 / 2048 -> (1793, 3585).
    assert tuple(transform.view(image, 1.75, "scale_bounds").shape[1:]) == (1793, 3585)
    # Rescaling the test-scaled input (1025, 2049) by 1.75 instead, the old way, is 1 px off.
    assert scaled_size(1025, 2049, 1.75, "ratio") == (1794, 3586)


def test_view_sizes_of_the_other_sources():
    voc = np.zeros((375, 500, 3), np.uint8)
    transform = EvalTransform(mean=MEAN, std=STD, channel_order="rgb", scale=(2048, 512))
    # mmseg 1.x tta Resize(scale_factor=r, keep_ratio=True): bounds int(x * r + 0.5) of the original, then mmcv
    # imrescale into them with one factor: (281, 375) here, but 83 x 157 at 0.75 -> bounds (118, 62), factor
    # min(118 / 157, 62 / 83) = 0.7470 -> (62, 117), not int(157 * 0.75 + 0.5) = 118.
    assert tuple(transform.view(voc, 0.75, "original_ratio").shape[1:]) == (281, 375)
    odd = np.zeros((83, 157, 3), np.uint8)
    assert tuple(transform.view(odd, 0.75, "original_ratio").shape[1:]) == (62, 117)
    assert tuple(transform.view(np.zeros((41, 79, 3), np.uint8), 1.25, "original_ratio").shape[1:]) == (51, 98)
    # mmseg 0.x on the VOC test scale: bounds (1536, 384) -> factor 384 / 375 -> (384, 512).
    assert tuple(transform.view(voc, 0.75, "scale_bounds").shape[1:]) == (384, 512)
    # PaddleSeg int(h * s + 0.5) of the padded input; official ndimage.zoom round(); ssseg floor.
    assert scaled_size(1025, 2049, 0.75, "ratio") == (769, 1537)
    assert scaled_size(1024, 2048, 1.25, "zoom") == (1280, 2560)
    assert scaled_size(1025, 2049, 0.75, "scale_factor") == (768, 1536)
    assert tuple(resize_view(torch.zeros(1, 3, 1025, 2049), 0.75, "scale_factor").shape[-2:]) == (768, 1536)


def test_zoom_view_equals_scipy_ndimage_zoom():
    image = torch.randn(1, 3, 13, 22)
    ours = resize_view(image, 0.75, "zoom")
    reference = ndimage.zoom(image.numpy(), (1.0, 1.0, 0.75, 0.75), order=1, prefilter=False)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-5, atol=1e-5)


def test_cv2_views_are_made_from_the_raw_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    transform = EvalTransform(mean=MEAN, std=STD, channel_order="bgr", scale=None)
    view = transform.view(image, 1.5, "original_ratio")
    expected = normalise(cv2.resize(image, (45, 30), interpolation=cv2.INTER_LINEAR), mean=MEAN, std=STD,
                         channel_order="bgr")
    torch.testing.assert_close(view, expected)


# --- averaging ---------------------------------------------------------------------------------------------


def _mmseg_0x_reference(model, raw, transform, scales, out_size, align_corners):
    """mmseg 0.30.0 aug_test: each view from the original, resized to ori_shape, softmax, flipped back, mean."""
    total = 0
    for r in scales:
        view = transform.view(raw, r, "scale_bounds").unsqueeze(0)
        for flip in (False, True):
            x = view.flip(-1) if flip else view
            with torch.no_grad():
                out = F.interpolate(model(x), size=out_size, mode="bilinear", align_corners=align_corners)
            prob = out.softmax(1)
            total = total + (prob.flip(-1) if flip else prob)
    return total / (2 * len(scales))


def test_mmseg_ms_flip_averages_probabilities_of_views_of_the_original():
    cfg = _cfg("mmseg_voc12aug_r50_d8_512x512_20k", **{"eval.scale": (40, 16), "eval.ms_scales": (0.5, 1.0, 1.5)})
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (15, 21, 3), dtype=np.uint8)
    transform = EvalTransform(mean=MEAN, std=STD, channel_order="rgb", scale=cfg.eval.scale)
    model = Strided()
    image = transform.input(raw).unsqueeze(0)
    ours = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=True, output_size=(15, 21),
                          resized_size=tuple(image.shape[-2:]), raw_image=raw, transform=transform)
    reference = _mmseg_0x_reference(model, raw, transform, (0.5, 1.0, 1.5), (15, 21), False)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # Averaging logits instead gives another (non-probability) result.
    logits_cfg = with_overrides(cfg, {"eval.ms_average": "logits"}).eval
    other = predict_logits(model, image, eval_cfg=logits_cfg, num_classes=4, multiscale=True, output_size=(15, 21),
                           resized_size=tuple(image.shape[-2:]), raw_image=raw, transform=transform)
    assert torch.allclose(ours.sum(1), torch.ones(1, 15, 21)) and not torch.allclose(other.sum(1), ours.sum(1))


def test_official_ms_averages_logits_of_zoomed_views_straight_at_the_original_size():
    cfg = _cfg("cityscapes_r2")
    model = Strided(align_corners=True)
    image = torch.randn(1, 3, 16, 24)
    ours = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=True)
    total = 0
    for s in (0.75, 1.0, 1.25):
        view = torch.from_numpy(ndimage.zoom(image.numpy(), (1, 1, s, s), order=1, prefilter=False))
        with torch.no_grad():
            a = F.interpolate(model.decoder(view), size=(16, 24), mode="bilinear", align_corners=True)
            b = F.interpolate(model.decoder(view.flip(-1)), size=(16, 24), mode="bilinear", align_corners=True)
        total = total + 0.5 * (a + b.flip(-1))
    torch.testing.assert_close(ours, total / 3, rtol=1e-4, atol=1e-5)


def test_paddleseg_ms_sums_logits_on_the_padded_input_then_crops():
    cfg = _cfg("paddleseg_cityscapes_r101_d8_769x769_60k", **{"eval.val_pad_size": (13, 19)})
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    transform = EvalTransform(mean=(127.5,) * 3, std=(127.5,) * 3, channel_order="rgb", pad_size=(13, 19),
                              pad_value=127.5)
    image = transform.input(raw).unsqueeze(0)
    assert tuple(image.shape[-2:]) == (13, 19) and (image[0, :, 12, :] == 0).all() and (image[0, :, :, 18] == 0).all()
    model = Strided()
    ours = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=True, output_size=(12, 18),
                          resized_size=(12, 18), raw_image=raw, transform=transform)
    total = 0
    for s in (0.75, 1.0, 1.25):
        size = (int(13 * s + 0.5), int(19 * s + 0.5))
        view = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            x = view.flip(-1) if flip else view
            with torch.no_grad():
                out = model(x)
            out = out.flip(-1) if flip else out
            total = total + F.interpolate(out, size=(13, 19), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, (total / 6)[:, :, :12, :18], rtol=1e-5, atol=1e-6)
    single = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=False, output_size=(12, 18),
                            resized_size=(12, 18))
    with torch.no_grad():
        torch.testing.assert_close(single, model(image)[:, :, :12, :18])


# --- the final resize and the upsampling path --------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [True, False])
def test_final_resize_uses_the_configured_align_corners(align_corners):
    cfg = _cfg("mmseg_cityscapes_r50_d8_512x1024_40k", **{"eval.resize_align_corners": align_corners})
    model = Strided()
    image = torch.randn(1, 3, 12, 24)
    ours = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=False, output_size=(17, 34))
    with torch.no_grad():
        expected = F.interpolate(model(image), size=(17, 34), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(ours, expected)


def test_sssegmentation_resizes_the_decoder_output_once():
    cfg = _cfg("ssseg_cityscapes_r50_d8")
    model = Strided()
    image = torch.randn(1, 3, 12, 24)
    ours = predict_logits(model, image, eval_cfg=cfg.eval, num_classes=4, multiscale=False, output_size=(17, 34))
    with torch.no_grad():
        once = F.interpolate(model.decoder(image), size=(17, 34), mode="bilinear", align_corners=False)
        twice = F.interpolate(model(image), size=(17, 34), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, once)
    assert not torch.allclose(ours, twice)


def test_ccnet_logits_at_is_one_interpolation_of_the_decoder():
    torch.manual_seed(0)
    model = models.build(depth=50, stem="v1c", head_channels=16, num_classes=3, backend="naive").eval()
    image = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        decoder = model.decode_head(model.backbone(image)[-1])
        expected = F.interpolate(decoder, size=(50, 60), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model.logits_at(image, (50, 60)), expected)
        torch.testing.assert_close(model.logits_at(image, (33, 41)), model(image))


# --- zero-union rule, pad fill, summary -------------------------------------------------------------------


def test_zero_union_rules_by_hand():
    # class 0: 2 / (2 + 1) ; class 1: 1 / (1 + 1) ; class 2: absent from labels and predictions.
    matrix = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert mean_iou(matrix, zero_union="drop") == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert mean_iou(matrix, zero_union="zero") == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="zero_union"):
        mean_iou(matrix, zero_union="ignore")


def test_training_pad_fill_raw_zero_is_black_after_normalising():
    kwargs = dict(crop_size=(8, 8), scale_range=(1.0, 1.0), mean=MEAN, std=STD, channel_order="rgb",
                  rescale="factor", base_size=None, scale_step=None, cat_max_ratio=1.0, photometric="none",
                  pad_position="bottom_right", crop_fallback="none", flip=False)
    image = np.full((4, 8, 3), 200, np.uint8)
    label = np.zeros((4, 8), np.uint8)
    mean_fill, _ = TrainTransform(pad_fill="normalised_zero", **kwargs)(image, label, rng=np.random.default_rng(0))
    black_fill, _ = TrainTransform(pad_fill="raw_zero", **kwargs)(image, label, rng=np.random.default_rng(0))
    assert (mean_fill[:, 4:] == 0).all()
    expected = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)]).view(3, 1, 1).expand(3, 4, 8)
    torch.testing.assert_close(black_fill[:, 4:], expected)
    torch.testing.assert_close(black_fill[:, :4], mean_fill[:, :4])


def test_protocol_summary_names_each_protocol():
    keys = {"eval_mode", "eval_scales", "eval_flip", "eval_average"}
    official = protocol_summary(_cfg("cityscapes_r2").eval, "mIoU")
    assert set(official) == keys and all(isinstance(v, str) for v in official.values())
    assert official["eval_mode"] == "slide 769x769 stride 513x513 pad zero" and official["eval_flip"] == "false"
    ms = protocol_summary(_cfg("mmseg_cityscapes_r101_d8_769x769_80k").eval, "mIoU_ms_flip")
    assert set(ms) == keys and ms["eval_flip"] == "true"
    assert ms["eval_scales"].startswith("0.5 0.75 1 1.25 1.5 1.75 (cv2_scale_bounds")
    assert "probs mean at original" in ms["eval_average"]
    with pytest.raises(ValueError, match="unknown metric"):
        protocol_summary(_cfg("cityscapes_r2").eval, "fps")


def test_every_eval_field_of_every_row_cites_its_source():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        lines = path.read_text().split("\neval:\n", 1)[1].splitlines()
        for line in lines:
            if line.startswith("  ") and not line.startswith("  #"):
                assert "#" in line, f"{path.stem}: {line.strip()} has no source comment"


def test_native_whole_is_a_complete_protocol():
    e = EvalConfig.native_whole(zero_union="zero")
    assert (e.mode, e.scale, e.zero_union, e.ms_resize) == ("whole", None, "zero", "tensor_input_ratio")


# --- eval-only with only a validation split ---------------------------------------------------------------


def test_eval_only_needs_only_the_validation_split(tmp_path, capsys):
    config = EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml"
    cfg = load_config(config)
    root = write_fake_dataset(cfg.data, tmp_path / "data", count=1, size_hw=(33, 44))
    shutil.rmtree(root / "leftImg8bit" / "train")
    shutil.rmtree(root / "gtFine" / "train")
    small = with_overrides(cfg, {"model.head_channels": 16, "model.aux_channels": 16,
                                 "model.pretrained_backbone": None, "model.backend": "naive"})
    model = models.build(**model_kwargs(small))
    released = tmp_path / "released.pth"
    torch.save({"state_dict": models.export_state_dict(model, source="mmseg")}, released)
    overrides = [f"data.root={root}", "eval.scale=[44,33]", "eval.ms_flip=false", "data.num_workers=0",
                 "model.head_channels=16", "model.aux_channels=16"]
    args = [str(config), "--eval-only", "--checkpoint", str(released), "--checkpoint-source", "mmseg",
            "--out-dir", str(tmp_path / "e"), "--results", str(tmp_path / "e" / "miou.csv"), "--no-progress",
            *[f"--set={item}" for item in overrides]]
    assert main(args) == 0
    assert (tmp_path / "e" / "miou.csv").is_file()
    # Training still needs its split.
    train_args = [str(config), "--out-dir", str(tmp_path / "t"), "--results", str(tmp_path / "t" / "miou.csv"),
                  "--no-progress", *[f"--set={item}" for item in overrides], "--set=model.pretrained_backbone=null"]
    assert main(train_args) == 3
    assert "training split 'train'" in capsys.readouterr().err
    # Without the validation split, --eval-only names it: exit 3.
    shutil.rmtree(root / "leftImg8bit" / "val")
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "validation split 'val' (config key data.val_split)" in err
    assert str(root / "leftImg8bit" / "val") in err


# --- evaluate() end to end on a small validation split, each source's protocol ------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("cityscapes_r2", {"eval.crop_size": (9, 9), "eval.stride": (7, 7), "eval.ms_flip": True}),
        ("mmseg_cityscapes_r50_d8_769x769_40k", {"eval.crop_size": (9, 9), "eval.stride": (6, 6),
                                                 "eval.scale": (26, 13)}),
        ("ssseg_cityscapes_r50_d8", {"eval.scale": (26, 13), "eval.ms_flip": True}),
        ("paddleseg_cityscapes_r101_d8_769x769_60k", {"eval.val_pad_size": (13, 25)}),
    ],
)
def test_evaluate_runs_each_source_protocol_on_a_validation_split(tmp_path, name, overrides):
    from repro.engine.data import build_dataset
    from repro.engine.distributed import init_distributed
    from repro.engine.evaluate import evaluate
    from repro.engine.metrics import iou_per_class

    cfg = _cfg(name, **{"data.root": str(tmp_path), **overrides})
    write_fake_dataset(cfg.data, tmp_path, count=2, size_hw=(12, 24))
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    torch.manual_seed(0)
    model = nn.Conv2d(3, 19, kernel_size=1)
    results = evaluate(model, dataset, eval_cfg=cfg.eval, num_classes=19, ignore_index=255,
                       ctx=init_distributed(device="cpu"), progress=False)
    assert set(results) == {"mIoU", "mIoU_ms_flip"}
    for result in results.values():
        ious = iou_per_class(result.confusion)
        assert result.confusion.sum() > 0
        if cfg.eval.zero_union == "zero":
            assert result.miou == pytest.approx(100 * np.nan_to_num(ious).mean())
        else:
            assert result.miou == pytest.approx(100 * np.nanmean(ious))


def test_check_data_with_eval_only_checks_the_validation_split_only(tmp_path, capsys):
    config = EXPERIMENTS / "ssseg_cityscapes_r50_d8.yaml"
    cfg = load_config(config)
    root = write_fake_dataset(cfg.data, tmp_path / "cs", count=1, size_hw=(10, 12))
    shutil.rmtree(root / "gtFine" / "train")
    args = [str(config), "--check-data", f"--set=data.root={root}"]
    assert main([*args, "--eval-only"]) == 0
    assert "found at" in capsys.readouterr().out
    assert main(args) == 3
    assert "training split 'train' (config key data.train_split)" in capsys.readouterr().err
