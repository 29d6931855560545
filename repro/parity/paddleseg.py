"""Parity with PaddleSeg 2.8.0 on paddlepaddle 3.x CPU (row `experiments/paddleseg_cityscapes_r101_d8_769x769_60k`).

The peer (`peers/paddleseg_side.py`, venv `.nox/peer-paddleseg-2.8.0/`) builds PaddleSeg's CCNet, loads our
seeded weights exported to its layout (`models.export_state_dict(source="paddleseg")`), writes them back with
`paddle.save` (a real `.pdparams` file), and returns its eval-mode logits and its criss-cross attention on the
same features. Rows:

* import: the `.pdparams` paddle wrote, read by `models.safe_load` (the NumPy-only unpickler) and mapped by
  `models.load_checkpoint` (source "paddleseg"): missing / unexpected keys, and every mapped tensor equal.
* a_model, attention: PaddleSeg's CrissCrossAttention (applied twice, recurrence 2) vs ours on the same
  q / k / v weights, gamma and input.
* a_model, whole network: eval-mode logits of the whole model and of the auxiliary head against ours with the
  two model differences the YAML's notes (1) and (4) list applied (`matched_variant`: ResNet_vd's average-pool
  shortcut in layer2, leaky ReLU after conva / convb; the conv biases before the aux norms fold exactly). The
  detail states the difference of the model as the YAML builds it: the expected difference, measured.
* c_lr: T, the LR at 0, 1, T/2, T-1, T, momentum and weight decay, against the PolynomialDecay and Momentum
  optimizer PaddleSeg's own `SegBuilder` builds from its config.
* b_loss: the auxiliary cross-entropy and the loss weights on the same logits; the OHEM (notes 3) is reported
  with both values and both kept counts, as an expected difference.
* e: PaddleSeg's evaluate against `repro.run --eval-only` (eval_rows).
d is `not run` with the reason (NOT_RUN); f is `not run` with the reason b measured (f_train_reason).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.checkpoints import export_state_dict, load_checkpoint, safe_load
from repro.engine.config import load_config
from repro.engine.train import build_loss, build_optimizer, poly_lr
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
from repro.parity.fixtures import rel_diff as _rel
from repro.parity.fixtures import seeded_model

NAME = "paddleseg"
VERSION = "2.8.0"
QUICK_CONFIG = "paddleseg_cityscapes_r101_d8_769x769_60k"
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SCRIPT = PEERS_DIR / "paddleseg_side.py"
PEER = register_peer(
    Peer(
        name="paddleseg",
        version=VERSION,
        # paddleseg declares opencv-python<=4.6.0 (no wheel for this Python) and visualdl (its training
        # logger); the model code needs neither.
        requirements=(
            "paddlepaddle>=3,<4",
            "opencv-python-headless",
            "scipy",
            "pyyaml",
            "filelock",
            "tqdm",
            "prettytable",
            "six",
            "requests",
            "scikit-learn",
        ),
        nodeps=(f"paddleseg=={VERSION}",),
    )
)
# PaddleSeg 2.8.0's losses multiply float32 by int64 tensors (cross_entropy_loss.py line 133,
# ohem_cross_entropy_loss.py line 68), which paddlepaddle 3.x's type promotion refuses (no switch restores the old
# rule: docs/guides/advanced/auto_type_promotion, "without user intervention"; still refused by 3.3.1). A second
# venv with paddlepaddle 2.6.2 (the last 2.x, cp311 wheel on PyPI), used only for the loss check b.
LOSS_PEER = register_peer(
    Peer(
        name="paddleseg-paddle2",
        version=VERSION,
        requirements=("paddlepaddle==2.6.2", "numpy<2", "opencv-python-headless<4.11", "scipy", "pyyaml", "filelock",
                      "tqdm", "prettytable", "six", "requests", "scikit-learn"),
        nodeps=(f"paddleseg=={VERSION}",),
    )
)
TOL_ATTENTION = 1e-5  # relative to max |output|: two frameworks' bmm / softmax kernels, fp32
TOL_LOGITS = 1e-5
EXPECTED = (
    "expected to differ (the YAML's notes 1 and 4: ResNet_vd average-pool shortcut in layer2, leaky ReLU "
    "after conva / convb); measured, not hidden"
)


def default_configs() -> list[Path]:
    return sorted(EXPERIMENTS.glob("paddleseg_*.yaml"))


_row = row_maker(NAME, VERSION)


def import_rows(config: str, model: torch.nn.Module, pdparams: Path, peer: dict) -> list[ParityRow]:
    """The .pdparams paddle wrote, through our reader and importer, into a fresh copy of the model."""
    rows = []
    state = safe_load(pdparams)
    fresh = seeded_model(load_config(EXPERIMENTS / f"{config}.yaml"), seed=99)
    report = load_checkpoint(fresh, state, source="paddleseg", strict=False)
    rows.append(
        _row(
            config,
            "import",
            "pdparams_missing_plus_unexpected_keys",
            len(report.missing) + len(report.unexpected),
            0,
            f"{len(report.loaded)} loaded, {len(report.ignored)} ignored; missing {list(report.missing[:3])}, "
            f"unexpected {list(report.unexpected[:3])}; peer side: {len(peer['missing'])} missing, "
            f"{len(peer['unexpected'])} unexpected of our export",
        )
    )
    ours, back = model.state_dict(), fresh.state_dict()
    worst = max(_rel(back[k], ours[k]) for k in ours if not k.endswith("num_batches_tracked"))
    rows.append(
        _row(
            config,
            "import",
            "roundtrip_max_rel_diff",
            worst,
            1e-6,
            "our weights -> PaddleSeg layout -> paddle.save .pdparams -> safe_load (NumPy-only unpickler) -> "
            "load_checkpoint; the folded aux conv biases are written as 0 and read back into the mean",
        )
    )
    return rows


def matched_variant(model: nn.Module) -> nn.Module:
    """A copy of our model with the two differences the YAML's notes (1) and (4) list applied, the weights
    unchanged: layer2's first shortcut average-pools 2x2 (ceil mode, padding excluded, as paddle's AvgPool2D
    with exclusive=True) before its 1x1 conv, which then has stride 1 (resnet_vd.py ConvBNLayer is_vd_mode);
    conv_in / conv_out end in LeakyReLU(0.01) (ccnet.py ConvBNLeakyReLU). The bottleneck keeps ReLU."""
    variant = copy.deepcopy(model)
    shortcut = variant.backbone.layer2[0].downsample
    conv = shortcut[0]
    conv.stride = (1, 1)
    variant.backbone.layer2[0].downsample = nn.Sequential(
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), conv, shortcut[1]
    )
    for block in (variant.decode_head.conv_in, variant.decode_head.conv_out):
        block[2] = nn.LeakyReLU(0.01)
    return variant.eval()


def run_one(path: Path, python: Path, workdir: Path, *, quick: bool) -> list[ParityRow]:
    cfg = load_config(path)
    config = path.stem
    folder = workdir / config
    folder.mkdir(parents=True, exist_ok=True)
    model = seeded_model(cfg)
    model.eval()
    torch.save(export_state_dict(model, source="paddleseg"), folder / "weights.pt")
    size = (33, 41) if quick else (49, 65)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, *size, generator=generator)
    features = torch.randn(1, cfg.model.head_channels, 7, 9, generator=generator)
    # loss inputs at full resolution: 2 x 97 x 129 labels (25 026 pixels, over OHEM's min_kept 10 000)
    logits = 2.0 * torch.randn(2, cfg.model.num_classes, 97, 129, generator=generator)
    aux_logits = 2.0 * torch.randn(2, cfg.model.num_classes, 97, 129, generator=generator)
    labels = torch.randint(0, cfg.model.num_classes, (2, 97, 129), generator=generator)
    labels[torch.rand(2, 97, 129, generator=generator) < 0.15] = 255
    total = cfg.train.iterations
    steps = [0, 1, total // 2, total - 1, total]
    torch.save(
        {"images": images, "features": features, "logits": logits, "aux_logits": aux_logits, "labels": labels},
        folder / "inputs.pt",
    )
    job = {"depth": cfg.model.depth, "output_stride": cfg.model.output_stride, "num_classes": cfg.model.num_classes,
           "weights": str(folder / "weights.pt"), "inputs": str(folder / "inputs.pt"), "lr_steps": steps,
           "pdparams_out": str(folder / "model.pdparams"), "out": str(folder / "out.pt")}  # fmt: skip
    (folder / "job.json").write_text(json.dumps(job))
    call_peer(python, SCRIPT, folder / "job.json", cwd=folder, timeout=900)
    peer = load_tensors(folder / "out.pt")
    if peer["loss"]["ce_error"] or peer["loss"]["ohem_error"]:
        peer["loss"] = paddle2_losses(peer["loss"], peer["paddle"], folder)
    rows = import_rows(config, model, folder / "model.pdparams", peer)
    with torch.no_grad():
        x = features
        for _ in range(2):
            x = model.decode_head.attention(x)
        rows.append(_row(config, "a_model", "attention_max_rel_diff", _rel(x, peer["cca"]), TOL_ATTENTION,
                         f"PaddleSeg CrissCrossAttention vs ours, applied twice, {tuple(features.shape)}, same "
                         f"q/k/v weights and gamma; paddle {peer['paddle']}"))  # fmt: skip
        as_configured = {"logits": model(images), "aux_logits": model.auxiliary_head(model.backbone(images)[-2])}
        variant = matched_variant(model)
        matched = {"logits": variant(images), "aux_logits": variant.auxiliary_head(variant.backbone(images)[-2])}
    for metric, theirs in (("logits", peer["logits"]), ("aux_logits", peer["aux"])):
        configured = _rel(as_configured[metric], theirs)
        agreement = float((as_configured[metric].argmax(1) == theirs.argmax(1)).double().mean())
        rows.append(
            _row(
                config,
                "a_model",
                f"whole_model_{metric}_eval_max_rel_diff",
                _rel(matched[metric], theirs),
                TOL_LOGITS,
                f"ours with the two model differences of the YAML's notes (1) average-pool shortcut and (4) "
                f"leaky ReLU applied (matched_variant), same weights; as the YAML builds it (v1c shortcut, "
                f"ReLU): {configured:.3g}, argmax agreement {agreement:.3f}: the expected difference",
            )
        )
    rows += schedule_rows(config, cfg, model, peer["schedule"])
    rows += loss_rows(config, cfg, peer["loss"], logits, aux_logits, labels)
    rows += eval_rows(path, cfg, model, python, workdir, quick=quick)
    rows.append(not_run_row(source=NAME, version=VERSION, config=config, check="d_data", reason=NOT_RUN["d_data"]))
    rows.append(not_run_row(source=NAME, version=VERSION, config=config, check="f_train",
                            reason=f_train_reason(peer["loss"])))
    (folder / "weights.pt").unlink(missing_ok=True)
    return rows


def paddle2_losses(loss: dict, paddle_version: str, folder: Path) -> dict:
    """Check b's losses from the paddlepaddle 2.6.2 venv (LOSS_PEER) when paddle 3.x refused them; `loss` (with
    its errors, and why the second venv did not help) when that venv cannot install or run."""
    job = {"task": "loss", "inputs": str(folder / "inputs.pt"), "out": str(folder / "loss_out.pt")}
    (folder / "loss_job.json").write_text(json.dumps(job))
    try:
        python = ensure_venv(LOSS_PEER).absolute()
        call_peer(python, SCRIPT, folder / "loss_job.json", cwd=folder, timeout=600)
    except PeerUnavailable as err:
        note = f" (paddlepaddle 2.6.2 venv for the losses unavailable: {str(err)[:160]})"
        return {**loss, **{k: loss[k] + note for k in ("ce_error", "ohem_error") if loss[k]}}
    out = load_tensors(folder / "loss_out.pt")
    return {**out["loss"], "paddle": out["paddle"], "paddle3_errors": f"paddle {paddle_version}: "
            + "; ".join(loss[k][:120] for k in ("ce_error", "ohem_error") if loss[k])}


NOT_RUN = {
    "d_data": "PaddleSeg's pipeline differs by design (YAML notes 2 and 5: RandomDistort with PIL enhancers and the "
    "float rescale have no counterpart in our schema); a comparison would only measure that",
}


def f_train_reason(loss: dict) -> str:
    """Why check f does not run, from what the peer measured in b: PaddleSeg's own losses raised on this paddle
    (its training step needs both), or, when they ran, the OHEM that differs by design (YAML notes 3)."""
    errors = [f"{name} raised {loss[key][:120]}" for name, key in (("CrossEntropyLoss", "ce_error"),
                                                                  ("OhemCrossEntropyLoss", "ohem_error"))
              if loss.get(key)]
    if errors:
        return ("PaddleSeg 2.8.0's training step cannot run on this paddlepaddle 3.x: its losses fail (measured in "
                "b_loss: " + "; ".join(errors) + ")")
    return ("PaddleSeg's decode loss is its OhemCrossEntropyLoss, which differs from the row's by design (YAML "
            "notes 3): a 5-step trajectory would measure that difference, not the recipe")


def eval_rows(path: Path, cfg, model: nn.Module, python: Path, workdir: Path, *, quick: bool) -> list[ParityRow]:
    """Check e: PaddleSeg's evaluate (single scale and ms + flip) vs `python -m repro.run --eval-only` on a
    val-only Cityscapes fixture in the real layout (PaddleSeg reads `*_gtFine_labelTrainIds.png`, which its
    tools/data/convert_cityscapes.py writes; they are added). Validation padding to 105 x 201 instead of
    1025 x 2049 on both sides (the same code path, affordable on this CPU). The peer's model is given the YAML's
    two model features (`as_project_model`: v1c shortcut, ReLU), so this compares evaluation only."""
    from PIL import Image

    from repro.engine.data.cityscapes import label_id_lut
    from repro.parity.ours import our_evaluation
    from repro.parity.ssseg import write_fixture

    config = path.stem
    folder = workdir / config
    root = workdir / "fixtures_val_only" / "cityscapes"
    if not root.exists():
        write_fixture("cityscapes", root, splits=("val",), seed=11)
        lut = label_id_lut()
        for label_path in (root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"):
            train_ids = lut[np.asarray(Image.open(label_path))]
            name = label_path.name.replace("_labelIds", "_labelTrainIds")
            Image.fromarray(train_ids.astype(np.uint8), mode="L").save(label_path.with_name(name))
    pad_hw = (105, 201)
    checkpoint = folder / "paddle_eval_weights.pt"
    torch.save(export_state_dict(model, source="paddleseg"), checkpoint)
    job = {"task": "eval", "root": str(root), "weights": str(checkpoint), "pad_wh": [pad_hw[1], pad_hw[0]],
           "scales": list(cfg.eval.ms_scales), "out": str(folder / "eval_out.pt")}  # fmt: skip
    (folder / "eval_job.json").write_text(json.dumps(job))
    ours_checkpoint = folder / "ours_eval_checkpoint.pt"
    torch.save(model.state_dict(), ours_checkpoint)
    with ThreadPoolExecutor(max_workers=1) as pool:
        peer_run = pool.submit(call_peer, python, SCRIPT, folder / "eval_job.json", cwd=folder, timeout=900)
        overrides = [f"data.root={root}", f"eval.val_pad_size=[{pad_hw[0]},{pad_hw[1]}]", "data.num_workers=0"]
        done, predictions, dataset = our_evaluation(path, ours_checkpoint, folder, overrides)
        peer_run.result()
    peer = load_tensors(folder / "eval_out.pt")
    for file in (checkpoint, ours_checkpoint):
        file.unlink(missing_ok=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return [ParityRow(NAME, VERSION, config, "e_eval", "repro_run_eval_only_exit_code", str(done.returncode),
                          "0", "fail", tail[:300])]  # fmt: skip
    import pandas as pd

    table = pd.read_csv(folder / "ours_miou.csv")
    rows = []
    for metric, key in (("mIoU", "miou"), ("mIoU_ms_flip", "miou_ms_flip")):
        ours = float(table.loc[table["metric"] == metric, "measured"].iloc[0])
        theirs = 100.0 * peer[key]
        rows.append(_row(config, "e_eval", f"{metric}_abs_diff_points", abs(ours - theirs), 1e-4,
                         f"python -m repro.run --eval-only {ours:.4f} vs paddleseg.core.evaluate {theirs:.4f}; "
                         f"{len(peer['names'])} val images only, odd sizes, padded bottom-right to {list(pad_hw)} "
                         f"(127.5) and cropped back; ms scales {list(cfg.eval.ms_scales)} + flip; zero-union "
                         f"classes count 0; peer: paddle.concat shim for 0-d tensors (PaddleSeg 2.8.0 "
                         f"metrics.calculate_area fails on paddle 3.x without it)"))  # fmt: skip
    by_name = {Path(image).name: index for index, (image, _) in enumerate(dataset.pairs)}
    agree, total = 0, 0
    for name, pred in zip(peer["names"], peer["preds"], strict=True):
        ours_pred = predictions[by_name[name]]
        total += pred.numel()
        if ours_pred.shape == tuple(pred.shape):
            agree += int((torch.from_numpy(ours_pred.astype(np.int64)) == pred).sum())
    rows.append(
        _row(
            config,
            "e_eval",
            "pixel_agreement",
            agree / total,
            1.0,
            f"{total} pixels, single scale; PaddleSeg's model given the YAML's v1c shortcut and ReLU "
            "(as_project_model) so that only evaluation is compared",
            higher_is_better=True,
        )
    )
    return rows


def schedule_rows(config: str, cfg, model: nn.Module, schedule: dict) -> list[ParityRow]:
    """Check c against the PolynomialDecay and Momentum optimizer PaddleSeg's SegBuilder built."""
    rows = [
        _row(
            config,
            "c_lr",
            "T_abs_diff",
            abs(cfg.train.iterations - schedule["decay_steps"]),
            0,
            f"ours {cfg.train.iterations}, PaddleSeg PolynomialDecay decay_steps {schedule['decay_steps']}",
        )
    ]
    worst = max(abs(poly_lr(int(step), cfg.train) - lr) / lr for step, lr in schedule["lr"].items())
    rows.append(
        _row(
            config,
            "c_lr",
            "lr_max_rel_diff",
            worst,
            1e-9,
            "steps "
            + ", ".join(f"{step}: {lr:.6g}" for step, lr in schedule["lr"].items())
            + " (paddle computes in float32-free python floats)",
        )
    )
    optimizer = build_optimizer(model, cfg.train)
    ours = {
        (float(g["momentum"]), float(g["weight_decay"]), float(g["dampening"]), bool(g["nesterov"]))
        for g in optimizer.param_groups
    }
    theirs = {(schedule["momentum"], schedule["decay_coeff"], 0.0, False)}
    same_everywhere = schedule["params_with_own_regularizer"] == 0 and schedule["lr_multipliers"] == [1.0]
    rows.append(
        _row(
            config,
            "c_lr",
            "momentum_wd_settings_differing",
            len(ours ^ theirs) + (not same_everywhere),
            0,
            f"ours {sorted(ours)} (one group); PaddleSeg {schedule['optimizer']} momentum "
            f"{schedule['momentum']}, {schedule['decay_method']} {schedule['decay_coeff']} coupled into the "
            f"gradient like torch SGD's weight_decay, on all {schedule['params']} parameters "
            f"({schedule['params_with_own_regularizer']} with their own regularizer, lr multipliers "
            f"{schedule['lr_multipliers']})",
        )
    )
    return rows


