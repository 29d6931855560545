"""PaddleSeg 2.8.0 (paddlepaddle 3.x, CPU) side of the parity checks. Runs ONLY inside the peer venv
(.nox/peer-paddleseg-2.8.0), as `python paddleseg_side.py JOB.json`; imports paddle, paddleseg, torch (only to
read and write the exchange files) and numpy, never the project.

Everything is built by PaddleSeg's own `Config` + `SegBuilder` from CONFIG_YAML below: the sections of
configs/ccnet/ccnet_resnet101_os8_cityscapes_769x769_60k.yml merged over configs/_base_/cityscapes.yml and
cityscapes_769x769.yml (restated: the wheel ships no configs/; `pretrained` of the backbone left out, the
weights come from the project). The datasets are listed only because the config checker requires them.

Task "model": load the weights the project exported into PaddleSeg's layout, then
  * write them back with `paddle.save(model.state_dict(), ...)`: a real .pdparams file for the project's importer;
  * eval-mode logits of the whole model (and the auxiliary head on layer3) on the given images;
  * the criss-cross attention alone (`model.head.cca`) on the given features, recurrence applied twice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

CONFIG_YAML = """
batch_size: 2
iters: 60000
model:
  type: CCNet
  num_classes: 19
  backbone:
    type: ResNet101_vd
    output_stride: 8
  backbone_indices: [2, 3]
  enable_auxiliary_loss: True
  dropout_prob: 0.1
  recurrence: 2
loss:
  types:
    - type: OhemCrossEntropyLoss
    - type: CrossEntropyLoss
  coef: [1, 0.4]
optimizer:
  type: SGD
  momentum: 0.9
  weight_decay: 4.0e-5
lr_scheduler:
  type: PolynomialDecay
  learning_rate: 0.01
  power: 0.9
  end_lr: 1.0e-4
train_dataset:
  type: Cityscapes
  dataset_root: data/cityscapes
  transforms:
    - type: ResizeStepScaling
      min_scale_factor: 0.5
      max_scale_factor: 2.0
      scale_step_size: 0.25
    - type: RandomPaddingCrop
      crop_size: [769, 769]
    - type: RandomHorizontalFlip
    - type: RandomDistort
      brightness_range: 0.4
      contrast_range: 0.4
      saturation_range: 0.4
    - type: Normalize
  mode: train
val_dataset:
  type: Cityscapes
  dataset_root: data/cityscapes
  transforms:
    - type: Padding
      target_size: [2049, 1025]
    - type: Normalize
  mode: val
