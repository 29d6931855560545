"""Operator benchmarks: `python -m repro.bench [--quick] [--cca-speedup] [--out results/ops_bench.csv]`.

Times criss-cross attention (naive, the mmcv einsum form, Triton) and the non-local baseline (naive, SDPA)
forward, backward and forward+backward, side by side in one run with the variants interleaved, and writes
long-format rows to results/ops_bench.csv (earlier rows with other keys, e.g. from another device, are kept).

CPU: wall time of single calls at a fixed thread count (recorded; default 1, because OpenMP
oversubscription on small machines makes timings swing wildly), median over rounds. CUDA: `triton.testing.do_bench`.
Peak memory is the allocator peak above the inputs (repro.measure.memory), GB/s and TFLOP/s come from the analytic
cost model in `ops.cost` (minimum bytes a fused kernel moves; 2 x MACs), so they are comparable across
implementations. The backward is driven by a random gradient (a `.sum()` would pass a stride-0 one).

Every row names the host CPU (`cpu`: model and vector extensions) and the thread count. Criss-cross rows carry
`speedup_vs_einsum`: the median over rounds of the einsum variant's time divided by this variant's, both from
the same round (paired, so a burst of load from other processes hits both); `einsum_speedups` tabulates it from
a CSV. `--cca-speedup` is the one-command check of the naive backend against the mmcv-style einsum on the
machine at hand (B=2, C=512, Cqk=64, 97x97, fp32; forward, backward and forward+backward at 1 thread, then at 2
threads; 7 rounds): `nox -s bench -- --cca-speedup`. PyTorch's CPU allocator backs large blocks with huge pages
when `THP_MEM_ALLOC_ENABLE=1` is set before Python starts, which speeds up every variant; the benchmark does not
set it (a process-wide choice left to the user).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.progress import Progress

from ops import cost
from ops.cca_naive import criss_cross_attention_einsum
from ops.criss_cross import EVIDENCE_COLUMNS, criss_cross_attention, triton_available
from ops.non_local import non_local_attention
from repro.io import atomic_write_text, upsert_csv, write_csv_atomic
from repro.measure.environment import cpu_label, versions
from repro.measure.memory import peak_bytes
from repro.measure.quiet import quiet_profiler
from repro.vocabulary import device_label, op_variant

PASSES = ("fwd", "bwd", "fwd+bwd")
KEY = ["variant", "dtype", "batch", "channels", "qk_channels", "height", "width", "pass", "device", "cpu", "threads"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class OpVariant:
    """One implementation of an op, timed on (query, key, value); `name` is its `repro.vocabulary` variant."""

    op: str
    backend: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def name(self) -> str:
        return op_variant(self.op, self.backend)

    def unavailable(self, device: torch.device) -> str | None:
        """Why this variant cannot be timed on `device`, or None."""
        if self.backend == "triton":
            if device.type != "cuda":
                return "not measured: Triton kernels are timed on CUDA only (the CPU interpreter is a correctness tool)"
            if not triton_available(device):
                return "not measured: triton is not installed"
        return None

    def cost(self, batch: int, qk_channels: int, channels: int, height: int, width: int, itemsize: int, pass_: str):
        fwd_fn = cost.criss_cross_attention_cost if self.op == "cca" else cost.non_local_attention_cost
        forward = fwd_fn(batch, qk_channels, channels, height, width, itemsize=itemsize)
        if self.op == "cca":
            backward = cost.criss_cross_attention_backward_cost(batch, qk_channels, channels, height, width,
                                                                itemsize=itemsize)
        else:
            backward = forward * 2
        return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[pass_]


VARIANTS = {
    variant.name: variant
    for variant in (
        OpVariant("cca", "naive", lambda q, k, v: criss_cross_attention(q, k, v, backend="naive")),
        OpVariant("cca", "einsum", criss_cross_attention_einsum),
        OpVariant("cca", "triton", lambda q, k, v: criss_cross_attention(q, k, v, backend="triton")),
        OpVariant("non_local", "naive", lambda q, k, v: non_local_attention(q, k, v, impl="naive")),
        OpVariant("non_local", "sdpa", lambda q, k, v: non_local_attention(q, k, v, impl="sdpa")),
    )
}


@dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    qk_channels: int
    height: int
    width: int


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def make(channels: int) -> torch.Tensor:
        x = torch.randn(shape.batch, channels, shape.height, shape.width, generator=generator)
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    query, key, value = make(shape.qk_channels), make(shape.qk_channels), make(shape.channels)
    grad_out = torch.randn(shape.batch, shape.channels, shape.height, shape.width, generator=generator)
    return (query, key, value), grad_out.to(device=device, dtype=dtype)


def _pass_fn(variant: OpVariant, pass_: str, inputs, grad_out) -> tuple[Callable[[], object], Callable[[], object]]:
    """(setup, timed) closures for one pass; setup runs untimed before each timed call."""
    state: dict[str, torch.Tensor] = {}
    if pass_ == "fwd":
        return (lambda: None), (lambda: variant.fn(*inputs))
    if pass_ == "bwd":
        def setup():
            state["out"] = variant.fn(*inputs)

        def timed():
            grads = torch.autograd.grad(state.pop("out"), inputs, grad_out)
            return grads
        return setup, timed
    return (lambda: None), (lambda: torch.autograd.grad(variant.fn(*inputs), inputs, grad_out))


def _time_cpu(setup, timed) -> float:
    # One call per measurement, rounds interleaved across variants. (torch.utils.benchmark.Timer.timeit runs
    # two hidden warm-up calls per measurement, which triples the cost of second-long non-local steps.)
    setup()
    start = time.perf_counter()
    timed()
    return time.perf_counter() - start


def _time_cuda(setup, timed) -> float:
    import triton.testing

    def call():
        setup()
        timed()
    # do_bench reports ms; for bwd the setup's forward is included, so it is subtracted by the caller.
    return triton.testing.do_bench(call, warmup=10, rep=50) / 1e3


def run(
    shapes: list[Shape],
    variant_names: list[str],
    dtypes: list[str],
    device: torch.device,
    *,
    rounds: int,
    threads: int,
    console: Console,
) -> pd.DataFrame:
    """Measure every (shape, dtype, variant, pass); variants interleaved round by round. The CPU thread count is
    `threads` for the run and restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(shapes, variant_names, dtypes, device, rounds=rounds, threads=threads, console=console)
    finally:
        torch.set_num_threads(previous)


