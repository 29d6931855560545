"""The test suite's own duration, recorded by the suite: `nox -s tests` (the README's test command) sets
CCREPRO_TESTS_TIMING=results/tests_timing.csv and `tests/conftest.py` appends one row when the session ends
(the controlling process only, not the xdist workers). `python -m repro.reproduce timing` turns the last row, and
the range of the same CPU's last RECENT runs, into the README's sentence, so the numbers there are ones the code
wrote."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from repro.io import append_csv_rows

ENV_VAR = "CCREPRO_TESTS_TIMING"
RECENT = 5  # runs of the same CPU the sentence gives the range of
COLUMNS = ("date", "commit", "cpu", "cpus", "workers", "pytest_seconds", "passed", "failed", "skipped", "errors",
           "exit_status")


def record(path: str | os.PathLike, *, seconds: float, counts: Mapping[str, int], workers: int,
           exit_status: int) -> Path:
    """Append the session's row to the CSV at `path` (atomic rewrite; earlier rows kept)."""
    from repro.engine.engines import git_commit
    from repro.vocabulary import cpu_model

    row = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(),
           "cpu": cpu_model(), "cpus": os.cpu_count() or 1, "workers": workers,
           "pytest_seconds": round(float(seconds), 1), "exit_status": int(exit_status),
           **{name: int(counts.get(name, 0)) for name in ("passed", "failed", "skipped", "errors")}}
    return append_csv_rows(path, [row], columns=COLUMNS)


def timing_sentence(table: pd.DataFrame) -> str:
    """The README's sentence on the suite's duration, from `tests_timing.csv` as a frame: its last row, and the
    range and median of the same CPU's last RECENT rows."""
    if table.empty:
        raise ValueError("tests_timing.csv has no rows: run `nox -s tests` once")
    row = table.iloc[-1]
    status = int(row["exit_status"])
    verdict = "" if status == 0 else f", pytest exit status {status}"
    text = (f"the last `nox -s tests` in `results/tests_timing.csv` spent {_minutes(float(row['pytest_seconds']))} "
            f"in pytest "
            f"({int(row['workers'])} workers on {int(row['cpus'])} CPUs: {row['cpu']}; {int(row['passed']):,} "
            f"passed, {int(row['skipped'])} skipped, {int(row['failed'])} failed{verdict}; commit "
            f"{row['commit'] or 'unknown'})")
    # The same machine's recent runs: one run's time says little on a shared machine whose speed drifts.
    recent = table[table["cpu"] == row["cpu"]].tail(RECENT)
    if len(recent) > 1:
        times = pd.to_numeric(recent["pytest_seconds"])
        text += (f"; its last {len(recent)} runs there took {_minutes(times.min())} to {_minutes(times.max())} "
                 f"(median {_minutes(times.median())})")
    return text + "."


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"
