"""Every `python -m repro.X` command: each option has help text and its choices are listed; the commands
that only read (report on a clone, bench --quick, run --check-data, run --smoke into runs/) leave
`git status` clean; the shared vocabulary (checkpoint sources, error lines)."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repro import vocabulary

ROOT = Path(__file__).resolve().parents[1]
# Command modules whose parser is not reached through a `main` of the `python -m` module itself.
SPECIAL = {
    "repro.gpu": ("repro.pipeline.gpu", "parse_args"),  # repro/gpu.py sets TRITON_INTERPRET before importing
    "repro.synthetic": ("repro.synthetic.cli", "main"),  # repro/synthetic/__main__.py runs on import
    "repro.synthetic.example": ("repro.synthetic.example", "main"),
    "repro.parity": ("repro.parity.cli", "main"),  # a package: repro/parity/__main__.py
}
NOT_COMMANDS = {"__init__", "io", "vocabulary"}


def _commands() -> dict[str, tuple[str, str]]:
    """Every `python -m repro.X` entry point (each repro/X.py but the shared modules), found on disk so a new
    command is walked too, and where its parser is built."""
    found = dict(SPECIAL)
    for path in sorted((ROOT / "repro").glob("*.py")):
        name = f"repro.{path.stem}"
        if path.stem not in NOT_COMMANDS and name not in found:
            found[name] = (name, "main")
    return found


COMMANDS = _commands()


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _parser(monkeypatch, module: str, function: str) -> argparse.ArgumentParser:
    """The command's parser, taken at its parse_args call (nothing of the command runs)."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as caught:
        getattr(importlib.import_module(module), function)([])
    return caught.value.parser


def test_every_command_module_has_a_main():
    for command, (module, function) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), function, None)), f"{command}: no {function}()"
    assert {"repro.run", "repro.predict", "repro.report", "repro.bench", "repro.gpu"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_lists_its_choices(monkeypatch, command):
    parser = _parser(monkeypatch, *COMMANDS[command])
    assert parser.prog == f"python -m {command}", parser.prog
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command}: {name} has no help text"
        for choice in action.choices or ():
            assert str(choice) in text, f"{command}: choice {choice!r} of {name} is not in --help"


def test_checkpoint_source_names_are_one_vocabulary(monkeypatch):
    run = _parser(monkeypatch, *COMMANDS["repro.run"])
    predict = _parser(monkeypatch, *COMMANDS["repro.predict"])
    choices = {parser.prog: next(a.choices for a in parser._actions if "--checkpoint-source" in a.option_strings)
               for parser in (run, predict)}
    assert set(choices.values()) == {vocabulary.CHECKPOINT_SOURCES}
    assert "ccrepro" in vocabulary.CHECKPOINT_SOURCES and "ours" in vocabulary.CHECKPOINT_SOURCES
    assert vocabulary.checkpoint_source("ours") == vocabulary.checkpoint_source("ccrepro") == "ccrepro"
    assert vocabulary.checkpoint_source(None) is None
    with pytest.raises(ValueError, match="unknown checkpoint source 'theirs'"):
        vocabulary.checkpoint_source("theirs")
    assert vocabulary.error_line("python -m repro.x", "a\n b") == "python -m repro.x: error: a b"


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True)
    return done.stdout


def _command(folder: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(folder))
    return subprocess.run([sys.executable, "-m", *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A git repository holding the project's tracked files as they are in this working tree."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    folder = tmp_path_factory.mktemp("checkout")
    files = _git(ROOT, "ls-files", "-z").split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    _git(folder, "init", "-q")
    _git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "snapshot")
    return folder


@pytest.mark.slow
def test_report_on_a_clone_keeps_the_committed_drift_and_then_changes_nothing(checkout):
    drift_page = (checkout / "results/details/drift.md").read_bytes()
    done = _command(checkout, "repro.report")
    assert done.returncode == 0, done.stderr
    # No reference snapshot in a clone: the committed comparison stays, page and section.
    assert (checkout / "results/details/drift.md").read_bytes() == drift_page
    assert "results/details/drift.md" not in _git(checkout, "status", "--porcelain")
    assert "## This run vs the committed results" in (checkout / "results/REPORT.md").read_text()
    # Whatever the first run brought up to date (a report of an older version), a second run changes nothing,
    # not even the generation date.
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-a", "-m", "report", "--allow-empty")
    done = _command(checkout, "repro.report")
    assert done.returncode == 0, done.stderr
    assert _git(checkout, "status", "--porcelain") == ""
    assert "nothing changed" in done.stdout


@pytest.mark.slow
def test_read_only_commands_leave_git_status_clean(checkout):
    quick = _command(checkout, "repro.bench", "--quick", "--device", "cpu", "--variants", "cca_naive")
    assert quick.returncode == 0, quick.stderr
    assert (checkout / "runs/bench/ops_bench.csv").is_file() and "runs/bench/ops_bench.csv" in quick.stdout
    check = _command(checkout, "repro.run", "experiments/cityscapes_r2.yaml", "--check-data")
    assert check.returncode == 3, check.stderr
    smoke = _command(checkout, "repro.run", "experiments/mmseg_cityscapes_r50_d8_512x1024_40k.yaml", "--smoke",
                     "--no-progress", "--device", "cpu")
    assert smoke.returncode == 0, smoke.stderr
    assert "SMOKE" in smoke.stdout and "runs/mmseg_cityscapes_r50_d8_512x1024_40k-smoke" in smoke.stdout
    assert _git(checkout, "status", "--porcelain") == ""


def test_profiler_noise_is_dropped_and_everything_else_kept():
    """What Kineto writes to file descriptor 2 on each profiling session goes; other lines stay, in order."""
    code = (
        "import os, sys\n"
        "from repro.measure.quiet import quiet_profiler\n"
        "with quiet_profiler():\n"
        "    os.write(2, b'USDT:2026-12-07 11:03:18 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\\n')\n"
        "    os.write(2, b'[W1207 11:03:18.935842930 CPUAllocator.cpp:245] Memory block of unknown size was allocated"
        " before the profiling started, profiler results will not include the deallocation event\\n')\n"
        "    print('a real warning', file=sys.stderr)\n"
        "    os.write(2, b'USDT:2026-12-07 11:03:18 1:1 SyncActivityProfilerHandler.cpp:59] profiler_stop\\n')\n"
        "with quiet_profiler(enabled=False):\n"
        "    os.write(2, b'USDT: ActivityProfilerHandler kept when asked\\n')\n"
        "import torch\n"
        "from torch.profiler import ProfilerActivity, profile\n"
        "with quiet_profiler():\n"
        "    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):\n"
        "        torch.ones(4) * 2\n"
        "print('done')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert done.stderr.splitlines() == ["a real warning", "USDT: ActivityProfilerHandler kept when asked"]
