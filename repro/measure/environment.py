"""What a result was measured with: library versions (the device itself is named by `repro.vocabulary`)."""

from __future__ import annotations

import platform

import torch


def versions() -> dict[str, str]:
    """torch, triton (or 'not installed') and Python versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}
