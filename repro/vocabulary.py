"""The project's one vocabulary: how every CSV and the report name op variants and devices, and how every
command names checkpoint layouts, exit codes and errors.

Op variants (the `variant` column of ops_bench.csv and claims.csv, a row family per STYLE.md):
`{op}_{implementation}` with op `cca` (criss-cross attention, `ops.criss_cross_attention`) or `non_local`
(`ops.non_local_attention` / `ops.NonLocal2d`). A criss-cross variant with recurrence R is labelled
`cca_naive R=2` where a label is needed; the name itself never carries R (that is the `recurrence` column).
Model-level names are the config's: heads `rcca`, `nonlocal`, `fcn` (`models.HEADS`), synthetic variants
`R0`..`R3`, `nonlocal` (`models.synthetic.VARIANTS`).

Devices (the `device` column of every CSV): `"<type>: <model>"`, e.g. `cpu: AMD EPYC 7B13` or
`cuda: NVIDIA H200`, with ` x<N>` appended for N data-parallel processes; numbers that were counted, not
run, say so in the same form: `counted: any device`, `traced: FakeTensorMode on cpu`.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

from models.checkpoints import SOURCES as MODEL_SOURCES

CCA_IMPLEMENTATIONS = ("naive", "einsum", "triton")
NON_LOCAL_IMPLEMENTATIONS = ("naive", "sdpa", "sdpa_heads")
OP_VARIANTS = tuple(
    [f"cca_{impl}" for impl in CCA_IMPLEMENTATIONS] + [f"non_local_{impl}" for impl in NON_LOCAL_IMPLEMENTATIONS]
)

DEVICE_COUNTED = "counted: any device"
DEVICE_TRACED = "traced: FakeTensorMode on cpu"


def op_variant(op: str, implementation: str) -> str:
    """The variant name of `op` ("cca" or "non_local") in `implementation`; raises on unknown names."""
    name = f"{op}_{implementation}"
    if name not in OP_VARIANTS:
        raise ValueError(f"unknown op variant {name!r} (op {op!r}, implementation {implementation!r}); "
                         f"expected one of {OP_VARIANTS}")
    return name


def split_variant(name: str) -> tuple[str, str]:
    """(op, implementation) of a variant name from OP_VARIANTS."""
    if name not in OP_VARIANTS:
        raise ValueError(f"unknown op variant {name!r}; expected one of {OP_VARIANTS}")
    op = "cca" if name.startswith("cca_") else "non_local"
    return op, name.removeprefix(f"{op}_")


def variant_label(name: str, recurrence: int | None = None) -> str:
    """`cca_naive R=2` for criss-cross variants, the bare name otherwise."""
    op, _ = split_variant(name)
    return f"{name} R={recurrence}" if op == "cca" and recurrence is not None else name


@cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device | str) -> str:
    """The hardware's model: the GPU's for CUDA devices, the CPU's otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_label(device: torch.device | str, *, processes: int = 1) -> str:
    """`"<type>: <model>"` (plus ` x<processes>` when several), the `device` column of every CSV."""
    device = torch.device(device)
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    label = f"{device.type}: {device_name(device)}"
    return f"{label} x{processes}" if processes > 1 else label


# ---------------------------------------------------------------------------------------------------------
# Command lines: exit codes, error lines, checkpoint sources (every `python -m repro.X` uses these).

# Exit codes of every command (README "Reproducing a row of the published tables").
EXIT_OK = 0
EXIT_CONFIG = 2  # a config file, override or command-line option that cannot be used (argparse's own code too)
EXIT_NO_DATA = 3  # the dataset (or the ImageNet backbone a training run needs) is not there
EXIT_BAD_INPUT = 4  # a checkpoint, image, label or results CSV that cannot be used
EXIT_CANNOT_WRITE = 5  # a file that cannot be written, or a run folder that would be overwritten
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_CONFIG: "config or option error",
    EXIT_NO_DATA: "dataset not found",
    EXIT_BAD_INPUT: "unusable input file",
    EXIT_CANNOT_WRITE: "cannot write",
}

# Layouts of a checkpoint file (`models.SOURCES`). "ccrepro" is this project's own (a `repro.run` training
# checkpoint or a plain state dict of ours); "ours" is accepted for it everywhere.
CHECKPOINT_SOURCE_ALIASES = {"ours": "ccrepro"}


# Every name `--checkpoint-source` accepts: the layouts of `models.SOURCES` (ccrepro first), then the aliases.
CHECKPOINT_SOURCES = ("ccrepro",) + tuple(s for s in MODEL_SOURCES if s != "ccrepro") + tuple(CHECKPOINT_SOURCE_ALIASES)


def checkpoint_source(name: str | None) -> str | None:
    """The `models.SOURCES` layout a `--checkpoint-source` value names (None: detect from the keys)."""
    if name is None:
        return None
    name = CHECKPOINT_SOURCE_ALIASES.get(name, name)
    if name not in CHECKPOINT_SOURCES:
        raise ValueError(f"unknown checkpoint source {name!r}; expected one of {CHECKPOINT_SOURCES}")
    return name


def error_line(prog: str, message: str) -> str:
    """The one line a command prints on stderr before a non-zero exit: `PROG: error: MESSAGE` (argparse's form,
    so a bad option and a bad file read alike)."""
    text = " ".join(str(message).split())
    return f"{prog}: error: {text}"


def display_path(text: str, root: Path | None = None) -> str:
    """`text` relative to `root` (default: the working folder) when it is an absolute path inside it, else as
    given: what status CSVs and console lines show, never one machine's absolute paths."""
    path = Path(text)
    if not path.is_absolute():
        return text
    try:
        return path.relative_to(Path.cwd() if root is None else root).as_posix()
    except ValueError:
        return text
