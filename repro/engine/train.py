"""Training loop: SGD + momentum, poly schedule, optional AMP and gradient accumulation, atomic checkpoints
that resume exactly, a rich progress bar and a JSON-lines log.

Exact resume: a checkpoint holds the model, optimizer and grad-scaler states, the step, and the torch /
CUDA / NumPy / Python RNG states (dropout draws from torch's). The data a step sees depends only on the
step (`repro.engine.distributed.StepBatchSampler`) and the DataLoader gets its own generator, so a run interrupted
after step s and resumed ends with the same weights as one that never stopped (checked on CPU, also for a process
killed with SIGKILL at a random moment or in the middle of a checkpoint write: the write is atomic, so the file
is always the previous complete checkpoint). Everything is stored as tensors, numbers, strings and lists, so a
resume opens the file weights-only (`models.safe_load`), never by full unpickling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

import models
from models.checkpoints import CheckpointError
from models.losses import CrossEntropy, OHEMCrossEntropy, SegLoss
from repro.engine.config import ExperimentConfig, TrainConfig, model_kwargs
from repro.engine.data import build_dataset
from repro.engine.data.palettes import palette_for
from repro.engine.distributed import DistContext, StepBatchSampler, unwrap, wrap_model
from repro.engine.evaluate import evaluate
from repro.io import append_jsonl, atomic_torch_save

LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
BEST_FORMAT = "ccrepro-best-v1"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
# v2: RNG states as tensors and lists (v1 held NumPy arrays, which only full unpickling could read).
TRAIN_FORMAT = "ccrepro-train-v2"


def poly_lr(step: int, train: TrainConfig) -> float:
    """Learning rate at `step` (0-based): (lr - min_lr) * (1 - step / T) ** power + min_lr, and min_lr from
    step T on, where T is `iterations` (official lr_poly, sssegmentation PolyScheduler) or `iterations - 1`
    (mmengine PolyLR, whose total_iters is end - begin - 1) as `train.poly_horizon` says."""
    horizon = train.iterations - 1 if train.poly_horizon == "iterations_minus_one" else train.iterations
    progress = min(step, horizon) / horizon
    return (train.lr - train.min_lr) * (1.0 - progress) ** train.lr_power + train.min_lr


def build_model(cfg: ExperimentConfig, *, device: torch.device) -> nn.Module:
    """`models.build` from the config, on `device`."""
    return models.build(**model_kwargs(cfg)).to(device)


def build_loss(train: TrainConfig, *, ignore_index: int) -> SegLoss:
    """Decode loss (cross-entropy, or the official OHEM on the decode output only, as CriterionOhemDSN) +
    aux x weight; cross-entropy averaged as `train.loss_average` says."""
    if train.loss == "ohem":
        decode = OHEMCrossEntropy(
            ignore_index=ignore_index, thresh=train.ohem_thresh, min_kept=train.ohem_min_kept
        )
    else:
        decode = CrossEntropy(ignore_index=ignore_index, average=train.loss_average)
    aux = CrossEntropy(ignore_index=ignore_index, average=train.loss_average)
    return SegLoss(decode_loss=decode, aux_loss=aux, aux_weight=train.aux_weight)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum over every parameter in one group: one learning rate and one weight decay for all
    parameter kinds (norms and biases included), as mmengine's DefaultOptimWrapperConstructor without
    paramwise_cfg, sssegmentation and the official train.py do."""
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, ints, floats and lists: what `torch.load(weights_only=True)` reads back."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    numpy_state, python_state = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def save_training_state(
    path: Path, *, model: nn.Module, optimizer, scaler, step: int, cfg: ExperimentConfig,
    meta: Mapping[str, Any] | None = None, best: float | None = None,
) -> Path:
    """Atomically write everything a resume needs, only in types `torch.load(weights_only=True)` accepts.

    `config` is the effective config (after `--set` and the smoke shrink), so `--eval-only` rebuilds the same
    model; `meta` holds the run's provenance (`overrides` list, `smoke` flag); `best_val_miou` the best
    validation mIoU so far (keep-best across a resume)."""
    state = {
        "format": TRAIN_FORMAT,
        "experiment": cfg.name,
        "config": asdict(cfg),
        "meta": dict(meta or {}),
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
        "best_val_miou": best,
    }
    return atomic_torch_save(state, path)


