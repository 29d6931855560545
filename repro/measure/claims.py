"""The paper's efficiency claims (85% fewer FLOPs, 11x less memory than non-local), measured on the context
modules over a resolution sweep; `python -m repro.claims [--out DIR]` runs it (see `repro/claims.py`).

Writes DIR/claims.csv (long format, one measurement per row, the method that produced it named in every
row); the paper's figures come from `experiments/claims/paper_efficiency.yaml` (`load_paper_claims`).

FLOPs of one forward, three independent ways: fvcore on the real module (with attention handles, nothing
skipped silently), FlopCounterMode under FakeTensorMode, and the analytic `ops.cost` model. Sizes too large
to run are counted by the last two only.

Memory of one training step (forward + backward with a given output gradient) of the context module beyond
its input: peak bytes allocated above what existed before the step (the input map, the output gradient, the
weights). It therefore includes the gradient of the input and of the weights. Measured at the allocator
(CPU: profiler events, CUDA: max_memory_allocated) where the size fits, estimated under FakeTensorMode with
MemTracker at every size.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from ops.criss_cross import triton_installed
from repro.engine.config import load_dataclass
from repro.io import atomic_write_text
from repro.measure.flops import flop_counter_flops, fvcore_macs
from repro.measure.memory import fake_peak_bytes, peak_bytes
from repro.measure.steps import (
    METHOD_ANALYTIC,
    METHOD_COUNTER,
    METHOD_FAKE_MEMORY,
    METHOD_FVCORE,
    StepState,
    inference_step,
    training_step,
)
from repro.measure.variants import ContextVariant
from repro.vocabulary import DEVICE_COUNTED, DEVICE_TRACED, device_label

COLUMNS = (
    "claim", "variant", "recurrence", "batch", "channels", "qk_channels", "height", "width", "metric",
    "value", "unit", "reported_value", "source", "method", "device",
)
BATCH, CHANNELS, QK_CHANNELS = 1, 512, 64
SIZES = (33, 49, 65, 97, 129, 161, 193)
# Real runs up to this side: the 97x97 non-local naive step already allocates ~1 GiB.
MAX_RUN_SIZE = 97
MIB = 2**20

FLOP_VARIANTS = (
    ContextVariant("cca_naive", 1), ContextVariant("cca_naive", 2), ContextVariant("cca_naive", 3),
    ContextVariant("non_local_naive"), ContextVariant("non_local_sdpa"), ContextVariant("non_local_sdpa_heads"),
)
MEMORY_VARIANTS = (
    ContextVariant("cca_naive", 1), ContextVariant("cca_naive", 2), ContextVariant("cca_naive", 3),
    ContextVariant("cca_triton", 2), ContextVariant("non_local_naive"), ContextVariant("non_local_sdpa"),
    ContextVariant("non_local_sdpa_heads"),
)
CCA_R2 = ContextVariant("cca_naive", 2).label
PAPER_CLAIMS = Path(__file__).resolve().parents[2] / "experiments" / "claims" / "paper_efficiency.yaml"


@dataclass(frozen=True)
class PaperFigure:
    """One figure the paper gives at its feature map: (claim, variant, recurrence, metric) -> value."""

    claim: Literal["flops", "memory"]
    variant: str
    recurrence: int
    metric: str
    value: float


@dataclass(frozen=True)
class PaperClaims:
    """The paper's efficiency figures and where they are printed (experiments/claims/paper_efficiency.yaml)."""

    source: str
    url: str
    batch: int
    channels: int
    qk_channels: int
    height: int
    width: int
    figures: tuple[PaperFigure, ...]

    def reported(self, claim: str, variant: str, recurrence: int, metric: str) -> float | None:
        return next((f.value for f in self.figures
                     if (f.claim, f.variant, f.recurrence, f.metric) == (claim, variant, recurrence, metric)), None)

    @property
    def citation(self) -> str:
        return f"{self.source} ({self.url})"


@cache
def load_paper_claims(path: Path = PAPER_CLAIMS) -> PaperClaims:
    """The validated paper figures (ConfigError naming the file and key on a bad file)."""
    return load_dataclass(path, PaperClaims, what="paper claims file")


def _row(claim: str, variant: str, recurrence: int, size: int, metric: str, value: float, unit: str,
         method: str, device: str) -> dict:
    paper = load_paper_claims()
    reported = paper.reported(claim, variant, recurrence, metric) if size == paper.height == paper.width else None
    return {
        "claim": claim, "variant": variant, "recurrence": recurrence, "batch": BATCH, "channels": CHANNELS,
        "qk_channels": QK_CHANNELS, "height": size, "width": size, "metric": metric, "value": value,
        "unit": unit, "reported_value": "" if reported is None else reported,
        "source": paper.citation if reported is not None else "measured", "method": method, "device": device,
    }


