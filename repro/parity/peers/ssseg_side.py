"""sssegmentation 1.7.0 side of the parity checks. Runs ONLY inside the peer venv
(.nox/peer-sssegmentation-1.7.0), as `python ssseg_side.py JOB.json`; imports sssegmentation, torch and numpy,
never the project. Inputs and outputs are torch.save files of tensors, numbers, strings, lists and dicts
(the project reads them back weights-only).

The configuration of each row is sssegmentation's own, restated here from its config files (values cited
below; the pip package does not ship ssseg/configs):
  ssseg/configs/_base_/segmentors/ccnet.py (SegmentorConfig of CCNet), ssseg/configs/ccnet/ccnet_resnet*os*_*.py
  (dataset, dataloader, max_epochs, num_classes, backbone), ssseg/configs/_base_/datasets/{cityscapes_512x1024,
  ade20k_512x512, vocaug_512x512}.py, ssseg/configs/_base_/dataloaders/default_dataloader_bs{8,16}.py.
Deviations forced by this machine (stated in the rows' details): SyncBatchNorm -> BatchNorm2d (one CPU
process: the same statistics), no CUDA / process group (the tester's and trainer's loop bodies are driven
directly with the same builders and calls), torchvision / mmcv.ops replaced by ./ssseg_standins.

Tasks (JOB["task"]):
  "model": checks a (logits), b (loss, gradients), c (LR schedule, parameter groups), f (5 SGD steps).
  "data": check d: the training pipeline (Resize, RandomCrop, RandomFlip, PhotoMetricDistortion, Normalize,
          ToTensor, Padding) on image files with every np.random draw scripted.
  "eval": check e: the tester's loop (BuildDataset TEST, auginference, resize to the label, argmax,
          dataset.evaluate) on a dataset folder in sssegmentation's layout.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "ssseg_standins"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

IGNORE = -100  # sssegmentation 1.7.0 datasets/base.py: ignore_index default -100 (clsid2label maps to it)

# Per dataset: sssegmentation's dataset config, batch (dataloader config), epochs (ccnet_* configs) and the
# training-set size its DistributedSampler divides.
DATASETS = {
    "cityscapes": {
        "type": "CityScapesDataset",
        "output_size": (2048, 1024),  # cityscapes_512x1024.py Resize output_size
        "crop_size": (512, 1024),
        "total_batch": 8,  # ccnet_resnet*_cityscapes.py: DATALOADER_CFG_BS8
        "max_epochs": 220,  # ccnet_resnet*_cityscapes.py
        "num_classes": 19,
        "train_size": 2975,  # Cityscapes gtFine train
    },
    "ade20k": {
        "type": "ADE20kDataset",
        "output_size": (2048, 512),  # ade20k_512x512.py
        "crop_size": (512, 512),
        "total_batch": 16,  # ccnet_resnet*_ade20k.py: DATALOADER_CFG_BS16
        "max_epochs": 130,
        "num_classes": 150,
        "train_size": 20210,  # ADEChallengeData2016 training
    },
    "voc": {
        "type": "VOCDataset",
        "output_size": (2048, 512),  # vocaug_512x512.py
        "crop_size": (512, 512),
        "total_batch": 16,  # ccnet_resnet*_voc.py: DATALOADER_CFG_BS16
        "max_epochs": 60,
        "num_classes": 21,
        "train_size": 10582,  # VOC 2012 trainaug
    },
}


def segmentor_cfg(dataset: str, depth: int, outstride: int, rootdir: str = "") -> dict:
    """SEGMENTOR_CFG of ccnet_resnet{depth}os{outstride}_{dataset}.py as sssegmentation 1.7.0 builds it."""
    info = DATASETS[dataset]
    normalize = ("Normalize", {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]})
    return {
        "type": "CCNet",
        "num_classes": info["num_classes"],
        "benchmark": True,
        "align_corners": False,
        # SyncBatchNorm in the config; one CPU process computes the same batch statistics with BatchNorm2d.
        "norm_cfg": {"type": "BatchNorm2d"},
        "act_cfg": {"type": "ReLU", "inplace": True},
        "backbone": {
            "type": "ResNet",
            "depth": depth,
            "structure_type": f"resnet{depth}conv3x3stem",
            "pretrained": False,
            "outstride": outstride,
            "use_conv3x3_stem": True,
            "selected_indices": (2, 3),
        },
        "head": {"in_channels": 2048, "feats_channels": 512, "num_recurrence": 2, "dropout": 0.1},
        "auxiliary": {"in_channels": 1024, "out_channels": 512, "dropout": 0.1},
        "losses": {
            "loss_aux": {"type": "CrossEntropyLoss", "scale_factor": 0.4, "ignore_index": IGNORE, "reduction": "mean"},
            "loss_cls": {"type": "CrossEntropyLoss", "scale_factor": 1.0, "ignore_index": IGNORE, "reduction": "mean"},
        },
        "inference": {
            "forward": {"mode": "whole", "cropsize": None, "stride": None},
            "tta": {"multiscale": [1], "flip": False, "use_probs_before_resize": False},
            "evaluate": {"metric_list": ["iou", "miou"]},
        },
        "scheduler": {
            "type": "PolyScheduler",
            "max_epochs": info["max_epochs"],
            "power": 0.9,
            "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "params_rules": {}},
        },
        "dataset": {
            "type": info["type"],
            "rootdir": rootdir,
            "train": {
                "set": "trainaug" if dataset == "voc" else "train",
                "data_pipelines": [
                    ("Resize", {"output_size": info["output_size"], "keep_ratio": True, "scale_range": (0.5, 2.0)}),
                    ("RandomCrop", {"crop_size": info["crop_size"], "one_category_max_ratio": 0.75}),
                    ("RandomFlip", {"prob": 0.5}),
                    ("PhotoMetricDistortion", {}),
                    normalize,
                    ("ToTensor", {}),
                    ("Padding", {"output_size": info["crop_size"], "data_type": "tensor"}),
                ],
            },
            "test": {
                "set": "val",
                "data_pipelines": [
                    ("Resize", {"output_size": info["output_size"], "keep_ratio": True, "scale_range": None}),
                    normalize,
                    ("ToTensor", {}),
                ],
            },
        },
        "dataloader": {
            "expected_total_train_bs_for_assert": info["total_batch"],
            "auto_adapt_to_expected_train_bs": True,
            "train": {
                "batch_size_per_gpu": 1,
                "num_workers_per_gpu": 2,
                "shuffle": True,
                "pin_memory": True,
                "drop_last": True,
            },
            "test": {
                "batch_size_per_gpu": 1,
                "num_workers_per_gpu": 2,
                "shuffle": False,
                "pin_memory": True,
                "drop_last": False,
            },
        },
    }


def iters_per_epoch(dataset: str, gpus: int) -> int:
    """len(dataloader) of train.py on rank 0: DistributedSampler (padded to a multiple of the GPU count), batch
    total // gpus per GPU (auto_adapt_to_expected_train_bs), drop_last=True."""
    info = DATASETS[dataset]
    indices = list(range(info["train_size"]))
    sampler = torch.utils.data.distributed.DistributedSampler(indices, num_replicas=gpus, rank=0, shuffle=True)
    loader = torch.utils.data.DataLoader(
        indices, sampler=sampler, batch_size=info["total_batch"] // gpus, drop_last=True
    )
    return len(loader)


