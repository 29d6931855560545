"""A 2-process DDP smoke run on CPU with the gloo backend (torchrun; `repro.engine.train` checks at the end that
the ranks hold identical parameters, so unsynchronised gradients fail the run), and the process-group
helpers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.engine.distributed import DistContext, init_distributed, shard, wrap_model
from repro.vocabulary import device_label

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (0, 1, None, True, False)
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model
    cpu = torch.device("cpu")
    two = [DistContext(rank=r, world_size=2, local_rank=r, device=cpu, backend="gloo") for r in (0, 1)]
    assert shard(5, two[0]) == [0, 2, 4] and shard(5, two[1]) == [1, 3]


@pytest.mark.slow
def test_two_process_gloo_smoke_run(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "repro.run", str(ROOT / "experiments" / "cityscapes_r2.yaml"),
        "--smoke", "--set", "model.depth=50", "--device", "cpu", "--no-progress", "--out-dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "miou.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # Only rank 0 writes: one row per metric, one log line per step.
    assert [row["metric"] for row in rows] == ["mIoU"] and rows[0]["device"] == device_label("cpu", processes=2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if record["event"] == "train"] == [1, 2]
    assert [record["metric"] for record in log if record["event"] == "eval"] == ["mIoU"]
    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and not any(key.startswith("module.") for key in state["model"])
