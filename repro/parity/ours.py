"""Our side of the evaluation checks, shared by the sources: `python -m repro.run CONFIG --eval-only` end to end
(its mIoU from the results CSV it writes) and the same `repro.engine.evaluate` in process for the per-pixel
predictions, both with the same `--set` overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import models
from repro.engine.config import load_config, model_kwargs
from repro.engine.data import build_dataset
from repro.engine.distributed import DistContext
from repro.engine.evaluate import evaluate
from repro.engine.runner import load_weights

REPO = Path(__file__).resolve().parents[2]


def our_evaluation(config_path: Path, checkpoint: Path, folder: Path, overrides: list[str]):
    """(completed `repro.run` process, {dataset index: (H, W) train-id prediction}, the val dataset). The
    command writes its mIoU rows to `folder / "ours_miou.csv"`."""
    results = folder / "ours_miou.csv"
    results.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "repro.run",
        str(config_path),
        "--eval-only",
        "--checkpoint",
        str(checkpoint),
        "--results",
        str(results),
        "--out-dir",
        str(folder / "run"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    cfg = load_config(config_path, overrides)
    model = models.build(**{**model_kwargs(cfg), "pretrained_backbone": None})
    load_weights(model, checkpoint, source=None)
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    predictions: dict[int, np.ndarray] = {}
    evaluate(
        model,
        dataset,
        eval_cfg=cfg.eval,
        num_classes=cfg.model.num_classes,
        ignore_index=cfg.data.ignore_index,
        ctx=DistContext(0, 1, 0, torch.device("cpu"), None),
        on_prediction=lambda index, pred: predictions.__setitem__(index, np.asarray(pred)),
        progress=False,
    )
    return done, predictions, dataset
