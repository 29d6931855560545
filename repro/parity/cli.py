"""`python -m repro.parity [--quick] [--strict] [--sources S ...] [--configs NAME ...] [--out results] [--jobs N]`.

Runs every registered source's checks on its experiment rows and writes `results/parity.csv` atomically: the
rows of the (source, config) pairs run this time replace their old rows, every other row is kept. Exit 0 when no
row failed; 1 when one did (`--strict`: also when one did not run); 2 for bad arguments; 5 when the CSV cannot
be written. A peer that cannot install gives `not run: <reason>` rows, never a skipped row. Sources run in
parallel (`--jobs`, default 2: one process per source, heaviest first); each source's peer is one long-lived
process serving all its rows (`common.PeerServer`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

from repro.io import CsvFormatError, locked, read_csv_rows, write_csv_atomic
from repro.parity import mmseg, mmseg0, paddleseg, ssseg
from repro.parity.common import (
    COLUMNS,
    DEFAULT_ROOT,
    PEERS,
    TIMINGS,
    ParityRow,
    PeerUnavailable,
    close_peers,
    ensure_venv,
    not_run_row,
)

# source name -> module with NAME, VERSION, default_configs(), QUICK_CONFIG, run(configs, *, quick, workdir)
SOURCES: dict[str, ModuleType] = {
    mmseg.NAME: mmseg,
    mmseg0.REGISTRY_NAME: mmseg0,  # mmsegmentation 0.30.0: check e of the mmseg rows (rows say source "mmseg")
    ssseg.NAME: ssseg,
    paddleseg.NAME: paddleseg,
}
CSV_NAME = "parity.csv"
TIMING_NAME = "parity_timing.csv"  # wall seconds per (source, config, check) of the last run
WALL_CHECK = "(whole run)"  # its row: the sources run, the scope (all rows / quick / named) and the run's wall time


def peer_python(name: str, root: Path = DEFAULT_ROOT) -> Path:
    """The python of the registered peer `name` (e.g. "mmseg"), its venv built on first use (under `root`,
    default .nox/). Other commands (the inference benchmark) use it to run a source's own model in a
    subprocess; PeerUnavailable (reason in the message) when it cannot install."""
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
    return ensure_venv(PEERS[name], root)


def select_configs(module: ModuleType, names: list[str] | None, *, quick: bool) -> list[Path]:
    """The source's experiment files to check: all of them, the quick one, or those named (file stem)."""
    available = list(module.default_configs())
    if names:  # in the order given
        by_name = {**{path.stem: path for path in available}, **{path.name: path for path in available}}
        return list(dict.fromkeys(by_name[name] for name in names if name in by_name))
    if quick:
        return [path for path in available if path.stem == module.QUICK_CONFIG]
    return available


def run_source(module: ModuleType, configs: list[Path], *, quick: bool, workdir: Path,
               on_rows: Callable[[list[ParityRow]], None] | None = None) -> list[ParityRow]:
    """One source's rows; a peer that cannot install or run turns into `not run` rows, an unexpected error into
    a `fail` row (the traceback goes to stderr), so one source never hides the others' results. A module whose
    `run` takes `on_rows` hands over each config's rows when they are complete."""
    try:
        if on_rows is not None and "on_rows" in inspect.signature(module.run).parameters:
            return module.run(configs, quick=quick, workdir=workdir, on_rows=on_rows)
        return module.run(configs, quick=quick, workdir=workdir)
    except PeerUnavailable as err:
        return [not_run_row(source=module.NAME, version=module.VERSION, config=path.stem, check="all",
                            reason=str(err)) for path in configs]
    except Exception as err:  # noqa: BLE001 - reported as a failing row, with the traceback on stderr
        traceback.print_exc()
        return [ParityRow(module.NAME, module.VERSION, path.stem, "all", "", "", "", "fail",
                          f"{type(err).__name__}: {err}"[:300]) for path in configs]
    finally:
        close_peers()  # the source's peer servers (common.call_peer)


def merge_rows(path: Path, rows: list[ParityRow]) -> list[dict[str, str]]:
    """Write `rows` into the CSV at `path`, replacing the old rows of the same (source, version, config) and keeping
    all others; returns the table written."""
    ran = {(row.source, row.version, row.config) for row in rows}
    with locked(path):
        header, old = read_csv_rows(path)
        if header and set(header) != set(COLUMNS):
            raise CsvFormatError(f"{path}: header {header} is not the parity columns {list(COLUMNS)}")
        kept = [row for row in old if (row["source"], row["version"], row["config"]) not in ran]
        table = kept + [row.as_dict() for row in rows]
        import pandas as pd

        write_csv_atomic(pd.DataFrame(table, columns=list(COLUMNS)), path)
    return table