"""


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: paddleseg_side.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    if job.get("task") == "eval":
        return run_eval(job)
    if job.get("task") == "loss":
        return run_loss(job)
    start = time.perf_counter()
    import paddle
    import paddleseg
    from paddleseg.cvlibs import Config, SegBuilder

    paddle.set_device("cpu")
    config_path = Path(job["out"]).with_name("ccnet_paddleseg.yml")
    config_path.write_text(CONFIG_YAML)
    builder = SegBuilder(Config(str(config_path)))
    model = builder.model
    weights = torch.load(job["weights"], map_location="cpu", weights_only=True)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    model.set_state_dict({k: v.numpy() for k, v in weights.items() if k in own})
    paddle.save(model.state_dict(), job["pdparams_out"])
    model.eval()
    batch = torch.load(job["inputs"], map_location="cpu", weights_only=True)
    out = {"missing": missing, "unexpected": unexpected}
    with paddle.no_grad():
        images = paddle.to_tensor(batch["images"].numpy())
        out["logits"] = torch.from_numpy(np.array(model(images)[0].numpy()))
        feats = model.backbone(images)
        out["aux"] = torch.from_numpy(np.array(model.aux_head(feats[2]).numpy()))
        x = paddle.to_tensor(batch["features"].numpy())
        for _ in range(2):
            x = model.head.cca(x)
        out["cca"] = torch.from_numpy(np.array(x.numpy()))
    out.update(schedule_and_optimizer(builder, model, job["lr_steps"]))
    out.update(losses(builder, batch))
    out["peer_version"] = str(paddleseg.__version__)
    out["paddle"] = str(paddle.__version__)
    out["seconds"] = time.perf_counter() - start
    torch.save(out, job["out"])
    return 0


def run_loss(job: dict) -> int:
    """Task "loss": only check b (the builder's losses on the job's logits and labels), for a paddlepaddle 2.x venv
    whose type promotion PaddleSeg 2.8.0's losses were written for."""
    # paddlepaddle 2.6.2's bundled libraries break a zlib import that comes after it (measured: `import scipy`
    # after `import paddle` raises zlib.error, then paddleseg's import segfaults); what paddleseg imports from
    # scipy and scikit-learn is imported first.
    import importlib

    for module in ("scipy.ndimage", "scipy.optimize", "sklearn.metrics"):
        importlib.import_module(module)
    import paddle
    import paddleseg
    from paddleseg.cvlibs import Config, SegBuilder

    paddle.set_device("cpu")
    config_path = Path(job["out"]).with_name("ccnet_paddleseg_loss.yml")
    config_path.write_text(CONFIG_YAML)
    builder = SegBuilder(Config(str(config_path)))
    out = losses(builder, torch.load(job["inputs"], map_location="cpu", weights_only=True))
    out["peer_version"] = str(paddleseg.__version__)
    out["paddle"] = str(paddle.__version__)
    torch.save(out, job["out"])
    return 0


def as_project_model(model) -> None:
    """Give PaddleSeg's CCNet the two model features of the project's YAML where they differ (notes 1 and 4), so
    the evaluation check compares evaluation only: layer2's first shortcut a stride-2 1x1 conv without the
    average pool (ResNet_vd is_vd_mode off), ReLU instead of leaky ReLU after conva / convb."""
    import paddle

    short = model.backbone.bb_1_0.short
    short.is_vd_mode = False
    short._conv._stride = [2, 2]
    model.head.conva._relu = paddle.nn.ReLU()
    model.head.convb._relu = paddle.nn.ReLU()


def run_eval(job: dict) -> int:
    """Check e: paddleseg.core.evaluate (single scale, then aug_eval with the given scales and horizontal flip)
    on the val fixture, with the config's val transforms (Padding to job["pad_wh"] instead of 2049x1025, then
    Normalize); the per-image single-scale predictions through paddleseg.core.infer.inference, as evaluate
    computes them."""
    start = time.perf_counter()
    import paddle
    import paddleseg
    from paddleseg.core import evaluate, infer
    from paddleseg.cvlibs import Config, SegBuilder

    paddle.set_device("cpu")
    # PaddleSeg 2.8.0 utils/metrics.py calculate_area concatenates per-class paddle.sum results, which paddle 3
    # returns as 0-d tensors and paddle.concat then refuses ("axis ... in range of [0, 0)"). Compatibility shim:
    # 0-d inputs of paddle.concat become shape (1,), what paddle 2.x returned; anything else is unchanged.
    concat = paddle.concat

    def concat_0d(x, axis=0, name=None):
        return concat([t.reshape([1]) if t.ndim == 0 else t for t in x], axis=axis, name=name)

    paddle.concat = concat_0d
    config_path = Path(job["out"]).with_name("ccnet_paddleseg_eval.yml")
    text = CONFIG_YAML.replace("target_size: [2049, 1025]", f"target_size: {list(job['pad_wh'])}")
    config_path.write_text(text.replace("dataset_root: data/cityscapes", f"dataset_root: {job['root']}"))
    builder = SegBuilder(Config(str(config_path)))
    model = builder.model
    model.set_state_dict({k: v.numpy() for k, v in torch.load(job["weights"], weights_only=True).items()})
    as_project_model(model)
    model.eval()
    dataset = builder.val_dataset
    single = evaluate(model, dataset, num_workers=0, print_detail=False)
    multi = evaluate(model, dataset, aug_eval=True, scales=job["scales"], flip_horizontal=True, num_workers=0,
                     print_detail=False)  # fmt: skip
    preds, names = [], []
    with paddle.no_grad():
        for index in range(len(dataset)):
            data = dataset[index]
            image = paddle.to_tensor(data["img"][None])
            pred, _ = infer.inference(model, image, trans_info=data["trans_info"], is_slide=False)
            preds.append(torch.from_numpy(np.array(pred.numpy())[0, 0].astype(np.int64)))
            names.append(Path(dataset.file_list[index][0]).name)
    out = {
        "miou": float(single[0]),
        "miou_ms_flip": float(multi[0]),
        "class_iou": [float(v) for v in single[2]],
        "preds": preds,
        "names": names,
        "peer_version": str(paddleseg.__version__),
        "paddle": str(paddle.__version__),
        "seconds": time.perf_counter() - start,
    }
    torch.save(out, job["out"])
    return 0


