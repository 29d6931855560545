"""The whole-model inference benchmark's parts: the peer protocol (with a stand-in peer, no mmsegmentation venv),
our two variants on a small input, the CSV writer keeping other variants' rows, the README table, and the
`--threads` option of `repro.run` / `repro.predict`. No wall-clock assertions."""

import sys
import textwrap

import pandas as pd
import pytest
import torch

from repro.engine import predict, runner
from repro.measure import inference_bench
from repro.measure.environment import cpu_label
from repro.pipeline.report import inference_bench_table

FAKE_PEER = textwrap.dedent('''
    import json, sys, torch
    job = json.load(open(sys.argv[1]))
    print("some library chatter on stdout")
    torch.save({"w": torch.ones(2)}, job["out"] + "/state.pt")
    image = torch.load(job["image"], weights_only=True)
    print("@@ ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "threads":
            torch.set_num_threads(int(args[0])); print("@@ threads " + args[0], flush=True)
        elif command == "time":
            print("chatter"); print("@@ 0.25", flush=True)
        elif command == "logits":
            torch.save(image[:, :2] * 2, job["out"] + "/logits.pt"); print("@@ saved", flush=True)
        elif command == "quit":
            print("@@ bye", flush=True); break
        else:
            print("@@ error: unknown", flush=True)
''')


