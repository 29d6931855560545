"""What a result was measured with: library versions (the device itself is named by `repro.vocabulary`)."""

from __future__ import annotations

import platform

import torch

from repro.vocabulary import cpu_model


def versions() -> dict[str, str]:
    """torch, triton (or 'not installed') and Python versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


# /proc/cpuinfo flags worth naming beside the model: they decide which matmul kernels MKL / oneDNN pick.
_CPU_FEATURES = (("avx512f", "avx512"), ("amx_tile", "amx"), ("avx2", "avx2"))


def cpu_label() -> str:
    """The host CPU for the `cpu` column of benchmark CSVs: the model and its vector extensions, e.g.
    `Intel(R) Xeon(R) Processor (avx512, amx)` or `AMD EPYC 7R13 Processor (avx2)` (model alone when the flags
    cannot be read)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    named = [name for flag, name in _CPU_FEATURES if flag in flags]
    if "avx512" in named:  # avx512 implies avx2; name the widest
        named.remove("avx2")
    return f"{cpu_model()} ({', '.join(named)})" if named else cpu_model()
