"""`python -m repro.reproduce [--quick | --full] [--force]`: the main job (`nox -s reproduce`).

Steps, each a subprocess called by module name (so a broken or missing step cannot take the others down):

1. environment: `results/environment.csv` (device, versions, date), written in this process;
2. claims: `python -m repro.claims --out RESULTS`;
3. synthetic: `python -m repro.synthetic --out RESULTS [--quick | --full]` (the R=0/1/2/3/non-local
   ablation on the marker task and its two figures), then `python -m repro.synthetic.example` (the
   prediction command's colour mask and R=1 / R=2 attention figure on the trained R=2 model), then bench:
   `python -m repro.bench --out RESULTS/ops_bench.csv --rounds 3` (the operator benchmark);
4. profile: `python -m repro.profile CONFIG... --out RESULTS` for every `experiments/*.yaml`, in chunks of a
   few configs per process (each chunk stamped, so an interruption loses at most one chunk);
5. experiments: one process checks every config's dataset (`python -m repro.reproduce check-data --out
   RESULTS/.stamps/datasets.csv CONFIG...`, one row per config: present, dataset not present, or the error;
   one Python start instead of one per config), then `python -m repro.run CONFIG --results RESULTS/miou.csv
   --resume` trains and evaluates each config whose dataset is there, from its last checkpoint if an earlier
   pipeline was interrupted during it (without --resume under `--force`); recorded in
   `results/experiments_status.csv`;
6. report: `python -m repro.report --results RESULTS --experiments EXPERIMENTS` (always rerun: cheap).

The committed `results/` are the reference, never the answer: the first time a step group runs in a checkout
(or with `--force`), the committed version of the files it writes is saved to `RESULTS/.stamps/reference/`
and the files are removed, so every figure the report shows was computed by this run (the synthetic ablation
retrains instead of finding its runs in the committed CSV), and the report's "this run vs the committed
results" section compares the two (`repro.pipeline.drift`). One exception, `PARTIAL_OUTPUTS`: ops_bench.csv
loses only this machine's 1-thread rows (which the bench step redoes); other CPUs' rows and other thread counts
stay, labelled as they are in every row.

Every finished step leaves a stamp `RESULTS/.stamps/NAME.done` holding its command; a rerun in the same
checkout skips stamped steps whose command is unchanged, unless `--force`, so an interrupted pipeline
continues where it stopped (the synthetic ablation also resumes run by run inside its step). `.stamps/` is
per checkout and ignored by git. Each step's outcome goes to `results/reproduce_status.csv`, commands with
repository-relative paths. The exit status is non-zero when any step failed; the other steps still run.

Steps are independent processes except two chains (the synthetic ablation before its worked example, the
dataset check before the experiment runs) and the report, which comes last. `--jobs N` (default 2, the
machine's cores) workers take the next ready step, longest first (the synthetic ablation, the benchmark,
claims, the profile chunks, the experiments); every step is single-threaded, so two workers keep both cores
busy until the end instead of two fixed lanes of unequal length. The pipeline's own wall time is recorded as
the status row `WALL_STEP` (`timing_sentence` turns the status CSV into the README's sentence). `--quick` runs
the tiny synthetic version, `--full` five seeds instead of three.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from repro.io import atomic_write_bytes, write_csv_atomic
from repro.pipeline.drift import reference_dir
from repro.vocabulary import cpu_model, device_label, display_path

STEP_GROUPS = ("claims", "bench", "synthetic", "profile", "experiments", "report")
# What each step group (re)writes in RESULTS: cleared, after a reference copy of the CSVs, on the group's first
# run in a checkout. "pipeline" is this job's own bookkeeping.
GROUP_OUTPUTS = {
    "pipeline": ("reproduce_status.csv",),
    "claims": ("claims.csv", "plots/claims_flops.png", "plots/claims_memory.png"),
    "bench": ("ops_bench.csv",),
    "synthetic": ("synthetic_ablation.csv", "attention_reach.csv", "plots/synthetic_ablation.png",
                  "plots/attention_reach.png"),
    "profile": ("model_efficiency.csv", "model_efficiency.md"),
    "experiments": ("experiments_status.csv",),
}
# Outputs that hold other machines' rows too: on a fresh start only the rows this machine's step redoes are removed.
# ops_bench.csv keeps other CPUs' and other thread counts' rows (the AMD rows, `--cca-speedup`'s 2-thread rows):
# they are labelled in every row, so they are evidence beside this run's, not leftovers of a partial one.
def _bench_rows_of_other_runs(frame: pd.DataFrame) -> pd.DataFrame:
    from repro.measure.environment import cpu_label

    if not {"cpu", "threads"} <= set(frame.columns):
        return frame.iloc[0:0]
    redone = (frame["cpu"] == cpu_label()) & frame["threads"].isin(["1", ""])
    return frame[~redone]


PARTIAL_OUTPUTS = {"ops_bench.csv": _bench_rows_of_other_runs}
DATASET_NOT_PRESENT = 3
STATUS_COLUMNS = ("step", "status", "exit_code", "seconds", "detail", "command", "date")
EXPERIMENT_COLUMNS = ("experiment", "config", "status", "detail", "date")


@dataclass(frozen=True)
class Step:
    """One subprocess of the pipeline. `name` is unique and names the stamp file."""

    name: str
    group: str
    argv: tuple[str, ...]
    stamped: bool = True


@dataclass(frozen=True)
class Outcome:
    # "done", "done (earlier run)", "skipped (done before)", "failed", "dataset not present"
    status: str
    exit_code: int | None
    seconds: float
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Steps write to a pipe, which rich and argparse treat as 80 columns wide; this job decides how lines are shown.
STEP_COLUMNS = "1000"


def make_console(**kwargs) -> Console:
    """This job's console: lines are never wrapped (soft wrap), so logs and CI keep every command whole."""
    return Console(soft_wrap=True, **kwargs)


