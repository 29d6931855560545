"""The share of the CPU other processes took during a benchmark (repro.measure.contention)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro.measure import contention

STAT = """cpu  1000 50 200 5000 100 10 20 30 400 0
cpu0 500 25 100 2500 50 5 10 15 200 0
cpu1 500 25 100 2500 50 5 10 15 200 0
intr 12345
"""


def test_machine_times_count_steal_as_busy_and_guest_once():
    busy, total = contention.machine_times(STAT, 100.0)
    assert busy == pytest.approx((1000 + 50 + 200 + 10 + 20 + 30) / 100)  # guest (400) is inside user already
    assert total == pytest.approx(busy + (5000 + 100) / 100)
    with pytest.raises(ValueError, match="'cpu' line"):
        contention.machine_times("intr 1\n", 100.0)


def test_process_stat_with_spaces_and_parentheses_in_the_name():
    fields = ["S", "1", "2", "3", "0", "-1", "4194304", "10", "0", "0", "0", "250", "50", "0", "0"]
    text = f"4242 (python (a) b) {' '.join(fields)}\n"
    assert contention.process_stat_seconds(text, 100.0) == pytest.approx(3.0)


def test_other_share_is_what_the_benchmark_did_not_use():
    before = contention.CpuTimes(busy=10.0, total=40.0, own=5.0)
    assert contention.other_share(before, contention.CpuTimes(busy=14.0, total=48.0, own=8.0)) == pytest.approx(
        1 / 8)  # 4 s busy, 3 s ours, of 8 s
    assert contention.other_share(before, contention.CpuTimes(busy=13.0, total=48.0, own=9.0)) == 0.0  # clamped
    assert math.isnan(contention.other_share(None, before))
    assert math.isnan(contention.other_share(before, before))  # no time passed
    assert contention.busy_warning(0.31).startswith("warning: other processes took 31.0% of this machine's CPU")
    assert contention.busy_warning(contention.BUSY_WARNING) is None and contention.busy_warning(math.nan) is None
    assert contention.describe(0.0123) == "1.2%"
    assert contention.describe(math.nan) == contention.describe("") == contention.describe(None) == "not recorded"


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc")
def test_a_busy_process_shows_unless_it_is_counted_as_ours():
    """A child that spins is another process's CPU time; named in `pids`, it is the benchmark's own. Compared
    with the child's own CPU time over the same block, so it holds on any core count and under any load."""
    ticks = float(os.sysconf("SC_CLK_TCK"))
    spin = "import time\nend = time.time() + 4\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        child_before = contention.process_seconds(child.pid, ticks)
        start = contention.sample()
        with contention.CpuShare() as elsewhere, contention.CpuShare(pids=[child.pid]) as ours:
            time.sleep(1.5)
        end = contention.sample()
        child_cpu = contention.process_seconds(child.pid, ticks) - child_before
    finally:
        child.kill()
        child.wait()
    machine = end.total - start.total
    assert child_cpu > 0.2  # it ran
    assert elsewhere.value * machine >= child_cpu - 0.1  # the child is in the other share (ticks of 10 ms)
    assert ours.value <= elsewhere.value - (child_cpu - 0.1) / machine
    assert 0.0 <= ours.value <= 1.0
