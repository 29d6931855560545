"""ONNX export of the project's models, checked in the engines before the file exists.

`export_onnx(model, out, metadata=...)`:

1. copies the eval-mode model and switches every criss-cross block to the functional formulation
   (`ops.cca_export`, backend "export"): the naive op's in-place writes into views are dropped by the
   legacy exporter (the attention silently disappears) and refused by the dynamo exporter. A block on the
   Triton backend is an ExportError: the fused kernel has no ONNX form; export the config with
   `--set model.backend=naive` (the same function, which is what gets exported);
2. exports with the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, onnxscript) at `opset`, with
   dynamic height and width (multiples of `size_multiple`, dynamic batch);
3. checks the graph holds the attention (MatMul or Einsum, and Softmax) whenever the model has a
   criss-cross or non-local block;
4. writes the file to a temporary name beside `out`, runs it in ONNX Runtime and in OpenVINO (fp32; each when
   installed) at two sizes, one of them not a multiple of 8, against the torch model, and fails (nothing
   left at `out`) when the largest |logit difference| exceeds `atol` or the argmax agreement falls below
   `min_agreement`;
5. stores the project's metadata (`METADATA_KEY`, JSON: classes, palette, mean / std, channel order, config
   name, checkpoint and its sha256, eval settings, verification) and moves the file into place.

`read_metadata(path)` reads it back and refuses an .onnx that lacks it (exit code 4 on the command line).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ops.criss_cross import CrissCrossAttention
from ops.non_local import NonLocal2d
from repro.engine.config import EvalConfig, ExperimentConfig
from repro.engine.data.palettes import Palette, palette_for
from repro.engine.engines import ENGINES, EngineError, make_engine, package_installed, require_packages

METADATA_KEY = "ccrepro"
METADATA_FORMAT = "ccrepro-onnx-2"  # 2: the whole evaluation protocol (every EvalConfig field)
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's lowest
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Verification: fp32 engines against torch fp32 on the same input.
DEFAULT_ATOL = 1e-3
# Plus this fraction of the largest |logit| of the reference: fp32 rounding grows with the logits' scale (random
# R-101 weights give logits of tens, where ONNX Runtime's fused kernels differ by ~4e-3 from torch's).
DEFAULT_RTOL = 1e-4
DEFAULT_MIN_AGREEMENT = 0.999
ATTENTION_OPS = ({"MatMul", "Einsum"}, {"Softmax"})
# Exit codes (README): 2 a bad choice (config, backend, opset), 4 an unusable input file, 5 cannot write.
EXIT_CHOICE, EXIT_INPUT, EXIT_WRITE = 2, 4, 5


class ExportError(ValueError):
    """Export refused or failed; `exit_code` is the command line's (2 choice, 4 input file, 5 write)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_CHOICE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def max_opset() -> int:
    """The newest opset the installed onnx knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    require_packages("export")
    newest = max_opset()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset!r} is not supported: the dynamo exporter needs >= {MIN_OPSET} and the installed onnx "
            f"knows <= {newest}; use --opset {DEFAULT_OPSET}"
        )


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exportable(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` whose criss-cross blocks use the functional formulation (backend
    "export"); ExportError when a block asks for the Triton kernel."""
    for name, module in model.named_modules():
        if isinstance(module, CrissCrossAttention) and module.backend == "triton":
            raise ExportError(
                f"criss-cross block {name or 'model'!r} uses backend 'triton', a fused kernel with no ONNX form; "
                "export the same function through the naive path: --set model.backend=naive (it is exported "
                "as the functional formulation of ops/cca_export.py)"
            )
    copied = copy.deepcopy(model).eval()
    for module in copied.modules():
        if isinstance(module, CrissCrossAttention):
            module.backend = "export"
    return copied


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, CrissCrossAttention | NonLocal2d) for m in model.modules())


