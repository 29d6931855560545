"""The recipe per source: how each source of the experiment rows trains and evaluates, read from the YAMLs
themselves.

Every recipe choice on which the sources differ is a required field of the experiment config (see
`repro.engine.config`), set in each YAML with a comment naming the line of the source's code it follows.
`recipe_table` collects those fields per source family (the official repository, mmsegmentation,
sssegmentation, ...) so a reader sees at a glance where the sources differ from each other, e.g. that
mmsegmentation averages the cross-entropy over all pixels of the crop and the official code over the labelled
ones. Nothing is typed by hand: the table is built from the configs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from repro.engine.config import ExperimentConfig, load_config

# (file-name prefix, source family); the first match wins, the empty prefix catches the official rows
# (`cityscapes_*`, `paper_ablation_*`), whose recipe is the official repository's.
FAMILIES = (
    ("mmseg_", "mmsegmentation"),
    ("ssseg_", "sssegmentation"),
    ("paddleseg_", "PaddleSeg"),
    ("", "official repository"),
)
# Column order of the table: the original code first.
DISPLAY_ORDER = ("official repository", "mmsegmentation", "sssegmentation", "PaddleSeg")
# (section, field, what it decides) in the order the table lists them.
RECIPE_FIELDS = (
    ("model", "stem", "ResNet stem"),
    ("data", "rescale", "random rescale rule"),
    ("data", "base_size", "keep-ratio bounds (long, short)"),
    ("data", "scale_range", "random ratio range"),
    ("data", "scale_step", "ratio step (none: continuous)"),
    ("data", "cat_max_ratio", "crop re-drawn while one class covers this share"),
    ("data", "crop_fallback", "crop after 10 rejected windows"),
    ("data", "photometric_distortion", "colour jitter"),
    ("data", "pad_position", "padding position"),
    ("train", "loss", "decode loss"),
    ("train", "loss_average", "cross-entropy averaged over"),
    ("train", "min_lr", "poly end learning rate"),
    ("train", "poly_horizon", "poly reaches min_lr at step"),
    ("data", "pad_fill", "training crop padded with"),
    ("eval", "mode", "single-scale prediction"),
    ("eval", "slide_pad", "window larger than the image"),
    ("eval", "scale", "test scale (long, short)"),
    ("eval", "val_pad_size", "validation image padded to (h, w)"),
    ("eval", "upsample", "logits to the label's size"),
    ("eval", "resize_align_corners", "align_corners of the logits' resizes"),
    ("eval", "zero_union", "class with zero union in the mean"),
    ("eval", "ms_scales", "multi-scale ratios"),
    ("eval", "ms_resize", "multi-scale view made by"),
    ("eval", "ms_average", "multi-scale views averaged as"),
    ("eval", "ms_average_at", "multi-scale views averaged at"),
)


def family_of(name: str) -> str:
    """The source family of the experiment `name` (by its file-name prefix)."""
    return next(family for prefix, family in FAMILIES if name.startswith(prefix))


def _text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def recipe_table(experiments: Path) -> pd.DataFrame:
    """One row per recipe field, one column per source family (DISPLAY_ORDER, those with configs): the
    distinct values the family's configs set, in order of first appearance, joined by " / "."""
    configs: list[ExperimentConfig] = [load_config(path) for path in sorted(Path(experiments).glob("*.yaml"))]
    families = [family for family in DISPLAY_ORDER if any(family_of(cfg.name) == family for cfg in configs)]
    rows = []
    for section, field, meaning in RECIPE_FIELDS:
        row = {"field": f"{section}.{field}", "decides": meaning}
        for family in families:
            values = [
                _text(getattr(getattr(cfg, section), field)) for cfg in configs if family_of(cfg.name) == family
            ]
            row[family] = " / ".join(dict.fromkeys(values))
        rows.append(row)
    return pd.DataFrame(rows, columns=["field", "decides", *families])


def section_recipes(experiments: Path, *, table: Callable[[pd.DataFrame], str]) -> str:
    """The report's "Recipe per source" section; `table` renders a frame (the report's markdown_table)."""
    intro = (
        "## Recipe per source\n\n"
        "How each source trains and evaluates its rows, read from the experiment configs (`experiments/*.yaml`, where each "
        "value carries a comment naming the line of the source's code it follows). Where a column lists "
        "several values, they differ between that source's datasets or crops.\n"
    )
    if not any(Path(experiments).glob("*.yaml")):
        return intro + "\n_(no experiment configs found)_\n"
    return intro + "\n" + table(recipe_table(experiments))
