"""Where every row of results/miou.csv comes from: config hash and overrides, checkpoint hash, how much was
trained and evaluated, smoke or not, seed, evaluation protocol, code commit and device.

A row is `complete` only when it is a full evaluation (every image of the split) of an unmodified config
(no override outside `RUNTIME_KEYS`, the source's effective batch) trained to its full schedule (or a
released checkpoint, whose training is the source's), and not a smoke run. The report's verdicts use only
complete rows; the others are listed apart with `row_kind` saying why they do not count.

results/miou.csv files written before this format (`LEGACY_RESULT_COLUMNS`, no provenance) are read by the
report as "old format (no provenance)" rows, never counted; `repro.run` refuses to append to one
(`check_results_csv`), naming both column lists, so the two layouts are never mixed in one file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from repro.io import CsvFormatError, check_csv_header, read_csv_rows

# The provenance format of results/miou.csv (one row per measured metric).
RESULT_COLUMNS = (
    "experiment", "dataset", "backbone", "crop", "schedule", "metric", "reported", "measured", "delta", "seed",
    "eval_mode", "eval_scales", "eval_flip", "eval_average", "engine", "precision", "images_evaluated",
    "images_in_split", "iterations_trained", "iterations_config", "smoke", "complete", "overrides",
    "config_sha256", "checkpoint", "checkpoint_sha256", "commit", "device", "date",
)  # fmt: skip
# The format before provenance (no seed, overrides, image counts, smoke flag, protocol).
LEGACY_RESULT_COLUMNS = (
    "experiment", "dataset", "backbone", "crop", "schedule", "metric", "reported", "measured", "delta",
    "checkpoint", "device", "date",
)  # fmt: skip
EVAL_COLUMNS = ("eval_mode", "eval_scales", "eval_flip", "eval_average")

# Overrides that do not change what is trained or measured: where the data is, how many loader workers,
# the seed (its own column), logging, checkpoint and validation intervals, the attention kernel (same
# maths), the memory layout, the accumulation split (the effective batch is checked on its own) and
# whether the multi-scale metric is measured as well (the single-scale one is unchanged).
RUNTIME_KEYS = frozenset({
    "data.root", "data.num_workers", "train.seed", "train.log_every", "train.checkpoint_every",
    "train.val_every", "train.keep_best", "train.grad_accum_steps", "model.backend", "model.channels_last",
    "eval.ms_flip",
})  # fmt: skip
# Overrides of this key count as runtime unless they switch the ImageNet initialisation off (null).
BACKBONE_KEY = "model.pretrained_backbone"
EFFECTIVE_BATCH = "effective_batch"
SMOKE_NOTE = "smoke (shrunk model, generated data)"

ROW_COMPLETE = "complete"
ROW_SMOKE = "smoke"
ROW_OLD = "old format (no provenance)"


def config_sha256(cfg: Any) -> str:
    """SHA-256 of the effective config (a dataclass or a mapping) as canonical JSON (sorted keys)."""
    raw = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks (a 350 MB checkpoint takes about a second)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def git_commit(where: str | Path | None = None) -> str:
    """The commit checked out at `where` (default: this package's folder), or "unknown" outside a git
    checkout (an installed package, a source archive) or without git."""
    folder = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else "unknown"


def override_key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def is_recipe_override(override: str) -> bool:
    """True when the `KEY=VALUE` override changes what is trained or measured (see RUNTIME_KEYS)."""
    key = override_key(override)
    if key == BACKBONE_KEY:
        value = override.split("=", 1)[1].strip() if "=" in override else ""
        return value.lower() in ("null", "none", "~", "")
    return key not in RUNTIME_KEYS


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf where two config mappings differ (tuples and lists
    compare equal)."""
    differences = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            differences += config_differences(left, right, prefix=f"{dotted}.")
        elif _plain(left) != _plain(right):
            differences.append((dotted, left, right))
    return differences


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _yaml_value(value: Any) -> str:
    return json.dumps(_plain(value))


def differences_as_overrides(differences: Sequence[tuple[str, Any, Any]]) -> list[str]:
    """`KEY=VALUE` strings (the second value) for `config_differences` output."""
    return [f"{key}={_yaml_value(right)}" for key, _, right in differences]


@dataclass(frozen=True)
class Provenance:
    """Everything a result row says about how it was made, besides the config and the metric."""

    overrides: tuple[str, ...]
    smoke: bool
    seed: int | None
    iterations_trained: int | None  # None: a released checkpoint (trained by its source)
    iterations_config: int | None
    images_evaluated: int
    images_in_split: int
    checkpoint: str
    checkpoint_sha256: str
    config_sha256: str
    commit: str
    device: str
    engine: str = "torch"
    precision: str = "fp32"
    notes: tuple[str, ...] = field(default_factory=tuple)  # e.g. the effective batch when it differs

    @property
    def recipe_overrides(self) -> list[str]:
        return [o for o in self.overrides if is_recipe_override(o)] + list(self.notes)

    @property
    def complete(self) -> bool:
        trained = self.iterations_trained is None or (
            self.iterations_config is not None and self.iterations_trained >= self.iterations_config
        )
        full_eval = self.images_in_split > 0 and self.images_evaluated >= self.images_in_split
        return not self.smoke and trained and full_eval and not self.recipe_overrides


def result_rows(
    cfg: Any,
    results: Mapping[str, Any],
    prov: Provenance,
    *,
    protocol: Callable[[Any, str], Mapping[str, str]],
    date: str | None = None,
) -> list[dict[str, object]]:
    """Rows of results/miou.csv for the measured metrics (`EvalResult`s, mIoU in percent); `protocol(eval_cfg,
    metric)` gives the evaluation columns (`repro.engine.evaluate.protocol_summary`)."""
    date = date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    overrides = list(prov.overrides) + list(prov.notes) + ([SMOKE_NOTE] if prov.smoke else [])
    rows = []
    for metric, result in results.items():
        reported = cfg.reported.get(metric)
        measured = round(float(result.miou), 4)
        summary = dict(protocol(cfg.eval, metric))
        missing = [column for column in EVAL_COLUMNS if column not in summary]
        if missing:
            raise ValueError(f"protocol summary of {metric!r} lacks {missing}; got {sorted(summary)}")
        rows.append({
            "experiment": cfg.name,
            "dataset": cfg.data.dataset,
            "backbone": cfg.backbone,
            "crop": f"{cfg.data.crop_size[0]}x{cfg.data.crop_size[1]}",
            "schedule": f"{prov.iterations_config}it" if prov.iterations_config is not None else "released",
            "metric": metric,
            "reported": "" if reported is None else reported,
            "measured": "" if math.isnan(measured) else measured,
            "delta": "" if reported is None or math.isnan(measured) else round(measured - reported, 4),
            "seed": "" if prov.seed is None else prov.seed,
            **{column: summary[column] for column in EVAL_COLUMNS},
            "engine": prov.engine,
            "precision": prov.precision,
            "images_evaluated": prov.images_evaluated,
            "images_in_split": prov.images_in_split,
            "iterations_trained": "" if prov.iterations_trained is None else prov.iterations_trained,
            "iterations_config": "" if prov.iterations_config is None else prov.iterations_config,
            "smoke": "true" if prov.smoke else "false",
            "complete": "true" if prov.complete else "false",
            "overrides": "; ".join(overrides),
            "config_sha256": prov.config_sha256,
            "checkpoint": prov.checkpoint,
            "checkpoint_sha256": prov.checkpoint_sha256,
            "commit": prov.commit,
            "device": prov.device,
            "date": date,
        })
    return rows


def check_results_csv(path: str | Path) -> None:
    """Before appending: CsvFormatError when `path` holds the old format or any other header (nothing is
    ever appended to a file of another layout)."""
    header, _ = read_csv_rows(path)
    if header and set(header) == set(LEGACY_RESULT_COLUMNS):
        raise CsvFormatError(
            f"{path} has the old result format without provenance (columns {', '.join(LEGACY_RESULT_COLUMNS)}); "
            f"this version writes {', '.join(RESULT_COLUMNS)}. Nothing appended: move the old file aside (the "
            "report still reads it, listing its rows apart) or pass --results NEW.csv"
        )
    check_csv_header(path, RESULT_COLUMNS)


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def row_kind(row: Mapping[str, Any]) -> str:
    """Why a result row counts or not: "complete", "smoke", "old format (no provenance)", "partial evaluation
    (2 of 500 images)", "partial training (2 of 80000 iterations)" or "overridden (train.lr=0.02)" (the
    first that applies)."""
    if str(row.get("format", "")) == "legacy":
        return ROW_OLD
    if _truthy(row.get("smoke")):
        return ROW_SMOKE
    if _truthy(row.get("complete")):
        return ROW_COMPLETE
    evaluated, in_split = _number(row.get("images_evaluated")), _number(row.get("images_in_split"))
    if not (evaluated >= in_split > 0):
        return f"partial evaluation ({evaluated:.0f} of {in_split:.0f} images)"
    trained, configured = _number(row.get("iterations_trained")), _number(row.get("iterations_config"))
    if not math.isnan(trained) and not trained >= configured:
        return f"partial training ({trained:.0f} of {configured:.0f} iterations)"
    recipe = [item.strip() for item in str(row.get("overrides", "") or "").split(";")
              if item.strip() and is_recipe_override(item.strip())]
    return f"overridden ({'; '.join(recipe)})" if recipe else "not complete"


def read_results(path: str | Path) -> pd.DataFrame:
    """results/miou.csv as strings with a `row_kind` column; an old-format file's rows get the provenance
    columns empty, `format` "legacy" and kind "old format (no provenance)". CsvFormatError for any other
    header, naming the columns it lacks."""
    path = Path(path)
    header, rows = read_csv_rows(path)
    frame = pd.DataFrame(rows, columns=header, dtype=str)
    if set(header) == set(LEGACY_RESULT_COLUMNS):
        frame["format"] = "legacy"
    else:
        missing = [column for column in RESULT_COLUMNS if column not in header]
        if header and missing:
            raise CsvFormatError(
                f"{path}: neither the result format (missing columns {missing}) nor the old one "
                f"({', '.join(LEGACY_RESULT_COLUMNS)}); expected columns {', '.join(RESULT_COLUMNS)}"
            )
        frame["format"] = "provenance"
    for column in RESULT_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    frame["row_kind"] = [row_kind(row) for row in frame.to_dict("records")]
    return frame
