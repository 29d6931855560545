"""The PyTorch profiler's own stderr lines, dropped.

Kineto (behind `torch.profiler`, which the CPU memory measurements use) writes a `USDT: ... profiler_start /
profiler_stop` pair and sometimes a "Memory block of unknown size" warning straight to file descriptor 2 on
every profiling session: dozens of lines per benchmark step, none of them an error. `quiet_profiler` drops
exactly those lines and passes every other one on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# Lines the PyTorch profiler (Kineto, used by the CPU memory measurements) writes straight to file descriptor 2
# on every profiling session: not errors, and dozens per step.
PROFILER_NOISE = (
    re.compile(r"^USDT:.*ActivityProfilerHandler"),
    re.compile(r"^\[W\d+ .*CPUAllocator\.cpp.*Memory block of unknown size was allocated before the profiling"),
    re.compile(r"^(STAGE:|\[W\d+ .*(profiler|kineto|Kineto))"),
)


@contextlib.contextmanager
def quiet_profiler(enabled: bool = True):
    """Drop the profiler's own stderr lines (`PROFILER_NOISE`) written while the block runs; every other line
    (warnings, tracebacks, subprocess output) is passed on, in order, when the block ends. Works at the file
    descriptor level, because Kineto writes from C++, not through `sys.stderr`."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", errors="replace").splitlines(keepends=True)
                    if not any(pattern.search(line) for pattern in PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