def effective_batch_note(cfg: ExperimentConfig, world_size: int) -> str | None:
    """A line saying how this run's total batch differs from the source's, and how to match it; None when
    they are equal. Total batch = processes x data.batch_size x train.grad_accum_steps; the source's =
    data.batch_size x train.source_gpus (one accumulation step)."""
    batch, accum, gpus = cfg.data.batch_size, cfg.train.grad_accum_steps, cfg.train.source_gpus
    ours, source = world_size * batch * accum, batch * gpus
    if ours == source:
        return None
    text = (f"effective batch {ours} = {world_size} process(es) x {batch} per process x {accum} accumulation "
            f"step(s); the source trained with {source} = {gpus} GPUs x {batch}. ")
    per_step = world_size * batch
    if source % per_step == 0:
        text += (f"To match it: --set train.grad_accum_steps={source // per_step} (BatchNorm still sees "
                 f"{batch} images per process), or run on {gpus // world_size if gpus % world_size == 0 else gpus} x "
                 f"more processes (torchrun --nproc-per-node).")
    else:
        text += (f"{source} is not a multiple of {per_step} images per step: change data.batch_size or the "
                 "number of processes.")
    return text


def tensorboard_writer(folder: Path):
    """A `torch.utils.tensorboard.SummaryWriter` on `folder`, or None when the `tensorboard` package is not
    installed (an optional extra: pip install -e ".[tensorboard]"). Tests replace this function."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def load_training_state(
    path: Path, *, model: nn.Module, optimizer, scaler, cfg: ExperimentConfig, extras: dict | None = None
) -> int:
    """Restore a `save_training_state` file (opened weights-only, `models.safe_load`); returns the step to
    continue from and puts the best validation mIoU so far into `extras["best_val_miou"]` when given.
    CheckpointError (naming the file) when it is damaged, unsafe, of another experiment or another model."""
    try:
        state = models.safe_load(path, what="training checkpoint")
    except CheckpointError as err:
        if "numpy" in str(err):
            raise CheckpointError(
                f"{err} (a training checkpoint written before format {TRAIN_FORMAT!r} held NumPy RNG state, which "
                "cannot be opened safely: start the run again without --resume)"
            ) from None
        raise
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a ccrepro training checkpoint (format {found!r}, expected {TRAIN_FORMAT!r}); "
            "--resume continues only from a checkpoint_last.pt this version wrote"
        )
    if state.get("experiment") != cfg.name:
        raise CheckpointError(f"{path} belongs to experiment {state.get('experiment')!r}, not {cfg.name!r}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= cfg.train.iterations:
        raise CheckpointError(f"{path}: step {step!r} is not an integer in [0, {cfg.train.iterations}]")
    if extras is not None:
        extras["best_val_miou"] = state.get("best_val_miou")
    try:
        models.load_checkpoint(unwrap(model), state.get("model", {}), source="ccrepro")
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CheckpointError(
            f"{path}: the optimizer, grad-scaler or RNG state cannot be restored ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return step


def validate(model: nn.Module, dataset, cfg: ExperimentConfig, ctx: DistContext) -> dict[str, Any]:
    """Single-scale validation during training (the sources validate without test-time augmentation): mIoU,
    pixel accuracy and per-class IoU with the class names, in percent (None for a class absent from labels and
    predictions)."""
    eval_cfg = cfg.eval
    if getattr(eval_cfg, "ms_flip", False):
        eval_cfg = dataclasses.replace(eval_cfg, ms_flip=False)
    results = evaluate(model, dataset, eval_cfg=eval_cfg, num_classes=cfg.model.num_classes,
                       ignore_index=cfg.data.ignore_index, ctx=ctx, progress=False)
    result = results["mIoU"]
    names = class_names(cfg.data.dataset, cfg.model.num_classes)
    return {
        "mIoU": _finite(result.miou),
        "pixel_accuracy": _finite(result.pixel_accuracy),
        # Two lists in class order (the log's JSON keys are sorted, so a mapping would lose the order).
        "class_names": list(names),
        "iou_per_class": [_finite(value) for value in result.iou_per_class],
    }


def _finite(value: float) -> float | None:
    return None if value != value else float(value)


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
    """The dataset's class names (`repro.engine.data.palettes`), or class_0.. when the counts differ."""
    try:
        names = palette_for(dataset).names
    except (ValueError, ImportError):
        names = ()
    return tuple(names) if len(names) == num_classes else tuple(f"class_{i}" for i in range(num_classes))


