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
3. `goals`: the fused kernel's goals at B=8, Cqk 64, Cv 512, 97x97, bf16, channels-last inputs: forward +
   backward time against the naive backend (goal 5x) and the non-local block with SDPA (2x), the forward's
   fraction of the HBM roofline (minimum bytes / time / datasheet bandwidth; goal 0.5) beside a measured copy
   bandwidth, and each pass's peak memory over its inputs + outputs (goal 1.1x). A goal not met is a row that
   says so, not a failed check.
4. `claims`: the claims' training-step and forward memory at 97x97 on the device's allocator (CUDA:
   `max_memory_allocated`) for R=2 criss-cross, naive and Triton, against non-local naive and SDPA, beside the
   fake-mode estimate, with the ratios.
5. `calibration`: the fake-mode training-memory estimate of `repro.measure.profile` beside the real
   `max_memory_allocated` of the same step, for two configs with a published memory figure.
6. `train`: 20 training iterations (after 2 warm-up ones, the second measuring the peak memory) of
   R-101-D8 at 769x769, batch 2, with the
   criss-cross head (naive, then Triton on NCHW and on channels-last maps) and the non-local head:
   iterations/s and peak memory.
7. `export`: the ONNX export (`repro.engine.export`: R-101-D8 criss-cross R=2 with random weights, gamma 0.5;
   `--tiny`: the synthetic R=2 model), verified on the CPU engines as always, then, where onnxruntime-gpu
   (CUDAExecutionProvider) or TensorRT (TensorrtExecutionProvider) is present, the same file on the GPU
   against the torch model on the GPU: max |logit diff| and argmax agreement at 512x1024 (a check: agreement
   >= 99.9% and max |logit diff| <= 1e-2, TF32 being allowed on both sides). Without the deploy extra or a
   GPU provider the rows say `not run: ...`; nothing is reported as measured before it has run.
8. `report`: `results/REPORT.md` regenerated (`repro.pipeline.report`), with a section built from
   DIR/gpu_acceptance.csv.

Every row goes to DIR/gpu_acceptance.csv (step, check, variant, dtype, shape, metric, value, unit, status,
method, device, date; `device` names the GPU model, e.g. `cuda: NVIDIA H200`), replaced by key on a rerun.

`--tiny` runs the same code on the CPU at tiny sizes (Triton in its interpreter, a shrunk R-50 model, one
timed iteration) in 2-2.5 minutes on the shared 2-core machine (30-35 s of CPU time): the tests run it, so the
command is known to work before a GPU sees it. The PyTorch profiler's own stderr lines are dropped
(`--profiler-log` keeps them).
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

import numpy as np
import pandas as pd
import torch

from repro.engine.config import ExperimentConfig, load_config, with_overrides
from repro.io import upsert_csv
from repro.measure import bench, claims, profile
from repro.measure.memory import peak_bytes
from repro.measure.quiet import quiet_profiler
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
STEPS = ("kernels", "bench", "goals", "claims", "calibration", "train", "export", "report")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Error of the Triton backend relative to the largest |value| of an fp64 naive reference.
TOLERANCES = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
OP_TEST_FILES = ("tests/test_cca_triton.py", "tests/test_cca_naive.py", "tests/test_criss_cross_api.py",
                 "tests/test_non_local.py", "tests/test_heads.py", "tests/test_flops.py", "tests/test_device.py")
