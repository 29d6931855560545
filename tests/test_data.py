"""Dataset loaders on tiny generated data in each real layout, the not-found error, transforms, and the
step-indexed sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.engine.config import load_config, with_overrides
from repro.engine.data import (
    DatasetNotFoundError,
    ade20k,
    build_dataset,
    check_dataset,
    cityscapes,
    voc,
    write_fake_dataset,
)
from repro.engine.data.transforms import (
    EvalTransform,
    TrainTransform,
    keep_ratio_size,
    normalise,
    photometric_distortion,
    random_bounds,
    resize_by_factor,
    resize_to,
)
from repro.engine.distributed import StepBatchSampler
from repro.engine.runner import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _transform(**kwargs) -> TrainTransform:
    """A TrainTransform with the official recipe's choices unless overridden."""
    settings = dict(
        rescale="factor", base_size=None, scale_step=None, cat_max_ratio=1.0, crop_fallback="none", photometric="none",
        pad_position="bottom_right", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order="rgb",
    )
    return TrainTransform(**{**settings, **kwargs})


def _cfg(name: str, root: Path | None, **overrides):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    return with_overrides(cfg, {"data.root": None if root is None else str(root), **overrides})


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    lut = cityscapes.label_id_lut()
    # road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, bicycle 33 -> 18; unlabeled 0, ground 6, parking 9 ignored
    assert [lut[i] for i in (7, 8, 26, 33)] == [0, 1, 13, 18]
    assert lut[0] == 255 and lut[6] == 255 and lut[9] == 255
    assert (lut != 255).sum() == 19
    back = cityscapes.train_ids_to_label_ids(np.arange(19, dtype=np.uint8))
    assert np.array_equal(lut[back], np.arange(19))
    with pytest.raises(ValueError, match="train ids must be in"):
        cityscapes.train_ids_to_label_ids(np.array([19], dtype=np.uint8))


def test_cityscapes_loader(tmp_path):
    cfg = _cfg("cityscapes_r2", tmp_path, **{"data.crop_size": (17, 19)})
    assert write_fake_dataset(cfg.data, tmp_path, count=3, size_hw=(20, 30)) == tmp_path
    assert check_dataset(cfg.data) == tmp_path
    val = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    assert len(val) == 3
    image, label, index = val[1]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and label.shape == (20, 30)
    stored = np.asarray(Image.open(val.pairs[1][1]))
    assert torch.equal(label, torch.from_numpy(cityscapes.label_id_lut()[stored].astype(np.int64)))
    # BGR minus the official mean, std 1: pixel values are recoverable exactly.
    raw = np.asarray(Image.open(val.pairs[1][0]).convert("RGB")).astype(np.float32)
    assert torch.allclose(image[0], torch.from_numpy(raw[:, :, 2] - 104.00698793))
    train = build_dataset(cfg.data, split="train")
    image, label, index = train[(2, 123)]
    assert image.shape == (3, 17, 19) and label.shape == (17, 19) and index == 2
    again, label_again, _ = train[(2, 123)]
    assert torch.equal(image, again) and torch.equal(label, label_again)


def test_ade20k_loader_reduces_zero_label(tmp_path):
    cfg = _cfg("mmseg_ade20k_r50_d8_512x512_80k", tmp_path / "ADEChallengeData2016")
    write_fake_dataset(cfg.data, tmp_path / "ADEChallengeData2016", count=2, size_hw=(24, 32))
    # Pointing at the parent folder works too.
    parent_cfg = with_overrides(cfg, {"data.root": str(tmp_path), "eval.scale": None})
    val = build_dataset(parent_cfg.data, split="val", eval_cfg=parent_cfg.eval)
    assert len(val) == 2
    _, label, _ = val[0]
    stored = torch.from_numpy(np.asarray(Image.open(val.pairs[0][1])).astype(np.int64))
    assert torch.equal(label[stored == 0], torch.full_like(label[stored == 0], 255))
    assert torch.equal(label[stored > 0], stored[stored > 0] - 1)
    assert label[label != 255].max() <= 149
    # The mmsegmentation test resize (2048, 512) keep-ratio: 24x32 -> 512x683; the label stays native.
    image, label, _ = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)[0]
    assert image.shape == (3, 512, 683) and label.shape == (24, 32)


