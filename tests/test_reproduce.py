"""`repro.reproduce`: step failures are recorded not fatal, stamps make reruns resume, dataset checks,
and a fast end-to-end run (tiny synthetic ablation + report)."""

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from rich.text import Text

from repro.pipeline.reproduce import (
    PROFILE_CHUNK,
    Pipeline,
    Step,
    build_steps,
    committed_bytes,
    display_command,
    main,
    make_console,
    start_fresh,
    timing_sentence,
)
from tests.configs import write_config

# A stand-in interpreter: answers for the steps built in parallel (claims, profile, run) so these tests do
# not depend on them, and hands everything else (the dataset check, the report) to the real Python.
FAKE_PYTHON = """#!/bin/sh
case "$2" in
  repro.claims) echo "claims: $*"; exit 0 ;;
  repro.bench) echo "bench: $*"; exit 0 ;;
  repro.profile) echo "profiled $*"; exit 0 ;;
  repro.run)
    if grep -q crash "$3"; then echo "boom" >&2; exit 2; fi
    echo "trained $3"; exit 0 ;;
esac
exec "{python}" "$@"
"""


def _fake_cityscapes(root):
    """A two-image Cityscapes layout for both splits (what `--check-data` looks for)."""
    from repro.engine.config import load_config
    from repro.engine.data import write_fake_dataset
    from tests.configs import EXPERIMENTS

    cfg = load_config(EXPERIMENTS / "cityscapes_r2.yaml", [])
    return write_fake_dataset(cfg.data, root, count=1, size_hw=(8, 16))


def _pipeline(tmp_path, force=False):
    return Pipeline(results=tmp_path, force=force, console=Console(quiet=True))


def _fake_python(tmp_path):
    path = tmp_path / "fakepython"
    path.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_missing_module_is_a_recorded_failure(tmp_path):
    pipeline = _pipeline(tmp_path)
    outcome = pipeline.execute(Step("ghost", "claims", (sys.executable, "-m", "repro.no_such_step")))
    assert outcome.failed and outcome.exit_code == 1
    assert "No module named repro.no_such_step" in outcome.detail
    status = pd.read_csv(tmp_path / "reproduce_status.csv")
    assert status.loc[0, "step"] == "ghost" and status.loc[0, "status"] == "failed"
    assert not (tmp_path / ".stamps" / "ghost.done").exists()


def test_finished_steps_are_not_redone_unless_forced(tmp_path):
    counter = tmp_path / "count.txt"
    code = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); "
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    )
    step = Step("counting", "synthetic", (sys.executable, "-c", code))
    assert _pipeline(tmp_path).execute(step).status == "done"
    assert _pipeline(tmp_path).execute(step).status == "done (earlier run)"
    assert counter.read_text() == "x"
    # A changed command is a different piece of work.
    changed = Step("counting", "synthetic", (*step.argv, "--again"))
    assert _pipeline(tmp_path).execute(changed).status == "done"
    assert _pipeline(tmp_path, force=True).execute(changed).status == "done"
    assert counter.read_text() == "xxx"
    status = pd.read_csv(tmp_path / "reproduce_status.csv")
    assert status["step"].tolist() == ["counting"]  # one row per step, the latest outcome


