"""A generated segmentation task whose answer lies off the criss-cross path ("marker task").

Why it exists: the CCNet paper's central mechanism is that one criss-cross pass lets a pixel see only its
own row and column, while two passes reach the whole image. Without the real datasets we need a task where
that difference decides the score, so that R=0 and R=1 cannot solve it and R=2, R=3 and non-local can.

Layout (defaults): a `size` x `size` image (32 x 32) on a grid of `cell` x `cell` pixel cells (2 x 2, so
16 x 16 cells). Every image holds

* a square *marker* of `marker_cells` x `marker_cells` cells (6 x 6) painted in one of `num_objects` (4)
  marker colours; the colour *is* the class of the image's object. 6, not the 3 of the first
  prototype: the share of a pixel's two-hop attention that can land on the marker grows with its
  area (about 6/31 per hop at uniform attention on a 16-cell grid), and with 3 x 3 cells the small model's
  R=2 stayed at chance on most seeds of the tuning runs;
* one axis-aligned *rectangle* (`rect_min_cells` .. `rect_max_cells` cells a side, 2..5) painted in a colour
  drawn independently of the class from a separate palette, so the rectangle itself carries no class
  information. Rectangle colours are dim (a quarter of full intensity) and marker colours bright, so that
  "is this a marker" is one linear feature (brightness). At full intensity every marker colour is a
  channel-wise sub-pattern of some rectangle colours (red is inside magenta, white, orange), and in tuning
  runs the R=2 model then merged one marker colour into another and read only 3 of the 4 classes;
* background 0; every pixel gets Gaussian noise of std `noise` (0.05).

The marker and the rectangle are separated by at least `min_gap_cells` (4) empty cells along the rows
*and* along the columns: no row and no column of the grid crosses both. A model whose receptive field
before attention has radius r1 cells and after attention r2 cells, with r1 + r2 <= min_gap_cells, can
therefore not carry the marker's colour to the rectangle in one criss-cross pass (every path would have to
jump between two pixels that share neither a row nor a column), but can in two passes (marker -> the pixel
in the marker's row and the rectangle's column -> rectangle).

Labels (B, H, W) int64: 0 background, 1..num_objects the rectangle (its class = marker colour index + 1),
`IGNORE_INDEX` (255) on the marker, whose pixels have no class of their own.

Everything is a pure function of the seed: `generate(count=, seed=)` gives the same tensors on every call
and every machine (NumPy PCG64 generator, float32 arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = 255

# Marker colours: one per class. Saturated RGB corners, far apart from each other.
MARKER_COLOURS = np.array(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32
)
# Rectangle colours: drawn independently of the class, disjoint from the marker palette, dim (see above).
RECT_COLOURS = 0.25 * np.array(
    [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0]], dtype=np.float32
)


@dataclass(frozen=True)
class MarkerTask:
    """Parameters of the marker task (see the module docstring); validated on construction."""

    size: int = 32
    cell: int = 2
    num_objects: int = 4
    marker_cells: int = 6
    rect_min_cells: int = 2
    rect_max_cells: int = 5
    min_gap_cells: int = 4
    noise: float = 0.05

    def __post_init__(self) -> None:
        for name in ("size", "cell", "num_objects", "marker_cells", "rect_min_cells", "rect_max_cells"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MarkerTask.{name} must be a positive int, got {value!r}")
        if not isinstance(self.min_gap_cells, int) or self.min_gap_cells < 0:
            raise ValueError(f"MarkerTask.min_gap_cells must be an int >= 0, got {self.min_gap_cells!r}")
        if self.size % self.cell != 0:
            raise ValueError(f"MarkerTask.size ({self.size}) must be a multiple of cell ({self.cell})")
        if self.num_objects > len(MARKER_COLOURS):
            raise ValueError(
                f"MarkerTask.num_objects must be <= {len(MARKER_COLOURS)} (marker palette), "
                f"got {self.num_objects}"
            )
        if self.rect_min_cells > self.rect_max_cells:
            raise ValueError(
                f"MarkerTask.rect_min_cells ({self.rect_min_cells}) must be <= rect_max_cells "
                f"({self.rect_max_cells})"
            )
        needed = self.marker_cells + self.min_gap_cells + self.rect_max_cells
        if needed > self.grid:
            raise ValueError(
                f"marker_cells ({self.marker_cells}) + min_gap_cells ({self.min_gap_cells}) + rect_max_cells "
                f"({self.rect_max_cells}) = {needed} cells does not fit the {self.grid}-cell grid"
            )
        if not self.noise >= 0:
            raise ValueError(f"MarkerTask.noise must be >= 0, got {self.noise!r}")

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.size // self.cell

    @property
    def num_classes(self) -> int:
        """Background plus one class per marker colour."""
        return self.num_objects + 1


def _place_pair(rng: np.random.Generator, task: MarkerTask) -> tuple[int, int, int, int, int, int]:
    """Cell coordinates (marker row, marker col, rect row, rect col, rect height, rect width) such that
    marker and rectangle are >= min_gap_cells apart along rows and columns."""
    grid, marker, gap = task.grid, task.marker_cells, task.min_gap_cells
    height, width = (int(v) for v in rng.integers(task.rect_min_cells, task.rect_max_cells + 1, size=2))
    coords = []
    for extent in (height, width):
        # Which of the two comes first along this axis, then the marker's start, then the rectangle's.
        marker_first = bool(rng.integers(0, 2))
        first, second = (marker, extent) if marker_first else (extent, marker)
        start_first = int(rng.integers(0, grid - first - gap - second + 1))
        start_second = int(rng.integers(start_first + first + gap, grid - second + 1))
        coords.append((start_first, start_second) if marker_first else (start_second, start_first))
    (marker_row, rect_row), (marker_col, rect_col) = coords
    return marker_row, marker_col, rect_row, rect_col, height, width


def generate(count: int, *, seed: int, task: MarkerTask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images of the marker task, a pure function of `seed`.

    Returns:
        images: (N, 3, H, W) float32, values around [0, 1] plus noise.
        labels: (N, H, W) int64 in {0..num_objects, IGNORE_INDEX}.
    """
    task = MarkerTask() if task is None else task
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    grid, cell = task.grid, task.cell
    cell_rgb = np.zeros((count, grid, grid, 3), dtype=np.float32)
    cell_label = np.zeros((count, grid, grid), dtype=np.int64)
    classes = rng.integers(0, task.num_objects, size=count)
    rect_colours = rng.integers(0, len(RECT_COLOURS), size=count)
    for index in range(count):
        marker_row, marker_col, rect_row, rect_col, height, width = _place_pair(rng, task)
        rect = (index, slice(rect_row, rect_row + height), slice(rect_col, rect_col + width))
        mark = (index, slice(marker_row, marker_row + task.marker_cells),
                slice(marker_col, marker_col + task.marker_cells))
        cell_rgb[rect] = RECT_COLOURS[rect_colours[index]]
        cell_label[rect] = classes[index] + 1
        cell_rgb[mark] = MARKER_COLOURS[classes[index]]
        cell_label[mark] = IGNORE_INDEX
    # Cells -> pixels, then per-pixel noise so that no two images are identical.
    pixels = cell_rgb.repeat(cell, axis=1).repeat(cell, axis=2)
    # float32 draws: half the work of float64 ones and no conversion (generation was most of a short run's cost).
    pixels += task.noise * rng.standard_normal(size=pixels.shape, dtype=np.float32)
    labels = cell_label.repeat(cell, axis=1).repeat(cell, axis=2)
    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(np.ascontiguousarray(labels))


def object_classes(labels: torch.Tensor) -> torch.Tensor:
    """The class of each image's rectangle: (N, H, W) labels -> (N,) int64 (0 where there is none)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {tuple(labels.shape)}")
    valid = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
    return valid.flatten(1).amax(dim=1)