def display_command(argv: tuple[str, ...], *, root: Path | None = None) -> str:
    """The command as a user would type it in the repository: `python` for the interpreter, paths under
    `root` (default: the working directory) relative to it. Stamps keep the exact argv; this is for the
    status CSV and the console, which must not carry one machine's absolute paths."""
    root = Path.cwd() if root is None else root
    words = ["python" if index == 0 else display_path(word, root) for index, word in enumerate(argv)]
    return shlex.join(words)


def committed_bytes(path: Path) -> tuple[bytes, str] | None:
    """The committed content of `path` and where it came from: `git show HEAD:` when `path` is tracked in a
    git checkout, the file on disk otherwise; None when neither exists."""
    if shutil.which("git") is not None and path.parent.is_dir():
        try:
            shown = subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True,
                                   check=False)
        except OSError:
            shown = None
        if shown is not None and shown.returncode == 0:
            return shown.stdout, "git HEAD"
    if path.is_file():
        return path.read_bytes(), "file on disk"
    return None


def start_fresh(results: Path, groups: list[str], *, force: bool) -> list[str]:
    """For every group in `groups` not yet started in this checkout (or all with `force`): copy the committed
    CSVs it writes to the reference folder, remove its outputs (of PARTIAL_OUTPUTS only the rows this machine
    redoes), and mark it started. Returns the groups cleared. A group that was started before keeps its outputs,
    so an interrupted run resumes."""
    stamps, reference = results / ".stamps", reference_dir(results)
    cleared = []
    for group in groups:
        marker = stamps / f"{group}.started"
        if marker.exists() and not force:
            continue
        for name in GROUP_OUTPUTS.get(group, ()):
            path = results / name
            if name.endswith(".csv") and group != "pipeline":
                committed = committed_bytes(path)
                if committed is not None:
                    atomic_write_bytes(reference / name, committed[0])
                else:  # nothing committed: no reference (an older snapshot would compare against a stale run)
                    (reference / name).unlink(missing_ok=True)
            if name in PARTIAL_OUTPUTS and path.is_file():
                kept = PARTIAL_OUTPUTS[name](pd.read_csv(path, dtype=str, keep_default_na=False))
                if not kept.empty:
                    write_csv_atomic(kept, path)
                    continue
            path.unlink(missing_ok=True)
        stamps.mkdir(parents=True, exist_ok=True)
        marker.write_text(_now())
        cleared.append(group)
    return cleared


