"""mmsegmentation's side of the whole-model inference benchmark (repro.measure.inference_bench). Runs ONLY in the
mmseg peer venv; never imports the project. Builds mmseg's own model from the config with the random weights of
mmseg_peer.build_model (non-trivial norms), writes its state dict for the project side to import, then answers
commands on stdin, one per line, so the project side can interleave its own timings with this model's:

    threads N   torch.set_num_threads(N)
    time        one forward (EncoderDecoder.encode_decode: backbone, decode head, resize to the input size) under
                no_grad, timed here with perf_counter around the call only
    logits      save the last forward's logits to OUT/logits.pt
    quit

Every answer is one line starting with "@@ " (anything else on stdout is mmseg's own chatter).

    python mmseg_bench_peer.py JOB.json   # {"config_py", "seed", "out", "image"}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmseg_peer import build_model, load_config  # noqa: E402  (installs the mmcv.ops stand-in, registers mmseg)


def answer(text: str) -> None:
    sys.stdout.write(f"@@ {text}\n")
    sys.stdout.flush()


def main(job: dict) -> None:
    out = Path(job["out"])
    model = build_model(load_config(job), job["seed"]).eval()
    torch.save(model.state_dict(), out / "state.pt")
    images = torch.load(job["image"], weights_only=True)
    height, width = images.shape[-2:]
    metas = [dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width))
             for _ in range(images.shape[0])]
    logits = None
    answer("ready")
    for line in sys.stdin:
        command, *args = line.split()
        if command == "threads":
            torch.set_num_threads(int(args[0]))
            answer(f"threads {torch.get_num_threads()}")
        elif command == "time":
            with torch.no_grad():
                start = time.perf_counter()
                logits = model.encode_decode(images, metas)
                seconds = time.perf_counter() - start
            answer(f"{seconds:.6f}")
        elif command == "logits":
            if logits is None:
                answer("error: no forward yet")
            else:
                torch.save(logits, out / "logits.pt")
                answer("saved")
        elif command == "quit":
            answer("bye")
            return
        else:
            answer(f"error: unknown command {command!r}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: mmseg_bench_peer.py JOB.json")
    main(json.loads(Path(sys.argv[1]).read_text()))
