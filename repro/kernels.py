"""`python -m repro.kernels`: the command line of `repro.measure.kernels` (counted traffic and work of the Triton
kernels in the interpreter, compiled resources for sm_80 / sm_90)."""

import sys

from repro.measure.kernels import main

if __name__ == "__main__":
    sys.exit(main())