@pytest.mark.slow
def test_pipeline_records_datasets_and_fails_on_a_failed_step(tmp_path):
    results, experiments = tmp_path / "results", tmp_path / "experiments"
    experiments.mkdir()
    data = _fake_cityscapes(tmp_path / "data")
    write_config(experiments, "alpha", comment="present", reported={"mIoU": 70.0}, data_root=data)
    write_config(experiments, "b_absent", reported={"mIoU": 80.0}, data_root=tmp_path / "nowhere")
    crash = write_config(experiments, "c_fails", comment="present crash", reported={"mIoU": 60.0}, data_root=data)
    python = _fake_python(tmp_path)
    argv = ["--results", str(results), "--experiments", str(experiments), "--skip", "synthetic",
            "--python", python]
    assert main(argv) == 1
    experiments_status = pd.read_csv(results / "experiments_status.csv")
    assert dict(zip(experiments_status["experiment"], experiments_status["status"], strict=True)) == {
        "alpha": "measured", "b_absent": "dataset not present", "c_fails": "run failed",
    }
    absent = experiments_status.set_index("experiment").loc["b_absent", "detail"]
    assert absent.startswith("b_absent: ") and str(tmp_path / "nowhere") in absent and "\n" not in absent
    status = pd.read_csv(results / "reproduce_status.csv").set_index("step")
    # One process checked every dataset.
    assert status.loc["check-data", "status"] == "done"
    assert status.loc["check-data", "command"].startswith("python -m repro.reproduce check-data --out ")
    assert not any(step.startswith("check-data-") for step in status.index)
    assert status.loc["(whole pipeline)", "status"] == "wall time"
    assert status.loc["claims", "status"] == "done"
    assert status.loc["profile-01-of-01", "status"] == "done"
    assert status.loc["run-c_fails", "status"] == "failed"
    assert status.loc["report", "status"] == "done"  # the report still ran after the failure
    # Training continues from its last checkpoint when an earlier pipeline was interrupted during it.
    assert status.loc["run-alpha", "command"].split()[-1] == "--resume"
    report = (results / "REPORT.md").read_text()
    assert "dataset not present" in report and "b_absent" in (results / "details" / "miou.md").read_text()
    # Rerun: stamped steps are skipped, the failed one is tried again.
    crash.write_text(crash.read_text().replace("# present crash", "# present"))
    assert main(argv) == 0
    status = pd.read_csv(results / "reproduce_status.csv").set_index("step")
    assert status.loc["claims", "status"] == "done (earlier run)"
    assert status.loc["run-c_fails", "status"] == "done"
    # --force trains from scratch.
    assert main([*argv, "--force"]) == 0
    status = pd.read_csv(results / "reproduce_status.csv").set_index("step")
    assert "--resume" not in status.loc["run-alpha", "command"].split()


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, monkeypatch):
    """The real synthetic step (--quick) and report, claims/bench/profile/experiments left to their own tests.
    A fresh checkout (committed results, no stamps) retrains instead of reusing the committed runs, and the
    report compares this run with the committed one."""
    results = tmp_path / "results"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--quick", "--results", str(results), "--experiments", str(tmp_path / "none"),
            "--skip", "claims", "bench", "profile", "experiments"]
    assert main(argv) == 0
    ablation = pd.read_csv(results / "synthetic_ablation.csv")
    assert sorted(ablation["variant"]) == ["R0", "R1", "R2", "R3", "nonlocal"]
    assert (results / "plots" / "synthetic_ablation.png").exists()
    assert (results / "plots" / "attention_reach.png").exists()
    assert (results / "predict_example" / "marker_example_attention.png").exists()
    report = (results / "REPORT.md").read_text()
    assert "## Synthetic long-range benchmark" in report and "| R2 | 20 |" in report
    assert pd.read_csv(results / "environment.csv").set_index("fact").loc["torch", "value"]
    assert main(argv) == 0
    status = pd.read_csv(results / "reproduce_status.csv").set_index("step")
    assert status.loc["synthetic-quick", "status"] == "done (earlier run)"
    # Without its status row (e.g. the CSV was deleted) the stamp alone still skips the step.
    (results / "reproduce_status.csv").unlink()
    assert main(argv) == 0
    status = pd.read_csv(results / "reproduce_status.csv").set_index("step")
    assert status.loc["synthetic-quick", "status"] == "skipped (done before)"
    assert status["command"].str.startswith("python -m ").all()  # not this machine's interpreter path

    # A fresh clone: these results are the committed reference, and no stamps exist.
    ablation["date"] = "committed"
    ablation["miou"] = 0.5 + 0.4 * ablation["recurrence"].fillna(0)  # R3's 1.7 cannot come out of a real run
    ablation.to_csv(results / "synthetic_ablation.csv", index=False)
    shutil.rmtree(results / ".stamps")
    assert main(argv) == 0
    retrained = pd.read_csv(results / "synthetic_ablation.csv")
    assert sorted(retrained["variant"]) == ["R0", "R1", "R2", "R3", "nonlocal"]
    assert not (retrained["date"] == "committed").any()
    reference = pd.read_csv(results / ".stamps" / "reference" / "synthetic_ablation.csv")
    assert (reference["date"] == "committed").all()
    report = (results / "REPORT.md").read_text()
    drift_section = report[report.index("## This run vs the committed results"):]
    assert "synthetic_ablation.csv" in drift_section and "drifted" in drift_section
    assert (results / "details" / "drift.md").exists()


