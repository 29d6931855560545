"""ONNX export (repro.engine.export), the engines (repro.engine.engines) and their command lines: the attention
survives export, files verify themselves in ONNX Runtime and OpenVINO at dynamic sizes, predict runs from an
.onnx alone in every mode, and each bad input is one clear error with nothing half-written.

Tiny models throughout (a two-conv backbone under the real heads), so one export takes a few seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from models.ccnet import CCNet  # noqa: E402
from models.heads import FCNHead, NonLocalHead, RCCAHead  # noqa: E402
from models.inference import predict_multiscale, predict_slide, predict_whole  # noqa: E402
from ops.non_local import NonLocal2d  # noqa: E402
from repro.engine import engines, export  # noqa: E402
from repro.engine.config import EvalConfig  # noqa: E402
from repro.engine.data.palettes import Palette  # noqa: E402
from repro.engine.predict import main as predict_main  # noqa: E402

CLASSES = 5
HAS_OPENVINO = engines.package_installed("openvino")


class TinyBackbone(nn.Module):
    """Two stride-2 stages returning [layer3-like, layer4-like] features, as the ResNet does; with
    `non_local`, a non-local block (the non-local head's op) on the last one, so that one export covers both
    attention ops."""

    def __init__(self, non_local: bool = False) -> None:
        super().__init__()
        self.one = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.two = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.non_local = NonLocal2d(16, qk_channels=4) if non_local else None

    def forward(self, x):
        first = self.one(x)
        last = self.two(first)
        return [first, last if self.non_local is None else self.non_local(last)]


def tiny_model(head: str = "rcca", *, seed: int = 0, backend: str = "naive", non_local: bool = False) -> CCNet:
    torch.manual_seed(seed)
    common = dict(channels=8, num_classes=CLASSES, dropout=0.1)
    if head == "rcca":
        decode = RCCAHead(16, recurrence=2, qk_channels=4, backend=backend, **common)
    elif head == "nonlocal":
        decode = NonLocalHead(16, qk_channels=4, **common)
    else:
        decode = FCNHead(16, num_convs=2, concat_input=True, **common)
    model = CCNet(TinyBackbone(non_local), decode, FCNHead(8, channels=4, num_classes=CLASSES, num_convs=1)).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(0.7)  # the attention must matter to the output
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def tiny_metadata(eval_cfg: EvalConfig | None = None) -> dict:
    palette = Palette("tiny", tuple(f"class {i}" for i in range(CLASSES)),
                      (np.arange(CLASSES * 3).reshape(CLASSES, 3) * 17 % 256).astype(np.uint8))
    return export.build_metadata(
        config="tiny", dataset="tiny", palette=palette, mean=(120.0, 115.0, 100.0), std=(60.0, 58.0, 57.0),
        channel_order="rgb", eval_cfg=eval_cfg or EvalConfig.native_whole(
            mode="slide", crop_size=(40, 40), stride=(30, 30), ms_scales=(0.75, 1.0)),
        checkpoint=None,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model("rcca", non_local=True)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export.export_onnx(model, path, metadata=tiny_metadata())
    return model, path, report


def test_attention_survives_export_and_the_file_verifies_itself(exported):
    model, path, report = exported
    counts = report.op_counts
    # Two criss-cross passes (4 matmuls and a softmax each) and the non-local block (2 and 1).
    assert counts.get("Softmax", 0) >= 3 and counts.get("MatMul", 0) + counts.get("Einsum", 0) >= 10
    engines_run = {check.engine for check in report.checks}
    assert engines_run == set(export.installed_engines()) and "onnxruntime" in engines_run
    sizes = {(c.height, c.width) for c in report.checks}
    assert len(sizes) == 2 and any(h % 8 or w % 8 for h, w in sizes)
    assert all(c.passed and c.max_abs_logit_diff <= 1e-3 for c in report.checks)
    meta = export.read_metadata(path)
    assert meta.num_classes == CLASSES and meta.raw["channel_order"] == "rgb"
    assert meta.raw["verification"] and meta.raw["opset"] == export.DEFAULT_OPSET
    assert meta.eval_cfg.mode == "slide" and meta.eval_cfg.crop_size == (40, 40)


def test_legacy_export_of_the_naive_op_loses_the_attention_and_the_check_catches_it(tmp_path):
    """The trap the issue found: the TorchScript exporter runs, but the in-place op's graph has no attention."""
    model = tiny_model("rcca")
    path = tmp_path / "legacy.onnx"
    try:
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17)
    except Exception as err:  # noqa: BLE001 - a legacy exporter that refuses is as good as one we refuse
        pytest.skip(f"the legacy exporter refuses the naive op here: {err}")
    with pytest.raises(export.ExportError, match="attention was lost"):
        export.check_attention_in_graph(onnx.load(str(path)))


