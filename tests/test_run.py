"""`python -m repro.run`: --smoke on every config in experiments/, the results CSV (appended, never losing
rows), --eval-only, config errors, and the atomic io helpers."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

import models
from repro.engine.config import ConfigError, load_config, model_kwargs, with_overrides
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
        assert row["smoke"] == "true" and row["complete"] == "false" and 0.0 <= float(row["measured"]) <= 100.0
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


# ---------------------------------------------------------------------------------------------------------
# Run folders, provenance rows, eval-only of a smoke checkpoint, seeds, validation during training.

R50 = EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml"


def _smoke(out: Path, *extra: str) -> int:
    return main([str(R50), "--smoke", "--out-dir", str(out), "--no-progress", "--device", "cpu", *extra])


def test_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert _smoke(out) == 0
    printed = capsys.readouterr().out
    # The closing lines say smoke, the run folder, the checkpoint's size and every file written.
    assert "SMOKE" in printed and f"run folder: {out}" in printed and " MB, step 2 of 2)" in printed
    for name in ("config.yaml", "eval.json", "iou_per_class.csv", "confusion_mIoU.csv", "confusion_mIoU.png",
                 "curves.png", "train_log.jsonl", "miou.csv"):
        assert (out / name).is_file(), name
        assert name in printed or name == "miou.csv", name
    checkpoint, rows = (out / "checkpoint_last.pt").read_bytes(), len(_rows(out / "miou.csv"))
    # Again without --resume: refused, naming --resume and --force; nothing touched.
    assert _smoke(out) == 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m repro.run: error: ") and "--resume" in err and "--force" in err
    assert "finished run (checkpoint at step 2 of 2)" in err and len(err.splitlines()) == 1
    assert (out / "checkpoint_last.pt").read_bytes() == checkpoint and len(_rows(out / "miou.csv")) == rows
    # --resume of a finished, evaluated run: says so, appends nothing.
    assert _smoke(out, "--resume") == 0
    assert "is finished (step 2 of 2) and evaluated" in capsys.readouterr().out
    assert len(_rows(out / "miou.csv")) == rows
    # --force starts again from nothing (the old log and rows are gone, not mixed).
    (out / "notes.txt").write_text("mine")
    assert _smoke(out, "--force") == 0
    assert "--force: removed the previous run's files" in capsys.readouterr().out
    assert len(_rows(out / "miou.csv")) == rows and (out / "notes.txt").read_text() == "mine"
    events = [json.loads(line)["event"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("eval") == rows
    # A resume with another recipe is refused, naming the key.
    assert _smoke(out, "--resume", "--set", "train.lr=0.5") == 2
    assert "train.lr (0.01 in the checkpoint, 0.5 now)" in capsys.readouterr().err


def test_resume_without_a_checkpoint_announces_a_fresh_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert _smoke(out, "--resume") == 0
    assert f"--resume: no checkpoint_last.pt in {out}; starting from step 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(R50), "--resume", "--force"])


def test_smoke_row_provenance(tmp_path):
    out = tmp_path / "run"
    assert _smoke(out) == 0
    row = _rows(out / "miou.csv")[0]
    assert list(row) == list(RESULT_COLUMNS)
    assert (row["smoke"], row["complete"], row["seed"]) == ("true", "false", "0")
    assert (row["images_evaluated"], row["images_in_split"]) == ("1", "2")
    assert (row["iterations_trained"], row["iterations_config"]) == ("2", "2")
    assert row["eval_mode"] == "whole" and row["eval_flip"] == "false" and row["engine"] == "torch"
    assert "smoke" in row["overrides"]
    assert row["checkpoint_sha256"] == hashlib.sha256((out / "checkpoint_last.pt").read_bytes()).hexdigest()
    config_text = (out / "config.yaml").read_text()
    assert f"# config_sha256: {row['config_sha256']}" in config_text
    assert row["commit"] == "unknown" or len(row["commit"]) == 40
    # The effective (shrunk) config is in the run folder and in the checkpoint.
    saved = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert saved["config"]["model"]["head_channels"] == 16 and saved["meta"]["smoke"] is True
    assert "head_channels: 16" in config_text


def test_eval_only_of_a_smoke_checkpoint_rebuilds_its_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert _smoke(out, "--set", "train.lr=0.02") == 0
    cfg = load_config(R50)
    root = write_fake_dataset(cfg.data, tmp_path / "data", count=3, size_hw=(40, 48))
    capsys.readouterr()
    args = [str(R50), "--eval-only", "--checkpoint", str(out / "checkpoint_last.pt"), "--set", f"data.root={root}",
            "--set", "eval.scale=null", "--set", "data.num_workers=0", "--out-dir", str(tmp_path / "e"),
            "--results", str(tmp_path / "e.csv"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "building the model the smoke checkpoint was trained with" in printed and "head_channels=16" in printed
    assert "evaluate 3 of 3 images" in printed and "first image" in printed and "SMOKE" in printed
    row = _rows(tmp_path / "e.csv")[0]
    # Full evaluation, but of a smoke checkpoint trained with an override: labelled, never complete.
    assert (row["images_evaluated"], row["images_in_split"], row["smoke"], row["complete"]) == ("3", "3", "true",
                                                                                                "false")
    assert "train.lr=0.02" in row["overrides"] and row["iterations_trained"] == "2"
    # A --set model.* that contradicts the checkpoint is refused, naming the key.
    assert main([*args, "--set", "model.head_channels=32"]) == 2
    assert "model.head_channels" in capsys.readouterr().err
    # An old-format results CSV is refused before anything runs, naming the columns.
    legacy = tmp_path / "legacy.csv"
    legacy.write_text("experiment,dataset,backbone,crop,schedule,metric,reported,measured,delta,checkpoint,device,"
                      "date\nx,,,,,mIoU,,1,,,,\n")
    args[args.index("--results") + 1] = str(legacy)
    assert main(args) == 4
    assert "old result format" in capsys.readouterr().err and legacy.read_text().count("\n") == 2


def test_seeds_train_one_folder_each_and_summarise(tmp_path, capsys):
    base = tmp_path / "run"
    assert main([str(R50), "--smoke", "--seeds", "0", "1", "--out-dir", str(base), "--no-progress",
                 "--device", "cpu"]) == 0
    seeds = [_rows(tmp_path / f"run-seed{seed}" / "miou.csv")[0]["seed"] for seed in (0, 1)]
    assert seeds == ["0", "1"]
    checkpoints = [torch.load(tmp_path / f"run-seed{s}" / "checkpoint_last.pt", weights_only=True) for s in (0, 1)]
    assert [c["config"]["train"]["seed"] for c in checkpoints] == [0, 1]
    assert not torch.equal(checkpoints[0]["model"]["decode_head.classifier.weight"],
                           checkpoints[1]["model"]["decode_head.classifier.weight"])
    assert "mIoU over seeds 0 1:" in capsys.readouterr().out


def test_validation_during_training_keep_best_and_tensorboard(tmp_path, monkeypatch):
    from repro.engine import train as train_module
    from repro.engine.distributed import init_distributed

    scalars = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append(("closed", -1))

    monkeypatch.setattr(train_module, "tensorboard_writer", lambda folder: FakeWriter())
    cfg = load_config(R50)
    root = write_fake_dataset(cfg.data, tmp_path / "data", count=2, size_hw=(33, 44))
    from repro.engine.runner import smoke_config

    cfg = with_overrides(smoke_config(cfg, data_root=root), {"train.iterations": 3, "train.val_every": 1,
                                                            "train.keep_best": True, "train.checkpoint_every": 3})
    lines = []
    train_module.train(cfg, out_dir=tmp_path / "run", ctx=init_distributed(device="cpu"), progress=False,
                       announce=lines.append)
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["event"] == "val"]
    # Validated after steps 1 and 2; the last step is left to the final evaluation, as in the sources.
    assert [r["step"] for r in validations] == [1, 2]
    assert validations[0]["class_names"][:3] == ["road", "sidewalk", "building"]
    assert len(validations[0]["iou_per_class"]) == 19
    best = torch.load(tmp_path / "run" / "checkpoint_best.pt", weights_only=True)
    assert best["val_miou"] == max(r["mIoU"] for r in validations)
    assert ("val/mIoU", 1) in scalars and ("train/loss", 3) in scalars and scalars[-1] == ("closed", -1)
    assert any("validation every 1 steps on 2 images" in line for line in lines)
    assert any(line.startswith(f"{cfg.name}: first step") for line in lines)
    # keep_best needs validations.
    with pytest.raises(ConfigError, match="train.keep_best"):
        with_overrides(cfg, {"train.val_every": None})


def test_effective_batch_note_says_how_to_match_the_source():
    from repro.engine.train import effective_batch_note

    cfg = load_config(R50)  # 2 per GPU x 4 GPUs
    note = effective_batch_note(cfg, world_size=1)
    assert "effective batch 2" in note and "8 = 4 GPUs x 2" in note and "train.grad_accum_steps=4" in note
    assert effective_batch_note(cfg, world_size=4) is None
    assert effective_batch_note(with_overrides(cfg, {"train.grad_accum_steps": 2}), world_size=2) is None
    assert "not a multiple" in effective_batch_note(with_overrides(cfg, {"data.batch_size": 3}), world_size=3)


def test_curves_follow_resumes(tmp_path):
    from repro.engine.run_figures import draw_curves, read_log

    log = tmp_path / "train_log.jsonl"
    first = ({"event": "train", "step": s, "loss": 1.0, "lr": 0.1} for s in (1, 2, 3))
    records = [{"event": "start", "step": 0}, *first, {"event": "resume", "step": 2},
               {"event": "train", "step": 3, "loss": 0.5, "lr": 0.05}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{torn")
    train = read_log(log)["train"]
    assert [(r["step"], r["loss"]) for r in train] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    assert draw_curves(tmp_path).stat().st_size > 0
    assert draw_curves(tmp_path / "empty") is None


def test_eval_only_needs_only_the_validation_split(tmp_path):
    cfg = load_config(R50)
    root = write_fake_dataset(cfg.data, tmp_path / "data", count=1, size_hw=(33, 44))
    import shutil

    shutil.rmtree(root / "leftImg8bit" / "train")
    shutil.rmtree(root / "gtFine" / "train")
    released = tmp_path / "released.pth"
    model = models.build(**{**model_kwargs(cfg), "pretrained_backbone": None, "head_channels": 16,
                            "aux_channels": 16})
    torch.save({"state_dict": models.export_state_dict(model, source="mmseg")}, released)
    args = [str(R50), "--eval-only", "--checkpoint", str(released), "--checkpoint-source", "mmseg", "--set",
            f"data.root={root}", "--set", "eval.scale=null", "--set", "eval.ms_flip=false", "--set",
            "model.head_channels=16", "--set", "model.aux_channels=16", "--set", "data.num_workers=0",
            "--out-dir", str(tmp_path / "e"), "--results", str(tmp_path / "e.csv"), "--no-progress"]
    assert main(args) == 0
    row = _rows(tmp_path / "e.csv")[0]
    # A released checkpoint: no iterations of ours; the width overrides make the row overridden, not complete.
    assert row["iterations_trained"] == "" and row["schedule"] == "released" and row["complete"] == "false"
    assert "model.head_channels=16" in row["overrides"]
    assert main([str(R50), "--check-data", "--set", f"data.root={root}"]) == 3  # training needs both splits


def test_keep_best_survives_a_resume(tmp_path):
    from repro.engine import train as train_module
    from repro.engine.distributed import init_distributed
    from repro.engine.runner import smoke_config

    cfg = load_config(R50)
    root = write_fake_dataset(cfg.data, tmp_path / "data", count=2, size_hw=(33, 44))
    cfg = with_overrides(smoke_config(cfg, data_root=root), {"train.iterations": 4, "train.val_every": 1,
                                                            "train.keep_best": True, "train.checkpoint_every": 4})
    out = tmp_path / "run"
    ctx = init_distributed(device="cpu")
    train_module.train(cfg, out_dir=out, ctx=ctx, progress=False, stop_at=2, announce=lambda text: None)
    first = torch.load(out / "checkpoint_best.pt", weights_only=True)["val_miou"]
    # The last checkpoint was saved when the best improved, with the best so far; the resumed run keeps it.
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["best_val_miou"] == first
    train_module.train(cfg, out_dir=out, ctx=ctx, resume=True, progress=False, announce=lambda text: None)
    validations = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    values = [r["mIoU"] for r in validations if r["event"] == "val"]
    assert [r["step"] for r in validations if r["event"] == "val"] == [1, 2, 3]
    assert torch.load(out / "checkpoint_best.pt", weights_only=True)["val_miou"] == max(values)
