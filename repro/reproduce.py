"""`python -m repro.reproduce`: the command line of `repro.pipeline.reproduce`."""

import sys

from repro.pipeline.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
