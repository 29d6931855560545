"""Whole-model CPU inference on the torch path, beside mmsegmentation's own model with the same weights:
`python -m repro.inference_bench [--models R-50-D8 R-101-D8] [--threads 1 2] [--rounds 3] [--size 512x1024]`.

Variants (the `variant` column of results/inference_bench.csv):
* `torch_eager`: the model as trained (`models.build` from the config, eval mode, NCHW).
* `torch_folded`: `models.fuse.inference_model`: BatchNorm folded into the convolutions, every same-size 3x3
  convolution of >= 256 channels (layer3 / layer4, dilated, and the heads) on Winograd F(4x4, 3x3)
  (`models.winograd`), the ResNet blocks' last 1x1 convolution accumulated into the residual in place (what
  `repro.run --eval-only` and `repro.predict` run on the CPU).
* `torch_fused`: the same with channels_last weights and inputs (the Winograd layers then gather their tiles
  across the channel-interleaved layout and the residual accumulation falls back to three passes: measured
  slower than `torch_folded` at 1 and 2 threads, so the command lines run `torch_folded` at every thread count).
* `mmseg_1.2.2`: mmsegmentation's own model (`EncoderDecoder.encode_decode`), built from its config in its own
  venv (the parity peer); it runs as a subprocess that times its own forward and writes its logits to a file.
  The weights are mmseg's (random, non-trivial norms: repro/parity/peers/mmseg_peer.py build_model), imported into
  ours through `models.load_checkpoint(source="mmseg")`, so all three compute the same function.

Timing: batch 1, one image of the given size; per thread count, one warm-up call each, then `rounds` rounds in
which the three variants run one after the other (interleaved, so a burst of load from other processes hits all of
them); wall time of the forward alone. `speedup_vs_torch_eager` is the median over rounds of eager's time divided
by the variant's from the same round. `argmax_agreement` and `max_abs_logit_diff` compare each variant's logits (at
the input size) with torch_eager's: for `mmseg_1.2.2` that is "ours vs mmseg". `other_cpu_share`: the share of the
machine's CPU time that other processes (and the hypervisor) took during the timed rounds
(`repro.measure.contention`; the peer counts as ours): near 0 for a clean comparison, warned of above 5%. Rows are
upserted by (model, backbone, input_hw, batch, engine, precision, threads, variant, cpu): other variants' rows
(e.g. the export engines') are kept. `write_rows` is the file's one writer: `python -m repro.bench --inference`
(`repro.measure.engine_bench`, torch eager against ONNX Runtime / OpenVINO on an exported model) writes its rows
through it too, with the same columns and key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import models
from models.fuse import inference_model
from repro.engine.config import load_config, with_overrides
from repro.engine.train import build_model
from repro.io import upsert_csv
from repro.measure.contention import CpuShare, busy_warning
from repro.measure.environment import cpu_label, versions
from repro.vocabulary import device_label

COLUMNS = ["model", "backbone", "input_hw", "batch", "engine", "precision", "threads", "variant", "median_s",
           "min_s", "repeats", "speedup_vs_torch_eager", "argmax_agreement", "max_abs_logit_diff", "other_cpu_share",
           "cpu", "device", "torch", "date", "commit"]
KEY = ["model", "backbone", "input_hw", "batch", "engine", "precision", "threads", "variant", "cpu"]
OURS = ("torch_eager", "torch_folded", "torch_fused")
PEER_VARIANT = "mmseg_1.2.2"
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CONFIGS = {  # backbone -> experiment row transcribed from mmsegmentation's CCNet config at 512x1024
    "R-50-D8": EXPERIMENTS / "mmseg_cityscapes_r50_d8_512x1024_40k.yaml",
    "R-101-D8": EXPERIMENTS / "mmseg_cityscapes_r101_d8_512x1024_40k.yaml",
}
SEED = 2026


@dataclass(frozen=True)
class PeerSpec:
    """How to start mmsegmentation's side: its venv's python, the peer script, the mmseg config file."""

    python: Path
    script: Path
    config_py: str


class PeerModel:
    """mmsegmentation's model in its own process, driven line by line (see mmseg_bench_peer.py)."""

    def __init__(self, spec: PeerSpec, work: Path, image: torch.Tensor, *, max_threads: int, timeout: float = 900):
        self.work = work
        self.timeout = timeout
        torch.save(image, work / "image.pt")
        job = {"config_py": spec.config_py, "seed": SEED, "out": str(work), "image": str(work / "image.pt")}
        (work / "bench.json").write_text(json.dumps(job))
        environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        environment.update({"OMP_NUM_THREADS": str(max_threads), "MKL_NUM_THREADS": str(max_threads),
                            "PYTHONDONTWRITEBYTECODE": "1"})
        self.stderr = open(work / "peer_stderr.txt", "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen([str(spec.python), str(spec.script), str(work / "bench.json")], cwd=work,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env=environment)
        self._expect("ready")

    def _answer(self) -> str:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.stderr.flush()
                tail = " | ".join((self.work / "peer_stderr.txt").read_text().strip().splitlines()[-5:])
                raise RuntimeError(f"the mmseg peer exited ({self.process.poll()}): {tail}")
            if line.startswith("@@ "):
                return line[3:].strip()

    def _send(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        if answer.startswith("error"):
            raise RuntimeError(f"mmseg peer: {answer}")
        return answer

    def _expect(self, word: str) -> None:
        answer = self._answer()
        if answer != word:
            raise RuntimeError(f"mmseg peer said {answer!r}, expected {word!r}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return models.safe_load(self.work / "state.pt", what="mmsegmentation peer state")

    def set_threads(self, threads: int) -> None:
        self._send(f"threads {threads}")

    def time(self) -> float:
        return float(self._send("time"))

    def logits(self) -> torch.Tensor:
        self._send("logits")
        return models.safe_load(self.work / "logits.pt", what="mmsegmentation peer logits")

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self._send("quit")
                self.process.wait(timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
        finally:
            self.stderr.close()


def _timed(model: nn.Module, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(images)
        return time.perf_counter() - start, logits


def compare(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(argmax agreement over pixels, max |logit difference|) of two (B, K, H, W) logit tensors."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape")
    agreement = (logits.argmax(1) == reference.argmax(1)).double().mean().item()
    return agreement, (logits.double() - reference.double()).abs().max().item()


def our_models(config: Path, state: dict[str, torch.Tensor], example: torch.Tensor, *,
               source: str = "mmseg") -> dict[str, nn.Module]:
    """torch_eager, torch_folded and torch_fused from the experiment config, `state` (mmseg's) imported."""
    cfg = with_overrides(load_config(config), {"model.pretrained_backbone": None, "model.backend": "naive"})
    eager = build_model(cfg, device=torch.device("cpu"))
    models.load_checkpoint(eager, state, source=source, strict=True)
    eager.eval()
    return {"torch_eager": eager, "torch_folded": inference_model(eager, example),
            "torch_fused": inference_model(eager, example, channels_last=True)}


def measure(backbone: str, *, size: tuple[int, int], threads: Sequence[int], rounds: int,
            peer: PeerSpec | None, work: Path, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Rows for one backbone: our two variants and (when `peer`) mmseg's, per thread count."""
    config = CONFIGS[backbone]
    log = log or (lambda text: print(text, flush=True))
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(1, 3, *size, generator=generator)
    example = images[..., :64, :64]
    previous = torch.get_num_threads()
    peer_model = PeerModel(peer, work, images, max_threads=max(threads)) if peer is not None else None
    try:
        if peer_model is not None:
            state = peer_model.state_dict()
        else:  # without the peer: our own random weights (the mmseg rows are then missing, not faked)
            cfg = with_overrides(load_config(config), {"model.pretrained_backbone": None})
            torch.manual_seed(SEED)
            state = build_model(cfg, device=torch.device("cpu")).state_dict()
        variants = our_models(config, state, example, source="mmseg" if peer_model is not None else "ccrepro")
        rows = []
        for count in threads:
            torch.set_num_threads(count)
            if peer_model is not None:
                peer_model.set_threads(count)
            names = [*variants, *([PEER_VARIANT] if peer_model is not None else [])]
            times: dict[str, list[float]] = {name: [] for name in names}
            logits: dict[str, torch.Tensor] = {}
            share = CpuShare(pids=[peer_model.process.pid] if peer_model is not None else [])  # the peer is ours
            for round_ in range(rounds + 1):  # round 0 is the warm-up
                if round_ == 1:
                    share.start()
                seen = {}
                for name in names:
                    if name == PEER_VARIANT:
                        seen[name] = peer_model.time()
                    else:
                        seen[name], logits[name] = _timed(variants[name], images)
                    if round_:
                        times[name].append(seen[name])
                log(f"{backbone} {count} thread(s) {'round ' + str(round_) if round_ else 'warm-up'}: "
                    + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in seen.items()))
            other = share.stop()
            if warning := busy_warning(other):
                log(f"{backbone} {count} thread(s): {warning}")
            if peer_model is not None:
                logits[PEER_VARIANT] = peer_model.logits()
            for name in names:
                agreement, diff = compare(logits[name], logits["torch_eager"])
                rows.append(_row(config, backbone, size, count, name, times[name], times["torch_eager"], agreement,
                                 diff, other))
        return pd.DataFrame(rows, columns=COLUMNS)
    finally:
        torch.set_num_threads(previous)
        if peer_model is not None:
            peer_model.close()


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _row(config: Path, backbone: str, size: tuple[int, int], threads: int, variant: str, times: list[float],
         eager: list[float], agreement: float, diff: float, other_cpu_share: float) -> dict:
    return {
        "model": config.stem, "backbone": backbone, "input_hw": f"{size[0]}x{size[1]}", "batch": 1,
        "engine": "torch", "precision": "fp32", "threads": threads, "variant": variant,
        "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "repeats": len(times),
        "speedup_vs_torch_eager": round(statistics.median(e / t for e, t in zip(eager, times)), 3),
        "argmax_agreement": round(agreement, 6), "max_abs_logit_diff": f"{diff:.3g}",
        "other_cpu_share": round(other_cpu_share, 4), "cpu": cpu_label(),
        "device": device_label("cpu"), "torch": versions()["torch"],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "commit": _commit(),
    }


def write_rows(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Upsert `frame` into the CSV at `path` by KEY (rows of other variants and CPUs are kept), in COLUMNS' order."""
    return upsert_csv(path, frame, KEY, columns=COLUMNS)


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be HxW, e.g. 512x1024, got {text!r}") from None
    if height < 64 or width < 64:
        raise argparse.ArgumentTypeError(f"--size must be at least 64x64, got {text!r}")
    return height, width


def main(argv: list[str] | None = None, *, resolve_peer: Callable[[str], PeerSpec] | None = None) -> int:
    """`resolve_peer(backbone)` builds / finds mmsegmentation's venv (the entry module passes the parity room's);
    None or `--no-peer` measures our variants only."""
    parser = argparse.ArgumentParser(prog="python -m repro.inference_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS, reverse=True),
                        help="backbones to measure (default: all)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="torch CPU thread counts, each measured (default: 1 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of every variant (median reported; default 3)")
    parser.add_argument("--size", type=_size, default=(512, 1024), help="HxW (default 512x1024)")
    parser.add_argument("--no-peer", action="store_true", help="only our variants (no mmsegmentation venv)")
    parser.add_argument("--out", type=Path, default=Path("results/inference_bench.csv"),
                        help="CSV to update (rows of other variants are kept)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(count < 1 for count in args.threads):
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    frames = []
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as temp:
        for backbone in args.models:
            work = Path(temp) / backbone
            work.mkdir()
            peer = None if args.no_peer or resolve_peer is None else resolve_peer(backbone)
            frame = measure(backbone, size=args.size, threads=args.threads, rounds=args.rounds, peer=peer, work=work)
            write_rows(args.out, frame)  # each backbone as soon as it is measured
            frames.append(frame)
            print(frame[["backbone", "threads", "variant", "median_s", "speedup_vs_torch_eager", "argmax_agreement",
                         "max_abs_logit_diff"]].to_string(index=False), flush=True)
    print(f"wrote {sum(len(frame) for frame in frames)} rows to {args.out}")
    return 0