@pytest.mark.parametrize("size", [(37, 53), (64, 24)])
def test_dynamic_height_and_width_match_torch(exported, size):
    model, path, _ = exported
    runner = engines.make_engine("onnxruntime", onnx_path=path)
    x = torch.randn(2, 3, *size)  # batch 2 too
    with torch.no_grad():
        diff, agreement = export.compare(model(x), runner(x))
    assert diff < 1e-4 and agreement == 1.0


def test_every_head_is_exportable():
    """The non-local head's op is in the exported model above; the FCN head (convolutions, a concat) has
    nothing an exporter could lose, and like the others it has no Triton block to refuse."""
    for head in ("nonlocal", "fcn"):
        prepared = export.exportable(tiny_model(head))
        assert not prepared.training


def test_engines_run_whole_slide_and_multiscale_unchanged(exported):
    model, path, _ = exported
    x = torch.randn(1, 3, 45, 61)
    names = ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else [])
    for name in names:
        runner = engines.make_engine(name, onnx_path=path)
        for predict in (
            lambda m: predict_whole(m, x),
            lambda m: predict_slide(m, x, crop=(32, 40), stride=(20, 24), num_classes=CLASSES),
            lambda m: predict_multiscale(m, x, scales=(0.75, 1.0), mode="whole"),
        ):
            expected, got = predict(model), predict(runner)
            assert (expected.argmax(1) == got.argmax(1)).float().mean() == 1.0, name
            assert float((expected - got).abs().max()) < 1e-3, name
        assert engines.describe(runner).startswith(name)


def _image(tmp_path, size=(41, 57)):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("mode", ["whole", "slide", "ms_flip"])
def test_predict_runs_from_the_onnx_file_alone(exported, tmp_path, mode, capsys):
    model, path, _ = exported
    image = _image(tmp_path)
    engine_names = ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else [])
    labels = {}
    for name in engine_names:
        out = tmp_path / f"out-{name}"
        code = predict_main([str(path), str(image), "--out", str(out), "--engine", name, "--mode", mode,
                             "--no-progress"])
        assert code == 0
        assert f"engine {name}" in capsys.readouterr().out
        labels[name] = np.asarray(Image.open(out / "img_labels.png"))
    # The same prediction in torch from the metadata's normalisation and eval settings.
    from repro.engine.evaluate import predict_logits
    from repro.engine.predict import Predictor, predictor_from_onnx, read_image

    reference = predictor_from_onnx(path, mode=mode)
    torch_predictor = Predictor(**{**reference.__dict__, "model": model})
    pixels = read_image(image)
    expected = torch_predictor.predict(pixels).labels
    logits = predict_logits(model, torch_predictor.input_tensor(pixels), eval_cfg=reference.eval_cfg,
                            num_classes=CLASSES, multiscale=mode == "ms_flip")[0]
    top2 = logits.topk(2, dim=0).values
    margin = (top2[0] - top2[1]).numpy()
    for name, got in labels.items():
        # Random weights leave a few near-ties: only those may differ.
        differ = got != expected
        assert differ.mean() <= 0.01 and (margin[differ] < 1e-3).all(), name


