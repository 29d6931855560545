"""The synthetic R=0/1/2/3/non-local ablation on the marker task (`repro.synthetic.data`).

`python -m repro.synthetic [--out results] [--quick | --full] [--force]` trains one small CCNet-style
segmenter per (variant, seed), evaluates it on a fixed validation set, and appends one row per run to
`results/synthetic_ablation.csv`; then draws `results/plots/synthetic_ablation.png` and the attention-reach
figure `results/plots/attention_reach.png` (see `repro.synthetic.reach`). Runs already in the CSV (same
variant, seed and number of steps) are not redone unless `--force`, so an interrupted ablation resumes.

The model (`models.synthetic.SyntheticSegmenter`) and why it is built the way it is are described there.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

from models.synthetic import VARIANTS, SyntheticSegmenter, recurrence_of
from ops import criss_cross_attention
from ops.cost import criss_cross_attention_cost
from repro.engine.metrics import confusion_matrix
from repro.engine.metrics import mean_iou as confusion_mean_iou
from repro.io import atomic_savefig, atomic_torch_save, write_csv_atomic
from repro.measure.memory import peak_bytes
from repro.measure.steps import METHOD_COUNTER_EAGER, METHOD_COUNTER_PLUS_ANALYTIC, StepState, training_step
from repro.synthetic.data import IGNORE_INDEX, MarkerTask, generate, object_classes
from repro.vocabulary import device_label

CSV_NAME = "synthetic_ablation.csv"
CSV_COLUMNS = (
    "variant", "recurrence", "seed", "miou", "object_accuracy", "object_accuracy_by_class", "params", "flops",
    "flops_method", "peak_memory_bytes", "memory_method", "train_time_s", "steps", "batch", "train_images",
    "device", "threads", "date",
)
# Validation images come from a seed no training set uses, the same for every run.
VAL_SEED = 1_000_003
TRAIN_SEED_OFFSET = 10_000


def count_flops(model: SyntheticSegmenter, *, height: int, width: int) -> tuple[int, str]:
    """Forward FLOPs (2 x multiply-accumulates) of one (1, 3, height, width) image, and the method.

    torch's FlopCounterMode sees every conv and the non-local matmuls, but only part of the criss-cross op's
    matmuls (the naive op's custom autograd Function writes some of them into preallocated buffers, which the
    counter does not see; which ones depends on its code path): what the counter sees of one op call at this
    shape is taken out and the analytic `ops.cost` figure put in, once per recurrence.
    """
    images = torch.zeros(1, 3, height, width)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    flops = counter.get_total_flops()
    method = METHOD_COUNTER_EAGER
    if model.variant != "nonlocal" and model.recurrence > 0:
        attention = model.context
        core = criss_cross_attention_cost(
            1, attention.qk_channels, attention.in_channels, height // 2, width // 2
        )
        flops += model.recurrence * (core.flops - _counted_op_flops(attention, height // 2, width // 2))
        method = METHOD_COUNTER_PLUS_ANALYTIC
    return flops, method


def _counted_op_flops(attention, height: int, width: int) -> int:
    """What FlopCounterMode sees of one criss-cross op call of `attention` on a (1, C, height, width) map."""
    query = torch.zeros(1, attention.qk_channels, height, width)
    value = torch.zeros(1, attention.in_channels, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        criss_cross_attention(query, query, value, backend=attention.backend)
    return counter.get_total_flops()


def mean_iou(predictions: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> float:
    """mIoU over the classes that occur in labels or predictions (ignore 255), by `repro.engine.metrics`."""
    return confusion_mean_iou(
        confusion_matrix(predictions, labels, num_classes=num_classes, ignore_index=IGNORE_INDEX)
    )


def object_predictions(predictions: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """(N,) the majority predicted class (background excluded) over each image's rectangle."""
    on_object = (labels > 0) & (labels != IGNORE_INDEX)
    votes = F.one_hot(predictions, num_classes) * on_object.unsqueeze(-1)
    votes = votes.flatten(1, 2).sum(1)
    votes[:, 0] = -1
    return votes.argmax(1)


