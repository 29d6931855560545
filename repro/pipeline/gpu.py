"""`python -m repro.gpu [--tiny] [--results DIR]` (`nox -s gpu`): the whole GPU acceptance in one command.

Nothing in this project has run on a GPU before; when one is lent it is for minutes, so every check that needs
it is here, in one process, in this order (each step's failure is recorded and the next step still runs; the
exit status is non-zero when any step failed):

1. `kernels`: the fused Triton criss-cross backend against the naive one on the device (fp32 / bf16 / fp16;
   odd H and W, value channels that are not a multiple of any tile, channels-last and sliced inputs), the
   maximum error of the output and of the three input gradients relative to the largest reference value;
   determinism (two backward runs bitwise equal); `torch.library.opcheck` of the forward custom op;
   `torch.compile(fullgraph=True)` of the op (inductor on CUDA) against eager; then the operator test files
   under pytest on the device (`tests/conftest.py` runs them on CUDA when present; on CUDA the run refuses
   `TRITON_INTERPRET=1`, so the kernels run natively).
2. `bench`: `repro.measure.bench` at B=2 and B=8 (512 value / 64 query-key channels, 97x97), fp32 and bf16,
   for cca naive / triton / einsum and non-local naive / SDPA, into DIR/ops_bench.csv; then the
   backend="auto" evidence file (`ops/auto_backend.csv`) is regenerated from it.
3. `claims`: the claims' training-step and forward memory at 97x97 on the device's allocator (CUDA:
   `max_memory_allocated`) for R=2 criss-cross, naive and Triton, against non-local naive and SDPA, beside the
   fake-mode estimate, with the ratios.
4. `calibration`: the fake-mode training-memory estimate of `repro.measure.profile` beside the real
   `max_memory_allocated` of the same step, for two configs with a published memory figure.
5. `train`: 20 training iterations (after 2 warm-up ones, the second measuring the peak memory) of
   R-101-D8 at 769x769, batch 2, with the
   criss-cross head (naive, then Triton) and the non-local head: iterations/s and peak memory.
6. `report`: `results/REPORT.md` regenerated (`repro.pipeline.report`), with a section built from
   DIR/gpu_acceptance.csv.

Every row goes to DIR/gpu_acceptance.csv (step, check, variant, dtype, shape, metric, value, unit, status,
method, device, date; `device` names the GPU model, e.g. `cuda: NVIDIA H200`), replaced by key on a rerun.

`--tiny` runs the same code on the CPU at tiny sizes (Triton in its interpreter, a shrunk R-50 model, one
timed iteration) in about a minute of CPU time: the tests run it, so the command is known to work before a GPU sees it.
Its rows say `cpu: ...` and it writes nothing outside DIR (default: a fresh temporary folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pandas as pd
import torch

from repro.engine.config import ExperimentConfig, load_config, with_overrides
from repro.io import upsert_csv
from repro.measure import bench, claims, profile
from repro.measure.memory import peak_bytes
from repro.measure.steps import METHOD_CUDA_MEMORY, METHOD_FAKE_MEMORY, METHOD_PROFILER_MEMORY, training_step
from repro.measure.variants import ContextVariant
from repro.pipeline.report import write_report
from repro.vocabulary import DEVICE_TRACED, device_label

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
CSV_NAME = "gpu_acceptance.csv"
COLUMNS = ("step", "check", "variant", "dtype", "shape", "metric", "value", "unit", "status", "method", "device",
           "date")
KEY = ["step", "check", "variant", "dtype", "shape", "metric", "method", "device"]
STEPS = ("kernels", "bench", "claims", "calibration", "train", "report")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Error of the Triton backend relative to the largest |value| of an fp64 naive reference.
TOLERANCES = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
OP_TEST_FILES = ("tests/test_cca_triton.py", "tests/test_cca_naive.py", "tests/test_criss_cross_api.py",
                 "tests/test_non_local.py", "tests/test_heads.py", "tests/test_flops.py", "tests/test_device.py")
CALIBRATION_CONFIGS = ("mmseg_cityscapes_r101_d8_769x769_40k", "mmseg_ade20k_r101_d8_512x512_80k")
TRAIN_CONFIG = "mmseg_cityscapes_r101_d8_769x769_40k"
TRAIN_HEADS = {"rcca_naive": {"model.head": "rcca", "model.backend": "naive"},
               "rcca_triton": {"model.head": "rcca", "model.backend": "triton"},
               "nonlocal_naive": {"model.head": "nonlocal", "model.nonlocal_impl": "naive"}}
# Whatever the config says about the machine it was run on: one process, fresh weights, no data files.
SHRINK = {"model.depth": 50, "model.head_channels": 16, "model.aux_channels": 16, "data.crop_size": (17, 17),
          "data.batch_size": 2}


@dataclass(frozen=True)
class Plan:
    """Sizes of one acceptance run: the real one on CUDA, or `--tiny` on the CPU."""

    tiny: bool
    device: torch.device
    kernel_shapes: tuple[tuple[int, int, int, int, int], ...]  # (B, Cqk, Cv, H, W)
    kernel_dtypes: tuple[str, ...]
    bench_shapes: tuple[bench.Shape, ...]
    bench_dtypes: tuple[str, ...]
    bench_rounds: int
    claims_size: int
    train_iterations: int
    test_files: tuple[str, ...]

    @classmethod
    def for_mode(cls, tiny: bool) -> Plan:
        if tiny:
            return cls(tiny=True, device=torch.device("cpu"),
                       kernel_shapes=((1, 3, 5, 4, 7),), kernel_dtypes=("fp32",),
                       bench_shapes=(bench.Shape(1, 16, 4, 9, 11), bench.Shape(2, 16, 4, 9, 11)),
                       bench_dtypes=("fp32",), bench_rounds=1, claims_size=9, train_iterations=1,
                       test_files=("tests/test_device.py",))
        return cls(tiny=False, device=torch.device("cuda"),
                   kernel_shapes=((2, 64, 512, 97, 97), (1, 16, 72, 13, 17), (2, 8, 200, 33, 65),
                                  (3, 5, 7, 1, 31)),
                   kernel_dtypes=("fp32", "bf16", "fp16"),
                   bench_shapes=(bench.Shape(2, 512, 64, 97, 97), bench.Shape(8, 512, 64, 97, 97)),
                   bench_dtypes=("fp32", "bf16"), bench_rounds=3, claims_size=97, train_iterations=20,
                   test_files=OP_TEST_FILES)


class Recorder:
    """Collects rows and writes them to DIR/gpu_acceptance.csv after every step (replaced by KEY)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path = path
        self.device = device_label(device)
        self.date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        self.rows: list[dict] = []

    def add(self, step: str, check: str, metric: str, value: float | str, unit: str, *, status: str = "ok",
            variant: str = "", dtype: str = "", shape: str = "", method: str = "", device: str | None = None) -> None:
        self.rows.append({"step": step, "check": check, "variant": variant, "dtype": dtype, "shape": shape,
                          "metric": metric, "value": value, "unit": unit, "status": status, "method": method,
                          "device": self.device if device is None else device, "date": self.date})

    def flush(self) -> None:
        if self.rows:
            upsert_csv(self.path, pd.DataFrame(self.rows, columns=list(COLUMNS)), KEY)
            self.rows = []


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(side) for side in shape)


