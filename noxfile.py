"""Sessions: `nox -s tests`, `nox -s reproduce` (the main job), `nox -s bench`, `nox -s gpu`, `nox -s parity`,
`nox -s lint`.

Virtual environments are reused between runs (torch is installed once). TORCH_SPEC picks the torch build:
the default `torch==2.13.0` is the CPU wheel on the project's CI machines and the CUDA wheel from PyPI on a
GPU machine.
"""

import os

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def _install(session: nox.Session, extras: str = "") -> None:
    # torch first and pinned: an unpinned resolve would pull the newest (CUDA) build.
    session.install(TORCH_SPEC)
    session.install("-e", f".{extras}")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (Triton kernels through the interpreter on CPU; every inference engine: the deploy extra)."""
    _install(session, "[test,deploy]")
    # One worker per core (pytest-xdist; tests/conftest.py gives each one torch thread). `--dist load`, not
    # loadgroup: with loadgroup a crashed worker's group was never rescheduled and the run hung (seen once).
    # pytest exits 5 when it collects nothing; nox fails on any non-zero exit.
    # The README's command (no arguments) records its pytest wall time and counts in results/tests_timing.csv
    # (tests/conftest.py; `python -m repro.reproduce timing` prints the README's sentence from it).
    env = {} if session.posargs else {"CCREPRO_TESTS_TIMING": "results/tests_timing.csv"}
    session.run("pytest", *(session.posargs or ["-q", "-n", "auto", "--dist", "load"]), env=env)


@nox.session
def reproduce(session: nox.Session) -> None:
    """The main job: everything of the reproduction that fits this machine, then results/REPORT.md."""
    _install(session)
    session.run("python", "-m", "repro.reproduce", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Operator benchmarks -> results/ops_bench.csv, then CCNet in torch / ONNX Runtime / OpenVINO ->
    results/inference_bench.csv (not part of the tests). `nox -s bench -- --quick` checks both quickly."""
    _install(session, "[deploy]")
    session.run("python", "-m", "repro.bench", *session.posargs)
    session.run("python", "-m", "repro.bench", "--inference", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """The whole GPU acceptance run on a CUDA machine (`python -m repro.gpu`): kernel correctness and op tests
    natively, benchmarks, claims memory, memory calibration, training speed -> results/, then REPORT.md.
    `nox -s gpu -- --tiny` runs the same code on the CPU at tiny sizes into a temporary folder."""
    # pytest: the operator tests run on the GPU as part of the acceptance; deploy: the export step (its GPU
    # check runs where onnxruntime-gpu or TensorRT is installed in the session, e.g. `session.install` by hand).
    _install(session, "[test,deploy]")
    session.run("python", "-m", "repro.gpu", *session.posargs)


@nox.session
def parity(session: nox.Session) -> None:
    """Parity with the sources' own code (`python -m repro.parity`): one venv per source under `.nox/`, built on
    first use and reused -> results/parity.csv. `nox -s parity -- --quick` checks one row per source."""
    _install(session)
    session.run("python", "-m", "repro.parity", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
