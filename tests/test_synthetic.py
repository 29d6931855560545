"""The marker task, the synthetic segmenter's reach property, the explicit attention maps, the ablation."""

import pandas as pd
import pytest
import torch

from models.synthetic import VARIANTS, SyntheticSegmenter, receptive_radius_cells
from ops.cca_maps import criss_cross_map
from ops.cost import criss_cross_module_cost, non_local_module_cost
from ops.criss_cross import criss_cross_attention
from repro.synthetic.ablation import (
    TrainSettings,
    count_flops,
    mean_iou,
    object_accuracy,
    object_accuracy_by_class,
    plot_ablation,
    run_ablation,
)
from repro.synthetic.data import (
    IGNORE_INDEX,
    MARKER_COLOURS,
    RECT_COLOURS,
    MarkerTask,
    generate,
    object_classes,
)
from repro.synthetic.reach import effective_maps, loop_maps, plot_attention_reach

TASK = MarkerTask()


def _boxes(cells: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int, int]:
    where = torch.nonzero(mask)
    return (*(int(v) for v in where.min(0).values), *(int(v) for v in where.max(0).values))


def test_generate_is_deterministic_and_seed_dependent():
    images_a, labels_a = generate(16, seed=5)
    images_b, labels_b = generate(16, seed=5)
    images_c, labels_c = generate(16, seed=6)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert not torch.equal(labels_a, labels_c)
    assert images_a.shape == (16, 3, 32, 32) and images_a.dtype == torch.float32
    assert labels_a.shape == (16, 32, 32) and labels_a.dtype == torch.int64
    assert set(labels_a.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}


def test_answer_lies_off_the_criss_cross_path():
    images, labels = generate(400, seed=11)
    classes = object_classes(labels)
    for index in range(len(labels)):
        cells = labels[index, :: TASK.cell, :: TASK.cell]
        m_top, m_left, m_bottom, m_right = _boxes(cells, cells == IGNORE_INDEX)
        r_top, r_left, r_bottom, r_right = _boxes(cells, (cells > 0) & (cells != IGNORE_INDEX))
        assert m_bottom - m_top + 1 == TASK.marker_cells == m_right - m_left + 1
        # Empty cells strictly between the two boxes, along rows and along columns.
        row_gap = max(r_top - m_bottom, m_top - r_bottom) - 1
        col_gap = max(r_left - m_right, m_left - r_right) - 1
        assert row_gap >= TASK.min_gap_cells and col_gap >= TASK.min_gap_cells
        # The class is the marker's colour; the rectangle's colour is from the other palette.
        marker_rgb = images[index, :, labels[index] == IGNORE_INDEX].mean(1)
        nearest = int(((MARKER_COLOURS - marker_rgb.numpy()) ** 2).sum(1).argmin())
        assert nearest + 1 == int(classes[index])
        rect_rgb = images[index, :, (labels[index] > 0) & (labels[index] != IGNORE_INDEX)].mean(1)
        assert float(((RECT_COLOURS - rect_rgb.numpy()) ** 2).sum(1).min()) < 0.01


def test_rectangle_colour_carries_no_class_information():
    images, labels = generate(2000, seed=2)
    classes = object_classes(labels)
    rect_colour = []
    for index in range(len(labels)):
        rgb = images[index, :, (labels[index] > 0) & (labels[index] != IGNORE_INDEX)].mean(1)
        rect_colour.append(int(((RECT_COLOURS - rgb.numpy()) ** 2).sum(1).argmin()))
    table = pd.crosstab(classes.numpy(), rect_colour)
    # Every (class, rectangle colour) pair occurs, each near the 1/16 an independent draw gives.
    assert table.shape == (4, 4)
    assert (table.to_numpy() > 2000 / 16 * 0.6).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [("size", 0), ("cell", 3), ("num_objects", 9), ("rect_min_cells", 6), ("min_gap_cells", 12),
     ("noise", -1.0)],
)
def test_task_rejects_bad_parameters(field, value):
    with pytest.raises(ValueError, match=field if field != "cell" else "multiple"):
        MarkerTask(**{field: value})


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="count"):
        generate(0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        generate(4, seed=-1)


def test_receptive_field_fits_the_gap():
    before, after = receptive_radius_cells()
    assert before + after <= TASK.min_gap_cells


@pytest.mark.parametrize("variant", VARIANTS)
def test_marker_reaches_rectangle_only_with_two_passes(variant):
    """Autograd: d(rectangle logits)/d(marker pixels) is exactly 0 for R=0/1, non-zero for R>=2/non-local."""
    torch.manual_seed(0)
    images, labels = generate(4, seed=3)
    model = SyntheticSegmenter(variant=variant, num_classes=TASK.num_classes).eval()
    images.requires_grad_(True)
    rectangle = (labels > 0) & (labels != IGNORE_INDEX)
    model(images).permute(0, 2, 3, 1)[rectangle].sum().backward()
    on_marker = images.grad.abs().sum(1)[labels == IGNORE_INDEX]
    on_background = images.grad.abs().sum(1)[labels == 0]
    assert on_background.max() > 0
    if variant in ("R0", "R1"):
        assert on_marker.max() == 0
    else:
        assert on_marker.min() > 0


def test_criss_cross_map_matches_the_op():
    torch.manual_seed(1)
    query, key = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7)
    value = torch.randn(2, 6, 5, 7)
    dense = criss_cross_map(query, key)
    assert torch.allclose(dense.sum(-1), torch.ones(2, 35))
    # Pixel (1, 2) attends nothing off row 1 and column 2.
    row = dense[0, 1 * 7 + 2].reshape(5, 7)
    off_cross = torch.ones(5, 7, dtype=torch.bool)
    off_cross[1, :] = False
    off_cross[:, 2] = False
    assert (row[off_cross] == 0).all() and (row[~off_cross] > 0).all()
    explicit = torch.einsum("bpq,bcq->bcp", dense, value.flatten(2)).reshape(2, 6, 5, 7)
    assert torch.allclose(explicit, criss_cross_attention(query, key, value, backend="naive"), atol=1e-5)


