"""Parity of the mmsegmentation rows' evaluation with mmsegmentation 0.30.0 (mmcv 1.7.2 built without ops), the
version whose configs produced the published CCNet / non-local numbers and whose test protocol the rows follow
(their `eval:` comments cite 0.30.0's lines).

mmcv 1.7.2 is only published as a source archive: it is built against the venv's torch (--no-build-isolation,
setuptools < 70 for its `pkg_resources`), without ops (MMCV_WITH_OPS unset). mmcv 1.x imports torchvision at
import time (`mmcv.runner.checkpoint`, for its model-zoo URLs); the PyPI torchvision wheels are built for the CUDA
torch and fail to load their ops against the CPU build, so the peer puts a stand-in module named `torchvision`
in `sys.modules` (`peers/mmseg0_peer.py`), as it does for `mmcv.ops`. Only check e runs against 0.30.0: the
model, loss, schedule and pipeline checks are against 1.2.2 (`repro.parity.mmseg`).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from repro.parity import mmseg as mmseg1
from repro.parity.common import (
    PEERS_DIR,
    ParityRow,
    Peer,
    PeerUnavailable,
    call_peer,
    ensure_venv,
    load_tensors,
    not_run_row,
    register_peer,
    row_maker,
    timed,
)
from repro.parity.fixtures import write_structured_dataset

NAME = "mmseg"
VERSION = "0.30.0"
REGISTRY_NAME = "mmseg0"
PEER = register_peer(Peer(REGISTRY_NAME, VERSION, ("setuptools<70", "wheel"), extra_installs=(
    ("--no-build-isolation", "mmcv==1.7.2"),
    ("mmsegmentation==0.30.0", "numpy<2", "opencv-python-headless"),
)))
QUICK_CONFIG = mmseg1.QUICK_CONFIG
SCRIPT = PEERS_DIR / "mmseg0_peer.py"


def default_configs() -> list[Path]:
    return mmseg1.default_configs()


def config_name_0x(name_1x: str) -> str:
    """1.x config names -> 0.x: ccnet_r50-d8_4xb2-40k_cityscapes-769x769.py -> ccnet_r50-d8_769x769_40k_cityscapes.py
    (0.x's configs/ccnet/README.md names)."""
    folder, file = name_1x.split("/")
    stem = file.removesuffix(".py")
    model, rest = stem.split("_4xb")
    _, schedule_dataset = rest.split("-", 1)
    schedule, dataset_crop = schedule_dataset.split("_", 1)
    dataset, crop = dataset_crop.rsplit("-", 1)
    return f"{folder}/{model}_{crop}_{schedule}_{dataset}.py"


_row = row_maker(NAME, VERSION)


def check_eval(row: mmseg1.Row, python: Path, work: Path, state_file: Path, *, quick: bool) -> list[ParityRow]:
    """0.30.0's own test path (build_dataset / build_dataloader / single_gpu_test / dataset.evaluate, as its
    tools/test.py does) and `python -m repro.run --eval-only` with the row unchanged (its 0.30.0 protocol), at
    fixture size: single scale and, in the full run, the ms+flip column."""
    cfg, name = row.cfg, row.path.stem
    checkpoint = work / "mmseg_checkpoint.pth"
    torch.save({"state_dict": load_tensors(state_file), "meta": {}}, checkpoint)
    root = work / "data"
    count = len(mmseg1.eval_sizes(cfg))  # the 1.2.2 check's images
    write_structured_dataset(cfg.data.dataset, root, split=cfg.data.val_split, count=count,
                             num_classes=cfg.model.num_classes, seed=mmseg1.SEED + 7, sizes=mmseg1.eval_sizes(cfg))
    small = mmseg1.small_eval_overrides(cfg)
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    config_py = site / "mmseg" / ".mim" / "configs" / config_name_0x(row.mmseg_config)
    ms = bool(cfg.eval.ms_flip and not quick)
    job = {"config_py": str(config_py), "out": str(work), "checkpoint": str(checkpoint), "data_root": str(root),
           "scale": small.get("eval.scale"), "crop_size": small.get("eval.crop_size"),
           "stride": small.get("eval.stride"), "ms_ratios": list(cfg.eval.ms_scales) if ms else None}
    (work / "test0.json").write_text(json.dumps(job))
    overrides = {"data.root": str(root), **small}
    # 0.30.0's test runs in its process while ours runs here (the two cores): the command, which also saves its
    # single-scale predictions for the per-pixel comparison (mmseg1._our_eval).
    with ThreadPoolExecutor(max_workers=1) as pool:
        peer_run = pool.submit(call_peer, python, SCRIPT, "test", work / "test0.json", cwd=work, timeout=900)
        try:
            done, ours_single, dataset = mmseg1._our_eval(row, checkpoint, work, overrides, quick=quick)
        finally:
            peer_run.result()
    theirs = json.loads((work / "metrics0.json").read_text())
    if done.returncode != 0:
        raise RuntimeError(f"repro.run --eval-only exited {done.returncode}: {done.stderr.strip()[-400:]}")
    ours = json.loads((work / "ours" / "eval.json").read_text())["metrics"]
    rows = [_row(name, "e_eval", "mIoU abs diff (single scale, points)",
                 abs(100 * theirs["single"]["mIoU"] - ours["mIoU"]["mIoU"]), 0.01,
                 f"mmseg 0.30.0 single_gpu_test {100 * theirs['single']['mIoU']:.4f}, ours "
                 f"{ours['mIoU']['mIoU']:.4f}; {count} images, {cfg.eval.mode}, overrides {small}")]
    if ms:
        rows.append(_row(name, "e_eval", "mIoU abs diff (ms+flip, points)",
                         abs(100 * theirs["ms"]["mIoU"] - ours["mIoU_ms_flip"]["mIoU"]), 0.01,
                         f"mmseg 0.30.0 MultiScaleFlipAug {100 * theirs['ms']['mIoU']:.4f}, ours "
                         f"{ours['mIoU_ms_flip']['mIoU']:.4f} (the row's own 0.30.0 protocol)"))
    predictions = load_tensors(work / "preds0.pt")
    counts = {"single": [0, 0]}
    for index, train_ids in ours_single.items():
        stem = Path(dataset.pairs[index][0]).name
        predicted = predictions["single"][stem].numpy()
        counts["single"][0] += int((predicted == train_ids).sum())
        counts["single"][1] += train_ids.size
    agree, total = counts["single"]
    rows.append(_row(name, "e_pixels", "per-pixel agreement (single scale)", agree / max(total, 1), 0.999,
                     f"{total} pixels", higher_is_better=True))
    checkpoint.unlink()
    return rows


def run(configs: list[Path], *, quick: bool, workdir: Path,
        on_rows: Callable[[list[ParityRow]], None] | None = None) -> list[ParityRow]:
    """Check e against 0.30.0 for every row; the weights are the 1.2.2 checks' (made by mmseg 1.2.2's model
    code, the same layout in 0.30.0), made here for each row and deleted once used."""
    python = ensure_venv(PEER)
    python_1x = ensure_venv(mmseg1.PEER)
    workdir = Path(workdir).absolute()
    results: list[ParityRow] = []
    done: dict[str, tuple[str, list[ParityRow]]] = {}
    for path in configs:
        row = mmseg1._rows_of(path)
        key = mmseg1.eval_key(row)
        if key in done:
            first, rows = done[key]
            shared = [mmseg1.replace(r, config=path.stem, detail=f"{r.detail}; computed once for the rows with "
                                     f"the same model, data and evaluation as {first}") for r in rows]
            if on_rows is not None:
                on_rows(shared)
            results += shared
            continue
        model_work = workdir / "weights" / mmseg1._digest(mmseg1.model_key(row))
        state_file = model_work / "state.pt"
        # Made every run (a file left by an earlier run may come from other init code), deleted once used.
        model_work.mkdir(parents=True, exist_ok=True)
        job = {"config_py": mmseg1.peer_config_path(python_1x, row.mmseg_config), "seed": mmseg1.SEED,
               "out": str(model_work)}
        (model_work / "weights.json").write_text(json.dumps(job))
        call_peer(python_1x, mmseg1.SCRIPT, "weights", model_work / "weights.json", cwd=model_work, timeout=600)
        work = workdir / mmseg1._digest(key) / "eval0"
        work.mkdir(parents=True, exist_ok=True)
        try:
            with timed("mmseg0", path.stem, "eval"):
                rows = check_eval(row, python, work, state_file, quick=quick)
        except PeerUnavailable as err:
            rows = [not_run_row(source=NAME, version=VERSION, config=path.stem, check="eval", reason=str(err))]
        except Exception as err:  # noqa: BLE001 - one failing row must not hide the others'
            traceback.print_exc()
            rows = [ParityRow(NAME, VERSION, path.stem, "eval", "", "", "", "fail",
                              f"{type(err).__name__}: {err}"[:300])]
        state_file.unlink(missing_ok=True)  # 0.3 GB for R-101
        done[key] = (path.stem, rows)
        if on_rows is not None:
            on_rows(rows)
        results += rows
    return results
