"""`python -m repro.gpu [--tiny]`: the command line of `repro.pipeline.gpu` (the GPU acceptance run).

With `--tiny` (the CPU check) the Triton interpreter is switched on here, before anything imports triton
(importing the measurement modules does, through torch's memory tools)."""

import os
import sys

if __name__ == "__main__":
    if "--tiny" in sys.argv[1:]:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from repro.pipeline.gpu import main

    sys.exit(main())