def fvcore_module_macs(variant: ContextVariant, *, size: int, channels: int = CHANNELS,
                       qk_channels: int = QK_CHANNELS, batch: int = BATCH) -> int:
    """fvcore MACs of one forward of `variant` on a random (batch, channels, size, size) map."""
    torch.manual_seed(0)
    module = variant.build(channels=channels, qk_channels=qk_channels)
    with torch.no_grad():
        return fvcore_macs(module, (torch.randn(batch, channels, size, size),)).macs


def counter_module_flops(variant: ContextVariant, *, size: int, channels: int = CHANNELS,
                         qk_channels: int = QK_CHANNELS, batch: int = BATCH) -> int:
    """FlopCounterMode FLOPs (2 x MACs) of one forward of `variant`, traced under FakeTensorMode."""
    return flop_counter_flops(
        lambda: variant.build(channels=channels, qk_channels=qk_channels), [(batch, channels, size, size)]
    )


def step_state(variant: ContextVariant, *, size: int, channels: int, qk_channels: int, batch: int,
               device: torch.device) -> StepState:
    """The context module, its input map and the output gradient the next layer would send."""
    torch.manual_seed(0)
    module = variant.build(channels=channels, qk_channels=qk_channels)
    if device.type != "cpu":
        # Not on CPU: moving parameters in place fails under FakeTensorMode, and they are built there.
        module = module.to(device)
    features = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    grad_out = torch.randn(batch, channels, size, size, device=device)
    return StepState(module, (features,), grad_output=grad_out)


# The paper does not say whether it measured training or inference: both are measured.
STEPS = {"train_step_peak_extra": training_step, "forward_peak_extra": inference_step}


def measured_step_bytes(variant: ContextVariant, *, size: int, device: torch.device,
                        metric: str = "train_step_peak_extra", channels: int = CHANNELS,
                        qk_channels: int = QK_CHANNELS, batch: int = BATCH) -> tuple[int, str]:
    """Allocator peak of one step (`metric` in STEPS) above its state, and the method name."""
    step = STEPS[metric]
    state = step_state(variant, size=size, channels=channels, qk_channels=qk_channels, batch=batch, device=device)
    peak, method = peak_bytes(lambda: step(state), device)
    return peak, (f"{method} ({torch.get_num_threads()} threads)" if device.type == "cpu" else method)


