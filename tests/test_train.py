"""Training loop: the poly schedule, and interrupt-and-resume ending with exactly the same weights as an
uninterrupted run (deterministic CPU, tiny R-50 model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.engine.config import load_config, with_overrides
from repro.engine.data import write_fake_dataset
from repro.engine.distributed import init_distributed
from repro.engine.train import LAST_CHECKPOINT, build_loss, poly_lr, train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def tiny_config(data_root: Path, **overrides):
    """cityscapes_r2 shrunk: R-50, 16-channel heads, 33x33 crops, batch 2, 4 iterations."""
    cfg = load_config(EXPERIMENTS / "cityscapes_r2.yaml")
    settings = {
        "data.root": str(data_root),
        "data.crop_size": (33, 33),
        "data.batch_size": 2,
        "data.num_workers": 0,
        "model.depth": 50,
        "model.head_channels": 16,
        "model.aux_channels": 16,
        "model.pretrained_backbone": None,
        "train.iterations": 4,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
    }
    settings.update(overrides)
    return with_overrides(cfg, settings)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    cfg = tiny_config(root)
    write_fake_dataset(cfg.data, root, count=3, size_hw=(40, 48))
    return root


def test_poly_schedule(data_root):
    t = tiny_config(data_root, **{"train.iterations": 100, "train.min_lr": 1e-4}).train
    assert poly_lr(0, t) == pytest.approx(0.01)
    assert poly_lr(50, t) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert poly_lr(100, t) == pytest.approx(1e-4)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _mmengine_poly(lr, eta_min, power, end, steps):
    """mmengine PolyLR (optim/scheduler/param_scheduler.py): total_iters = end - begin - 1 (line 847) and the
    chainable update lr <- (lr - eta_min) * (1 - 1 / (total_iters - last_step + 1)) ** power + eta_min
    (lines 879-888), one scheduler step after each iteration while last_step < end; returns the lr each
    iteration 0..steps-1 trains with."""
    total_iters, value, values = end - 1, lr, []
    for step in range(steps):
        values.append(value)
        last_step = step + 1
        if last_step < end:
            value = (value - eta_min) * (1 - 1 / (total_iters - last_step + 1)) ** power + eta_min
    return values


@pytest.mark.parametrize("iterations", [40000, 20000, 7])
def test_poly_schedule_matches_each_source(data_root, iterations):
    T = iterations
    steps = [0, 1, T // 2, T - 1, T]
    mmseg = tiny_config(data_root, **{
        "train.iterations": T, "train.min_lr": 1e-4, "train.poly_horizon": "iterations_minus_one",
    }).train
    reference = _mmengine_poly(0.01, 1e-4, 0.9, T, T + 1)
    for step in steps:
        assert poly_lr(step, mmseg) == pytest.approx(reference[step], rel=1e-6)
    assert poly_lr(T - 1, mmseg) == pytest.approx(1e-4, rel=1e-12)  # eta_min reached at the last step
    # speedinghzl/CCNet train.py: lr_poly(base_lr, i_iter, num_steps, power) = base_lr * (1 - i / max) ** power.
    official = tiny_config(data_root, **{"train.iterations": T}).train
    for step in steps:
        assert poly_lr(step, official) == pytest.approx(0.01 * (1 - step / T) ** 0.9, rel=1e-6, abs=1e-15)
    # sssegmentation PolyScheduler.updatelr (polyscheduler.py line 24), min_lr = lr * 0.01 (basescheduler.py
    # line 15), cur_iter counted from 0 before each step.
    ssseg = tiny_config(data_root, **{"train.iterations": T, "train.min_lr": 0.01 * 0.01}).train
    for step in steps:
        expected = (1 - step / T) ** 0.9 * (0.01 - 1e-4) + 1e-4
        assert poly_lr(step, ssseg) == pytest.approx(expected, rel=1e-6)
    if T == 40000:
        # The end point matters: at the last step the two horizons differ by 7.1e-3 relative (issue 13).
        ratio = poly_lr(T - 1, tiny_config(data_root, **{"train.iterations": T, "train.min_lr": 1e-4}).train) / 1e-4
        assert ratio == pytest.approx(1 + (0.01 - 1e-4) * (1 / T) ** 0.9 / 1e-4, rel=1e-9)
        assert 7.0e-3 < ratio - 1 < 7.2e-3


def test_rows_schedules_follow_their_sources():
    """The shipped rows, not overrides: lr at 0, 1, T/2, T-1, T against each source's formula."""
    ssseg = load_config(EXPERIMENTS / "ssseg_voc_r50_d8.yaml").train
    T = ssseg.iterations
    for step in (0, 1, T // 2, T - 1, T):
        # sssegmentation: min_lr defaults to lr * 0.01 (basescheduler.py line 15); coeff (1 - k / T) ** 0.9.
        expected = (1 - step / T) ** 0.9 * (ssseg.lr - ssseg.lr * 0.01) + ssseg.lr * 0.01
        assert poly_lr(step, ssseg) == pytest.approx(expected, rel=1e-6)
    assert poly_lr(T - 1, ssseg) == pytest.approx(1.0072e-4, rel=1e-4)  # not ~4e-7 as with min_lr 0
    mmseg = load_config(EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml").train
    reference = _mmengine_poly(0.01, 1e-4, 0.9, mmseg.iterations, mmseg.iterations + 1)
    for step in (0, 1, mmseg.iterations // 2, mmseg.iterations - 1, mmseg.iterations):
        assert poly_lr(step, mmseg) == pytest.approx(reference[step], rel=1e-6)
    official = load_config(EXPERIMENTS / "cityscapes_r2.yaml").train
    for step in (0, 1, 30000, 59999):
        assert poly_lr(step, official) == pytest.approx(0.01 * (1 - step / 60000) ** 0.9, rel=1e-6)


def test_build_loss_averages_as_the_config_says(data_root):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 6, 6, generator=generator)
    target = torch.randint(0, 19, (2, 6, 6), generator=generator)
    target[:, :2] = 255
    outputs = (logits, logits.flip(-1))
    losses = {}
    for average in ("all_pixels", "valid_pixels"):
        train_cfg = tiny_config(data_root, **{"train.loss_average": average}).train
        losses[average] = build_loss(train_cfg, ignore_index=255)(outputs, target)
    valid_fraction = float((target != 255).float().mean())
    torch.testing.assert_close(losses["all_pixels"], losses["valid_pixels"] * valid_fraction)


def test_interrupted_and_resumed_run_matches_uninterrupted(data_root, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        cfg = tiny_config(data_root)
        ctx = init_distributed(device="cpu")
        _, straight = train(cfg, out_dir=tmp_path / "straight", ctx=ctx, progress=False)
        _, halted = train(cfg, out_dir=tmp_path / "resumed", ctx=ctx, stop_at=2, progress=False)
        halfway = _weights(halted)
        _, resumed = train(cfg, out_dir=tmp_path / "resumed", ctx=ctx, resume=True, progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    final, again = _weights(straight), _weights(resumed)
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), key
    # The interruption really happened half way: weights moved between step 2 and step 4.
    moved = [k for k in final if final[k].is_floating_point() and not torch.equal(final[k], halfway[k])]
    assert len(moved) > 10
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    # The log says where each part began: a fresh start at 0, the resume at the checkpoint's step.
    assert [(r["event"], r["step"]) for r in records if r["event"] != "train"] == [("start", 0), ("resume", 2)]
    state = torch.load(resumed, map_location="cpu", weights_only=True)
    assert state["step"] == 4
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(poly_lr(3, cfg.train))
    # Written atomically: no temporary files left next to the checkpoint.
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [LAST_CHECKPOINT, "train_log.jsonl"]


def test_resume_rejects_other_experiment(data_root, tmp_path):
    cfg = tiny_config(data_root, **{"train.iterations": 1})
    ctx = init_distributed(device="cpu")
    train(cfg, out_dir=tmp_path, ctx=ctx, progress=False)
    state = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    state["experiment"] = "something_else"
    torch.save(state, tmp_path / LAST_CHECKPOINT)
    with pytest.raises(ValueError, match="belongs to experiment 'something_else'"):
        train(cfg, out_dir=tmp_path, ctx=ctx, resume=True, progress=False)


def test_accumulation_ohem_and_bf16_autocast_run(data_root, tmp_path):
    cfg = tiny_config(
        data_root,
        **{
            "train.iterations": 1,
            "train.grad_accum_steps": 2,
            "data.batch_size": 1,
            "train.loss": "ohem",
            "train.ohem_thresh": 0.7,
            "train.ohem_min_kept": 50,
            "train.amp": "bf16",
            "model.depth": 50,
        },
    )
    model, checkpoint = train(cfg, out_dir=tmp_path, ctx=init_distributed(device="cpu"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["event"] == "train"]
    assert record["step"] == 1 and torch.isfinite(torch.tensor(record["loss"]))
    # One step of 2 micro-batches of 1 image: the logged throughput counts 2 images per step.
    assert torch.load(checkpoint, weights_only=True)["step"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _without_batch_statistics(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm replaced by the identity: the only layers whose output depends on the batch."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _without_batch_statistics(child)
    return module


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, monkeypatch):
    """One step of 2 micro-batches of 1 image moves the weights as one step of a batch of 2 (the same two images
    and augmentations), and differently from a step on the first image alone. Made exact by construction: no
    BatchNorm or dropout (batch-dependent / random), every label pixel valid so the per-image mean losses
    average to the batch mean."""
    from repro.engine import train as train_module
    from repro.engine.data import cityscapes
    from repro.engine.data.base import write_png

    root = tmp_path / "data"
    labels = cityscapes.write_fake(root, split="train", count=2, size_hw=(40, 48), seed=0)
    valid_ids = np.array([label.id for label in cityscapes._LABELS if 0 <= label.trainId < 255], dtype=np.uint8)
    rng = np.random.default_rng(0)
    for path in labels:
        write_png(path, rng.choice(valid_ids, size=(40, 48)).astype(np.uint8))
    initial: dict[str, torch.Tensor] = {}
    build = train_module.build_model

    def build_without_bn(cfg, *, device):
        model = _without_batch_statistics(build(cfg, device=device))
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train_module, "build_model", build_without_bn)

    def update(batch_size: int, accum: int) -> dict[str, torch.Tensor]:
        cfg = tiny_config(root, **{"train.iterations": 1, "data.batch_size": batch_size,
                                   "train.grad_accum_steps": accum, "model.dropout": 0.0, "train.loss": "ce"})
        model, _ = train(cfg, out_dir=tmp_path / f"b{batch_size}a{accum}", ctx=init_distributed(device="cpu"),
                         progress=False)
        return {k: v.detach() - initial[k] for k, v in model.state_dict().items() if v.is_floating_point()}

    batch, accumulated, first_only = update(2, 1), update(1, 2), update(1, 1)
    scale = max(float(delta.abs().max()) for delta in batch.values())
    assert scale > 0
    for key, delta in batch.items():
        torch.testing.assert_close(accumulated[key], delta, rtol=1e-3, atol=1e-4 * scale, msg=key)
    assert max(float((first_only[k] - batch[k]).abs().max()) for k in batch) > 1e-2 * scale


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    """Torch, NumPy and Python RNG states are stored as tensors and lists, restored exactly from a file opened
    with `torch.load(weights_only=True)`."""
    import random

    import numpy as np

    from models.checkpoints import safe_load
    from repro.engine.train import _rng_state, _set_rng_state

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save({"rng": _rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    _set_rng_state(safe_load(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