def test_start_fresh_saves_the_committed_results_once(tmp_path):
    results = tmp_path / "results"
    (results / "plots").mkdir(parents=True)
    (results / "claims.csv").write_text("claim,value\nflops,1\n")
    (results / "plots" / "claims_flops.png").write_bytes(b"png")
    (results / "reproduce_status.csv").write_text("step,status\nclaims,done\n")
    assert start_fresh(results, ["pipeline", "claims"], force=False) == ["pipeline", "claims"]
    assert not (results / "claims.csv").exists() and not (results / "plots" / "claims_flops.png").exists()
    assert not (results / "reproduce_status.csv").exists()
    assert (results / ".stamps" / "reference" / "claims.csv").read_text() == "claim,value\nflops,1\n"
    # This run's file survives a resumed run; --force starts over and takes it as the new reference.
    (results / "claims.csv").write_text("claim,value\nflops,2\n")
    assert start_fresh(results, ["pipeline", "claims"], force=False) == []
    assert (results / "claims.csv").exists()
    assert start_fresh(results, ["claims"], force=True) == ["claims"]
    assert (results / ".stamps" / "reference" / "claims.csv").read_text() == "claim,value\nflops,2\n"


def test_start_fresh_keeps_other_machines_bench_rows(tmp_path):
    """ops_bench.csv on a fresh start: this CPU's 1-thread rows go (the bench step redoes them); another CPU's rows
    and this CPU's 2-thread rows stay; a file of this run's rows only is removed."""
    from repro.measure.environment import cpu_label

    results = tmp_path / "results"
    results.mkdir()
    rows = pd.DataFrame({"variant": ["cca_naive"] * 3, "cpu": [cpu_label(), cpu_label(), "AMD EPYC"],
                         "threads": ["1", "2", "1"], "milliseconds": ["1", "2", "3"]})
    rows.to_csv(results / "ops_bench.csv", index=False)
    assert start_fresh(results, ["bench"], force=False) == ["bench"]
    kept = pd.read_csv(results / "ops_bench.csv", dtype=str)
    assert list(zip(kept["cpu"], kept["threads"])) == [(cpu_label(), "2"), ("AMD EPYC", "1")]
    assert len(pd.read_csv(results / ".stamps" / "reference" / "ops_bench.csv")) == 3  # the reference is whole
    rows.iloc[:1].to_csv(results / "ops_bench.csv", index=False)
    assert start_fresh(results, ["bench"], force=True) == ["bench"]
    assert not (results / "ops_bench.csv").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_reference_is_the_committed_file_not_a_local_edit(tmp_path):
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    csv = repo / "results" / "claims.csv"
    csv.write_text("committed\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "results/claims.csv"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)
    csv.write_text("edited by hand\n")
    assert committed_bytes(csv) == (b"committed\n", "git HEAD")
    untracked = repo / "results" / "other.csv"
    untracked.write_text("x\n")
    assert committed_bytes(untracked) == (b"x\n", "file on disk")
    assert committed_bytes(repo / "results" / "absent.csv") is None


def test_status_commands_are_repository_relative(tmp_path):
    argv = ("/opt/venv/bin/python", "-m", "repro.profile", str(tmp_path / "experiments" / "a b.yaml"), "--out",
            str(tmp_path / "results"))
    assert display_command(argv, root=tmp_path) == "python -m repro.profile 'experiments/a b.yaml' --out results"
    assert display_command(("py", "-m", "x", "/elsewhere/f.yaml"), root=tmp_path).endswith("/elsewhere/f.yaml")


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        main(["--quick", "--full"])
    with pytest.raises(SystemExit):
        main(["--skip", "everything"])


def test_profile_steps_cover_every_config_in_chunks(tmp_path):
    for index in range(PROFILE_CHUNK + 2):
        (tmp_path / f"exp{index}.yaml").write_text("reported: {}\n")
    steps = build_steps(python="py", results=tmp_path / "r", experiments=tmp_path, preset="quick", skip=set())
    profile = [step for step in steps if step.group == "profile"]
    assert [step.name for step in profile] == ["profile-01-of-02", "profile-02-of-02"]
    configs = [arg for step in profile for arg in step.argv if arg.endswith(".yaml")]
    assert configs == [str(path) for path in sorted(tmp_path.glob("*.yaml"))]
    assert all(step.argv[-2:] == ("--out", str(tmp_path / "r")) for step in profile)
    assert [step.name for step in steps if step.group != "profile"] == [
        "claims", "bench", "synthetic-quick", "predict-example-quick"]


@pytest.mark.xdist_group("interruptions")  # a signal to a process group: one at a time (see test_security)
def test_interrupt_records_the_step_and_exits_130(tmp_path):
    """Ctrl-C reaches the pipeline and its step (one process group): exit 130, the step recorded as
    interrupted and not stamped, so a rerun does it again."""
    started = tmp_path / "claims-started"
    fake = tmp_path / "fakepython"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = repro.claims ]; then touch {started}; exec "{sys.executable}" -c '
        '"import time; time.sleep(60)"; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "repro.reproduce", "--results", str(results), "--experiments",
            str(tmp_path / "none"), "--skip", "synthetic", "--python", str(fake)]
    # Background processes may inherit an ignored SIGINT; a terminal's Ctrl-C finds it at its default.
    process = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert process.poll() is None and time.monotonic() < deadline, "claims step never started"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    status = pd.read_csv(results / "reproduce_status.csv").set_index("step")
    assert status.loc["claims", "status"] == "failed" and status.loc["claims", "detail"] == "interrupted"
    assert not (results / ".stamps" / "claims.done").exists()
    assert "report" not in status.index