def _measure(shapes: list[Shape], variant_names: list[str], dtypes: list[str], device: torch.device, *,
             rounds: int, threads: int, console: Console) -> pd.DataFrame:
    rows = []
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    label = device_label(device)
    library_versions = versions()
    with Progress(console=console, transient=True) as progress:
        total = len(shapes) * len(dtypes) * len(variant_names) * len(PASSES) * (rounds + 1)
        task = progress.add_task("ops benchmark", total=total)
        for shape in shapes:
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                inputs, grad_out = _inputs(shape, dtype, device)
                runnable = []
                for name in variant_names:
                    reason = VARIANTS[name].unavailable(device)
                    if reason is None and device.type == "cpu" and dtype != torch.float32 and name == "cca_triton":
                        reason = "not measured: CPU"
                    if reason is not None:
                        rows += [_row(VARIANTS[name], shape, dtype_name, p, device, label, library_versions, now,
                                      threads, status=reason) for p in PASSES]
                        progress.advance(task, len(PASSES) * (rounds + 1))
                    else:
                        runnable.append(VARIANTS[name])
                times = {(v.name, p): [] for v in runnable for p in PASSES}
                peaks = {}
                for variant in runnable:  # warm-up and memory, one call each
                    for pass_ in PASSES:
                        setup, timed = _pass_fn(variant, pass_, inputs, grad_out)
                        setup()
                        peaks[(variant.name, pass_)] = peak_bytes(timed, device)[0]
                        progress.advance(task)
                for _ in range(rounds):
                    for variant in runnable:
                        for pass_ in PASSES:
                            setup, timed = _pass_fn(variant, pass_, inputs, grad_out)
                            if device.type == "cuda":
                                seconds = _time_cuda(setup, timed)
                                if pass_ == "bwd":
                                    seconds -= _time_cuda(lambda: None, lambda v=variant, x=inputs: v.fn(*x))
                            else:
                                seconds = _time_cpu(setup, timed)
                            times[(variant.name, pass_)].append(seconds)
                            progress.advance(task)
                for variant in runnable:
                    for pass_ in PASSES:
                        seconds = statistics.median(times[(variant.name, pass_)])
                        rows.append(_row(variant, shape, dtype_name, pass_, device, label, library_versions, now,
                                         threads, seconds=seconds, peak=peaks[(variant.name, pass_)],
                                         rounds=rounds,
                                         speedup=paired_speedup(times.get(("cca_einsum", pass_)),
                                                                times[(variant.name, pass_)])
                                         if variant.op == "cca" else None))
    return pd.DataFrame(rows)


