"""`python -m repro.predict`: attention maps of chosen points (ops.cca_maps, models.attention), palettes and
label PNGs, the prediction command end to end on a tiny random CCNet and on the committed synthetic R=2
checkpoint, and its errors (which leave nothing in --out)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image

import models
from models.attention import attention_at_points, cell_of, record_criss_cross
from models.synthetic import SyntheticSegmenter
from ops.cca_maps import criss_cross_map, criss_cross_probabilities, off_cross_share, point_attention
from repro.engine.data.palettes import palette_for, voc_colour_map
from repro.engine.predict import (
    PredictError,
    collect_images,
    label_png,
    main,
    parse_point,
)
from repro.engine.predict_figures import peak_xy
from repro.pipeline.report import section_predict_example
from repro.synthetic.data import IGNORE_INDEX, MarkerTask, generate
from repro.synthetic.example import write_example
from repro.synthetic.reach import effective_maps, loop_maps

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CHECKPOINT = ROOT / "results" / "synthetic_checkpoints" / "R2_seed0_steps600.pt"
TINY = {"depth": 50, "head_channels": 16, "aux_channels": 16, "pretrained_backbone": None}


def _dense_by_loops(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) x2 -> (HW, HW): pixel by pixel, a softmax over its row and column (itself once)."""
    _, _, height, width = query.shape
    dense = torch.zeros(height * width, height * width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            attended = [(i, jj) for jj in range(width)] + [(ii, j) for ii in range(height) if ii != i]
            energies = torch.stack([(query[0, :, i, j] * key[0, :, a, b]).sum() for a, b in attended])
            weights = torch.softmax(energies.double(), dim=0)
            for (a, b), weight in zip(attended, weights, strict=True):
                dense[i * width + j, a * width + b] = weight
    return dense


# ---------------------------------------------------------------------------------------------------------
# The maps


@pytest.mark.parametrize(("height", "width"), [(5, 7), (1, 4), (6, 1)])
def test_one_pass_map_is_zero_off_the_cross_and_sums_to_one(height, width):
    torch.manual_seed(0)
    query, key = torch.randn(2, 3, height, width), torch.randn(2, 3, height, width)
    points = [(0, 0), (height - 1, width - 1), (height // 2, width // 2)]
    maps = point_attention([criss_cross_probabilities(query, key)], points)
    assert maps.shape == (2, 3, 1, height, width)
    dense = criss_cross_map(query, key)
    for index, (row, col) in enumerate(points):
        weights = maps[:, index, 0]
        off = torch.ones(height, width, dtype=torch.bool)
        off[row, :] = False
        off[:, col] = False
        assert (weights[:, off] == 0).all()
        assert torch.allclose(weights[:, ~off].sum(-1), torch.ones(2))
        assert torch.allclose(weights.flatten(1), dense[:, row * width + col], atol=1e-6)
    assert (off_cross_share(maps, points) == 0).all()


def test_composed_maps_match_brute_force_dense_composition():
    """Rows of A_r ... A_1 for r = 1..3 against dense matrices built pixel by pixel and multiplied out."""
    torch.manual_seed(1)
    height, width = 4, 6
    qk = [(torch.randn(1, 3, height, width), torch.randn(1, 3, height, width)) for _ in range(3)]
    dense = [_dense_by_loops(query, key) for query, key in qk]
    points = [(0, 0), (2, 3), (3, 5)]
    maps = point_attention([criss_cross_probabilities(query, key) for query, key in qk], points)
    composed = dense[0]
    for passes in range(1, 4):
        if passes > 1:
            composed = dense[passes - 1] @ composed
        for index, (row, col) in enumerate(points):
            expected = composed[row * width + col].reshape(height, width).float()
            assert torch.allclose(maps[0, index, passes - 1], expected, atol=1e-6)
    # After two passes attention leaves the row and column: the share off it is the dense map's.
    share = off_cross_share(maps, points)[0, 1, 1]
    row_col = dense[1] @ dense[0]
    off = torch.ones(height, width, dtype=torch.bool)
    off[2, :] = False
    off[:, 3] = False
    assert float(share) == pytest.approx(float(row_col[2 * width + 3].reshape(height, width)[off].sum()), abs=1e-6)


def test_maps_reject_bad_points_and_shapes():
    probabilities = criss_cross_probabilities(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"outside the 3 x 4 attention grid"):
        point_attention([probabilities], [(3, 0)])
    with pytest.raises(ValueError, match="at least one pass"):
        point_attention([], [(0, 0)])
    with pytest.raises(ValueError, match="equal shape"):
        criss_cross_probabilities(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="outside the image"):
        cell_of((10, 0), image_hw=(8, 10), grid_hw=(1, 2))


def test_cell_of_maps_pixels_onto_the_grid():
    assert cell_of((0, 0), image_hw=(64, 96), grid_hw=(8, 12)) == (0, 0)
    assert cell_of((95, 63), image_hw=(64, 96), grid_hw=(8, 12)) == (7, 11)
    assert cell_of((15, 8), image_hw=(64, 96), grid_hw=(8, 12)) == (1, 1)
    assert cell_of((16, 7), image_hw=(64, 96), grid_hw=(8, 12)) == (0, 2)
    weights = np.zeros((8, 12))
    weights[1, 2] = 1.0
    x, y = peak_xy(weights, image_hw=(64, 96))
    assert (x, y) == (19.5, 11.5) and cell_of((x, y), image_hw=(64, 96), grid_hw=(8, 12)) == (1, 2)


@pytest.mark.parametrize("variant", ["R1", "R3"])
def test_every_recurrence_is_recorded_and_the_maps_match_the_dense_ones(variant):
    torch.manual_seed(2)
    model = SyntheticSegmenter(variant=variant, num_classes=5)
    images, _ = generate(1, seed=7)
    result = attention_at_points(model, images, [(5.0, 9.0)])
    passes = int(variant[1])
    assert result.passes == passes and result.modules == ("context",) * passes
    assert result.cells == ((4, 2),) and result.grid_hw == (16, 16)
    composed = effective_maps(loop_maps(model, images))
    for loop in range(passes):
        assert torch.allclose(result.maps[0, 0, loop].flatten(), composed[loop][0, 4 * 16 + 2], atol=1e-6)
    assert torch.allclose(result.logits, model.eval()(images))


def test_maps_are_the_same_whichever_backend_ran_the_block():
    """The Triton block (interpreter on CPU, native on CUDA) records the same q/k, so the same maps."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(3)
    naive = SyntheticSegmenter(variant="R2", num_classes=5, backend="naive").to(device)
    fused = SyntheticSegmenter(variant="R2", num_classes=5, backend="triton").to(device)
    fused.load_state_dict(naive.state_dict())
    images = generate(1, seed=8)[0].to(device)
    expected = attention_at_points(naive, images, [(20, 3)])
    got = attention_at_points(fused, images, [(20, 3)])
    # Fp32 either way; on a GPU the two backends' reductions run in a different order.
    tolerance = 1e-4 if device.type == "cuda" else 1e-5
    assert torch.allclose(got.maps, expected.maps, atol=tolerance)
    assert torch.allclose(got.logits, expected.logits, atol=10 * tolerance)


def test_hooks_are_removed_and_models_without_attention_are_refused():
    model = SyntheticSegmenter(variant="R2", num_classes=5)
    images, _ = generate(1, seed=1)
    with record_criss_cross(model) as passes:
        model(images)
    assert len(passes) == 2
    model(images)
    assert len(passes) == 2 and not model.context._forward_pre_hooks
    with pytest.raises(ValueError, match="no criss-cross attention"):
        attention_at_points(SyntheticSegmenter(variant="R0", num_classes=5), images, [(0, 0)])


def test_committed_r2_checkpoint_reaches_the_marker_in_two_passes_only():
    task = MarkerTask()
    model = SyntheticSegmenter(variant="R2", num_classes=task.num_classes)
    model.load_state_dict(torch.load(SYNTHETIC_CHECKPOINT, map_location="cpu", weights_only=True))
    images, labels = generate(4, seed=123, task=task)
    for index in range(len(images)):
        cells = labels[index, :: task.cell, :: task.cell]
        row, col = (int(v) for v in torch.nonzero((cells > 0) & (cells != IGNORE_INDEX))[0])
        marker = cells == IGNORE_INDEX
        result = attention_at_points(model, images[index : index + 1], [(col * task.cell, row * task.cell)])
        first, second = result.maps[0, 0]
        assert float(first[marker].sum()) == 0.0 and float(result.off_cross[0, 0, 0]) == 0.0
        assert float(second[marker].sum()) > 0.05
        assert torch.allclose(result.maps[0, 0].sum((-2, -1)), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Palettes and label PNGs


def test_palettes_come_from_the_datasets():
    cityscapes = palette_for("cityscapes")
    assert cityscapes.num_classes == 19
    for train_id in range(19):
        assert cityscapes.names[train_id] == trainId2label[train_id].name
        assert tuple(cityscapes.colours[train_id]) == trainId2label[train_id].color
    voc = palette_for("voc")
    assert voc.num_classes == 21 and voc.names[15] == "person"
    # The devkit's colour map: background black, aeroplane (128,0,0), person (192,128,128), 255 the border.
    assert voc.colours[[0, 1, 15]].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128]]
    assert voc_colour_map()[255].tolist() == [224, 224, 192]
    ade = palette_for("ade20k")
    assert ade.num_classes == 150 and ade.names[:3] == ("wall", "building", "sky") and ade.names[-1] == "flag"
    assert ade.colours[0].tolist() == [120, 120, 120] and ade.colours[149].tolist() == [92, 0, 255]
    with pytest.raises(ValueError, match="no palette for dataset 'coco'"):
        palette_for("coco")


@pytest.mark.parametrize("dataset", ["cityscapes", "voc", "ade20k"])
def test_label_png_holds_the_ids_and_the_dataset_palette(tmp_path, dataset):
    palette = palette_for(dataset)
    labels = np.random.default_rng(0).integers(0, palette.num_classes, size=(9, 13)).astype(np.uint8)
    path = tmp_path / "labels.png"
    label_png(labels, palette).save(path)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image), labels)
        colours = np.asarray(image.convert("RGB"))
        stored = image.getpalette()[: 3 * palette.num_classes]
    assert np.array_equal(colours, palette.colours[labels])
    assert stored == palette.colours.flatten().tolist()
    with pytest.raises(ValueError, match=rf"\[0, {palette.num_classes}\)"):
        label_png(np.full((2, 2), palette.num_classes), palette)


# ---------------------------------------------------------------------------------------------------------
# The command


def _config(folder: Path, name: str, **model) -> Path:
    raw = yaml.safe_load((ROOT / "experiments" / "cityscapes_r2.yaml").read_text())
    raw["name"] = name
    raw["model"].update({**TINY, **model})
    # The row slides 769 x 769 windows, zero-padded around these 40-80 px images: a whole 769 x 769 forward per
    # image. Windows smaller than the images keep the row's slide mode and give several windows each.
    raw["eval"].update(crop_size=[33, 33], stride=[22, 22])
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-width R-50 CCNet (R=2) config, its random weights in our and in mmseg's layout, two images."""
    folder = tmp_path_factory.mktemp("tiny")
    config = _config(folder, "tiny_r2")
    torch.manual_seed(0)
    model = models.build(**{**TINY, "recurrence": 2, "num_classes": 19, "aux_channels": 16, "aux": True,
                            "stem": "deep", "contract_dilation": False, "align_corners": True,
                            "head_act": "leaky_relu", "pool_ceil_mode": True})
    model.decode_head.set_gamma(1.0)
    torch.save(model.state_dict(), folder / "ours.pt")
    for source in ("mmseg", "sssegmentation"):
        torch.save({"state_dict": models.export_state_dict(model, source=source)}, folder / f"{source}.pt")
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for name, size in (("street", (48, 80)), ("square", (40, 40))):
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(images / f"{name}.png")
    return {"folder": folder, "config": config, "images": images}


def _run(tiny, out, *extra, checkpoint="ours.pt", config=None):
    return main([str(config or tiny["config"]), *extra, "--checkpoint", str(tiny["folder"] / checkpoint),
                 "--out", str(out), "--no-progress", "--device", "cpu"])


def test_command_writes_masks_overlays_legends_and_attention(tiny, tmp_path):
    out = tmp_path / "out"
    assert _run(tiny, out, str(tiny["images"]), "--attention", "3,5", "39,30") == 0
    for stem, (height, width) in (("street", (48, 80)), ("square", (40, 40))):
        with Image.open(out / f"{stem}_labels.png") as image:
            labels = np.asarray(image)
            assert image.mode == "P" and labels.shape == (height, width) and labels.max() < 19
        with Image.open(out / f"{stem}_overlay.png") as image:
            assert image.size == (width, height) and image.mode == "RGB"
        classes = pd.read_csv(out / f"{stem}_classes.csv")
        assert classes["pixels"].sum() == height * width
        assert set(classes["class_id"]) == set(np.unique(labels).tolist())
        attention = pd.read_csv(out / f"{stem}_attention.csv")
        assert list(attention["after_passes"]) == [1, 2, 1, 2]
        assert attention["peak_x"].between(0, width).all() and attention["peak_y"].between(0, height).all()
        assert (attention.loc[attention["after_passes"] == 1, "share_off_row_column"] == 0).all()
        assert (out / f"{stem}_legend.png").stat().st_size > 0 and (out / f"{stem}_attention.png").stat().st_size > 0
    assert not list(tmp_path.glob(".out.partial-*"))
    # The same weights in mmsegmentation's and sssegmentation's layouts give the same labels.
    for source in ("mmseg", "sssegmentation", "ccrepro", "ours"):
        if source in ("ccrepro", "ours"):  # one name for this project's layout in every command; "ours" an alias
            (tiny["folder"] / f"{source}.pt").write_bytes((tiny["folder"] / "ours.pt").read_bytes())
        again = tmp_path / source
        assert _run(tiny, again, str(tiny["images"] / "street.png"), "--checkpoint-source", source,
                    checkpoint=f"{source}.pt") == 0
        assert np.array_equal(np.asarray(Image.open(again / "street_labels.png")),
                              np.asarray(Image.open(out / "street_labels.png")))


@pytest.mark.parametrize("mode", ["slide", "ms_flip"])
def test_command_runs_every_mode(tiny, tmp_path, mode):
    extra = ["--set", "eval.crop_size=[33,33]", "--set", "eval.stride=[22,22]", "--set", "eval.ms_scales=[0.75,1.0]"]
    assert _run(tiny, tmp_path / mode, str(tiny["images"] / "street.png"), "--mode", mode, *extra) == 0
    assert np.asarray(Image.open(tmp_path / mode / "street_labels.png")).shape == (48, 80)


def _assert_failed_cleanly(capsys, out: Path, *needles: str) -> None:
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_unreadable_images_leave_nothing(tiny, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    assert _run(tiny, out, str(tiny["images"] / "street.png"), str(bad)) == 4
    _assert_failed_cleanly(capsys, out, "cannot read image", "notes.png")
    # A file whose header reads but whose data is cut off fails after the first image was predicted.
    data = (tiny["images"] / "square.png").read_bytes()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    assert _run(tiny, out, str(tiny["images"] / "street.png"), str(truncated)) == 4
    _assert_failed_cleanly(capsys, out, "cannot read image", "cut.png")
    assert _run(tiny, out, str(tmp_path / "missing.png")) == 4
    _assert_failed_cleanly(capsys, out, "missing.png", "does not exist")


def test_checkpoints_that_do_not_fit_are_named(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    image = str(tiny["images"] / "street.png")
    wider = _config(tmp_path, "wider", head_channels=32)
    assert _run(tiny, out, image, config=wider) == 4
    _assert_failed_cleanly(capsys, out, "does not fit config 'wider'", "shape mismatch", "(16, 2048, 3, 3)",
                           "(32, 2048, 3, 3)")
    no_attention = _config(tmp_path, "fcn", head="fcn")
    assert _run(tiny, out, image, config=no_attention) == 4
    _assert_failed_cleanly(capsys, out, "does not fit config 'fcn'", "missing", "unexpected")
    torch.manual_seed(0)
    voc_model = models.build(**{**TINY, "num_classes": 21, "aux_channels": 16, "stem": "deep"})
    torch.save(voc_model.state_dict(), tiny["folder"] / "voc.pt")
    assert _run(tiny, out, image, checkpoint="voc.pt") == 4
    _assert_failed_cleanly(capsys, out, "class count mismatch", "predicts 21 classes", "cityscapes with 19")
    (tiny["folder"] / "notes.pt").write_text("not a checkpoint")
    assert _run(tiny, out, image, checkpoint="notes.pt") == 4
    _assert_failed_cleanly(capsys, out, "cannot read checkpoint", "notes.pt")
    assert _run(tiny, out, image, checkpoint="absent.pt") == 4
    _assert_failed_cleanly(capsys, out, "absent.pt", "does not exist")


def test_bad_points_modes_and_inputs_are_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    image = str(tiny["images"] / "street.png")
    assert _run(tiny, out, image, "--attention", "80,10") == 2
    _assert_failed_cleanly(capsys, out, "(80,10) is outside image", "80 x 48")
    assert _run(tiny, out, image, "--attention", "ten,3") == 2
    _assert_failed_cleanly(capsys, out, "X,Y pixel coordinates", "'ten,3'")
    # A config evaluated whole, without windows: --mode slide has no crop_size to use.
    whole = ["--set", "eval.mode=whole", "--set", "eval.crop_size=null", "--set", "eval.stride=null"]
    assert _run(tiny, out, image, "--mode", "slide", *whole) == 2
    _assert_failed_cleanly(capsys, out, "--mode slide", "crop_size")
    fcn = _config(tmp_path, "fcn_head", head="fcn")
    torch.manual_seed(0)
    fcn_model = models.build(**{**TINY, "head": "fcn", "num_classes": 19, "aux_channels": 16, "stem": "deep",
                                "contract_dilation": False, "head_act": "leaky_relu", "pool_ceil_mode": True})
    torch.save(fcn_model.state_dict(), tiny["folder"] / "fcn.pt")
    assert _run(tiny, out, image, "--attention", "1,1", checkpoint="fcn.pt", config=fcn) == 2
    _assert_failed_cleanly(capsys, out, "no criss-cross attention")
    # A folder that existed keeps what it had.
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    assert _run(tiny, out, image, "--attention", "999,1") == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_collect_images_and_parse_point(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "a" / "x.png", tmp_path / "a" / "y.jpg", tmp_path / "b" / "x.png"):
        Image.new("RGB", (4, 4)).save(path)
    (tmp_path / "a" / "notes.txt").write_text("")
    assert [p.name for p in collect_images([tmp_path / "a"])] == ["x.png", "y.jpg"]
    (tmp_path / "a" / "out").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "out" / "x_overlay.png")
    assert [p.name for p in collect_images([tmp_path / "a"], exclude=tmp_path / "a" / "out")] == ["x.png", "y.jpg"]
    assert [p.name for p in collect_images([str(tmp_path / "a" / "*.jpg")])] == ["y.jpg"]
    with pytest.raises(PredictError, match="same output files"):
        collect_images([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(PredictError, match="no files match"):
        collect_images([str(tmp_path / "*.gif")])
    assert parse_point("12,7") == (12, 7)
    with pytest.raises(PredictError, match="coordinates"):
        parse_point("12")


def test_synthetic_example_predicts_the_marker_class(tmp_path):
    checkpoints = tmp_path / "synthetic_checkpoints"
    checkpoints.mkdir()
    (checkpoints / SYNTHETIC_CHECKPOINT.name).write_bytes(SYNTHETIC_CHECKPOINT.read_bytes())
    written = write_example(out=tmp_path, steps=600, seeds=(0,), progress=False)
    names = {path.name for path in written}
    assert {"marker_example_labels.png", "marker_example_attention.png", "marker_example_attention.csv"} <= names
    attention = pd.read_csv(tmp_path / "predict_example" / "marker_example_attention.csv")
    assert attention["share_off_row_column"].tolist()[0] == 0 and attention["share_off_row_column"].iloc[1] > 0.5
    task = MarkerTask()
    _, labels = generate(1, seed=1_000_003, task=task)
    predicted = np.asarray(Image.open(tmp_path / "predict_example" / "marker_example_labels.png"))
    rectangle = ((labels[0] > 0) & (labels[0] != IGNORE_INDEX)).numpy()
    assert (predicted[rectangle] == int(labels[0][rectangle][0])).mean() > 0.9
    # The report shows it (and says how to make it when it is missing).
    section = section_predict_example(tmp_path)
    assert "predict_example/marker_example_attention.png" in section and "| 2 |" in section
    assert "python -m repro.synthetic.example" in section_predict_example(tmp_path / "elsewhere")


def test_command_refuses_a_malicious_checkpoint(tiny, tmp_path, capsys):
    """A checkpoint whose unpickling would run code is refused by the predict command too (weights-only
    loading), the payload never runs, and --out stays empty."""
    from tests.test_security import write_malicious

    marker = tmp_path / "marker"
    for kind in ("zip", "pickle"):
        write_malicious(tiny["folder"] / f"evil_{kind}.pth", marker, kind=kind)
        out = tmp_path / f"out_{kind}"
        assert _run(tiny, out, str(tiny["images"]), checkpoint=f"evil_{kind}.pth") != 0
        assert "refused to open checkpoint" in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())
    assert not marker.exists()
