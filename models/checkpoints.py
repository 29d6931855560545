"""Import (and export) of released CCNet checkpoints: a pure mapping from a foreign state dict to ours, by a
table of key rules (`KEY_RULES` below is the documented table), with shapes checked and missing / unexpected
keys reported.

Sources and where their layouts come from:
* "mmseg": mmsegmentation's CCNet (`configs/ccnet`). ResNetV1c backbone: `backbone.stem.{0,1,3,4,6,7}`,
  `backbone.layerN.i.{conv,bn}{1,2,3}`, `...downsample.{0,1}`. CCHead = FCNHead(num_convs=2,
  concat_input=True): `decode_head.convs.{0,1}.{conv,bn}`, `decode_head.cca.{query,key,value}_conv`,
  `decode_head.cca.gamma.scale` (mmcv `Scale`, a 0-d tensor; older mmcv stored `cca.gamma` of shape (1,)),
  `decode_head.conv_cat.{conv,bn}`, `decode_head.conv_seg`. Auxiliary FCNHead on layer3:
  `auxiliary_head.convs.0.{conv,bn}` (1024->256), `auxiliary_head.conv_seg`. mmsegmentation's FCN decode
  head (`fcn_r*-d8`) maps onto our FCNHead (head="fcn").
* "sssegmentation": `backbone_net.stem...` / `backbone_net.layerN...` (the same v1c stem),
  `conv_before_cca.{0,1}`, `cca.*` (mmcv), `conv_after_cca.{0,1}`, `decoder.{0,1,4}` (conv, norm, act,
  dropout, classifier), `auxiliary_decoder.{0,1,4}` (1024->512).
* "official": speedinghzl/CCNet `networks/ccnet.py`: deep stem `conv1/bn1/conv2/bn2/conv3/bn3`
  (3->64->64->128), `layerN...`, `head.conva.{0,1}`, `head.cca.{query,key,value}_conv`, `head.cca.gamma` (1,),
  `head.convb.{0,1}`, `head.bottleneck.{0,1,3}` (conv, InPlaceABNSync, dropout, classifier), `dsn.{0,1,3}`
  (1024->512). Its dsn 3x3 conv HAS a bias, which is folded into the following norm's running mean: exact,
  because a per-channel constant before a BatchNorm only shifts the mean it subtracts (in training the batch
  mean absorbs it). `criterion.*` (loss modules) is ignored. Its head norms are InPlaceABNSync with leaky
  ReLU 0.01: build with `stem="deep"`, `head_act="leaky_relu"`, `aux_channels=512`,
  `contract_dilation=False`, `pool_ceil_mode=True` to match it.
* "torchvision": ImageNet ResNet, torchvision layout (`conv1` 7x7, `bn1`, `layerN...`; `fc` ignored);
  stem "v1".
* "official_imagenet": the official repository's MIT deep-stem ImageNet weights (`conv1..bn3`, `layerN`; `fc`
  ignored); stem "deep".
* "mmseg_imagenet": open-mmlab's ResNetV1c ImageNet weights (`stem.N`, `layerN`; `fc` ignored); stem "v1c".
* "ccrepro": our own state dict (identity).

Files are opened by `safe_load` only: `torch.load(weights_only=True)`, never full unpickling, because a
checkpoint downloaded from the internet could otherwise run code when opened (a pickle may call any function).
Whatever goes wrong with a file (not a checkpoint, damaged, unsafe, wrong layout or class count) is one
`CheckpointError` naming the file and the problem.

A `module.` prefix (DataParallel) is stripped and `{"state_dict": ...}` / `{"model": ...}` wrappers unwrapped.
`num_batches_tracked` is optional in both directions (InPlaceABN and frozen BN have none).
A NonLocalHead has the same parameters as the criss-cross block (q/k/v convs, gamma), so it exports in the
CCHead layout too; nothing in the key names tells the two apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.resnet import ResNet

SOURCES = (
    "mmseg",
    "sssegmentation",
    "official",
    "torchvision",
    "official_imagenet",
    "mmseg_imagenet",
    "ccrepro",
)
# Sources that hold an ImageNet backbone only; their rules are relative to the backbone.
BACKBONE_SOURCES = ("torchvision", "official_imagenet", "mmseg_imagenet")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: not a PyTorch file, damaged, unsafe to open, or not matching the model."""


