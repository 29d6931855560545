"""The suite's device logic, with CUDA faked where the machine has none: which device the operator tests use,
whether the Triton interpreter is on, what backend="auto" picks and from which evidence, what the claims and
the GPU acceptance run do on CUDA. On a CUDA machine, that the kernels really run natively."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from ops import criss_cross
from repro.measure import bench, claims
from repro.measure.variants import ContextVariant
from repro.pipeline import gpu
from tests.conftest import CUDA, interpreter_setting, op_device_for, worker_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports one CUDA device, an 'NVIDIA H200' (nothing is allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")


def test_op_device_and_interpreter_follow_cuda(fake_cuda):
    assert op_device_for(torch.cuda.is_available()) == torch.device("cuda")
    assert op_device_for(False) == torch.device("cpu")
    assert interpreter_setting(False, {}) == "1"
    assert interpreter_setting(True, {}) is None
    with pytest.raises(pytest.UsageError, match="TRITON_INTERPRET=1 is set on a machine with CUDA"):
        interpreter_setting(True, {"TRITON_INTERPRET": "1"})


def test_this_session_matches_its_machine():
    """The real session: interpreter on exactly when there is no CUDA."""
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (not CUDA)


def _kernel_kinds() -> set[str]:
    """The class names of the Triton kernels in ops.cca_triton (autotuner / heuristics wrappers unwrapped)."""
    from ops import cca_triton

    kinds = set()
    for value in vars(cca_triton).values():
        inner = value
        while type(inner).__name__ not in ("JITFunction", "InterpretedFunction") and hasattr(inner, "fn"):
            inner = inner.fn
        if type(inner).__name__ in ("JITFunction", "InterpretedFunction"):
            kinds.add(type(inner).__name__)
    return kinds


def test_kernels_are_native_on_cuda_and_interpreted_on_cpu():
    assert _kernel_kinds() == ({"JITFunction"} if CUDA else {"InterpretedFunction"})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_runs_natively_on_cuda():
    q = torch.randn(1, 4, 5, 6, device="cuda")
    v = torch.randn(1, 8, 5, 6, device="cuda")
    out = criss_cross.criss_cross_attention(q, q, v, backend="triton")
    torch.testing.assert_close(out, criss_cross.criss_cross_attention(q, q, v, backend="naive"),
                               rtol=1e-4, atol=1e-4)
    assert out.device.type == "cuda"


def _evidence_frame(device: str, dtype: str, naive: float, triton: float) -> pd.DataFrame:
    rows = []
    for variant, ms in (("cca_naive", naive), ("cca_triton", triton)):
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            rows.append({"variant": variant, "dtype": dtype, "batch": "2", "channels": "512", "qk_channels": "64",
                         "height": "97", "width": "97", "pass": pass_, "milliseconds": str(ms), "device": device,
                         "status": "ok", "torch": "2.13.0", "triton": "3.9.0", "date": "2026-12-01"})
    return pd.DataFrame(rows)


@pytest.fixture
def evidence(tmp_path, monkeypatch):
    """An evidence file from benchmark rows: on the H200 Triton wins at bf16 and loses at fp32; CPU rows and
    other GPUs do not count."""
    frame = pd.concat([
        _evidence_frame("cuda: NVIDIA H200", "bf16", naive=3.0, triton=1.0),
        _evidence_frame("cuda: NVIDIA H200", "fp32", naive=3.0, triton=4.0),
        _evidence_frame("cpu: AMD EPYC", "fp16", naive=3.0, triton=1.0),
    ])
    bench_csv = tmp_path / "ops_bench.csv"
    frame.to_csv(bench_csv, index=False)
    path = tmp_path / "auto_backend.csv"
    rows = bench.write_auto_backend_evidence(bench_csv, path)
    assert len(rows) == 2 and set(rows["device"]) == {"cuda: NVIDIA H200"}
    monkeypatch.setattr(criss_cross, "AUTO_EVIDENCE", path)
    return path


def test_auto_follows_the_benchmark_evidence(fake_cuda, evidence, monkeypatch):
    cuda = torch.device("cuda")
    assert criss_cross.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert criss_cross.resolve_backend("auto", cuda, torch.float32) == "naive"  # measured slower
    assert criss_cross.resolve_backend("auto", cuda, torch.float16) == "naive"  # never measured on a GPU
    assert criss_cross.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "naive"
    assert criss_cross.resolve_backend("naive", cuda, torch.bfloat16) == "naive"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert criss_cross.resolve_backend("auto", cuda, torch.bfloat16) == "naive"  # another GPU proves nothing


def test_auto_is_naive_without_evidence(fake_cuda, tmp_path, monkeypatch):
    monkeypatch.setattr(criss_cross, "AUTO_EVIDENCE", tmp_path / "absent.csv")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert criss_cross.resolve_backend("auto", torch.device("cuda"), dtype) == "naive"


def test_committed_evidence_is_generated_from_the_committed_benchmark(tmp_path):
    """ops/auto_backend.csv is exactly what `repro.bench --auto-evidence` makes of results/ops_bench.csv."""
    regenerated = bench.write_auto_backend_evidence(ROOT / "results" / "ops_bench.csv", tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_text() == criss_cross.AUTO_EVIDENCE.read_text()
    if regenerated.empty:  # nothing measured on a GPU yet: auto is naive everywhere
        assert criss_cross.load_auto_evidence() == ()


def test_evidence_file_with_other_columns_is_an_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("device,dtype\ncuda: X,fp32\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*expected"):
        criss_cross.load_auto_evidence(path)


def test_bench_times_triton_on_cuda_only(fake_cuda):
    assert bench.VARIANTS["cca_triton"].unavailable(torch.device("cuda")) is None
    assert bench.VARIANTS["cca_triton"].unavailable(torch.device("cpu")).startswith("not measured")


def test_claims_fail_on_a_triton_error_on_cuda(fake_cuda, monkeypatch):
    """On CUDA a kernel failure raises (the command exits non-zero, showing it); on CPU it is a not-run row."""
    def broken(self, **kwargs):
        def fail(x):
            raise RuntimeError("kernel exploded")
        module = torch.nn.Module()
        module.forward = fail
        return module

    monkeypatch.setattr(ContextVariant, "build", broken)
    # With real CUDA the probe reaches the broken module; with CUDA faked it fails already allocating its input.
    cause = "kernel exploded" if CUDA else "Torch not compiled with CUDA"
    with pytest.raises(RuntimeError, match=f"Triton criss-cross backend failed.*cuda: NVIDIA H200: .*{cause}"):
        claims.triton_unavailable_reason(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="Triton criss-cross backend failed"):
        claims.memory_rows([9], device=torch.device("cuda"), run_max_size=9)
    assert claims.triton_unavailable_reason(torch.device("cpu")).startswith("not run")


def test_gpu_acceptance_refuses_what_would_not_be_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu.preflight(tiny=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        gpu.preflight(tiny=False)
    plan = gpu.Plan.for_mode(tiny=False)
    assert plan.device.type == "cuda" and "tests/test_cca_triton.py" in plan.test_files
    assert {s.batch for s in plan.bench_shapes} == {2, 8} and set(plan.bench_dtypes) == {"fp32", "bf16"}
    assert plan.claims_size == 97 and plan.train_iterations == 20


def test_xdist_workers_run_one_torch_thread_each():
    """`nox -s tests` runs one pytest-xdist worker per core: each gets one torch thread (and its subprocesses
    OMP_NUM_THREADS=1); a plain run keeps up to 2."""
    assert worker_threads("gw0", 16) == 1
    assert worker_threads(None, 16) == 2 and worker_threads(None, 1) == 1
