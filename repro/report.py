"""`python -m repro.report`: the command line of `repro.pipeline.report`."""

import sys

from repro.pipeline.report import main

if __name__ == "__main__":
    sys.exit(main())