def build(cfg: dict, mode: str):
    from ssseg.modules import BuildSegmentor

    return BuildSegmentor(segmentor_cfg=copy.deepcopy(cfg), mode=mode)


def no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout | nn.Dropout2d):
            module.p = 0.0


def to_ssseg_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels arrive with 255 for ignored pixels (the project's convention); sssegmentation uses -100."""
    labels = labels.clone().long()
    labels[labels == 255] = IGNORE
    return labels


def input_structure(**kwargs):
    from ssseg.modules import SSSegInputStructure

    return SSSegInputStructure(**kwargs)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights and buffers, floating ones stored as float32 (the project side compares at 1e-6 relative)."""
    items = model.state_dict().items()
    return {k: v.detach().float() if v.is_floating_point() else v.detach().clone() for k, v in items}


def run_model(job: dict) -> dict:
    """Checks a, b, c, f for one row."""
    cfg = segmentor_cfg(job["dataset"], job["depth"], job["output_stride"])
    weights = torch.load(job["weights"], map_location="cpu", weights_only=True)
    batches = torch.load(job["batches"], map_location="cpu", weights_only=True)
    images, labels = batches["images"], batches["labels"]
    out: dict = {"config": {k: cfg[k] for k in ("type", "num_classes", "align_corners")}}

    model = build(cfg, "TRAIN")
    missing, unexpected = model.load_state_dict(weights, strict=True), None
    del missing, unexpected

    # a, eval mode: decode logits from the TEST forward, aux from the auxiliary decoder on layer3.
    model.eval()
    with torch.no_grad():
        x = images[0]
        decode = model(input_structure(images=x, mode="TEST")).seg_logits
        feats = model.transforminputs(model.backbone_net(x), selected_indices=cfg["backbone"]["selected_indices"])
        aux = model.auxiliary_decoder(feats[0])
    out["eval"] = {"decode": decode, "aux": aux}

    # a (train mode): TRAIN_DEVELOP returns the decode logits; a hook takes the aux logits. Dropout off (p = 0)
    # so both sides are deterministic; no backward (b is the first step of f below).
    # (The model itself: f below loads all of its weights and buffers again.)
    model.train()
    no_dropout(model)
    model.mode = "TRAIN_DEVELOP"
    captured = {}
    hook = model.auxiliary_decoder.register_forward_hook(lambda m, i, o: captured.__setitem__("aux", o))
    with torch.no_grad():
        result = model(input_structure(images=images[0], seg_targets=to_ssseg_labels(labels[0]),
                                       mode="TRAIN_DEVELOP"))
    hook.remove()
    model.mode = "TRAIN"
    out["train"] = {"decode": result.seg_logits.detach(), "aux": captured["aux"].detach()}

    # c: optimizer and scheduler as train.py builds them.
    names = {id(p): n for n, p in model.named_parameters()}
    scheduler_for = _scheduler_builder(job, cfg)
    optimizer, scheduler = scheduler_for(model)
    total = scheduler.max_iters
    lrs = {}
    for step in (0, 1, total // 2, total - 1, total):
        scheduler.cur_iter = step
        lrs[str(step)] = float(scheduler.updatelr())
    groups = []
    for group in optimizer.param_groups:
        groups.append(
            {
                "names": [names[id(p)] for p in group["params"]],
                **{k: float(group[k]) for k in ("momentum", "weight_decay", "dampening", "nesterov")},
            }
        )
    out["schedule"] = {
        "max_iters": int(total),
        "iters_per_epoch": iters_per_epoch(job["dataset"], job["gpus"]),
        "max_epochs": cfg["scheduler"]["max_epochs"],
        "lr": lrs,
        "groups": groups,
    }

    # f: the training loop body of train.py (updatelr, zero_grad, forward TRAIN, backward, scheduler.step) from
    # the job's training weights (the well-conditioned start the project side explains), in float32. b is its
    # first step: the loss, every gradient after loss.backward() and the BN running statistics after the forward.
    if job.get("steps", 0):
        out["train"].update(train_steps(job, cfg, model, images, labels, scheduler_for))
    return out


def _scheduler_builder(job: dict, cfg: dict):
    """segmentor -> (optimizer, scheduler) as train.py builds them (BuildOptimizer, BuildScheduler)."""
    from ssseg.modules import BuildOptimizer, BuildScheduler

    def scheduler_for(segmentor):
        optimizer = BuildOptimizer(segmentor, cfg["scheduler"]["optimizer"])
        scheduler_cfg = copy.deepcopy(cfg["scheduler"])
        scheduler_cfg.update(
            {
                "lr": cfg["scheduler"]["optimizer"]["lr"],
                "iters_per_epoch": iters_per_epoch(job["dataset"], job["gpus"]),
                "params_rules": cfg["scheduler"]["optimizer"]["params_rules"],
            }
        )
        return optimizer, BuildScheduler(optimizer=optimizer, scheduler_cfg=scheduler_cfg)

    return scheduler_for


def train_steps(job: dict, cfg: dict, segmentor: nn.Module, images, labels, scheduler_for,
                dtype: torch.dtype = torch.float32) -> dict:
    """f on `segmentor` (its weights and buffers replaced by the job's training weights, cast to `dtype`): each
    step's state saved as float32 to `trajectory_out`.stepN; returns check b (the first step's loss, gradients
    and BN running statistics)."""
    segmentor.load_state_dict(torch.load(job["weights_train"], map_location="cpu", weights_only=True), strict=True)
    segmentor.to(dtype)
    segmentor.train()
    no_dropout(segmentor)
    optimizer, scheduler = scheduler_for(segmentor)
    first: dict = {}
    trajectory, step_lrs, losses = [], [], []
    for step in range(job["steps"]):
        step_lrs.append(float(scheduler.updatelr()))
        optimizer.zero_grad()
        data = input_structure(mode="TRAIN", images=images[step].to(dtype), seg_targets=to_ssseg_labels(labels[step]))
        loss = segmentor(data).loss
        loss.backward()
        if step == 0:
            first = {
                "loss": loss.detach(),
                "grads": {n: p.grad.detach().clone() for n, p in segmentor.named_parameters() if p.grad is not None},
                "running": {k: v.clone() for k, v in segmentor.state_dict().items() if "running_" in k},
            }
        scheduler.step()
        losses.append(float(loss.detach()))
        # one file per step, written as it is taken: 5 states of an R-101 model held at once cost 0.7 GB
        step_file = f"{job['trajectory_out']}.step{step + 1}"
        torch.save(state(segmentor), step_file)
        trajectory.append(step_file)
    torch.save({"state_files": trajectory, "lr": step_lrs, "loss": losses}, job["trajectory_out"])
    return first


def run_trajectory(job: dict) -> dict:
    """f alone in float64 (the project side asks for it when the float32 trajectories part by more than the
    tolerance): the same steps from the same weights."""
    cfg = segmentor_cfg(job["dataset"], job["depth"], job["output_stride"])
    batches = torch.load(job["batches"], map_location="cpu", weights_only=True)
    model = build(cfg, "TRAIN")
    train_steps(job, cfg, model, batches["images"], batches["labels"], _scheduler_builder(job, cfg),
                dtype=torch.float64)
    return {}


class ScriptedDraws:
    """np.random functions answering from a script of uniforms u in [0, 1): random_sample / rand -> u,
    uniform(a, b) -> a + (b - a) * u, randint(low, high) -> low + floor(u * (high - low)) (randint(n): 0..n-1).
    The project side feeds the same script to its own transform, so both see the same draws."""

    def __init__(self, values):
        self.values = [float(v) for v in values]
        self.used = 0

    def next(self) -> float:
        if self.used >= len(self.values):
            raise RuntimeError(f"draw script exhausted after {self.used} draws")
        value = self.values[self.used]
        self.used += 1
        return value

    def random_sample(self, size=None):
        return self.next()

    rand = random_sample

    def uniform(self, low=0.0, high=1.0, size=None):
        return low + (high - low) * self.next()

    def randint(self, low, high=None, size=None):
        if high is None:
            low, high = 0, low
        return int(low + int(np.floor(self.next() * (high - low))))


def run_data(job: dict) -> dict:
    """Check d: sssegmentation's training transforms, through its dataset's own read (cv2.imread, clsid2label)
    and synctransforms (the Compose of the config's train pipelines), on the given files."""
    from ssseg.modules import BuildDataset

    cfg = segmentor_cfg(job["dataset"], 50, 8, rootdir=job["rootdir"])
    dataset = BuildDataset(mode="TRAIN", logger_handle=None, dataset_cfg=copy.deepcopy(cfg["dataset"]))
    samples = []
    original = {name: getattr(np.random, name) for name in ("random_sample", "rand", "uniform", "randint")}
    try:
        for sample in job["samples"]:
            draws = ScriptedDraws(sample["draws"])
            for name in original:
                setattr(np.random, name, getattr(draws, name))
            meta = dataset.read(sample["image"], sample["label"])
            meta = dataset.synctransforms(meta)
            for name, function in original.items():
                setattr(np.random, name, function)
            labels = meta["seg_target"].clone()
            labels[labels == IGNORE] = 255
            samples.append(
                {
                    "image": meta["image"].contiguous(),
                    "label": labels.long(),
                    "draws_used": draws.used,
                    "decoded": torch.from_numpy(
                        np.ascontiguousarray(dataset.read(sample["image"], sample["label"])["image"][:, :, ::-1])
                    ),
                }
            )
    finally:
        for name, function in original.items():
            setattr(np.random, name, function)
    return {"samples": samples}


def run_eval(job: dict) -> dict:
    """Check e: Tester.start() of ssseg/test.py without CUDA / process group: the same dataset, segmentor,
    auginference, per-image resize to (height, width), average, argmax, label clean-up and dataset.evaluate."""
    from ssseg.modules import BuildDataset

    cfg = segmentor_cfg(job["dataset"], job["depth"], job["output_stride"], rootdir=job["rootdir"])
    if job.get("test_output_size"):  # a smaller test scale, the same on both sides (stated in the rows)
        cfg["dataset"]["test"]["data_pipelines"][0][1]["output_size"] = tuple(job["test_output_size"])
    cfg["dataset"]["test"]["eval_env"] = "local"
    dataset = BuildDataset(mode="TEST", logger_handle=None, dataset_cfg=copy.deepcopy(cfg["dataset"]))
    segmentor = build(cfg, "TEST")
    segmentor.load_state_dict(torch.load(job["weights"], map_location="cpu", weights_only=True)["model"])
    segmentor.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    align_corners = segmentor.align_corners
    preds, gts, ids = [], [], []
    with torch.no_grad():
        for samples_meta in loader:
            seg_logits_list = segmentor.auginference(samples_meta["image"], None)
            for seg_idx in range(len(seg_logits_list[0])):
                size = (int(samples_meta["height"][seg_idx]), int(samples_meta["width"][seg_idx]))
                seg_logit_list = [
                    F.interpolate(s[seg_idx : seg_idx + 1], size=size, mode="bilinear", align_corners=align_corners)
                    for s in seg_logits_list
                ]
                seg_logit = sum(seg_logit_list) / len(seg_logit_list)
                seg_pred = torch.argmax(seg_logit[0], dim=0).cpu().numpy().astype(np.int32)
                seg_gt = samples_meta["seg_target"][seg_idx].cpu().numpy().astype(np.int32)
                seg_gt[(seg_gt >= dataset.num_classes) | (seg_gt < 0)] = -1
                preds.append(seg_pred)
                gts.append(seg_gt)
                ids.append(str(samples_meta["id"][seg_idx]))
    result = dataset.evaluate(
        seg_preds=preds,
        seg_gts=gts,
        num_classes=cfg["num_classes"],
        ignore_index=-1,
        **cfg["inference"].get("evaluate", {}),
    )
    iou = result["iou"]
    return {
        "ids": ids,
        "preds": [torch.from_numpy(p.astype(np.int64)) for p in preds],
        "miou": float(result["miou"]),
        "iou": [float(iou[name]) for name in dataset.classnames],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ssseg_side.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    import ssseg

    start = time.perf_counter()
    task = job["task"]
    if task == "model":
        out = run_model(job)
    elif task == "data":
        out = run_data(job)
    elif task == "eval":
        out = run_eval(job)
    elif task == "trajectory":
        out = run_trajectory(job)
    else:
        print(f"unknown task {task!r}", file=sys.stderr)
        return 2
    out["peer_version"] = str(ssseg.__version__)
    out["torch"] = str(torch.__version__)
    out["seconds"] = time.perf_counter() - start
    torch.save(out, job["out"])
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:  # one job per stdin line (peers/serve.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve import serve

        sys.exit(serve(main))
    sys.exit(main(sys.argv))
