"""The main job and what it leaves: `reproduce` (`nox -s reproduce`), `report` (results/*.csv ->
results/REPORT.md) and `plots` (figures rebuilt from the CSVs alone)."""