def test_onnx_without_project_metadata_is_refused(tmp_path, capsys):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Conv2d(3, 2, 1), (torch.randn(1, 3, 8, 8),), str(plain), dynamo=False)
    code = predict_main([str(plain), str(_image(tmp_path)), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == export.EXIT_INPUT
    assert "no 'ccrepro' metadata" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    not_onnx = tmp_path / "garbage.onnx"
    not_onnx.write_bytes(b"\x00not a model")
    with pytest.raises(export.ExportError, match="not a readable ONNX"):
        export.read_metadata(not_onnx)


def test_triton_backend_and_bad_opset_are_refused_before_any_work(tmp_path):
    with pytest.raises(export.ExportError, match="backend 'triton'.*model.backend=naive"):
        export.export_onnx(tiny_model("rcca", backend="triton"), tmp_path / "t.onnx", metadata=tiny_metadata())
    for opset in (11, 999):
        with pytest.raises(export.ExportError, match=f"opset {opset} is not supported"):
            export.export_onnx(tiny_model("fcn"), tmp_path / "t.onnx", metadata=tiny_metadata(), opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_exit_codes(tmp_path, capsys, monkeypatch):
    from repro.engine import export_cli

    config = "experiments/mmseg_cityscapes_r50_d8_512x1024_40k.yaml"
    assert export_cli.main([config, "--checkpoint", "x.pt", "--out", str(tmp_path / "m.onnx"),
                            "--opset", "9"]) == 2
    assert "opset 9" in capsys.readouterr().err
    assert export_cli.main([config, "--checkpoint", str(tmp_path / "none.pt"),
                            "--out", str(tmp_path / "m.onnx")]) == 4
    assert "does not exist" in capsys.readouterr().err
    # A checkpoint whose classes the config does not have: the tiny model's 5 against Cityscapes' 19.
    monkeypatch.setattr(export_cli, "load_model", lambda cfg, checkpoint, source=None: tiny_model("fcn"))
    assert export_cli.main([config, "--checkpoint", "x.pt", "--out", str(tmp_path / "m.onnx")]) == 4
    assert "predicts 5 classes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(exported, tmp_path, monkeypatch):
    model, path, _ = exported
    proto = onnx.load(str(path))
    monkeypatch.setattr(export, "export_proto", lambda *args, **kwargs: proto)  # the export itself is tested above
    out = tmp_path / "sub" / "model.onnx"
    with pytest.raises(export.ExportError, match="verification failed.*nothing was written"):
        export.export_onnx(model, out, metadata=tiny_metadata(), engines=["onnxruntime"], atol=-1.0, rtol=0.0)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_metadata_classes_must_match_the_model(tmp_path):
    metadata = tiny_metadata()
    metadata["classes"] = metadata["classes"][:3]
    metadata["palette"] = metadata["palette"][:3]
    with pytest.raises(export.ExportError, match="predicts 5 classes.*has 3"):
        export.export_onnx(tiny_model("fcn"), tmp_path / "m.onnx", metadata=metadata, engines=["onnxruntime"])
    assert list(tmp_path.iterdir()) == []


def test_engine_not_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(engines, "package_installed", lambda name: name != "openvino")
    with pytest.raises(engines.EngineError, match=r"openvino.*not installed.*\.\[deploy\]"):
        engines.check_choice("openvino", "fp32")


def test_bf16_without_native_support_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda: False)
    for engine in ("torch", "openvino"):
        if engine == "openvino" and not HAS_OPENVINO:
            continue
        with pytest.raises(engines.EngineError, match="native bf16"):
            engines.check_choice(engine, "bf16")
    with pytest.raises(engines.EngineError, match="onnxruntime has no bf16"):
        engines.check_choice("onnxruntime", "bf16")
    from repro.engine.runner import main as run_main

    code = run_main(["experiments/mmseg_cityscapes_r50_d8_512x1024_40k.yaml", "--eval-only", "--checkpoint",
                     "x.pt", "--precision", "bf16", "--out-dir", str(tmp_path / "run")])
    assert code == 2 and "native bf16" in capsys.readouterr().err


def test_cpu_probe_reads_the_flags(monkeypatch):
    monkeypatch.setattr(engines, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert engines.cpu_has_native_bf16()
    monkeypatch.setattr(engines, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not engines.cpu_has_native_bf16()


@pytest.mark.skipif(not engines.cpu_has_native_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx_bf16)")
def test_bf16_engines_agree_with_fp32(exported):
    model, path, _ = exported
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        reference = model(x)
    runners = [engines.make_engine("torch", model=model, precision="bf16")]
    if HAS_OPENVINO:
        runners.append(engines.make_engine("openvino", onnx_path=path, precision="bf16"))
    for runner in runners:
        with torch.no_grad():
            diff, agreement = export.compare(reference, runner(x))
        assert agreement >= 0.9 and diff < 0.5, engines.describe(runner)
        assert "bf16" in engines.describe(runner)


def test_metadata_is_json_with_everything_predict_needs(exported):
    _, path, _ = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    raw = json.loads(props[export.METADATA_KEY])
    for key in ("classes", "palette", "mean", "std", "channel_order", "config", "checkpoint_sha256", "eval"):
        assert key in raw


def test_engine_benchmark_rows(exported, tmp_path):
    from repro.measure import engine_bench

    model, path, _ = exported
    rows = engine_bench.bench_case(model, path, backbone="tiny", hw=(32, 48), threads=1, repeats=2,
                                   variants=list(engine_bench.VARIANTS), log=lambda text: None)
    by_variant = {row["variant"]: row for row in rows}
    assert set(by_variant) <= set(engine_bench.VARIANTS)
    assert {"torch_eager_vs_engines", "onnxruntime"} <= set(by_variant)
    for row in rows:
        assert set(row) == set(engine_bench.COLUMNS) and row["repeats"] == 2 and row["min_s"] <= row["median_s"]
        assert row["cpu"] and row["threads"] == 1 and row["input_hw"] == "32x48"
        assert 0.0 <= row["other_cpu_share"] <= 1.0  # measured over the timed rounds (Linux /proc/stat)
    assert by_variant["torch_eager_vs_engines"]["speedup_vs_torch_eager"] == 1.0
    assert by_variant["onnxruntime"]["argmax_agreement"] == 1.0  # a fraction, as the other inference rows
    # The evidence file keeps the engine rows only, and the warning reads it.
    evidence = engines.update_speed_evidence(
        [{**row, "speedup_vs_torch_eager": 0.5 if row["engine"] == "onnxruntime" else 2.0} for row in rows],
        tmp_path / "speed.csv")
    assert {r["engine"] for r in engines.read_speed_evidence(evidence)} <= {"onnxruntime", "openvino"}
    cpu = rows[0]["cpu"]
    warning = engines.slower_than_torch("onnxruntime", "fp32", cpu=cpu, path=evidence)
    assert warning and "slower than torch" in warning and "0.50x" in warning
    assert engines.slower_than_torch("onnxruntime", "fp32", cpu="another CPU", path=evidence) is None
    if HAS_OPENVINO:
        assert engines.slower_than_torch("openvino", "fp32", cpu=cpu, path=evidence) is None


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engine_outputs_survive_the_next_call(exported, engine):
    """An engine's output owns its memory: a later call (OpenVINO reuses its output buffer) does not change it."""
    if engine == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino not installed")
    model, path, _ = exported
    runner = engines.make_engine(engine, onnx_path=path)
    first_input, second_input = torch.randn(1, 3, 40, 56), torch.randn(1, 3, 40, 56)
    first = runner(first_input)
    kept = first.clone()
    second = runner(second_input)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    with torch.no_grad():
        diff, agreement = export.compare(model(first_input), first)
    assert diff < 1e-3 and agreement >= 0.999  # the first input's logits; argmax near-ties may flip across CPUs


def test_picking_an_engine_measured_slower_warns(exported, tmp_path, monkeypatch):
    _, path, _ = exported
    monkeypatch.setattr(engines, "slower_than_torch", lambda engine, precision: f"{engine} measured slower")
    with pytest.warns(UserWarning, match="onnxruntime measured slower"):
        engines.make_engine("onnxruntime", onnx_path=path)


def test_eval_only_routes_the_model_through_the_engine(tmp_path, monkeypatch, capsys):
    """`repro.run --eval-only --engine X` evaluates the engine's model (here a spy engine that runs the torch
    model through numpy, as the ONNX engines do) and gets the torch numbers."""
    from repro.engine import runner

    config = "experiments/mmseg_cityscapes_r50_d8_512x1024_40k.yaml"
    common = ["--smoke", "--no-progress", "--device", "cpu"]
    assert runner.main([config, *common, "--out-dir", str(tmp_path / "train")]) == 0
    checkpoint = str(tmp_path / "train" / "checkpoint_last.pt")
    calls = []

    def spy(model, *, engine, precision, metadata=None, threads=None):
        calls.append((engine, precision, metadata["classes"][:2]))
        with torch.no_grad():
            return engines.EngineModel(lambda a: model(torch.from_numpy(a)).numpy(), engine=engine,
                                       precision=precision, source="spy")

    monkeypatch.setattr(runner, "engine_model", spy)
    results = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / engine
        assert runner.main([config, *common, "--eval-only", "--checkpoint", checkpoint, "--engine", engine,
                            "--out-dir", str(out)]) == 0
        results[engine] = json.loads((out / "eval.json").read_text())
    assert calls == [("onnxruntime", "fp32", ["road", "sidewalk"])]
    assert "evaluating on engine onnxruntime fp32" in capsys.readouterr().out
    assert results["onnxruntime"] == results["torch"]
    with pytest.raises(SystemExit):  # --engine belongs to --eval-only
        runner.main([config, *common, "--engine", "onnxruntime"])
