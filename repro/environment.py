"""What a result was measured on: device name, thread count, library versions."""

from __future__ import annotations

import platform
from functools import cache

import torch


@cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A human-readable name: the GPU model for CUDA devices, the CPU model otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def versions() -> dict[str, str]:
    """torch, triton (or 'not installed') and Python versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}