def test_voc_loader_train_plus_aug(tmp_path):
    cfg = _cfg("mmseg_voc12aug_r50_d8_512x512_20k", tmp_path)
    write_fake_dataset(cfg.data, tmp_path, count=2, size_hw=(20, 20))
    train = build_dataset(cfg.data, split="train")
    assert len(train) == 4  # train.txt + aug.txt
    assert [p[1].parent.name for p in train.pairs] == ["SegmentationClass"] * 2 + ["SegmentationClassAug"] * 2
    val = build_dataset(cfg.data, split="val", eval_cfg=with_overrides(cfg, {"eval.scale": None}).eval)
    _, label, _ = val[0]
    assert (label[0] == 255).all() and label[1:].max() <= 20  # palette indices read as classes
    sss = _cfg("ssseg_voc_r50_d8", tmp_path / "VOCdevkit" / "VOC2012")
    write_fake_dataset(sss.data, tmp_path / "VOCdevkit" / "VOC2012", count=2, size_hw=(20, 20))
    sss_parent = with_overrides(sss, {"data.root": str(tmp_path)})
    pairs = build_dataset(sss_parent.data, split="train").pairs
    assert all(p[1].parent.name == "SegmentationClassAug" for p in pairs)


@pytest.mark.parametrize(
    ("name", "env_var", "layout_word"),
    [
        ("cityscapes_r2", "CITYSCAPES_DATASET", "leftImg8bit"),
        ("mmseg_ade20k_r50_d8_512x512_80k", "ADE20K_DATASET", "annotations"),
        ("mmseg_voc12aug_r50_d8_512x512_20k", "VOC_DATASET", "JPEGImages"),
    ],
)
def test_missing_dataset_error_says_where_and_how(tmp_path, monkeypatch, name, env_var, layout_word):
    monkeypatch.delenv(env_var, raising=False)
    with pytest.raises(DatasetNotFoundError) as err:
        check_dataset(_cfg(name, None).data)
    assert env_var in str(err.value) and "data.root" in str(err.value) and layout_word in str(err.value)
    missing = tmp_path / "not_here"
    monkeypatch.setenv(env_var, str(missing))
    with pytest.raises(DatasetNotFoundError) as err:
        check_dataset(_cfg(name, None).data)
    text = str(err.value)
    assert str(missing) in text and layout_word in text and env_var in text
    assert isinstance(err.value, FileNotFoundError)


def test_check_data_exit_codes(tmp_path, monkeypatch, capsys):
    config = EXPERIMENTS / "cityscapes_r2.yaml"
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "cs"))
    assert main([str(config), "--check-data"]) == 3
    err = capsys.readouterr().err
    assert "CITYSCAPES_DATASET" in err and str(tmp_path / "cs") in err and "gtFine" in err
    cityscapes.write_fake(tmp_path / "cs", split="train", count=1, size_hw=(8, 8), seed=0)
    assert main([str(config), "--check-data"]) == 3  # val still missing
    cityscapes.write_fake(tmp_path / "cs", split="val", count=1, size_hw=(8, 8), seed=1)
    assert main([str(config), "--check-data"]) == 0
    assert main([str(config), "--check-data", "--set", "data.root=" + str(tmp_path / "elsewhere")]) == 3


def test_missing_label_file_is_named(tmp_path):
    paths = ade20k.write_fake(tmp_path, split="training", count=2, size_hw=(8, 8), seed=0)
    paths[1].unlink()
    with pytest.raises(DatasetNotFoundError, match=paths[1].name):
        ade20k.find_pairs(tmp_path, "training")
    voc.write_fake(tmp_path / "v", split="val", count=1, size_hw=(8, 8), seed=0)
    with pytest.raises(DatasetNotFoundError, match="train.txt"):
        voc.find_pairs(tmp_path / "v", "train")