# ---------------------------------------------------------------------------------------------------------
# 1. kernels
# ---------------------------------------------------------------------------------------------------------

def _qkv(shape, dtype: torch.dtype, device: torch.device, layout: str = "contiguous", seed: int = 0):
    batch, qk_channels, value_channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, c, height, width, generator=generator) for c in
               (qk_channels, qk_channels, value_channels)]
    grad = torch.randn(batch, value_channels, height, width, generator=generator)
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    if layout == "channels_last":
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    elif layout == "sliced":
        tensors = [torch.cat([t, t], dim=1)[:, : t.shape[1]] for t in tensors]
    return [t.requires_grad_(True) for t in tensors], grad.to(device=device, dtype=dtype)


def _forward_backward(fn: Callable, tensors, grad):
    out = fn(*tensors)
    return (out, *torch.autograd.grad(out, tensors, grad))


def _triton(*tensors):
    from ops.criss_cross import criss_cross_attention

    return criss_cross_attention(*tensors, backend="triton")


def kernel_rows(plan: Plan, rec: Recorder) -> None:
    """Correctness against fp64 naive, determinism, opcheck, torch.compile; then the op tests under pytest.
    A check that raises is a FAILED row naming the error; the other checks still run."""
    checks: list[tuple[str, str, tuple, Callable[[], None]]] = []
    for shape in plan.kernel_shapes:
        for dtype_name in plan.kernel_dtypes:
            for layout in ("contiguous", "channels_last", "sliced"):
                checks.append((f"triton vs fp64 naive, {layout}", dtype_name, shape,
                               lambda s=shape, d=dtype_name, lay=layout: _correctness(plan, rec, s, d, lay)))
            checks.append(("determinism", dtype_name, shape,
                           lambda s=shape, d=dtype_name: _determinism(plan, rec, s, d)))
    checks.append(("opcheck and torch.compile", "fp32", plan.kernel_shapes[-1],
                   lambda: _opcheck_and_compile(plan, rec)))
    for check, dtype_name, shape, action in checks:
        try:
            action()
        except Exception as error:
            traceback.print_exc()
            rec.add("kernels", check, "raised", 1, "bool", status=f"FAILED: {type(error).__name__}: {error}"[:500],
                    variant="cca_triton", dtype=dtype_name, shape=_shape_text(shape))
    _pytest_rows(plan, rec)