def test_force_reaches_the_synthetic_ablation(tmp_path):
    steps = build_steps(python="py", results=tmp_path, experiments=tmp_path, preset="default",
                        skip={"claims", "bench"}, force=True)
    assert steps[0].argv == ("py", "-m", "repro.synthetic", "--out", str(tmp_path), "--force")


def test_benchmark_step_writes_into_the_results_folder(tmp_path):
    steps = build_steps(python="py", results=tmp_path, experiments=tmp_path / "none", preset="quick", skip=set())
    bench = next(step for step in steps if step.group == "bench")
    assert bench.argv[:4] == ("py", "-m", "repro.bench", "--out") and bench.argv[4] == str(tmp_path / "ops_bench.csv")


def test_console_does_not_wrap_when_not_a_terminal(tmp_path):
    buffer = io.StringIO()
    console = make_console(file=buffer)
    assert not console.is_terminal and console.width == 80
    argv = (sys.executable, "-m", "repro.profile", *(f"experiments/config_{index}.yaml" for index in range(20)))
    console.print(Text("run ", style="bold") + Text(display_command(argv)))
    assert buffer.getvalue().count("\n") == 1 and "config_19.yaml" in buffer.getvalue()


def test_steps_see_a_wide_console(tmp_path):
    step = Step("columns", "claims", (sys.executable, "-c", "import os; print('COLUMNS=' + os.environ['COLUMNS'])"),
                stamped=False)
    assert _pipeline(tmp_path).execute(step).detail == "COLUMNS=1000"


