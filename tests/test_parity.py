"""The parity framework without any peer venv: rows and verdicts, the CSV merge, the venv marker logic (with a fake
python/pip), a failing peer turning into `not run` rows, --strict, the replayed random draws, the mmcv.ops stand-in
against the project's own criss-cross op, and the report section."""

from __future__ import annotations

import importlib.util
import math
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ops import criss_cross_attention
from repro.parity import cli, common
from repro.parity.common import Peer, PeerUnavailable, ensure_venv, measured_row, not_run_row, run_peer
from repro.parity.mmseg import ReplayRng
from repro.pipeline.report import build_report, parity_summary, section_parity

ROOT = Path(__file__).resolve().parents[1]


def test_measured_row_verdicts():
    assert measured_row(source="s", version="1", config="c", check="a", metric="m", value=1e-6,
                        tolerance=1e-5).verdict == "pass"
    failed = measured_row(source="s", version="1", config="c", check="a", metric="m", value=2e-5, tolerance=1e-5)
    assert failed.verdict == "fail" and failed.tolerance == "<= 1e-05" and failed.value == "2e-05"
    agreement = dict(source="s", version="1", config="c", check="e", metric="agree", higher_is_better=True)
    assert measured_row(value=0.9995, tolerance=0.999, **agreement).verdict == "pass"
    assert measured_row(value=0.99, tolerance=0.999, **agreement).verdict == "fail"
    assert measured_row(value=math.nan, tolerance=1.0, **agreement).verdict == "fail"
    assert measured_row(source="s", version="1", config="c", check="a", metric="m", value=math.nan,
                        tolerance=1.0).verdict == "fail"


def test_not_run_row_has_a_one_line_reason():
    row = not_run_row(source="s", version="1", config="c", check="all", reason="pip failed:\n  no wheel\n")
    assert row.verdict == "not run: pip failed: no wheel"
    assert list(row.as_dict()) == list(common.COLUMNS)


def _row(source: str, config: str, verdict: str = "pass") -> common.ParityRow:
    return common.ParityRow(source, "1.0", config, "a_logits", "diff", "0", "<= 1", verdict, "")


def test_merge_keeps_rows_of_other_sources_and_configs(tmp_path):
    path = tmp_path / "parity.csv"
    cli.merge_rows(path, [_row("mmseg", "x"), _row("mmseg", "y"), _row("ssseg", "z")])
    cli.merge_rows(path, [_row("mmseg", "x", "fail")])
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == list(common.COLUMNS)
    assert sorted(zip(frame["source"], frame["config"], frame["verdict"])) == [
        ("mmseg", "x", "fail"), ("mmseg", "y", "pass"), ("ssseg", "z", "pass")]


def test_merge_refuses_a_foreign_csv(tmp_path):
    path = tmp_path / "parity.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="parity columns"):
        cli.merge_rows(path, [_row("mmseg", "x")])
    assert path.read_text() == "a,b\n1,2\n"


def test_exit_code_strict():
    assert cli.exit_code([_row("s", "c")], strict=True) == 0
    assert cli.exit_code([_row("s", "c", "fail")], strict=False) == 1
    not_run = [_row("s", "c"), _row("s", "d", "not run: no wheel")]
    assert cli.exit_code(not_run, strict=False) == 0
    assert cli.exit_code(not_run, strict=True) == 1


FAKE_PYTHON = """\
#!{python}
# A stand-in interpreter: `-m venv DIR` makes DIR/bin/python (this script); `-m pip install ...` logs the call and
# fails for a requirement named "broken".
import shutil, sys
from pathlib import Path
args = sys.argv[1:]
if args[:2] == ["-m", "venv"]:
    target = Path(args[2]) / "bin" / "python"
    target.parent.mkdir(parents=True)
    shutil.copy(__file__, target)
    sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
    with open({log!r}, "a") as log:
        log.write(" ".join(a for a in args[3:] if not a.startswith("--")) + "\\n")
    if "broken" in args:
        print("ERROR: No matching distribution found for broken", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
sys.exit(2)
"""