def _correctness(plan: Plan, rec: Recorder, shape, dtype_name: str, layout: str) -> None:
    from ops.criss_cross import criss_cross_attention

    tensors, grad = _qkv(shape, DTYPES[dtype_name], plan.device, layout)
    results = _forward_backward(_triton, tensors, grad)
    reference_inputs = [t.detach().double().requires_grad_(True) for t in tensors]
    expected = _forward_backward(lambda *t: criss_cross_attention(*t, backend="naive"), reference_inputs,
                                 grad.double())
    for name, got, want in zip(("out", "grad_query", "grad_key", "grad_value"), results, expected):
        error = float((got.detach().double() - want.detach()).abs().max()
                      / want.detach().abs().max().clamp_min(1e-30))
        ok = error <= TOLERANCES[dtype_name]
        rec.add("kernels", f"triton vs fp64 naive, {layout}", f"max_rel_error_{name}", error, "ratio",
                status="ok" if ok else f"FAILED: above {TOLERANCES[dtype_name]}", variant="cca_triton",
                dtype=dtype_name, shape=_shape_text(shape), method="max |triton - naive fp64| / max |naive fp64|")


def _determinism(plan: Plan, rec: Recorder, shape, dtype_name: str) -> None:
    tensors, grad = _qkv(shape, DTYPES[dtype_name], plan.device)
    first = _forward_backward(_triton, tensors, grad)
    second = _forward_backward(_triton, tensors, grad)
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    rec.add("kernels", "determinism", "bitwise_equal_runs", int(same), "bool",
            status="ok" if same else "FAILED: two forward + backward runs differ", variant="cca_triton",
            dtype=dtype_name, shape=_shape_text(shape), method="torch.equal of output and input gradients of two runs")


def _opcheck_and_compile(plan: Plan, rec: Recorder) -> None:
    from ops import cca_triton

    shape = plan.kernel_shapes[-1]
    tensors, grad = _qkv(shape, torch.float32, plan.device)
    namespace, name = cca_triton.FORWARD_OP_NAME.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    status = "ok"
    try:
        torch.library.opcheck(op, tuple(t.detach() for t in tensors))
    except Exception as error:  # recorded, and the step fails below
        status = f"FAILED: {type(error).__name__}: {error}"
    rec.add("kernels", "opcheck", "passed", int(status == "ok"), "bool", status=status, variant="cca_triton",
            dtype="fp32", shape=_shape_text(shape), method=f"torch.library.opcheck({cca_triton.FORWARD_OP_NAME})")
    # Inductor on CUDA; on the CPU (--tiny) aot_eager, which traces the same graph without a C++ toolchain.
    backend = "inductor" if plan.device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(_triton, fullgraph=True, backend=backend)
    eager = _forward_backward(_triton, tensors, grad)
    traced = _forward_backward(compiled, tensors, grad)
    error = max(float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))
                for a, b in zip(traced, eager))
    ok = error <= TOLERANCES["fp32"]
    rec.add("kernels", f"torch.compile(fullgraph=True, backend={backend!r}) vs eager", "max_rel_error", error,
            "ratio", status="ok" if ok else f"FAILED: above {TOLERANCES['fp32']}", variant="cca_triton",
            dtype="fp32", shape=_shape_text(shape), method="output and input gradients")


