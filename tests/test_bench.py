"""The ops benchmark runs end to end on a tiny shape and never loses rows from other devices (CPU-only: the
device is pinned, so the Triton rows say why they were not measured on any machine)."""

import pandas as pd
import torch

from repro.io import upsert_csv
from repro.measure import bench
from repro.vocabulary import device_label


def test_quick_bench_writes_long_format_rows(tmp_path):
    out = tmp_path / "ops_bench.csv"
    foreign = pd.DataFrame([{**{k: "x" for k in bench.KEY}, "device": "cuda", "milliseconds": "1.0"}])
    upsert_csv(out, foreign, bench.KEY)
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out),
                       "--variants", "cca_naive", "cca_einsum", "cca_triton"]) == 0
    frame = pd.read_csv(out, keep_default_na=False, dtype=str)
    for column in ("op", "backend", "dtype", "batch", "channels", "qk_channels", "height", "width", "pass",
                   "milliseconds", "peak_memory_mb", "gb_per_s", "tflop_per_s", "device", "torch", "triton",
                   "date", "status"):
        assert column in frame.columns, column
    assert (frame["device"] == "cuda").sum() == 1  # the earlier row from another device is kept
    assert set(frame["device"]) == {"cuda", device_label("cpu")}
    ok = frame[frame["status"] == "ok"]
    assert set(ok["variant"]) == {"cca_naive", "cca_einsum"} and set(ok["pass"]) == set(bench.PASSES)
    assert (ok["milliseconds"].astype(float) > 0).all() and (ok["peak_memory_mb"].astype(float) > 0).all()
    triton_rows = frame[frame["variant"] == "cca_triton"]
    assert len(triton_rows) == 3 and triton_rows["status"].str.startswith("not measured").all()
    # A second run replaces its own rows instead of appending duplicates.
    bench.main(["--quick", "--device", "cpu", "--out", str(out), "--variants", "cca_naive"])
    again = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert len(again) == len(frame)


def test_upsert_replaces_by_key_and_keeps_the_rest(tmp_path):
    path = tmp_path / "t.csv"
    upsert_csv(path, pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "v": [10, 20]}), ["a", "b"])
    merged = upsert_csv(path, pd.DataFrame({"a": [2, 3], "b": ["y", "z"], "v": [21, 30]}), ["a", "b"])
    rows = sorted(map(tuple, merged.astype(str).values.tolist()))
    assert rows == [("1", "x", "10"), ("2", "y", "21"), ("3", "z", "30")]
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_restores_the_thread_count():
    from rich.console import Console

    threads = torch.get_num_threads()
    bench.run([bench.Shape(1, 4, 2, 3, 5)], ["cca_naive"], ["fp32"], torch.device("cpu"), rounds=1,
              threads=threads + 1, console=Console(quiet=True))
    assert torch.get_num_threads() == threads
