"""`repro.pipeline.drift`: this run's CSVs against the committed reference, with a tolerance per metric."""

import pandas as pd

from repro.pipeline import drift


def _claims(value_flops: float, value_mib: float, extra: bool = False) -> pd.DataFrame:
    base = {"claim": "c", "variant": "cca_naive", "recurrence": 2, "batch": 1, "channels": 512, "qk_channels": 64,
            "height": 97, "width": 97, "method": "m"}
    rows = [dict(base, metric="flops", value=value_flops, unit="GFLOP"),
            dict(base, metric="peak", value=value_mib, unit="MiB"),
            dict(base, metric="fps", value=1.0 if extra else 9.0, unit="images/s")]
    if extra:
        rows.append(dict(base, metric="new_metric", value=1.0, unit="ratio"))
    return pd.DataFrame(rows)


def test_tolerance_follows_the_unit(tmp_path):
    results = tmp_path / "results"
    (results / drift.REFERENCE_DIR).mkdir(parents=True)
    _claims(16.516483328, 100.0).to_csv(results / drift.REFERENCE_DIR / "claims.csv", index=False)
    _claims(16.516483328, 104.0, extra=True).to_csv(results / "claims.csv", index=False)
    table = drift.compare(results).set_index("metric")
    assert table.loc["flops", "status"] == drift.WITHIN and table.loc["flops", "tolerance"] == "1e-06 relative"
    assert table.loc["peak", "status"] == drift.WITHIN  # 4% of a memory figure
    assert table.loc["fps", "status"] == drift.TIMING  # wall clock: 9 -> 1 is not a drift
    assert table.loc["new_metric", "status"] == drift.NEW
    _claims(16.6, 110.0).to_csv(results / "claims.csv", index=False)
    table = drift.compare(results).set_index("metric")
    assert table.loc["flops", "status"] == drift.DRIFTED and table.loc["peak", "status"] == drift.DRIFTED
    assert abs(table.loc["peak", "difference"] - 10.0) < 1e-9


def test_missing_run_and_missing_reference(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    assert drift.compare(results) is None  # nothing rerun in this checkout
    (results / drift.REFERENCE_DIR).mkdir(parents=True)
    frame = pd.DataFrame({"variant": ["R2"], "seed": [0], "steps": [600], "miou": [1.0], "object_accuracy": [1.0],
                          "params": [10], "flops": [20], "peak_memory_bytes": [2**20], "train_time_s": [3.0]})
    frame.to_csv(results / drift.REFERENCE_DIR / "synthetic_ablation.csv", index=False)
    table = drift.compare(results)  # the step did not produce its CSV this time
    assert set(table["status"]) == {drift.GONE}
    frame.assign(miou=0.96, train_time_s=30.0).to_csv(results / "synthetic_ablation.csv", index=False)
    table = drift.compare(results).set_index("metric")
    assert table.loc["miou", "status"] == drift.WITHIN  # 0.04 <= 0.05 absolute
    assert table.loc["train_time_s", "status"] == drift.TIMING
