"""Confusion-matrix metrics by hand, and parity of the Cityscapes mIoU with cityscapesscripts' own
evaluator on predictions written in the Cityscapes layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import trainId2label
from torch import nn

from repro.engine.config import EvalConfig, load_config, model_kwargs, with_overrides
from repro.engine.data import build_dataset, cityscapes, write_fake_dataset
from repro.engine.distributed import init_distributed
from repro.engine.evaluate import evaluate
from repro.engine.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_and_iou_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    matrix = confusion_matrix(predictions, labels, num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    ious = iou_per_class(matrix)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: 2/(2+1) ; class 2: 1/2; class 3 absent -> NaN
    assert np.allclose(ious[:3], [1 / 3, 2 / 3, 1 / 2]) and math.isnan(ious[3])
    assert mean_iou(matrix) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(matrix) == pytest.approx(4 / 6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), num_classes=2)
    with pytest.raises(ValueError, match="label value 7"):
        confusion_matrix(torch.zeros(1, 2), torch.tensor([[7, 0]]), num_classes=3)
    with pytest.raises(ValueError, match="prediction value 3"):
        confusion_matrix(torch.tensor([[3]]), torch.tensor([[0]]), num_classes=3)
    assert math.isnan(mean_iou(np.zeros((3, 3))))


def test_cityscapes_miou_equals_official_evaluator(tmp_path, monkeypatch):
    """Our loader (label ids -> train ids) + confusion matrix vs cityscapesscripts reading label-id files."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official

    cfg = load_config("experiments/cityscapes_r2.yaml")
    cfg = with_overrides(cfg, {"data.root": str(tmp_path / "cs")})
    write_fake_dataset(cfg.data, tmp_path / "cs", count=3, size_hw=(16, 24), seed=5)
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    torch.manual_seed(0)
    # A fixed random per-pixel classifier: predictions vary with the image, every class can appear.
    model = nn.Conv2d(3, 19, kernel_size=1)
    prediction_dir = tmp_path / "results"

    def write(index: int, train_ids: np.ndarray) -> None:
        image = dataset.pairs[index][0]
        stem = image.name[: -len("_leftImg8bit.png")]
        path = prediction_dir / f"{stem}_pred.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(cityscapes.train_ids_to_label_ids(train_ids)).save(path)

    ctx = init_distributed(device="cpu")
    ours = evaluate(
        model, dataset, eval_cfg=EvalConfig.native_whole(), num_classes=19, ignore_index=255, ctx=ctx,
        on_prediction=write, progress=False,
    )["mIoU"]

    args = official.args
    for name, value in dict(
        evalInstLevelScore=False, JSONOutput=False, quiet=True, colorized=False, evalPixelAccuracy=False,
        predictionPath=str(prediction_dir), predictionWalk=None,
    ).items():
        monkeypatch.setattr(args, name, value, raising=False)
    ground_truth = [str(pair[1]) for pair in dataset.pairs]
    predictions = [official.getPrediction(args, gt) for gt in ground_truth]
    result = official.evaluateImgLists(predictions, ground_truth, args)

    assert ours.miou == pytest.approx(100 * result["averageScoreClasses"], abs=1e-9)
    for train_id, iou in enumerate(ours.iou_per_class):
        theirs = result["classScores"][trainId2label[train_id].name]
        assert (math.isnan(iou) and math.isnan(theirs)) or iou == pytest.approx(100 * theirs, abs=1e-9)
    assert 0 < ours.miou < 100


@pytest.mark.slow
def test_run_cli_predictions_match_official_evaluator(tmp_path, monkeypatch):
    """`python -m repro.run --eval-only --save-predictions`: the CSV's mIoU equals the official evaluator's on
    the label-id files the CLI wrote."""
    import csv

    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official

    import models
    from repro.engine.runner import main

    overrides = [
        f"data.root={tmp_path / 'cs'}",
        "model.depth=50",
        "model.head_channels=16",
        "model.aux_channels=16",
        "model.pretrained_backbone=null",
    ]
    config = "experiments/cityscapes_r2.yaml"
    cfg = load_config(config, overrides)
    write_fake_dataset(cfg.data, tmp_path / "cs", count=2, size_hw=(24, 32), seed=9)
    torch.manual_seed(0)
    model = models.build(**model_kwargs(cfg))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    predictions_dir, results = tmp_path / "predictions", tmp_path / "miou.csv"
    args = [config, "--eval-only", "--checkpoint", str(tmp_path / "weights.pt"), "--no-progress"]
    args += ["--save-predictions", str(predictions_dir), "--results", str(results), "--out-dir", str(tmp_path / "o")]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    with results.open(newline="") as f:
        (row,) = list(csv.DictReader(f))

    official_args = official.args
    for name, value in dict(
        evalInstLevelScore=False, JSONOutput=False, quiet=True, colorized=False, evalPixelAccuracy=False,
        predictionPath=str(predictions_dir), predictionWalk=None,
    ).items():
        monkeypatch.setattr(official_args, name, value, raising=False)
    ground_truth = sorted(str(p) for p in (tmp_path / "cs" / "gtFine" / "val").glob("*/*_labelIds.png"))
    predictions = [official.getPrediction(official_args, gt) for gt in ground_truth]
    result = official.evaluateImgLists(predictions, ground_truth, official_args)
    assert float(row["measured"]) == pytest.approx(100 * result["averageScoreClasses"], abs=1e-4)