SCALAR = "scalar"  # mmcv `Scale`: a 0-d tensor in the checkpoint, shape (1,) in ours.

# Placeholders of the rule templates; the same name on both sides carries the matched text over.
_PLACEHOLDERS = {
    "p": r"[^.]+",
    "i": r"\d+",
    "proj": r"(?:query|key|value)_conv",
    "nl": r"(?:theta|phi|g)",
    "rest": r".+",
}

_BACKBONE_DEEP_STEM = (
    ("conv1.{p}", "stem.0.{p}"),
    ("bn1.{p}", "stem.1.{p}"),
    ("conv2.{p}", "stem.3.{p}"),
    ("bn2.{p}", "stem.4.{p}"),
    ("conv3.{p}", "stem.6.{p}"),
    ("bn3.{p}", "stem.7.{p}"),
    ("layer{rest}", "layer{rest}"),
)

# (foreign template, our template[, transform]). On import, every rule whose foreign side matches gives a
# candidate, and the first candidate that exists in the model wins (so one table serves RCCA and FCN heads).
# On export, the first rule whose our side matches names the foreign key.
KEY_RULES: dict[str, tuple[tuple[str, ...], ...]] = {
    "mmseg": (
        ("backbone.stem.{i}.{p}", "backbone.stem.{i}.{p}"),
        ("backbone.layer{rest}", "backbone.layer{rest}"),
        ("decode_head.convs.0.conv.{p}", "decode_head.conv_in.0.{p}"),
        ("decode_head.convs.0.bn.{p}", "decode_head.conv_in.1.{p}"),
        ("decode_head.convs.1.conv.{p}", "decode_head.conv_out.0.{p}"),
        ("decode_head.convs.1.bn.{p}", "decode_head.conv_out.1.{p}"),
        ("decode_head.cca.{proj}.{p}", "decode_head.attention.{proj}.{p}"),
        ("decode_head.cca.gamma.scale", "decode_head.attention.gamma", SCALAR),
        ("decode_head.cca.gamma", "decode_head.attention.gamma"),
        # NLHead's mmcv NonLocal2d (ConvModules) onto models.heads.EmbeddedGaussianNonLocal.
        ("decode_head.nl_block.{nl}.conv.{p}", "decode_head.attention.{nl}.{p}"),
        ("decode_head.nl_block.conv_out.conv.{p}", "decode_head.attention.conv_out.0.{p}"),
        ("decode_head.nl_block.conv_out.bn.{p}", "decode_head.attention.conv_out.1.{p}"),
        ("decode_head.conv_cat.conv.{p}", "decode_head.bottleneck.0.{p}"),
        ("decode_head.conv_cat.bn.{p}", "decode_head.bottleneck.1.{p}"),
        ("decode_head.conv_seg.{p}", "decode_head.classifier.{p}"),
        # mmsegmentation's FCN decode head onto our FCNHead (head="fcn").
        ("decode_head.convs.{i}.conv.{p}", "decode_head.convs.{i}.0.{p}"),
        ("decode_head.convs.{i}.bn.{p}", "decode_head.convs.{i}.1.{p}"),
        ("decode_head.conv_cat.conv.{p}", "decode_head.conv_cat.0.{p}"),
        ("decode_head.conv_cat.bn.{p}", "decode_head.conv_cat.1.{p}"),
        ("auxiliary_head.convs.{i}.conv.{p}", "auxiliary_head.convs.{i}.0.{p}"),
        ("auxiliary_head.convs.{i}.bn.{p}", "auxiliary_head.convs.{i}.1.{p}"),
        ("auxiliary_head.conv_seg.{p}", "auxiliary_head.classifier.{p}"),
    ),
    "sssegmentation": (
        ("backbone_net.stem.{i}.{p}", "backbone.stem.{i}.{p}"),
        ("backbone_net.conv1.{p}", "backbone.stem.0.{p}"),
        ("backbone_net.bn1.{p}", "backbone.stem.1.{p}"),
        ("backbone_net.layer{rest}", "backbone.layer{rest}"),
        ("conv_before_cca.0.{p}", "decode_head.conv_in.0.{p}"),
        ("conv_before_cca.1.{p}", "decode_head.conv_in.1.{p}"),
        ("cca.{proj}.{p}", "decode_head.attention.{proj}.{p}"),
        ("cca.gamma.scale", "decode_head.attention.gamma", SCALAR),
        ("cca.gamma", "decode_head.attention.gamma"),
        ("conv_after_cca.0.{p}", "decode_head.conv_out.0.{p}"),
        ("conv_after_cca.1.{p}", "decode_head.conv_out.1.{p}"),
        ("decoder.0.{p}", "decode_head.bottleneck.0.{p}"),
        ("decoder.1.{p}", "decode_head.bottleneck.1.{p}"),
        ("decoder.4.{p}", "decode_head.classifier.{p}"),
        ("auxiliary_decoder.0.{p}", "auxiliary_head.convs.0.0.{p}"),
        ("auxiliary_decoder.1.{p}", "auxiliary_head.convs.0.1.{p}"),
        ("auxiliary_decoder.4.{p}", "auxiliary_head.classifier.{p}"),
    ),
    "official": (
        *((foreign, "backbone." + ours) for foreign, ours in _BACKBONE_DEEP_STEM),
        ("head.conva.0.{p}", "decode_head.conv_in.0.{p}"),
        ("head.conva.1.{p}", "decode_head.conv_in.1.{p}"),
        ("head.cca.{proj}.{p}", "decode_head.attention.{proj}.{p}"),
        ("head.cca.gamma", "decode_head.attention.gamma"),
        ("head.convb.0.{p}", "decode_head.conv_out.0.{p}"),
        ("head.convb.1.{p}", "decode_head.conv_out.1.{p}"),
        ("head.bottleneck.0.{p}", "decode_head.bottleneck.0.{p}"),
        ("head.bottleneck.1.{p}", "decode_head.bottleneck.1.{p}"),
        ("head.bottleneck.3.{p}", "decode_head.classifier.{p}"),
        ("dsn.0.weight", "auxiliary_head.convs.0.0.weight"),
        ("dsn.1.{p}", "auxiliary_head.convs.0.1.{p}"),
        ("dsn.3.{p}", "auxiliary_head.classifier.{p}"),
    ),
    "torchvision": (
        ("conv1.{p}", "stem.0.{p}"),
        ("bn1.{p}", "stem.1.{p}"),
        ("layer{rest}", "layer{rest}"),
    ),
    "official_imagenet": _BACKBONE_DEEP_STEM,
    "mmseg_imagenet": (
        ("stem.{i}.{p}", "stem.{i}.{p}"),
        ("layer{rest}", "layer{rest}"),
    ),
    "ccrepro": (("{rest}", "{rest}"),),
}