@pytest.fixture
def fake_python(tmp_path):
    log = tmp_path / "pip.log"
    script = tmp_path / "fakepython"
    script.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def test_venv_is_built_once_and_rebuilt_when_requirements_change(tmp_path, fake_python):
    script, log = fake_python
    peer = Peer("demo", "1.0", ("demo==1.0",), python=str(script))
    python = ensure_venv(peer, tmp_path / "nox")
    assert python == (tmp_path / "nox" / "peer-demo-1.0" / "bin" / "python").absolute()
    assert log.read_text().splitlines() == [common.TORCH_SPEC, "demo==1.0"]
    assert common.is_installed(peer, tmp_path / "nox")
    ensure_venv(peer, tmp_path / "nox")  # reused: pip is not called again
    assert len(log.read_text().splitlines()) == 2
    changed = Peer("demo", "1.0", ("demo==1.0", "extra"), python=str(script))
    assert not common.is_installed(changed, tmp_path / "nox")
    ensure_venv(changed, tmp_path / "nox")
    assert log.read_text().splitlines()[2:] == [common.TORCH_SPEC, "demo==1.0 extra"]


def test_a_moved_venv_is_reused(tmp_path, fake_python):
    """The venvs of one checkout moved under another folder (its worktree renamed, a CI cache restored
    elsewhere) are reused as they are: the marker records the requirements, not the folder."""
    script, log = fake_python
    peer = Peer("demo", "1.0", ("demo==1.0",), python=str(script))
    ensure_venv(peer, tmp_path / "old")
    (tmp_path / "old").rename(tmp_path / "new")
    assert ensure_venv(peer, tmp_path / "new") == (tmp_path / "new" / peer.key / "bin" / "python").absolute()
    assert len(log.read_text().splitlines()) == 2  # torch and the requirements, once: no rebuild


def test_failed_install_leaves_no_marker_and_names_pips_error(tmp_path, fake_python):
    script, _ = fake_python
    peer = Peer("demo", "2.0", ("broken",), python=str(script))
    with pytest.raises(PeerUnavailable, match="No matching distribution found for broken"):
        ensure_venv(peer, tmp_path / "nox")
    assert not common.is_installed(peer, tmp_path / "nox")
    assert not (tmp_path / "nox" / peer.key / common.MARKER).exists()


def test_run_peer_failure_carries_the_stderr_tail(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text("import sys\nprint('first line', file=sys.stderr)\nsys.exit('ImportError: no module mmseg')\n")
    with pytest.raises(PeerUnavailable, match="exited 1: first line | ImportError: no module mmseg"):
        run_peer(Path(sys.executable), script, cwd=tmp_path, timeout=60)
    ok = tmp_path / "ok.py"
    ok.write_text("import os\nprint(os.environ.get('PYTHONPATH', 'unset'))\n")
    assert run_peer(Path(sys.executable), ok, cwd=tmp_path, timeout=60).stdout.strip() == "unset"


SERVING_PEER = """\
import os, sys, time
sys.path.insert(0, {peers!r})
from serve import serve
def main(argv):
    command = argv[1]
    if command == "pid":
        print("pid", os.getpid(), os.environ.get("PYTHONPATH", "unset"))
    elif command == "fail":
        raise ValueError("no such config")
    elif command == "sleep":
        time.sleep(30)
    elif command == "die":
        os._exit(3)
    return 0
if sys.argv[1:] == ["serve"]:
    sys.exit(serve(main))
"""


@pytest.mark.slow
def test_peer_server_answers_many_jobs_from_one_process(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(SERVING_PEER.format(peers=str(common.PEERS_DIR)))
    with common.PeerServer(Path(sys.executable), script, cwd=tmp_path) as server:
        first = server.call("pid", timeout=60)
        assert first[-1].startswith("pid ") and first[-1].endswith(" unset")  # no PYTHONPATH for a peer
        assert server.call("pid", timeout=60) == first  # the same process
        with pytest.raises(PeerUnavailable, match="ValueError: no such config"):
            server.call("fail", timeout=60)
        assert server.call("pid", timeout=60) == first  # a failed job leaves the server serving
        with pytest.raises(PeerUnavailable, match="ran over 1 s"):
            server.call("sleep", timeout=1)
        restarted = server.call("pid", timeout=60)  # a timed-out server is replaced
        assert restarted[-1].startswith("pid ") and restarted != first
        with pytest.raises(PeerUnavailable, match="exited with status 3"):
            server.call("die", timeout=60)
        assert server.call("pid", timeout=60)[-1].startswith("pid ")


def _fake_source(name: str, behaviour: str) -> types.ModuleType:
    module = types.ModuleType(f"fake_{name}")
    module.NAME, module.VERSION, module.QUICK_CONFIG = name, "9.9", "row_a"
    module.default_configs = lambda: [Path("row_a.yaml"), Path("row_b.yaml")]

    def run(configs, *, quick, workdir):
        if behaviour == "unavailable":
            raise PeerUnavailable("pip install peer==9.9 failed: no wheel for this python")
        verdict = "fail" if behaviour == "fail" else "pass"
        return [common.ParityRow(name, "9.9", path.stem, "a_logits", "diff", "0", "<= 1", verdict, "")
                for path in configs]

    module.run = run
    return module


def test_cli_unavailable_peer_gives_not_run_rows_and_strict_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SOURCES", {"good": _fake_source("good", "pass"),
                                         "gone": _fake_source("gone", "unavailable")})
    out = tmp_path / "results"
    args = ["--out", str(out), "--workdir", str(tmp_path / "work")]
    assert cli.main(args) == 0
    frame = pd.read_csv(out / "parity.csv", dtype=str, keep_default_na=False)
    gone = frame[frame["source"] == "gone"]
    assert sorted(gone["config"]) == ["row_a", "row_b"]
    assert gone["verdict"].str.startswith("not run: pip install peer==9.9 failed").all()
    assert (frame[frame["source"] == "good"]["verdict"] == "pass").all()
    assert cli.main([*args, "--strict"]) == 1
    assert cli.main([*args, "--quick", "--sources", "good"]) == 0
    assert len(pd.read_csv(out / "parity.csv")) == 4  # the quick row replaced row_a's, the others kept
    assert cli.main([*args, "--configs", "nothing"]) == 2
    assert "no source has an experiment named" in capsys.readouterr().err


