"""`python -m repro.run`: the command line of `repro.engine.runner`."""

import sys

from repro.engine.runner import main

if __name__ == "__main__":
    sys.exit(main())