# Conv biases with no counterpart in our (bias-free conv + norm) blocks: (foreign bias, our running_mean).
# Import subtracts the bias from the running mean; export writes a zero bias.
FOLDED_BIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "official": (("dsn.0.bias", "auxiliary_head.convs.0.1.running_mean"),),
}

# Foreign keys that carry no weights of ours: ImageNet classifiers, loss modules.
IGNORED_KEYS: dict[str, tuple[str, ...]] = {
    "official": (r"criterion\..*",),
    "torchvision": (r"fc\..*",),
    "official_imagenet": (r"fc\..*",),
    "mmseg_imagenet": (r"fc\..*",),
}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    regex = "".join(
        f"(?P<{part[1:-1]}>{_PLACEHOLDERS[part[1:-1]]})" if part.startswith("{") else re.escape(part)
        for part in parts
    )
    return re.compile(regex)


def _substitute(template: str, match: re.Match[str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: match.group(m.group(1)), template)


@dataclass(frozen=True)
class _Rule:
    foreign: str
    ours: str
    transform: str | None
    foreign_re: re.Pattern[str]
    ours_re: re.Pattern[str]


def _rules(source: str) -> tuple[_Rule, ...]:
    return tuple(
        _Rule(rule[0], rule[1], rule[2] if len(rule) > 2 else None, _compile(rule[0]), _compile(rule[1]))
        for rule in KEY_RULES[source]
    )


@dataclass(frozen=True)
class LoadReport:
    """What `load_checkpoint` did. Keys in `loaded` / `missing` are ours; `unexpected` / `ignored` are the
    checkpoint's; `notes` lists transforms (folded biases, reshaped scalars)."""

    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]
    notes: tuple[str, ...]

    def __str__(self) -> str:
        lines = [
            f"source={self.source}: {len(self.loaded)} loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
        ]
        for name in ("missing", "unexpected", "ignored", "notes"):
            values = getattr(self, name)
            if values:
                lines.append(f"  {name}: {', '.join(values[:10])}{' ...' if len(values) > 10 else ''}")
        return "\n".join(lines)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format and plain pickles start with the PROTO opcode