def test_train_transform_scale_pad_crop_flip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    label = rng.integers(0, 5, size=(10, 12), dtype=np.uint8)
    # Crop larger than the image at scale 1: padding is 0 in the image and ignore in the label.
    pad = _transform(crop_size=(16, 20), scale_range=(1.0, 1.0), flip=False)
    out_image, out_label = pad(image, label, rng=np.random.default_rng(1))
    assert out_image.shape == (3, 16, 20) and out_label.shape == (16, 20)
    assert (out_label == 255).sum() == 16 * 20 - 10 * 12 and (out_image[:, 10:, :] == 0).all()
    assert torch.equal(out_label[:10, :12], torch.from_numpy(label.astype(np.int64)))
    # Scale steps are taken from the grid low + k * step.
    stepped = _transform(crop_size=(4, 4), scale_range=(0.7, 2.1), scale_step=0.1)
    ratios = {stepped._ratio(np.random.default_rng(s)) for s in range(200)}
    # Bit for bit the official f_scale = 0.7 + random.randint(0, 14) / 10.0 (dataset/datasets.py).
    assert ratios == {0.7 + k / 10.0 for k in range(15)}
    # Flip: with the same seed, the flipping transform gives the non-flipping one's output or its mirror, image
    # and label together; over 20 seeds both outcomes occur (a transform that never flips fails here).
    flip = _transform(crop_size=(10, 12), scale_range=(1.0, 1.0), flip=True)
    keep = _transform(crop_size=(10, 12), scale_range=(1.0, 1.0), flip=False)
    mirrored = 0
    for seed in range(20):
        a_img, a_lab = flip(image, label, rng=np.random.default_rng(seed))
        b_img, b_lab = keep(image, label, rng=np.random.default_rng(seed))
        assert not torch.equal(b_lab, b_lab.flip(-1)) and not torch.equal(b_img, b_img.flip(-1))
        if torch.equal(a_lab, b_lab.flip(-1)):
            assert torch.equal(a_img, b_img.flip(-1)), seed  # the image is mirrored with its label
            mirrored += 1
        else:
            assert torch.equal(a_lab, b_lab) and torch.equal(a_img, b_img), seed
    assert 0 < mirrored < 20


def test_cat_max_ratio_rejects_single_class_crops():
    label = np.zeros((20, 20), dtype=np.uint8)
    label[:, 15:] = 1
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    strict = _transform(crop_size=(10, 10), scale_range=(1.0, 1.0), cat_max_ratio=0.75, crop_fallback="last_draw",
                        flip=False)
    loose = _transform(crop_size=(10, 10), scale_range=(1.0, 1.0), flip=False)

    def mixed_crops(transform) -> int:
        crops = [transform(image, label, rng=np.random.default_rng(s))[1] for s in range(30)]
        return sum(len(np.unique(crop)) > 1 for crop in crops)

    assert mixed_crops(strict) > mixed_crops(loose)