def object_accuracy(predictions: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> float:
    """Share of images whose rectangle's majority predicted class is its class."""
    voted = object_predictions(predictions, labels, num_classes=num_classes)
    return float((voted == object_classes(labels)).double().mean())


def object_accuracy_by_class(predictions: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> str:
    """Object accuracy per class as "c1:acc c2:acc ..." (classes absent from labels left out); shows
    which marker colours a partly trained model reads and which it merges."""
    voted = object_predictions(predictions, labels, num_classes=num_classes)
    truth = object_classes(labels)
    parts = []
    for cls in range(1, num_classes):
        mine = truth == cls
        if mine.any():
            parts.append(f"c{cls}:{float((voted[mine] == cls).double().mean()):.2f}")
    return " ".join(parts)


@dataclass(frozen=True)
class TrainSettings:
    """One training run's budget (Adam, one-cycle learning rate).

    Sized for the main job's budget (`nox -s reproduce` in 12 minutes on 2 cores, the ablation one of its
    single-threaded steps): batch 16 halves the per-step cost of the first design's 32 at the same 600 steps,
    and 4096 training images (generated once per seed, shared by the five variants) cover the 9600 samples drawn
    2.3 times. Tuning runs of R=2 alone: with this 32-channel model it reached object accuracy 1.0 on seeds 2 and
    3; a 16-channel model at batch 16 (cheaper still) reached >= 0.999 on seeds 0 and 1 (lr 2e-3) and 3 (lr
    4e-3) but stayed at chance on seed 2 at both learning rates. 1024 validation images put the chance
    level's standard error at 0.014 (object accuracy 0.25).
    """

    steps: int = 600
    batch: int = 16
    lr: float = 2e-3
    train_images: int = 4096
    val_images: int = 1024

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "train_images", "val_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainSettings.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainSettings.lr must be > 0, got {self.lr!r}")


PRESETS = {
    "quick": (TrainSettings(steps=20, batch=8, train_images=256, val_images=64), (0,)),
    "default": (TrainSettings(), (0, 1, 2)),
    "full": (TrainSettings(), (0, 1, 2, 3, 4)),
}


def train_one(
    variant: str, *, seed: int, settings: TrainSettings, task: MarkerTask, progress=None, data=None
) -> tuple[SyntheticSegmenter, dict]:
    """Train and evaluate one model; returns it and its CSV row (without FLOPs/memory). `data`: the
    (train_x, train_y, val_x, val_y) of `seed` and `settings` when the caller generated them already (the same
    tensors `generate` gives; the variants of one seed share them)."""
    torch.manual_seed(seed)
    model = SyntheticSegmenter(variant=variant, num_classes=task.num_classes)
    train_x, train_y, val_x, val_y = data if data is not None else seed_data(seed, settings=settings, task=task)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps)
    sampler = torch.Generator().manual_seed(seed)
    task_id = progress.add_task(f"{variant} seed {seed}", total=settings.steps) if progress else None
    model.train()
    start = time.perf_counter()
    for _ in range(settings.steps):
        batch = torch.randint(0, settings.train_images, (settings.batch,), generator=sampler)
        loss = F.cross_entropy(model(train_x[batch]), train_y[batch], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress.update(task_id, advance=1, description=f"{variant} seed {seed} loss {loss.item():.3f}")
    train_time = time.perf_counter() - start
    if progress:
        progress.remove_task(task_id)
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in val_x.split(128)])
    row = {
        "variant": variant,
        "recurrence": recurrence_of(variant) if variant != "nonlocal" else "",
        "seed": seed,
        "miou": mean_iou(predictions, val_y, num_classes=task.num_classes),
        "object_accuracy": object_accuracy(predictions, val_y, num_classes=task.num_classes),
        "object_accuracy_by_class": object_accuracy_by_class(
            predictions, val_y, num_classes=task.num_classes
        ),
        "train_time_s": train_time,
        "steps": settings.steps,
        "batch": settings.batch,
        "train_images": settings.train_images,
        "device": device_label("cpu"),
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return model, row


def seed_data(seed: int, *, settings: TrainSettings, task: MarkerTask) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, val_x, val_y): the training images of `seed` and the shared validation images."""
    return (*generate(settings.train_images, seed=TRAIN_SEED_OFFSET + seed, task=task),
            *generate(settings.val_images, seed=VAL_SEED, task=task))


def training_step_peak(model: SyntheticSegmenter, *, batch: int, task: MarkerTask) -> tuple[int, str]:
    """Allocator peak of one forward + backward at the training batch size, beyond the inputs.

    Runs on a copy: a training-mode step would move the trained model's BatchNorm running statistics.
    """
    images, labels = generate(batch, seed=VAL_SEED, task=task)
    state = StepState(copy.deepcopy(model).train(), (images,), (labels,),
                      loss=partial(F.cross_entropy, ignore_index=IGNORE_INDEX))
    peak, method = peak_bytes(lambda: training_step(state), "cpu")
    return peak, f"{method}, forward+backward, batch {batch}"


def checkpoint_path(out: Path, variant: str, seed: int, steps: int) -> Path:
    return out / "synthetic_checkpoints" / f"{variant}_seed{seed}_steps{steps}.pt"


def load_rows(csv_path: Path) -> pd.DataFrame:
    if not csv_path.exists():
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    frame = pd.read_csv(csv_path)
    missing = set(CSV_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path} lacks columns {sorted(missing)}; expected {list(CSV_COLUMNS)}")
    return frame


def _same_budget(rows: pd.DataFrame, settings: TrainSettings) -> pd.Series:
    """Rows trained with the steps, batch and training images of `settings`."""
    return ((rows["steps"] == settings.steps) & (rows["batch"] == settings.batch)
            & (rows["train_images"] == settings.train_images))


def run_ablation(
    *,
    out: Path,
    variants: tuple[str, ...],
    seeds: tuple[int, ...],
    settings: TrainSettings,
    force: bool = False,
    task: MarkerTask | None = None,
    progress=None,
) -> pd.DataFrame:
    """Train every (variant, seed) not yet in `out/synthetic_ablation.csv` (all when `force`), saving the
    CSV after each run so an interruption loses at most the run in progress. Returns the CSV's rows."""
    task = MarkerTask() if task is None else task
    for variant in variants:
        recurrence_of(variant)
    csv_path = out / CSV_NAME
    rows = load_rows(csv_path)
    if force:
        done = rows["variant"].isin(variants) & rows["seed"].isin(seeds) & _same_budget(rows, settings)
        rows = rows[~done]
    overall = progress.add_task("synthetic ablation", total=len(variants) * len(seeds)) if progress else None
    # FLOPs and the step's allocator peak depend on the variant, not on the seed or the weights: measured on
    # the first run of each variant in this process, reused for its other seeds.
    measured: dict[str, dict] = {}
    # Seed-major order: an interrupted run still has every variant for the first seeds.
    for seed in seeds:
        data = None
        for variant in variants:
            same_run = (rows["variant"] == variant) & (rows["seed"] == seed)
            already = same_run & _same_budget(rows, settings)
            if already.any():
                if progress:
                    progress.update(overall, advance=1)
                continue
            if data is None:  # generated once per seed, for all its variants
                data = seed_data(seed, settings=settings, task=task)
            model, row = train_one(variant, seed=seed, settings=settings, task=task, progress=progress, data=data)
            if variant not in measured:
                flops, flops_method = count_flops(model, height=task.size, width=task.size)
                peak, memory_method = training_step_peak(model, batch=settings.batch, task=task)
                measured[variant] = {"params": sum(parameter.numel() for parameter in model.parameters()),
                                     "flops": flops, "flops_method": flops_method, "peak_memory_bytes": peak,
                                     "memory_method": memory_method}
            row.update(measured[variant])
            atomic_torch_save(model.state_dict(), checkpoint_path(out, variant, seed, settings.steps))
            new = pd.DataFrame([{column: row[column] for column in CSV_COLUMNS}])
            # A run of this variant and seed with the same steps but another budget (batch, images) is replaced:
            # the checkpoint file, named by steps, now holds this one.
            rows = rows[~(same_run & (rows["steps"] == settings.steps))]
            rows = new if rows.empty else pd.concat([rows, new], ignore_index=True)
            write_csv_atomic(rows, csv_path)
            if progress:
                progress.update(overall, advance=1)
                progress.console.print(
                    f"{variant} seed {seed}: mIoU {row['miou']:.3f}, object accuracy "
                    f"{row['object_accuracy']:.3f}, {row['train_time_s']:.1f} s"
                )
    return rows


