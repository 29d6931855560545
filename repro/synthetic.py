"""The synthetic R=0/1/2/3/non-local ablation on the marker task (`repro.data.synthetic`).

`python -m repro.synthetic [--out results] [--quick | --full] [--force]` trains one small CCNet-style
segmenter per (variant, seed), evaluates it on a fixed validation set, and appends one row per run to
`results/synthetic_ablation.csv`; then draws `results/plots/synthetic_ablation.png` and the attention-reach
figure `results/plots/attention_reach.png` (see `repro.attention_reach`). Runs already in the CSV (same
variant, seed and number of steps) are not redone unless `--force`, so an interrupted ablation resumes.

The model keeps the CCNet structure at a toy scale: a two-conv backbone to output stride 2, then the RCCA
head's layout (3x3 conv "conva" -> context module -> 3x3 conv "convb" -> 3x3 "bottleneck" on
[features, context] -> dropout -> 1x1 classifier), nearest upsampling back to the image. The context module
is `ops.CrissCrossAttention` applied `recurrence` times with shared weights (R=0: none), or
`ops.NonLocal2d`.

Why a local head and not `models.heads.RCCAHead`: the task's separation property needs the receptive field
before attention (r1) plus after attention (r2), in cells, to stay within the task's gap. Here r1 = 2
(backbone 1, conva 1) and r2 = 2 (convb 1, bottleneck 1), and nearest (not bilinear) upsampling adds
nothing, so r1 + r2 = 4 = `MarkerTask.min_gap_cells`. `receptive_radius_cells()` states it and the tests
check with autograd that marker pixels have exactly zero influence on rectangle outputs for R=0 and R=1.

Why gamma starts at 1 (the paper and `ops` start it at 0): with gamma = 0 the attention branch receives
gradient only through gamma itself, and within this step budget R=2 stayed at chance (shared/NOTES.md);
starting at 1 makes the attention path carry signal from the first step. The comparison between variants
is unaffected: every attention variant starts the same way.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ops.cost import criss_cross_attention_cost
from ops.criss_cross import CrissCrossAttention
from ops.non_local import NonLocal2d
from repro.data.synthetic import IGNORE_INDEX, MarkerTask, generate, object_classes
from repro.io import atomic_savefig, atomic_torch_save, write_csv_atomic
from repro.memory import peak_bytes

VARIANTS = ("R0", "R1", "R2", "R3", "nonlocal")
CSV_NAME = "synthetic_ablation.csv"
CSV_COLUMNS = (
    "variant", "recurrence", "seed", "miou", "object_accuracy", "object_accuracy_by_class", "params", "flops",
    "flops_method", "peak_memory_bytes", "memory_method", "train_time_s", "steps", "batch", "train_images",
    "device", "threads", "date",
)
# Validation images come from a seed no training set uses, the same for every run.
VAL_SEED = 1_000_003
TRAIN_SEED_OFFSET = 10_000


def recurrence_of(variant: str) -> int | None:
    """R for "R0".."R3"; None for "nonlocal"."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; expected one of {VARIANTS}")
    return None if variant == "nonlocal" else int(variant[1:])


