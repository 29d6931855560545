"""Parity with mmsegmentation 1.2.2 (mmengine 0.10.7, mmcv-lite 2.1.0 with the `peers/mmcv_ops_standin.py`
stand-in for the compiled `mmcv.ops`): checks a-f on every `experiments/mmseg_*.yaml` row.

Each row names its mmsegmentation config file (header comment `mmsegmentation config: NAME.py`); the peer
builds that file's model (SyncBN as BN: one process), optimizer wrapper, schedulers and pipelines with mmseg's
own code. Weights start on the peer side (mmseg's init, then random norms and attention scale) and enter our
model through `models.load_checkpoint(source="mmseg")`, so every check also tests the import.

Spatial sizes are small (the property is the recipe, not 769x769 tensors); widths, depths, class counts,
losses, schedules and pipelines are the row's.
"""

from __future__ import annotations

import hashlib
import json
import re
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from repro.engine.config import ExperimentConfig, load_config, with_overrides
from repro.engine.data import build_dataset
from repro.engine.train import build_loss, build_model, build_optimizer, poly_lr
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
from repro.parity.fixtures import (
    FIXTURE_SIZES,
    batch_with_ignored,
    max_abs,
    max_rel,
    write_structured_dataset,
)
from repro.parity.ours import our_evaluation

NAME = "mmseg"
VERSION = "1.2.2"
PEER = register_peer(Peer(NAME, VERSION, (
    "mmsegmentation==1.2.2", "mmengine==0.10.7", "mmcv-lite==2.1.0", "opencv-python-headless", "ftfy", "regex",
)))
QUICK_CONFIG = "mmseg_cityscapes_r50_d8_769x769_40k"
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SCRIPT = PEERS_DIR / "mmseg_peer.py"
SEED = 2026

# fp32 tolerances (relative to the largest magnitude of the compared tensor). Both sides run the same torch
# build on the same CPU; what differs is the order of floating-point operations (the stand-in's and our
# criss-cross, F.cross_entropy reductions, BN batch statistics), each ~1e-7 relative, grown through 100+ layers.
TOL_LOGITS = 1e-4
TOL_LOSS = 1e-9  # b runs in float64 on both sides (see check_model)
TOL_GRAD = 1e-6
TOL_WEIGHTS = 1e-5  # f: fp32, from the well-conditioned start (fixtures.well_conditioned)
TOL_LR = 1e-12


@dataclass(frozen=True)
class Row:
    """One experiment row and its mmsegmentation config file."""

    path: Path
    cfg: ExperimentConfig
    mmseg_config: str  # e.g. "ccnet/ccnet_r50-d8_4xb2-40k_cityscapes-769x769.py"


def default_configs() -> list[Path]:
    return sorted(EXPERIMENTS.glob("mmseg_*.yaml"))


def mmseg_config_name(path: Path) -> str:
    """The mmsegmentation config file a row was transcribed from (its header comment), relative to configs/."""
    found = re.search(r"mmsegmentation config:\s*((ccnet|nonlocal)_\S+?\.py)", path.read_text())
    if not found:
        raise ValueError(f"{path}: no 'mmsegmentation config: <name>.py' comment in the header")
    folder = "ccnet" if found.group(2) == "ccnet" else "nonlocal_net"
    return f"{folder}/{found.group(1)}"


def peer_config_path(python: Path, name: str) -> str:
    """mmseg ships its configs inside the package (mmseg/.mim/configs)."""
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    path = site / "mmseg" / ".mim" / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in the mmseg package")
    return str(path)


_row = row_maker(NAME, VERSION)


def _our_model(cfg: ExperimentConfig) -> nn.Module:
    cfg = with_overrides(cfg, {"model.pretrained_backbone": None, "model.backend": "naive"})
    return build_model(cfg, device=torch.device("cpu"))


def _dropout_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout | nn.Dropout2d):
            module.p = 0.0


