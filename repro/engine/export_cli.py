"""`python -m repro.export CONFIG --checkpoint FILE [--checkpoint-source SRC] --out model.onnx`.

Builds the config's model, loads the checkpoint (ours or a released one, as `repro.predict` does: a class
count that does not match the config is refused), exports it to ONNX with dynamic height and width and the
metadata predict needs (see `repro.engine.export`), verifies the file in ONNX Runtime and OpenVINO (each when
installed) at two sizes against torch, and only then moves it to --out. Prints one line per check.

Exit codes: 0 written; 2 a bad choice (config, Triton backend, opset, engine not installed); 4 an unusable
input (checkpoint, classes, a failed export or verification); 5 --out cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.checkpoints import CheckpointError
from repro.engine.config import ConfigError, load_config
from repro.engine.engines import EngineError
from repro.engine.export import (
    DEFAULT_ATOL,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    EXIT_CHOICE,
    EXIT_INPUT,
    ExportError,
    check_opset,
    export_onnx,
    exportable,
    metadata_for_config,
)
from repro.engine.predict import CHECKPOINT_SOURCES, PredictError, load_model


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 97x131, got {text!r}") from None
    if height < 8 or width < 8:
        raise argparse.ArgumentTypeError(f"sizes must be at least 8x8, got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m repro.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="experiment YAML naming the model and dataset")
    parser.add_argument("--checkpoint", type=Path, required=True, help="weights: ours or a released checkpoint")
    parser.add_argument("--checkpoint-source", choices=CHECKPOINT_SOURCES, default=None,
                        help="layout of the checkpoint (detected from its keys when omitted)")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--verify-size", dest="sizes", type=parse_size, action="append", default=None,
                        metavar="HxW", help="verification input size (twice; one not a multiple of 8)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="largest |logit difference| allowed, plus --rtol x the largest |logit|")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="see --atol")
    parser.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                        help="smallest argmax agreement allowed (a fraction)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CHOICE
    try:
        # Cheap refusals before the checkpoint is read.
        check_opset(args.opset)
        if args.out.suffix != ".onnx":
            raise ExportError(f"--out {str(args.out)!r} must end in .onnx")
        model = load_model(cfg, args.checkpoint, source=args.checkpoint_source)
        exportable(model)  # refuses Triton before any work
        report = export_onnx(
            model, args.out, metadata=metadata_for_config(cfg, checkpoint=args.checkpoint), opset=args.opset,
            sizes=args.sizes, atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement,
        )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHOICE
    except (PredictError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT
    for check in report.checks:
        print(f"verified {check.engine} {check.precision} at {check.height}x{check.width}: max |logit diff| "
              f"{check.max_abs_logit_diff:.2e}, argmax agreement {100 * check.argmax_agreement:.4f}%")
    attention = {op: n for op, n in report.op_counts.items() if op in ("MatMul", "Einsum", "Softmax")}
    print(f"wrote {report.path} (opset {args.opset}, dynamic height and width; attention nodes {attention})")
    return 0