CALIBRATION_CONFIGS = ("mmseg_cityscapes_r101_d8_769x769_40k", "mmseg_ade20k_r101_d8_512x512_80k")
TRAIN_CONFIG = "mmseg_cityscapes_r101_d8_769x769_40k"
TRAIN_HEADS = {"rcca_naive": {"model.head": "rcca", "model.backend": "naive"},
               "rcca_triton": {"model.head": "rcca", "model.backend": "triton"},
               "rcca_triton_channels_last": {"model.head": "rcca", "model.backend": "triton",
                                             "model.channels_last": True},
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
    goal_shape: tuple[int, int, int, int, int] = (8, 64, 512, 97, 97)  # (B, Cqk, Cv, H, W) of the kernel goals
    goal_dtype: str = "bf16"

    @classmethod
    def for_mode(cls, tiny: bool) -> Plan:
        if tiny:
            return cls(tiny=True, device=torch.device("cpu"),
                       kernel_shapes=((1, 3, 5, 4, 7),), kernel_dtypes=("fp32",),
                       bench_shapes=(bench.Shape(1, 16, 4, 9, 11), bench.Shape(2, 16, 4, 9, 11)),
                       bench_dtypes=("fp32",), bench_rounds=1, claims_size=9, train_iterations=1,
                       test_files=("tests/test_device.py",), goal_shape=(2, 4, 6, 5, 7), goal_dtype="fp32")
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
# 3. goals: the fused kernel's goals on a GPU
# ---------------------------------------------------------------------------------------------------------

# The design's goals for the fused kernel at Plan.goal_shape (B = 8, Cqk 64, Cv 512, 97 x 97, bf16): forward +
# backward at least 5x faster than the naive backend and 2x faster than the non-local block with SDPA; the
# forward at >= 50% of the HBM roofline; peak memory at most 1.1x its inputs + outputs (+ LSE). A goal not met
# is recorded as such, not as a failed check: the acceptance run fails only when something is broken.
GOAL_SPEEDUPS = {"cca_naive": 5.0, "non_local_sdpa": 2.0}
GOAL_ROOFLINE_FRACTION = 0.5
GOAL_PEAK_MEMORY_RATIO = 1.1
# Peak HBM bandwidth by GPU model (bytes/s), from NVIDIA's datasheets: H200 (nvidia.com/en-us/data-center/h200),
# H100 SXM / PCIe / NVL (nvidia.com/en-us/data-center/h100), A100 80GB SXM / PCIe and 40GB
# (nvidia.com/en-us/data-center/a100). First matching fragment of torch.cuda.get_device_name wins.
DATASHEET_BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                       ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12))
# Bytes copied (read and written once each) to measure the device's achievable bandwidth (tiny: 8 MiB).
COPY_BYTES = 1 << 30


def datasheet_bandwidth(device_name: str) -> float | None:
    """The datasheet HBM bandwidth of a GPU model named like torch.cuda.get_device_name, or None if unknown."""
    return next((bandwidth for fragment, bandwidth in DATASHEET_BANDWIDTH if fragment in device_name), None)


