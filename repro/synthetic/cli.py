"""`python -m repro.synthetic [--out results] [--quick | --full] [--force]`: the ablation, then its figures.

Trains every (variant, seed) not yet in `results/synthetic_ablation.csv` (`repro.synthetic.ablation`), then
draws `results/plots/synthetic_ablation.png` and the attention-reach figure (`repro.synthetic.reach`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.synthetic import VARIANTS
from repro.synthetic.ablation import CSV_NAME, PRESETS, TrainSettings, plot_ablation, run_ablation
from repro.synthetic.reach import plot_attention_reach


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default results)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny runs (tests, smoke checks)")
    size.add_argument("--full", action="store_true", help="5 seeds instead of 3")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to train (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; in the CSV)")
    parser.add_argument("--force", action="store_true", help="redo runs already in the CSV")
    parser.add_argument("--no-figures", action="store_true", help="skip the two plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
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
