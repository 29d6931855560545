"""Stand-in for mmcv: only `mmcv.ops.CrissCrossAttention` (see ../README.md); peer venv only."""

__version__ = "0.0+ccrepro-standin"
