"""The parts of the sssegmentation / PaddleSeg parity checks that run without a peer venv: the `.pdparams` reader
(a NumPy-only unpickler) and the PaddleSeg key rules, the stand-ins put on sssegmentation's path, the injected
random draws, and the row-building logic on fake peer outputs."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.checkpoints import CheckpointError, detect_source, export_state_dict, read_pdparams, safe_load
from repro.engine.config import load_config
from repro.parity import fixtures, paddleseg, ssseg

PEERS = Path(ssseg.__file__).resolve().parent / "peers"


def _load_by_path(name: str, path: Path):
    """Import one file under a private module name (the stand-ins must not shadow anything in this process)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ .pdparams


def _write_pickle(path: Path, obj, protocol: int) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_pdparams_reads_numpy_arrays_and_drops_the_name_table(tmp_path, protocol):
    state = {
        "backbone.conv1_1._conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "backbone.conv1_1._batch_norm._mean": np.linspace(-1, 1, 2).astype(np.float32),
        "steps": np.array([3], dtype=np.int64),
        "StructuredToParameterName@@": {"backbone.conv1_1._conv.weight": "conv2d_0.w_0"},
    }
    path = _write_pickle(tmp_path / "model.pdparams", state, protocol)
    loaded = safe_load(path)  # dispatched on the suffix
    assert set(loaded) == {k for k in state if not k.endswith("@@")}
    for key, value in loaded.items():
        assert isinstance(value, torch.Tensor)
        np.testing.assert_array_equal(value.numpy(), state[key])
    assert loaded["steps"].dtype == torch.int64