def test_effective_attention_reaches_marker_after_two_loops():
    torch.manual_seed(0)
    model = SyntheticSegmenter(variant="R2", num_classes=TASK.num_classes).eval()
    images, labels = generate(1, seed=4)
    cells = labels[0, ::2, ::2]
    rect = torch.nonzero((cells > 0) & (cells != IGNORE_INDEX))[0]
    pixel = int(rect[0]) * TASK.grid + int(rect[1])
    marker = (cells == IGNORE_INDEX).flatten()
    first, second = effective_maps(loop_maps(model, images))
    assert first[0, pixel][marker].sum() == 0
    assert second[0, pixel][marker].sum() > 0
    assert torch.allclose(second.sum(-1), torch.ones_like(second.sum(-1)), atol=1e-5)


def test_flops_match_the_analytic_module_costs():
    flops = {
        variant: count_flops(SyntheticSegmenter(variant=variant, num_classes=5), height=32, width=32)[0]
        for variant in VARIANTS
    }
    attention = SyntheticSegmenter(variant="R1", num_classes=5).context
    channels, qk_channels = attention.in_channels, attention.qk_channels
    one_loop = criss_cross_module_cost(1, channels, qk_channels, 16, 16, recurrence=1).flops
    assert flops["R1"] - flops["R0"] == one_loop
    assert flops["R3"] - flops["R2"] == one_loop
    assert flops["nonlocal"] - flops["R0"] == non_local_module_cost(1, channels, qk_channels, 16, 16).flops


def test_metrics_on_known_predictions():
    labels = torch.tensor([[[0, 0], [2, IGNORE_INDEX]], [[0, 1], [1, 1]]])
    perfect = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
    assert mean_iou(perfect, labels, num_classes=3) == pytest.approx(1.0)
    assert object_accuracy(perfect, labels, num_classes=3) == 1.0
    wrong = perfect.clone()
    wrong[0, 1, 0] = 1  # image 0's object predicted as class 1
    assert object_accuracy(wrong, labels, num_classes=3) == 0.5
    assert object_accuracy_by_class(wrong, labels, num_classes=3) == "c1:1.00 c2:0.00"
    # class 1: tp 3, fp 1 -> 0.75; class 2: tp 0 -> 0; background: 3/3 -> 1.
    assert mean_iou(wrong, labels, num_classes=3) == pytest.approx((1 + 0.75 + 0) / 3)


def test_ablation_writes_csv_resumes_and_plots(tmp_path):
    settings = TrainSettings(steps=3, batch=4, train_images=16, val_images=8)
    rows = run_ablation(out=tmp_path, variants=("R1", "R2"), seeds=(0,), settings=settings)
    csv = pd.read_csv(tmp_path / "synthetic_ablation.csv")
    assert list(csv["variant"]) == ["R1", "R2"] and len(rows) == 2
    assert (csv["params"] > 0).all() and (csv["flops"] > 0).all() and (csv["peak_memory_bytes"] > 0).all()
    assert csv["miou"].between(0, 1).all() and (csv["steps"] == 3).all()
    # A rerun finds both runs done and trains nothing; --force retrains them.
    again = run_ablation(out=tmp_path, variants=("R1", "R2"), seeds=(0,), settings=settings)
    assert again["date"].tolist() == csv["date"].tolist() and again["train_time_s"].tolist() == csv[
        "train_time_s"].tolist()
    forced = run_ablation(out=tmp_path, variants=("R2",), seeds=(0,), settings=settings, force=True)
    assert len(forced) == 2 and forced.iloc[-1]["variant"] == "R2"
    plot_ablation(tmp_path / "synthetic_ablation.csv", tmp_path / "plots" / "synthetic_ablation.png")
    png = plot_attention_reach(out=tmp_path, steps=3, seeds=(0,))
    assert png.stat().st_size > 0 and (tmp_path / "plots" / "synthetic_ablation.png").stat().st_size > 0
    reach = pd.read_csv(tmp_path / "attention_reach.csv")
    assert reach["attention_share_on_marker"].iloc[0] == 0 and reach["attention_share_on_marker"].iloc[1] > 0


def test_ablation_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="R9"):
        run_ablation(out=tmp_path, variants=("R9",), seeds=(0,), settings=TrainSettings(steps=1))
