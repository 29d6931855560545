"""Inference engines behind one interface: a torch module, or an ONNX file run by ONNX Runtime or OpenVINO,
each wrapped as an `nn.Module` with the model's interface ((B, 3, H, W) float images -> (B, classes, H, W)
logits, `.eval()`, `.train()`), so `models.inference.predict_whole / predict_slide / predict_multiscale` and
`repro.engine.evaluate` run every engine unchanged.

    make_engine("onnxruntime", onnx_path="model.onnx")          # fp32
    make_engine("openvino", onnx_path="model.onnx", precision="bf16")
    make_engine("torch", model=model, precision="bf16")          # CPU autocast

Precision: "fp32" everywhere; "bf16" through torch's CPU autocast or OpenVINO's INFERENCE_PRECISION_HINT,
only on a CPU with native bf16 arithmetic (x86 flags `avx512_bf16` or `amx_bf16`): elsewhere bf16 is
emulated, slower than fp32, and refused with an error saying so. ONNX Runtime's CPU provider has no bf16
execution, so `onnxruntime` + `bf16` is refused too. OpenVINO's own default ("default": what the plugin
picks, bf16 on a CPU with AMX / AVX-512 BF16, f32 elsewhere) is offered for the benchmark.

The engine packages are the `deploy` extra (`pip install -e ".[deploy]"`); nothing here imports them
until an engine is made, and a missing one is an EngineError naming the package and the extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
# The packages each engine needs (module name -> pip name).
ENGINE_PACKAGES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                   "export": ("onnx", "onnxscript")}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# Speed evidence: a few columns of results/inference_bench.csv (written by `repro.measure.engine_bench`),
# committed beside this module so that an installed package carries it; `make_engine` warns from it.
SPEED_EVIDENCE = Path(__file__).with_name("engine_speed.csv")
SPEED_COLUMNS = ("cpu", "backbone", "input_hw", "threads", "variant", "engine", "precision",
                 "speedup_vs_torch_eager", "date")
SPEED_KEY = ("cpu", "backbone", "input_hw", "threads", "variant")


class EngineError(ValueError):
    """An engine or precision that cannot be used here (not installed, bf16 not native, bad combination)."""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX-BF16); the probe tests replace."""
    return bool(cpu_flags() & set(BF16_FLAGS))


def package_installed(name: str) -> bool:
    """Whether the module `name` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


def require_packages(what: str) -> None:
    """EngineError naming the missing packages of `what` (an engine, or "export") and the extra to install."""
    missing = [name for name in ENGINE_PACKAGES.get(what, ()) if not package_installed(name)]
    if missing:
        raise EngineError(
            f"{what} needs the package(s) {', '.join(missing)}, which are not installed: "
            "pip install -e \".[deploy]\" (onnx, onnxscript, onnxruntime, openvino)"
        )


def check_choice(engine: str, precision: str) -> None:
    """EngineError for an unknown engine / precision, an engine not installed, or bf16 where it is not native
    or the engine has no bf16 path."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if precision not in PRECISIONS + ("default",):
        raise EngineError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "default" and engine != "openvino":
        raise EngineError(f"precision 'default' is OpenVINO's own choice; engine {engine!r} takes {PRECISIONS}")
    require_packages(engine)
    if precision == "bf16":
        if engine == "onnxruntime":
            raise EngineError("onnxruntime has no bf16 execution on the CPU; use --engine openvino or torch "
                              "with --precision bf16, or --precision fp32")
        if not cpu_has_native_bf16():
            raise EngineError(
                f"--precision bf16 needs a CPU with native bf16 ({' or '.join(BF16_FLAGS)} in /proc/cpuinfo); "
                "this CPU has neither, where bf16 is emulated and slower than fp32: use --precision fp32"
            )


class EngineModel(nn.Module):
    """An engine session as a module: forward((B, 3, H, W) float tensor) -> (B, classes, H, W) float32 logits
    (on the input's device). `engine` and `precision` name what runs."""

    def __init__(self, run, *, engine: str, precision: str, source: str) -> None:
        super().__init__()
        self._run = run
        self.engine = engine
        self.precision = precision
        self.source = source

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(self._run(array), dtype=np.float32)).to(images.device)

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}, precision={self.precision!r}, source={self.source!r}"


