"""Inference engines on a CPU: `python -m repro.bench --inference [--quick] [--out results/inference_bench.csv]`.

CCNet (criss-cross head R=2, naive op in torch; its functional form in the ONNX file) with R-50-D8 and
R-101-D8 at 512x1024 and 1024x2048, batch 1, at 1 thread and at all threads: torch eager fp32, ONNX Runtime
fp32, OpenVINO fp32 and OpenVINO at its default precision (bf16 on a CPU with AMX / AVX-512 BF16, f32
elsewhere). Random weights (seeded; gamma 0.5 so the attention counts, BN statistics perturbed), eval mode.

Variants are interleaved: every round runs each variant once in turn, so load from other jobs hits all of them
alike; the first call of each (warm-up: engine compilation, allocation) is not timed. Each row holds the median and
minimum of `repeats` timed calls, the speedup of its median over torch eager's median in the same run, and the
argmax agreement / largest |logit difference| of its output against torch eager fp32 on the same input, and the
share of the machine's CPU time other processes took during the timed rounds (`other_cpu_share`,
`repro.measure.contention`; a warning is printed above 5%). The torch timing of this run is written as variant
`torch_eager_vs_engines` so that it never replaces the `torch_eager` rows `python -m repro.inference_bench` writes
into the same file. Both commands write through one writer, `repro.measure.inference_bench.write_rows` (one column
list, rows merged by model, backbone, input_hw, batch, engine, precision, threads, variant and cpu; all others
kept). They are two commands because they compare against different things: this one the deployment engines on an
exported random CCNet (the `[deploy]` extra, no peer), that one mmsegmentation 1.2.2's own model in its own venv
with the same weights (the parity room's peer), with the torch path's inference forms (BN folded, Winograd,
channels_last).

It also writes `repro/engine/engine_speed.csv` (a few columns of these rows, committed with the package):
the evidence `repro.engine.engines` reads to warn when a user picks an engine measured slower than torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import models
from repro.engine.config import EvalConfig
from repro.engine.data.palettes import palette_for
from repro.engine.engines import (
    SPEED_EVIDENCE,
    EngineError,
    check_choice,
    engine_versions,
    git_commit,
    make_engine,
    torch_threads,
    update_speed_evidence,
)
from repro.engine.export import build_metadata, compare, export_onnx
from repro.measure.contention import CpuShare, busy_warning
from repro.measure.inference_bench import COLUMNS, write_rows
from repro.vocabulary import cpu_model, device_label

MODEL = "ccnet_rcca_r2"
TORCH_VARIANT = "torch_eager_vs_engines"
# variant -> (engine, precision)
VARIANTS = {
    TORCH_VARIANT: ("torch", "fp32"),
    "onnxruntime": ("onnxruntime", "fp32"),
    "openvino_fp32": ("openvino", "fp32"),
    "openvino_default": ("openvino", "default"),
}
DEPTHS = {"R-50-D8": 50, "R-101-D8": 101}


def bench_model(depth: int, *, seed: int = 0) -> torch.nn.Module:
    """CCNet R=2 with random weights (gamma 0.5, perturbed BN statistics), eval mode, naive op."""
    torch.manual_seed(seed)
    model = models.build(depth=depth, head="rcca", recurrence=2, num_classes=19, aux=False, backend="naive",
                         pretrained_backbone=None)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(0.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    return model.eval()


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(model: torch.nn.Module, onnx_path: Path, *, backbone: str, hw: tuple[int, int], threads: int,
               repeats: int, variants: list[str], log=print) -> list[dict]:
    """Time the variants interleaved at one size and thread count; rows of COLUMNS."""
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    runners, outputs, times, skipped = {}, {}, {}, {}
    with torch_threads(threads), torch.no_grad():
        for variant in variants:
            engine, precision = VARIANTS[variant]
            try:
                check_choice(engine, precision)
            except EngineError as err:
                skipped[variant] = str(err)
                continue
            runners[variant] = (model if engine == "torch"
                                else make_engine(engine, onnx_path=onnx_path, precision=precision, threads=threads))
        for variant, runner in runners.items():  # warm-up (not timed); its output is compared
            outputs[variant] = runner(x).float()
            times[variant] = []
        with CpuShare() as share:
            for _ in range(repeats):
                for variant, runner in runners.items():
                    times[variant].append(_time(lambda r=runner: r(x)))
                    log(f"  {backbone} {hw[0]}x{hw[1]} {threads}T {variant}: {times[variant][-1]:.3f} s")
    if warning := busy_warning(share.value):
        log(f"  {warning}")
    versions = engine_versions()
    reference = outputs.get(TORCH_VARIANT)
    torch_median = statistics.median(times[TORCH_VARIANT]) if TORCH_VARIANT in times else None
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = git_commit()
    rows = []
    for variant, samples in times.items():
        engine, precision = VARIANTS[variant]
        runner = runners[variant]
        median = statistics.median(samples)
        diff, agreement = compare(reference, outputs[variant]) if reference is not None else (float("nan"),) * 2
        rows.append({
            "model": MODEL, "backbone": backbone, "input_hw": f"{hw[0]}x{hw[1]}", "batch": 1, "engine": engine,
            "precision": getattr(runner, "precision", precision), "threads": threads, "variant": variant,
            "median_s": round(median, 4), "min_s": round(min(samples), 4), "repeats": len(samples),
            "speedup_vs_torch_eager": round(torch_median / median, 3) if torch_median else "",
            "argmax_agreement": round(agreement, 6), "max_abs_logit_diff": f"{diff:.3g}",
            "other_cpu_share": round(share.value, 4), "cpu": cpu_model(), "device": device_label("cpu"),
            "torch": versions["torch"], "date": date, "commit": commit,
        })
    for variant, reason in skipped.items():
        log(f"  {variant}: not run: {reason}")
    return rows


def run(*, out: Path, backbones: list[str], sizes: list[tuple[int, int]], threads: list[int], repeats: int,
        variants: list[str], evidence: Path | None = SPEED_EVIDENCE, log=print) -> list[dict]:
    """Every (backbone, size, threads) case; rows are merged into `out` after each case (a long run that is
    stopped keeps what it measured)."""
    all_rows = []
    palette = palette_for("cityscapes")
    with tempfile.TemporaryDirectory(prefix="ccrepro-bench-") as folder:
        for backbone in backbones:
            model = bench_model(DEPTHS[backbone])
            path = Path(folder) / f"{backbone}.onnx"
            if any(VARIANTS[v][0] != "torch" for v in variants):
                log(f"exporting {backbone} ...")
                metadata = build_metadata(config=f"bench {backbone}", dataset="cityscapes", palette=palette,
                                          mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                                          channel_order="rgb", eval_cfg=EvalConfig.native_whole(), checkpoint=None)
                export_onnx(model, path, metadata=metadata, engines=["onnxruntime"])
            for hw in sizes:
                for count in threads:
                    rows = bench_case(model, path, backbone=backbone, hw=hw, threads=count, repeats=repeats,
                                      variants=variants, log=log)
                    write_rows(out, pd.DataFrame(rows, columns=COLUMNS))
                    if evidence is not None:
                        update_speed_evidence(rows, evidence)
                    all_rows += rows
    return all_rows


def _size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.bench --inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/inference_bench.csv"))
    parser.add_argument("--backbones", nargs="+", default=list(DEPTHS), choices=list(DEPTHS))
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(512, 1024), (1024, 2048)], metavar="HxW")
    parser.add_argument("--threads", nargs="+", default=["1", "all"], help="thread counts ('all' = every core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="R-50 at 64x128, 1 thread, 2 repeats (a check)")
    parser.add_argument("--no-evidence", action="store_true", help=f"do not update {SPEED_EVIDENCE.name}")
    args = parser.parse_args(argv)
    threads = sorted({os.cpu_count() or 1 if t == "all" else int(t) for t in args.threads})
    if args.quick:
        args.backbones, args.sizes, threads, args.repeats = ["R-50-D8"], [(64, 128)], [1], 2
    try:
        rows = run(out=args.out, backbones=args.backbones, sizes=args.sizes, threads=threads, repeats=args.repeats,
                   variants=args.variants, evidence=None if (args.no_evidence or args.quick) else SPEED_EVIDENCE)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"{row['backbone']} {row['input_hw']} {row['threads']}T {row['variant']:<24} {row['median_s']:>8} s "
              f"x{row['speedup_vs_torch_eager']} agreement {100 * float(row['argmax_agreement']):.4f}%")
    print(f"wrote {args.out}")
    return 0
