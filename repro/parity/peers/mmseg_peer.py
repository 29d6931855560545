"""mmsegmentation's side of the parity checks. Runs ONLY in the mmseg peer venv (torch, numpy, mmseg, mmengine,
mmcv-lite); it never imports the project. Reads a JSON job and `torch.save` files of tensors written by the
project side, writes `torch.save` dicts of tensors back.

    python mmseg_peer.py model JOB.json   # random weights, logits, loss + grads, LR schedule, SGD trajectory
    python mmseg_peer.py data JOB.json    # the training pipeline on files, recording every random draw
    python mmseg_peer.py test JOB.json    # Runner.test on a dataset folder, predictions saved as PNG
    python mmseg_peer.py serve            # the same commands, one per stdin line (peers/serve.py)
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmcv_ops_standin  # noqa: E402
from serve import command_line, no_sync_bn  # noqa: E402

mmcv_ops_standin.install()
warnings.filterwarnings("ignore")

from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import PARAM_SCHEDULERS  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS, TRANSFORMS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

register_all_modules()


def load_config(job: dict) -> Config:
    cfg = Config.fromfile(job["config_py"])
    cfg.model = ConfigDict(no_sync_bn(cfg.model.to_dict()))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    for key, value in job.get("cfg_options", {}).items():
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = tuple(value) if isinstance(value, list) else value
    return cfg


def build_model(cfg: Config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Non-trivial norms and a non-zero attention scale, so every part of the model shows in the logits. The
        # last norm of each residual branch starts small (as a trained or zero-init-residual network has it):
        # otherwise 33-50 blocks of random scale make the stem's gradient ~100x the weights and the training
        # steps chaotic, where fp32 rounding differences grow without bound.
        for module_name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                low, high = (0.05, 0.25) if module_name.endswith("bn3") else (0.5, 1.5)
                module.weight.uniform_(low, high, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
        for name, param in model.named_parameters():
            if name.endswith("gamma.scale") or name.endswith("gamma"):
                param.fill_(0.5)
            if "conv_seg" in name and name.endswith("weight"):
                param.normal_(0.0, 0.05, generator=generator)
    return model


def well_conditioned(model: nn.Module, seed: int) -> nn.Module:
    """The start of b and f: a copy whose last norm of every residual branch (`bn3`) and every norm of the decode
    and auxiliary heads get gamma uniform in [0.01, 0.05] (the project side's fixtures.well_conditioned explains
    why: fp32 trajectories of two correct implementations then stay within 1e-6 instead of parting)."""
    conditioned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, module in conditioned.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    name.endswith("bn3") or name.startswith(("decode_head", "auxiliary_head"))):
                module.weight.uniform_(0.01, 0.05, generator=generator)
    return conditioned


def dropout_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout | nn.Dropout2d):
            module.p = 0.0


def samples(labels: torch.Tensor) -> list:
    out = []
    for label in labels:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label[None].long())
        sample.set_metainfo(dict(img_shape=tuple(label.shape), ori_shape=tuple(label.shape),
                                 pad_shape=tuple(label.shape)))
        out.append(sample)
    return out


def head_logits(model: nn.Module, images: torch.Tensor) -> dict:
    feats = model.extract_feat(images)
    out = {"decode": model.decode_head.forward(feats)}
    if model.with_auxiliary_head:
        out["aux"] = model.auxiliary_head.forward(feats)
    return out


def command_model(job: dict) -> None:
    """a on the first step's batch from `state.pt` (the weights check e uses too); b (float64) and f (float32,
    5 steps) from the well-conditioned copy `state_train.pt`: b is the first step's loss and gradients."""
    out = Path(job["out"])
    cfg = load_config(job)
    model = built_model(cfg, job)
    start = well_conditioned(model, job["seed"])
    steps = torch.load(job["steps"], weights_only=True)
    images, labels = steps["images"][0], steps["labels"][0]
    result: dict = {}
    # a. logits, eval mode (running statistics) and train mode (batch statistics, dropout off).
    model.eval()
    with torch.no_grad():
        result["eval"] = head_logits(model, images)
    dropout_off(model)
    model.train()
    with torch.no_grad():
        result["train"] = head_logits(model, images)
    # b. the first training step's loss and every gradient (ignored pixels in the batch), in float64 (see the
    # project side).
    trained = copy.deepcopy(start).double()
    dropout_off(trained)
    trained.train()
    losses = trained.loss(images.double(), samples(labels))
    total, log_vars = trained.parse_losses(losses)
    total.backward()
    result["loss"] = {name: value.detach() for name, value in losses.items() if "loss" in name}
    result["loss"]["total"] = total.detach()
    # Stored as float32 (half the file): 6e-8 relative, far below the 1e-6 the project side allows.
    result["grads"] = {name: p.grad.detach().float() for name, p in trained.named_parameters() if p.grad is not None}
    del trained
    # c. parameter groups of the config's optimizer wrapper, built by mmengine for this model.
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    groups = []
    for group in wrapper.optimizer.param_groups:
        groups.append({k: float(group[k]) for k in ("lr", "momentum", "weight_decay", "dampening")}
                      | {"nesterov": bool(group["nesterov"]), "params": len(group["params"])})
    result["groups"] = groups
    result["optimizer"] = type(wrapper.optimizer).__name__
    torch.save(result, out / "model.pt")
    # f. SGD steps from the conditioned weights on the given batches: optimizer wrapper and schedule of the
    # config, float32.
    del model, wrapper
    sgd_steps(cfg, start, steps, out)


