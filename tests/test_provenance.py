"""results/miou.csv provenance (`repro.engine.provenance`): which rows are complete, how the others are labelled,
old-format files read and refused, hashes and commit."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path

import pytest

from repro.engine import provenance
from repro.engine.config import load_config, with_overrides
from repro.engine.evaluate import protocol_summary
from repro.engine.provenance import (
    LEGACY_RESULT_COLUMNS,
    RESULT_COLUMNS,
    Provenance,
    check_results_csv,
    read_results,
    result_rows,
    row_kind,
)
from repro.io import CsvFormatError, append_csv_rows

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml"


def _prov(**changes) -> Provenance:
    base = Provenance(
        overrides=("data.root=/data/cityscapes", "train.seed=3"), smoke=False, seed=3, iterations_trained=40000,
        iterations_config=40000, images_evaluated=500, images_in_split=500, checkpoint="runs/x/checkpoint_last.pt",
        checkpoint_sha256="ab" * 32, config_sha256="cd" * 32, commit="unknown", device="cpu: test",
    )
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass
class _Result:
    miou: float


def test_complete_only_for_a_full_evaluation_of_the_full_unmodified_recipe():
    assert _prov().complete  # where the data is and the seed do not change the recipe
    assert _prov(iterations_trained=None, iterations_config=None).complete  # a released checkpoint
    assert not _prov(smoke=True).complete
    assert not _prov(images_evaluated=2).complete
    assert not _prov(iterations_trained=2).complete
    assert not _prov(overrides=("train.lr=0.02",)).complete
    assert not _prov(overrides=("model.pretrained_backbone=null",)).complete  # trained from scratch
    assert _prov(overrides=("model.pretrained_backbone=weights/r50.pth", "model.backend=triton")).complete
    assert not _prov(notes=("effective_batch=2 (source 8)",)).complete


def test_rows_carry_every_column_and_say_why_they_do_not_count():
    cfg = load_config(CONFIG)
    results = {"mIoU": _Result(77.5)}
    (row,) = result_rows(cfg, results, _prov(), protocol=protocol_summary, date="d")
    assert list(row) == list(RESULT_COLUMNS)
    assert row["complete"] == "true" and row["smoke"] == "false" and row["seed"] == 3
    assert row["delta"] == pytest.approx(77.5 - cfg.reported["mIoU"])
    # The protocol columns are protocol_summary's, verbatim.
    assert {key: row[key] for key in protocol_summary(cfg.eval, "mIoU")} == protocol_summary(cfg.eval, "mIoU")
    assert row["eval_mode"] == cfg.eval.mode and row["eval_flip"] == "false"
    assert row_kind(row) == "complete"
    kinds = {
        "smoke": _prov(smoke=True),
        "partial evaluation (2 of 500 images)": _prov(images_evaluated=2),
        "partial training (2 of 40000 iterations)": _prov(iterations_trained=2),
        "overridden (train.lr=0.02)": _prov(overrides=("data.root=/d", "train.lr=0.02")),
        "overridden (effective_batch=2 (source 8))": _prov(notes=("effective_batch=2 (source 8)",)),
    }
    for kind, prov in kinds.items():
        (row,) = result_rows(cfg, results, prov, protocol=protocol_summary)
        assert row["complete"] == "false" and row_kind(row) == kind
    smoke_row = result_rows(cfg, results, _prov(smoke=True), protocol=protocol_summary)[0]
    assert "smoke" in smoke_row["overrides"]


def test_multiscale_rows_name_their_protocol():
    cfg = with_overrides(load_config(CONFIG), {"eval.ms_flip": True, "eval.ms_scales": (0.5, 1.0, 1.5)})
    rows = result_rows(cfg, {"mIoU": _Result(1.0), "mIoU_ms_flip": _Result(2.0)}, _prov(), protocol=protocol_summary)
    assert [(r["metric"], r["eval_flip"]) for r in rows] == [("mIoU", "false"), ("mIoU_ms_flip", "true")]
    for row in rows:
        assert {key: row[key] for key in protocol_summary(cfg.eval, row["metric"])} == \
            protocol_summary(cfg.eval, row["metric"])
    assert rows[0]["eval_scales"] != rows[1]["eval_scales"]
    assert all(f"{scale:g}" in rows[1]["eval_scales"] for scale in (0.5, 1.0, 1.5))
    with pytest.raises(ValueError, match="lacks"):
        result_rows(cfg, {"mIoU": _Result(1.0)}, _prov(), protocol=lambda eval_cfg, metric: {"eval_mode": "x"})


def _write_legacy(path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LEGACY_RESULT_COLUMNS)
        writer.writeheader()
        writer.writerow({"experiment": "cityscapes_r2", "metric": "mIoU", "measured": "1.06", "schedule": "60000it"})


def test_old_format_is_read_labelled_and_never_appended_to(tmp_path):
    path = tmp_path / "miou.csv"
    _write_legacy(path)
    frame = read_results(path)
    assert list(frame["row_kind"]) == ["old format (no provenance)"] and list(frame["complete"]) == [""]
    before = path.read_bytes()
    with pytest.raises(CsvFormatError) as err:
        check_results_csv(path)
    message = str(err.value)
    assert "old result format" in message and "images_evaluated" in message and "checkpoint, device, date" in message
    assert path.read_bytes() == before
    other = tmp_path / "other.csv"
    append_csv_rows(other, [{"a": 1}], columns=("a",))
    with pytest.raises(CsvFormatError, match="header does not match"):
        check_results_csv(other)
    with pytest.raises(CsvFormatError, match="neither the result format"):
        read_results(other)
    check_results_csv(tmp_path / "new.csv")  # a file that does not exist yet is fine


def test_hashes_and_commit(tmp_path):
    cfg = load_config(CONFIG)
    assert provenance.config_sha256(cfg) == provenance.config_sha256(load_config(CONFIG))
    assert provenance.config_sha256(cfg) != provenance.config_sha256(with_overrides(cfg, {"train.lr": 0.02}))
    blob = tmp_path / "weights.pt"
    blob.write_bytes(b"x" * 10)
    assert provenance.file_sha256(blob, chunk=3) == hashlib.sha256(b"x" * 10).hexdigest()
    assert provenance.git_commit(tmp_path) == "unknown"
    commit = provenance.git_commit()
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)


def test_config_differences_name_the_dotted_keys():
    a = {"model": {"head_channels": 512, "scales": (1, 2)}, "train": {"lr": 0.01}}
    b = {"model": {"head_channels": 16, "scales": [1, 2]}, "train": {"lr": 0.01}}
    assert provenance.config_differences(a, b) == [("model.head_channels", 512, 16)]
