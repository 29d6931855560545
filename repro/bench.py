"""`python -m repro.bench`: the command line of `repro.measure.bench`."""

import sys

from repro.measure.bench import main

if __name__ == "__main__":
    sys.exit(main())
