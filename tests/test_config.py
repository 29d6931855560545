"""Experiment configs: every YAML in experiments/ validates, carries its source and reported numbers, and
bad files fail with an error naming the file and the key."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

import models
from repro.engine.config import ConfigError, load_config, model_kwargs, with_overrides

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted(EXPERIMENTS.glob("*.yaml"))


def _write(tmp_path: Path, raw: dict, name: str = "bad") -> Path:
    raw = dict(raw, name=name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((EXPERIMENTS / "cityscapes_r2.yaml").read_text())


def test_one_config_per_published_row():
    names = {p.stem for p in CONFIGS}
    assert sum(n.startswith("mmseg_cityscapes_") for n in names) == 8
    # mmsegmentation's non-local baseline: one row per CCNet Cityscapes row, same recipe.
    nonlocal_rows = {n for n in names if n.startswith("mmseg_nonlocal_cityscapes_")}
    ccnet_rows = {n for n in names if n.startswith("mmseg_cityscapes_")}
    assert {n.replace("nonlocal_", "") for n in nonlocal_rows} == ccnet_rows
    assert sum(n.startswith("mmseg_ade20k_") for n in names) == 4
    assert sum(n.startswith("mmseg_voc12aug_") for n in names) == 4
    for dataset in ("voc", "ade20k", "cityscapes"):
        assert sum(n.startswith(f"ssseg_{dataset}_") for n in names) == 4
    assert {"cityscapes_r1", "cityscapes_r2", "cityscapes_r2_ohem"} <= names
    ablation = {f"paper_ablation_r{r}" for r in range(4)} | {"paper_ablation_nonlocal"}
    assert ablation <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_and_carries_its_source(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    # A public document a reader can open: its URL, and the table or section the numbers are in.
    assert re.search(r"\(https://(arxiv\.org|github\.com)/\S+\)", cfg.source), cfg.source
    assert re.search(r"table|section", cfg.source), cfg.source
    if cfg.name != "paper_ablation_nonlocal":  # the paper prints no mIoU for it (said in its notes)
        assert 0 < cfg.reported["mIoU"] < 100
    # The settings that silently changed published results are present in the file itself.
    text = path.read_text()
    for key in ("recurrence:", "weight_decay:", "mode:"):
        assert key in text


def test_published_numbers_spot_checks():
    expected = {
        "mmseg_cityscapes_r50_d8_512x1024_40k": dict(mIoU=77.76, mIoU_ms_flip=78.87, memory_gb=6.0, fps=3.32),
        "mmseg_ade20k_r101_d8_512x512_80k": dict(mIoU=43.97, mIoU_ms_flip=45.13, memory_gb=12.2, fps=14.11),
        "mmseg_voc12aug_r101_d8_512x512_40k": {"mIoU": 77.87, "mIoU_ms_flip": 78.90},
        "ssseg_cityscapes_r101_d8": {"mIoU": 80.08},
        "ssseg_voc_r50_d16": {"mIoU": 76.01},
        "cityscapes_r2": {"mIoU": 79.74},
        "cityscapes_r2_ohem": {"mIoU": 80.00},
        "paper_ablation_r2": {"mIoU": 79.8, "mIoU_ms_flip": 81.3},
    }
    for name, reported in expected.items():
        assert load_config(EXPERIMENTS / f"{name}.yaml").reported == reported


def test_official_recipe():
    cfg = load_config(EXPERIMENTS / "cityscapes_r2.yaml")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.depth, m.stem, m.output_stride, m.head, m.recurrence) == (101, "deep", 8, "rcca", 2)
    assert d.crop_size == (769, 769) and d.batch_size * t.source_gpus == 8
    assert (t.lr, t.lr_power, t.weight_decay, t.iterations, t.loss) == (0.01, 0.9, 1e-4, 60000, "ce")
    # evaluate.py's default (no --whole): 769 tiles at stride ceil(769 * 2 / 3), zero-padded, IoU 0 kept in the mean.
    e = cfg.eval
    assert (e.mode, e.crop_size, e.stride, e.slide_pad, e.scale) == ("slide", (769, 769), (513, 513), "zero", None)
    assert (e.zero_union, e.resize_align_corners, e.ms_average) == ("zero", True, "logits")
    ohem = load_config(EXPERIMENTS / "cityscapes_r2_ohem.yaml").train
    assert (ohem.loss, ohem.ohem_thresh, ohem.ohem_min_kept) == ("ohem", 0.7, 100000)


def _family(path: Path) -> str:
    return path.stem.split("_")[0] if path.stem.startswith(("mmseg_", "ssseg_", "paddleseg_")) else "official"


# Each source's recipe, as read in its own code (see the YAML comments for file and line).
RECIPES = {
    "official": dict(
        rescale="factor", base_size=None, scale_step=0.1, cat_max_ratio=1.0, crop_fallback="none",
        photometric_distortion="none",
        pad_position="bottom_right", min_lr=0.0, poly_horizon="iterations", loss_average="valid_pixels",
    ),
    "mmseg": dict(
        rescale="keep_ratio_bounds", scale_step=None, cat_max_ratio=0.75, crop_fallback="fresh_draw",
        photometric_distortion="hsv",
        pad_position="bottom_right", min_lr=1e-4, poly_horizon="iterations_minus_one", loss_average="all_pixels",
    ),
    "ssseg": dict(
        rescale="keep_ratio_bounds", scale_step=None, cat_max_ratio=0.75, crop_fallback="last_draw",
        photometric_distortion="hsv_red_blue_swapped", pad_position="centre", min_lr=1e-4,
        poly_horizon="iterations", loss_average="valid_pixels",
    ),
    # PaddleSeg configs/_base_/cityscapes*.yml, configs/ccnet/*.yml and paddleseg 2.8.0's code.
    "paddleseg": dict(
        rescale="factor", base_size=None, scale_step=0.25, cat_max_ratio=1.0, crop_fallback="none",
        photometric_distortion="none", pad_position="bottom_right", min_lr=1e-4, poly_horizon="iterations",
        loss_average="valid_pixels", loss="ohem", ohem_thresh=0.7, ohem_min_kept=10000, weight_decay=4e-5,
        mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), channel_order="rgb",
    ),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_row_states_its_sources_recipe(path):
    family = _family(path)
    cfg = load_config(path)
    for key, value in RECIPES[family].items():
        section = cfg.data if hasattr(cfg.data, key) else cfg.train
        assert getattr(section, key) == value, f"{path.stem}: {key}"
    # Each recipe field carries a comment naming where in the source it was read.
    text = path.read_text()
    for key in ("rescale", "pad_position", "poly_horizon", "loss_average", "min_lr"):
        line = next(line for line in text.splitlines() if line.startswith(f"  {key}:"))
        assert "#" in line, f"{path.stem}: {key} has no source comment"
    if family == "mmseg" and cfg.data.crop_size == (769, 769):
        # configs/_base_/datasets/cityscapes_769x769.py lines 8 and 18: scale=(2049, 1025).
        assert cfg.data.base_size == (2049, 1025) and cfg.eval.scale == (2049, 1025)
    if family == "ssseg":
        # ssseg/modules/models/backbones/resnet.py: conv3x3 stem with stem_channels 64 (3->32->32->64), v1c.
        assert cfg.model.stem == "v1c" and "v1c" in cfg.model.pretrained_backbone
    if family == "paddleseg":
        m = cfg.model
        # paddleseg/models/ccnet.py: AuxLayer(1024, 512, ...), align_corners default False; resnet_vd.py: every block
        # of a dilated layer at the full dilation; runtime.yml test: whole image, single scale.
        assert (m.aux_channels, m.head_channels, m.align_corners, m.contract_dilation) == (512, 512, False, False)
        assert (cfg.eval.mode, cfg.eval.scale) == ("whole", None)
        assert (cfg.train.iterations, cfg.train.lr, cfg.train.aux_weight) == (60000, 0.01, 0.4)


# sssegmentation iterations per epoch: DistributedSampler (padded to ceil(N / GPUs) samples per rank) and
# DataLoader(drop_last=True): floor(ceil(N / GPUs) / batch per GPU); the total batch (16 or 8) is split over
# the GPUs (auto_adapt_to_expected_train_bs). Epochs from the docs table; N = the training split's size.
SSSEG_SCHEDULES = {"ade20k": (130, 20210, 16), "voc": (60, 10582, 16), "cityscapes": (220, 2975, 8)}


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("ssseg_*.yaml")), ids=lambda p: p.stem)
def test_ssseg_iterations_follow_its_sampler(path):
    cfg = load_config(path)
    epochs, images, total_batch = SSSEG_SCHEDULES[cfg.data.dataset]
    gpus = cfg.train.source_gpus
    assert cfg.data.batch_size * gpus == total_batch
    per_epoch = -(-images // gpus) // (total_batch // gpus)
    assert cfg.train.iterations == epochs * per_epoch
    # 8 GPUs give the same count (the rows do not depend on the GPU count the docs leave open).
    assert per_epoch == -(-images // 8) // (total_batch // 8)
    assert (cfg.data.dataset, per_epoch) in {("ade20k", 1263), ("voc", 661), ("cityscapes", 372)}


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("data", "rescale"), ("data", "base_size"), ("data", "scale_step"), ("data", "cat_max_ratio"),
        ("data", "crop_fallback"),
        ("data", "photometric_distortion"), ("data", "pad_position"), ("train", "min_lr"),
        ("train", "poly_horizon"), ("train", "loss_average"), ("data", "pad_fill"),
        ("eval", "scale"), ("eval", "slide_pad"), ("eval", "val_pad_size"), ("eval", "val_pad_value"),
        ("eval", "upsample"), ("eval", "resize_align_corners"), ("eval", "zero_union"), ("eval", "ms_flip"),
        ("eval", "ms_scales"), ("eval", "ms_mode"), ("eval", "ms_resize"), ("eval", "ms_average"),
        ("eval", "ms_average_at"),
    ],
)
def test_recipe_fields_have_no_default(tmp_path, raw, section, key):
    raw[section].pop(key)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=f"{section}.{key}: required key is missing"):
        load_config(path)


def test_model_kwargs_are_build_arguments():
    cfg = load_config(EXPERIMENTS / "cityscapes_r2.yaml")
    kwargs = model_kwargs(cfg)
    parameters = inspect.signature(models.build).parameters
    assert set(kwargs) <= set(parameters)
    assert kwargs["recurrence"] == 2 and kwargs["num_classes"] == 19


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(colour="red"), "colour: unknown key"),
        (lambda r: r["train"].update(lr_policy="step"), "train.lr_policy: unknown key"),
        (lambda r: r["train"].update(lr="0.01"), "train.lr: expected a number"),
        (lambda r: r["model"].update(recurrence=1.5), "model.recurrence: expected an integer"),
        (lambda r: r["model"].update(recurrence=-1), "model.recurrence: expected >= 0"),
        (lambda r: r["model"].pop("recurrence"), "model.recurrence: required key is missing"),
        (lambda r: r["data"].update(crop_size=[769]), "data.crop_size: expected 2 values"),
        (lambda r: r["data"].update(dataset="kitti"), "data.dataset: expected one of"),
        (lambda r: r["model"].update(aux="yes"), "model.aux: expected true/false"),
        (lambda r: r["model"].update(num_classes=21), "model.num_classes: cityscapes has 19 classes"),
        (lambda r: r["eval"].update(crop_size=None), "eval.crop_size: required when mode is 'slide'"),
        (lambda r: r["eval"].update(slide_pad="edge"), "eval.slide_pad: expected one of"),
        (lambda r: r["eval"].update(zero_union="nan"), "eval.zero_union: expected one of"),
        (lambda r: r["eval"].update(val_pad_size=[1025, 2049]), "eval.val_pad_value: required when val_pad_size"),
        (lambda r: r["eval"].update(val_pad_value=127.5), "eval.val_pad_value: expected null when val_pad_size"),
        (
            lambda r: r["eval"].update(val_pad_size=[1025, 2049], val_pad_value=300),
            "eval.val_pad_value: expected a raw pixel value",
        ),
        (
            lambda r: r["eval"].update(upsample="label_once", val_pad_size=[9, 9], val_pad_value=0,
                                       ms_resize="tensor_input_ratio"),
            "eval.upsample: expected 'input_then_label' with val_pad_size set",
        ),
        (
            lambda r: r["eval"].update(val_pad_size=[9, 9], val_pad_value=0, upsample="input_then_label"),
            "eval.ms_resize: expected a 'tensor_input_*' view with val_pad_size set",
        ),
        (lambda r: r["eval"].update(ms_average="median"), "eval.ms_average: expected one of"),
        (lambda r: r["data"].update(pad_fill="mean"), "data.pad_fill: expected one of"),
        (
            lambda r: r["eval"].update(mode="slide", crop_size=[769, 769], stride=[800, 513]),
            "eval.stride: expected <= crop_size",
        ),
        (lambda r: r["reported"].update(mIoU_test=80.0), "reported.mIoU_test"),
        (lambda r: r.update(train=3), "train: expected a mapping"),
        (lambda r: r["data"].update(rescale="keep_ratio_bounds"), "data.base_size: required when rescale"),
        (lambda r: r["data"].update(base_size=[2048, 1024]), "data.base_size: expected null when rescale"),
        (lambda r: r["data"].update(pad_position="top"), "data.pad_position: expected one of"),
        (lambda r: r["data"].update(cat_max_ratio=0.75), "data.crop_fallback: expected 'fresh_draw' or 'last_draw'"),
        (lambda r: r["train"].update(loss="ohem"), "train.ohem_thresh: required when loss is 'ohem'"),
        (lambda r: r["train"].update(ohem_thresh=0.7), "train.ohem_thresh: expected null unless loss"),
        (
            lambda r: r["train"].update(loss="ohem", ohem_thresh=0.7, ohem_min_kept=10, loss_average="all_pixels"),
            "train.loss_average: expected 'valid_pixels' with loss 'ohem'",
        ),
        (lambda r: r["train"].update(min_lr=0.02), "train.min_lr: expected in [0, lr=0.01)"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, raw, edit, message):
    edit(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_name_must_match_file(tmp_path, raw):
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="name: expected the file stem 'other'"):
        load_config(path)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides(tmp_path, raw):
    path = _write(tmp_path, raw, name="ok")
    cfg = load_config(path, ["train.lr=0.02", "data.crop_size=[65, 65]", "model.pretrained_backbone=null"])
    assert cfg.train.lr == 0.02 and cfg.data.crop_size == (65, 65) and cfg.model.pretrained_backbone is None
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_config(path, ["train.lrr=0.02"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="model.depth: expected 50 or 101"):
        load_config(path, ["model.depth=34"])
    smaller = with_overrides(cfg, {"train.iterations": 2, "eval.ms_scales": (1.0,)})
    assert smaller.train.iterations == 2 and smaller.eval.ms_scales == (1.0,) and smaller.train.lr == 0.02
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(cfg, {"train.nope": 1})


def test_config_is_frozen():
    cfg = load_config(EXPERIMENTS / "cityscapes_r2.yaml")
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_nonlocal_rows_share_the_ccnet_recipe():
    """Each mmsegmentation non-local row differs from its CCNet row only in the decode head (and what was
    reported), so the two networks' estimated memory can be compared as the source compared them."""
    for path in sorted(EXPERIMENTS.glob("mmseg_nonlocal_cityscapes_*.yaml")):
        baseline = load_config(path)
        ccnet = load_config(EXPERIMENTS / path.name.replace("nonlocal_", ""))
        assert baseline.model.head == "nonlocal" and ccnet.model.head == "rcca"
        assert (baseline.data, baseline.train, baseline.eval) == (ccnet.data, ccnet.train, ccnet.eval)
        same = {"depth", "stem", "output_stride", "num_classes", "aux", "aux_channels", "head_channels",
                "align_corners", "pretrained_backbone"}
        assert {key: getattr(baseline.model, key) for key in same} == {key: getattr(ccnet.model, key) for key in same}
        assert "nonlocal_net" in baseline.source and 0 < baseline.reported["mIoU"] < 100


def test_nonlocal_published_numbers_spot_checks():
    r50 = load_config(EXPERIMENTS / "mmseg_nonlocal_cityscapes_r50_d8_512x1024_40k.yaml")
    assert r50.reported == {"mIoU": 78.24, "memory_gb": 7.4, "fps": 2.72}
    r101 = load_config(EXPERIMENTS / "mmseg_nonlocal_cityscapes_r101_d8_769x769_80k.yaml")
    assert r101.reported == {"mIoU": 79.40, "mIoU_ms_flip": 80.85}
