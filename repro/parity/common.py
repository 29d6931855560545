"""The pieces every parity check shares: result rows, peer virtual environments, running a peer script.

A *peer* is a source project (mmsegmentation, sssegmentation, PaddleSeg) installed in its own virtual
environment under `.nox/peer-<name>-<version>/`; the project's own environment never imports it. A check runs a
script of `repro/parity/peers/` with the peer's python, the script writes `torch.save` dicts of plain tensors,
and the project side reads them back with `load_tensors` (`models.safe_load`, weights-only: no unpickling of
anything but tensors and containers).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models
from repro.io import atomic_write_text

COLUMNS = ("source", "version", "config", "check", "metric", "value", "tolerance", "verdict", "detail")
PEERS_DIR = Path(__file__).resolve().parent / "peers"
# The torch every peer venv gets first, pinned: an unpinned resolve by a peer's requirements would pull another
# (CUDA) build. Same build as the project's own (noxfile TORCH_SPEC), so both sides run the same kernels.
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
MARKER = "parity-installed.txt"
DEFAULT_ROOT = Path(".nox")


@dataclass(frozen=True)
class ParityRow:
    """One line of results/parity.csv. `verdict` is `pass`, `fail` or `not run: <reason>`."""

    source: str
    version: str
    config: str
    check: str
    metric: str
    value: str
    tolerance: str
    verdict: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in COLUMNS}


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.3g}"


def measured_row(
    *,
    source: str,
    version: str,
    config: str,
    check: str,
    metric: str,
    value: float,
    tolerance: float,
    detail: str = "",
    higher_is_better: bool = False,
) -> ParityRow:
    """A row from a measured `value` and its `tolerance`: pass when value <= tolerance (a difference), or value
    >= tolerance with `higher_is_better` (an agreement fraction). NaN always fails."""
    if isinstance(value, float) and math.isnan(value):
        ok = False
    else:
        ok = value >= tolerance if higher_is_better else value <= tolerance
    bound = (">= " if higher_is_better else "<= ") + _fmt(tolerance)
    return ParityRow(source, version, config, check, metric, _fmt(value), bound, "pass" if ok else "fail", detail)


def row_maker(source: str, version: str) -> Callable[..., ParityRow]:
    """`measured_row` with the source and version filled in: each source module's `_row(config, check, metric,
    value, tolerance, detail="", higher_is_better=False)`."""

    def row(config: str, check: str, metric: str, value: float, tolerance: float, detail: str = "",
            higher_is_better: bool = False) -> ParityRow:
        return measured_row(source=source, version=version, config=config, check=check, metric=metric, value=value,
                            tolerance=tolerance, detail=detail, higher_is_better=higher_is_better)

    return row


def not_run_row(*, source: str, version: str, config: str, check: str, reason: str) -> ParityRow:
    """A row for a check that could not run; the reason is one line."""
    reason = " ".join(str(reason).split())
    return ParityRow(source, version, config, check, "", "", "", f"not run: {reason}", "")


def is_pass(row: ParityRow) -> bool:
    return row.verdict == "pass"


# Wall seconds of each (source, config, check) computed in this process, in order; the CLI collects them per
# source process and writes them beside the CSV (`parity_timing.csv`) and in its summary.
TIMINGS: list[dict[str, object]] = []


@contextmanager
def timed(source: str, config: str, check: str) -> Iterator[None]:
    """Record the wall time of the block as one TIMINGS entry (also when it raises), and print it to stderr."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        TIMINGS.append({"source": source, "config": config, "check": check, "seconds": round(seconds, 2)})
        print(f"  {source} {config} {check}: {seconds:.1f} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- peer venvs


@dataclass(frozen=True)
class Peer:
    """A source project's environment: pip `requirements` installed after torch (TORCH_SPEC), with
    `pip_args` (e.g. "--no-deps" for packages whose declared dependencies cannot install here) applied to the
    `nodeps` list only."""

    name: str
    version: str
    requirements: tuple[str, ...]
    nodeps: tuple[str, ...] = ()
    # Further `pip install` calls after those, in order, each a tuple of arguments (e.g. a package that must be
    # built with --no-build-isolation against the torch already installed).
    extra_installs: tuple[tuple[str, ...], ...] = ()
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def key(self) -> str:
        return f"peer-{self.name}-{self.version}"


class PeerUnavailable(RuntimeError):
    """A peer cannot be installed or its script failed; the message is the reason (one line first)."""


def _tail(text: str, lines: int = 6) -> str:
    kept = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _pip(python: Path, args: Sequence[str], *, timeout: float) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"pip install {' '.join(args)} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        raise PeerUnavailable(f"pip install {' '.join(args)} failed: {_tail(done.stderr or done.stdout)}")


def _marker_text(peer: Peer) -> str:
    extra = [" ".join(args) for args in peer.extra_installs]
    return "\n".join([TORCH_SPEC, *peer.requirements, "--no-deps", *peer.nodeps, *extra]) + "\n"


def venv_dir(peer: Peer, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root).absolute() / peer.key


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_installed(peer: Peer, root: Path = DEFAULT_ROOT) -> bool:
    """True when the venv finished installing exactly this peer's requirement list (the marker file)."""
    marker = venv_dir(peer, root) / MARKER
    return marker.is_file() and marker.read_text() == _marker_text(peer) and venv_python(marker.parent).exists()


def ensure_venv(peer: Peer, root: Path = DEFAULT_ROOT, *, timeout: float = 1800.0) -> Path:
    """The python of `peer`'s venv, built on first use: `python -m venv`, torch (TORCH_SPEC), the requirements,
    then the marker written atomically; a venv without the marker (an interrupted install, changed
    requirements) is rebuilt from scratch. PeerUnavailable with pip's last lines when an install fails."""
    folder = venv_dir(peer, root)
    if is_installed(peer, root):
        return venv_python(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([peer.python, "-m", "venv", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        raise PeerUnavailable(f"python -m venv {folder} failed: {_tail(made.stderr)}")
    python = venv_python(folder)
    _pip(python, [TORCH_SPEC], timeout=timeout)
    if peer.requirements:
        _pip(python, list(peer.requirements), timeout=timeout)
    if peer.nodeps:
        _pip(python, ["--no-deps", *peer.nodeps], timeout=timeout)
    for args in peer.extra_installs:
        _pip(python, list(args), timeout=timeout)
    atomic_write_text(folder / MARKER, _marker_text(peer))
    return python


def run_peer(
    python: Path, script: Path, *args: Any, cwd: Path, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `script` with the peer's `python` (one thread, no access to the project's packages: PYTHONPATH is
    cleared so the peer never sees `repro`/`models`). PeerUnavailable with the stderr tail on failure."""
    environment = _peer_environment(env)
    command = [str(python), str(script), *map(str, args)]
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"{Path(script).name} ran over {timeout:.0f} s") from None
    except OSError as err:
        raise PeerUnavailable(f"cannot start {python}: {err}") from None
    if done.returncode != 0:
        raise PeerUnavailable(f"{Path(script).name} exited {done.returncode}: {_tail(done.stderr or done.stdout)}")
    return done


SERVE_DONE = "@@parity-done"  # the line a serving peer prints after each job: "@@parity-done ok" or "... error: MSG"


def _peer_environment(env: Mapping[str, str] | None) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    environment.update(env or {})
    return environment


class PeerServer:
    """One long-lived peer process that answers many jobs: `python SCRIPT serve` reads one JSON list of
    arguments per stdin line, runs them as its command line would (`peers/serve.py`), and prints `SERVE_DONE ok`
    (or `SERVE_DONE error: ...`) when done. The peer imports its source project (mmseg: 3 s of CPU, 10+ s on a
    loaded machine) once per source instead of once per check. The same environment as `run_peer` (one thread,
    no PYTHONPATH). A job that fails or runs over its timeout raises PeerUnavailable with the output's tail; a
    timed-out or dead process is replaced by a fresh one at the next call. Calls are serialised (a lock), so
    threads may share a server."""

    def __init__(self, python: Path, script: Path, *, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        self.python, self.script, self.cwd, self.env = Path(python), Path(script), Path(cwd), env
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        self.cwd.mkdir(parents=True, exist_ok=True)
        try:
            process = subprocess.Popen(
                [str(self.python), str(self.script), "serve"], cwd=self.cwd, env=_peer_environment(self.env),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        except OSError as err:
            raise PeerUnavailable(f"cannot start {self.python}: {err}") from None
        lines: queue.Queue = queue.Queue()

        def pump() -> None:  # stdout and stderr, line by line, until the process ends (then None)
            for line in process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self._process, self._lines = process, lines
        return process

    def call(self, *args: Any, timeout: float) -> list[str]:
        """Run one job (the script's command-line arguments); returns the lines it printed."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                process = self._start()
            try:
                process.stdin.write(json.dumps([str(a) for a in args]) + "\n")
                process.stdin.flush()
            except OSError as err:
                self.close()
                raise PeerUnavailable(f"{self.script.name} is not answering: {err}") from None
            deadline = time.monotonic() + timeout
            output: list[str] = []
            while True:
                try:
                    line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self.close()
                    raise PeerUnavailable(f"{self.script.name} {args[0] if args else ''} ran over "
                                          f"{timeout:.0f} s") from None
                if line is None:
                    status = process.wait()
                    self.close()
                    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
                    if status == -9:
                        how += " (SIGKILL: the kernel's out-of-memory killer, or a user)"
                    raise PeerUnavailable(f"{self.script.name} {how}: {_tail(chr(10).join(output))}")
                if line.startswith(SERVE_DONE):
                    status = line[len(SERVE_DONE):].strip()
                    if status != "ok":
                        raise PeerUnavailable(f"{self.script.name} {status}: {_tail(chr(10).join(output))}")
                    return output
                output.append(line)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.close()
                process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SERVERS: dict[tuple[str, str], PeerServer] = {}
_SERVERS_LOCK = threading.Lock()


def call_peer(python: Path, script: Path, *args: Any, cwd: Path, timeout: float) -> list[str]:
    """`run_peer` through the one PeerServer of (python, script) in this process, started at the first call
    (in `cwd`; every job names its files by absolute path). `close_peers` ends them all."""
    key = (str(python), str(script))
    with _SERVERS_LOCK:
        server = _SERVERS.get(key)
        if server is None:
            server = _SERVERS[key] = PeerServer(python, script, cwd=cwd)
    return server.call(*args, timeout=timeout)


def close_peers() -> None:
    """End every peer server of this process (a source's `run` calls it when done; also at exit)."""
    with _SERVERS_LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
    for server in servers:
        server.close()


atexit.register(close_peers)


def load_tensors(path: Path) -> dict[str, Any]:
    """A peer's output file: tensors and plain containers only (`models.safe_load`, weights_only)."""
    return models.safe_load(path, what="peer output")


# ------------------------------------------------------------------------------------------ peer registry

PEERS: dict[str, Peer] = {}


def register_peer(peer: Peer) -> Peer:
    PEERS[peer.name] = peer
    return peer