def loss_rows(config: str, cfg, peer: dict, logits, aux_logits, labels) -> list[ParityRow]:
    """Check b on the same full-resolution logits: the aux cross-entropy must agree; the OHEM is the expected
    difference of the YAML's notes (3) and is reported with both values, not judged."""
    criterion = build_loss(cfg.train, ignore_index=cfg.data.ignore_index)
    parts = criterion.parts((logits, aux_logits), labels)
    aux_ours = float(parts["aux"])
    if peer["ce_error"]:
        rows = [
            ParityRow(NAME, VERSION, config, "b_loss", "aux_ce_rel_diff", "", "<= 1e-06",
                      "not run: PaddleSeg 2.8.0's CrossEntropyLoss fails on paddlepaddle 3.x (cross_entropy_loss.py "
                      "line 133: float32 mask x int64 ones_like(label), refused by paddle 3's type promotion; "
                      "its training cannot run on paddle 3.x)",
                      f"ours {aux_ours:.7g}; peer: {peer['ce_error'][:200]}")
        ]  # fmt: skip
    else:
        where = (f"; on paddlepaddle {peer['paddle']} (a second venv: PaddleSeg 2.8.0's losses fail on "
                 f"{peer['paddle3_errors']})" if peer.get("paddle3_errors") else "")
        rows = [
            _row(
                config,
                "b_loss",
                "aux_ce_rel_diff",
                abs(aux_ours - peer["ce_aux"]) / peer["ce_aux"],
                1e-6,
                f"ours {aux_ours:.7g}, PaddleSeg CrossEntropyLoss {peer['ce_aux']:.7g} (mean over the "
                f"{int((labels != 255).sum())} labelled of {labels.numel()} pixels){where}"[:600],
            )
        ]
    rows.append(
        _row(
            config,
            "b_loss",
            "loss_coef_abs_diff",
            abs(peer["coef"][1] - cfg.train.aux_weight) + abs(peer["coef"][0] - 1.0),
            0,
            "decode x 1, aux x 0.4 on both sides",
        )
    )
    kept = int(criterion.decode_loss.kept_mask(logits, labels).sum())
    ours_text = (
        f"ours {float(parts['decode']):.6g}, {kept} pixels kept (official OhemCrossEntropy2d: threshold at "
        f"1/8 resolution, min_kept {cfg.train.ohem_min_kept} // 64, prob <= threshold)"
    )
    if peer["ohem_error"]:
        verdict = (
            "not run: PaddleSeg 2.8.0's OhemCrossEntropyLoss fails on paddlepaddle 3.x "
            f"(ohem_cross_entropy_loss.py line 68: {peer['ohem_error'][:160]})"
        )
        value, theirs = f"{float(parts['decode']):.6g}", ""
    else:
        verdict = "not run: expected difference (YAML notes 3), not a parity claim"
        value, theirs = f"{float(parts['decode']):.6g}", f"PaddleSeg {peer['ohem']:.6g}, {peer['ohem_kept']} kept"
    rows.append(
        ParityRow(
            NAME,
            VERSION,
            config,
            "b_loss",
            "ohem_decode_loss",
            value,
            theirs,
            verdict,
            ours_text + "; PaddleSeg: full resolution, min_kept on the per-GPU batch, prob < threshold, "
            "mean / (mean(valid) + 1e-5)",
        )
    )
    return rows


def run(configs: list[Path], *, quick: bool, workdir: Path,
        on_rows: Callable[[list[ParityRow]], None] | None = None) -> list[ParityRow]:
    python = ensure_venv(PEER).absolute()  # absolute, not resolved: the venv python is a symlink
    workdir = Path(workdir).resolve()
    rows: list[ParityRow] = []
    for path in configs:
        start = time.perf_counter()
        with timed(NAME, path.stem, "all"):
            config_rows = run_one(path, python, workdir, quick=quick)
        print(f"  {path.stem}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if on_rows is not None:
            on_rows(config_rows)
        rows += config_rows
    return rows