def exit_code(rows: list[ParityRow], *, strict: bool) -> int:
    if any(row.verdict == "fail" for row in rows):
        return 1
    if strict and any(row.verdict != "pass" for row in rows):
        return 1
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.parity", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one experiment row per source, small sizes (CI)")
    parser.add_argument("--strict", action="store_true", help="exit 1 also when a check did not run")
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=sorted(SOURCES),
                        help="sources to check (default: all)")
    parser.add_argument("--configs", nargs="+", help="experiment names (file stems) to check; default all")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default results)")
    parser.add_argument("--workdir", type=Path, default=Path(".nox") / "parity-work",
                        help="scratch folder for fixtures and peer outputs (default .nox/parity-work)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="sources run in parallel, one process each (default: 2, or 1 on one core)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected 1 or more")
    return args


def _write_rows(target: Path) -> Callable[[list[ParityRow]], None]:
    def write(rows: list[ParityRow]) -> None:
        try:
            merge_rows(target, rows)
        except (OSError, CsvFormatError) as err:  # reported once more, with exit 5, at the end
            print(f"warning: cannot write {target}: {err}", file=sys.stderr)
        release_memory()  # a config's models are gone: hand their heap back before the next one

    return write


def release_memory() -> None:
    """gc, then glibc's malloc_trim: freed tensors under glibc's raised mmap threshold otherwise stay in this
    process's heap (GBs after a few R-101 rows, with the peers beside it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _run_named(name: str, configs: list[Path], quick: bool, workdir: Path,
               target: Path) -> tuple[list, float, list[dict]]:
    """One source's rows, its wall time and its per-check timings (common.timed); each config's rows are merged
    into `target` as they complete (the CSV's lock serialises the sources' writes)."""
    TIMINGS.clear()
    start = time.perf_counter()
    rows = run_source(SOURCES[name], configs, quick=quick, workdir=workdir, on_rows=_write_rows(target))
    return rows, time.perf_counter() - start, list(TIMINGS)


def write_timing(path: Path, timings: list[dict], *, jobs: int) -> None:
    """The run's per-check wall seconds, with the CPU, the number of parallel sources and the load average at
    the end (a shared machine's timings are only comparable with those)."""
    import pandas as pd

    from repro.vocabulary import cpu_model

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    table = pd.DataFrame([{**t, "jobs": jobs, "cpu": cpu_model(), "load_1min_at_end": round(load, 2),
                           "date": stamp} for t in timings])
    write_csv_atomic(table, path)


def summarise_timing(timings: list[dict]) -> str:
    """Seconds per source and check (top-level checks only: the indented entries are parts of one)."""
    totals: dict[tuple[str, str], float] = {}
    for t in timings:
        totals[(str(t["source"]), str(t["check"]))] = totals.get((str(t["source"]), str(t["check"])), 0.0) + float(
            t["seconds"])
    return "\n".join(f"  {source} {check}: {seconds:.0f} s" for (source, check), seconds in sorted(totals.items()))


# Heaviest first, so that the pool's workers end close together.
COST_ORDER = ("mmseg", "sssegmentation", "mmseg0", "paddleseg")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse_args(argv)
    except SystemExit as err:
        return int(err.code or 0)
    target = args.out / CSV_NAME
    work = [(name, configs) for name in args.sources
            if (configs := select_configs(SOURCES[name], args.configs, quick=args.quick))]
    work.sort(key=lambda item: COST_ORDER.index(item[0]) if item[0] in COST_ORDER else len(COST_ORDER))
    jobs = min(args.jobs, len(work))
    results: dict[str, tuple[list, float, list[dict]]] = {}
    start = time.perf_counter()
    if jobs > 1:
        # Sources in parallel, one process each (forked: a peer's own model code never enters this process).
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {name: pool.submit(_run_named, name, configs, args.quick, args.workdir / name, target)
                       for name, configs in work}
            for name, future in futures.items():
                results[name] = future.result()
    else:
        for name, configs in work:
            results[name] = _run_named(name, configs, args.quick, args.workdir / name, target)
    all_rows: list[ParityRow] = []
    timings: list[dict] = []
    for name, configs in work:
        module, (rows, seconds, source_timings) = SOURCES[name], results[name]
        all_rows += rows
        timings += source_timings
        bad = [row for row in rows if row.verdict != "pass"]
        print(f"{name} {module.VERSION}: {len(rows)} rows, {len(rows) - len(bad)} pass, "
              f"{sum(row.verdict == 'fail' for row in rows)} fail, "
              f"{sum(row.verdict.startswith('not run') for row in rows)} not run "
              f"({seconds:.0f} s, {len(configs)} experiment rows)")
        for row in bad:
            print(f"  {row.config} {row.check} {row.metric}: {row.value} ({row.tolerance}) {row.verdict} "
                  f"{row.detail}", file=sys.stderr)
    if args.configs and not all_rows:
        print(f"error: no source has an experiment named {args.configs}", file=sys.stderr)
        return 2
    try:
        merge_rows(target, all_rows)
    except (OSError, CsvFormatError) as err:
        print(f"error: cannot write {target}: {err}", file=sys.stderr)
        return 5
    print(f"wrote {target}")
    wall = time.perf_counter() - start
    print(f"wall {wall:.0f} s with --jobs {jobs}; seconds per source and check:\n" + summarise_timing(timings))
    scope = "quick" if args.quick else (f"{len(args.configs)} named rows" if args.configs else "all rows")
    whole = {"source": "+".join(name for name, _ in work), "config": scope, "check": WALL_CHECK,
             "seconds": round(wall, 1)}
    try:
        write_timing(args.out / TIMING_NAME, [*timings, whole], jobs=jobs)
    except OSError as err:
        print(f"warning: cannot write {args.out / TIMING_NAME}: {err}", file=sys.stderr)
    return exit_code(all_rows, strict=args.strict)
