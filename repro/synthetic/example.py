"""`python -m repro.synthetic.example [--out results] [--quick | --full]`: one worked example of
`python -m repro.predict` on the trained synthetic R=2 model.

Writes a validation image of the marker task to `RESULTS/predict_example/marker_example.png`, then predicts
it through the same code as the command line (`repro.engine.predict.predict_to_folder`): the colour label map,
the overlay, the legend, and the attention of a pixel at the centre of the rectangle after one and two
criss-cross passes. The rectangle's class is the marker's colour, and the marker shares no row or column with
the rectangle, so the first pass puts exactly none of the pixel's attention on the marker and the second
reaches it (see `repro.synthetic.data`). Classes are drawn in their marker's colour, background in grey.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.engine.config import EvalConfig
from repro.engine.data.palettes import Palette
from repro.engine.predict import Predictor, predict_to_folder
from repro.io import atomic_write_bytes
from repro.synthetic.ablation import PRESETS, VAL_SEED
from repro.synthetic.data import IGNORE_INDEX, MARKER_COLOURS, MarkerTask, generate
from repro.synthetic.reach import load_trained_r2

FOLDER = "predict_example"
IMAGE_NAME = "marker_example"


def synthetic_palette(task: MarkerTask) -> Palette:
    """Background grey, class k in the colour of the marker that stands for it."""
    colours = np.vstack([[[96, 96, 96]], np.round(MARKER_COLOURS[: task.num_objects] * 255)]).astype(np.uint8)
    names = ("background", *(f"object {k} (marker colour {k})" for k in range(1, task.num_objects + 1)))
    return Palette("synthetic", names, colours)


def write_example(*, out: Path, steps: int, seeds: tuple[int, ...], progress: bool = True) -> list[Path]:
    """Write the example under `out / FOLDER`; returns the prediction files."""
    task = MarkerTask()
    model, checkpoint, seed = load_trained_r2(out=out, steps=steps, seeds=seeds, task=task)
    images, labels = generate(1, seed=VAL_SEED, task=task)
    folder = out / FOLDER
    pixels = np.round(images[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    image_path = atomic_write_bytes(folder / f"{IMAGE_NAME}.png", buffer.getvalue())
    # The pixel at the top-left of the rectangle's central cell, as `repro.synthetic.reach` picks it.
    cells = labels[0, :: task.cell, :: task.cell]
    rect = torch.nonzero((cells > 0) & (cells != IGNORE_INDEX))
    row, col = (int(v) for v in rect.float().mean(0).round())
    predictor = Predictor(
        model=model, palette=synthetic_palette(task), eval_cfg=EvalConfig.native_whole(), mode="whole",
        # Trained on images in [0, 1]: the PNG's 0..255 divided by 255.
        mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0), channel_order="rgb", device=torch.device("cpu"),
        title=f"synthetic R=2 model (seed {seed}, {steps} steps), {checkpoint.name}",
    )
    return predict_to_folder(predictor, [image_path], folder, points_xy=[(col * task.cell, row * task.cell)],
                             progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.synthetic.example", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default results)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the model of the quick preset")
    size.add_argument("--full", action="store_true", help="the model of the full preset")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings, seeds = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    written = write_example(out=args.out, steps=settings.steps, seeds=seeds, progress=False)
    print(f"wrote {len(written)} files to {args.out / FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
