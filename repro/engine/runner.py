"""`python -m repro.run CONFIG.yaml`: train and evaluate one published table row, append reported vs
measured mIoU to results/miou.csv.

    python -m repro.run experiments/cityscapes_r2.yaml [--set train.lr=0.02 ...] [--resume]
    python -m repro.run CONFIG.yaml --eval-only --checkpoint PATH [--checkpoint-source mmseg]
        [--engine torch|onnxruntime|openvino] [--precision fp32|bf16]
    python -m repro.run CONFIG.yaml --check-data     # exit 0 if the dataset is there, 3 (and why) if not
    python -m repro.run CONFIG.yaml --smoke          # a few iterations on a generated tiny dataset
    torchrun --nproc-per-node N -m repro.run CONFIG.yaml   # DDP (nccl on CUDA, gloo on CPU)

`--smoke` checks a config end to end without its data: it writes 2 random samples per split (33x44) in
the config's dataset layout into a temporary folder, runs 2 iterations (batch 2, one checkpoint) and the
configured evaluation on one image, with the same model family shrunk only in width and input size: depth,
stem, output stride, head kind and recurrence stay; `head_channels` and `aux_channels` become 16, crops
33x33 (slide windows 33x33, stride 22), multi-scale uses scales (0.75, 1.0), no pretrained backbone. Its
results go to the run folder, never to results/miou.csv. Measured on the shared 2-core machine (one
thread, other jobs running): 3-6 s per config in-process (R-101 the slower), about 25 s as a fresh process
(imports, model construction); all 37 configs ~2 minutes.

Bad input ends with one line on stderr naming the file and the problem, and an exit code: 2 config, 3 no
dataset, 4 a checkpoint / dataset file / results CSV that cannot be used, 5 a file that cannot be written
(full disk, folder not writable), 130 / 143 interrupted (Ctrl-C, SIGTERM; the last checkpoint stays intact
and `--resume` continues from it). Checkpoints are opened weights-only (`models.safe_load`): a file that
would run code when unpickled is refused, never opened. The output folder and the results CSV's header are
checked before training starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import models
from models.checkpoints import CheckpointError
from repro.engine.config import ConfigError, ExperimentConfig, load_config, with_overrides
from repro.engine.data import DatasetError, DatasetNotFoundError, build_dataset, check_dataset, write_fake_dataset
from repro.engine.distributed import barrier, init_distributed, shutdown
from repro.engine.engines import ENGINES, PRECISIONS, EngineError, check_choice, describe
from repro.engine.evaluate import EvalResult, evaluate
from repro.engine.export import ExportError, engine_model, metadata_for_config
from repro.engine.train import LAST_CHECKPOINT, TRAIN_FORMAT, build_model, train
from repro.io import (
    CsvFormatError,
    append_csv_rows,
    append_jsonl,
    atomic_write_text,
    check_csv_header,
    check_writable,
)
from repro.vocabulary import device_label

EXIT_OK, EXIT_CONFIG, EXIT_NO_DATA, EXIT_BAD_INPUT, EXIT_CANNOT_WRITE = 0, 2, 3, 4, 5
# The project's errors about a bad input file (the CLI prints them as one line).
INPUT_ERRORS = (CheckpointError, DatasetError, CsvFormatError, FileNotFoundError)
RESULT_COLUMNS = (
    "experiment", "dataset", "backbone", "crop", "schedule", "metric",
    "reported", "measured", "delta", "checkpoint", "device", "date",
)  # fmt: skip
SMOKE_IMAGE_HW = (33, 44)
SMOKE_CROP = (33, 33)


def smoke_config(cfg: ExperimentConfig, *, data_root: Path) -> ExperimentConfig:
    """The config shrunk for `--smoke` (see the module docstring for what changes and what stays)."""
    # Keep-ratio bounds equal to the generated image: the random ratio alone rescales it.
    smoke_bounds = (max(SMOKE_IMAGE_HW), min(SMOKE_IMAGE_HW))
    overrides = {
        "data.root": str(data_root),
        "data.crop_size": SMOKE_CROP,
        "data.base_size": smoke_bounds if cfg.data.rescale == "keep_ratio_bounds" else None,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "model.head_channels": 16,
        "model.aux_channels": 16,
        "model.qk_channels": None,
        "model.pretrained_backbone": None,
        "train.iterations": 2,
        "train.grad_accum_steps": 1,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.ohem_min_kept": None if cfg.train.ohem_min_kept is None else min(cfg.train.ohem_min_kept, 256),
        "eval.scale": None,
        "eval.ms_scales": (0.75, 1.0),
    }
    if cfg.eval.mode == "slide":
        overrides.update({"eval.crop_size": SMOKE_CROP, "eval.stride": (22, 22)})
    if cfg.train.amp == "fp16" and not torch.cuda.is_available():
        overrides["train.amp"] = "bf16"  # fp16 autocast is a GPU feature; bf16 exercises the same path on CPU
    return with_overrides(cfg, overrides)


def result_rows(
    cfg: ExperimentConfig, results: dict[str, EvalResult], *, checkpoint: str, device: str, smoke: bool
) -> list[dict[str, object]]:
    """Rows of results/miou.csv for the measured metrics (mIoU in percent)."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for metric, result in results.items():
        reported = cfg.reported.get(metric)
        measured = round(result.miou, 4)
        rows.append(
            {
                "experiment": cfg.name,
                "dataset": cfg.data.dataset,
                "backbone": cfg.backbone,
                "crop": f"{cfg.data.crop_size[0]}x{cfg.data.crop_size[1]}",
                "schedule": f"{cfg.train.iterations}it" + (" (smoke)" if smoke else ""),
                "metric": metric,
                "reported": "" if reported is None else reported,
                "measured": measured,
                "delta": "" if reported is None else round(measured - reported, 4),
                "checkpoint": checkpoint,
                "device": device,
                "date": date,
            }
        )
    return rows


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def load_weights(model: torch.nn.Module, path: Path, *, source: str | None, state: object = None) -> None:
    """Our training checkpoint (`checkpoint_last.pt`) or a foreign one, through `models.load_checkpoint`.

    Every file is opened weights-only (`models.safe_load`); there is no fallback to full unpickling. `state`
    is what `models.safe_load(path)` returned, when the caller has read the file already.
    Raises CheckpointError naming the file and the problem.
    """
    state = models.safe_load(path) if state is None else state
    if isinstance(state, dict) and str(state.get("format", "")).startswith("ccrepro-train"):
        if state["format"] != TRAIN_FORMAT:
            raise CheckpointError(f"{path} is a ccrepro training checkpoint of format {state['format']!r}, "
                                  f"expected {TRAIN_FORMAT!r}")
        state, source = state.get("model"), "ccrepro"
    try:
        report = models.load_checkpoint(model, state, source=source)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    print(f"loaded {path}: {report}")