def _describe_non_checkpoint(path: Path, head: bytes, size: int) -> str | None:
    """Why a file is plainly not a torch.save file (empty, a web page, text); None when it may be one."""
    if size == 0:
        return f"{path} is empty (0 bytes), not a checkpoint"
    if head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        return None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return (
            f"{path} is a web page (HTML), not a checkpoint: the download probably saved a login or error page; "
            "download the .pth file itself"
        )
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")  # 64 bytes may cut a character
    if text and "\ufffd" not in text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"{path} is a text file (starts with {text[:40]!r}), not a PyTorch checkpoint"
    return None  # some other binary: torch.load decides (and its error is reported)


def safe_load(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """The object `torch.save` wrote to `path`, read with `torch.load(weights_only=True)` onto the CPU.

    This is the only way the project opens a checkpoint: the weights-only unpickler builds tensors, numbers,
    strings, lists, tuples and dicts and refuses everything else, so opening a file can never run code from
    it. There is no fallback to full unpickling. Raises FileNotFoundError when `path` is not a file and
    `CheckpointError` (one line naming the file) when it is empty, text, HTML, damaged, truncated, or needs
    anything beyond weights to be unpickled. `what` names the kind of file in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {err.strerror or err}") from None
    problem = _describe_non_checkpoint(path, head, size)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to decode means the file is unusable
        message = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe is not None:
            raise CheckpointError(
                f"refused to open {what} {path}: unpickling it would call {unsafe.group(1)}, which a file of "
                "weights never needs and which could run code; only tensors, numbers, strings, lists and dicts "
                "are loaded (weights_only=True). If you trust the file, convert it to a plain state dict "
                "yourself."
            ) from None
        first_line = next((line.strip() for line in message.splitlines() if line.strip()), type(err).__name__)
        first_line = first_line.split(". ")[0]  # torch's zip reader goes on with generic advice
        if "Weights only load failed" in first_line:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
            first_line = "the weights-only unpickler rejected it" + (f" ({detail.group(1).strip()})" if detail else "")
        kind = "truncated or damaged" if head.startswith(_ZIP_MAGIC) else "damaged or not a PyTorch checkpoint"
        raise CheckpointError(
            f"{what} {path} ({size} bytes) is {kind}: {type(err).__name__}: {first_line[:300]}"
        ) from None


def _unwrap(state: Any, origin: str) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{origin} holds a {type(state).__name__}, expected a state dict (a mapping)")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            return state[wrapper]
    return state


def read_state_dict(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Load a checkpoint file with `safe_load` (or take a mapping), unwrap {"state_dict"}/{"model"} and strip
    "module."; CheckpointError when the content is not a mapping of names to tensors."""
    if isinstance(path_or_state_dict, str | os.PathLike):
        origin = f"checkpoint {os.fspath(path_or_state_dict)}"
        state = safe_load(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        origin = "the state dict"
        state = path_or_state_dict
    else:
        raise TypeError(
            f"expected a checkpoint path or a state dict, got {type(path_or_state_dict).__name__}"
        )
    state = _unwrap(state, origin)
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{origin}: entry name {key!r} is a {type(key).__name__}, expected a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{origin}: entry {key!r} is a {type(value).__name__}, expected a tensor"
            )
        out[key.removeprefix("module.")] = value
    if not out:
        raise CheckpointError(f"{origin} holds no tensors")
    return out


def detect_source(keys) -> str:
    """Guess the layout of a state dict from its key names (see the module docstring)."""
    keys = set(keys)

    def has_prefix(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if has_prefix("backbone_net.", "conv_before_cca.", "auxiliary_decoder."):
        return "sssegmentation"
    if has_prefix("head.conva.", "head.cca.", "dsn."):
        return "official"
    if has_prefix("decode_head.conv_in.", "decode_head.classifier.", "auxiliary_head.classifier."):
        return "ccrepro"
    if has_prefix("decode_head.", "auxiliary_head.", "backbone."):
        return "mmseg"
    if "stem.0.weight" in keys:
        return "mmseg_imagenet"
    if "conv1.weight" in keys:
        return "official_imagenet" if "conv2.weight" in keys else "torchvision"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        f"cannot detect the checkpoint layout from its keys (e.g. {sample}); pass source= one of {SOURCES}"
    )


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise CheckpointError(f"unknown checkpoint source {source!r}; expected one of {SOURCES}")


def _target_key(ours: str, prefix: str, bare_backbone: bool, source: str) -> str | None:
    """Our key for a rule's result: prefixed for ImageNet sources loaded into a CCNet; for a full-model
    checkpoint loaded into a bare ResNet, the backbone part without "backbone." and None for the heads."""
    if not bare_backbone or source in BACKBONE_SOURCES:
        return prefix + ours
    if ours.startswith("backbone."):
        return ours.removeprefix("backbone.")
    return ours if source == "ccrepro" else None


def _shape_ok(value: torch.Tensor, target: torch.Tensor, transform: str | None) -> bool:
    if transform == SCALAR:
        return value.numel() == 1 and target.numel() == 1
    return tuple(value.shape) == tuple(target.shape)


def _class_hint(ours: str, value: torch.Tensor, target: Mapping[str, torch.Tensor]) -> str:
    """For a classifier: the class counts, the usual reason a released checkpoint does not fit."""
    if not re.search(r"classifier\.(weight|bias)$", ours) or value.dim() == 0:
        return ""
    return (
        f" (the checkpoint predicts {value.shape[0]} classes, the model {target[ours].shape[0]}: "
        "a checkpoint of another dataset, or the wrong model.num_classes)"
    )


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    source: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a checkpoint in any supported layout into `model` (a CCNet, or a bare ResNet backbone).

    Files are opened with `safe_load` (weights only). Raises CheckpointError naming the key and both shapes on a
    shape mismatch (and the class counts for a classifier), and (strict=True) when any weight of the model is
    left unset or any checkpoint key has no place in the model. ImageNet sources only fill the
    backbone; the heads are then not "missing".
    """
    state = read_state_dict(path_or_state_dict)
    try:
        return _load_state(model, state, source=source, strict=strict)
    except CheckpointError as err:
        if isinstance(path_or_state_dict, str | os.PathLike):
            raise CheckpointError(f"{os.fspath(path_or_state_dict)}: {err}") from None
        raise


def _load_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str | None, strict: bool
) -> LoadReport:
    source = detect_source(state) if source is None else source
    _check_source(source)
    target = model.state_dict()
    bare_backbone = isinstance(model, ResNet)
    prefix = "backbone." if source in BACKBONE_SOURCES and not bare_backbone else ""
    expected = [key for key in target if key.startswith(prefix)]
    ignored_res = [re.compile(pattern) for pattern in IGNORED_KEYS.get(source, ())]
    folds = dict(FOLDED_BIASES.get(source, ()))
    rules = _rules(source)

    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected, ignored, notes = [], [], []
    for key, value in state.items():
        if any(pattern.fullmatch(key) for pattern in ignored_res) or key in folds:
            if key not in folds:
                ignored.append(key)
            continue
        candidates = [
            (_target_key(_substitute(rule.ours, match), prefix, bare_backbone, source), rule.transform)
            for rule in rules
            if (match := rule.foreign_re.fullmatch(key))
        ]
        chosen = next(((ours, transform) for ours, transform in candidates if ours in target), None)
        if chosen is None:
            # BN step counters have no counterpart in frozen BN / InPlaceABN; a full checkpoint's heads
            # have no place in a bare backbone.
            head_of_full_model = bool(candidates) and all(ours is None for ours, _ in candidates)
            (ignored if key.endswith("num_batches_tracked") or head_of_full_model else unexpected).append(key)
            continue
        ours, transform = chosen
        if not _shape_ok(value, target[ours], transform):
            raise CheckpointError(
                f"shape mismatch for checkpoint key {key!r} -> model key {ours!r}: checkpoint has "
                f"{tuple(value.shape)}, model has {tuple(target[ours].shape)}{_class_hint(ours, value, target)}"
            )
        if ours in mapped:
            raise CheckpointError(f"checkpoint keys {origin[ours]!r} and {key!r} both map to model key {ours!r}")
        if transform == SCALAR:
            notes.append(f"{key}: reshaped {tuple(value.shape)} -> {tuple(target[ours].shape)}")
        mapped[ours] = value.reshape(target[ours].shape).to(target[ours].dtype)
        origin[ours] = key

    for bias_key, mean_key in folds.items():
        if bias_key not in state:
            continue
        if mean_key not in mapped:
            raise CheckpointError(
                f"cannot fold {bias_key!r}: its norm's running mean {mean_key!r} is not in the checkpoint"
            )
        bias = state[bias_key]
        if tuple(bias.shape) != tuple(mapped[mean_key].shape):
            raise CheckpointError(
                f"shape mismatch for checkpoint key {bias_key!r} -> model key {mean_key!r}: checkpoint has "
                f"{tuple(bias.shape)}, model has {tuple(mapped[mean_key].shape)}"
            )
        mapped[mean_key] = mapped[mean_key] - bias.to(mapped[mean_key].dtype)
        notes.append(f"{bias_key}: folded into {mean_key}")

    missing = [key for key in expected if key not in mapped and not key.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint (source={source}) does not match the model: {len(missing)} missing "
            f"{missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}; "
            "models.load_checkpoint(..., strict=False) loads the matching part anyway (the command line always "
            "loads strictly: a partial model would be evaluated with random weights)"
        )
    model.load_state_dict(mapped, strict=False)
    return LoadReport(
        source, tuple(sorted(mapped)), tuple(missing), tuple(unexpected), tuple(ignored), tuple(notes)
    )


def export_state_dict(model: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """Our model's weights in a foreign layout (the inverse of `load_checkpoint`); ImageNet sources export the
    backbone only. Raises ValueError for a weight the layout has no place for (e.g. a non-local head)."""
    _check_source(source)
    state = model.state_dict()
    if source in BACKBONE_SOURCES and not isinstance(model, ResNet):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    rules = _rules(source)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # InPlaceABN (official) keeps no step counter.
        if source in ("official", "official_imagenet") and key.endswith("num_batches_tracked"):
            continue
        rule, match = next(((r, m) for r in rules if (m := r.ours_re.fullmatch(key))), (None, None))
        if rule is None:
            raise ValueError(f"model key {key!r} has no place in the {source} layout")
        out[_substitute(rule.foreign, match)] = (
            value.reshape(()) if rule.transform == SCALAR else value.clone()
        )
    for bias_key, mean_key in FOLDED_BIASES.get(source, ()):
        if mean_key in state:
            out[bias_key] = torch.zeros_like(state[mean_key])
    return out
