"""`python -m repro.run CONFIG.yaml`: train and evaluate one published table row, append reported vs
measured mIoU, with how it was made, to results/miou.csv.

    python -m repro.run experiments/cityscapes_r2.yaml [--set train.lr=0.02 ...] [--resume | --force]
    python -m repro.run CONFIG.yaml --seeds 0 1 2    # one run folder per seed: runs/NAME-seed0, ...
    python -m repro.run CONFIG.yaml --eval-only --checkpoint PATH [--checkpoint-source mmseg] [--threads N]
        [--engine torch|onnxruntime|openvino] [--precision fp32|bf16]
    python -m repro.run CONFIG.yaml --check-data     # exit 0 if the dataset is there, 3 (and why) if not
                                                     # (with --eval-only: the validation split only)
    python -m repro.run CONFIG.yaml --smoke          # a few iterations on a generated tiny dataset
    torchrun --nproc-per-node N -m repro.run CONFIG.yaml   # DDP (nccl on CUDA, gloo on CPU)

Results rows (`repro.engine.provenance`): besides reported / measured, each row records the seed, the
evaluation protocol (mode, scales, flip, averaging), engine and precision, images evaluated / in the split,
iterations trained / configured, smoke and complete flags, the `--set` overrides, the SHA-256 of the
effective config and of the checkpoint file, the git commit and the device. Only `complete` rows (a full
evaluation of an unmodified config trained to its full schedule, or a released checkpoint; not smoke) count
in the report's verdicts. An old-format results CSV is refused (nothing appended), naming both layouts.

Run folders (default runs/NAME; runs/NAME-smoke with --smoke; runs/NAME-eval with --eval-only; -seedN
appended per seed) are never overwritten or mixed silently:
* without --resume, a folder that holds a run (checkpoint_last.pt or train_log.jsonl) is refused (exit 5),
  naming --resume, --force and --out-dir; --force deletes that run's files (checkpoints, log, config.yaml,
  evaluation files, tensorboard/; nothing else) and starts again;
* --resume with no checkpoint says so and starts from step 0 (the choice for schedulers that always pass
  --resume); --resume with a checkpoint checks that it was trained with the same recipe (exit 2 naming the
  keys that differ) and continues it exactly; a finished run that was evaluated says so and does nothing
  (no second row), a finished run not yet evaluated is evaluated;
* the effective config (after --set and the smoke shrink) is saved as OUT_DIR/config.yaml and inside every
  checkpoint, with the overrides and the smoke flag, so --eval-only on a smoke or overridden checkpoint builds
  the model it was trained with (announced), or refuses a --set model.* that contradicts it; rows of a smoke
  checkpoint go to OUT_DIR/miou.csv unless --results says otherwise.
Training logs to OUT_DIR/train_log.jsonl (loss, lr per log step; with `train.val_every`, validation mIoU,
pixel accuracy and per-class IoU by class name; TensorBoard scalars in OUT_DIR/tensorboard/ when the
`tensorboard` package is installed). The reported number is always the final checkpoint's; `train.keep_best`
also keeps the best validation weights in checkpoint_best.pt. Each evaluation writes eval.json, iou_per_class.csv
(class names), confusion_METRIC.csv (pixel counts) and confusion_METRIC.png (rows normalised), and curves.png.
Before training and before evaluating, one line says what will run (steps, images per step, crop, validation;
images, mode, scales, flip) and, after the first step / image, an estimate of the rest. When processes x
data.batch_size x train.grad_accum_steps differs from the source's data.batch_size x train.source_gpus, the
run says so with the numbers and the --set train.grad_accum_steps=N that matches it. Every run ends by
listing what it wrote and where.

`--smoke` checks a config end to end without its data: it writes 2 random samples per split (33x44) in
the config's dataset layout into a temporary folder, runs 2 iterations (batch 2, one checkpoint; a config
that validates during training validates after step 1) and the configured evaluation on one image, with the
same model family shrunk only in width and input size: depth, stem, output stride, head kind and recurrence
stay; `head_channels` and `aux_channels` become 16, crops 33x33 (slide windows 33x33, stride 22), multi-scale
uses scales (0.75, 1.0), no pretrained backbone. Its results go to the run folder, never to
results/miou.csv, and say "smoke" (row, closing lines). The checkpoint still holds the full-width backbone
(about 350 MB for R-101, 190 MB for R-50). Measured on the shared 2-core machine (one thread, other jobs
running): 3-6 s per config in-process (R-101 the slower), about 25 s as a fresh process (imports, model
construction, checkpoint hashing); all 37 configs ~2 minutes.

Bad input ends with one line on stderr, `python -m repro.run: error: NAME: problem`, and an exit code: 2
config (or an option, or a resume with another recipe), 3 no dataset, 4 a checkpoint / dataset file /
results CSV that cannot be used, 5 a file that cannot be written (full disk, folder not writable) or a run
folder that holds another run, 130 / 143 interrupted (Ctrl-C, SIGTERM; the last checkpoint stays intact and
`--resume` continues from it). Checkpoints are opened weights-only (`models.safe_load`): a file that would run
code when unpickled is refused, never opened. The output folder and the results CSV's header are checked
before training starts.

`--eval-only` on the CPU evaluates `models.fuse.inference_model` of the checkpoint's model (BatchNorm folded into
the convolutions; the 3x3 convolutions of >= 256 channels on Winograd F(4x4, 3x3), `models.winograd`; the
ResNet blocks' last 1x1 convolution accumulated into the residual; NCHW at every thread count, measured faster
than channels_last at 1 and 2 threads): the same predictions up to float rounding. `--threads N` sets torch's CPU
thread count (training and evaluation alike).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

import models
from models.checkpoints import CheckpointError
from models.fuse import inference_model
from repro.engine import provenance
from repro.engine.config import ConfigError, ExperimentConfig, load_config, with_overrides
from repro.engine.data import (
    DatasetError,
    DatasetNotFoundError,
    build_dataset,
    check_dataset,
    write_fake_dataset,
)
from repro.engine.distributed import barrier, init_distributed, shutdown
from repro.engine.engines import ENGINES, PRECISIONS, EngineError, check_choice, describe
from repro.engine.evaluate import EvalResult, evaluate, protocol_summary
from repro.engine.export import ExportError, engine_model, metadata_for_config
from repro.engine.provenance import RESULT_COLUMNS, Provenance, check_results_csv
from repro.engine.run_figures import draw_curves, write_confusion, write_iou_table
from repro.engine.train import (
    BEST_CHECKPOINT,
    BEST_FORMAT,
    LAST_CHECKPOINT,
    TENSORBOARD_DIR,
    TRAIN_FORMAT,
    TRAIN_LOG,
    build_model,
    class_names,
    effective_batch_note,
    human_duration,
    train,
)
from repro.io import CsvFormatError, append_csv_rows, append_jsonl, atomic_write_text, check_writable
from repro.vocabulary import (
    CHECKPOINT_SOURCES,
    EXIT_BAD_INPUT,
    EXIT_CANNOT_WRITE,
    EXIT_CONFIG,
    EXIT_NO_DATA,
    EXIT_OK,
    checkpoint_source,
    device_label,
    error_line,
)

PROG = "python -m repro.run"
# The project's errors about a bad input file (the CLI prints them as one line).
INPUT_ERRORS = (CheckpointError, DatasetError, CsvFormatError, FileNotFoundError)
__all__ = ["RESULT_COLUMNS", "main", "run", "smoke_config", "load_weights"]
SMOKE_IMAGE_HW = (33, 44)
SMOKE_CROP = (33, 33)
# What a run writes into its folder (removed by --force; nothing else in the folder is touched).
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, TRAIN_LOG, CONFIG_FILE, EVAL_FILE, "miou.csv", "iou_per_class.csv",
             "curves.png")


class RunFolderError(Exception):
    """The run folder holds another run (or a finished one) and the options do not say what to do with it."""


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
        # A config that validates during training does so after step 1 (the code path, on the 2 images).
        "train.val_every": 1 if cfg.train.val_every else None,
        "train.ohem_min_kept": None if cfg.train.ohem_min_kept is None else min(cfg.train.ohem_min_kept, 256),
        # Test-scale bounds equal to the generated image (a no-op rescale that keeps ms views' bounds rule);
        # the PaddleSeg val padding keeps its one extra row and column.
        "eval.scale": None if cfg.eval.scale is None else smoke_bounds,
        "eval.val_pad_size": None if cfg.eval.val_pad_size is None else (SMOKE_IMAGE_HW[0] + 1, SMOKE_IMAGE_HW[1] + 1),
        "eval.ms_scales": (0.75, 1.0),
    }
    if "slide" in (cfg.eval.mode, cfg.eval.ms_mode):
        overrides.update({"eval.crop_size": SMOKE_CROP, "eval.stride": (22, 22)})
    if cfg.train.amp == "fp16" and not torch.cuda.is_available():
        overrides["train.amp"] = "bf16"  # fp16 autocast is a GPU feature; bf16 exercises the same path on CPU
    return with_overrides(cfg, overrides)


def load_weights(model: torch.nn.Module, path: Path, *, source: str | None, state: object = None) -> None:
    """Our checkpoint (`checkpoint_last.pt` / `checkpoint_best.pt`, or a plain state dict of ours) or a foreign
    one, through `models.load_checkpoint`.

    Every file is opened weights-only (`models.safe_load`); there is no fallback to full unpickling. `state`
    is what `models.safe_load(path)` returned, when the caller has read the file already. `source` is a
    `--checkpoint-source` name ("ours" is "ccrepro"). Raises CheckpointError naming the file and the problem.
    """
    state = models.safe_load(path) if state is None else state
    source = checkpoint_source(source)
    if isinstance(state, dict) and str(state.get("format", "")).startswith("ccrepro-"):
        if state["format"] not in (TRAIN_FORMAT, BEST_FORMAT):
            raise CheckpointError(f"{path} is a ccrepro checkpoint of format {state['format']!r}, "
                                  f"expected {TRAIN_FORMAT!r} or {BEST_FORMAT!r}")
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


def _fail(code: int, message: object) -> int:
    print(error_line(PROG, str(message)), file=sys.stderr)
    return code


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
    again += ["--smoke"] if args.smoke else []
    again += ["--out-dir", str(out_dir)]
    again += ["--results", str(args.results)] if args.results else []
    command = "python -m repro.run " + shlex.join(again)
    return (
        f"{cfg.name}: interrupted ({name}); {checkpoint} (step {step} of {cfg.train.iterations}) is intact; "
        f"continue with: {command}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 2 config or option error, 3 dataset or backbone not found, 4 unusable "
               "checkpoint / dataset file / results CSV, 5 cannot write (or the run folder holds another run), "
               "130 / 143 interrupted.",
    )
    parser.add_argument("config", type=Path, help="experiment YAML (experiments/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.02 (repeatable; recorded in the "
                             "results row, and a row with a recipe override never counts as complete)")
    parser.add_argument("--resume", action="store_true",
                        help="continue OUT_DIR/checkpoint_last.pt (announced fresh start when there is none; a "
                             "finished and evaluated run says so and does nothing)")
    parser.add_argument("--force", action="store_true",
                        help="delete the previous run's files in OUT_DIR (checkpoints, log, evaluation) and "
                             "start again")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="train and evaluate once per seed, each in its own folder OUT_DIR-seedN "
                             "(default: the config's train.seed, in OUT_DIR)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="weights for --eval-only")
    parser.add_argument("--checkpoint-source", default=None, choices=CHECKPOINT_SOURCES,
                        help="layout of the checkpoint: ccrepro (this project's; alias ours), mmseg, "
                             "sssegmentation, official, ...; detected from its keys when omitted")
    parser.add_argument("--smoke", action="store_true",
                        help="2 iterations of a shrunk model on generated data (a check, never a result)")
    parser.add_argument(
        "--check-data", action="store_true",
        help="exit 0 if the data is there (with --eval-only: the validation split only), else 3",
    )
    parser.add_argument("--out-dir", type=Path,
                        help="run folder (default runs/NAME, runs/NAME-smoke; --eval-only: runs/NAME-eval)")
    parser.add_argument("--results", type=Path, help="CSV to append to (default results/miou.csv; "
                        "OUT_DIR/miou.csv with --smoke)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--eval-limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N images (the row then says partial and never counts)")
    parser.add_argument("--save-predictions", type=Path, default=None, metavar="DIR",
                        help="write each single-scale prediction here as a PNG in the dataset's label encoding "
                        "(Cityscapes: CITY/STEM_pred_labelIds.png, for the official evaluator; ADE20K: class + 1; "
                        "VOC: class)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="--eval-only: inference engine (onnxruntime / openvino run a verified ONNX export)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="--eval-only: bf16 (torch autocast / OpenVINO hint) only on a CPU with native bf16")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_only and args.checkpoint is None and not args.check_data:
        parser.error("--eval-only needs --checkpoint PATH")
    if args.checkpoint is not None and not args.eval_only:
        parser.error("--checkpoint is read only with --eval-only (training continues a run with --resume)")
    if args.seeds is not None and args.eval_only:
        parser.error("--seeds trains one run per seed; --eval-only evaluates one checkpoint")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    if args.resume and args.force:
        parser.error("--resume continues the run in OUT_DIR, --force deletes it: choose one")
    if args.eval_limit is not None and args.eval_limit < 1:
        parser.error(f"--eval-limit: expected N >= 1, got {args.eval_limit}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if (args.engine, args.precision) != ("torch", "fp32") and not args.eval_only:
        parser.error("--engine and --precision apply to --eval-only (training evaluates in torch fp32)")
    return args


def _prediction_clash(cfg: ExperimentConfig, folder: Path) -> Path | None:
    """The first validation label file a --save-predictions file in `folder` would overwrite (ADE20K and VOC
    predictions are named like their labels), or None; None too when the split is absent (reported later)."""
    from repro.engine.data import dataset_module, prediction_path

    module = dataset_module(cfg.data.dataset)
    try:
        pairs = module.find_pairs(module.resolve(cfg.data.root), cfg.data.val_split)
    except (DatasetNotFoundError, OSError):
        return None
    for image_path, label_path in pairs:
        if prediction_path(cfg.data.dataset, image_path, folder).resolve() == Path(label_path).resolve():
            return Path(label_path)
    return None


def _prediction_writer(cfg: ExperimentConfig, dataset, folder: Path):
    from repro.engine.data import write_prediction

    def write(index: int, train_ids) -> None:
        write_prediction(cfg.data.dataset, dataset.pairs[index][0], folder, train_ids)

    return write


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def default_out_dir(cfg: ExperimentConfig, args: argparse.Namespace, seed: int | None) -> Path:
    """runs/NAME (-smoke) (-eval) (-seedN), or --out-dir (-seedN)."""
    if args.out_dir is not None:
        base = args.out_dir
    else:
        base = Path("runs") / (cfg.name + ("-smoke" if args.smoke else "") + ("-eval" if args.eval_only else ""))
    return base.with_name(f"{base.name}-seed{seed}") if seed is not None else base


# A small image for models.fuse to find the convolution-norm pairs with (only the graph matters, not the size).
INFERENCE_PROBE = torch.zeros(1, 3, 65, 65)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        base_cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        return _fail(EXIT_CONFIG, err)

    try:
        check_choice(args.engine, args.precision)
    except EngineError as err:
        return _fail(EXIT_CONFIG, f"{base_cfg.name}: {err}")

    if args.save_predictions is not None:
        clash = _prediction_clash(base_cfg, args.save_predictions)
        if clash is not None:
            return _fail(EXIT_CONFIG, f"{base_cfg.name}: --save-predictions {args.save_predictions} would overwrite "
                                      f"the label file {clash}; choose a folder outside the dataset's label folders")

    if args.check_data:
        try:
            root = check_dataset(base_cfg.data, splits=("val",) if args.eval_only else ("train", "val"))
        except DatasetNotFoundError as err:
            return _fail(EXIT_NO_DATA, f"{base_cfg.name}: {err}")
        print(f"{base_cfg.name}: {base_cfg.data.dataset} found at {root}")
        return EXIT_OK

    ctx = init_distributed(device=args.device)
    summaries: list[tuple[int | None, list[dict[str, object]]]] = []
    try:
        for seed in args.seeds or [None]:
            cfg = base_cfg if seed is None else with_overrides(base_cfg, {"train.seed": seed})
            out_dir = default_out_dir(cfg, args, seed)
            code, rows = _run_seed(cfg, args, ctx=ctx, out_dir=out_dir)
            if code != EXIT_OK:
                return code
            summaries.append((seed, rows))
    finally:
        shutdown(ctx)
    if args.seeds and len(args.seeds) > 1 and ctx.is_main:
        print(seed_summary(base_cfg, summaries))
    return EXIT_OK


def seed_summary(cfg: ExperimentConfig, summaries: list[tuple[int | None, list[dict[str, object]]]]) -> str:
    """One line per metric: mean +- sample std over the seeds, beside the reported value."""
    lines = []
    metrics = dict.fromkeys(row["metric"] for _, rows in summaries for row in rows)
    for metric in metrics:
        values = [float(row["measured"]) for _, rows in summaries for row in rows
                  if row["metric"] == metric and row["measured"] != ""]
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        reported = cfg.reported.get(metric)
        lines.append(f"{cfg.name} {metric} over seeds {' '.join(str(seed) for seed, _ in summaries)}: "
                     f"{statistics.mean(values):.2f} +- {spread:.2f} (n={len(values)}; reported "
                     f"{reported if reported is not None else '-'})")
    return "\n".join(lines)


def _run_seed(cfg: ExperimentConfig, args: argparse.Namespace, *, ctx, out_dir: Path):
    temp = None
    try:
        if args.smoke:
            temp = tempfile.TemporaryDirectory(prefix=f"smoke-{cfg.name}-")
            data_root = write_fake_dataset(cfg.data, Path(temp.name), count=2, size_hw=SMOKE_IMAGE_HW)
            cfg = smoke_config(cfg, data_root=data_root)
        results_path = args.results or (out_dir / "miou.csv" if args.smoke else Path("results") / "miou.csv")
        try:
            # Evaluating a checkpoint needs only the validation split; training needs both.
            check_dataset(cfg.data, splits=("val",) if args.eval_only else ("train", "val"))
        except DatasetNotFoundError as err:
            return _fail(EXIT_NO_DATA, f"{cfg.name}: {err}"), []
        weights = cfg.model.pretrained_backbone
        if weights and not args.eval_only and not Path(weights).is_file():
            return _fail(EXIT_NO_DATA, (
                f"{cfg.name}: ImageNet backbone weights not found at {weights!r} (config key "
                "model.pretrained_backbone; --set model.pretrained_backbone=PATH, or null to train from scratch)"
            )), []
        try:
            return _run(cfg, args, ctx=ctx, out_dir=out_dir, results_path=results_path)
        except RunFolderError as err:
            return _fail(EXIT_CANNOT_WRITE, f"{cfg.name}: {err}"), []
        except ConfigError as err:
            return _fail(EXIT_CONFIG, f"{cfg.name}: {err}"), []
        except INPUT_ERRORS as err:
            return _fail(EXIT_BAD_INPUT, f"{cfg.name}: {_one_line(err)}"), []
        except (ExportError, EngineError) as err:
            return _fail(getattr(err, "exit_code", EXIT_CONFIG), f"{cfg.name}: {err}"), []
        except OSError as err:
            return _fail(EXIT_CANNOT_WRITE, f"{cfg.name}: cannot write {err.filename or ''}: {err.strerror or err}"), []
        except KeyboardInterrupt as err:
            print(error_line(PROG, _interrupted_message(cfg, args, out_dir, err)), file=sys.stderr)
            return 128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT), []
    finally:
        if temp is not None:
            temp.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Run folders


def _training_state(path: Path) -> dict:
    state = models.safe_load(path, what="training checkpoint")
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a ccrepro training checkpoint (format {found!r}, expected "
                              f"{TRAIN_FORMAT!r})")
    return state


def _evaluated(out_dir: Path, checkpoint_sha: str) -> bool:
    """True when OUT_DIR/eval.json is the evaluation of the checkpoint with this hash."""
    try:
        details = json.loads((out_dir / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(details, dict) and details.get("checkpoint_sha256") == checkpoint_sha


def _recipe_differences(saved: dict, cfg: ExperimentConfig) -> list[tuple[str, object, object]]:
    current = json.loads(json.dumps(asdict(cfg), default=list))
    saved = json.loads(json.dumps(saved, default=list))
    return [d for d in provenance.config_differences(saved, current)
            if d[0] not in provenance.RUNTIME_KEYS and d[0] != provenance.BACKBONE_KEY]


def prepare_run_folder(cfg: ExperimentConfig, args: argparse.Namespace, out_dir: Path, *,
                       announce: Callable[[str], None] = print, delete: bool = True) -> str:
    """Decide what a training command does with OUT_DIR: "fresh", "resume" or "finished" (nothing to do).

    Without --resume a folder holding a run (a checkpoint or a training log) is refused, naming --resume
    and --force; --force deletes that run's files (RUN_FILES and the TensorBoard folder, nothing else);
    --resume with no checkpoint announces a fresh start; --resume checks the checkpoint's config against
    this one (RunFolderError naming the keys that differ) and whether the run is finished and evaluated.
    """
    checkpoint, log = out_dir / LAST_CHECKPOINT, out_dir / TRAIN_LOG
    if args.force:
        removed = [name for name in RUN_FILES if (out_dir / name).exists()]
        removed += [TENSORBOARD_DIR + "/"] if (out_dir / TENSORBOARD_DIR).is_dir() else []
        removed += sorted(path.name for path in out_dir.glob("confusion_*"))
        if delete:  # one process deletes (under DDP the others only decide)
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)
            for stale in out_dir.glob("confusion_*"):
                stale.unlink(missing_ok=True)
        if removed:
            announce(f"{cfg.name}: --force: removed the previous run's files from {out_dir}: {', '.join(removed)}")
        return "fresh"
    if not args.resume:
        if checkpoint.is_file() or log.is_file():
            what = "a training log"
            if checkpoint.is_file():
                step = _training_state(checkpoint).get("step")
                done = "finished" if step == cfg.train.iterations else "unfinished"
                what = f"a {done} run (checkpoint at step {step} of {cfg.train.iterations})"
            raise RunFolderError(
                f"{out_dir} already holds {what}; nothing was overwritten. --resume continues it, --force "
                f"deletes it and starts again, --out-dir DIR starts a new run elsewhere"
            )
        return "fresh"
    if not checkpoint.is_file():
        announce(f"{cfg.name}: --resume: no {LAST_CHECKPOINT} in {out_dir}; starting from step 0")
        return "fresh"
    state = _training_state(checkpoint)
    saved = state.get("config")
    if isinstance(saved, dict):
        differences = _recipe_differences(saved, cfg)
        if differences:
            listed = ", ".join(f"{key} ({old!r} in the checkpoint, {new!r} now)" for key, old, new in differences)
            raise ConfigError(f"--resume: {checkpoint} was trained with another config: {listed}; resume with the "
                              "same --set options, or use --force / --out-dir for a new run")
    step = state.get("step")
    if step == cfg.train.iterations:
        if _evaluated(out_dir, provenance.file_sha256(checkpoint)):
            announce(f"{cfg.name}: the run in {out_dir} is finished (step {step} of {cfg.train.iterations}) and "
                  f"evaluated ({out_dir / EVAL_FILE}); nothing to do. Evaluate again with: python -m repro.run "
                  f"{args.config} --eval-only --checkpoint {checkpoint}")
            return "finished"
        announce(f"{cfg.name}: training in {out_dir} finished (step {step}); evaluating its last checkpoint")
    else:
        announce(f"{cfg.name}: --resume: continuing {checkpoint} from step {step} of {cfg.train.iterations}")
    return "resume"


def _batch_notes(cfg: ExperimentConfig, world_size: int) -> list[str]:
    """`effective_batch=N (source M)` when this run's total batch differs from the source's (then its rows are
    not complete); stored in the checkpoint so an --eval-only of it says the same."""
    if effective_batch_note(cfg, world_size) is None:
        return []
    total = world_size * cfg.data.batch_size * cfg.train.grad_accum_steps
    return [f"{provenance.EFFECTIVE_BATCH}={total} (source {cfg.data.batch_size * cfg.train.source_gpus})"]


def _write_config(out_dir: Path, cfg: ExperimentConfig, *, overrides: list[str], smoke: bool, source: Path) -> Path:
    raw = json.loads(json.dumps(asdict(cfg), default=list))
    header = [
        f"# Effective config of this run, written by python -m repro.run from {source}",
        f"# overrides: {'; '.join(overrides) or 'none'}" + ("; smoke (shrunk model, generated data)" if smoke else ""),
        f"# config_sha256: {provenance.config_sha256(cfg)}",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    return atomic_write_text(out_dir / CONFIG_FILE, text)


# ---------------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint


def model_for_checkpoint(cfg: ExperimentConfig, state: object, *, overrides: list[str], path: Path):
    """(config whose model matches the checkpoint, provenance facts of the checkpoint).

    A ccrepro checkpoint carries the effective config it was trained with: its `model` section is used (so a
    smoke or overridden checkpoint rebuilds the same model), announced; a `--set model.*` that contradicts
    it is refused (ConfigError naming the keys). A foreign checkpoint is taken as a released one."""
    facts = {"iterations_trained": None, "iterations_config": None, "seed": None, "overrides": [], "smoke": False,
             "notes": []}
    if not (isinstance(state, dict) and str(state.get("format", "")).startswith("ccrepro-")
            and isinstance(state.get("config"), dict)):
        return cfg, facts
    saved = state["config"]
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    facts.update(
        iterations_trained=state.get("step"),
        iterations_config=saved.get("train", {}).get("iterations"),
        seed=saved.get("train", {}).get("seed"),
        overrides=[str(o) for o in meta.get("overrides", [])],
        smoke=bool(meta.get("smoke", False)),
        notes=[str(n) for n in meta.get("notes", [])],
    )
    if saved.get("name") != cfg.name:
        print(f"{cfg.name}: note: {path} was trained for experiment {saved.get('name')!r}")
        facts["overrides"].append(f"checkpoint_experiment={saved.get('name')}")
    current = json.loads(json.dumps(asdict(cfg)["model"], default=list))
    differences = [d for d in provenance.config_differences(saved.get("model", {}), current)
                   if d[0] not in ("pretrained_backbone", "backend", "channels_last")]
    if not differences:
        return cfg, facts
    asked = {provenance.override_key(o) for o in overrides}
    contradicted = [key for key, _, _ in differences if f"model.{key}" in asked]
    if contradicted:
        listed = ", ".join(f"model.{key}" for key in contradicted)
        raise ConfigError(f"--set {listed} contradicts {path}, which was trained with "
                          + ", ".join(f"model.{k}={v!r}" for k, v, _ in differences if k in contradicted))
    rebuilt = with_overrides(cfg, {f"model.{key}": old for key, old, _ in differences})
    listed = ", ".join(f"model.{key}={old!r}" for key, old, _ in differences)
    kind = "smoke " if facts["smoke"] else ""
    print(f"{cfg.name}: building the model the {kind}checkpoint was trained with ({listed}; differs from "
          f"{cfg.name}.yaml)")
    return rebuilt, facts


class _TimedDataset:
    """The validation dataset, timing the first image: when the second is requested (`load` or indexing),
    prints an estimate for the rest (the evaluation reads images in order, one at a time)."""

    def __init__(self, dataset, *, count: int, announce: Callable[[str], None]) -> None:
        self._dataset, self._count, self._announce = dataset, count, announce
        self._started: float | None = None
        self._done = False

    def __len__(self) -> int:
        return len(self._dataset)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not found on the proxy itself (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def _tick(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()
        elif not self._done:
            self._done = True
            first = time.perf_counter() - self._started
            self._announce(f"  first image {first:.1f} s: about {human_duration(first * self._count)} for "
                           f"{self._count} images")

    def __getitem__(self, index: int):
        self._tick()
        return self._dataset[index]

    def load(self, index: int):
        """The raw image and label (what `evaluate` reads: each protocol builds its own views)."""
        self._tick()
        return self._dataset.load(index)


def _evaluation_plan(cfg: ExperimentConfig, count: int, total: int) -> str:
    metrics = ["mIoU"] + (["mIoU_ms_flip"] if getattr(cfg.eval, "ms_flip", False) else [])
    parts = []
    for metric in metrics:
        p = protocol_summary(cfg.eval, metric)
        parts.append(f"{metric}: {p['eval_mode']}, scales {p['eval_scales']}, flip {p['eval_flip']}")
    hint = ("; multi-scale + flip costs about 2 x the scales' pixels per image, --set eval.ms_flip=false skips it"
            if len(metrics) > 1 else "")
    return (f"{cfg.name}: evaluate {count} of {total} images of split {cfg.data.val_split!r}: "
            + "; ".join(parts) + hint)


# ---------------------------------------------------------------------------------------------------------
# One run


def _run(cfg: ExperimentConfig, args: argparse.Namespace, *, ctx, out_dir: Path, results_path: Path):
    """Train (or load) and evaluate; returns (exit code, result rows). Bad inputs raise (reported by
    `_run_seed`)."""
    # Before any work: a run of hours must not end on a folder it cannot write or a CSV it cannot append to.
    check_writable(out_dir)
    check_writable(results_path.parent)
    check_results_csv(results_path)
    progress = not args.no_progress
    announce = print if ctx.is_main else (lambda text: None)
    written: list[tuple[str, str]] = []
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides = [o for o in overrides if provenance.override_key(o) != "train.seed"]
    if args.eval_only:
        checkpoint = Path(args.checkpoint)
        state = models.safe_load(checkpoint)
        cfg, facts = model_for_checkpoint(cfg, state, overrides=overrides, path=checkpoint)
        if facts["smoke"] and args.results is None and not args.smoke:
            # A smoke checkpoint's numbers are never results: its rows go to the evaluation folder.
            results_path = out_dir / "miou.csv"
            check_results_csv(results_path)
        if (out_dir / LAST_CHECKPOINT).is_file() and out_dir.resolve() != checkpoint.resolve().parent:
            raise RunFolderError(f"{out_dir} holds a training run; --eval-only writes its evaluation files there: "
                                 "pass --out-dir DIR for this evaluation")
        # The checkpoint replaces every weight: the ImageNet backbone file is neither needed nor read.
        model = build_model(with_overrides(cfg, {"model.pretrained_backbone": None}), device=torch.device("cpu"))
        load_weights(model, checkpoint, source=args.checkpoint_source, state=state)
        model = model.to(ctx.device)
        if args.engine != "torch" or args.precision != "fp32":
            metadata = metadata_for_config(cfg, checkpoint=checkpoint) if args.engine != "torch" else None
            model = engine_model(model.eval(), engine=args.engine, precision=args.precision, metadata=metadata)
        elif ctx.device.type == "cpu":  # BatchNorm folded, Winograd, residuals in place: see models.fuse
            model = inference_model(model, INFERENCE_PROBE)
        announce(f"{cfg.name}: evaluating on engine {describe(model)}")
        smoke = args.smoke or facts["smoke"]
        all_overrides = [*facts["overrides"], *(o for o in overrides if o not in facts["overrides"])]
        seed = facts["seed"]
        iterations_trained, iterations_config = facts["iterations_trained"], facts["iterations_config"]
        batch_notes = facts["notes"]
        if (out_dir / EVAL_FILE).is_file():
            announce(f"{cfg.name}: replacing the previous evaluation files in {out_dir}")
    else:
        # Every process decides from the folder as it is, before any of them writes to it.
        status = prepare_run_folder(cfg, args, out_dir, announce=announce, delete=False)
        barrier(ctx)
        if args.force and ctx.is_main:
            prepare_run_folder(cfg, args, out_dir, announce=lambda text: None, delete=True)
        if status == "finished":
            return EXIT_OK, []
        notes = _batch_notes(cfg, ctx.world_size) if not args.smoke else []
        meta = {"overrides": overrides, "smoke": bool(args.smoke), "notes": notes}
        if ctx.is_main:
            written.append(("config", str(_write_config(out_dir, cfg, overrides=overrides, smoke=args.smoke,
                                                        source=args.config))))
        model, checkpoint = train(cfg, out_dir=out_dir, ctx=ctx, resume=status == "resume", progress=progress,
                                  meta=meta, announce=announce)
        smoke, all_overrides, seed = bool(args.smoke), overrides, cfg.train.seed
        iterations_trained, iterations_config = cfg.train.iterations, cfg.train.iterations
        batch_notes = notes
    dataset = build_dataset(cfg.data, split="val", eval_cfg=cfg.eval)
    on_prediction = None
    if args.save_predictions is not None:
        on_prediction = _prediction_writer(cfg, dataset, args.save_predictions)
    limit = args.eval_limit if args.eval_limit is not None else (1 if args.smoke else None)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    announce(_evaluation_plan(cfg, count, len(dataset)))
    timed = _TimedDataset(dataset, count=-(-count // ctx.world_size), announce=announce) if count > 1 else dataset
    results = evaluate(
        model,
        timed,
        eval_cfg=cfg.eval,
        num_classes=cfg.model.num_classes,
        ignore_index=cfg.data.ignore_index,
        ctx=ctx,
        limit=limit,
        on_prediction=on_prediction,
        progress=progress,
    )
    rows: list[dict[str, object]] = []
    if ctx.is_main:
        checkpoint_sha = provenance.file_sha256(checkpoint)
        prov = Provenance(
            overrides=tuple(all_overrides), smoke=smoke, seed=seed, iterations_trained=iterations_trained,
            iterations_config=iterations_config, images_evaluated=count, images_in_split=len(dataset),
            checkpoint=str(checkpoint), checkpoint_sha256=checkpoint_sha, config_sha256=provenance.config_sha256(cfg),
            commit=provenance.git_commit(), device=device_label(ctx.device, processes=ctx.world_size),
            engine=getattr(args, "engine", "torch"), precision=getattr(args, "precision", "fp32"),
            notes=tuple(batch_notes),
        )
        rows = provenance.result_rows(cfg, results, prov, protocol=protocol_summary)
        append_csv_rows(results_path, rows, columns=RESULT_COLUMNS)
        names = class_names(cfg.data.dataset, cfg.model.num_classes)
        written += _write_evaluation(out_dir, cfg, results, names, prov, checkpoint_sha)
        own_run = not args.eval_only or out_dir.resolve() == Path(checkpoint).resolve().parent
        for metric, r in results.items() if own_run else ():
            record = {"experiment": cfg.name, "event": "eval", "metric": metric, "mIoU": _json_number(r.miou),
                      "step": iterations_trained, "images": count}
            append_jsonl(out_dir / TRAIN_LOG, {**record, "checkpoint": str(checkpoint), "time": time.time()})
        curves = draw_curves(out_dir)
        if curves is not None:
            written.append(("curves", str(curves)))
        print(_closing_lines(cfg, rows, prov, out_dir=out_dir, results_path=results_path, checkpoint=Path(checkpoint),
                             written=written))
    barrier(ctx)
    return EXIT_OK, rows


def _write_evaluation(out_dir: Path, cfg: ExperimentConfig, results: dict[str, EvalResult], names, prov: Provenance,
                      checkpoint_sha: str) -> list[tuple[str, str]]:
    # NaN (a class absent from labels and predictions) becomes null: strict JSON.
    details = {
        "experiment": cfg.name,
        "checkpoint": prov.checkpoint,
        "checkpoint_sha256": checkpoint_sha,
        "iterations_trained": prov.iterations_trained,
        "images_evaluated": prov.images_evaluated,
        "images_in_split": prov.images_in_split,
        "class_names": list(names),
        "metrics": {
            metric: {
                "mIoU": _json_number(r.miou),
                "pixel_accuracy": _json_number(r.pixel_accuracy),
                "iou_per_class": {name: _json_number(v) for name, v in zip(names, r.iou_per_class, strict=True)},
                **protocol_summary(cfg.eval, metric),
            }
            for metric, r in results.items()
        },
    }
    written = [("evaluation", str(atomic_write_text(out_dir / EVAL_FILE,
                                                     json.dumps(details, indent=2, allow_nan=False) + "\n")))]
    written.append(("per-class IoU", str(write_iou_table(out_dir / "iou_per_class.csv", names, results))))
    for metric, r in results.items():
        csv_path, png_path = write_confusion(out_dir, metric, r.confusion, names)
        written.append(("confusion matrix", f"{csv_path} (+ normalised {png_path.name})"))
    return written


def _closing_lines(cfg: ExperimentConfig, rows, prov: Provenance, *, out_dir: Path, results_path: Path,
                   checkpoint: Path, written: list[tuple[str, str]]) -> str:
    lines = []
    if prov.smoke:
        lines.append(f"{cfg.name}: SMOKE (a shrunk model trained {prov.iterations_trained} steps on generated data; "
                     f"{prov.images_evaluated} image(s) evaluated): a check that the config runs end to end, not a "
                     "result")
    for row in rows:
        measured = f"{float(row['measured']):.2f}" if row["measured"] != "" else "n/a"
        lines.append(f"{cfg.name} {row['metric']}: measured {measured}  reported {row['reported'] or '-'}"
                     + ("  (smoke)" if prov.smoke else ""))
    kind = provenance.row_kind(rows[0]) if rows else "no rows"
    lines.append(f"results: {len(rows)} row(s) appended to {results_path} ({kind}"
                 + ("; the report's verdicts use only complete rows)" if kind != provenance.ROW_COMPLETE else ")"))
    lines.append(f"run folder: {out_dir}")
    if checkpoint.is_file():
        step = f", step {prov.iterations_trained} of {prov.iterations_config}" if prov.iterations_trained else ""
        lines.append(f"  checkpoint: {checkpoint} ({_size(checkpoint)}{step})")
    for what, where in written:
        lines.append(f"  {what}: {where}")
    if (out_dir / TRAIN_LOG).is_file():
        lines.append(f"  log: {out_dir / TRAIN_LOG}")
    if (out_dir / TENSORBOARD_DIR).is_dir():
        lines.append(f"  tensorboard: tensorboard --logdir {out_dir / TENSORBOARD_DIR}")
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


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