@pytest.mark.parametrize(("fallback", "draws"), [("fresh_draw", 11), ("last_draw", 10)])
def test_crop_fallback_after_ten_rejections(fallback, draws):
    # One class everywhere: every window is rejected. mmseg RandomCrop.crop_bbox (transforms.py lines 280-290)
    # then crops an 11th window, sssegmentation RandomCrop (transforms.py lines 88-104) keeps the 10th.
    label = np.zeros((30, 40), dtype=np.uint8)
    image = np.arange(30 * 40 * 3, dtype=np.int64).reshape(30, 40, 3) % 251
    image = image.astype(np.uint8)
    transform = _transform(crop_size=(8, 8), scale_range=(1.0, 1.0), cat_max_ratio=0.75, crop_fallback=fallback,
                           flip=False)
    out_image, _ = transform(image, label, rng=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    rng.uniform(1.0, 1.0)  # the scale ratio is drawn first
    windows = [(int(rng.integers(0, 23)), int(rng.integers(0, 33))) for _ in range(11)]
    top, left = windows[draws - 1]
    expected = torch.from_numpy(image[top : top + 8, left : left + 8].transpose(2, 0, 1).astype(np.float32))
    assert torch.equal(out_image, expected)
    with pytest.raises(ValueError, match="crop_fallback"):
        _transform(crop_size=(8, 8), scale_range=(1.0, 1.0), cat_max_ratio=0.75, crop_fallback="none")


def test_normalise_and_keep_ratio():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[..., 0] = 10  # red
    rgb = normalise(image, mean=(1.0, 2.0, 3.0), std=(3.0, 1.0, 1.0), channel_order="rgb")
    bgr = normalise(image, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0), channel_order="bgr")
    assert rgb[0, 0, 0] == 3.0 and bgr[2, 0, 0] == 7.0 and bgr[0, 0, 0] == -1.0
    with pytest.raises(ValueError, match="channel_order"):
        normalise(image, mean=(0, 0, 0), std=(1, 1, 1), channel_order="hsv")
    assert keep_ratio_size(1024, 2048, scale=(2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(375, 500, scale=(2048, 512)) == (512, 683)
    image_t, label_t = EvalTransform(mean=(0, 0, 0), std=(1, 1, 1), channel_order="rgb", scale=(8, 4))(
        np.zeros((2, 4, 3), dtype=np.uint8), np.zeros((2, 4), dtype=np.uint8)
    )
    assert image_t.shape == (3, 4, 8) and label_t.shape == (2, 4)


def test_step_sampler_resumes_exactly_and_splits_ranks():
    def batches(rank, world, start, total):
        sampler = StepBatchSampler(
            dataset_size=7, batch_size=2, rank=rank, world_size=world, seed=3, start_step=start,
            total_steps=total,
        )
        return list(sampler)

    full = batches(0, 1, 0, 10)
    assert batches(0, 1, 4, 10) == full[4:]
    # Each epoch of 7 samples is a permutation.
    flat = [index for batch in full for index, _ in batch]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    # Two ranks together draw exactly what one process with the doubled batch draws, disjointly.
    rank0, rank1 = batches(0, 2, 0, 5), batches(1, 2, 0, 5)
    merged = [item for a, b in zip(rank0, rank1, strict=True) for item in a + b]
    assert merged == [item for batch in full for item in batch]
    seeds = [seed for batch in full for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError, match="rank 2"):
        StepBatchSampler(
            dataset_size=7, batch_size=2, rank=2, world_size=2, seed=0, start_step=0, total_steps=1
        )


def test_photometric_distortion_changes_colours_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    label = rng.integers(0, 3, size=(12, 12), dtype=np.uint8)
    outputs = [photometric_distortion(image, rng=np.random.default_rng(s)) for s in range(8)]
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outputs)
    assert sum(not np.array_equal(out, image) for out in outputs) >= 6  # 1/16 chance per seed of no change
    common = dict(crop_size=(12, 12), scale_range=(1.0, 1.0), flip=False)
    jitter = _transform(photometric="hsv", **common)
    plain = _transform(photometric="none", **common)
    jittered, jitter_label = jitter(image, label, rng=np.random.default_rng(3))
    _, plain_label = plain(image, label, rng=np.random.default_rng(3))
    assert torch.equal(jitter_label, plain_label) and jittered.shape == (3, 12, 12)


class FixedDraws:
    """A stand-in for np.random.Generator: every coin says yes, uniform draws return `uniform`, and the hue
    draw returns `hue`; it records the ranges asked for."""

    def __init__(self, *, uniform: float, hue: int) -> None:
        self.uniform_value, self.hue = uniform, hue
        self.integer_ranges: list[tuple] = []

    def integers(self, low, high=None):
        self.integer_ranges.append((low, high))
        return 1 if high is None else self.hue

    def uniform(self, low, high):
        return self.uniform_value


def _source_photometric(bgr: np.ndarray, *, alpha: float, beta: float, hue: int, to_hsv, from_hsv):
    """mmsegmentation / sssegmentation PhotoMetricDistortion.transform on OpenCV's BGR image, every coin yes
    and contrast first (mode 1): brightness, contrast, saturation, hue, each through `convert` (float32,
    clip, truncate to uint8)."""
    import cv2

    def convert(array, a=1.0, b=0.0):
        return np.clip(array.astype(np.float32) * a + b, 0, 255).astype(np.uint8)

    image = convert(bgr, b=beta)
    image = convert(image, a=alpha)
    hsv = cv2.cvtColor(image, to_hsv)
    hsv[:, :, 1] = convert(hsv[:, :, 1], a=alpha)
    image = cv2.cvtColor(hsv, from_hsv)
    hsv = cv2.cvtColor(image, to_hsv)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + hue) % 180
    return cv2.cvtColor(hsv, from_hsv)