def estimated_step_bytes(variant: ContextVariant, *, size: int, metric: str = "train_step_peak_extra",
                         channels: int = CHANNELS, qk_channels: int = QK_CHANNELS, batch: int = BATCH) -> int:
    """FakeTensorMode + MemTracker estimate of one step's (`metric` in STEPS) peak above its state."""
    return fake_peak_bytes(
        lambda: step_state(variant, size=size, channels=channels, qk_channels=qk_channels, batch=batch,
                           device=torch.device("cpu")),
        STEPS[metric],
    )


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton criss-cross backend is not measured on `device`, or None when it is.

    On CUDA the backend must run: a kernel that fails there is a bug, so the error propagates (the command
    fails, showing it) instead of becoming a "not run" row."""
    if device.type != "cuda":
        return ("not run: the Triton backend runs natively only on CUDA; on CPU only in the Triton "
                "interpreter, a correctness tool far too slow for this sweep")
    if not triton_installed():
        return "not run: the triton package is not installed"
    try:
        x = torch.randn(1, 8, 3, 3, device=device)
        ContextVariant("cca_triton", 1).build(channels=8, qk_channels=8).to(device)(x)
    except Exception as error:
        raise RuntimeError(f"the Triton criss-cross backend failed on a 1x8x3x3 probe on {device_label(device)}: "
                           f"{type(error).__name__}: {error}") from error
    return None


def flop_rows(sizes: Sequence[int], *, fvcore_max_size: int) -> list[dict]:
    """FLOP rows (analytic, FlopCounterMode at every size; fvcore where the size runs) plus the reduction of
    R=2 criss-cross against non-local naive."""
    rows: list[dict] = []
    for size in sizes:
        counts: dict[tuple[str, str], int] = {}
        for variant in FLOP_VARIANTS:
            macs = variant.analytic_macs(batch=BATCH, channels=CHANNELS, qk_channels=QK_CHANNELS,
                                         height=size, width=size)
            measured = [(METHOD_ANALYTIC, 2 * macs),
                        (METHOD_COUNTER, counter_module_flops(variant, size=size))]
            if size <= fvcore_max_size:
                measured.append((METHOD_FVCORE, 2 * fvcore_module_macs(variant, size=size)))
            for method, flops in measured:
                counts[(variant.label, method)] = flops
                for metric, value, unit in (("macs", flops / 2e9, "GMAC"), ("flops", flops / 1e9, "GFLOP")):
                    rows.append(_row("flops", variant.name, variant.recurrence, size, metric, value, unit,
                                     method, DEVICE_COUNTED))
        for method in (METHOD_ANALYTIC, METHOD_COUNTER, METHOD_FVCORE):
            cc, nl = counts.get((CCA_R2, method)), counts.get(("non_local_naive", method))
            if cc is not None and nl is not None:
                rows.append(_row("flops", "cca_naive_r2_vs_non_local_naive", 2, size,
                                 "flop_reduction", 1 - cc / nl, "fraction", method, DEVICE_COUNTED))
    return rows


def memory_rows(sizes: Sequence[int], *, device: torch.device, run_max_size: int,
                variants: Sequence[ContextVariant] = MEMORY_VARIANTS) -> list[dict]:
    """Memory rows for both steps in STEPS: the fake-mode estimate at every size, the allocator measurement
    up to `run_max_size`, a not-run row for the Triton backend where it cannot run (never on CUDA: there a
    kernel failure raises), and the non-local / R=2 ratios."""
    rows: list[dict] = []
    triton_reason = triton_unavailable_reason(device) if any(v.name == "cca_triton" for v in variants) else None
    for size in sizes:
        for metric in STEPS:
            rows += _memory_rows_at(size, metric, device=device, run=size <= run_max_size,
                                    triton_reason=triton_reason, variants=variants)
    return rows


def _memory_rows_at(size: int, metric: str, *, device: torch.device, run: bool,
                    triton_reason: str | None, variants: Sequence[ContextVariant]) -> list[dict]:
    rows: list[dict] = []
    peaks: dict[tuple[str, str], int] = {}
    for variant in variants:
        is_triton = variant.name == "cca_triton"
        if not is_triton or triton_installed():
            # The Triton custom op has a fake implementation: its outputs are traced without running it.
            peaks[(variant.label, METHOD_FAKE_MEMORY)] = estimated_step_bytes(variant, size=size, metric=metric)
        else:
            rows.append(_row("memory", variant.name, variant.recurrence, size, metric, math.nan, "MiB",
                             "not estimated: triton is not installed", DEVICE_TRACED))
        if run and is_triton and triton_reason is not None:
            rows.append(_row("memory", variant.name, variant.recurrence, size, metric, math.nan, "MiB",
                             triton_reason, device_label(device)))
        elif run:
            peak, method = measured_step_bytes(variant, size=size, device=device, metric=metric)
            peaks[(variant.label, method)] = peak
    for (label, method), peak in peaks.items():
        variant = next(v for v in variants if v.label == label)
        where = DEVICE_TRACED if method == METHOD_FAKE_MEMORY else device_label(device)
        rows.append(_row("memory", variant.name, variant.recurrence, size, metric, peak / MIB, "MiB", method,
                         where))
    ratio_metric = "memory_ratio" if metric == "train_step_peak_extra" else "forward_memory_ratio"
    for method in sorted({method for _, method in peaks}):
        where = DEVICE_TRACED if method == METHOD_FAKE_MEMORY else device_label(device)
        for base_variant in ("cca_naive", "cca_triton"):
            base = peaks.get((ContextVariant(base_variant, 2).label, method))
            for other in ("non_local_naive", "non_local_sdpa", "non_local_sdpa_heads"):
                if base and (other, method) in peaks:
                    rows.append(_row("memory", f"{other}_over_{base_variant}_r2", 2, size, ratio_metric,
                                     peaks[(other, method)] / base, "ratio", method, where))
    return rows


def write_csv(rows: Iterable[dict], path: Path) -> None:
    """Write rows with COLUMNS to `path` atomically (temp file in the same folder, then os.replace)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="device of the real memory measurements (auto: cuda when available)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="feature-map sides of the sweep (default 33 .. 193)")
    parser.add_argument("--run-max-size", type=int, default=MAX_RUN_SIZE,
                        help="largest side run for real (fvcore trace, allocator memory); larger sizes are "
                             f"counted / estimated under FakeTensorMode only (default {MAX_RUN_SIZE})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the real runs (default 1)")
    args = parser.parse_args(argv)
    if any(size < 2 for size in args.sizes):
        parser.error(f"--sizes must all be >= 2, got {args.sizes}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but no CUDA device is available")
    return args


def measure(args: argparse.Namespace) -> tuple[Path, int]:
    """Run the sweep `parse_args` describes; returns the CSV path and the number of rows written."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = sorted(set(args.sizes))
    rows = flop_rows(sizes, fvcore_max_size=args.run_max_size)
    rows += memory_rows(sizes, device=device, run_max_size=args.run_max_size)
    csv_path = args.out / "claims.csv"
    write_csv(rows, csv_path)
    return csv_path, len(rows)