def sgd_steps(cfg: Config, trained: nn.Module, steps: dict, out: Path) -> None:
    """f: the config's optimizer wrapper and schedulers on `trained` (its dtype), one step per batch, each step's
    state saved as float32 (`stepN.pt`)."""
    dtype = next(trained.parameters()).dtype
    dropout_off(trained)
    trained.train()
    wrapper = build_optim_wrapper(trained, cfg.optim_wrapper)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in cfg.param_scheduler]
    for index, (step_images, step_labels) in enumerate(zip(steps["images"], steps["labels"])):
        losses = trained.loss(step_images.to(dtype), samples(step_labels))
        total, _ = trained.parse_losses(losses)
        wrapper.update_params(total)
        for scheduler in schedulers:
            scheduler.step()
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach().clone())
                 for k, v in trained.state_dict().items()}
        torch.save(state, out / f"step{index + 1}.pt")


def command_trajectory(job: dict) -> None:
    """f alone, in float64: the steps of command_model from the same well-conditioned start (the project side
    asks for it when the float32 trajectories part by more than the tolerance)."""
    cfg = load_config(job)
    start = well_conditioned(built_model(cfg, job), job["seed"]).double()
    sgd_steps(cfg, start, torch.load(job["steps"], weights_only=True), Path(job["out"]))


class DrawRecorder:
    """Wraps numpy.random's module-level functions the transforms call and logs each draw, in order."""

    NAMES = ("random_sample", "rand", "randint", "uniform", "choice", "random")

    def __init__(self) -> None:
        self.draws: list = []
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(np.random, name)
            self.saved[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                value = _original(*args, **kwargs)
                self.draws.append([_name, [_plain(a) for a in args], {k: _plain(v) for k, v in kwargs.items()},
                                   _plain(value)])
                return value

            setattr(np.random, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(np.random, name, original)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def command_data(job: dict) -> None:
    """The config's train_pipeline + the model's data preprocessor on each (image, label) file pair."""
    cfg = load_config(job)
    pipeline = [TRANSFORMS.build(t) for t in cfg.train_pipeline]
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    reduce_zero_label = bool(job.get("reduce_zero_label", False))
    out = {"decoded": [], "labels_loaded": [], "images": [], "labels": [], "draws": []}
    for index, (image_path, label_path) in enumerate(job["pairs"]):
        np.random.seed(job["seed"] + index)
        results = dict(img_path=image_path, seg_map_path=label_path, reduce_zero_label=reduce_zero_label,
                       seg_fields=[], label_map=None)
        with DrawRecorder() as recorder:
            for position, transform in enumerate(pipeline):
                results = transform(results)
                if position == 1:  # LoadImageFromFile, LoadAnnotations: the decoded files
                    out["decoded"].append(torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1])))
                    out["labels_loaded"].append(torch.from_numpy(results["gt_seg_map"].astype(np.int64)))
        batch = preprocessor({"inputs": [results["inputs"]], "data_samples": [results["data_samples"]]},
                             training=True)
        out["images"].append(batch["inputs"][0].float())
        out["labels"].append(batch["data_samples"][0].gt_sem_seg.data[0].long())
        out["draws"].append(json.dumps(recorder.draws))
    torch.save(out, Path(job["out"]) / "data.pt")