def test_cli_runs_sources_in_parallel_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "SOURCES", {"good": _fake_source("good", "pass"),
                                         "gone": _fake_source("gone", "unavailable")})
    out = tmp_path / "results"
    args = ["--out", str(out), "--workdir", str(tmp_path / "work")]
    assert cli.main([*args, "--jobs", "2"]) == 0
    frame = pd.read_csv(out / "parity.csv", dtype=str, keep_default_na=False)
    assert sorted(zip(frame["source"], frame["config"])) == [("gone", "row_a"), ("gone", "row_b"),
                                                             ("good", "row_a"), ("good", "row_b")]
    assert cli.main([*args, "--jobs", "0"]) == 2
    # The run's wall time is a row of parity_timing.csv, and the report's parity section states it.
    timing = pd.read_csv(out / "parity_timing.csv", dtype=str, keep_default_na=False)
    whole = timing[timing["check"] == cli.WALL_CHECK]
    assert len(whole) == 1 and whole.iloc[0]["config"] == "all rows" and whole.iloc[0]["jobs"] == "2"
    assert set(whole.iloc[0]["source"].split("+")) == {"good", "gone"} and float(whole.iloc[0]["seconds"]) >= 0
    sentence = section_parity(out, {})
    assert "The last `python -m repro.parity` in `parity_timing.csv` (all rows of " in sentence
    assert "of wall time with `--jobs 2`" in sentence


def test_cli_failed_check_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "SOURCES", {"bad": _fake_source("bad", "fail")})
    assert cli.main(["--out", str(tmp_path), "--workdir", str(tmp_path / "work")]) == 1


def test_replayed_draws_are_checked_in_kind_and_range():
    rng = ReplayRng([["random_sample", [], {}, 0.25], ["randint", [0, 7], {}, 3], ["choice", [], {}, "horizontal"],
                     ["uniform", [-32, 32], {}, 5.5]])
    assert rng.uniform(0.5, 2.0) == 0.25 * 1.5 + 0.5
    assert rng.integers(0, 7) == 3
    assert rng.random() < 0.5
    assert rng.uniform(-32, 32) == 5.5
    with pytest.raises(AssertionError, match="draws more numbers"):
        rng.random()
    with pytest.raises(AssertionError, match=r"integers\(0, 5\) where mmseg drew randint\(0, 7\)"):
        ReplayRng([["randint", [0, 7], {}, 3]]).integers(0, 5)
    with pytest.raises(AssertionError, match="mmseg drew randint"):
        ReplayRng([["randint", [2], {}, 1]]).uniform(0.0, 1.0)