def paired_speedup(reference: list[float] | None, times: list[float]) -> float | None:
    """Median over rounds of reference[r] / times[r] (None without reference times)."""
    if not reference or len(reference) != len(times):
        return None
    return statistics.median(ref / t for ref, t in zip(reference, times))


def model_columns(variant: OpVariant, shape: Shape, dtype_name: str, pass_: str, seconds: float | None) -> dict:
    """The columns derived from `ops.cost` (the fused minimum of the pass): model GFLOP and MB, and with a time
    the rates they imply (empty without one)."""
    model = variant.cost(shape.batch, shape.qk_channels, shape.channels, shape.height, shape.width,
                         DTYPES[dtype_name].itemsize, pass_)
    timed = seconds is not None
    return {"model_gflop": round(model.flops / 1e9, 4), "model_mb_moved": round(model.bytes / 2**20, 3),
            "gb_per_s": round(model.bytes / seconds / 1e9, 3) if timed else "",
            "tflop_per_s": round(model.flops / seconds / 1e12, 5) if timed else ""}


def rederive(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (ops_bench.csv rows) with `model_columns` recomputed from each row's variant, shape, dtype, pass
    and milliseconds: for a committed CSV after `ops.cost` changes (timings and memory untouched)."""
    frame = frame.copy()
    for index, row in frame.iterrows():
        shape = Shape(*(int(row[name]) for name in ("batch", "channels", "qk_channels", "height", "width")))
        milliseconds = pd.to_numeric(row["milliseconds"], errors="coerce")
        seconds = None if pd.isna(milliseconds) else float(milliseconds) / 1e3
        for column, value in model_columns(VARIANTS[row["variant"]], shape, row["dtype"], row["pass"],
                                           seconds).items():
            frame.at[index, column] = str(value)  # the CSV is read as text: timings keep their digits
    return frame


def _row(variant, shape, dtype_name, pass_, device, label, library_versions, date, threads, *, status="ok",
         seconds=None, peak=None, rounds=0, speedup=None):
    row = {
        "variant": variant.name, "op": variant.op, "backend": variant.backend, "dtype": dtype_name,
        "batch": shape.batch, "channels": shape.channels, "qk_channels": shape.qk_channels,
        "height": shape.height, "width": shape.width, "pass": pass_,
        "milliseconds": "", "peak_memory_mb": "", "gb_per_s": "", "tflop_per_s": "", "model_gflop": "",
        "model_mb_moved": "",
        "device": label, "cpu": cpu_label(), "threads": threads if device.type == "cpu" else "",
        "speedup_vs_einsum": "" if speedup is None else round(speedup, 3),
        "rounds": rounds, "torch": library_versions["torch"], "triton": library_versions["triton"], "date": date,
        "status": status,
    }
    row.update(model_columns(variant, shape, dtype_name, pass_, seconds))
    if seconds is not None:
        row.update(milliseconds=round(seconds * 1e3, 3), peak_memory_mb=round(peak / 2**20, 2))
    return row


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side ratios from one run: time and peak memory of each variant relative to cca_naive."""
    ok = frame[frame["status"] == "ok"].copy()
    if ok.empty or "cca_naive" not in set(ok["variant"]):
        return pd.DataFrame()
    ok["milliseconds"] = ok["milliseconds"].astype(float)
    ok["peak_memory_mb"] = ok["peak_memory_mb"].astype(float)
    keys = ["dtype", "batch", "channels", "qk_channels", "height", "width", "pass"]
    base = ok[ok["variant"] == "cca_naive"][keys + ["milliseconds", "peak_memory_mb"]]
    merged = ok.merge(base, on=keys, suffixes=("", "_naive"))
    merged["time_vs_naive"] = (merged["milliseconds"] / merged["milliseconds_naive"]).round(3)
    merged["memory_vs_naive"] = (merged["peak_memory_mb"] / merged["peak_memory_mb_naive"]).round(3)
    return merged[["variant", *keys, "milliseconds", "peak_memory_mb", "time_vs_naive", "memory_vs_naive"]]


SPEEDUP_COLUMNS = ["device", "cpu", "threads", "dtype", "batch", "channels", "qk_channels", "height", "width",
                   "pass", "variant", "milliseconds", "einsum_milliseconds", "speedup_vs_einsum", "rounds", "date"]


def einsum_speedups(frame: pd.DataFrame, variant: str = "cca_naive") -> pd.DataFrame:
    """`variant` against the mmcv-style einsum, one row per CPU / device, thread count, shape and pass measured
    in the same run (rows with a `speedup_vs_einsum`), with both times. Older rows without the paired statistic
    are left out rather than paired across runs."""
    if frame.empty or "speedup_vs_einsum" not in frame.columns:
        return pd.DataFrame(columns=SPEEDUP_COLUMNS)
    ok = frame[(frame["status"] == "ok") & (frame["speedup_vs_einsum"].astype(str) != "")]
    keys = ["device", "cpu", "threads", "dtype", "batch", "channels", "qk_channels", "height", "width", "pass"]
    mine = ok[ok["variant"] == variant]
    einsum = ok[ok["variant"] == "cca_einsum"][keys + ["milliseconds", "date"]]
    merged = mine.merge(einsum, on=keys, suffixes=("", "_einsum"))
    merged = merged[merged["date"] == merged["date_einsum"]]  # the same run writes both
    merged = merged.rename(columns={"milliseconds_einsum": "einsum_milliseconds"})
    merged["speedup_vs_einsum"] = merged["speedup_vs_einsum"].astype(float)
    return merged[SPEEDUP_COLUMNS].reset_index(drop=True)


def _backfill_cpu_column(path: Path) -> None:
    """Rows written before the `cpu` column existed: their CPU model is the one in the device label
    (`cpu: <model>`); GPU rows never recorded the host. Rewritten once, atomically."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    if "cpu" in frame.columns:
        return
    frame.insert(frame.columns.get_loc("device") + 1, "cpu",
                 [device[len("cpu: "):] if device.startswith("cpu: ") else "" for device in frame["device"]])
    atomic_write_text(path, frame.to_csv(index=False))


def auto_backend_evidence(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows `ops.criss_cross.resolve_backend` decides "auto" by: every CUDA shape and dtype of a benchmark
    CSV where both cca_naive and cca_triton were timed (status ok), their fwd and fwd+bwd milliseconds side by
    side, with the GPU, versions and date of the Triton row. Rows from CPUs never count."""
    columns = list(EVIDENCE_COLUMNS)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    ok = frame[(frame["status"] == "ok") & frame["device"].astype(str).str.startswith("cuda: ")
               & frame["pass"].isin(["fwd", "fwd+bwd"])]
    keys = ["device", "dtype", "batch", "channels", "qk_channels", "height", "width"]
    rows = []
    for key, group in ok.groupby(keys, sort=True):
        times = {(row["variant"], row["pass"]): float(row["milliseconds"]) for _, row in group.iterrows()}
        needed = [(v, p) for v in ("cca_naive", "cca_triton") for p in ("fwd", "fwd+bwd")]
        if not all(k in times for k in needed):
            continue
        triton_row = group[group["variant"] == "cca_triton"].iloc[0]
        rows.append({**dict(zip(keys, key)),
                     "naive_fwd_ms": times[("cca_naive", "fwd")], "triton_fwd_ms": times[("cca_triton", "fwd")],
                     "naive_fwd_bwd_ms": times[("cca_naive", "fwd+bwd")],
                     "triton_fwd_bwd_ms": times[("cca_triton", "fwd+bwd")],
                     "torch": triton_row["torch"], "triton": triton_row["triton"], "date": triton_row["date"]})
    return pd.DataFrame(rows, columns=columns)


def write_auto_backend_evidence(bench_csv: Path, path: Path) -> pd.DataFrame:
    """Regenerate the backend="auto" evidence file `path` (normally `ops.criss_cross.AUTO_EVIDENCE`) from all
    rows of `bench_csv`, atomically; returns its rows."""
    frame = pd.read_csv(bench_csv, keep_default_na=False, dtype=str) if Path(bench_csv).is_file() else pd.DataFrame()
    evidence = auto_backend_evidence(frame)
    atomic_write_text(path, evidence.to_csv(index=False))
    return evidence


COMMITTED_CSV = Path("results/ops_bench.csv")
PARTIAL_CSV = Path("runs/bench/ops_bench.csv")


def default_out(args: argparse.Namespace) -> Path:
    """--out, else the committed CSV only for the full default benchmark (every variant, default dtypes and
    shapes, default rounds); a quick or partial run goes to runs/bench/ (git-ignored)."""
    if args.out is not None:
        return args.out
    partial = args.quick or args.variants or args.dtypes or args.shape or args.rounds != 5
    return PARTIAL_CSV if partial else COMMITTED_CSV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repro.bench", description=__doc__.split("\n\n")[0],
        epilog="python -m repro.bench --inference ... runs the whole-model engine benchmark instead "
               "(repro.measure.engine_bench; see python -m repro.bench --inference --help).",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help=f"CSV to update (default: {COMMITTED_CSV} for the full default benchmark; "
                             f"{PARTIAL_CSV} for --quick or any subset, so a check never changes the "
                             "committed results)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to time on (default: cuda when available, else cpu)")
    parser.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS),
                        help="default: all (triton rows say why when they cannot run)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default: fp32 on CPU; fp32, bf16, fp16 on CUDA")
    parser.add_argument("--shape", nargs=5, type=int, action="append", metavar=("B", "C", "CQK", "H", "W"),
                        help="default: 2 512 64 97 97 on CPU; also 8 512 64 97 97 on CUDA")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant and pass (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (recorded in the CSV)")
    parser.add_argument("--quick", action="store_true", help="small shape, 2 rounds: a check that it all runs")
    parser.add_argument("--cca-speedup", action="store_true",
                        help="the naive criss-cross op against the mmcv-style einsum on this CPU: B=2 C=512 Cqk=64 "
                             "97x97 fp32, 1 and 2 threads, 7 rounds (other options ignored but --out)")
    parser.add_argument("--auto-evidence", type=Path, default=None, metavar="PATH",
                        help="also regenerate the backend='auto' evidence file from the CUDA rows of --out "
                             "(the committed one is ops/auto_backend.csv)")
    parser.add_argument("--rederive", action="store_true",
                        help="time nothing: recompute the columns derived from ops.cost (model GFLOP and MB, "
                             "GB/s, TFLOP/s) of every row of --out (default the committed CSV) from its times")
    args = parser.parse_args(argv)
    if args.rederive:
        path = args.out or COMMITTED_CSV
        if not Path(path).exists():
            parser.error(f"--rederive needs {path}, which does not exist")
        frame = rederive(pd.read_csv(path, keep_default_na=False, dtype=str))
        write_csv_atomic(frame, path)
        print(f"recomputed the ops.cost columns of {len(frame)} rows in {path}")
        return 0
    args.out = default_out(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    if args.quick:
        shapes, rounds = [Shape(1, 32, 8, 17, 19)], 2
    elif args.shape:
        shapes, rounds = [Shape(*s) for s in args.shape], args.rounds
    else:
        shapes = [Shape(2, 512, 64, 97, 97)] + ([Shape(8, 512, 64, 97, 97)] if device.type == "cuda" else [])
        rounds = args.rounds
    dtypes = args.dtypes or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32"])
    variants = args.variants or list(VARIANTS)

    console = Console()
    with quiet_profiler():  # the memory measurements' profiler writes dozens of non-error lines to stderr
        if args.cca_speedup:
            device, shapes, variants, dtypes, rounds = torch.device("cpu"), [Shape(2, 512, 64, 97, 97)], \
                ["cca_naive", "cca_einsum"], ["fp32"], 7
            frame = pd.concat([run(shapes, variants, dtypes, device, rounds=rounds, threads=threads, console=console)
                               for threads in (1, 2)], ignore_index=True)
        else:
            frame = run(shapes, variants, dtypes, device, rounds=rounds, threads=args.threads, console=console)
    _backfill_cpu_column(args.out)
    upsert_csv(args.out, frame, KEY)
    console.print(f"wrote {len(frame)} rows to {args.out}")
    summary = summarize(frame)
    if not summary.empty:
        console.print(summary.to_string(index=False))
    speedups = einsum_speedups(frame.astype(str))
    if not speedups.empty:
        console.print("cca_naive vs cca_einsum (median of paired per-round ratios):")
        console.print(speedups[["cpu", "threads", "pass", "milliseconds", "einsum_milliseconds",
                                "speedup_vs_einsum"]].to_string(index=False))
    if args.auto_evidence is not None:
        evidence = write_auto_backend_evidence(args.out, args.auto_evidence)
        console.print(f"wrote {len(evidence)} evidence rows to {args.auto_evidence}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
