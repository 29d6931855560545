"""`python -m repro.claims [--out DIR]`: the paper's efficiency claims measured (`repro.measure.claims`), then
DIR/plots/claims_flops.png and DIR/plots/claims_memory.png drawn from the CSV (`repro.pipeline.plots`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from repro.measure.claims import measure, parse_args
from repro.pipeline.plots import plot_claims


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    csv_path, count = measure(args)
    plots = plot_claims(csv_path, args.out / "plots")
    print(f"wrote {csv_path} ({count} rows) and {', '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