def _one_line(err: BaseException) -> str:
    """The message of one of the project's errors; one re-raised from a DataLoader worker carries the worker's
    traceback, whose last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) received: unwinds like Ctrl-C, so atomic writes drop their temporary files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def _interrupted_message(cfg: ExperimentConfig, args: argparse.Namespace, out_dir: Path, err: BaseException) -> str:
    name = err.args[0] if isinstance(err, Interrupted) else "SIGINT"
    checkpoint = out_dir / LAST_CHECKPOINT
    if args.eval_only or not checkpoint.is_file():
        return f"{cfg.name}: interrupted ({name}); no checkpoint of this run was written"
    try:
        step = models.safe_load(checkpoint, what="training checkpoint")["step"]
    except (CheckpointError, KeyError, TypeError):
        step = "?"
    again = [str(args.config), *(part for override in args.overrides for part in ("--set", override)), "--resume"]
    again += ["--out-dir", str(out_dir)] if args.out_dir else []
    again += ["--results", str(args.results)] if args.results else []
    command = "python -m repro.run " + shlex.join(again)
    return (
        f"{cfg.name}: interrupted ({name}); {checkpoint} (step {step} of {cfg.train.iterations}) is intact; "
        f"continue with: {command}"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="experiment YAML (experiments/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.02 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint_last.pt")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="weights for --eval-only")
    parser.add_argument("--checkpoint-source", default=None,
                        help="layout of a foreign checkpoint (models.SOURCES); detected when omitted")
    parser.add_argument("--smoke", action="store_true", help="2 iterations on a generated tiny dataset")
    parser.add_argument("--check-data", action="store_true", help="exit 0 if the data is there, else 3")
    parser.add_argument("--out-dir", type=Path, help="run folder (default runs/NAME, runs/NAME-smoke)")
    parser.add_argument("--results", type=Path, help="CSV to append to (default results/miou.csv; "
                        "OUT_DIR/miou.csv with --smoke)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--save-predictions", type=Path, default=None,
                        help="Cityscapes: write label-id prediction PNGs here (for the official evaluator)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="--eval-only: inference engine (onnxruntime / openvino run a verified ONNX export)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="--eval-only: bf16 (torch autocast / OpenVINO hint) only on a CPU with native bf16")
    args = parser.parse_args(argv)
    if args.eval_only and args.checkpoint is None:
        parser.error("--eval-only needs --checkpoint PATH")
    if (args.engine, args.precision) != ("torch", "fp32") and not args.eval_only:
        parser.error("--engine and --precision apply to --eval-only (training evaluates in torch fp32)")
    return args


def _prediction_writer(cfg: ExperimentConfig, dataset, folder: Path):
    from repro.engine.data.base import write_png
    from repro.engine.data.cityscapes import train_ids_to_label_ids

    if cfg.data.dataset != "cityscapes":
        raise ValueError(f"--save-predictions writes the Cityscapes format; dataset is {cfg.data.dataset!r}")

    def write(index: int, train_ids) -> None:
        image_path = dataset.pairs[index][0]
        stem = image_path.name[: -len("_leftImg8bit.png")]
        path = folder / image_path.parent.name / f"{stem}_pred_labelIds.png"
        write_png(path, train_ids_to_label_ids(train_ids))

    return write


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG

    try:
        check_choice(args.engine, args.precision)
    except EngineError as err:
        print(f"{cfg.name}: {err}", file=sys.stderr)
        return EXIT_CONFIG

    if args.check_data:
        try:
            root = check_dataset(cfg.data)
        except DatasetNotFoundError as err:
            print(f"{cfg.name}: {err}", file=sys.stderr)
            return EXIT_NO_DATA
        print(f"{cfg.name}: {cfg.data.dataset} found at {root}")
        return EXIT_OK

    out_dir = args.out_dir or Path("runs") / (cfg.name + ("-smoke" if args.smoke else ""))
    temp = None
    if args.smoke:
        temp = tempfile.TemporaryDirectory(prefix=f"smoke-{cfg.name}-")
        data_root = write_fake_dataset(cfg.data, Path(temp.name), count=2, size_hw=SMOKE_IMAGE_HW)
        cfg = smoke_config(cfg, data_root=data_root)
    results_path = args.results or (out_dir / "miou.csv" if args.smoke else Path("results") / "miou.csv")

    try:
        check_dataset(cfg.data)
    except DatasetNotFoundError as err:
        print(f"{cfg.name}: {err}", file=sys.stderr)
        return EXIT_NO_DATA

    weights = cfg.model.pretrained_backbone
    if weights and not args.eval_only and not Path(weights).is_file():
        print(
            f"{cfg.name}: ImageNet backbone weights not found at {weights!r} (config key "
            "model.pretrained_backbone; --set model.pretrained_backbone=PATH, or null to train from scratch)",
            file=sys.stderr,
        )
        return EXIT_NO_DATA

    ctx = init_distributed(device=args.device)
    try:
        return _run(cfg, args, ctx=ctx, out_dir=out_dir, results_path=results_path)
    except INPUT_ERRORS as err:
        print(f"{cfg.name}: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ExportError, EngineError) as err:
        print(f"{cfg.name}: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_CONFIG)
    except OSError as err:
        print(f"{cfg.name}: cannot write {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except KeyboardInterrupt as err:
        print(_interrupted_message(cfg, args, out_dir, err), file=sys.stderr)
        return 128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT)
    finally:
        shutdown(ctx)
        if temp is not None:
            temp.cleanup()


def _run(cfg: ExperimentConfig, args: argparse.Namespace, *, ctx, out_dir: Path, results_path: Path) -> int:
    """Train (or load) and evaluate; the errors of bad inputs are reported by `run`."""
    # Before any work: a run of hours must not end on a folder it cannot write or a CSV it cannot append to.
    check_writable(out_dir)
    check_writable(results_path.parent)
    check_csv_header(results_path, RESULT_COLUMNS)
    progress = not args.no_progress
    if args.eval_only:
        # The checkpoint replaces every weight: the ImageNet backbone file is neither needed nor read.
        model = build_model(with_overrides(cfg, {"model.pretrained_backbone": None}), device=torch.device("cpu"))
        load_weights(model, args.checkpoint, source=args.checkpoint_source)
        if args.engine != "torch" or args.precision != "fp32":
            metadata = metadata_for_config(cfg, checkpoint=args.checkpoint) if args.engine != "torch" else None
            model = engine_model(model.eval(), engine=args.engine, precision=args.precision, metadata=metadata)
        print(f"{cfg.name}: evaluating on engine {describe(model)}")
        model = model.to(ctx.device)
        checkpoint = str(args.checkpoint)
    else:
        model, checkpoint_path = train(
            cfg, out_dir=out_dir, ctx=ctx, resume=args.resume, progress=progress
        )
        checkpoint = str(checkpoint_path)
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    on_prediction = None
    if args.save_predictions is not None:
        on_prediction = _prediction_writer(cfg, dataset, args.save_predictions)
    results = evaluate(
        model,
        dataset,
        eval_cfg=cfg.eval,
        num_classes=cfg.model.num_classes,
        ignore_index=cfg.data.ignore_index,
        ctx=ctx,
        limit=args.eval_limit if args.eval_limit is not None else (1 if args.smoke else None),
        on_prediction=on_prediction,
        progress=progress,
    )
    if ctx.is_main:
        device = device_label(ctx.device, processes=ctx.world_size)
        rows = result_rows(cfg, results, checkpoint=checkpoint, device=device, smoke=args.smoke)
        append_csv_rows(results_path, rows, columns=RESULT_COLUMNS)
        # NaN (a class absent from labels and predictions) becomes null: strict JSON.
        details = {
            metric: {
                "mIoU": _json_number(r.miou),
                "pixel_accuracy": _json_number(r.pixel_accuracy),
                "iou_per_class": [_json_number(v) for v in r.iou_per_class],
            }
            for metric, r in results.items()
        }
        atomic_write_text(out_dir / "eval.json", json.dumps(details, indent=2, allow_nan=False) + "\n")
        for metric, r in results.items():
            record = {"experiment": cfg.name, "event": "eval", "metric": metric, "mIoU": _json_number(r.miou)}
            append_jsonl(out_dir / "train_log.jsonl", {**record, "checkpoint": checkpoint, "time": time.time()})
        for row in rows:
            measured = f"{row['measured']:.2f}"
            print(f"{cfg.name} {row['metric']}: measured {measured}  reported {row['reported'] or '-'}")
    barrier(ctx)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return run(args)  # signal handlers can only be set from the main thread
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: temporaries removed, the last checkpoint kept.
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