def _set_resize(pipeline, scale) -> None:
    for transform in pipeline:
        if transform["type"] == "Resize":
            transform["scale"] = tuple(scale)


def command_test(job: dict) -> None:
    """mmseg's own test entry: Runner.from_cfg(cfg).test() on the config's test_dataloader pointed at the
    fixture folder (whole / slide as test_cfg says), then the TTA model as tools/test.py --tta builds it.
    IoUMetric writes each prediction as a PNG (output_dir)."""
    from mmengine.runner import Runner

    out = Path(job["out"])
    results = {}
    for variant in ("single", "tta") if job["tta"] else ("single",):
        cfg = load_config(job)
        cfg.work_dir = str(out / f"work_{variant}")
        cfg.load_from = job["checkpoint"]
        cfg.launcher = "none"
        cfg.default_hooks.pop("visualization", None)
        cfg.test_dataloader.num_workers = 0
        cfg.test_dataloader.persistent_workers = False
        cfg.test_dataloader.dataset.data_root = job["data_root"]
        _set_resize(cfg.test_dataloader.dataset.pipeline, job["scale"])
        if cfg.model.test_cfg.get("mode") == "slide":
            cfg.model.test_cfg.crop_size = tuple(job["crop_size"])
            cfg.model.test_cfg.stride = tuple(job["stride"])
        cfg.test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"], output_dir=str(out / f"pred_{variant}"))
        if variant == "tta":  # tools/test.py --tta, mmseg 1.2.2 lines 104-108
            cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
            cfg.tta_model.module = cfg.model
            cfg.model = cfg.tta_model
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
        results[variant] = {k: float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(results))


_LAST_BUILT: dict = {}  # (config file, seed) -> model: the weights command's model, reused by the next model command


def built_model(cfg: Config, job: dict) -> nn.Module:
    """build_model for the job's config and seed; the one built last is kept, so `weights` then `model` on the same
    config builds (and initialises) it once. A copy is returned: the caller may change it."""
    key = (job["config_py"], job["seed"], json.dumps(job.get("cfg_options", {}), sort_keys=True))
    if key not in _LAST_BUILT:
        _LAST_BUILT.clear()
        _LAST_BUILT[key] = build_model(cfg, job["seed"])
    return copy.deepcopy(_LAST_BUILT[key])


def command_weights(job: dict) -> None:
    """Only the random weights (the same seed gives the same tensors), for checks that need them: `state.pt` (a,
    e) and, when the job asks (`train_start`), its well-conditioned copy `state_train.pt` (b, f)."""
    cfg = load_config(job)
    model = built_model(cfg, job)
    torch.save(model.state_dict(), Path(job["out"]) / "state.pt")
    if job.get("train_start"):
        torch.save(well_conditioned(model, job["seed"]).state_dict(), Path(job["out"]) / "state_train.pt")


def command_lr(job: dict) -> None:
    """c: the learning rate at the requested steps of each config, through mmengine's own optimizer wrapper and
    schedulers (stepped once per iteration, as ParamSchedulerHook.after_train_iter does)."""
    out = {}
    for config_py, wanted in job["configs"].items():
        cfg = Config.fromfile(config_py)
        wrapper = build_optim_wrapper(nn.Conv2d(1, 1, 1), cfg.optim_wrapper)
        schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in cfg.param_scheduler]
        wanted = sorted(set(wanted))
        lrs = {}
        for step in range(max(wanted) + 1):
            if step in wanted:
                lrs[str(step)] = float(wrapper.optimizer.param_groups[0]["lr"])
            for scheduler in schedulers:
                scheduler.step()
        out[config_py] = {"lr": lrs, "max_iters": int(cfg.train_cfg.max_iters),
                          "schedulers": [dict(s) for s in cfg.param_scheduler]}
    Path(job["out"]).write_text(json.dumps(out))


COMMANDS = {"lr": command_lr, "weights": command_weights, "model": command_model, "data": command_data,
            "test": command_test, "trajectory": command_trajectory}

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(command_line("mmseg_peer.py", COMMANDS))
