"""Parity with the sources' own code (`python -m repro.parity`, `nox -s parity`): each source project runs in its
own virtual environment under `.nox/` (`common.ensure_venv`), a script of `peers/` drives its code on the same
weights, images and configs as ours, tensors come back through files, and every check becomes a row of
`results/parity.csv` (`common.ParityRow`). One module per source (`mmseg`, ...) exposes
`run(configs, *, quick, workdir) -> list[ParityRow]`; `cli` holds the registry."""
