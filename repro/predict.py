"""`python -m repro.predict`: the command line of `repro.engine.predict`."""

import sys

from repro.engine.predict import main

if __name__ == "__main__":
    sys.exit(main())