def experiment_name(config: Path) -> str:
    """The experiment's name as the report matches it: `load_config` requires it to equal the file stem."""
    return config.stem


class Pipeline:
    """Runs steps with stamps, a rich progress display and a status CSV."""

    def __init__(self, *, results: Path, force: bool, console: Console) -> None:
        self.results = results
        self.force = force
        self.console = console
        self.stamps = results / ".stamps"
        self.status_path = results / "reproduce_status.csv"
        # Two lanes record outcomes concurrently.
        self.lock = threading.Lock()
        self.status = (
            pd.read_csv(self.status_path, dtype=str, keep_default_na=False)
            if self.status_path.exists() else pd.DataFrame(columns=list(STATUS_COLUMNS))
        )

    def stamp_path(self, step: Step) -> Path:
        return self.stamps / f"{step.name}.done"

    def is_done(self, step: Step) -> bool:
        stamp = self.stamp_path(step)
        return (not self.force and step.stamped and stamp.exists()
                and stamp.read_text() == " ".join(step.argv))

    def record(self, step: Step, outcome: Outcome) -> None:
        row = {
            "step": step.name, "status": outcome.status,
            "exit_code": "" if outcome.exit_code is None else str(outcome.exit_code),
            "seconds": f"{outcome.seconds:.1f}", "detail": outcome.detail,
            "command": display_command(step.argv), "date": _now(),
        }
        with self.lock:
            kept = self.status[self.status["step"] != step.name]
            self.status = pd.concat([kept, pd.DataFrame([row])], ignore_index=True)
            write_csv_atomic(self.status, self.status_path)

    def execute(self, step: Step, *, ok_codes: tuple[int, ...] = (0,)) -> Outcome:
        """Run `step` (unless stamped), stream its output, stamp it on success, record the outcome."""
        if self.is_done(step):
            self.console.print(f"[dim]skip {step.name}: done before (--force to redo)[/dim]")
            with self.lock:
                earlier = self.status.index[(self.status["step"] == step.name) & (self.status["status"] == "done")]
                if len(earlier):
                    # Keep the run that did the work (its time and date), marked as not redone now.
                    self.status.loc[earlier, "status"] = "done (earlier run)"
                    write_csv_atomic(self.status, self.status_path)
                    return Outcome("done (earlier run)", None, 0.0, "")
            outcome = Outcome("skipped (done before)", None, 0.0, f"stamp {self.stamp_path(step)}")
            self.record(step, outcome)
            return outcome
        self.console.print(Text("run ", style="bold") + Text(f"{step.name}: {display_command(step.argv)}"))
        start = time.perf_counter()
        tail: deque[str] = deque(maxlen=6)
        try:
            process = subprocess.Popen(
                step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                env={**os.environ, "COLUMNS": STEP_COLUMNS},
            )
        except OSError as error:
            outcome = Outcome("failed", None, time.perf_counter() - start, f"could not start: {error}")
            self.record(step, outcome)
            return outcome
        try:
            for line in process.stdout:
                line = line.rstrip()
                # The PyTorch profiler (used for CPU memory) logs two kineto lines per measurement.
                if line and "SyncActivityProfilerHandler" not in line:
                    tail.append(line)
                    self.console.print(Text(f"  {step.name} ", style="dim") + Text(line), highlight=False)
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            self.record(step, Outcome("failed", None, time.perf_counter() - start, "interrupted"))
            raise
        seconds = time.perf_counter() - start
        if code in ok_codes:
            if step.stamped and code == 0:
                self.stamps.mkdir(parents=True, exist_ok=True)
                self.stamp_path(step).write_text(" ".join(step.argv))
            status = "done" if code == 0 else "dataset not present"
            # Done: the last line says what was written; otherwise the whole message (why, where, how).
            detail = (tail[-1] if tail else "") if code == 0 else " / ".join(line.strip() for line in tail)
            outcome = Outcome(status, code, seconds, detail)
        else:
            missing = next((line for line in tail if "No module named" in line), None)
            interrupted = code < 0 or code == 130 or any("KeyboardInterrupt" in line for line in tail)
            detail = "interrupted" if interrupted else missing or " / ".join(tail) or "no output"
            outcome = Outcome("failed", code, seconds, detail)
            self.console.print(f"[red]step failed[/red] {step.name} (exit {code}): {detail}")
        self.record(step, outcome)
        return outcome


