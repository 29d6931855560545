"""Test-session setup and the device the operator tests run on.

The Triton kernels are checked on CPU through the Triton interpreter, which must be switched on before
triton is first imported; on a machine with a CUDA device the kernels run natively instead (an exported
TRITON_INTERPRET=1 is refused there), and the operator tests run on it (the `op_device` fixture). CPU-only
tests pin `torch.device("cpu")` themselves. `tests/test_device.py` checks this logic with CUDA faked.
"""

import faulthandler
import os
import signal
import time

import pytest
import torch


def op_device_for(cuda_available: bool) -> torch.device:
    """The device of the operator tests: CUDA when present (kernels run natively), else the CPU, where the
    Triton kernels run in the interpreter."""
    return torch.device("cuda" if cuda_available else "cpu")


def interpreter_setting(cuda_available: bool, environ: dict) -> str | None:
    """The TRITON_INTERPRET value the session needs ("1" without CUDA, None: leave it unset with CUDA);
    raises when CUDA is present but the interpreter was exported (the kernels would not run natively)."""
    if not cuda_available:
        return "1"
    if environ.get("TRITON_INTERPRET", "0") == "1":
        raise pytest.UsageError("TRITON_INTERPRET=1 is set on a machine with CUDA: the Triton kernels would run in "
                                "the interpreter instead of natively. Unset it to run the suite.")
    return None


CUDA = torch.cuda.is_available()

if interpreter_setting(CUDA, dict(os.environ)) is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep runs repeatable and avoid oversubscribing small CI machines. Under pytest-xdist (`nox -s tests` runs
# `-n auto`: one worker per core) every worker is one process on one core: one torch thread each, and the same
# for the Python subprocesses the tests start (OMP_NUM_THREADS is read by torch when they import it).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def worker_threads(worker: str | None, available: int) -> int:
    """torch threads of this test process: 1 in an xdist worker, else up to 2."""
    return 1 if worker else min(2, available)


if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(worker_threads(XDIST_WORKER, torch.get_num_threads()))

# A test process that dies leaves xdist only "node down: Not properly terminated". pytest's faulthandler already
# prints a crash (segfault, abort); a SIGTERM or SIGHUP from outside (another job's `pkill`, a CI runner) kills
# silently, so name it: every thread's stack on stderr, then the default action (the process still ends).
# Registered again before each test: an in-process `repro.run` main() installs and then restores its own handler.
@pytest.fixture(autouse=True)
def _name_a_killing_signal():
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            faulthandler.register(signum, all_threads=True, chain=True)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    """Long tests (marker `slow`) first, each module's in its order: under pytest-xdist's load scheduling the
    workers then end close together, instead of one running a minute-long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


_SESSION_STARTED = time.perf_counter()


def pytest_sessionstart(session):  # noqa: ARG001 - pytest's hook signature
    global _SESSION_STARTED
    _SESSION_STARTED = time.perf_counter()


def pytest_sessionfinish(session, exitstatus):
    """With CCREPRO_TESTS_TIMING set (`nox -s tests` sets it), the controlling process appends the run's pytest
    wall time and counts to that CSV (repro.measure.suite_timing)."""
    if XDIST_WORKER:
        return
    from repro.measure.suite_timing import ENV_VAR, record

    target = os.environ.get(ENV_VAR)
    if not target:
        return

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter is not None else {}
    counts = {"passed": len(stats.get("passed", [])), "failed": len(stats.get("failed", [])),
              "skipped": len(stats.get("skipped", [])), "errors": len(stats.get("error", []))}
    workers = getattr(session.config.option, "numprocesses", None)
    try:
        record(target, seconds=time.perf_counter() - _SESSION_STARTED, counts=counts,
               workers=workers if isinstance(workers, int) and workers > 0 else 1, exit_status=int(exitstatus))
    except (OSError, ValueError) as err:  # bookkeeping: never turns the suite's verdict into an internal error
        print(f"\nwarning: cannot record the suite's timing in {target}: {err}")


def op_device_name() -> str:
    """What the operator tests run on: "cuda" natively, or "cpu (Triton interpreter)"."""
    return "cuda" if CUDA else "cpu (Triton interpreter)"


@pytest.fixture
def op_device() -> torch.device:
    """The device of the operator tests (see `op_device_for`)."""
    return op_device_for(CUDA)