def schedule_and_optimizer(builder, model, steps) -> dict:
    """Check c: the LR of the builder's PolynomialDecay at `steps`, and how its Momentum optimizer treats each
    parameter (weight decay coefficient, per-parameter regularizer, learning-rate multiplier)."""
    scheduler = builder.lr_scheduler
    lrs = {}
    for step in steps:
        scheduler.last_epoch = step
        lrs[str(step)] = float(scheduler.get_lr())
    optimizer = builder.optimizer
    parameters = model.parameters()
    return {
        "schedule": {
            "decay_steps": int(scheduler.decay_steps),
            "lr": lrs,
            "optimizer": type(optimizer).__name__,
            "momentum": float(optimizer._momentum),
            "decay_method": str(getattr(optimizer, "_regularization_method", "")),
            "decay_coeff": float(getattr(optimizer, "_regularization_coeff", 0.0)),
            "params": len(parameters),
            "params_with_own_regularizer": sum(p.regularizer is not None for p in parameters),
            "lr_multipliers": sorted({float(p.optimize_attr["learning_rate"]) for p in parameters}),
        }
    }


def losses(builder, batch) -> dict:
    """Check b: the builder's losses (OHEM on the decode logits, cross-entropy x 0.4 on the aux logits) on the
    given full-resolution logits and labels, and how many pixels the OHEM kept."""
    import paddle
    import paddle.nn.functional as F

    loss_cfg = builder.loss
    decode = paddle.to_tensor(batch["logits"].numpy())
    aux = paddle.to_tensor(batch["aux_logits"].numpy())
    label = paddle.to_tensor(batch["labels"].numpy())
    kept = []
    original = F.softmax_with_cross_entropy

    def counting(logit, label, ignore_index=255, **kwargs):
        kept.append(int((label != ignore_index).astype("int64").sum()))
        return original(logit, label, ignore_index=ignore_index, **kwargs)

    F.softmax_with_cross_entropy = counting
    ohem, ohem_error = float("nan"), ""
    try:
        ohem = float(loss_cfg["types"][0](decode, label))
    except (TypeError, ValueError, RuntimeError) as err:  # PaddleSeg 2.8.0 code on paddle 3.x
        ohem_error = f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"
    finally:
        F.softmax_with_cross_entropy = original
    ce, ce_error = float("nan"), ""
    try:
        ce = float(loss_cfg["types"][1](aux, label))
    except (TypeError, ValueError, RuntimeError) as err:
        ce_error = f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"
    coef = [float(c) for c in loss_cfg["coef"]]
    return {
        "loss": {
            "ohem": ohem,
            "ohem_error": ohem_error,
            "ce_aux": ce,
            "ce_error": ce_error,
            "coef": coef,
            "ohem_kept": kept[0] if kept else -1,
        }
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:  # one job per stdin line (peers/serve.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve import serve

        sys.exit(serve(main))
    sys.exit(main(sys.argv))