def _standin():
    """The peer-side stand-in, loaded by path: it imports torch only, not the project nor mmcv."""
    path = ROOT / "repro" / "parity" / "peers" / "mmcv_ops_standin.py"
    spec = importlib.util.spec_from_file_location("parity_mmcv_ops_standin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (1, 8, 5, 7), (2, 3, 9, 4)])
def test_standin_criss_cross_equals_the_naive_op(shape):
    standin = _standin()
    generator = torch.Generator().manual_seed(sum(shape))
    batch, qk, height, width = shape
    query = torch.randn(batch, qk, height, width, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, qk, height, width, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, 6, height, width, generator=generator, dtype=torch.float64)
    expected = criss_cross_attention(query, key, value, backend="naive")
    torch.testing.assert_close(standin.criss_cross(query, key, value), expected, rtol=1e-12, atol=1e-12)


def test_standin_module_has_mmcv_names_and_refuses_the_rest():
    standin = _standin()
    block = standin.CrissCrossAttention(16)
    assert sorted(block.state_dict()) == sorted(
        [f"{conv}_conv.{p}" for conv in ("query", "key", "value") for p in ("weight", "bias")] + ["gamma.scale"])
    x = torch.randn(1, 16, 3, 5)
    torch.testing.assert_close(block(x), x)  # gamma starts at 0
    with torch.no_grad():
        block.gamma.scale.fill_(0.5)
    expected = 0.5 * criss_cross_attention(block.query_conv(x), block.key_conv(x), block.value_conv(x),
                                           backend="naive") + x
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
    module = standin.build_module()
    with pytest.raises(NotImplementedError, match="point_sample is not available"):
        module.point_sample(None, None)


def _parity_csv(results: Path) -> None:
    rows = [
        common.ParityRow("mmseg", "1.2.2", "row_a", "a_logits", "decode eval max rel diff", "2e-06", "<= 0.0001",
                         "pass", ""),
        common.ParityRow("mmseg", "1.2.2", "row_b", "a_logits", "decode eval max rel diff", "3e-05", "<= 0.0001",
                         "pass", ""),
        common.ParityRow("mmseg", "1.2.2", "row_a", "e_pixels", "agreement", "0.9995", ">= 0.999", "pass", ""),
        common.ParityRow("mmseg", "1.2.2", "row_b", "e_pixels", "agreement", "0.998", ">= 0.999", "fail", ""),
        common.ParityRow("paddleseg", "2.8.0", "row_c", "all", "", "", "", "not run: paddlepaddle has no wheel",
                         ""),
    ]
    cli.merge_rows(results / "parity.csv", rows)


def test_report_section_summarises_each_source_and_check(tmp_path):
    _parity_csv(tmp_path)
    frame = pd.read_csv(tmp_path / "parity.csv", dtype=str, keep_default_na=False)
    summary = parity_summary(frame).set_index(["source", "check"])
    assert summary.loc[("mmseg 1.2.2", "a_logits"), "worst difference"] == "decode eval max rel diff 3e-05 (<= 0.0001)"
    assert summary.loc[("mmseg 1.2.2", "e_pixels"), "worst difference"] == "agreement 0.998 (>= 0.999)"
    assert summary.loc[("mmseg 1.2.2", "e_pixels"), "verdict"] == "1 pass, 1 fail"
    assert summary.loc[("paddleseg 2.8.0", "all"), "verdict"] == "0 pass, 1 not run (paddlepaddle has no wheel)"
    pages: dict[str, str] = {}
    text = section_parity(tmp_path, pages)
    assert text.startswith("## Parity with the sources' code") and "details/parity.md" in text
    assert "row_c" in pages["parity.md"]
    assert "## Parity with the sources' code" in build_report(tmp_path, ROOT / "experiments")


def test_report_section_names_the_command_when_the_csv_is_missing(tmp_path):
    assert "nox -s parity" in section_parity(tmp_path, {})


def test_fixture_scenes_are_structured_and_in_range():
    from repro.parity.fixtures import structured_scene

    image, label = structured_scene(np.random.default_rng(0), (41, 57), 19)
    assert image.shape == (41, 57, 3) and label.shape == (41, 57)
    classes = set(np.unique(label).tolist()) - {255}
    assert classes <= set(range(19)) and len(classes) >= 2 and (label == 255).any()
    # Structured: most neighbouring pixels share their class (noise would not).
    assert (label[:, 1:] == label[:, :-1]).mean() > 0.9


def test_peer_scripts_do_not_import_the_project():
    for path in (ROOT / "repro" / "parity" / "peers").glob("*.py"):
        source = path.read_text()
        for package in ("repro", "models", "ops"):
            assert f"import {package}" not in source and f"from {package}" not in source, path


def test_peer_python_builds_the_registered_peers_venv(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "ensure_venv", lambda peer, root: calls.append((peer.name, peer.version, root))
                        or root / peer.key / "bin" / "python")
    assert cli.peer_python("mmseg", tmp_path) == tmp_path / "peer-mmseg-1.2.2" / "bin" / "python"
    assert cli.peer_python("mmseg0", tmp_path).parent.parent.name == "peer-mmseg0-0.30.0"
    assert calls == [("mmseg", "1.2.2", tmp_path), ("mmseg0", "0.30.0", tmp_path)]
    with pytest.raises(KeyError, match="unknown peer 'nope'"):
        cli.peer_python("nope")


def test_mmseg_rows_name_their_mmseg_config_files():
    from repro.parity import mmseg, mmseg0

    names = {path.stem: mmseg.mmseg_config_name(path) for path in mmseg.default_configs()}
    assert len(names) == 24
    assert names["mmseg_cityscapes_r50_d8_769x769_40k"] == "ccnet/ccnet_r50-d8_4xb2-40k_cityscapes-769x769.py"
    assert names["mmseg_nonlocal_cityscapes_r101_d8_512x1024_80k"] == \
        "nonlocal_net/nonlocal_r101-d8_4xb2-80k_cityscapes-512x1024.py"
    assert mmseg0.config_name_0x(names["mmseg_voc12aug_r50_d8_512x512_20k"]) == \
        "ccnet/ccnet_r50-d8_512x512_20k_voc12aug.py"
    # 40k and 80k rows of one model share the model check; another depth or dataset does not.
    rows = {stem: mmseg._rows_of(mmseg.EXPERIMENTS / f"{stem}.yaml") for stem in names}
    key = mmseg.model_key
    assert key(rows["mmseg_cityscapes_r50_d8_769x769_40k"]) == key(rows["mmseg_cityscapes_r50_d8_769x769_80k"])
    assert key(rows["mmseg_cityscapes_r50_d8_769x769_40k"]) != key(rows["mmseg_cityscapes_r101_d8_769x769_40k"])
    assert key(rows["mmseg_cityscapes_r50_d8_769x769_40k"]) != key(rows["mmseg_cityscapes_r50_d8_512x1024_40k"])
    assert mmseg.data_key(rows["mmseg_cityscapes_r50_d8_769x769_40k"]) == \
        mmseg.data_key(rows["mmseg_nonlocal_cityscapes_r101_d8_769x769_80k"])


def _windows(length: int, crop: int, stride: int) -> int:
    """mmseg's slide_inference grid along one axis (max(n - crop + stride - 1, 0) // stride + 1)."""
    return max(length - crop + stride - 1, 0) // stride + 1


def test_slide_rows_check_e_still_slides_at_half_size():
    """Check e's half-size images for slide rows: mmseg 1.x's TTA views (the original x ratio) still include one
    smaller than a window, several with 3+ windows along an axis, and last windows clamped to the edge."""
    from repro.parity import fixtures, mmseg

    row = mmseg._rows_of(mmseg.EXPERIMENTS / "mmseg_cityscapes_r101_d8_769x769_40k.yaml")
    assert mmseg.is_slide(row.cfg) and mmseg.eval_sizes(row.cfg) == mmseg.EVAL_SIZES
    small = mmseg.small_eval_overrides(row.cfg)
    (crop, _), (stride, _) = small["eval.crop_size"], small["eval.stride"]
    lengths = [int(n * r + 0.5) for size in mmseg.EVAL_SIZES for n in size for r in row.cfg.eval.ms_scales]
    grids = [_windows(n, crop, stride) for n in lengths]
    assert any(n < crop for n in lengths) and max(grids) >= 3
    assert any(n > crop and (n - crop) % stride for n in lengths)  # a last window clamped to the edge
    assert all(h != w for h, w in mmseg.EVAL_SIZES)
    whole = mmseg._rows_of(mmseg.EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml")
    assert not mmseg.is_slide(whole.cfg) and mmseg.eval_sizes(whole.cfg) == fixtures.FIXTURE_SIZES


def test_timing_summary_adds_each_sources_checks(tmp_path):
    timings = [{"source": "mmseg", "config": "a", "check": "model", "seconds": 2.0},
               {"source": "mmseg", "config": "b", "check": "model", "seconds": 3.0},
               {"source": "sssegmentation", "config": "a", "check": "e", "seconds": 1.0}]
    text = cli.summarise_timing(timings)
    assert "mmseg model: 5 s" in text and "sssegmentation e: 1 s" in text
    cli.write_timing(tmp_path / "t.csv", timings, jobs=2)
    written = (tmp_path / "t.csv").read_text().splitlines()
    assert written[0].startswith("source,config,check,seconds,jobs,cpu") and len(written) == 4
