"""mmsegmentation 0.30.0's side of check e. Runs ONLY in the mmseg 0.30.0 peer venv (torch, mmcv 1.7.2 without
ops, mmseg 0.30.0); never imports the project. Follows 0.30.0's tools/test.py for one process on the CPU:
build_dataset(cfg.data.test), build_dataloader, build_segmentor, load_checkpoint, MMDataParallel,
single_gpu_test, dataset.evaluate(metric="mIoU").

    python mmseg0_peer.py test JOB.json
"""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")


def install_torchvision_standin() -> None:
    """mmcv 1.x's runner imports torchvision for its model-zoo URLs only (`torchvision://` checkpoints, not used
    here); the PyPI torchvision wheels are built for the CUDA torch. A named stand-in that fails on use."""
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.0+parity-standin"
    models = types.ModuleType("torchvision.models")

    def unavailable(name):
        raise AttributeError(f"torchvision.models.{name}: torchvision is a parity stand-in in this venv")

    models.__getattr__ = unavailable
    torchvision.models = models
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.models"] = models


install_torchvision_standin()
import mmcv_ops_standin  # noqa: E402
from serve import command_line, no_sync_bn  # noqa: E402

sys.modules["mmcv.ops"] = mmcv_ops_standin.build_module()
import mmcv  # noqa: E402

mmcv.ops = sys.modules["mmcv.ops"]
from mmcv.parallel import MMDataParallel  # noqa: E402
from mmcv.runner import load_checkpoint  # noqa: E402
from mmseg.apis import single_gpu_test  # noqa: E402
from mmseg.datasets import build_dataloader, build_dataset  # noqa: E402
from mmseg.models import build_segmentor  # noqa: E402


def command_test(job: dict) -> None:
    out = Path(job["out"])
    metrics, predictions = {}, {}
    variants = [("single", None)] + ([("ms", job["ms_ratios"])] if job["ms_ratios"] else [])
    for variant, ratios in variants:
        cfg = mmcv.Config.fromfile(job["config_py"])
        cfg.model = mmcv.ConfigDict(no_sync_bn(cfg.model.to_dict()))
        cfg.model.pretrained = None
        cfg.model.train_cfg = None
        if cfg.model.test_cfg.get("mode") == "slide":
            cfg.model.test_cfg.crop_size = tuple(job["crop_size"])
            cfg.model.test_cfg.stride = tuple(job["stride"])
        test = cfg.data.test
        test.data_root = job["data_root"]
        test.test_mode = True
        aug = test.pipeline[1]  # MultiScaleFlipAug
        aug.img_scale = tuple(job["scale"])
        aug.img_ratios = ratios  # the config's commented-in img_ratios for the ms+flip column
        aug.flip = ratios is not None
        dataset = build_dataset(test)
        loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=0, dist=False, shuffle=False,
                                  persistent_workers=False)
        model = build_segmentor(cfg.model, test_cfg=cfg.get("test_cfg"))
        load_checkpoint(model, job["checkpoint"], map_location="cpu")
        model.CLASSES, model.PALETTE = dataset.CLASSES, dataset.PALETTE
        model = MMDataParallel(model, device_ids=None)
        results = single_gpu_test(model, loader)
        evaluated = dataset.evaluate(results, metric="mIoU")
        metrics[variant] = {k: float(v) for k, v in evaluated.items() if np.isscalar(v)}
        names = [Path(info["filename"]).name for info in dataset.img_infos]
        predictions[variant] = {name: torch.from_numpy(np.asarray(pred, dtype=np.int64))
                                for name, pred in zip(names, results)}
    (out / "metrics0.json").write_text(json.dumps(metrics))
    torch.save(predictions, out / "preds0.pt")


COMMANDS = {"test": command_test}

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(command_line("mmseg0_peer.py", COMMANDS))
