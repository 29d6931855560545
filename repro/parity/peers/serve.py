"""What the peer scripts share (runs ONLY in a peer venv; never imports the project): the serving loop, the
`COMMAND JOB.json | serve` command line of the mmseg peers, and their SyncBN -> BN config rewrite.

`python SCRIPT serve` keeps the source project imported and answers jobs: each stdin line is a JSON list of the
arguments the script's command line takes; `main(arguments)` runs them, then one line `@@parity-done ok` (or
`@@parity-done error: <type>: <message>` after the traceback) ends the job's output. The project side is
`repro.parity.common.PeerServer`; the marker is its SERVE_DONE.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

DONE = "@@parity-done"


def serve(main: Callable[[list[str]], int | None]) -> int:
    """Answer jobs until stdin closes. `main` gets the arguments after the script name and returns an exit
    status (0 / None: ok)."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            status = main(["serve-job", *json.loads(line)])
            result = "ok" if not status else f"error: exit status {status}"
        except SystemExit as err:
            result = "ok" if not err.code else f"error: exit {err.code}"
        except Exception as err:  # noqa: BLE001 - reported to the project side, the server keeps serving
            traceback.print_exc()
            result = f"error: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        release_memory()
        sys.stderr.flush()
        print(f"{DONE} {result}", flush=True)
    return 0


def release_memory() -> None:
    """Give the freed heap back to the system between jobs: glibc keeps freed blocks under its (dynamically
    raised) mmap threshold, and a server that built 20 R-101 models held 4.5 GB it no longer used."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def command_line(script: str, commands: dict[str, Callable[[dict], None]], argv: list[str] | None = None) -> int:
    """`script COMMAND JOB.json` (the job a JSON file) or `script serve` (such arguments, one job per line)."""

    def main(args: list[str]) -> int:
        if len(args) != 3 or args[1] not in commands:
            sys.exit(f"usage: {script} {{{','.join(commands)}}} JOB.json | {script} serve")
        commands[args[1]](json.loads(Path(args[2]).read_text()))
        return 0

    argv = sys.argv if argv is None else argv
    return serve(main) if argv[1:] == ["serve"] else main(argv)


def no_sync_bn(node):
    """A config tree with every SyncBN norm as BN: SyncBN needs a process group; one process computes the same
    batch statistics with BN."""
    if isinstance(node, dict):
        return {k: ("BN" if k == "type" and v == "SyncBN" else no_sync_bn(v)) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(no_sync_bn(v) for v in node)
    return node