def _conv_bn_relu(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SyntheticSegmenter(nn.Module):
    """Small CCNet-style segmenter: (B, 3, H, W) images -> (B, num_classes, H, W) logits.

    Args:
        variant: one of VARIANTS ("R0".."R3": criss-cross attention applied R times with shared weights;
            "nonlocal": one non-local block).
        num_classes: output classes.
        channels: width of the backbone output and the head.
        qk_channels: query/key width of the attention. 32 (= channels), not the paper's channels / 8 = 4:
            with 8, R=2 stayed at chance on 2 of 2 seeds in 600 steps (unscaled energies of few channels
            start almost uniform over the 31 attended cells and learn to focus slowly).
        gamma_init: initial residual scale of the attention (1 here, see the module docstring).
        backend: criss-cross backend (see `ops.criss_cross_attention`).
        dropout: before the classifier; 0 here (the paper's 0.1 drops whole channels of a 32-channel map,
            which hides the weak marker signal the attention must first learn to amplify).
    """

    def __init__(
        self,
        *,
        variant: str,
        num_classes: int,
        channels: int = 32,
        qk_channels: int = 32,
        gamma_init: float = 1.0,
        backend: str = "naive",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.recurrence = recurrence_of(variant)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        # Backbone to output stride 2: one output cell per 2x2 task cell; receptive radius 1 cell.
        self.backbone = nn.Sequential(
            _conv_bn_relu(3, channels // 2), _conv_bn_relu(channels // 2, channels, stride=2)
        )
        self.conva = _conv_bn_relu(channels, channels)
        if variant == "nonlocal":
            self.context: nn.Module | None = NonLocal2d(channels, qk_channels=qk_channels, impl="naive")
        elif self.recurrence > 0:
            self.context = CrissCrossAttention(channels, qk_channels=qk_channels, backend=backend)
        else:
            self.context = None
        if self.context is not None:
            with torch.no_grad():
                self.context.gamma.fill_(gamma_init)
        self.convb = _conv_bn_relu(channels, channels)
        self.bottleneck = _conv_bn_relu(2 * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/2, W/2): the input of the context module."""
        return self.conva(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SyntheticSegmenter expects (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[2] % 2 or images.shape[3] % 2:
            raise ValueError(f"image height and width must be even, got {tuple(images.shape[2:])}")
        backbone = self.backbone(images)
        context = self.conva(backbone)
        if self.variant == "nonlocal":
            context = self.context(context)
        else:
            for _ in range(self.recurrence):
                context = self.context(context)
        context = self.convb(context)
        fused = self.bottleneck(torch.cat([backbone, context], dim=1))
        logits = self.classifier(self.dropout(fused))
        # Nearest, not bilinear: labels are constant on 2x2 cells, and bilinear would widen the receptive
        # field by one cell.
        return F.interpolate(logits, scale_factor=2, mode="nearest")


def receptive_radius_cells() -> tuple[int, int]:
    """(before attention, after attention) receptive radius of `SyntheticSegmenter` in task cells.

    Before: the stride-2 backbone reaches 1 cell, conva one more. After: convb and bottleneck one each.
    Their sum must not exceed `MarkerTask.min_gap_cells` for R=1 to be blind to the marker.
    """
    return 2, 2


def count_flops(model: SyntheticSegmenter, *, height: int, width: int) -> tuple[int, str]:
    """Forward FLOPs (2 x multiply-accumulates) of one (1, 3, height, width) image, and the method.

    torch's FlopCounterMode sees every conv and the non-local matmuls, but not the criss-cross op's
    matmuls (they run inside a custom autograd Function below the dispatcher it watches): those are added
    from the analytic `ops.cost` model, once per recurrence.
    """
    images = torch.zeros(1, 3, height, width)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    flops = counter.get_total_flops()
    method = "torch FlopCounterMode (2xMAC)"
    if model.variant != "nonlocal" and model.recurrence > 0:
        attention = model.context
        core = criss_cross_attention_cost(
            1, attention.qk_channels, attention.in_channels, height // 2, width // 2
        )
        flops += model.recurrence * core.flops
        method += " + ops.cost criss-cross core"
    return flops, method


def mean_iou(predictions: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> float:
    """Confusion-matrix mIoU over the classes that occur in labels or predictions (ignore 255)."""
    valid = labels != IGNORE_INDEX
    index = labels[valid] * num_classes + predictions[valid]
    confusion = torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    intersection = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean())


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
    """One training run's budget (Adam, one-cycle learning rate)."""

    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    train_images: int = 10_000
    val_images: int = 512

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "train_images", "val_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainSettings.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainSettings.lr must be > 0, got {self.lr!r}")


PRESETS = {
    "quick": (TrainSettings(steps=20, batch=8, train_images=256, val_images=64), (0,)),
    "default": (TrainSettings(), (0, 1)),
    "full": (TrainSettings(), (0, 1, 2, 3, 4)),
}


def train_one(
    variant: str, *, seed: int, settings: TrainSettings, task: MarkerTask, progress=None
) -> tuple[SyntheticSegmenter, dict]:
    """Train and evaluate one model; returns it and its CSV row (without FLOPs/memory)."""
    torch.manual_seed(seed)
    model = SyntheticSegmenter(variant=variant, num_classes=task.num_classes)
    train_x, train_y = generate(settings.train_images, seed=TRAIN_SEED_OFFSET + seed, task=task)
    val_x, val_y = generate(settings.val_images, seed=VAL_SEED, task=task)
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
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return model, row


def training_step_peak(model: SyntheticSegmenter, *, batch: int, task: MarkerTask) -> tuple[int, str]:
    """Allocator peak of one forward + backward at the training batch size, beyond the inputs.

    Runs on a copy: a training-mode step would move the trained model's BatchNorm running statistics.
    """
    images, labels = generate(batch, seed=VAL_SEED, task=task)
    model = copy.deepcopy(model).train()

    def step() -> None:
        loss = F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)
        loss.backward()

    peak, method = peak_bytes(step, "cpu")
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
        done = rows["variant"].isin(variants) & rows["seed"].isin(seeds) & (rows["steps"] == settings.steps)
        rows = rows[~done]
    overall = progress.add_task("synthetic ablation", total=len(variants) * len(seeds)) if progress else None
    # Seed-major order: an interrupted run still has every variant for the first seeds.
    for seed in seeds:
        for variant in variants:
            same_run = (rows["variant"] == variant) & (rows["seed"] == seed)
            already = same_run & (rows["steps"] == settings.steps)
            if already.any():
                if progress:
                    progress.update(overall, advance=1)
                continue
            model, row = train_one(variant, seed=seed, settings=settings, task=task, progress=progress)
            row["params"] = sum(parameter.numel() for parameter in model.parameters())
            row["flops"], row["flops_method"] = count_flops(model, height=task.size, width=task.size)
            row["peak_memory_bytes"], row["memory_method"] = training_step_peak(
                model, batch=settings.batch, task=task
            )
            atomic_torch_save(model.state_dict(), checkpoint_path(out, variant, seed, settings.steps))
            new = pd.DataFrame([{column: row[column] for column in CSV_COLUMNS}])
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(csv_path)
    if rows.empty:
        raise ValueError(f"{csv_path} has no rows to plot")
    steps = int(rows["steps"].max())
    rows = rows[rows["steps"] == steps]
    order = [variant for variant in VARIANTS if variant in set(rows["variant"])]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
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
    try:
        atomic_savefig(figure, png_path, dpi=110)
    finally:
        plt.close(figure)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default results)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny runs (tests, smoke checks)")
    size.add_argument("--full", action="store_true", help="5 seeds instead of 2")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; in the CSV)")
    parser.add_argument("--force", action="store_true", help="redo runs already in the CSV")
    parser.add_argument("--no-figures", action="store_true", help="skip the two plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from repro.attention_reach import plot_attention_reach

    args = _parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "full" if args.full else "default"
    settings, seeds = PRESETS[preset]
    if args.steps is not None:
        settings = TrainSettings(steps=args.steps, batch=settings.batch, lr=settings.lr,
                                 train_images=settings.train_images, val_images=settings.val_images)
    seeds = tuple(args.seeds) if args.seeds else seeds
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds must be >= 0, got {seeds}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        run_ablation(out=args.out, variants=tuple(args.variants), seeds=seeds, settings=settings,
                     force=args.force, progress=progress)
    if not args.no_figures:
        csv_path = args.out / CSV_NAME
        plot_ablation(csv_path, args.out / "plots" / "synthetic_ablation.png")
        plot_attention_reach(out=args.out, steps=settings.steps, seeds=seeds)
    print(f"wrote {args.out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