@pytest.mark.parametrize("mode", ["hsv", "hsv_red_blue_swapped"])
def test_photometric_distortion_follows_the_sources(mode):
    import cv2

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    draws = FixedDraws(uniform=1.3, hue=-18)
    ours = photometric_distortion(rgb, rng=draws, mode=mode)
    # Hue is drawn as randint(-18, 18): -18..17 (mmseg transforms.py line 704, sssegmentation line 501).
    assert (-18, 18) in draws.integer_ranges
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # what cv2.imread gives the sources
    if mode == "hsv":  # mmseg: mmcv.bgr2hsv / hsv2bgr
        conversions = dict(to_hsv=cv2.COLOR_BGR2HSV, from_hsv=cv2.COLOR_HSV2BGR)
    else:  # sssegmentation transforms.py line 486: COLOR_RGB2HSV / COLOR_HSV2RGB on the BGR image
        conversions = dict(to_hsv=cv2.COLOR_RGB2HSV, from_hsv=cv2.COLOR_HSV2RGB)
    expected = _source_photometric(bgr, alpha=1.3, beta=1.3, hue=-18, **conversions)[:, :, ::-1]
    np.testing.assert_array_equal(ours, expected)


def test_the_two_photometric_modes_turn_hue_opposite_ways():
    red = np.zeros((1, 1, 3), dtype=np.uint8)
    red[..., 0] = 200
    true_hue = photometric_distortion(red, rng=FixedDraws(uniform=1.0, hue=10), mode="hsv")
    swapped = photometric_distortion(red, rng=FixedDraws(uniform=1.0, hue=10), mode="hsv_red_blue_swapped")
    # +10 on OpenCV's 0..180 hue scale is +20 degrees: red moves towards yellow (green grows) when the hue is
    # the true one, towards magenta (blue grows) when red and blue are swapped.
    assert true_hue[0, 0, 1] > 40 > true_hue[0, 0, 2]
    assert swapped[0, 0, 2] > 40 > swapped[0, 0, 1]


def test_opencv_bilinear_does_not_antialias():
    # Halving with OpenCV's bilinear samples at (x + 0.5) * 2 - 0.5 = 2x + 0.5: the mean of a 2x2 block
    # (values are multiples of 4 so the mean is exact); PIL's bilinear would spread a wider filter.
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 64, size=(8, 12, 3)) * 4).astype(np.uint8)
    expected = image.reshape(4, 2, 6, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(resize_to(image, (4, 6)), expected.astype(np.uint8))
    # Doubling a ramp: samples at (x + 0.5) / 2 - 0.5, clamped at the border: 0, 25, 75, 100.
    ramp = np.array([[0, 100]], dtype=np.uint8).repeat(2, axis=0)
    assert resize_to(ramp, (4, 4))[0].tolist() == [0, 25, 75, 100]
    assert resize_by_factor(ramp, 2.0)[0].tolist() == [0, 25, 75, 100]
    labels = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    assert set(np.unique(resize_to(labels, (5, 7), nearest=True))) == {1, 2, 3, 4}


@pytest.mark.parametrize("ratio", [0.5, 0.7431, 1.2345, 2.0])
def test_keep_ratio_bounds_truncate_then_round(ratio):
    # mmcv RandomResize._random_sample_ratio (processing.py line 1515) truncates the bounds, rescale_size
    # (geometric.py line 33) rounds the size with int(x * f + 0.5); sssegmentation Resize lines 46 and 52.
    bounds = (int(2049 * ratio), int(1025 * ratio))
    assert random_bounds((2049, 1025), ratio) == bounds
    factor = min(bounds[0] / 2048, bounds[1] / 1024)
    expected = (int(1024 * factor + 0.5), int(2048 * factor + 0.5))
    transform = _transform(crop_size=(4200, 4200), scale_range=(ratio, ratio), rescale="keep_ratio_bounds",
                           base_size=(2049, 1025), flip=False)
    label = np.zeros((1024, 2048), dtype=np.uint8)
    image = np.zeros((1024, 2048, 3), dtype=np.uint8)
    _, out_label = transform(image, label, rng=np.random.default_rng(0))
    rows = int((out_label != 255).any(dim=1).sum())
    cols = int((out_label != 255).any(dim=0).sum())
    assert (rows, cols) == expected


def test_factor_rescale_is_opencvs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(37, 53), dtype=np.uint8)
    transform = _transform(crop_size=(200, 200), scale_range=(1.3, 1.3), flip=False)
    out_image, out_label = transform(image, label, rng=np.random.default_rng(0))
    import cv2

    # speedinghzl/CCNet dataset/datasets.py generate_scale_label, then image -= mean (0 here), pad bottom-right.
    expected = cv2.resize(image, None, fx=1.3, fy=1.3, interpolation=cv2.INTER_LINEAR)
    expected_label = cv2.resize(label, None, fx=1.3, fy=1.3, interpolation=cv2.INTER_NEAREST)
    h, w = expected_label.shape
    assert torch.equal(out_image[:, :h, :w], torch.from_numpy(expected.transpose(2, 0, 1).astype(np.float32)))
    assert torch.equal(out_label[:h, :w], torch.from_numpy(expected_label.astype(np.int64)))


