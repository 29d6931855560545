"""`python -m repro.profile CONFIG.yaml [...]`: whole-model efficiency per experiment config, beside the
memory and fps the source reported.

For each config's model, training crop and per-GPU batch:
* training-step peak memory (forward, decode + 0.4 x aux cross-entropy, backward, SGD step with momentum
  state already present, as in every step after the first), estimated under FakeTensorMode with PyTorch's
  MemTracker on CPU without allocating the activations; on CUDA also the real `max_memory_allocated` of the
  same step, so the estimate can be calibrated. Both include the weights, gradients and momentum buffers, as
  mmsegmentation's logged memory does;
* parameters: total, backbone, decode head, auxiliary head;
* FLOPs (2 x MACs) of one forward at the inference size (the sliding window for `eval.mode: slide`, the
  image otherwise), split into backbone / decode head / auxiliary head: FlopCounterMode under
  FakeTensorMode (fast, any size), and with `--fvcore` also fvcore with the attention handles on the real
  model (slow on CPU);
* inference throughput (images/s), whole image and sliding window, with device, threads and dtype: always on
  CUDA, on CPU only with `--throughput` (a full-resolution R-101 forward takes minutes there).

Rows go to `results/model_efficiency.csv` (experiment, metric, value, unit, reported, method, device, date);
rows of the same experiment, metric and method are replaced, others kept. `results/model_efficiency.md` is the
report section rebuilt from the whole CSV: estimated vs reported training memory, with the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import models
from models.inference import predict_slide, predict_whole, window_starts
from ops.criss_cross import resolve_backend, triton_available
from repro.engine.config import ExperimentConfig, load_config, model_kwargs
from repro.io import atomic_write_text, upsert_csv
from repro.measure.flops import flop_counter_mapping, fvcore_macs
from repro.measure.memory import FakeMemory, cpu_peak_bytes, fake_memory
from repro.measure.steps import (
    METHOD_COUNTER,
    METHOD_CUDA_MEMORY,
    METHOD_FAKE_MEMORY,
    METHOD_FVCORE,
    StepState,
    training_step,
)
from repro.vocabulary import DEVICE_COUNTED, DEVICE_TRACED, device_label

COLUMNS = ("experiment", "metric", "value", "unit", "reported", "method", "device", "date")
KEY = ("experiment", "metric", "method")
PARTS = ("backbone", "decode_head", "auxiliary_head")
GIB = 2**30
# What the profile's training step is, appended to the shared memory method string.
STEP_DESCRIPTION = "training step: decode + aux cross-entropy, SGD momentum, BN in place of SyncBN"


@dataclass(frozen=True)
class ProfileSettings:
    """What one config is profiled at: training crop and batch, inference image and window."""

    crop_size: tuple[int, int]
    batch_size: int
    image_size: tuple[int, int]
    window: tuple[int, int] | None
    stride: tuple[int, int] | None

    @property
    def inference_size(self) -> tuple[int, int]:
        """One forward's input at inference: the window when sliding, the image otherwise."""
        return self.window if self.window is not None else self.image_size

    @property
    def windows_per_image(self) -> int:
        if self.window is None or self.stride is None:
            return 1
        rows = window_starts(self.image_size[0], self.window[0], self.stride[0])
        cols = window_starts(self.image_size[1], self.window[1], self.stride[1])
        return len(rows) * len(cols)


def settings_for(cfg: ExperimentConfig) -> ProfileSettings:
    """The training crop and per-GPU batch; the evaluation image is `eval.scale` (long, short side, as
    mmsegmentation writes it; landscape H x W = short x long) when given, else the training crop."""
    image = (cfg.eval.scale[1], cfg.eval.scale[0]) if cfg.eval.scale is not None else cfg.data.crop_size
    slide = cfg.eval.mode == "slide"
    return ProfileSettings(
        crop_size=cfg.data.crop_size,
        batch_size=cfg.data.batch_size,
        image_size=image,
        window=cfg.eval.crop_size if slide else None,
        stride=cfg.eval.stride if slide else None,
    )