def op_counts(proto) -> dict[str, int]:
    """Node counts by op type in the graph and its local functions."""
    counts: dict[str, int] = {}
    nodes = list(proto.graph.node) + [node for function in proto.functions for node in function.node]
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_attention_in_graph(proto, *, what: str = "the exported graph") -> None:
    """ExportError unless the graph computes attention (MatMul or Einsum, and Softmax): the legacy exporter
    once produced a graph without them that still ran (the attention was silently dropped)."""
    counts = op_counts(proto)
    missing = [" or ".join(sorted(ops)) for ops in ATTENTION_OPS if not any(counts.get(op) for op in ops)]
    if missing:
        raise ExportError(
            f"{what} has no {' and no '.join(missing)} node: the attention was lost in export "
            f"(ops present: {', '.join(sorted(counts))})", exit_code=EXIT_INPUT,
        )


def metadata_for_config(cfg: ExperimentConfig, *, checkpoint: str | os.PathLike | None,
                        palette: Palette | None = None) -> dict:
    """What predict needs to run from the .onnx alone, from an experiment config and its checkpoint."""
    palette = palette or palette_for(cfg.data.dataset)
    return build_metadata(
        config=cfg.name, dataset=cfg.data.dataset, palette=palette, mean=cfg.data.mean, std=cfg.data.std,
        channel_order=cfg.data.channel_order, eval_cfg=cfg.eval, checkpoint=checkpoint,
        model={"backbone": cfg.backbone, "head": cfg.model.head, "recurrence": cfg.model.recurrence,
               "num_classes": cfg.model.num_classes},
    )


def build_metadata(*, config: str, dataset: str, palette: Palette, mean: Sequence[float], std: Sequence[float],
                   channel_order: str, eval_cfg: EvalConfig, checkpoint: str | os.PathLike | None,
                   model: dict | None = None, size_multiple: int = 1) -> dict:
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    return {
        "format": METADATA_FORMAT,
        "config": config,
        "dataset": dataset,
        "classes": list(palette.names),
        "palette": palette.colours.astype(int).tolist(),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "channel_order": channel_order,
        "input": f"{INPUT_NAME}: (B, 3, H, W) float32, channel_order then (x - mean) / std",
        "output": f"{OUTPUT_NAME}: (B, classes, H, W) float32",
        "size_multiple": int(size_multiple),
        # Every field of the evaluation protocol (repro.engine.config.EvalConfig), so an .onnx alone predicts
        # as its config's evaluation does.
        "eval": dataclasses.asdict(eval_cfg),
        "model": model or {},
        "checkpoint": checkpoint_path.name if checkpoint_path else None,
        "checkpoint_sha256": sha256_of(checkpoint_path) if checkpoint_path and checkpoint_path.is_file() else None,
        "torch": torch.__version__,
    }


@dataclass(frozen=True)
class OnnxMetadata:
    """The project's metadata of an exported file, as predict uses it."""

    raw: dict
    palette: Palette = field(repr=False)
    eval_cfg: EvalConfig

    @property
    def num_classes(self) -> int:
        return self.palette.num_classes