def write_environment(results: Path) -> Path:
    """`results/environment.csv`: one row per fact (device, versions, date)."""
    import torch

    facts = {
        "date": _now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "device": device_label("cuda" if torch.cuda.is_available() else "cpu"),
        "cpu": cpu_model(),
    }
    for package in ("torch", "numpy", "pandas", "triton", "fvcore", "matplotlib"):
        try:
            facts[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[package] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    facts["git_commit"] = commit or "unknown"
    path = results / "environment.csv"
    write_csv_atomic(pd.DataFrame({"fact": list(facts), "value": list(facts.values())}), path)
    return path


PROFILE_CHUNK = 6


def build_steps(
    *, python: str, results: Path, experiments: Path, preset: str, skip: set[str], force: bool = False
) -> list[Step]:
    """The fixed steps (claims, synthetic, profile); experiments are handled separately.

    Profiling goes in chunks of PROFILE_CHUNK configs per process: one process per config spends a few
    seconds each on imports, one for all would redo everything after an interruption.
    """
    steps = []
    if "claims" not in skip:
        steps.append(Step("claims", "claims", (python, "-m", "repro.claims", "--out", str(results))))
    if "bench" not in skip:
        # 3 timed rounds (median) instead of 5: the naive non-local passes take seconds each on a CPU.
        steps.append(Step("bench", "bench", (python, "-m", "repro.bench", "--out", str(results / "ops_bench.csv"),
                                             "--rounds", "3")))
    if "synthetic" not in skip:
        flag = () if preset == "default" else (f"--{preset}",)
        # The ablation skips runs already in its CSV (a resumed step); --force has to reach it too.
        flag += ("--force",) if force else ()
        steps.append(Step(f"synthetic-{preset}", "synthetic",
                          (python, "-m", "repro.synthetic", "--out", str(results), *flag)))
        # `python -m repro.predict`'s worked example on the trained R=2 model (after it, in the same lane).
        preset_flag = () if preset == "default" else (f"--{preset}",)
        steps.append(Step(f"predict-example-{preset}", "synthetic",
                          (python, "-m", "repro.synthetic.example", "--out", str(results), *preset_flag)))
    if "profile" not in skip and experiments.is_dir():
        configs = [str(config) for config in sorted(experiments.glob("*.yaml"))]
        chunks = [configs[start:start + PROFILE_CHUNK] for start in range(0, len(configs), PROFILE_CHUNK)]
        for index, chunk in enumerate(chunks, start=1):
            argv = (python, "-m", "repro.profile", *chunk, "--out", str(results))
            steps.append(Step(f"profile-{index:02d}-of-{len(chunks):02d}", "profile", argv))
    return steps


DATASETS_CSV = "datasets.csv"
DATASET_COLUMNS = ("config", "experiment", "status", "exit_code", "detail")
CONFIG_ERROR = 2


def check_datasets(configs: list[Path]) -> pd.DataFrame:
    """One row per config: "present" (exit code 0), "dataset not present" (3, with the loader's message: where
    it looked and the layout it expects) or "config error" (2), as `python -m repro.run CONFIG --check-data`
    decides, for all configs in this one process."""
    from repro.engine.config import ConfigError, load_config
    from repro.engine.data import DatasetNotFoundError, check_dataset

    rows = []
    for config in configs:
        name = experiment_name(config)
        try:
            cfg = load_config(config, [])
        except (ConfigError, FileNotFoundError) as error:
            rows.append((str(config), name, "config error", CONFIG_ERROR, f"config error: {error}"))
            continue
        try:
            root = check_dataset(cfg.data)
        except DatasetNotFoundError as error:
            rows.append((str(config), name, "dataset not present", DATASET_NOT_PRESENT, f"{cfg.name}: {error}"))
        else:
            rows.append((str(config), name, "present", 0, f"{cfg.name}: {cfg.data.dataset} found at {root}"))
    return pd.DataFrame(rows, columns=list(DATASET_COLUMNS))


def check_data_main(argv: list[str]) -> int:
    """`python -m repro.reproduce check-data --out CSV CONFIG...`: `check_datasets` into CSV (written
    atomically), one line per config on stdout; exit 0 when every config could be read (present or not)."""
    parser = argparse.ArgumentParser(prog="python -m repro.reproduce check-data",
                                     description="check every config's dataset in one process")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (config, experiment, status, ...)")
    parser.add_argument("configs", type=Path, nargs="*")
    args = parser.parse_args(argv)
    frame = check_datasets(args.configs)
    try:
        write_csv_atomic(frame, args.out)
    except OSError as error:
        print(f"cannot write {args.out}: {error}", file=sys.stderr)
        return 5
    for row in frame.itertuples():
        print(f"{row.experiment}: {row.status}")
    counts = frame["status"].value_counts()
    print(f"checked {len(frame)} configs: " + ", ".join(f"{count} {status}" for status, count in counts.items()))
    return CONFIG_ERROR if (frame["status"] == "config error").any() else 0


def _lines(detail: str) -> str:
    """A multi-line message as one status cell (lines joined by " / ", as the step outcomes show them)."""
    return " / ".join(line.strip() for line in str(detail).splitlines() if line.strip())


def run_experiments(pipeline: Pipeline, *, python: str, experiments: Path, progress, task) -> bool:
    """Check every config's dataset (one process), run those present; write experiments_status.csv. True if
    something failed."""
    configs = sorted(experiments.glob("*.yaml"))
    table = pipeline.stamps / DATASETS_CSV
    table.unlink(missing_ok=True)
    check = Step("check-data", "experiments",
                 (python, "-m", "repro.reproduce", "check-data", "--out", str(table), *map(str, configs)),
                 stamped=False)
    outcome = pipeline.execute(check, ok_codes=(0, CONFIG_ERROR))
    checked = (pd.read_csv(table, dtype=str, keep_default_na=False).set_index("config")
               if table.exists() else pd.DataFrame(columns=list(DATASET_COLUMNS)).set_index("config"))
    rows, failed = [], outcome.failed
    for config in configs:
        name = experiment_name(config)
        if str(config) not in checked.index:
            failed = True
            rows.append({"experiment": name, "config": config.name, "status": "data check failed",
                         "detail": outcome.detail or "no row in the dataset check", "date": _now()})
        elif checked.loc[str(config), "status"] != "present":
            status = checked.loc[str(config), "status"]
            failed |= status != "dataset not present"
            rows.append({"experiment": name, "config": config.name,
                         "status": "dataset not present" if status == "dataset not present" else "data check failed",
                         "detail": _lines(checked.loc[str(config), "detail"]), "date": _now()})
        else:
            argv = (python, "-m", "repro.run", str(config), "--results", str(pipeline.results / "miou.csv"))
            # A training run interrupted with the pipeline continues from its last checkpoint (a run with none
            # starts afresh, a finished and evaluated one is left as it is); --force trains from scratch.
            argv += ("--force",) if pipeline.force else ("--resume",)
            run = Step(f"run-{config.stem}", "experiments", argv)
            result = pipeline.execute(run)
            failed |= result.failed
            rows.append({"experiment": name, "config": config.name,
                         "status": "run failed" if result.failed else "measured",
                         "detail": result.detail, "date": _now()})
        progress.update(task, advance=1)
    write_csv_atomic(pd.DataFrame(rows, columns=list(EXPERIMENT_COLUMNS)),
                     pipeline.results / "experiments_status.csv")
    return failed


# The status row that holds the whole pipeline's wall time (not a step: its own status, never summed with them).
WALL_STEP = "(whole pipeline)"
WALL_STATUS = "wall time"


def timing_sentence(status: pd.DataFrame) -> str:
    """The README's sentence on the main job's duration, from `reproduce_status.csv` as a frame: the pipeline's
    wall time (row WALL_STEP), its longest step, and the CPU the run had."""
    seconds = pd.to_numeric(status["seconds"], errors="coerce")
    wall = status[status["step"] == WALL_STEP]
    if wall.empty:
        raise ValueError(f"reproduce_status.csv has no {WALL_STEP!r} row: it predates the wall-time record; "
                         "rerun python -m repro.reproduce")
    steps = status[(status["step"] != WALL_STEP) & status["status"].isin(["done", "done (earlier run)"])]
    longest = steps.loc[seconds[steps.index].idxmax()] if not steps.empty else None
    detail = str(wall.iloc[-1].get("detail", ""))
    text = (f"the last `python -m repro.reproduce` in `results/reproduce_status.csv` took "
            f"{float(seconds[wall.index[-1]]) / 60:.1f} minutes of wall time ({detail})")
    if longest is not None:
        text += (f"; its longest step was {longest['step']} ({float(longest['seconds']) / 60:.1f} minutes), "
                 f"of {len(steps)} steps")
    return text + "."


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.reproduce", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short version (tiny synthetic ablation)")
    size.add_argument("--full", action="store_true", help="long version (5 synthetic seeds)")
    parser.add_argument("--force", action="store_true", help="redo steps that finished before")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results/)")
    parser.add_argument("--experiments", type=Path, default=Path("experiments"),
                        help="folder of the experiment YAMLs (default experiments/)")
    parser.add_argument("--skip", nargs="+", default=[], choices=STEP_GROUPS, help="step groups to leave out")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    parser.add_argument("--jobs", type=int, default=2,
                        help="steps run at once (default 2: every step is single-threaded; 1: one at a time)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check-data"]:
        return check_data_main(argv[1:])
    if argv[:1] == ["timing"]:  # `python -m repro.reproduce timing [RESULTS]`: the README's sentence
        results = Path(argv[1] if len(argv) > 1 else "results")
        path = results / "reproduce_status.csv"
        try:
            print(timing_sentence(pd.read_csv(path, dtype=str, keep_default_na=False)))
        except (OSError, ValueError) as error:
            print(f"cannot read the pipeline's timing from {path}: {error}", file=sys.stderr)
            return 4
        tests = results / "tests_timing.csv"
        if tests.is_file():  # written by `nox -s tests` (repro.measure.suite_timing)
            from repro.measure.suite_timing import timing_sentence as tests_sentence

            try:
                print(tests_sentence(pd.read_csv(tests, keep_default_na=False)))
            except (OSError, ValueError, KeyError) as error:
                print(f"cannot read the suite's timing from {tests}: {error}", file=sys.stderr)
                return 4
        return 0
    args = _parse_args(argv)
    if args.jobs < 1:
        print(f"--jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    preset = "quick" if args.quick else "full" if args.full else "default"
    skip = set(args.skip)
    args.results.mkdir(parents=True, exist_ok=True)
    # Logs and CI capture stdout: a console that wraps at 80 columns there splits commands mid-word.
    console = make_console()
    needs_configs = {"profile", "experiments"}
    groups = ["pipeline", *(group for group in GROUP_OUTPUTS if group != "pipeline" and group not in skip
                            and (group not in needs_configs or args.experiments.is_dir()))]
    cleared = start_fresh(args.results, groups, force=args.force)
    if cleared:
        console.print(f"fresh start for {', '.join(cleared)}: committed results saved to "
                      f"{reference_dir(args.results)} and recomputed")
    pipeline = Pipeline(results=args.results, force=args.force, console=console)
    env_path = write_environment(args.results)
    console.print(f"wrote {env_path}")
    steps = build_steps(python=args.python, results=args.results, experiments=args.experiments,
                        preset=preset, skip=skip, force=args.force)
    configs = sorted(args.experiments.glob("*.yaml")) if args.experiments.is_dir() else []
    if not args.experiments.is_dir():
        console.print(f"[yellow]no experiment folder at {args.experiments}: no profile/experiment steps[/]")
    run_configs = bool(configs) and "experiments" not in skip
    total = len(steps) + (len(configs) if run_configs else 0) + (0 if "report" in skip else 1)
    # Longest first (a greedy schedule over `--jobs` workers): the synthetic ablation, the benchmark, claims,
    # the profile chunks, then the experiments (one dataset check, and runs only where data is present).
    order = {"synthetic": 0, "bench": 1, "claims": 2, "profile": 3}
    queue: list[Step | str] = sorted(steps, key=lambda step: order.get(step.group, len(order)))
    if run_configs:
        queue.append("experiments")
    # A step waits for the one it follows (the worked example needs the trained R=2 model).
    after = {step.name: previous.name for previous, step in zip(steps, steps[1:], strict=False)
             if step.group == previous.group == "synthetic"}
    finished: set[str] = set()
    failed: list[str] = []
    stop = threading.Event()
    changed = threading.Condition()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    def next_item() -> Step | str | None:
        with changed:
            while True:
                if stop.is_set() or not queue:
                    return None
                for item in queue:
                    if isinstance(item, str) or after.get(item.name) in (None, *finished):
                        queue.remove(item)
                        return item
                changed.wait()

    def worker(progress, task) -> None:
        while (item := next_item()) is not None:
            if item == "experiments":
                if run_experiments(pipeline, python=args.python, experiments=args.experiments,
                                   progress=progress, task=task):
                    failed.append("experiments")
                name = item
            else:
                if pipeline.execute(item).failed:
                    failed.append(item.name)
                progress.update(task, advance=1)
                name = item.name
            with changed:
                finished.add(name)
                changed.notify_all()

    with Progress(*columns, console=console) as progress:
        task = progress.add_task("reproduce", total=total)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(worker, progress, task) for _ in range(args.jobs)]
            try:
                while not all(future.done() for future in futures):
                    time.sleep(0.2)
            except KeyboardInterrupt:
                # The steps' processes got the same SIGINT; let the workers record them and stop.
                stop.set()
                with changed:
                    changed.notify_all()
                wait(futures)
                console.print("[yellow]interrupted: finished steps are stamped; rerun to continue[/]")
                return 130
            for future in futures:
                future.result()
        if "report" not in skip:
            report = Step("report", "report", (args.python, "-m", "repro.report", "--results",
                                               str(args.results), "--experiments", str(args.experiments)),
                          stamped=False)
            if pipeline.execute(report).failed:
                failed.append("report")
            progress.update(task, advance=1)
    wall = Step(WALL_STEP, "pipeline", (sys.executable, "-m", "repro.reproduce", *argv), stamped=False)
    pipeline.record(wall, Outcome(WALL_STATUS, None, time.perf_counter() - started,
                                  f"{args.jobs} steps at a time, {os.cpu_count()} CPUs: {cpu_model()}"))
    if failed:
        names = ", ".join(failed)
        console.print(f"[red]{len(failed)} step(s) failed:[/] {names} (see {pipeline.status_path})")
        return 1
    console.print(f"[green]all steps done[/]; report: {args.results / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
