"""The serving loop every peer script shares (runs ONLY in a peer venv; never imports the project).

`python SCRIPT serve` keeps the source project imported and answers jobs: each stdin line is a JSON list of the
arguments the script's command line takes; `main(arguments)` runs them, then one line `@@parity-done ok` (or
`@@parity-done error: <type>: <message>` after the traceback) ends the job's output. The project side is
`repro.parity.common.PeerServer`; the marker is its SERVE_DONE.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable

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
        sys.stderr.flush()
        print(f"{DONE} {result}", flush=True)
    return 0
