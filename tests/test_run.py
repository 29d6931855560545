"""`python -m repro.run`: --smoke on every config in experiments/, the results CSV (appended, never losing
rows), --eval-only, config errors, and the atomic io helpers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import models
from repro.engine.config import load_config, model_kwargs
from repro.engine.data import write_fake_dataset
from repro.engine.runner import RESULT_COLUMNS, main
from repro.io import append_csv_rows, atomic_write_text, read_csv_rows

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted(EXPERIMENTS.glob("*.yaml"))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_smoke_every_config(config, tmp_path):
    out = tmp_path / "run"
    assert main([str(config), "--smoke", "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    cfg = load_config(config)
    rows = _rows(out / "miou.csv")
    expected = ["mIoU"] + (["mIoU_ms_flip"] if cfg.eval.ms_flip else [])
    assert [row["metric"] for row in rows] == expected
    for row in rows:
        assert row["experiment"] == cfg.name and row["dataset"] == cfg.data.dataset
        assert row["schedule"].endswith("(smoke)") and 0.0 <= float(row["measured"]) <= 100.0
        reported = cfg.reported.get(row["metric"])
        if reported is not None:
            assert float(row["delta"]) == pytest.approx(float(row["measured"]) - reported, abs=1e-3)
    assert (out / "checkpoint_last.pt").is_file() and (out / "eval.json").is_file()


def test_results_are_appended_and_eval_only(tmp_path):
    config = EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml"
    results = tmp_path / "miou.csv"
    earlier = {"experiment": "earlier", "metric": "mIoU", "measured": 1.0}
    append_csv_rows(results, [earlier], columns=RESULT_COLUMNS)
    args = ["--smoke", "--out-dir", str(tmp_path / "run"), "--results", str(results), "--no-progress"]
    assert main([str(config), *args]) == 0
    checkpoint = tmp_path / "run" / "checkpoint_last.pt"
    eval_args = ["--eval-only", "--checkpoint", str(checkpoint), "--smoke", "--out-dir", str(tmp_path / "e")]
    assert main([str(config), *eval_args, "--results", str(results), "--no-progress"]) == 0
    rows = _rows(results)
    assert [row["experiment"] for row in rows] == ["earlier"] + [config.stem] * 4
    assert list(rows[0]) == list(RESULT_COLUMNS)
    # The smoke eval-only run restores the trained smoke weights: same predictions, same numbers.
    assert rows[1]["measured"] == rows[3]["measured"] and rows[2]["measured"] == rows[4]["measured"]
    assert rows[3]["checkpoint"] == str(checkpoint)
    # A plain state dict (as a foreign release would be) goes through models.load_checkpoint: same numbers.
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["model"], plain)
    eval_args[2] = str(plain)
    assert main([str(config), *eval_args, "--results", str(results), "--no-progress"]) == 0
    rows = _rows(results)
    assert [row["measured"] for row in rows[5:]] == [rows[1]["measured"], rows[2]["measured"]]


def test_eval_only_needs_no_imagenet_backbone(tmp_path):
    """A released checkpoint replaces every weight: --eval-only works without the config's ImageNet file."""
    config = EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml"
    cfg = load_config(config)
    released = tmp_path / "released.pth"
    model = models.build(**{**model_kwargs(cfg), "pretrained_backbone": None})
    torch.save({"state_dict": models.export_state_dict(model, source="mmseg")}, released)
    root = write_fake_dataset(cfg.data, tmp_path / "data", count=1, size_hw=(33, 44))
    missing = tmp_path / "no_such_backbone.pth"
    overrides = [f"data.root={root}", f"model.pretrained_backbone={missing}", "eval.scale=null",
                 "data.num_workers=0"]
    args = [str(config), "--eval-only", "--checkpoint", str(released), "--checkpoint-source", "mmseg",
            "--out-dir", str(tmp_path / "e"), "--results", str(tmp_path / "e" / "miou.csv"), "--no-progress",
            *[f"--set={item}" for item in overrides]]
    assert main(args) == 0
    assert not missing.exists() and (tmp_path / "e" / "miou.csv").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.yaml"), "--check-data"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    config = EXPERIMENTS / "cityscapes_r2.yaml"
    assert main([str(config), "--check-data", "--set", "model.recurrence=-1"]) == 2
    assert "model.recurrence" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(config), "--eval-only"])  # needs --checkpoint
    # Missing ImageNet weights are reported before anything is trained.
    root = tmp_path / "cs"
    from repro.engine.data import cityscapes

    for split in ("train", "val"):
        cityscapes.write_fake(root, split=split, count=1, size_hw=(8, 8), seed=0)
    code = main([str(config), "--set", f"data.root={root}", "--out-dir", str(tmp_path / "o")])
    assert code == 3 and "model.pretrained_backbone" in capsys.readouterr().err


def test_append_csv_keeps_rows_and_rejects_unknown_columns(tmp_path):
    path = tmp_path / "r.csv"
    append_csv_rows(path, [{"a": 1, "b": "x"}], columns=("a", "b"))
    append_csv_rows(path, [{"a": 2}, {"b": "y,z"}], columns=("a", "b"))
    header, rows = read_csv_rows(path)
    assert header == ["a", "b"] and rows == [{"a": "1", "b": "x"}, {"a": "2", "b": ""}, {"a": "", "b": "y,z"}]
    with pytest.raises(ValueError, match="'c' is not one of the declared columns"):
        append_csv_rows(path, [{"c": 3}], columns=("a", "b"))
    assert len(read_csv_rows(path)[1]) == 3
    # Without declared columns new keys extend the header and earlier rows stay.
    append_csv_rows(path, [{"c": 3}])
    header, rows = read_csv_rows(path)
    assert header == ["a", "b", "c"] and len(rows) == 4
    atomic_write_text(tmp_path / "t.txt", "hello")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "t.txt"]