def _head_logits(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    features = model.backbone(images)
    out = {"decode": model.decode_head(features[-1])}
    if model.auxiliary_head is not None:
        out["aux"] = model.auxiliary_head(features[-2])
    return out


def _import(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True):
    return models.load_checkpoint(model, state, source="mmseg", strict=strict)


def check_model(row: Row, python: Path, work: Path, *, quick: bool) -> list[ParityRow]:  # noqa: ARG001
    """Checks a (import, logits), b (loss, gradients), c (parameter groups), f (SGD trajectory): one peer run,
    one batch per step; a and b use the first step's batch (b is the first step of f, in float64)."""
    cfg, name = row.cfg, row.path.stem
    classes, ignore = cfg.model.num_classes, cfg.data.ignore_index
    # Odd sizes, small: the recipe, not the resolution, is what a, b and f test.
    step_size = (33, 41)
    steps = [batch_with_ignored(batch=2, size_hw=step_size, num_classes=classes, seed=SEED + 1 + k)
             for k in range(5)]
    images, labels = steps[0]
    torch.save({"images": [s[0] for s in steps], "labels": [s[1] for s in steps]}, work / "steps.pt")
    job = {"config_py": peer_config_path(python, row.mmseg_config), "seed": SEED, "out": str(work),
           "steps": str(work / "steps.pt"), "train_start": True}
    (work / "model.json").write_text(json.dumps(job))
    # The weights first (mmseg's init: a second), then mmseg's checks in the peer while ours run here (two
    # processes, the two cores).
    with timed(NAME, name, "  peer weights"):
        call_peer(python, SCRIPT, "weights", work / "model.json", cwd=work, timeout=600)
    state, start = load_tensors(work / "state.pt"), load_tensors(work / "state_train.pt")
    with ThreadPoolExecutor(max_workers=1) as pool:
        peer_run = pool.submit(call_peer, python, SCRIPT, "model", work / "model.json", cwd=work, timeout=900)
        try:
            with timed(NAME, name, "  ours a,b,c,f"):
                ours = _our_side(cfg, state, start, steps)
        finally:
            with timed(NAME, name, "  peer wait"):
                peer_run.result()
    peer = load_tensors(work / "model.pt")
    rows: list[ParityRow] = []

    # a. the same weights through our import; decode and aux logits in eval and train mode.
    report = ours["import"]
    rows.append(_row(name, "a_import", "missing+unexpected keys", len(report.missing) + len(report.unexpected), 0,
                     f"{len(report.loaded)} tensors loaded from mmseg's state dict"))
    for head in ("decode", "aux"):
        rows.append(_row(name, "a_logits", f"{head} eval max rel diff", max_rel(ours["eval"][head],
                         peer["eval"][head]), TOL_LOGITS, f"input {tuple(images.shape)}"))
    for head in ("decode", "aux"):
        rows.append(_row(name, "a_logits", f"{head} train max rel diff", max_rel(ours["train"][head],
                         peer["train"][head]), TOL_LOGITS, "batch statistics, dropout off"))

    # b. the first training step's loss and gradients (ignored pixels in the batch), both sides in float64 from
    # the well-conditioned start: in fp32 a gradient that is 0 in exact arithmetic (the key conv's bias shifts a
    # softmax row by a constant; a bias before a train-mode norm) is rounding noise, so fp32 could not hold the
    # loss to 1e-9 nor every gradient to 1e-6; one float64 step costs about what the five fp32 steps of f cost.
    parts, theirs = ours["loss"], peer["loss"]
    ignored = float((labels == ignore).float().mean())
    rows.append(_row(name, "b_loss", "decode loss rel diff",
                     abs(parts["decode"] - theirs["decode.loss_ce"].item()) / theirs["decode.loss_ce"].item(),
                     TOL_LOSS, f"{ignored:.1%} pixels ignored; ours {parts['decode']:.6f}; mmseg divides the "
                     "summed loss by numel + float32 eps (losses/utils.py weight_reduce_loss), 2.6e-11 relative"))
    rows.append(_row(name, "b_loss", "aux loss rel diff (x aux_weight)",
                     abs(cfg.train.aux_weight * parts["aux"] - theirs["aux.loss_ce"].item())
                     / theirs["aux.loss_ce"].item(), TOL_LOSS, f"aux_weight {cfg.train.aux_weight}"))
    # Our float32 model of f, reused to map the peer's tensors (gradients, then each step's state) to our names.
    reference = ours["model"]
    with timed(NAME, name, "  compare b"):
        grad_report = _import(reference, {**start, **peer["grads"]})
    ours_grads = ours["grads"]
    worst, worst_name = 0.0, ""
    theirs_grads = {k: v.detach().clone() for k, v in reference.named_parameters()}
    # A gradient that is 0 in exact arithmetic (the key conv's bias in a softmax row; the non-local g conv's bias
    # before a train-mode norm) is fp64 rounding noise on both sides, ~1e-15 of the largest gradient after sums
    # over 1e5 terms: measure every tensor against at least 1e-7 x the largest gradient (the transported
    # gradients are float32, 6e-8 relative).
    floor = 1e-7 * max(g.abs().max().item() for g in ours_grads.values())
    with timed(NAME, name, "  compare b"):
        for key, grad in ours_grads.items():
            diff = max_rel(grad, theirs_grads[key], floor=floor)
            if diff > worst:
                worst, worst_name = diff, key
    rows.append(_row(name, "b_grads", "max rel diff over parameters (fp64)", worst, TOL_GRAD,
                     f"{len(ours_grads)} parameters, worst {worst_name}; peer gave {len(peer['grads'])} grads "
                     f"({len(grad_report.loaded)} tensors mapped); the first step of f, from its start"))
    del theirs_grads
    if cfg.train.loss == "ohem":
        rows.append(not_run_row(source=NAME, version=VERSION, config=name, check="b_ohem",
                                reason="mmseg rows do not use OHEM"))

    # c. parameter groups (the learning rate schedule is check_lr, per row).
    ours_groups = ours["groups"]
    same = ours_groups == peer["groups"] and ours["optimizer"] == peer["optimizer"]
    rows.append(_row(name, "c_groups", "param groups differing", 0 if same else 1, 0,
                     f"ours {ours_groups} vs mmseg {peer['optimizer']} {peer['groups']}: one group, the same "
                     "weight decay for every parameter kind (norms and biases included)"))

    # f. five SGD steps from the well-conditioned start on the same batches, in float32 (fixtures.well_conditioned
    # says why that start and not a's weights); each of mmseg's steps against ours.
    with timed(NAME, name, "  compare f"):
        per_step = _compare_steps(ours["trajectory"], reference, work)
    precision, detail = "fp32", ""
    if max(v for v, _ in per_step) > TOL_WEIGHTS:
        # Five fp32 steps amplify the two sides' last-bit differences (b: equal gradients to 1e-7 in float64, a:
        # bit-equal logits) chaotically on some rows (measured: 2.7e-4 at step 5 on the ADE20K R-50 row, with the
        # divergence entering at step 4 through the stem's gradient). The same steps in float64 on both sides
        # decide: rounding then stays ~1e-9 and a recipe difference is as large as in fp32.
        detail = "; fp32 parted (" + ", ".join(f"{v:.1e} ({k})" for v, k in per_step) + "), so both sides in fp64"
        precision = "fp64"
        with timed(NAME, name, "  f in fp64"):
            job64 = {**job, "out": str(work)}
            (work / "trajectory.json").write_text(json.dumps(job64))
            with ThreadPoolExecutor(max_workers=1) as pool:
                peer_run = pool.submit(call_peer, python, SCRIPT, "trajectory", work / "trajectory.json", cwd=work,
                                       timeout=900)
                try:
                    model64 = _our_model(cfg).double()
                    _dropout_off(model64)
                    model64.train()
                    _import(model64, start)
                    criterion = build_loss(cfg.train, ignore_index=cfg.data.ignore_index)
                    states64 = [{k: v.float() if v.is_floating_point() else v.clone() for k, v in s.items()}
                                for s in _trajectory(cfg, model64, steps, criterion)]
                    del model64
                finally:
                    peer_run.result()
            per_step = _compare_steps(states64, reference, work)
    (work / "model.pt").unlink()
    (work / "state_train.pt").unlink()
    rows.append(_row(name, "f_trajectory", "max rel weight diff over 5 steps", max(v for v, _ in per_step),
                     TOL_WEIGHTS, f"{precision}, well-conditioned start; per step "
                     + ", ".join(f"{v:.1e} ({k})" for v, k in per_step) + detail))
    return rows


def _compare_steps(states: list[dict], reference: nn.Module, work: Path) -> list[tuple[float, str]]:
    """Per step, the worst tensor of ours (`states`) against mmseg's `stepN.pt` (mapped through `reference`, our
    float32 model); each file is deleted once compared (0.2 GB for R-101)."""
    per_step = []
    for step, ours_state in enumerate(states):
        step_file = work / f"step{step + 1}.pt"
        _import(reference, load_tensors(step_file))
        per_step.append(_worst_rel(ours_state, reference.state_dict()))
        step_file.unlink()
    return per_step


def _our_side(cfg: ExperimentConfig, state: dict, start: dict, steps: list) -> dict:
    """Everything check_model compares, computed on our model from mmseg's weights: the import report and the
    eval and train-mode head logits (`state`, first batch), the float64 loss parts and gradients of the first
    step and the float32 five-step trajectory (`start`, mmseg's well-conditioned copy), and the parameter
    groups."""
    images, labels = steps[0]
    model = _our_model(cfg)
    out: dict = {"import": _import(model, state)}
    model.eval()
    with torch.no_grad():
        out["eval"] = _head_logits(model, images)
    _dropout_off(model)
    model.train()
    with torch.no_grad():
        out["train"] = _head_logits(model, images)
    # b: the first step in float64 (the same module, converted: no second construction).
    trained = model.double()
    _import(trained, start)
    criterion = build_loss(cfg.train, ignore_index=cfg.data.ignore_index)
    parts = criterion.parts(trained(images.double()), labels)
    parts["total"].backward()
    out["loss"] = {k: float(v.detach()) for k, v in parts.items()}
    # float32 copies (6e-8 relative, like the peer's)
    out["grads"] = {k: p.grad.detach().float() for k, p in trained.named_parameters()}
    optimizer = build_optimizer(trained, cfg.train)
    out["groups"] = [{k: float(g[k]) for k in ("lr", "momentum", "weight_decay", "dampening")}
                     | {"nesterov": bool(g["nesterov"]), "params": len(g["params"])} for g in optimizer.param_groups]
    out["optimizer"] = type(optimizer).__name__
    del optimizer
    # f: float32, from the same start.
    trained = trained.float()
    trained.zero_grad(set_to_none=True)
    _import(trained, start)
    out["trajectory"] = [{k: v.clone() for k, v in step_state.items()}
                         for step_state in _trajectory(cfg, trained, steps, criterion)]
    out["model"] = trained
    return out


def lr_steps(cfg: ExperimentConfig) -> list[int]:
    T = cfg.train.iterations
    return sorted({0, 1, T // 2, T - 1, T})


def check_lr(rows: list[Row], python: Path, work: Path) -> list[ParityRow]:
    """Check c, the schedule: mmengine's PolyLR (through the config's param_scheduler) against train.poly_lr at
    steps 0, 1, T/2, T-1, T of every row, in one peer run."""
    # One mmseg config per number of iterations: the rows' schedules are the same PolyLR of
    # configs/_base_/schedules/schedule_<T>.py (the peer reports each one's param_scheduler, compared below).
    representative = {}
    for row in rows:
        representative.setdefault(row.cfg.train.iterations, row)
    configs = {peer_config_path(python, r.mmseg_config): lr_steps(r.cfg) for r in representative.values()}
    job = {"configs": configs, "out": str(work / "lr.json")}
    (work / "lr_job.json").write_text(json.dumps(job))
    call_peer(python, SCRIPT, "lr", work / "lr_job.json", cwd=work, timeout=600)
    peer = json.loads((work / "lr.json").read_text())
    out = []
    for row in rows:
        source_row = representative[row.cfg.train.iterations]
        theirs = peer[peer_config_path(python, source_row.mmseg_config)]
        steps = lr_steps(row.cfg)
        worst = max(abs(poly_lr(step, row.cfg.train) - theirs["lr"][str(step)]) for step in steps)
        out.append(_row(row.path.stem, "c_lr", f"max abs LR diff at steps {steps}", worst, TOL_LR,
                        f"mmseg ({source_row.mmseg_config}) "
                        + "; ".join(f"{s}: {theirs['lr'][str(s)]:.6g}" for s in steps)))
        out.append(_row(row.path.stem, "c_lr", "iterations differing",
                        abs(theirs["max_iters"] - row.cfg.train.iterations), 0,
                        f"mmseg max_iters {theirs['max_iters']}, schedulers {theirs['schedulers']}"))
    return out


def _trajectory(cfg: ExperimentConfig, model: nn.Module, steps: list, criterion: nn.Module) -> Iterator[dict]:
    """Our training steps (train.py's optimizer and poly LR, dropout off) on `model` (train mode, dropout off; the
    images cast to its dtype), yielding the state dict after each (the live tensors: read it before asking for
    the next)."""
    optimizer = build_optimizer(model, cfg.train)
    dtype = next(model.parameters()).dtype
    for step, (step_images, step_labels) in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(step, cfg.train)
        criterion(model(step_images.to(dtype)), step_labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield {k: v.detach() for k, v in model.state_dict().items()}


def _worst_rel(ours: dict, theirs: dict) -> tuple[float, str]:
    """The worst per-tensor relative difference; a tensor that is ~0 (a bias whose gradient is 0 in exact
    arithmetic, left at its initial 0) is measured against 1e-3 x the largest weight of the model instead."""
    worst, worst_key = 0.0, ""
    floor = 1e-3 * max(v.abs().max().item() for v in theirs.values() if v.is_floating_point() and v.numel())
    for key, value in ours.items():
        if key.endswith("num_batches_tracked") or not value.numel():
            continue
        other = theirs[key]
        if value.shape != other.shape:
            raise ValueError(f"{key}: shapes differ: ours {tuple(value.shape)}, theirs {tuple(other.shape)}")
        # In the tensors' own float32 (max_rel's float64 copies cost 3 s per R-50 state): the difference of two
        # float32 numbers this close is exact (Sterbenz), the maxima are float32 numbers themselves.
        diff = (value - other).abs().max().item() / max(other.abs().max().item(), floor)
        if diff > worst:
            worst, worst_key = diff, key
    return worst, worst_key


class ReplayRng:
    """Stands in for the np.random.Generator our TrainTransform draws from, answering with the draws mmseg's
    pipeline made (recorded in the peer), in order; each call checks that it asks for the same kind and range of
    number mmseg drew, so a recipe that draws differently fails loudly instead of silently desynchronising."""

    def __init__(self, draws: list) -> None:
        self.draws = list(draws)
        self.used = 0

    def _next(self, expected: tuple[str, ...]):
        if self.used >= len(self.draws):
            raise AssertionError(f"our pipeline draws more numbers than mmseg's ({len(self.draws)})")
        name, args, kwargs, value = self.draws[self.used]
        self.used += 1
        if name not in expected:
            raise AssertionError(f"draw {self.used}: ours asks {expected}, mmseg drew {name}{tuple(args)}")
        return name, args, kwargs, value

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        name, args, _, value = self._next(("random_sample", "uniform"))
        if name == "random_sample":  # mmcv RandomResize: random_sample() * (max - min) + min
            return value * (high - low) + low
        if tuple(args) != (low, high):
            raise AssertionError(f"uniform({low}, {high}) where mmseg drew uniform{tuple(args)}")
        return value

    def integers(self, low: int, high: int | None = None) -> int:
        _, args, _, value = self._next(("randint",))
        ours = (0, low) if high is None else (low, high)
        theirs = (0, args[0]) if len(args) == 1 else tuple(args[:2])
        if ours != tuple(theirs):
            raise AssertionError(f"integers{ours} where mmseg drew randint{tuple(args)}")
        return int(value)

    def random(self) -> float:
        # mmcv RandomFlip: np.random.choice(['horizontal', None], p=[prob, 1 - prob]).
        _, _, _, value = self._next(("choice", "rand", "random_sample"))
        if isinstance(value, float):
            return value
        return 0.0 if value == "horizontal" else 0.999


def check_data(row: Row, python: Path, work: Path, *, quick: bool) -> list[ParityRow]:
    """Check d: mmseg's train_pipeline + data preprocessor and our TrainTransform on the same files."""
    cfg, name = row.cfg, row.path.stem
    dataset = cfg.data.dataset
    root = work / "data"
    count = 3 if quick else 6
    pairs = write_structured_dataset(dataset, root, split="train", count=count, num_classes=cfg.model.num_classes,
                                     seed=SEED)
    # The fixture images are small; scale the row's resize bounds and crop by one factor so the crop still
    # fits inside some rescaled images and not others (both branches of RandomCrop, and the padding).
    factor = 16
    base = tuple(max(1, b // factor) for b in cfg.data.base_size)
    crop = tuple(max(1, c // factor) for c in cfg.data.crop_size)
    # In the order our loader lists them (Cityscapes: sorted paths), so sample i is the same file on both sides.
    pairs = sorted(pairs, key=lambda pair: str(pair[0])) if dataset == "cityscapes" else pairs
    peer_pairs = []
    for image_path, label_path in pairs:
        label = label_path
        if dataset == "cityscapes":  # mmseg reads the converter's labelTrainIds
            label = label_path.with_name(label_path.name.replace("_labelIds", "_labelTrainIds"))
        peer_pairs.append([str(image_path), str(label)])
    types = _peer_pipeline_types(python, row)
    expected = ["LoadImageFromFile", "LoadAnnotations", "RandomResize", "RandomCrop", "RandomFlip",
                "PhotoMetricDistortion"]
    if types[:6] != expected or types[-1] != "PackSegInputs" or types[6:-1] not in ([], ["Pad"]):
        raise ValueError(f"{row.mmseg_config}: train_pipeline {types} is not the one this check knows")
    options = {"train_pipeline.2.scale": list(base), "train_pipeline.3.crop_size": list(crop),
               "model.data_preprocessor.size": list(crop)}
    if "Pad" in types:
        options["train_pipeline.6.size"] = list(crop)  # pascal_voc12_aug.py: Pad(size=crop_size)
    job = {"config_py": peer_config_path(python, row.mmseg_config), "seed": SEED, "out": str(work),
           "pairs": peer_pairs, "reduce_zero_label": dataset == "ade20k", "cfg_options": options}
    (work / "data.json").write_text(json.dumps(job))
    call_peer(python, SCRIPT, "data", work / "data.json", cwd=work, timeout=600)
    peer = load_tensors(work / "data.pt")
    changes = {"data.root": str(root), "data.train_split": "train", "data.base_size": list(base),
               "data.crop_size": list(crop)}
    pads_raw = "Pad" in types
    if pads_raw:  # the row follows 0.30.0 (pad after normalising); 1.2.2's pascal_voc12_aug.py pads raw 0 first
        changes["data.pad_fill"] = "raw_zero"
    small = with_overrides(cfg, changes)
    ours_data = build_dataset(small.data, split="train")
    if [str(image) for image, _ in ours_data.pairs] != [image for image, _ in peer_pairs]:
        raise ValueError(f"our loader lists {ours_data.pairs} but the peer was given {peer_pairs}")
    worst_decode = worst_label_load = worst_image = label_diff = 0.0
    used = []
    for index in range(len(pairs)):
        image, label = ours_data.load(index)
        worst_decode = max(worst_decode, max_abs(torch.from_numpy(image.astype(np.int64)),
                                                 peer["decoded"][index].long()))
        worst_label_load = max(worst_label_load, max_abs(torch.from_numpy(label.astype(np.int64)),
                                                         peer["labels_loaded"][index]))
        rng = ReplayRng(json.loads(peer["draws"][index]))
        image_t, label_t = ours_data.train_transform(image, label, rng=rng)
        if rng.used != len(rng.draws):
            raise AssertionError(f"mmseg drew {len(rng.draws)} numbers, ours used {rng.used}")
        used.append(rng.used)
        worst_image = max(worst_image, max_abs(image_t, peer["images"][index]))
        label_diff = max(label_diff, float((label_t != peer["labels"][index]).float().mean()))
    detail = f"{len(pairs)} files, draws per sample {used}, crop {crop}, scale bounds {base}" + (
        "; with data.pad_fill=raw_zero (1.x's Pad before normalising; the row keeps 0.30.0's normalised_zero)"
        if pads_raw else "")
    return [
        _row(name, "d_decode", "image max abs diff (uint8)", worst_decode, 0, "JPEG/PNG decode"),
        _row(name, "d_decode", "label max abs diff", worst_label_load, 0, "train ids after loading"),
        _row(name, "d_pipeline", "image max abs diff (normalised)", worst_image, 1e-5,
             detail + "; float32 (x - mean) / std on both sides, so equal up to 1 ulp"),
        _row(name, "d_pipeline", "label pixels differing", label_diff, 0, detail),
    ]


EVAL_FACTOR = 16  # fixture sizes: the row's test scale, windows and strides divided by this
# The validation images of check e for slide rows: two of FIXTURE_SIZES' shapes at half size (a landscape and a
# portrait one). mmseg 1.x's TTA resizes the original image by the ratio alone, so with the full-size images its
# 12 views of each image held 4-35 windows (317 R-101 window forwards per side and image set, x2 for the flip),
# and check e of one 769 x 769 R-101 row took 8 minutes. At half size its views hold 1-12 windows: one view
# smaller than a window (ratio 0.5, predicted as it is), views of 2-4 windows per axis, last windows clamped to
# the image edge (tests/test_parity.py checks these). The 0.30.0 views (the test scale's bounds x ratio) do not
# depend on the image size: there each image costs the same, 70-85 s of a full run's 14 minutes for the four
# 769 x 769 rows with three images, which is why there are two.
EVAL_SIZES = ((41, 79), (61, 45))  # odd, non-square (H, W)


def is_slide(cfg: ExperimentConfig) -> bool:
    return cfg.eval.mode == "slide" or getattr(cfg.eval, "ms_mode", None) == "slide"


def eval_sizes(cfg: ExperimentConfig) -> tuple[tuple[int, int], ...]:
    """The validation images of check e: EVAL_SIZES for slide rows, else FIXTURE_SIZES."""
    return EVAL_SIZES if is_slide(cfg) else FIXTURE_SIZES


def small_eval_overrides(cfg: ExperimentConfig) -> dict:
    """Our eval section at fixture size: the row's test scale and slide windows divided by EVAL_FACTOR."""
    ev = cfg.eval
    out = {}
    if ev.scale is not None:
        out["eval.scale"] = [max(1, v // EVAL_FACTOR) for v in ev.scale]
    if is_slide(cfg):
        out["eval.crop_size"] = [max(1, v // EVAL_FACTOR) for v in ev.crop_size]
        out["eval.stride"] = [max(1, v // EVAL_FACTOR) for v in ev.stride]
    return out


def mmseg_1x_eval(cfg: ExperimentConfig) -> dict:
    """The one mapping from a row's evaluation to mmseg 1.2.2's test setup: the rows follow 0.30.0 (see their
    notes); 1.x's tta_pipeline resizes the original image by the ratio alone (Resize(scale_factor=r))."""
    return {"eval.ms_resize": "cv2_original_ratio"} if cfg.eval.ms_flip else {}


def check_eval(row: Row, python: Path, work: Path, *, quick: bool) -> list[ParityRow]:
    """Check e: mmseg's Runner.test (and --tta) and `python -m repro.run --eval-only` on the same checkpoint and
    a small dataset in the row's real layout (validation split only)."""
    from PIL import Image

    cfg, name = row.cfg, row.path.stem
    state_file = work.parents[1] / _digest(model_key(row)) / "model" / "state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: check e needs the weights of check a (run the model check first)")
    checkpoint = work / "mmseg_checkpoint.pth"
    torch.save({"state_dict": load_tensors(state_file), "meta": {}}, checkpoint)
    root = work / "data"
    count = len(eval_sizes(cfg))  # one image of each size
    write_structured_dataset(cfg.data.dataset, root, split=cfg.data.val_split, count=count,
                             num_classes=cfg.model.num_classes, seed=SEED + 7, sizes=eval_sizes(cfg))
    small = small_eval_overrides(cfg)
    overrides = {"data.root": str(root), **small, **mmseg_1x_eval(cfg)}
    job = {"config_py": peer_config_path(python, row.mmseg_config), "out": str(work), "checkpoint": str(checkpoint),
           "data_root": str(root), "scale": small.get("eval.scale"), "crop_size": small.get("eval.crop_size"),
           "stride": small.get("eval.stride"), "tta": bool(cfg.eval.ms_flip and not quick)}
    (work / "test.json").write_text(json.dumps(job))
    # mmseg's test runs in its process while ours run here (the two cores).
    with ThreadPoolExecutor(max_workers=1) as pool:
        peer_run = pool.submit(call_peer, python, SCRIPT, "test", work / "test.json", cwd=work, timeout=900)
        try:
            done, predictions, dataset = _our_eval(row, checkpoint, work, overrides, quick=quick)
        finally:
            peer_run.result()
    theirs = json.loads((work / "metrics.json").read_text())
    if done.returncode != 0:
        raise RuntimeError(f"repro.run --eval-only exited {done.returncode}: {done.stderr.strip()[-400:]}")
    ours = json.loads((work / "ours" / "eval.json").read_text())["metrics"]
    rows = [_row(name, "e_eval", "mIoU abs diff (single scale, points)",
                 abs(theirs["single"]["mIoU"] - ours["mIoU"]["mIoU"]), 0.01,
                 f"mmseg Runner.test {theirs['single']['mIoU']:.2f} (rounded to 0.01 by IoUMetric), ours "
                 f"{ours['mIoU']['mIoU']:.4f}; "
                 f"{count} images, {cfg.eval.mode}, overrides {small}")]
    if job["tta"]:
        rows.append(_row(name, "e_eval", "mIoU abs diff (ms+flip, points)",
                         abs(theirs["tta"]["mIoU"] - ours["mIoU_ms_flip"]["mIoU"]), 0.01,
                         f"mmseg --tta {theirs['tta']['mIoU']:.2f}, ours {ours['mIoU_ms_flip']['mIoU']:.4f} "
                         f"with {mmseg_1x_eval(cfg)} (1.x's TestTimeAug)"))
    # Per-pixel agreement of the single-scale predictions.
    agree, total = 0, 0
    for index, train_ids in predictions.items():
        stem = Path(dataset.pairs[index][0]).stem
        predicted = np.array(Image.open(work / "pred_single" / f"{stem}.png")).astype(np.int64)
        if cfg.data.dataset == "ade20k":  # IoUMetric writes pred + 1 for reduce_zero_label datasets
            predicted = predicted - 1
        agree += int((predicted == train_ids).sum())
        total += train_ids.size
    rows.append(_row(name, "e_pixels", "per-pixel agreement (single scale)", agree / max(total, 1), 0.999,
                     f"{total} pixels", higher_is_better=True))
    checkpoint.unlink()
    return rows


def _our_eval(row: Row, checkpoint: Path, work: Path, overrides: dict, *, quick: bool):
    """Ours for check e: `python -m repro.run --eval-only` as a user runs it (validation split only in the
    folder), its single-scale predictions from the files it saved: (completed process, {index: train ids},
    dataset)."""
    overrides = dict(overrides)
    if not (row.cfg.eval.ms_flip and not quick):
        overrides["eval.ms_flip"] = False
    settings = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return our_evaluation(row.path, checkpoint, work, settings, extra_args=("--checkpoint-source", "mmseg"),
                          out_dir=work / "ours", results=work / "ours" / "miou.csv")


def _peer_pipeline_types(python: Path, row: Row) -> list[str]:
    """The transform types of the row's mmseg train_pipeline, read from its config file and the `_base_` files it
    inherits (a `train_pipeline` in the config itself wins over its bases, as mmengine merges them). The
    positions the data check overrides are mmseg's: LoadImageFromFile, LoadAnnotations, RandomResize (2),
    RandomCrop (3), RandomFlip, PhotoMetricDistortion, [Pad (6),] PackSegInputs."""

    def find(path: Path) -> list[str] | None:
        text = path.read_text()
        if "train_pipeline = [" in text:
            start = text.index("train_pipeline = [")
            return re.findall(r"type='(\w+)'", text[start : text.index("]\n", start)])
        for base in re.findall(r"'(\.{1,2}/[\w/.-]+\.py)'", text):
            found = find((path.parent / base).resolve())
            if found is not None:
                return found
        return None

    types = find(Path(peer_config_path(python, row.mmseg_config)))
    if types is None:
        raise ValueError(f"{row.mmseg_config}: no train_pipeline in it or its _base_ files")
    return types


def _rows_of(path: Path) -> Row:
    return Row(path, load_config(path), mmseg_config_name(path))


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _without(section, *names: str) -> dict:
    return {k: v for k, v in asdict(section).items() if k not in names}


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def model_key(row: Row) -> str:
    """Rows whose a/b/f checks are the same computation: the same model and optimiser on both sides (they differ
    only in the number of iterations, whose schedule check_lr checks per row)."""
    schedule_free = re.sub(r"-\d+k_", "-Nk_", row.mmseg_config)
    train = _without(row.cfg.train, "iterations", "checkpoint_every", "log_every", "val_every", "keep_best")
    return _json([schedule_free, asdict(row.cfg.model), train, row.cfg.data.dataset])


def data_key(row: Row) -> str:
    """Rows with the same training pipeline (mmseg's dataset config and our data section)."""
    dataset_config = re.sub(r"^.*?_(\w+-\d+x\d+)\.py$", r"\1", row.mmseg_config)
    return _json([dataset_config, _without(row.cfg.data, "batch_size", "num_workers")])


def eval_key(row: Row) -> str:
    return _json([model_key(row), data_key(row), asdict(row.cfg.eval)])


# (work folder, check, key of rows that share the computation, what they share)
CHECKS = (("model", check_model, model_key, "model and optimiser"),
          ("data", check_data, data_key, "training pipeline"),
          ("eval", check_eval, eval_key, "model, data and evaluation"))


def run(configs: list[Path], *, quick: bool, workdir: Path,
        on_rows: Callable[[list[ParityRow]], None] | None = None) -> list[ParityRow]:
    """Every check on every row of `configs`. Rows that share a computation exactly (e.g. the 40k and 80k
    schedules of one model: same weights, same pipeline, same evaluation) reuse its result, and the row says so;
    the LR schedule is checked for each row. `on_rows` receives each config's rows as soon as they are complete
    (the CLI writes them, so an interrupted run keeps what it finished). A peer that cannot install raises
    PeerUnavailable (the CLI turns it into `not run` rows)."""
    python = ensure_venv(PEER)
    workdir = Path(workdir).absolute()
    rows_in = [_rows_of(path) for path in configs]
    lr_work = workdir / "lr"
    lr_work.mkdir(parents=True, exist_ok=True)
    with timed(NAME, "all rows", "c_lr"):
        lr_rows = check_lr(rows_in, python, lr_work)
    results: list[ParityRow] = []
    done: dict[tuple[str, str], tuple[str, list[ParityRow]]] = {}
    for row in rows_in:
        config_rows = [r for r in lr_rows if r.config == row.path.stem]
        for folder, check, key_of, what in CHECKS:
            key = (folder, key_of(row))
            if key in done:
                first, rows = done[key]
                config_rows += [replace(r, config=row.path.stem, detail=f"{r.detail}; computed once for the rows "
                                        f"with the same {what} as {first}") for r in rows]
                continue
            work = workdir / _digest(key[1]) / folder
            work.mkdir(parents=True, exist_ok=True)
            try:
                with timed(NAME, row.path.stem, folder):
                    rows = check(row, python, work, quick=quick)
            except PeerUnavailable as err:
                rows = [not_run_row(source=NAME, version=VERSION, config=row.path.stem, check=folder,
                                    reason=str(err))]
            except Exception as err:  # noqa: BLE001 - one failing check must not hide the others' rows
                traceback.print_exc()
                rows = [ParityRow(NAME, VERSION, row.path.stem, folder, "", "", "", "fail",
                                  f"{type(err).__name__}: {err}"[:300])]
            done[key] = (row.path.stem, rows)
            config_rows += rows
        if on_rows is not None:
            on_rows(config_rows)
        results += config_rows
    return results