def _milliseconds(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of `fn()`: triton.testing.do_bench on CUDA, three wall-clock calls on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    times = []
    for _ in range(3):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[1]


def _copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (each byte read once and written once)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / (_milliseconds(lambda: target.copy_(source), device) / 1e3)


def goal_verdict(value: float, goal: float, *, at_least: bool, measured_on_gpu: bool) -> str:
    """Status of one goal row: met / not met on a GPU; on the CPU (the tiny run) not a goal check."""
    if not measured_on_gpu:
        return "not a goal check: measured on the CPU (the goals are GPU goals)"
    met = value >= goal if at_least else value <= goal
    return f"goal {'met' if met else 'not met'} ({'>=' if at_least else '<='} {goal:g})"


def goal_rows(plan: Plan, rec: Recorder) -> None:
    """The kernel's GPU goals at plan.goal_shape, channels-last inputs (what the 1x1 convs of a channels-last
    model produce; NCHW inputs would add the op's copies into channels-last)."""
    from ops import cost

    batch, qk_channels, v_channels, height, width = plan.goal_shape
    dtype = DTYPES[plan.goal_dtype]
    on_gpu = plan.device.type == "cuda"
    tensors, grad = _qkv(plan.goal_shape, dtype, plan.device, "channels_last")
    grad = grad.contiguous(memory_format=torch.channels_last)
    common = dict(dtype=plan.goal_dtype, shape=_shape_text(plan.goal_shape))
    timer = "triton.testing.do_bench median" if on_gpu else "median of 3 wall-clock calls"

    times = {}
    for name in ("cca_triton", *GOAL_SPEEDUPS):
        fn = bench.VARIANTS[name].fn
        times[name, "fwd"] = _milliseconds(lambda fn=fn: fn(*tensors), plan.device)
        times[name, "fwd+bwd"] = _milliseconds(
            lambda fn=fn: torch.autograd.grad(fn(*tensors), tensors, grad), plan.device)
        for pass_ in ("fwd", "fwd+bwd"):
            rec.add("goals", f"{pass_} time, channels-last inputs", "milliseconds", times[name, pass_], "ms",
                    variant=name, method=timer, **common)
    for name, goal in GOAL_SPEEDUPS.items():
        speedup = times[name, "fwd+bwd"] / times["cca_triton", "fwd+bwd"]
        rec.add("goals", f"fwd+bwd speedup of cca_triton over {name}", "speedup", speedup, "x",
                status=goal_verdict(speedup, goal, at_least=True, measured_on_gpu=on_gpu), variant="cca_triton",
                method=f"{name} time / cca_triton time, {timer}, side by side in one run", **common)

    # Roofline: the minimum forward bytes (q, k, v read once, out written once, LSE) over the forward time,
    # against the datasheet bandwidth (or, for a GPU not in the table, a measured device-to-device copy).
    copy_bandwidth = _copy_bandwidth(COPY_BYTES if on_gpu else 1 << 23, plan.device)
    rec.add("goals", "device-to-device copy bandwidth", "bandwidth", copy_bandwidth / 1e9, "GB/s",
            variant="torch copy_", method=f"2 x {COPY_BYTES if on_gpu else 1 << 23} bytes / time, {timer}", **common)
    peak = datasheet_bandwidth(torch.cuda.get_device_name(plan.device)) if on_gpu else None
    reference, reference_name = (peak, "datasheet HBM bandwidth") if peak else (copy_bandwidth, "measured copy")
    minimum = cost.criss_cross_attention_cost(batch, qk_channels, v_channels, height, width,
                                              itemsize=dtype.itemsize).bytes
    fraction = minimum / (times["cca_triton", "fwd"] / 1e3) / reference
    rec.add("goals", "forward fraction of the HBM roofline", "roofline_fraction", fraction, "ratio",
            status=goal_verdict(fraction, GOAL_ROOFLINE_FRACTION, at_least=True, measured_on_gpu=on_gpu),
            variant="cca_triton", method=f"minimum bytes ({minimum}) / forward time / {reference_name} "
                                         f"({reference / 1e9:.0f} GB/s)", **common)

    # Peak memory of each pass against the tensors it must hold: forward q, k, v, out, LSE; backward q, k, v,
    # out, dO, LSE, dq, dk, dv. Above-baseline peaks are measured with the inputs already allocated.
    from ops.cca_triton import cca_triton_backward, cca_triton_forward

    detached = [t.detach() for t in tensors]
    forward_extra, memory_method = peak_bytes(lambda: cca_triton_forward(*detached), plan.device)
    out, lse = cca_triton_forward(*detached)
    backward_extra, _ = peak_bytes(lambda: cca_triton_backward(grad, *detached, out, lse), plan.device)
    inputs = sum(t.numel() * t.element_size() for t in detached)
    essential = {"forward": (inputs, out.numel() * out.element_size() + lse.numel() * lse.element_size()),
                 "backward": (inputs + 2 * out.numel() * out.element_size() + lse.numel() * lse.element_size(),
                              inputs)}
    for pass_, extra in (("forward", forward_extra), ("backward", backward_extra)):
        held, produced = essential[pass_]
        ratio = (held + extra) / (held + produced)
        rec.add("goals", f"{pass_} peak memory over inputs + outputs", "peak_memory_ratio", ratio, "ratio",
                status=goal_verdict(ratio, GOAL_PEAK_MEMORY_RATIO, at_least=False, measured_on_gpu=on_gpu),
                variant="cca_triton", method=f"(inputs {held} + {memory_method} above them {extra}) / (inputs + "
                                             f"outputs {produced})", **common)


# ---------------------------------------------------------------------------------------------------------
# 4. claims
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
# 5. calibration, 6. train
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


GPU_EXPORT_AGREEMENT, GPU_EXPORT_ATOL = 0.999, 1e-2


def _export_model(plan: Plan):
    """(model, metadata, size_multiple, input (H, W)) of the export step."""
    from repro.engine.export import build_metadata, metadata_for_config

    if plan.tiny:
        from models.synthetic import SyntheticSegmenter
        from repro.engine.config import EvalConfig
        from repro.engine.data.palettes import Palette

        torch.manual_seed(0)
        model = SyntheticSegmenter(variant="R2", num_classes=5).eval()
        palette = Palette("synthetic", tuple(f"class {i}" for i in range(5)), np.zeros((5, 3), dtype=np.uint8))
        metadata = build_metadata(config="synthetic", dataset="synthetic", palette=palette, mean=(0.0,) * 3,
                                  std=(255.0,) * 3, channel_order="rgb", eval_cfg=EvalConfig.native_whole(),
                                  checkpoint=None)
        return model, metadata, 2, (32, 46)
    cfg = _config("mmseg_cityscapes_r101_d8_512x1024_40k", plan,
                  {"model.backend": "naive", "model.pretrained_backbone": None})
    from repro.engine.train import build_model

    torch.manual_seed(0)
    model = build_model(cfg, device=torch.device("cpu")).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(0.5)
    return model, metadata_for_config(cfg, checkpoint=None), 1, (512, 1024)


def export_rows(plan: Plan, rec: Recorder) -> None:
    from repro.engine.engines import package_installed
    from repro.engine.export import compare, export_onnx

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not package_installed(name)]
    if missing:
        rec.add("export", "onnx export", "verified", "", "", status=f"not run: {', '.join(missing)} not installed "
                "(pip install -e \".[deploy]\")", device=device_label("cpu"))
        return
    import onnxruntime as ort

    model, metadata, multiple, hw = _export_model(plan)
    shape = _shape_text((1, 3, *hw))
    with tempfile.TemporaryDirectory(prefix="repro_gpu_export_") as folder:
        path = Path(folder) / "model.onnx"
        report = export_onnx(model, path, metadata=metadata, size_multiple=multiple)
        for check in report.checks:
            common = dict(variant=check.engine, dtype="fp32", shape=_shape_text((1, 3, check.height, check.width)),
                          method="repro.engine.export verification (CPU engine vs torch on the CPU)",
                          device=device_label("cpu"), status="ok" if check.passed else "FAILED: beyond tolerance")
            rec.add("export", f"{check.engine} fp32 vs torch", "max_abs_logit_diff", check.max_abs_logit_diff,
                    "logit", **common)
            rec.add("export", f"{check.engine} fp32 vs torch", "argmax_agreement", check.argmax_agreement,
                    "fraction", **common)
        providers = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                     if p in ort.get_available_providers()]
        if not providers or plan.device.type != "cuda":
            why = "no CUDA device" if plan.device.type != "cuda" else "onnxruntime-gpu / TensorRT not installed"
            rec.add("export", "onnxruntime GPU provider vs torch on the GPU", "argmax_agreement", "", "fraction",
                    status=f"not run: {why}", shape=shape)
            return
        x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model.to(plan.device)(x.to(plan.device)).float().cpu()
        for provider in providers:
            session = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
            session.run(None, {"images": x.numpy()})  # warm-up (TensorRT builds its engine here)
            started = time.perf_counter()
            output = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
            seconds = time.perf_counter() - started
            diff, agreement = compare(reference, output)
            passed = agreement >= GPU_EXPORT_AGREEMENT and diff <= GPU_EXPORT_ATOL
            common = dict(variant=f"onnxruntime {provider}", dtype="fp32", shape=shape,
                          method="the exported file on the GPU provider vs the torch model on the GPU",
                          status="ok" if passed else "FAILED: beyond tolerance")
            rec.add("export", f"{provider} vs torch", "max_abs_logit_diff", diff, "logit", **common)
            rec.add("export", f"{provider} vs torch", "argmax_agreement", agreement, "fraction", **common)
            rec.add("export", f"{provider} latency", "seconds", seconds, "s", **common)
        model.to("cpu")


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
        steps: Sequence[str] = STEPS, profiler_log: bool = False) -> dict[str, str]:
    """Run `steps` in order; returns {step: "ok" | "FAILED: ..."} (a failed step does not stop the others).
    The profiler's own stderr lines are dropped unless `profiler_log` (`quiet_profiler`)."""
    results.mkdir(parents=True, exist_ok=True)
    rec = Recorder(results / CSV_NAME, plan.device)
    outcome: dict[str, str] = {}
    actions = {
        "kernels": lambda: kernel_rows(plan, rec),
        "bench": lambda: bench_rows(plan, rec, results, evidence),
        "goals": lambda: goal_rows(plan, rec),
        "claims": lambda: claims_rows(plan, rec),
        "calibration": lambda: calibration_rows(plan, rec),
        "train": lambda: train_rows(plan, rec),
        "export": lambda: export_rows(plan, rec),
        "report": lambda: write_report(results, experiments),
    }
    for step in steps:
        started = time.perf_counter()
        print(f"[repro.gpu] {step} ...", file=sys.stderr, flush=True)
        with quiet_profiler(enabled=not profiler_log):
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
                        help="the same code on the CPU at tiny sizes (Triton interpreter): 2-2.5 minutes on the "
                             "shared 2-core machine (30-35 s of CPU time)")
    parser.add_argument("--profiler-log", action="store_true",
                        help="keep the PyTorch profiler's own stderr lines (dropped by default: dozens per step)")
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
    outcome = run(Plan.for_mode(args.tiny), results, evidence=evidence, steps=args.steps,
                  profiler_log=args.profiler_log)
    for step, status in outcome.items():
        print(f"{step:12s} {status}")
    print(f"rows in {results / CSV_NAME}; report {results / 'REPORT.md'}")
    return 0 if all(status == "ok" for status in outcome.values()) else 1
