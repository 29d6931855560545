"""`python -m repro.parity`: see `repro.parity.cli`."""

import sys

from repro.parity.cli import main

sys.exit(main())
