"""`python -m repro.synthetic`: see `repro.synthetic.cli`."""

import sys

from repro.synthetic.cli import main

sys.exit(main())
