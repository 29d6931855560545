"""This run vs the committed results: which figures a fresh run of the main job reproduced, per metric tolerance.

The committed `results/*.csv` are the reference. When the main job (`repro.reproduce`) first runs a step group
in a checkout it copies the committed version of that group's CSVs to `RESULTS/.stamps/reference/` (from
`git show HEAD:` when the results folder is in a git checkout, the file on disk otherwise) and removes the
CSVs, so that everything the report then shows was computed by this run. `compare` matches the rows of this
run's CSV with the reference's by key and checks each value against the tolerance of its metric.

Tolerances say how far a value may move between two honest runs: counts (FLOPs, parameters) are exact up to
float formatting; memory measured from the allocator or traced under FakeTensorMode is deterministic for one
torch build, so 5% covers another build or CPU; the synthetic ablation's accuracies move with floating-point
rounding across CPUs, 0.05 absolute; wall-clock times are never compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REFERENCE_DIR = Path(".stamps") / "reference"
COLUMNS = ("file", "key", "metric", "this_run", "committed", "difference", "tolerance", "status")
WITHIN, DRIFTED, NEW, GONE, TIMING = (
    "within tolerance", "drifted", "only in this run", "only in the committed results", "not compared (timing)"
)


@dataclass(frozen=True)
class Tolerance:
    """|this - committed| <= absolute + relative * |committed|; `compare=False` for wall-clock figures."""

    relative: float = 0.0
    absolute: float = 0.0
    compare: bool = True

    def __str__(self) -> str:
        if not self.compare:
            return "not compared"
        parts = []
        if self.relative:
            parts.append(f"{self.relative:.0%}" if self.relative >= 0.01 else f"{self.relative:.0e} relative")
        if self.absolute:
            parts.append(f"{self.absolute:g} absolute")
        return " + ".join(parts) or "exact"

    def holds(self, this: float, committed: float) -> bool:
        if math.isnan(this) and math.isnan(committed):
            return True
        return abs(this - committed) <= self.absolute + self.relative * abs(committed)


EXACT = Tolerance(relative=1e-6)
MEMORY = Tolerance(relative=0.05)
ACCURACY = Tolerance(absolute=0.05)
TIMING_ONLY = Tolerance(compare=False)

# Long-format CSVs: the tolerance follows the row's unit.
UNIT_TOLERANCE = {
    "GFLOP": EXACT, "GMAC": EXACT, "count": EXACT, "fraction": EXACT,
    "MiB": MEMORY, "GiB": MEMORY, "MB": MEMORY, "bytes": MEMORY, "ratio": MEMORY,
    "images/s": TIMING_ONLY, "ms": TIMING_ONLY, "s": TIMING_ONLY,
}


@dataclass(frozen=True)
class DriftRule:
    """How one CSV is compared: key columns, and per value column its tolerance (or a function of the row)."""

    csv: str
    key: tuple[str, ...]
    values: dict[str, Tolerance | Callable[[pd.Series], Tolerance]]


def _by_unit(row: pd.Series) -> Tolerance:
    return UNIT_TOLERANCE.get(str(row.get("unit", "")), MEMORY)


RULES = (
    DriftRule("claims.csv", ("claim", "variant", "recurrence", "batch", "channels", "qk_channels", "height",
                             "width", "metric", "method"), {"value": _by_unit}),
    DriftRule("model_efficiency.csv", ("experiment", "metric", "method"), {"value": _by_unit}),
    DriftRule("synthetic_ablation.csv", ("variant", "seed", "steps"), {
        "miou": ACCURACY, "object_accuracy": ACCURACY, "params": EXACT, "flops": EXACT,
        "peak_memory_bytes": MEMORY, "train_time_s": TIMING_ONLY,
    }),
    DriftRule("ops_bench.csv", ("variant", "dtype", "batch", "channels", "qk_channels", "height", "width", "pass",
                                "device"), {
        "milliseconds": TIMING_ONLY, "peak_memory_mb": MEMORY, "model_gflop": EXACT, "model_mb_moved": EXACT,
    }),
    DriftRule("attention_reach.csv", ("model", "seed", "steps", "pixel_row", "pixel_col", "after_loops"),
              {"attention_share_on_marker": ACCURACY}),
)


def reference_dir(results: Path) -> Path:
    return results / REFERENCE_DIR


def _key_text(row: pd.Series, key: tuple[str, ...]) -> str:
    return ", ".join(f"{column}={row[column]}" for column in key)


def compare_frames(this: pd.DataFrame, committed: pd.DataFrame, rule: DriftRule) -> pd.DataFrame:
    """One row per (key, value column): this run, committed, difference, tolerance and status."""
    missing = [column for column in rule.key if column not in this.columns or column not in committed.columns]
    if missing:
        raise ValueError(f"{rule.csv}: key columns {missing} missing in this run's or the committed CSV")
    index = list(rule.key)
    # Duplicated keys (a CSV that only grows) keep their latest row.
    this = this.drop_duplicates(subset=index, keep="last").set_index(index, drop=False)
    committed = committed.drop_duplicates(subset=index, keep="last").set_index(index, drop=False)
    rows = []
    for key in this.index.union(committed.index, sort=False):
        mine = this.loc[key] if key in this.index else None
        theirs = committed.loc[key] if key in committed.index else None
        reference_row = mine if mine is not None else theirs
        for column, tolerance in rule.values.items():
            if column not in reference_row.index:
                continue
            tol = tolerance(reference_row) if callable(tolerance) else tolerance
            now = pd.to_numeric(mine[column], errors="coerce") if mine is not None else float("nan")
            before = pd.to_numeric(theirs[column], errors="coerce") if theirs is not None else float("nan")
            if mine is None:
                status = GONE
            elif theirs is None:
                status = NEW
            elif not tol.compare:
                status = TIMING
            else:
                status = WITHIN if tol.holds(float(now), float(before)) else DRIFTED
            name = str(reference_row["metric"]) if column == "value" and "metric" in reference_row.index else column
            rows.append({"file": rule.csv, "key": _key_text(reference_row, rule.key), "metric": name,
                         "this_run": now, "committed": before, "difference": now - before,
                         "tolerance": str(tol), "status": status})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def compare(results: Path, reference: Path | None = None) -> pd.DataFrame | None:
    """Every rule's CSV in `results` against its copy in `reference` (default `RESULTS/.stamps/reference`).

    None when there is no reference snapshot at all (nothing was rerun in this checkout). A CSV with a
    reference but absent from this run counts every committed value as "only in the committed results"."""
    reference = reference_dir(results) if reference is None else reference
    if not reference.is_dir():
        return None
    frames = []
    for rule in RULES:
        committed_path, this_path = reference / rule.csv, results / rule.csv
        if not committed_path.exists():
            continue
        committed = pd.read_csv(committed_path)
        this = pd.read_csv(this_path) if this_path.exists() else committed.iloc[0:0]
        frames.append(compare_frames(this, committed, rule))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)


DRIFT_HEADING = "## This run vs the committed results"


def committed_section(results: Path, report_name: str = "REPORT.md") -> str | None:
    """The drift section of the report already in `results` (from its heading to the next `## `), or None.

    Used when there is nothing new to compare (no reference snapshot in this checkout): regenerating the
    report must not discard the comparison the committed report holds."""
    path = results / report_name
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    start = text.find(DRIFT_HEADING)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(DRIFT_HEADING))
    return text[start:] if end < 0 else text[start:end + 1]
