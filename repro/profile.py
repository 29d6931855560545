"""`python -m repro.profile`: the command line of `repro.measure.profile`."""

import sys

from repro.measure.profile import main

if __name__ == "__main__":
    sys.exit(main())