def profile_kwargs(cfg: ExperimentConfig) -> dict:
    """`models.build` arguments for profiling: no pretrained weights (costs do not depend on them), and
    BatchNorm in place of SyncBatchNorm (same memory per GPU; SyncBN needs a process group)."""
    kwargs = model_kwargs(cfg)
    kwargs["pretrained_backbone"] = None
    if kwargs["norm"] == "syncbn":
        kwargs["norm"] = "bn"
    # Everything here is traced or run on CPU unless CUDA is present; the Triton backend dispatches on CPU
    # only under the interpreter, so fall back to the naive backend (same outputs, its memory noted).
    cpu = torch.device("cpu")
    if not torch.cuda.is_available() and resolve_backend(kwargs["backend"], cpu) == "triton" \
            and not triton_available(cpu):
        kwargs["backend"] = "naive"
    return kwargs


def build_model(cfg: ExperimentConfig) -> models.CCNet:
    return models.build(**profile_kwargs(cfg))


def _loss(outputs, labels: torch.Tensor, *, aux_weight: float, ignore_index: int) -> torch.Tensor:
    # Plain cross-entropy: the loss modules' input checks index by data, which FakeTensorMode cannot trace.
    logits, aux_logits = outputs
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if aux_logits is not None:
        loss = loss + aux_weight * F.cross_entropy(aux_logits, labels, ignore_index=ignore_index)
    return loss


def step_state(cfg: ExperimentConfig, *, device: torch.device | None = None) -> StepState:
    """The model, a batch of the training crop and SGD, after one step so the momentum buffers exist."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if device is not None and device.type != "cpu":
        model = model.to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    height, width = cfg.data.crop_size
    images = torch.randn(cfg.data.batch_size, 3, height, width, device=device)
    labels = torch.randint(0, cfg.model.num_classes, (cfg.data.batch_size, height, width), device=device)
    loss = partial(_loss, aux_weight=cfg.train.aux_weight, ignore_index=cfg.data.ignore_index)
    state = StepState(model, (images,), (labels,), loss=loss, optimizer=optimizer)
    training_step(state)
    return state


def estimate_training_memory(cfg: ExperimentConfig) -> FakeMemory:
    """Fake-mode estimate of one training step (total peak and the state it starts from), no allocation."""
    return fake_memory(lambda: step_state(cfg), training_step)


def measure_training_memory(cfg: ExperimentConfig, *, device: torch.device) -> tuple[int, int]:
    """Real (state bytes, peak bytes) of one training step on `device`; the peak includes the state.

    CUDA: `memory_allocated` before and `max_memory_allocated` during the step. CPU: the profiler's allocator
    peak above the state, plus the state (parameters, buffers, momentum, inputs) counted by storage.
    """
    state = step_state(cfg, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        training_step(state)
        torch.cuda.synchronize(device)
        return base, torch.cuda.max_memory_allocated(device)
    base = _state_bytes(state)
    return base, base + cpu_peak_bytes(lambda: training_step(state))


def _state_bytes(state: StepState) -> int:
    tensors = [*state.model.parameters(), *state.model.buffers(), *state.inputs, *state.targets]
    tensors += [value for slot in state.optimizer.state.values() for value in slot.values()
                if isinstance(value, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter elements in total and per part (a missing auxiliary head counts 0)."""
    counts = {"total": models.count_parameters(model)}
    for part in PARTS:
        module = getattr(model, part, None)
        counts[part] = 0 if module is None else models.count_parameters(module)
    return counts


def counter_flops(cfg: ExperimentConfig, size: tuple[int, int]) -> dict[str, int]:
    """FLOPs (2 x MACs) of one train-mode forward (so the auxiliary head runs) at `size`, per part, by
    FlopCounterMode under FakeTensorMode; `inference` = backbone + decode head (+ the final upsampling)."""
    with FakeTensorMode():
        model = build_model(cfg)
        model.train()
        images = torch.empty(1, 3, *size)
        counter = FlopCounterMode(display=False, custom_mapping=flop_counter_mapping())
        with torch.no_grad(), counter:
            model(images)
    by_module = counter.get_flop_counts()
    parts = {part: sum(by_module.get(f"CCNet.{part}", {}).values()) for part in PARTS}
    total = sum(by_module.get("Global", {}).values())
    parts["inference"] = total - parts["auxiliary_head"]
    return parts


