"""Training loop: the poly schedule, and interrupt-and-resume ending with exactly the same weights as an
uninterrupted run (deterministic CPU, tiny R-50 model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repro.engine.config import load_config, with_overrides
from repro.engine.data import write_fake_dataset
from repro.engine.distributed import init_distributed
from repro.engine.train import LAST_CHECKPOINT, poly_lr, train

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
    steps = [json.loads(line)["step"] for line in log]
    assert steps == [1, 2, 3, 4]
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
            "train.ohem_min_kept": 50,
            "train.amp": "bf16",
            "model.depth": 50,
        },
    )
    model, checkpoint = train(cfg, out_dir=tmp_path, ctx=init_distributed(device="cpu"), progress=False)
    record = json.loads((tmp_path / "train_log.jsonl").read_text())
    assert record["step"] == 1 and torch.isfinite(torch.tensor(record["loss"]))
    # One step of 2 micro-batches of 1 image: the logged throughput counts 2 images per step.
    assert torch.load(checkpoint, weights_only=True)["step"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