def plot_ablation(csv_path: Path, png_path: Path, *, num_objects: int = 4) -> None:
    """mIoU and object accuracy per variant (one dot per seed, bar = mean) from the CSV alone."""
    rows = load_rows(csv_path)
    if rows.empty:
        raise ValueError(f"{csv_path} has no rows to plot")
    steps = int(rows["steps"].max())
    rows = rows[rows["steps"] == steps]
    order = [variant for variant in VARIANTS if variant in set(rows["variant"])]
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, column, title in (
        (axes[0], "miou", "validation mIoU"), (axes[1], "object_accuracy", "object accuracy")
    ):
        means = [rows.loc[rows["variant"] == variant, column].mean() for variant in order]
        axis.bar(range(len(order)), means, color="#9ecae1", label="mean over seeds")
        for position, variant in enumerate(order):
            values = rows.loc[rows["variant"] == variant, column]
            axis.scatter([position] * len(values), values, color="#08519c", zorder=3, s=18,
                         label="one seed" if position == 0 else None)
        axis.set_xticks(range(len(order)), order)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel(title)
        axis.set_xlabel("context module (R = criss-cross recurrence)")
        if column == "object_accuracy":
            axis.axhline(1 / num_objects, color="grey", linestyle="--", label=f"chance (1/{num_objects})")
        axis.legend(loc="upper left", fontsize=8)
    seeds = rows["seed"].nunique()
    figure.suptitle(
        f"Synthetic marker task: {seeds} seed(s), {steps} steps each (answer off the criss-cross)"
    )
    figure.tight_layout()
    atomic_savefig(figure, png_path, dpi=110)