def fvcore_flops(cfg: ExperimentConfig, size: tuple[int, int]) -> dict[str, int]:
    """As `counter_flops`, counted by fvcore (with the attention handles) on the real model."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        count = fvcore_macs(model, (torch.randn(1, 3, *size),))
    parts = {part: 2 * count.by_module.get(part, 0) for part in PARTS}
    parts["inference"] = count.flops - parts["auxiliary_head"]
    return parts


def throughput(cfg: ExperimentConfig, *, mode: str, device: torch.device, dtype: torch.dtype,
               repeats: int) -> float:
    """Images per second of `predict_whole` ("whole") or `predict_slide` ("slide") on one image of the
    evaluation size, after one warm-up call."""
    settings = settings_for(cfg)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    image = torch.randn(1, 3, *settings.image_size, device=device, dtype=dtype)
    window = settings.window or settings.crop_size
    stride = settings.stride or tuple(max(1, 2 * side // 3) for side in window)

    def run() -> None:
        with torch.no_grad():
            if mode == "whole":
                predict_whole(model, image)
            else:
                predict_slide(model, image, crop=window, stride=stride, num_classes=cfg.model.num_classes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return repeats / (time.perf_counter() - start)


def profile_rows(cfg: ExperimentConfig, *, device: torch.device, use_fvcore: bool, measure_throughput: bool,
                 repeats: int = 3) -> list[dict]:
    """All rows for one config."""
    settings = settings_for(cfg)
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    where = device_label(device)
    rows: list[dict] = []

    def add(metric: str, value: float, unit: str, method: str, *, reported: float | None = None,
            on: str = where) -> None:
        rows.append({"experiment": cfg.name, "metric": metric, "value": value, "unit": unit,
                     "reported": "" if reported is None else reported, "method": method, "device": on,
                     "date": today})

    crop = f"{settings.crop_size[0]}x{settings.crop_size[1]}, batch {settings.batch_size}"
    if cfg.model.head == "rcca":
        # The estimate is traced on CPU, where "auto" resolves to the naive backend.
        backend = resolve_backend(profile_kwargs(cfg)["backend"], torch.device("cpu"))
        crop += f", criss-cross backend {backend}"
    estimate = estimate_training_memory(cfg)
    reported_memory = cfg.reported.get("memory_gb")
    add("train_memory_peak", estimate.peak_bytes / GIB, "GiB", f"{METHOD_FAKE_MEMORY}; {STEP_DESCRIPTION}; {crop}",
        reported=reported_memory, on=DEVICE_TRACED)
    add("train_memory_state", estimate.state_bytes / GIB, "GiB", f"{METHOD_FAKE_MEMORY}; {STEP_DESCRIPTION}; {crop}",
        on=DEVICE_TRACED)
    if reported_memory is not None:
        add("train_memory_estimate_over_reported", estimate.peak_bytes / GIB / reported_memory, "ratio",
            f"{METHOD_FAKE_MEMORY}; {STEP_DESCRIPTION} / reported memory_gb (taken as GiB)", on=DEVICE_TRACED)
    if device.type == "cuda":
        base, peak = measure_training_memory(cfg, device=device)
        add("train_memory_peak", peak / GIB, "GiB", f"{METHOD_CUDA_MEMORY}; {STEP_DESCRIPTION}; {crop}",
            reported=reported_memory)
        add("train_memory_estimate_over_measured", estimate.peak_bytes / peak, "ratio",
            f"fake-mode estimate / {METHOD_CUDA_MEMORY}")

    model = build_model(cfg)
    for part, count in parameter_counts(model).items():
        add(f"parameters_{part}", count, "count", "sum of parameter elements")
    del model

    size = settings.inference_size
    at = f"at {size[0]}x{size[1]}, batch 1"
    counts = [(METHOD_COUNTER, counter_flops(cfg, size))]
    if use_fvcore:
        counts.append((METHOD_FVCORE, fvcore_flops(cfg, size)))
    for method, flops in counts:
        for part, value in flops.items():
            add(f"flops_{part}", value / 1e9, "GFLOP", f"{method}; {at}", on=DEVICE_COUNTED)
        add("flops_per_image", flops["inference"] * settings.windows_per_image / 1e9, "GFLOP",
            f"{method}; {settings.windows_per_image} window(s) of {size[0]}x{size[1]} on a "
            f"{settings.image_size[0]}x{settings.image_size[1]} image", on=DEVICE_COUNTED)

    threads = torch.get_num_threads()
    modes = ("whole", "slide")
    if measure_throughput:
        for mode in modes:
            fps = throughput(cfg, mode=mode, device=device, dtype=torch.float32, repeats=repeats)
            add(f"fps_{mode}", fps, "images/s",
                f"predict_{mode} on a {settings.image_size[0]}x{settings.image_size[1]} image, fp32, "
                f"{threads} threads, mean of {repeats} after 1 warm-up",
                reported=cfg.reported.get("fps") if mode == cfg.eval.mode else None)
    else:
        for mode in modes:
            add(f"fps_{mode}", float("nan"), "images/s",
                "not measured: throughput on CPU only with --throughput (a full-resolution forward takes "
                "minutes here)", reported=cfg.reported.get("fps") if mode == cfg.eval.mode else None)
    return rows


def memory_section(frame: pd.DataFrame) -> str:
    """Markdown: estimated training memory vs the reported memory for every experiment that reports one."""
    peaks = frame[(frame.metric == "train_memory_peak") & frame.method.str.startswith("FakeTensorMode")]
    peaks = peaks[pd.to_numeric(peaks.reported, errors="coerce").notna()]
    lines = [
        "## Training memory per GPU: estimated vs reported",
        "",
        "Estimate: one training step (forward, decode + 0.4 x aux cross-entropy, backward, SGD with momentum) "
        "traced under FakeTensorMode with MemTracker on CPU, weights, gradients and momentum included. "
        "Reported: the source's Mem (GB) column (V100, SyncBN, 4 GPUs), taken as GiB.",
        "",
        "| experiment | crop, batch per GPU | estimated (GiB) | reported (GB) | estimated / reported |",
        "|---|---|---:|---:|---:|",
    ]
    for row in peaks.sort_values("experiment").itertuples():
        reported = float(row.reported)
        crop = row.method.rsplit("; ", 1)[-1]
        lines.append(f"| {row.experiment} | {crop} | {row.value:.2f} | {reported:g} | {row.value / reported:.2f} |")
    return "\n".join(lines) + "\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="experiment YAML files")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--fvcore", action="store_true", help="also count FLOPs with fvcore on the real model")
    parser.add_argument("--throughput", action="store_true",
                        help="measure throughput on CPU too (always measured on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per throughput figure")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    # Load every config first: a bad file fails before minutes of profiling.
    configs = [load_config(path) for path in args.configs]
    path = args.out / "model_efficiency.csv"
    for cfg in configs:
        rows = profile_rows(cfg, device=device, use_fvcore=args.fvcore,
                            measure_throughput=args.throughput or device.type == "cuda", repeats=args.repeats)
        upsert_csv(path, pd.DataFrame(rows, columns=list(COLUMNS)), KEY)
        peak = next(row for row in rows if row["metric"] == "train_memory_peak")
        print(f"{cfg.name}: training step ~{peak['value']:.2f} GiB (reported {peak['reported'] or '-'}) -> {path}")
    section = args.out / "model_efficiency.md"
    atomic_write_text(section, memory_section(pd.read_csv(path)))
    print(f"wrote {section}")


if __name__ == "__main__":
    main()