def human_duration(seconds: float) -> str:
    """'45 s', '12 min' or '3.2 h': the estimates printed before long training and evaluation."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def train(
    cfg: ExperimentConfig,
    *,
    out_dir: Path,
    ctx: DistContext,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    announce: Callable[[str], None] = print,
) -> tuple[nn.Module, Path]:
    """Train `cfg` and return (unwrapped model, path of the last checkpoint).

    Writes (rank 0 only) `out_dir/checkpoint_last.pt` every `train.checkpoint_every` steps and at the end,
    and `out_dir/train_log.jsonl` (one object per logged step). `resume` continues from
    `checkpoint_last.pt` if present. `stop_at` ends the run after that many steps (an interruption, for
    tests); the schedule still follows `train.iterations`. With `train.val_every` the model is validated
    every that many steps (not at the last one: the caller evaluates the final checkpoint), the record
    logged (event "val") and, with `train.keep_best`, the best weights kept in `checkpoint_best.pt`.
    Scalars also go to `out_dir/tensorboard/` when the `tensorboard` package is installed. `meta` (run
    provenance) is stored in every checkpoint; `announce` prints the run's plan and first-step estimate.
    """
    out_dir = Path(out_dir)
    tcfg, dcfg = cfg.train, cfg.data
    seed_everything(tcfg.seed)
    model = build_model(cfg, device=ctx.device)
    model.train()
    model = wrap_model(model, ctx)
    criterion = build_loss(tcfg, ignore_index=dcfg.ignore_index)
    optimizer = build_optimizer(model, tcfg)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=tcfg.amp == "fp16")
    checkpoint = out_dir / LAST_CHECKPOINT
    if ctx.is_main:
        # A run killed while writing a checkpoint leaves its temporary file (repro.io); the checkpoint itself
        # is the previous, complete one.
        for stale in out_dir.glob(f".{LAST_CHECKPOINT}.*.tmp"):
            stale.unlink(missing_ok=True)
    start, extras = 0, {"best_val_miou": None}
    if resume and checkpoint.is_file():
        start = load_training_state(checkpoint, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg,
                                    extras=extras)
    best = extras["best_val_miou"]
    end = tcfg.iterations if stop_at is None else min(stop_at, tcfg.iterations)

    dataset = build_dataset(dcfg, split="train")
    accum = tcfg.grad_accum_steps
    sampler = StepBatchSampler(
        dataset_size=len(dataset),
        batch_size=dcfg.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=tcfg.seed,
        start_step=start * accum,
        total_steps=end * accum,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=dcfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        # Its own generator: the loader must not draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(tcfg.seed),
        persistent_workers=False,
    )
    log_path = out_dir / TRAIN_LOG
    images_per_step = dcfg.batch_size * ctx.world_size * accum
    val_dataset = build_dataset(dcfg, split="val", eval_cfg=cfg.eval) if tcfg.val_every else None
    writer = tensorboard_writer(out_dir / TENSORBOARD_DIR) if ctx.is_main else None
    if ctx.is_main:
        val = (f"validation every {tcfg.val_every} steps on {len(val_dataset)} images" if val_dataset
               else "no validation during training")
        announce(f"{cfg.name}: train steps {start + 1}..{end} of {tcfg.iterations}, {images_per_step} images per step "
                 f"({ctx.world_size} x {dcfg.batch_size} x {accum} accumulation), crop "
                 f"{dcfg.crop_size[0]}x{dcfg.crop_size[1]}, {val}; checkpoint every {tcfg.checkpoint_every} steps "
                 f"to {checkpoint}")
        note = effective_batch_note(cfg, ctx.world_size)
        if note and not (meta or {}).get("smoke"):
            announce(f"{cfg.name}: {note}")
        append_jsonl(log_path, {"event": "resume" if start else "start", "step": start, "experiment": cfg.name,
                                "iterations": tcfg.iterations, "time": time.time()})
    run_start = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.1f} img/s"),
        TimeRemainingColumn(),
        disable=not (progress and ctx.is_main),
    )
    step = start
    window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
    with bar:
        task = bar.add_task(
            cfg.name, total=tcfg.iterations, completed=start, loss=0.0, lr=poly_lr(start, tcfg), ips=0.0
        )
        micro = 0
        for images, labels, _ in loader:
            if micro == 0:
                lr = poly_lr(step, tcfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = 0.0
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            last_micro = micro == accum - 1
            sync = contextlib.nullcontext() if last_micro or not ctx.distributed else model.no_sync()
            with sync:
                with _autocast(tcfg.amp, ctx.device):
                    outputs = model(images)
                    loss = criterion(tuple(o.float() if o is not None else None for o in outputs), labels)
                scaler.scale(loss / accum).backward()
            step_loss += float(loss.detach()) / accum
            micro += 1
            if not last_micro:
                continue
            micro = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss += step_loss
            window_steps += 1
            elapsed = time.perf_counter() - window_start
            ips = images_per_step * window_steps / max(elapsed, 1e-9)
            bar.update(task, completed=step, loss=step_loss, lr=lr, ips=ips)
            if ctx.is_main and step == start + 1 and end > step:
                first = time.perf_counter() - run_start
                announce(f"{cfg.name}: first step {first:.1f} s (data loading included): about "
                         f"{human_duration(first * (end - step))} for the remaining {end - step} steps, "
                         f"validations not counted")
            if ctx.is_main and (step % tcfg.log_every == 0 or step == end):
                record = {"step": step, "loss": window_loss / window_steps, "lr": lr, "images_per_s": ips}
                record.update(experiment=cfg.name, event="train", time=time.time())
                append_jsonl(log_path, record)
                if writer is not None:
                    writer.add_scalar("train/loss", record["loss"], step)
                    writer.add_scalar("train/lr", lr, step)
                window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
            improved = False
            if val_dataset is not None and step % tcfg.val_every == 0 and step < tcfg.iterations:
                summary = validate(unwrap(model), val_dataset, cfg, ctx)
                model.train()
                if ctx.is_main:
                    append_jsonl(log_path, {"event": "val", "step": step, "experiment": cfg.name,
                                            "time": time.time(), **summary})
                    if writer is not None and summary["mIoU"] is not None:
                        writer.add_scalar("val/mIoU", summary["mIoU"], step)
                    shown = "n/a" if summary["mIoU"] is None else f"{summary['mIoU']:.2f}"
                    bar.console.print(f"{cfg.name}: step {step} validation mIoU {shown}")
                    miou = summary["mIoU"]
                    if tcfg.keep_best and miou is not None and (best is None or miou > best):
                        best, improved = miou, True
                window_start = time.perf_counter()
            if ctx.is_main and improved:
                atomic_torch_save({"format": BEST_FORMAT, "experiment": cfg.name, "config": asdict(cfg),
                                   "meta": dict(meta or {}), "step": step, "val_miou": best,
                                   "model": unwrap(model).state_dict()}, out_dir / BEST_CHECKPOINT)
            if ctx.is_main and (step % tcfg.checkpoint_every == 0 or step == end or improved):
                save_training_state(
                    checkpoint, model=model, optimizer=optimizer, scaler=scaler, step=step, cfg=cfg,
                    meta=meta, best=best,
                )
    if writer is not None:
        writer.close()
    if ctx.distributed:
        check_ranks_agree(unwrap(model), ctx)
    return unwrap(model), checkpoint


def check_ranks_agree(model: nn.Module, ctx: DistContext) -> None:
    """Raise if the parameters differ between ranks (DDP keeps them identical; a difference means the
    gradients were not synchronised). Compares a float64 checksum through one all-reduce (max of +s, -s)."""
    checksum = sum(p.detach().double().sum() for p in model.parameters())
    both = torch.stack([checksum, -checksum]).to(ctx.device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if float(both[0]) != -float(both[1]):
        raise RuntimeError(
            f"rank {ctx.rank}: parameters differ between ranks (checksum max {float(both[0])!r}, "
            f"min {-float(both[1])!r}); gradients were not synchronised"
        )
