"""`python -m repro.gpu --tiny`: the GPU acceptance run's code path, on the CPU at tiny sizes, end to end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from ops.criss_cross import AUTO_EVIDENCE
from repro.pipeline import gpu
from repro.vocabulary import device_label
from tests.conftest import CUDA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="--tiny runs the kernels in the CPU interpreter, which this session leaves off on a "
                                 "CUDA machine; there `nox -s gpu` runs the real acceptance")
def test_tiny_acceptance_run_writes_every_step_and_nothing_else(tmp_path):
    committed = {path: path.read_bytes() for path in (AUTO_EVIDENCE, ROOT / "results" / "ops_bench.csv")}
    threads = torch.get_num_threads()
    try:
        assert gpu.main(["--tiny", "--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    frame = pd.read_csv(tmp_path / gpu.CSV_NAME, keep_default_na=False)
    assert tuple(frame.columns) == gpu.COLUMNS
    assert set(frame["step"]) == set(gpu.STEPS) - {"report"}
    assert not frame["status"].str.startswith("FAILED").any()
    measured = frame[frame["device"].str.startswith(("cpu", "cuda"))]
    assert set(measured["device"]) == {device_label("cpu")}
    kernels = frame[frame["step"] == "kernels"]
    errors = kernels[kernels["metric"].str.startswith("max_rel_error")]["value"].astype(float)
    assert len(errors) >= 12 and (errors <= gpu.TOLERANCES["fp32"]).all()
    assert set(kernels["check"]) >= {"determinism", "opcheck"}
    passed = kernels[(kernels["check"].str.startswith("pytest")) & (kernels["metric"] == "passed")]
    assert float(passed["value"].iloc[0]) > 0
    train = frame[(frame["step"] == "train") & (frame["metric"] == "iterations_per_s")]
    assert set(train["variant"]) == set(gpu.TRAIN_HEADS) and (train["value"].astype(float) > 0).all()
    calibration = frame[(frame["step"] == "calibration") & (frame["metric"] == "estimate_over_measured")]
    assert set(calibration["variant"]) == set(gpu.CALIBRATION_CONFIGS)
    ratios = frame[(frame["step"] == "claims") & (frame["metric"] == "memory_ratio")]
    assert {"non_local_naive_over_cca_naive_r2 R=2", "non_local_naive_over_cca_triton_r2 R=2"} <= set(
        ratios["variant"])
    goals = frame[frame["step"] == "goals"].set_index("metric")
    assert {"speedup", "roofline_fraction", "peak_memory_ratio", "bandwidth"} <= set(goals.index)
    assert (goals.loc["speedup", "value"].astype(float) > 0).all()
    assert goals.loc["speedup", "status"].str.startswith("not a goal check").all()  # CPU times prove nothing
    memory = goals.loc["peak_memory_ratio", "value"].astype(float)
    assert len(memory) == 2 and (memory >= 1.0).all()  # fp32: no buffer beyond the outputs but delta
    assert (tmp_path / "ops_bench.csv").is_file() and (tmp_path / AUTO_EVIDENCE.name).is_file()
    report = (tmp_path / "REPORT.md").read_text()
    assert "### GPU acceptance" in report and "0 failed" in report
    # A tiny run never touches the committed evidence or results.
    assert all(path.read_bytes() == data for path, data in committed.items())


def test_a_failed_step_fails_the_run_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(plan, rec):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(gpu, "claims_rows", broken)
    outcome = gpu.run(gpu.Plan.for_mode(tiny=True), tmp_path, evidence=tmp_path / "e.csv",
                      steps=["claims", "report"])
    assert outcome["claims"].startswith("FAILED: RuntimeError: no kernel today") and outcome["report"] == "ok"
    frame = pd.read_csv(tmp_path / gpu.CSV_NAME)
    assert frame.loc[frame["step"] == "claims", "status"].str.startswith("FAILED").all()
    assert "no kernel today" in (tmp_path / "REPORT.md").read_text()


def test_a_kernel_error_is_a_failed_row_and_the_other_checks_run(tmp_path, monkeypatch):
    def broken(*tensors):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(gpu, "_triton", broken)
    monkeypatch.setattr(gpu, "_pytest_rows", lambda plan, rec: rec.add("kernels", "pytest", "passed", 1, "count"))
    outcome = gpu.run(gpu.Plan.for_mode(tiny=True), tmp_path, evidence=tmp_path / "e.csv", steps=["kernels"])
    assert outcome["kernels"].startswith("FAILED")
    frame = pd.read_csv(tmp_path / gpu.CSV_NAME)
    raised = frame[frame["metric"] == "raised"]
    # 3 layouts + determinism + opcheck/compile, each recorded with the error; pytest still ran.
    assert len(raised) == 5 and raised["status"].str.contains("illegal memory access").all()
    assert (frame["check"] == "pytest").any()


@pytest.mark.parametrize(("name", "bandwidth"), [
    ("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H100 NVL", 3.9e12), ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA A100 80GB PCIe", 1.935e12),
    ("NVIDIA A100-PCIE-40GB", 1.555e12), ("Tesla V100-SXM2-16GB", None),
])
def test_datasheet_bandwidth_by_device_name(name, bandwidth):
    assert gpu.datasheet_bandwidth(name) == bandwidth


def test_goal_verdicts_say_met_or_not_and_never_fail_the_run():
    assert gpu.goal_verdict(6.0, 5.0, at_least=True, measured_on_gpu=True) == "goal met (>= 5)"
    assert gpu.goal_verdict(4.0, 5.0, at_least=True, measured_on_gpu=True) == "goal not met (>= 5)"
    assert gpu.goal_verdict(1.56, 1.1, at_least=False, measured_on_gpu=True) == "goal not met (<= 1.1)"
    assert gpu.goal_verdict(1.0, 1.1, at_least=False, measured_on_gpu=False).startswith("not a goal check")
    assert not any(gpu.goal_verdict(v, 1.0, at_least=True, measured_on_gpu=True).startswith("FAILED")
                   for v in (0.0, 2.0))
