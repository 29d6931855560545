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


def test_upsert_puts_a_new_column_where_the_writer_lists_it(tmp_path):
    path = tmp_path / "t.csv"
    upsert_csv(path, pd.DataFrame({"a": [1], "v": [10], "date": ["d"]}), ["a"])  # written before "share" existed
    upsert_csv(path, pd.DataFrame({"a": [2], "v": [20], "share": [0.5], "date": ["e"]}), ["a"],
               columns=["a", "v", "share", "date"])
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert list(frame.columns) == ["a", "v", "share", "date"]
    assert frame.to_dict("records") == [{"a": "1", "v": "10", "share": "", "date": "d"},
                                        {"a": "2", "v": "20", "share": "0.5", "date": "e"}]


def test_run_restores_the_thread_count():
    from rich.console import Console

    threads = torch.get_num_threads()
    bench.run([bench.Shape(1, 4, 2, 3, 5)], ["cca_naive"], ["fp32"], torch.device("cpu"), rounds=1,
              threads=threads + 1, console=Console(quiet=True))
    assert torch.get_num_threads() == threads


def test_rows_name_the_cpu_and_the_paired_speedup(tmp_path):
    from repro.measure.environment import cpu_label

    out = tmp_path / "ops_bench.csv"
    # A row written before the cpu column existed gets its model from the device label.
    old = pd.DataFrame([{**{k: "x" for k in bench.KEY if k != "cpu"}, "device": "cpu: AMD EPYC 7R13",
                         "status": "ok"}])
    out.write_text(old.to_csv(index=False))
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out), "--variants", "cca_naive", "cca_einsum"]) == 0
    frame = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert (frame["cpu"] != "").all()
    assert frame.loc[frame["device"] == "cpu: AMD EPYC 7R13", "cpu"].tolist() == ["AMD EPYC 7R13"]
    new = frame[frame["device"] != "cpu: AMD EPYC 7R13"]
    assert set(new["cpu"]) == {cpu_label()} and cpu_label().startswith(device_label("cpu")[len("cpu: "):])
    assert (new.loc[new["variant"] == "cca_einsum", "speedup_vs_einsum"].astype(float) == 1.0).all()
    assert (new.loc[new["variant"] == "cca_naive", "speedup_vs_einsum"].astype(float) > 0).all()
    table = bench.einsum_speedups(frame)
    assert list(table.columns) == bench.SPEEDUP_COLUMNS
    assert sorted(table["pass"]) == sorted(bench.PASSES) and set(table["variant"]) == {"cca_naive"}


def test_paired_speedup_is_the_median_of_per_round_ratios():
    assert bench.paired_speedup([4.0, 10.0, 3.0], [2.0, 2.0, 3.0]) == 2.0
    assert bench.paired_speedup(None, [1.0]) is None
    assert bench.paired_speedup([1.0], [1.0, 2.0]) is None


def test_einsum_speedups_pairs_rows_of_one_run_only():
    base = {"status": "ok", "device": "cpu: X", "cpu": "X (avx2)", "threads": "1", "dtype": "fp32", "batch": "2",
            "channels": "512", "qk_channels": "64", "height": "97", "width": "97", "pass": "fwd", "rounds": "7"}
    frame = pd.DataFrame([
        {**base, "variant": "cca_naive", "milliseconds": "100", "speedup_vs_einsum": "2.5", "date": "2026-12-07"},
        {**base, "variant": "cca_einsum", "milliseconds": "240", "speedup_vs_einsum": "1.0", "date": "2026-12-07"},
        {**base, "variant": "cca_naive", "threads": "2", "milliseconds": "60", "speedup_vs_einsum": "2.0",
         "date": "2026-12-07"},  # no einsum at 2 threads: not paired
        {**base, "variant": "cca_naive", "cpu": "Y", "milliseconds": "60", "speedup_vs_einsum": "",
         "date": "2026-12-01"},  # older row without the paired statistic
    ])
    table = bench.einsum_speedups(frame)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["cpu"], row["threads"], row["speedup_vs_einsum"], row["einsum_milliseconds"]) == ("X (avx2)", "1", 2.5,
                                                                                                 "240")


def test_rederive_recomputes_only_the_cost_columns(tmp_path):
    # After ops.cost changes, `--rederive` rewrites the model columns (and the rates they imply) of every row
    # from its own time; times, memory and the rest stay as measured.
    from ops import cost

    path = tmp_path / "ops_bench.csv"
    bench.main(["--quick", "--variants", "cca_naive", "--out", str(path)])
    measured = pd.read_csv(path, dtype=str, keep_default_na=False)
    stale = measured.copy()
    stale[["model_gflop", "model_mb_moved", "gb_per_s", "tflop_per_s"]] = "1"
    stale.to_csv(path, index=False)
    assert bench.main(["--rederive", "--out", str(path)]) == 0
    again = pd.read_csv(path, dtype=str, keep_default_na=False)
    rates = ["gb_per_s", "tflop_per_s"]  # recomputed from the rounded milliseconds: equal up to that rounding
    pd.testing.assert_frame_equal(again.drop(columns=rates), measured.drop(columns=rates))
    for column in rates:
        pd.testing.assert_series_equal(again[column].astype(float), measured[column].astype(float), rtol=1e-2,
                                       atol=2e-3)
    backward = again[again["pass"] == "bwd"].iloc[0]
    shape = [int(backward[name]) for name in ("batch", "qk_channels", "channels", "height", "width")]
    expected = cost.criss_cross_attention_backward_cost(*shape).bytes
    assert float(backward["model_mb_moved"]) == round(expected / 2**20, 3)
    assert float(backward["gb_per_s"]) == round(expected / (float(backward["milliseconds"]) / 1e3) / 1e9, 3)