class TorchAutocast(nn.Module):
    """A torch model run under CPU autocast in bf16; logits returned in float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.engine = "torch"
        self.precision = "bf16"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
            return self.model(images).float()


def onnxruntime_session(onnx_path: str | os.PathLike, *, threads: int | None = None):
    """An ONNX Runtime CPU session of the file (all optimisations, `threads` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def openvino_compiled(onnx_path: str | os.PathLike, *, precision: str, threads: int | None = None):
    """An OpenVINO CPU compiled model of the file; precision "fp32" / "bf16" set as INFERENCE_PRECISION_HINT,
    "default" left to the plugin."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
    core = ov.Core()
    return core.compile_model(core.read_model(str(onnx_path)), "CPU", config)


def openvino_precision(compiled) -> str:
    """The inference precision OpenVINO chose, in the project's names ("fp32", "bf16", "fp16")."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = value.to_string() if hasattr(value, "to_string") else str(value)
    return {"f32": "fp32", "f16": "fp16"}.get(name, name)


def make_engine(
    engine: str,
    *,
    precision: str = "fp32",
    model: nn.Module | None = None,
    onnx_path: str | os.PathLike | None = None,
    threads: int | None = None,
) -> nn.Module:
    """The model of `engine` at `precision`, with the interface of the torch model (see the module
    docstring). torch needs `model`; onnxruntime / openvino need `onnx_path` (export it first with
    `repro.engine.export.export_onnx`)."""
    check_choice(engine, precision)
    if engine != "torch":
        warning = slower_than_torch(engine, precision)
        if warning:
            warnings.warn(warning, stacklevel=2)
    if engine == "torch":
        if model is None:
            raise EngineError("engine 'torch' needs a config and a checkpoint; an .onnx file alone runs with "
                              "--engine onnxruntime or openvino")
        # The plain torch model runs as it is (fp32); `describe` names it "torch fp32".
        return TorchAutocast(model) if precision == "bf16" else model
    if onnx_path is None:
        raise EngineError(f"engine {engine!r} runs an exported .onnx file; none was given")
    onnx_path = Path(onnx_path)
    if engine == "onnxruntime":
        session = onnxruntime_session(onnx_path, threads=threads)
        name = session.get_inputs()[0].name

        def run(array: np.ndarray) -> np.ndarray:
            return session.run(None, {name: array})[0]

        return EngineModel(run, engine=engine, precision=precision, source=str(onnx_path)).eval()
    compiled = openvino_compiled(onnx_path, precision=precision, threads=threads)
    request = compiled.create_infer_request()

    def run_ov(array: np.ndarray) -> np.ndarray:
        # OpenVINO's own output buffer, copied once: the next call overwrites it, so what is returned must own
        # its memory (`test_engine_outputs_survive_the_next_call`). By default `infer` copies the input and the
        # output itself, and the `.copy()` this replaced was a second fresh full-size logits array per call:
        # at 1024x2048 their page faults cost 3 s of kernel time per image on this project's 2-core VM.
        return np.array(request.infer({0: array}, share_inputs=True, share_outputs=True)[0], copy=True)

    chosen = {"fp32": "fp32", "bf16": "bf16"}.get(precision) or f"default ({openvino_precision(compiled)})"
    return EngineModel(run_ov, engine=engine, precision=chosen, source=str(onnx_path)).eval()


def describe(model: nn.Module) -> str:
    """"engine precision" of a model made by `make_engine` ("torch fp32" for a plain module)."""
    return f"{getattr(model, 'engine', 'torch')} {getattr(model, 'precision', 'fp32')}"


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` torch intra-op threads (unchanged when None)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def engine_versions() -> dict[str, str]:
    """Versions of torch and of the installed engine packages ("" when absent)."""
    from importlib import metadata

    found = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = ""
    return found


def git_commit(root: str | os.PathLike | None = None) -> str:
    """The short commit of the working tree ("+dirty" when it has changes); "" outside git."""
    import subprocess

    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def read_speed_evidence(path: Path = SPEED_EVIDENCE) -> list[dict[str, str]]:
    """The evidence rows ([] when the file is absent)."""
    import csv

    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def slower_than_torch(engine: str, precision: str, *, cpu: str | None = None,
                      path: Path = SPEED_EVIDENCE) -> str | None:
    """A warning when the evidence shows `engine` at `precision` slower than torch eager on this CPU model in
    some measured case; None when it was never slower here (or this CPU was not measured)."""
    from repro.vocabulary import cpu_model

    cpu = cpu or cpu_model()
    wanted = "default" if precision == "default" else precision
    slower = [
        row for row in read_speed_evidence(path)
        if row["cpu"] == cpu and row["engine"] == engine and wanted in row["precision"]
        and row["speedup_vs_torch_eager"] and float(row["speedup_vs_torch_eager"]) < 1.0
    ]
    if not slower:
        return None
    cases = "; ".join(f"{r['backbone']} {r['input_hw']} {r['threads']} thread(s): "
                      f"{float(r['speedup_vs_torch_eager']):.2f}x" for r in slower)
    return (f"engine {engine} ({precision}) was measured slower than torch eager on this CPU ({cpu}): {cases} "
            f"(results/inference_bench.csv, {path.name}); --engine torch may be faster here")


def update_speed_evidence(rows: list[dict], path: Path = SPEED_EVIDENCE) -> Path:
    """Merge the benchmark `rows` (engine variants only) into the evidence file by SPEED_KEY."""
    import pandas as pd

    from repro.io import upsert_csv

    picked = [{column: row[column] for column in SPEED_COLUMNS} for row in rows if row["engine"] != "torch"]
    if picked:
        upsert_csv(path, pd.DataFrame(picked, columns=list(SPEED_COLUMNS)), list(SPEED_KEY))
    return path