def _pytest_rows(plan: Plan, rec: Recorder) -> None:
    report = Path(tempfile.mkdtemp(prefix="gpu_pytest_")) / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *plan.test_files]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.is_file():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "ok" if result.returncode == 0 else f"FAILED: pytest exit {result.returncode}: " + \
        " | ".join(result.stdout.strip().splitlines()[-5:])
    if result.returncode != 0:
        print(result.stdout[-8000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
    files = " ".join(plan.test_files)
    for metric, value in (("passed", passed), ("failed", counts["failures"] + counts["errors"]),
                          ("skipped", counts["skipped"]), ("seconds", round(seconds, 1))):
        rec.add("kernels", f"pytest {files}", metric, value, "count" if metric != "seconds" else "s",
                status=status, method="python -m pytest on the device of tests/conftest.py (op_device)")


# ---------------------------------------------------------------------------------------------------------
# 2. bench
# ---------------------------------------------------------------------------------------------------------

def bench_rows(plan: Plan, rec: Recorder, results: Path, evidence: Path) -> None:
    from rich.console import Console

    frame = bench.run(list(plan.bench_shapes), list(bench.VARIANTS), list(plan.bench_dtypes), plan.device,
                      rounds=plan.bench_rounds, threads=1, console=Console(stderr=True))
    upsert_csv(results / "ops_bench.csv", frame, bench.KEY)
    rows = bench.write_auto_backend_evidence(results / "ops_bench.csv", evidence)
    for _, row in frame.iterrows():
        shape = _shape_text((row["batch"], row["channels"], row["qk_channels"], row["height"], row["width"]))
        rec.add("bench", f"ops benchmark, {row['pass']}", "milliseconds", row["milliseconds"], "ms",
                status=row["status"], variant=row["variant"], dtype=row["dtype"], shape=shape,
                method="repro.measure.bench (B, Cv, Cqk, H, W)")
    rec.add("bench", "backend='auto' evidence", "rows", len(rows), "count", method=f"written to {evidence}")


# ---------------------------------------------------------------------------------------------------------
# 3. claims
# ---------------------------------------------------------------------------------------------------------

CLAIMS_VARIANTS = (ContextVariant("cca_naive", 2), ContextVariant("cca_triton", 2),
                   ContextVariant("non_local_naive"), ContextVariant("non_local_sdpa"))


def claims_rows(plan: Plan, rec: Recorder) -> None:
    size = plan.claims_size
    rows = claims.memory_rows([size], device=plan.device, run_max_size=size, variants=CLAIMS_VARIANTS)
    for row in rows:
        status = "ok" if not str(row["method"]).startswith("not ") else str(row["method"])
        rec.add("claims", f"context-module {row['metric']}", row["metric"], row["value"], row["unit"],
                status=status, variant=f"{row['variant']} R={row['recurrence']}", dtype="fp32",
                shape=_shape_text((row["batch"], row["channels"], row["height"], row["width"])),
                method=row["method"], device=row["device"])


# ---------------------------------------------------------------------------------------------------------
# 4. calibration, 5. train
# ---------------------------------------------------------------------------------------------------------

def _config(name: str, plan: Plan, overrides: dict | None = None) -> ExperimentConfig:
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    settings = {**(SHRINK if plan.tiny else {}), **(overrides or {})}
    return with_overrides(cfg, settings) if settings else cfg


def calibration_rows(plan: Plan, rec: Recorder) -> None:
    method = METHOD_CUDA_MEMORY if plan.device.type == "cuda" else METHOD_PROFILER_MEMORY
    for name in CALIBRATION_CONFIGS:
        cfg = _config(name, plan)
        shape = _shape_text((cfg.data.batch_size, 3, *cfg.data.crop_size))
        estimate = profile.estimate_training_memory(cfg)
        _, measured = profile.measure_training_memory(cfg, device=plan.device)
        common = dict(variant=name, dtype="fp32", shape=shape)
        rec.add("calibration", "training-step peak", "estimated_gib", estimate.peak_bytes / 2**30, "GiB",
                method=METHOD_FAKE_MEMORY, device=DEVICE_TRACED, **common)
        rec.add("calibration", "training-step peak", "measured_gib", measured / 2**30, "GiB", method=method,
                **common)
        rec.add("calibration", "training-step peak", "estimate_over_measured", estimate.peak_bytes / measured,
                "ratio", method=f"fake-mode estimate / {method}", **common)


def train_rows(plan: Plan, rec: Recorder) -> None:
    for label, overrides in TRAIN_HEADS.items():
        cfg = _config(TRAIN_CONFIG, plan, overrides)
        state = profile.step_state(cfg, device=plan.device)  # builds the model and runs warm-up step 1
        # Warm-up step 2 measures the peak (momentum buffers exist by then, as in every later step).
        peak, memory_method = peak_bytes(lambda s=state: training_step(s), plan.device)
        _synchronize(plan.device)
        if plan.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(plan.device)
        started = time.perf_counter()
        for _ in range(plan.train_iterations):
            training_step(state)
        _synchronize(plan.device)
        seconds = time.perf_counter() - started
        shape = _shape_text((cfg.data.batch_size, 3, *cfg.data.crop_size))
        what = f"R-{cfg.model.depth}-D{cfg.model.output_stride} {label}, {plan.train_iterations} iterations"
        common = dict(variant=label, dtype="fp32", shape=shape)
        rec.add("train", what, "iterations_per_s", plan.train_iterations / seconds, "it/s",
                method="training step (forward, decode + aux loss, backward, SGD) after 2 warm-up steps",
                **common)
        rec.add("train", what, "peak_extra_memory_gib", peak / 2**30, "GiB",
                method=f"{memory_method}, one step above the model, optimizer state and batch", **common)
        if plan.device.type == "cuda":
            rec.add("train", what, "peak_memory_gib", torch.cuda.max_memory_allocated(plan.device) / 2**30, "GiB",
                    method=f"{METHOD_CUDA_MEMORY} over the timed iterations (weights, momentum, batch included)",
                    **common)
        del state
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------

def preflight(tiny: bool) -> None:
    """Refuse a run that would not measure what it claims: no CUDA, or the kernels sent to the interpreter."""
    if tiny:
        if os.environ.get("TRITON_INTERPRET", "0") != "1" and "triton" in sys.modules:
            raise SystemExit("python -m repro.gpu --tiny: triton was imported before the Triton interpreter was "
                             "switched on; set TRITON_INTERPRET=1 first (`python -m repro.gpu --tiny` does)")
        return
    if not torch.cuda.is_available():
        raise SystemExit("python -m repro.gpu: no CUDA device is available (run with --tiny to check the "
                         "pipeline on the CPU)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("python -m repro.gpu: TRITON_INTERPRET=1 is set; the kernels would run in the Triton "
                         "interpreter, not natively. Unset it.")


def run(plan: Plan, results: Path, *, evidence: Path, experiments: Path = EXPERIMENTS,
        steps: Sequence[str] = STEPS) -> dict[str, str]:
    """Run `steps` in order; returns {step: "ok" | "FAILED: ..."} (a failed step does not stop the others)."""
    results.mkdir(parents=True, exist_ok=True)
    rec = Recorder(results / CSV_NAME, plan.device)
    outcome: dict[str, str] = {}
    actions = {
        "kernels": lambda: kernel_rows(plan, rec),
        "bench": lambda: bench_rows(plan, rec, results, evidence),
        "claims": lambda: claims_rows(plan, rec),
        "calibration": lambda: calibration_rows(plan, rec),
        "train": lambda: train_rows(plan, rec),
        "report": lambda: write_report(results, experiments),
    }
    for step in steps:
        started = time.perf_counter()
        print(f"[repro.gpu] {step} ...", file=sys.stderr, flush=True)
        try:
            actions[step]()
            failed = [row for row in rec.rows if str(row["status"]).startswith("FAILED")]
            outcome[step] = f"FAILED: {len(failed)} check(s) failed" if failed else "ok"
        except Exception as error:
            traceback.print_exc()
            outcome[step] = f"FAILED: {type(error).__name__}: {error}"
        seconds = time.perf_counter() - started
        if step != "report":
            rec.add(step, "step", "seconds", round(seconds, 2), "s", status=outcome[step][:500])
            rec.flush()
        print(f"[repro.gpu] {step}: {outcome[step]} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return outcome


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="the same code on the CPU at tiny sizes (Triton interpreter), in under a minute")
    parser.add_argument("--results", type=Path, default=None,
                        help="output folder (default: results/; with --tiny a new temporary folder)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="default: all, in order")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    preflight(args.tiny)
    if args.tiny:
        # The kernels run in the interpreter on the CPU; it must be on before triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = args.results or (Path(tempfile.mkdtemp(prefix="repro_gpu_tiny_")) if args.tiny else ROOT / "results")
    from ops.criss_cross import AUTO_EVIDENCE  # the committed file; a --tiny run writes its own copy

    evidence = results / AUTO_EVIDENCE.name if args.tiny else AUTO_EVIDENCE
    outcome = run(Plan.for_mode(args.tiny), results, evidence=evidence, steps=args.steps)
    for step, status in outcome.items():
        print(f"{step:12s} {status}")
    print(f"rows in {results / CSV_NAME}; report {results / 'REPORT.md'}")
    return 0 if all(status == "ok" for status in outcome.values()) else 1