class _Payload:
    """A pickle that runs a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pdparams_refuses_a_malicious_pickle_without_running_it(tmp_path, protocol):
    marker = tmp_path / "it_ran"
    path = _write_pickle(tmp_path / "evil.pdparams", {"w": np.zeros(2, np.float32), "x": _Payload(marker)}, protocol)
    with pytest.raises(CheckpointError) as err:
        read_pdparams(path)
    message = str(err.value)
    assert "refused" in message and "system" in message and str(path) in message
    assert not marker.exists()


def test_pdparams_refuses_other_globals_and_non_arrays(tmp_path):
    import collections

    builtin_call = tmp_path / "eval.pdparams"
    builtin_call.write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(CheckpointError, match="builtins.eval"):
        read_pdparams(builtin_call)
    ordered = _write_pickle(tmp_path / "ordered.pdparams", collections.OrderedDict(w=np.zeros(1)), 2)
    with pytest.raises(CheckpointError, match="collections.OrderedDict"):
        read_pdparams(ordered)
    objects = _write_pickle(tmp_path / "objects.pdparams", {"w": np.array(["a", 1], dtype=object)}, 2)
    with pytest.raises(CheckpointError, match="numeric array"):
        read_pdparams(objects)
    not_a_dict = _write_pickle(tmp_path / "list.pdparams", [np.zeros(2)], 2)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_pdparams(not_a_dict)
    valid = _write_pickle(tmp_path / "valid.pdparams", {"w": np.zeros(64, np.float32)}, 4)
    truncated = tmp_path / "cut.pdparams"
    truncated.write_bytes(valid.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="damaged|not a readable"):
        read_pdparams(truncated)


def _paddle_model():
    return models.build(depth=50, stem="v1c", num_classes=5, backend="naive", aux_channels=512, contract_dilation=False)


def test_paddleseg_layout_round_trips_through_a_pdparams_file(tmp_path):
    torch.manual_seed(0)
    model = _paddle_model()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value))
    exported = export_state_dict(model, source="paddleseg")
    assert detect_source(exported) == "paddleseg"
    assert "head.out.conv_bn_relu._conv.bias" in exported and "backbone.bb_2_5.short._conv.weight" not in exported
    assert "backbone.bb_1_0.short._batch_norm._variance" in exported
    arrays = {k: v.numpy() for k, v in exported.items()}
    arrays["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(exported)}
    path = _write_pickle(tmp_path / "ccnet.pdparams", arrays, 4)
    fresh = _paddle_model()
    report = models.load_checkpoint(fresh, path)  # source detected, strict
    assert report.source == "paddleseg" and not report.missing and not report.unexpected
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)


def test_paddleseg_folds_the_aux_conv_biases_into_the_running_mean():
    model = _paddle_model()
    exported = export_state_dict(model, source="paddleseg")
    exported["aux_head.conv_bn_relu._conv.bias"] = torch.full((512,), 0.5)
    fresh = _paddle_model()
    report = models.load_checkpoint(fresh, exported, source="paddleseg")
    assert any("aux_head.conv_bn_relu._conv.bias" in note for note in report.notes)
    expected = model.state_dict()["auxiliary_head.convs.0.1.running_mean"] - 0.5
    torch.testing.assert_close(fresh.state_dict()["auxiliary_head.convs.0.1.running_mean"], expected)


# -------------------------------------------------------------------------------------------- stand-ins


def test_mmcv_crisscross_standin_matches_our_attention():
    ops = _load_by_path("ccrepro_test_mmcv_ops", PEERS / "ssseg_standins" / "mmcv" / "ops" / "__init__.py")
    torch.manual_seed(0)
    theirs = ops.CrissCrossAttention(32)
    with torch.no_grad():
        theirs.gamma.scale.fill_(0.8)
    model = models.build(depth=50, stem="v1c", num_classes=3, backend="naive", head_channels=32, aux_channels=512)
    ours = model.decode_head.attention
    state = {"cca." + k: v for k, v in theirs.state_dict().items()}
    mapped = {
        f"decode_head.attention.{k.removeprefix('cca.').replace('gamma.scale', 'gamma')}": v.reshape(-1)
        if k.endswith("gamma.scale")
        else v
        for k, v in state.items()
    }
    ours.load_state_dict({k.removeprefix("decode_head.attention."): v for k, v in mapped.items()})
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert set(theirs.state_dict()) == {
        "query_conv.weight",
        "query_conv.bias",
        "key_conv.weight",
        "key_conv.bias",
        "value_conv.weight",
        "value_conv.bias",
        "gamma.scale",
    }


def test_torchvision_box_standins():
    boxes = _load_by_path("ccrepro_test_tv_boxes", PEERS / "ssseg_standins" / "torchvision" / "ops" / "boxes.py")
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    torch.testing.assert_close(boxes.box_area(b), torch.tensor([100.0, 100, 100, 100]))
    assert boxes.nms(b, scores, 0.5).tolist() == [0, 2]  # box 1 (IoU 0.68) and box 3 (IoU 1) suppressed
    # box 3 is in another category: it survives
    assert sorted(boxes.batched_nms(b, scores, torch.tensor([0, 0, 0, 1]), 0.5).tolist()) == [0, 2, 3]


def test_scripted_draws_agree_between_the_peer_and_our_side():
    saved = list(sys.path)
    try:
        side = _load_by_path("ccrepro_test_ssseg_side", PEERS / "ssseg_side.py")
    finally:
        sys.path[:] = saved
    script = ssseg.draw_scripts(1, seed=3, length=40)[0]
    peer, ours = side.ScriptedDraws(script), ssseg.ScriptedRng(script)
    assert peer.random_sample() == ours.random()
    assert peer.uniform(0.5, 2.0) == ours.uniform(0.5, 2.0)
    # sssegmentation's own scale formula gives bit for bit our uniform
    u = script[2]
    assert peer.random_sample() * (2.0 - 0.5) + 0.5 == ours.uniform(0.5, 2.0) == 0.5 + 1.5 * u
    for low, high in ((0, 7), (-18, 18), (2, None), (0, 1)):
        assert peer.randint(low, high) == ours.integers(low, high)
    assert peer.used == ours.used
    assert all(abs(v - 0.5) > 1e-12 for v in script)
    with pytest.raises(RuntimeError, match="exhausted"):
        ssseg.ScriptedRng([]).random()


# ----------------------------------------------------------------------------------------- row logic


def _fake_model_outputs(model, cfg, names):
    """Peer outputs equal to ours (in sssegmentation's names), as run_model would return them."""
    batches = ssseg.make_batches(cfg, steps=1, size_hw=(17, 19))
    ours = ssseg.our_model_outputs(model, cfg, batches)
    ssseg.our_trajectory(model, cfg, batches, 1, first_step=ours["train"])  # b: the first step
    peer = {
        "eval": {k: v.clone() for k, v in ours["eval"].items()},
        "train": {
            **{k: v.clone() for k, v in ours["train"].items() if k in ("decode", "aux", "loss")},
            "grads": {
                names[k]: v.clone().reshape(()) if k.endswith("gamma") else v.clone()
                for k, v in ours["train"]["grads"].items()
            },
            "running": {names[k]: v.clone() for k, v in ours["train"]["running"].items()},
        },
        "schedule": {
            "max_iters": cfg.train.iterations,
            "iters_per_epoch": 661,
            "max_epochs": 60,
            "lr": {
                str(s): ssseg.poly_lr(s, cfg.train)
                for s in (0, 1, cfg.train.iterations // 2, cfg.train.iterations - 1, cfg.train.iterations)
            },
            "groups": [
                {
                    "names": [names[n] for n, _ in model.named_parameters()],
                    "momentum": 0.9,
                    "weight_decay": cfg.train.weight_decay,
                    "dampening": 0.0,
                    "nesterov": 0.0,
                }
            ],
        },
    }
    return ours, peer, batches


@pytest.fixture(scope="module")
def small_row():
    cfg = load_config(Path(ssseg.EXPERIMENTS) / "ssseg_voc_r50_d8.yaml")
    model = ssseg.seeded_model(cfg)
    return cfg, model, ssseg.name_map(model)


def test_model_rows_pass_on_equal_outputs_and_fail_on_a_perturbed_one(small_row):
    cfg, model, names = small_row
    ours, peer, batches = _fake_model_outputs(model, cfg, names)
    rows = ssseg.model_rows("ssseg_voc_r50_d8", cfg, model, names, peer, ours, None, None, batches["labels"][0])
    assert {r.check for r in rows} == {"a_model", "b_loss", "c_lr"}
    assert all(r.verdict == "pass" for r in rows), [(r.metric, r.value) for r in rows if r.verdict != "pass"]
    peer["eval"]["decode"] = peer["eval"]["decode"] * 1.001
    peer["schedule"]["max_iters"] += 1
    key = names["decode_head.classifier.weight"]
    peer["train"]["grads"][key] = peer["train"]["grads"][key] * 1.01
    peer["schedule"]["groups"][0]["weight_decay"] = 0.0
    failed = {
        r.metric
        for r in ssseg.model_rows("ssseg_voc_r50_d8", cfg, model, names, peer, ours, None, None, batches["labels"][0])
        if r.verdict == "fail"
    }
    assert failed == {
        "decode_logits_eval_max_rel_diff",
        "T_abs_diff",
        "grad_worst_rel_l2_diff",
        "params_with_other_momentum_wd",
    }


def test_trajectory_rows_compare_every_step_and_name_the_worst_tensor(small_row):
    cfg, model, names = small_row
    ours, peer, batches = _fake_model_outputs(model, cfg, names)
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(2)]
    trajectory = {
        "states": [
            {names[k]: v.clone().reshape(()) if k.endswith("gamma") else v.clone() for k, v in s.items()}
            for s in states
        ],
        "lr": [0.01, 0.0099],
        "loss": [1.0, 0.9],
    }
    trajectory["states"][1][names["backbone.stem.0.weight"]] = states[1]["backbone.stem.0.weight"] * (1 + 1e-3)
    rows = ssseg.model_rows(
        "ssseg_voc_r50_d8",
        cfg,
        model,
        names,
        peer,
        ours,
        trajectory,
        (states, [0.01, 0.0099], [1.0, 0.9]),
        batches["labels"][0],
    )
    steps = [r for r in rows if r.check == "f_train"]
    assert [r.verdict for r in steps] == ["pass", "fail"]
    assert "backbone.stem.0.weight" in steps[1].detail


def test_fixture_layout_is_what_both_sides_read(tmp_path):
    from dataclasses import replace

    from repro.engine.data import build_dataset

    for name, config in (
        ("cityscapes", "ssseg_cityscapes_r50_d8"),
        ("ade20k", "ssseg_ade20k_r50_d8"),
        ("voc", "ssseg_voc_r50_d8"),
    ):
        root = ssseg.write_fixture(name, tmp_path / name, splits=("val",))
        cfg = load_config(Path(ssseg.EXPERIMENTS) / f"{config}.yaml")
        dataset = build_dataset(replace(cfg.data, root=str(root)), split="val", eval_cfg=cfg.eval)
        assert len(dataset) == len(ssseg.FIXTURE_SIZES)
        image, label = dataset.load(0)
        assert image.shape[:2] == label.shape and label.shape in ssseg.FIXTURE_SIZES
        assert (label == cfg.data.ignore_index).any() and len(np.unique(label)) > 3
        # sssegmentation's list file names every image
        peer_root = ssseg._peer_root(name, root)
        lists = list(peer_root.rglob("val.txt"))
        assert len(lists) == 1 and len(lists[0].read_text().split()) == len(ssseg.FIXTURE_SIZES)


def test_sources_are_registered_with_their_configs():
    from repro.parity import cli

    assert cli.SOURCES["sssegmentation"] is ssseg and cli.SOURCES["paddleseg"] is paddleseg
    assert len(ssseg.default_configs()) == 12
    assert [p.stem for p in paddleseg.default_configs()] == [paddleseg.QUICK_CONFIG]
    assert ssseg.QUICK_CONFIG in {p.stem for p in ssseg.default_configs()}


# ------------------------------------------------------------------------------------------- PaddleSeg


@pytest.fixture(scope="module")
def paddle_row():
    path = Path(paddleseg.EXPERIMENTS) / f"{paddleseg.QUICK_CONFIG}.yaml"
    cfg = load_config(path, ["model.depth=50"])  # the R-50 variant of the row: same head, faster to build
    return cfg, ssseg.seeded_model(cfg)


def test_matched_variant_applies_only_the_listed_differences(paddle_row):
    cfg, model = paddle_row
    variant = paddleseg.matched_variant(model)
    shortcut = variant.backbone.layer2[0].downsample
    assert isinstance(shortcut[0], torch.nn.AvgPool2d) and shortcut[1].stride == (1, 1)
    assert isinstance(variant.decode_head.conv_in[2], torch.nn.LeakyReLU)
    assert isinstance(variant.decode_head.bottleneck[2], torch.nn.ReLU)
    # the weights are the model's, and the model itself is untouched
    assert model.backbone.layer2[0].downsample[0].stride == (2, 2)
    moved = {"backbone.layer2.0.downsample.0.": "backbone.layer2.0.downsample.1.",
             "backbone.layer2.0.downsample.1.": "backbone.layer2.0.downsample.2."}  # fmt: skip
    variant_state = variant.state_dict()
    assert len(variant_state) == len(model.state_dict())
    for key, value in model.state_dict().items():
        for old, new in moved.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        assert torch.equal(variant_state[key], value)
    with torch.no_grad():
        assert variant(torch.randn(1, 3, 33, 41)).shape == (1, cfg.model.num_classes, 33, 41)


def test_paddle_schedule_and_loss_rows_on_fake_peer_outputs(paddle_row):
    cfg, model = paddle_row
    total = cfg.train.iterations
    schedule = {
        "decay_steps": total,
        "lr": {str(s): ssseg.poly_lr(s, cfg.train) for s in (0, 1, total // 2, total - 1, total)},
        "optimizer": "Momentum", "momentum": 0.9, "decay_method": "l2_decay", "decay_coeff": cfg.train.weight_decay,
        "params": 563, "params_with_own_regularizer": 0, "lr_multipliers": [1.0],
    }  # fmt: skip
    rows = paddleseg.schedule_rows("x", cfg, model, schedule)
    assert [r.verdict for r in rows] == ["pass"] * 3
    schedule["decay_coeff"] = 5e-4
    schedule["lr"]["1"] *= 1.001
    assert [r.verdict for r in paddleseg.schedule_rows("x", cfg, model, schedule)] == ["pass", "fail", "fail"]

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, cfg.model.num_classes, 17, 19, generator=generator)
    labels = torch.randint(0, cfg.model.num_classes, (2, 17, 19), generator=generator)
    labels[:, :3] = 255
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255).item()
    peer = {"ohem": 1.0, "ohem_error": "", "ce_aux": ce, "ce_error": "", "coef": [1.0, 0.4], "ohem_kept": 100}
    rows = {r.metric: r for r in paddleseg.loss_rows("x", cfg, peer, logits, logits, labels)}
    assert rows["aux_ce_rel_diff"].verdict == "pass" and rows["loss_coef_abs_diff"].verdict == "pass"
    assert rows["ohem_decode_loss"].verdict.startswith("not run: expected difference")
    peer.update(ce_error="TypeError: promotion", ohem_error="TypeError: promotion")
    rows = {r.metric: r for r in paddleseg.loss_rows("x", cfg, peer, logits, logits, labels)}
    assert "paddlepaddle 3.x" in rows["aux_ce_rel_diff"].verdict
    assert "paddlepaddle 3.x" in rows["ohem_decode_loss"].verdict


def test_well_conditioned_start_scales_only_branch_and_head_norms(small_row):
    cfg, model, _ = small_row
    start = ssseg.well_conditioned(model)
    low, high = fixtures.TRAIN_GAMMA
    changed = []
    for (name, ours), theirs in zip(start.state_dict().items(), model.state_dict().values(), strict=True):
        if not torch.equal(ours, theirs):
            changed.append(name)
            assert name.endswith(".weight") and low <= ours.min() and ours.max() <= high, name
    modules = dict(start.named_modules())
    assert changed and all(isinstance(modules[n.removesuffix(".weight")], torch.nn.BatchNorm2d) for n in changed)
    assert {n.split(".")[0] for n in changed} == {"backbone", "decode_head", "auxiliary_head"}
    assert all(n.startswith(fixtures.HEADS) or n.endswith("bn3.weight") for n in changed)
    assert ssseg.well_conditioned(model).state_dict().keys() == start.state_dict().keys()
    torch.testing.assert_close(ssseg.well_conditioned(model).state_dict(), start.state_dict(), rtol=0, atol=0)


def test_first_step_is_check_b_and_the_trajectory_is_deterministic(small_row):
    cfg, model, _ = small_row
    batches = ssseg.make_batches(cfg, steps=2, size_hw=(17, 21))
    first: dict = {}
    states, lrs, losses = ssseg.our_trajectory(model, cfg, batches, 2, first_step=first)
    again, _, _ = ssseg.our_trajectory(model, cfg, batches, 2)
    assert [worst for worst, _ in ssseg.trajectory_diffs(states, again)] == [0.0, 0.0]
    key = "decode_head.classifier.weight"  # each step's state is a copy: the steps move it
    assert not torch.equal(states[0][key], states[1][key]) and not torch.equal(states[1][key], model.state_dict()[key])
    doubled, _, _ = ssseg.our_trajectory(model, cfg, batches, 2, dtype=torch.float64)
    assert doubled[1][key].dtype == torch.float32
    assert not torch.equal(doubled[1][key], states[1][key])  # computed in float64
    assert float(first["loss"]) == losses[0] and abs(lrs[0] - cfg.train.lr) < 1e-12
    assert set(first["grads"]) == {n for n, _ in model.named_parameters()}
    assert first["running"] and all("running_" in k for k in first["running"])


def test_peer_step_states_are_read_one_file_at_a_time(tmp_path):
    files = []
    for step in range(3):
        files.append(str(tmp_path / f"trajectory.pt.step{step + 1}"))
        torch.save({"w": torch.full((2,), float(step))}, files[-1])
    states = ssseg.StepStates(files)
    assert len(states) == 3 and states[2]["w"].tolist() == [2.0, 2.0]
    assert [state["w"][0].item() for state in states] == [0.0, 1.0, 2.0]
    ours = [{"w": torch.full((2,), float(step))} for step in range(3)]
    assert [worst for worst, _ in ssseg.trajectory_diffs(ours, states)] == [0.0, 0.0, 0.0]