def read_metadata(path: str | os.PathLike) -> OnnxMetadata:
    """The metadata `export_onnx` stored in `path`; ExportError (exit 4) when the file is not ONNX or was not
    exported by this project."""
    require_packages("export")
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist", exit_code=EXIT_INPUT)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others
        raise ExportError(f"{str(path)!r} is not a readable ONNX file: {err}", exit_code=EXIT_INPUT) from None
    props = {prop.key: prop.value for prop in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(
            f"{str(path)!r} has no {METADATA_KEY!r} metadata: it was not exported by `python -m repro.export`, so "
            "its classes, palette and normalisation are unknown; export it with `python -m repro.export`",
            exit_code=EXIT_INPUT,
        )
    try:
        raw = json.loads(props[METADATA_KEY])
        if raw.get("format") != METADATA_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {METADATA_FORMAT!r}")
        palette = Palette(raw["dataset"], tuple(raw["classes"]), np.asarray(raw["palette"], dtype=np.uint8))
        ev = raw["eval"]
        eval_cfg = EvalConfig(**{key: tuple(value) if isinstance(value, list) else value
                                 for key, value in ev.items()})
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{str(path)!r}: unusable {METADATA_KEY!r} metadata: {err}", exit_code=EXIT_INPUT) from None
    return OnnxMetadata(raw=raw, palette=palette, eval_cfg=eval_cfg)


@dataclass(frozen=True)
class Check:
    """One engine run against torch at one size."""

    engine: str
    precision: str
    height: int
    width: int
    max_abs_logit_diff: float
    argmax_agreement: float
    passed: bool
    tolerance: float = float("nan")

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, share of pixels with the same argmax) of two (B, classes, H, W) outputs."""
    reference, other = reference.float(), other.float()
    if reference.shape != other.shape:
        raise ExportError(f"engine output {tuple(other.shape)} differs from torch's {tuple(reference.shape)}",
                          exit_code=EXIT_INPUT)
    diff = float((reference - other).abs().max())
    agreement = float((reference.argmax(1) == other.argmax(1)).float().mean())
    return diff, agreement


def verification_sizes(size_multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two input sizes: one a multiple of 8, one not (each a multiple of `size_multiple`)."""
    m = max(size_multiple, 1)

    def snap(v: int) -> int:
        return max(m, (v // m) * m)

    first = (snap(64), snap(96))
    second = (snap(58), snap(86))
    if second[0] % 8 == 0 and second[1] % 8 == 0:
        second = (snap(58) + m, snap(86))
    return first, second


def verify_file(path: Path, model: nn.Module, *, sizes: Sequence[tuple[int, int]], engines: Sequence[str],
                atol: float, min_agreement: float, seed: int = 0, rtol: float = DEFAULT_RTOL) -> list[Check]:
    """Run the file in each engine (fp32) at each size against `model` in torch fp32; a check passes when
    max |logit diff| <= atol + rtol * max |reference logit| and the argmax agreement >= min_agreement."""
    checks = []
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(1, 3, h, w, generator=generator) for h, w in sizes]
    with torch.no_grad():
        references = [model(x) for x in inputs]
    for engine in engines:
        runner = make_engine(engine, onnx_path=path, precision="fp32")
        for x, reference in zip(inputs, references, strict=True):
            with torch.no_grad():
                diff, agreement = compare(reference, runner(x))
            tolerance = atol + rtol * float(reference.abs().max())
            passed = bool(diff <= tolerance and agreement >= min_agreement)
            checks.append(Check(engine, "fp32", x.shape[2], x.shape[3], diff, agreement, passed, tolerance))
        del runner
    return checks


def check_classes(model: nn.Module, metadata: dict, *, size_multiple: int = 1) -> None:
    """ExportError (before any export work) when the model's output classes differ from the metadata's."""
    if "classes" not in metadata:
        return
    side = 8 * max(size_multiple, 1)
    with torch.no_grad():
        predicted = model(torch.zeros(1, 3, side, side)).shape[1]
    if predicted != len(metadata["classes"]):
        raise ExportError(
            f"class count mismatch: the model predicts {predicted} classes but config {metadata.get('config')!r} "
            f"({metadata.get('dataset')}) has {len(metadata['classes'])}; use the config of the checkpoint's dataset",
            exit_code=EXIT_INPUT,
        )


def installed_engines() -> list[str]:
    """The ONNX engines installed here (onnxruntime is part of the deploy extra, openvino too)."""
    return [engine for engine in ENGINES[1:] if package_installed(engine)]


def export_proto(model: nn.Module, *, opset: int, size_multiple: int = 1, sample_hw: tuple[int, int] = (64, 96),
                 quiet: bool = True):
    """The ONNX ModelProto of `exportable(model)` with dynamic batch, height and width."""
    check_opset(opset)
    from torch.export import Dim

    prepared = exportable(model)
    m = max(int(size_multiple), 1)
    height = Dim("height_blocks", min=max(1, 8 // m), max=8192 // m)
    width = Dim("width_blocks", min=max(1, 8 // m), max=8192 // m)
    # Batch too; the sample has 2 images (torch.export specialises a dimension of size 1).
    dynamic = {INPUT_NAME: {0: Dim("batch", min=1, max=1024),
                            2: height * m if m > 1 else Dim("height", min=8, max=8192),
                            3: width * m if m > 1 else Dim("width", min=8, max=8192)}}
    sample = torch.randn(2, 3, *sample_hw)
    sink = io.StringIO()
    redirect = (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)) if quiet else ()
    with contextlib.ExitStack() as stack:
        for manager in redirect:
            stack.enter_context(manager)
        try:
            program = torch.onnx.export(
                prepared, (sample,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True,
                dynamic_shapes=dynamic, opset_version=opset, verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; say which model failed
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"torch.onnx.export (dynamo) failed: {detail}", exit_code=EXIT_INPUT) from err
    proto = program.model_proto
    if has_attention(model):
        check_attention_in_graph(proto)
    return proto


def _with_metadata(proto, metadata: dict):
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True)
    return proto


@dataclass(frozen=True)
class ExportReport:
    path: Path
    checks: tuple[Check, ...]
    op_counts: dict[str, int]


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    metadata: dict,
    opset: int = DEFAULT_OPSET,
    size_multiple: int = 1,
    sizes: Sequence[tuple[int, int]] | None = None,
    engines: Sequence[str] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> ExportReport:
    """Export `model` (eval mode) to `out` with `metadata`, verified in `engines` (default: every installed
    one) at `sizes` (default: `verification_sizes(size_multiple)`); all or nothing (see the module
    docstring). ExportError on a refused model, a failed export or a failed verification."""
    require_packages("export")
    engines = installed_engines() if engines is None else list(engines)
    if not engines:
        raise EngineError("export verifies the file in onnxruntime or openvino and neither is installed: "
                          "pip install -e \".[deploy]\"")
    sizes = list(sizes or verification_sizes(size_multiple))
    if not any(h % 8 or w % 8 for h, w in sizes):
        raise ExportError(f"verification sizes {sizes} need one that is not a multiple of 8")
    model = model.eval()
    check_classes(model, metadata, size_multiple=size_multiple)
    proto = export_proto(model, opset=opset, size_multiple=size_multiple)
    metadata = {**metadata, "opset": opset, "size_multiple": int(size_multiple),
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(handle)
    except OSError as err:
        raise ExportError(f"cannot write {str(out)!r}: {err.strerror or err}", exit_code=EXIT_WRITE) from None
    temp = Path(temp_name)
    try:
        temp.write_bytes(_with_metadata(proto, metadata).SerializeToString())
        checks = verify_file(temp, model, sizes=sizes, engines=engines, atol=atol, min_agreement=min_agreement,
                             rtol=rtol)
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = ", ".join(f"{c.engine} {c.height}x{c.width}: max |logit diff| {c.max_abs_logit_diff:.3g} "
                              f"(tolerance {c.tolerance:.3g}), argmax agreement {100 * c.argmax_agreement:.3f}%"
                              for c in failed)
            raise ExportError(f"verification failed (tolerance max |logit diff| <= {atol:g} + {rtol:g} x max "
                              f"|logit|, agreement >= {100 * min_agreement:g}%): {worst}; nothing was written to "
                              f"{str(out)!r}", exit_code=EXIT_INPUT)
        metadata["verification"] = [c.as_dict() for c in checks]
        temp.write_bytes(_with_metadata(proto, metadata).SerializeToString())
        os.replace(temp, out)
    except OSError as err:
        raise ExportError(f"cannot write {str(out)!r}: {err.strerror or err}", exit_code=EXIT_WRITE) from None
    finally:
        temp.unlink(missing_ok=True)
    return ExportReport(path=out, checks=tuple(checks), op_counts=op_counts(proto))


def engine_model(model: nn.Module, *, engine: str, precision: str, metadata: dict | None = None,
                 threads: int | None = None) -> nn.Module:
    """`model` (torch, eval mode) on `engine` at `precision`: torch directly, onnxruntime / openvino through
    a verified export into a temporary folder (the engine reads it into memory; the file is then removed)."""
    from repro.engine.engines import check_choice

    check_choice(engine, precision)
    if engine == "torch":
        return make_engine("torch", model=model.eval(), precision=precision)
    with tempfile.TemporaryDirectory(prefix="ccrepro-export-") as folder:
        path = Path(folder) / "model.onnx"
        print(f"exporting the model to ONNX for {engine} (verified against torch; `python -m repro.export` "
              "writes the file once for reuse) ...", file=sys.stderr, flush=True)
        export_onnx(model, path, metadata=metadata or {}, engines=[engine])
        return make_engine(engine, onnx_path=path, precision=precision, threads=threads)
