"""How much of the CPU something other than the benchmark took while it ran.

A timing is only a clean comparison when nothing else competed for the cores. `CpuShare` measures that over a
block: from the kernel's whole-machine counters (/proc/stat: user, nice, system, irq, softirq and steal, the
time the hypervisor gave to other guests) it subtracts the CPU time of this process (all its threads,
`os.times()`) and of the given process ids (a peer subprocess that is part of the measurement), and divides
by the machine's total CPU time over the block (wall time x cores):

    with CpuShare(pids=[peer.pid]) as share:
        ... timed rounds ...
    share.value   # 0.0 quiet .. 1.0 every core busy elsewhere; NaN where /proc is not readable

A share of 0.5 on a 2-core machine is one core kept busy by another process for the whole block. Hyperthread
siblings and memory bandwidth shared with other guests are not visible here; steal time is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# Above this share of the machine, both inference benchmarks warn that the case's timings compare variants that
# did not run on the same machine: another process took a noticeable part of the cores.
BUSY_WARNING = 0.05


@dataclass(frozen=True)
class CpuTimes:
    """Seconds: busy CPU time of the whole machine, its total CPU time (busy + idle + iowait), and the CPU
    time of the processes counted as the benchmark's own."""

    busy: float
    total: float
    own: float


def machine_times(text: str, ticks_per_second: float) -> tuple[float, float]:
    """(busy, total) seconds from the text of /proc/stat (its aggregate `cpu` line). guest time is part of
    user already, so it is not added again."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]] + [0] * 8
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            busy = user + nice + system + irq + softirq + steal
            return busy / ticks_per_second, (busy + idle + iowait) / ticks_per_second
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def process_stat_seconds(text: str, ticks_per_second: float) -> float:
    """User + system seconds (all threads) from the text of /proc/PID/stat: fields 14 and 15, counted after
    the command name, which is in parentheses and may itself hold spaces and parentheses."""
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def process_seconds(pid: int, ticks_per_second: float) -> float:
    """User + system seconds of process `pid` (all its threads); 0.0 once it has gone."""
    try:
        return process_stat_seconds(Path(f"/proc/{pid}/stat").read_text(), ticks_per_second)
    except OSError:
        return 0.0


def sample(pids: Iterable[int] = ()) -> CpuTimes | None:
    """The counters now; None where /proc/stat cannot be read (not Linux)."""
    try:
        text = PROC_STAT.read_text()
        ticks = float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):
        return None
    busy, total = machine_times(text, ticks)
    times = os.times()
    own = times.user + times.system + sum(process_seconds(pid, ticks) for pid in pids)
    return CpuTimes(busy=busy, total=total, own=own)


def other_share(before: CpuTimes | None, after: CpuTimes | None) -> float:
    """The share of the machine's CPU time between two samples that was not the benchmark's own, in [0, 1];
    NaN when a sample is missing or no time passed."""
    if before is None or after is None:
        return math.nan
    total = after.total - before.total
    if total <= 0:
        return math.nan
    other = (after.busy - before.busy) - (after.own - before.own)
    return min(max(other / total, 0.0), 1.0)


class CpuShare:
    """`.value` is `other_share` between `start()` and `stop()`, or over a `with` block (see the module
    docstring); NaN until stopped. `pids` are processes whose CPU time counts as the benchmark's own (they must
    still run when it stops)."""

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = tuple(pids)
        self.value = math.nan
        self._before: CpuTimes | None = None

    def start(self) -> None:
        self._before = sample(self.pids)

    def stop(self) -> float:
        self.value = other_share(self._before, sample(self.pids))
        return self.value

    def __enter__(self) -> CpuShare:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def busy_warning(share: float) -> str | None:
    """The warning a benchmark prints for a case whose `share` exceeds BUSY_WARNING; None otherwise."""
    if not share > BUSY_WARNING:  # NaN (not measured) warns of nothing
        return None
    return (f"warning: other processes took {describe(share)} of this machine's CPU time during these rounds; "
            "the timings of this case are not a clean comparison (see the other_cpu_share column)")


def describe(share: float) -> str:
    """ "0.7%" / "not recorded" for a share (NaN / missing)."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        return "not recorded"
    return "not recorded" if math.isnan(value) else f"{100 * value:.1f}%"
