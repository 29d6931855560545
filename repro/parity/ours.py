"""Our side of the evaluation checks, shared by the sources: `python -m repro.run CONFIG --eval-only` end to end,
its mIoU from the results CSV it writes and its single-scale predictions from the files its `--save-predictions`
writes (read back through the dataset's own label decoding), so each image set is evaluated once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repro.engine.config import load_config
from repro.engine.data import build_dataset, prediction_path, read_prediction

REPO = Path(__file__).resolve().parents[2]


def our_evaluation(config_path: Path, checkpoint: Path, folder: Path, overrides: Sequence[str], *,
                   extra_args: Sequence[str] = (), out_dir: Path | None = None,
                   results: Path | None = None):
    """(completed `repro.run` process, {dataset index: (H, W) train-id prediction}, the val dataset). The
    command writes its mIoU rows to `results` (default `folder / "ours_miou.csv"`) and its predictions under
    `folder / "predictions"`; the predictions dict is empty when the command failed."""
    results = results or folder / "ours_miou.csv"
    results.unlink(missing_ok=True)
    predictions_dir = folder / "predictions"
    shutil.rmtree(predictions_dir, ignore_errors=True)
    command = [sys.executable, "-m", "repro.run", str(config_path), "--eval-only", "--checkpoint", str(checkpoint),
               "--results", str(results), "--out-dir", str(out_dir or folder / "run"), "--device", "cpu",
               "--no-progress", "--save-predictions", str(predictions_dir), *extra_args]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    cfg = load_config(config_path, list(overrides))
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    predictions: dict[int, np.ndarray] = {}
    if done.returncode == 0:
        for index, (image_path, _) in enumerate(dataset.pairs):
            predictions[index] = read_prediction(cfg.data.dataset,
                                                 prediction_path(cfg.data.dataset, image_path, predictions_dir))
    return done, predictions, dataset
