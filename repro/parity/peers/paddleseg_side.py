"""PaddleSeg 2.8.0 (paddlepaddle 3.x, CPU) side of the parity checks. Runs ONLY inside the peer venv
(.nox/peer-paddleseg-2.8.0), as `python paddleseg_side.py JOB.json`; imports paddle, paddleseg, torch (only to
read and write the exchange files) and numpy, never the project.

The model is PaddleSeg's CCNet as configs/ccnet/ccnet_resnet101_os8_cityscapes_769x769_60k.yml builds it:
CCNet(num_classes=19, backbone=ResNet101_vd(output_stride=8), backbone_indices=(2, 3),
enable_auxiliary_loss=True, dropout_prob=0.1, recurrence=2) (align_corners default False).

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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: paddleseg_side.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    start = time.perf_counter()
    import paddle
    import paddleseg
    from paddleseg.models import CCNet
    from paddleseg.models.backbones import ResNet50_vd, ResNet101_vd

    paddle.set_device("cpu")
    backbone = {101: ResNet101_vd, 50: ResNet50_vd}[job["depth"]](output_stride=job["output_stride"])
    model = CCNet(
        num_classes=job["num_classes"],
        backbone=backbone,
        backbone_indices=(2, 3),
        enable_auxiliary_loss=True,
        dropout_prob=0.1,
        recurrence=2,
    )
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
    out["peer_version"] = str(paddleseg.__version__)
    out["paddle"] = str(paddle.__version__)
    out["seconds"] = time.perf_counter() - start
    torch.save(out, job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