def test_peer_protocol_skips_chatter_and_reads_answers(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(FAKE_PEER)
    spec = inference_bench.PeerSpec(__import__("pathlib").Path(sys.executable), script, "unused.py")
    image = torch.randn(1, 3, 4, 5)
    peer = inference_bench.PeerModel(spec, tmp_path, image, max_threads=1)
    try:
        assert torch.equal(peer.state_dict()["w"], torch.ones(2))
        peer.set_threads(1)
        assert peer.time() == 0.25
        torch.testing.assert_close(peer.logits(), image[:, :2] * 2)
        with pytest.raises(RuntimeError, match="unknown"):
            peer._send("dance")
    finally:
        peer.close()
    assert peer.process.poll() == 0


def test_a_peer_that_dies_is_reported(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text("import sys\nsys.stderr.write('ImportError: no mmseg here\\n')\nsys.exit(3)\n")
    spec = inference_bench.PeerSpec(__import__("pathlib").Path(sys.executable), script, "unused.py")
    with pytest.raises(RuntimeError, match="no mmseg here"):
        inference_bench.PeerModel(spec, tmp_path, torch.zeros(1, 3, 2, 2), max_threads=1)


def test_compare_counts_agreement_and_the_largest_difference():
    reference = torch.zeros(1, 3, 2, 2)
    reference[:, 0] = 1.0
    logits = reference.clone()
    logits[0, 1, 0, 0] = 2.0  # one of four pixels changes class
    agreement, diff = inference_bench.compare(logits, reference)
    assert agreement == 0.75 and diff == 2.0
    with pytest.raises(ValueError, match="shape"):
        inference_bench.compare(logits[..., :1], reference)


def test_our_variants_on_a_small_input(tmp_path):
    frame = inference_bench.measure("R-50-D8", size=(64, 96), threads=[1], rounds=1, peer=None, work=tmp_path,
                                    log=lambda text: None)
    assert list(frame.columns) == inference_bench.COLUMNS
    assert list(frame["variant"]) == ["torch_eager", "torch_folded", "torch_fused"]
    assert (frame["argmax_agreement"] >= 0.999).all()
    assert (frame["median_s"] > 0).all() and (frame["cpu"] == cpu_label()).all()
    assert set(frame["input_hw"]) == {"64x96"} and set(frame["threads"]) == {1}
    assert frame["other_cpu_share"].between(0.0, 1.0).all()  # one value per thread count, over the timed rounds


def _rows(variants, threads=1, cpu="X (avx2)", median=1.0):
    return pd.DataFrame([{**{column: "" for column in inference_bench.COLUMNS}, "model": "m", "backbone": "R-50-D8",
                          "input_hw": "512x1024", "batch": 1, "engine": "torch", "precision": "fp32",
                          "threads": threads, "variant": variant, "median_s": median, "cpu": cpu}
                         for variant in variants])


def test_writer_replaces_only_its_variants_rows(tmp_path):
    path = tmp_path / "inference_bench.csv"
    engines = _rows(["onnxruntime", "openvino_default"]).assign(engine="onnxruntime")
    inference_bench.write_rows(path, engines)
    inference_bench.write_rows(path, _rows(["torch_eager", "torch_fused", "mmseg_1.2.2"], median=2.0))
    inference_bench.write_rows(path, _rows(["torch_eager", "torch_fused", "mmseg_1.2.2"], median=3.0))
    inference_bench.write_rows(path, _rows(["torch_eager"], threads=2))
    frame = pd.read_csv(path)
    assert sorted(frame["variant"]) == sorted(["onnxruntime", "openvino_default", "torch_eager", "torch_fused",
                                               "mmseg_1.2.2", "torch_eager"])
    assert set(frame.loc[(frame["threads"] == 1) & frame["variant"].str.startswith(("torch", "mmseg")),
                         "median_s"]) == {3.0}
    assert "cpu" in frame.columns


def test_readme_table_has_speedup_over_mmseg():
    frame = _rows(["mmseg_1.2.2", "torch_eager", "torch_fused"]).assign(
        median_s=[3.0, 2.0, 1.5], speedup_vs_torch_eager=[0.67, 1.0, 1.33], argmax_agreement=[0.99995, 1, 1],
        max_abs_logit_diff=["1e-05", "0", "2e-05"], date="2026-12-07")
    table = inference_bench_table(frame)
    lines = table.strip().splitlines()
    assert "speedup_vs_mmseg" in lines[0]
    assert [line.split(" | ")[4] for line in lines[2:]] == ["torch_eager", "torch_fused", "mmseg_1.2.2"]
    assert lines[3].split(" | ")[9] == "2"  # torch_fused: 3.0 s / 1.5 s


@pytest.mark.parametrize("parse", [runner._parse_args, predict._parse_args], ids=["run", "predict"])
def test_threads_option_is_validated(parse, capsys):
    base = ["c.yaml", "--eval-only", "--checkpoint", "x.pt"] if parse is runner._parse_args else \
        ["c.yaml", "img.png", "--checkpoint", "x.pt", "--out", "o"]
    assert parse([*base, "--threads", "2"]).threads == 2
    assert parse(base).threads is None
    with pytest.raises(SystemExit) as exit_info:
        parse([*base, "--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_threads_option_sets_torch_threads(tmp_path, restore_threads):
    torch.set_num_threads(2)
    # Both commands set the thread count before anything else (here they then stop at a missing file).
    assert runner.main([str(tmp_path / "missing.yaml"), "--check-data", "--threads", "1"]) == 2
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    code = predict.main([str(tmp_path / "missing.yaml"), str(tmp_path / "none.png"), "--checkpoint", "x.pt",
                         "--out", str(tmp_path / "out"), "--threads", "1"])
    assert code != 0 and torch.get_num_threads() == 1


def test_both_benchmark_commands_write_through_one_writer(tmp_path):
    # `python -m repro.bench --inference` (engine_bench) and `python -m repro.inference_bench` share the columns
    # and the writer: each replaces only its own rows of the common file.
    from repro.measure import engine_bench

    assert engine_bench.COLUMNS is inference_bench.COLUMNS and engine_bench.write_rows is inference_bench.write_rows
    path = tmp_path / "inference_bench.csv"
    inference_bench.write_rows(path, _rows(["torch_eager", "torch_folded", "mmseg_1.2.2"]))

    def engines_run():
        return engine_bench.run(out=path, backbones=["R-50-D8"], sizes=[(32, 48)], threads=[1], repeats=1,
                                variants=[engine_bench.TORCH_VARIANT], evidence=None, log=lambda text: None)

    engines_run()
    engines_run()
    frame = pd.read_csv(path)
    assert list(frame.columns) == inference_bench.COLUMNS
    assert sorted(frame["variant"]) == sorted(["torch_eager", "torch_folded", "mmseg_1.2.2",
                                               engine_bench.TORCH_VARIANT])