@pytest.mark.parametrize("position", ["bottom_right", "centre"])
def test_pad_colour_and_position(position):
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    image = np.full((5, 6, 3), 200, dtype=np.uint8)
    label = np.zeros((5, 6), dtype=np.uint8)
    transform = _transform(crop_size=(10, 9), scale_range=(1.0, 1.0), flip=False, pad_position=position,
                           mean=mean, std=std)
    out_image, out_label = transform(image, label, rng=np.random.default_rng(0))
    # Padding happens after normalisation with 0 (mmseg data_preprocessor.py lines 117-129 then stack_batch
    # pad_val=0; official copyMakeBorder value 0.0 after image -= mean; sssegmentation Padding after
    # Normalize): the padded pixels hold the normalised mean colour, 0, not black ((0 - mean) / std).
    top, left = (0, 0) if position == "bottom_right" else ((10 - 5) // 2, (9 - 6) // 2)
    inside = torch.zeros(10, 9, dtype=torch.bool)
    inside[top : top + 5, left : left + 6] = True
    assert torch.equal(out_label != 255, inside)
    assert (out_image[:, ~inside] == 0).all()
    expected_inside = torch.tensor([(200 - m) / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32)
    torch.testing.assert_close(out_image[:, inside], expected_inside[:, None].expand(3, 30))


@pytest.mark.parametrize("name", ["cityscapes", "ade20k", "voc"])
def test_prediction_files_read_back_through_the_label_decoding(tmp_path, name):
    """--save-predictions' files hold every class in the dataset's annotation encoding, and the dataset's own
    label decoding gives the train ids back; a class outside the dataset is refused, not wrapped."""
    from repro.engine.data import dataset_module, prediction_path, read_prediction, write_prediction

    num_classes = dataset_module(name).NUM_CLASSES
    image = tmp_path / "img" / ("aachen" if name == "cityscapes" else "") / (
        "aachen_000000_000019_leftImg8bit.png" if name == "cityscapes" else "ADE_val_00000001.jpg")
    train_ids = (np.arange(5 * 7 * 2).reshape(5, 14) % num_classes).astype(np.uint8)
    path = write_prediction(name, image, tmp_path / "out", train_ids)
    assert path == prediction_path(name, image, tmp_path / "out") and path.is_file()
    stored = np.asarray(Image.open(path))
    assert stored.shape == train_ids.shape and stored.dtype == np.uint8
    if name == "ade20k":  # stored as the annotations store them: class k as k + 1, 0 never written
        assert stored.min() == 1 and np.array_equal(stored, train_ids + 1)
    if name == "cityscapes":
        assert path.name == "aachen_000000_000019_pred_labelIds.png" and path.parent.name == "aachen"
        assert set(np.unique(stored)) <= set(cityscapes.LABEL_IDS)
    assert np.array_equal(read_prediction(name, path), train_ids)
    with pytest.raises(ValueError, match=f"train ids in \\[0, {num_classes}\\)"):
        write_prediction(name, image, tmp_path / "bad", np.full((2, 2), num_classes, dtype=np.uint8))
    with pytest.raises(ValueError, match="values -1..0"):
        write_prediction(name, image, tmp_path / "bad", np.array([[0, -1]]))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("config", ["mmseg_ade20k_r50_d8_512x512_160k", "mmseg_voc12aug_r50_d8_512x512_20k"])
def test_saved_predictions_give_the_csv_miou(tmp_path, config):
    """`repro.run --eval-only --save-predictions` on ADE20K / VOC (Cityscapes: tests/test_metrics.py): the mIoU
    recomputed from the files it wrote and the dataset's labels is the mIoU of its results CSV."""
    import csv

    import models
    from repro.engine.config import model_kwargs
    from repro.engine.data import prediction_path, read_prediction
    from repro.engine.metrics import confusion_matrix, mean_iou

    overrides = [f"data.root={tmp_path / 'data'}", "model.depth=50", "model.head_channels=16",
                 "model.aux_channels=16", "model.pretrained_backbone=null", "eval.scale=[48,32]",
                 "eval.ms_flip=false"]
    cfg = load_config(EXPERIMENTS / f"{config}.yaml", overrides)
    write_fake_dataset(cfg.data, tmp_path / "data", count=2, size_hw=(23, 31), seed=4)
    torch.manual_seed(0)
    torch.save(models.build(**model_kwargs(cfg)).state_dict(), tmp_path / "weights.pt")
    folder, results = tmp_path / "predictions", tmp_path / "miou.csv"
    args = [str(EXPERIMENTS / f"{config}.yaml"), "--eval-only", "--checkpoint", str(tmp_path / "weights.pt"),
            "--no-progress", "--save-predictions", str(folder), "--results", str(results),
            "--out-dir", str(tmp_path / "o")]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    with results.open(newline="") as f:
        measured = {row["metric"]: float(row["measured"]) for row in csv.DictReader(f)}
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    matrix = torch.zeros(cfg.model.num_classes, cfg.model.num_classes, dtype=torch.int64)
    for index, (image_path, _) in enumerate(dataset.pairs):
        predicted = read_prediction(cfg.data.dataset, prediction_path(cfg.data.dataset, image_path, folder))
        label = dataset.load(index)[1]
        assert predicted.shape == label.shape
        matrix += confusion_matrix(torch.from_numpy(predicted), torch.from_numpy(label),
                                   num_classes=cfg.model.num_classes, ignore_index=cfg.data.ignore_index)
    assert measured["mIoU"] == pytest.approx(100 * mean_iou(matrix, zero_union=cfg.eval.zero_union), abs=1e-3)


def test_save_predictions_refuses_the_dataset_label_folder(tmp_path, capsys):
    """ADE20K / VOC prediction files are named like their labels: --save-predictions pointing at the label folder
    is refused before anything runs (exit 2, the label file named), and the annotations stay as they were."""
    config = EXPERIMENTS / "mmseg_ade20k_r50_d8_512x512_160k.yaml"
    cfg = _cfg(config.stem, tmp_path / "ade")
    write_fake_dataset(cfg.data, tmp_path / "ade", count=1, size_hw=(9, 11))
    labels = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "validation"
    if not labels.is_dir():
        labels = tmp_path / "ade" / "annotations" / "validation"
    before = {path: path.read_bytes() for path in labels.glob("*.png")}
    assert before
    args = [str(config), "--eval-only", "--checkpoint", str(tmp_path / "never_read.pt"), "--no-progress",
            "--set", f"data.root={tmp_path / 'ade'}", "--save-predictions", str(labels)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--save-predictions" in err and "would overwrite the label file" in err and next(iter(before)).name in err
    assert {path: path.read_bytes() for path in labels.glob("*.png")} == before