def test_dataset_checks_run_in_one_process_with_one_row_per_config(tmp_path):
    experiments = tmp_path / "experiments"
    present = write_config(experiments, "present", data_root=_fake_cityscapes(tmp_path / "data"))
    absent = write_config(experiments, "absent", data_root=tmp_path / "nowhere")
    broken = write_config(experiments, "broken")
    broken.write_text(broken.read_text().replace("recurrence: 2", "recurrence: -1"))
    table = tmp_path / "datasets.csv"
    assert main(["check-data", "--out", str(table), str(present), str(absent), str(broken)]) == 2
    rows = pd.read_csv(table).set_index("experiment")
    assert rows["status"].to_dict() == {"present": "present", "absent": "dataset not present",
                                        "broken": "config error"}
    assert rows["exit_code"].to_dict() == {"present": 0, "absent": 3, "broken": 2}
    assert str(tmp_path / "nowhere") in rows.loc["absent", "detail"]
    assert "recurrence" in rows.loc["broken", "detail"]
    assert main(["check-data", "--out", str(table), str(present), str(absent)]) == 0


def test_timing_sentence_comes_from_the_status_csv():
    status = pd.DataFrame({
        "step": ["claims", "synthetic-default", "(whole pipeline)"],
        "status": ["done", "done", "wall time"],
        "seconds": ["90.0", "420.0", "600.0"],
        "detail": ["", "", "2 steps at a time, 2 CPUs: AMD EPYC"],
    })
    sentence = timing_sentence(status)
    assert "10.0 minutes of wall time (2 steps at a time, 2 CPUs: AMD EPYC)" in sentence
    assert "longest step was synthetic-default (7.0 minutes), of 2 steps" in sentence
    with pytest.raises(ValueError, match="whole pipeline"):
        timing_sentence(status[status["step"] != "(whole pipeline)"])


def test_timing_command_prints_the_sentence_or_one_error_line(tmp_path, capsys):
    pd.DataFrame({"step": ["(whole pipeline)"], "status": ["wall time"], "seconds": ["90.0"],
                  "detail": ["2 steps at a time"]}).to_csv(tmp_path / "reproduce_status.csv", index=False)
    assert main(["timing", str(tmp_path)]) == 0
    assert "1.5 minutes of wall time (2 steps at a time)" in capsys.readouterr().out
    assert main(["timing", str(tmp_path / "none")]) == 4
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_suite_records_its_own_timing_and_the_sentence_reads_it(tmp_path):
    """With CCREPRO_TESTS_TIMING set (as `nox -s tests` sets it), a pytest session appends its wall time and counts;
    `python -m repro.reproduce timing` prints the README's sentence from the last row."""
    from repro.measure import suite_timing

    target = tmp_path / "results" / "tests_timing.csv"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    env["CCREPRO_TESTS_TIMING"] = str(target)
    root = Path(__file__).resolve().parents[1]
    suite_timing.record(target, seconds=1.0, counts={"failed": 3}, workers=2, exit_status=1)  # an earlier run
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_reproduce.py::test_timing_sentence_comes_from_the_status_csv"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    table = pd.read_csv(target, keep_default_na=False)
    assert tuple(table.columns) == suite_timing.COLUMNS and len(table) == 2  # appended, not replaced
    last = table.iloc[-1]
    assert (last["passed"], last["failed"], last["skipped"], last["exit_status"], last["workers"]) == (1, 0, 0, 0, 1)
    assert 0 < float(last["pytest_seconds"]) < 300
    pd.DataFrame({"step": ["(whole pipeline)"], "status": ["wall time"], "seconds": ["90.0"],
                  "detail": ["x"]}).to_csv(tmp_path / "results" / "reproduce_status.csv", index=False)
    printed = subprocess.run([sys.executable, "-m", "repro.reproduce", "timing", str(tmp_path / "results")],
                             cwd=root, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert "spent 0 min" in printed.stdout and "1 passed, 0 skipped, 0 failed; commit" in printed.stdout
    table.loc[len(table) - 1, "pytest_seconds"] = 490.6
    sentence = suite_timing.timing_sentence(table)
    assert "spent 8 min 11 s in pytest" in sentence and "last 2 runs there took 0 min 01 s to 8 min 11 s" in sentence
    assert "3 failed, pytest exit status 1;" in suite_timing.timing_sentence(table.iloc[:1])
