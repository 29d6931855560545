"""Fuzzing the two loaders of untrusted files (issue 18): the experiment config loader (random YAML trees, wrong
types, unicode, huge and non-finite numbers, undecodable bytes, random `--set` overrides) and the checkpoint
loader (random byte flips and truncations of a real checkpoint, zip and legacy formats). The only allowed
outcomes are a loaded config / model or the project's own error (ConfigError, CheckpointError), never another
exception. Derandomized, so CI runs the same examples every time."""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from models.checkpoints import CheckpointError
from models.synthetic import SyntheticSegmenter
from repro.engine.config import ConfigError, ExperimentConfig, load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
_BASE = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(_BASE, max_examples=examples)

# Scalars a YAML file can hold, with the edges: huge integers, NaN / inf, unicode and control characters.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "50", "1e999", "nan", "~", "null", "é", "\u202e", "naive", "rcca", "cityscapes"]),
)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _load_text(folder: Path, text: str | bytes, *, name: str = "cityscapes_r2", overrides=()) -> None:
    path = folder / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    try:
        cfg = load_config(path, list(overrides))
    except ConfigError as err:
        assert str(err).startswith(str(path)), err  # the file is named
        return
    assert isinstance(cfg, ExperimentConfig)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def real_raw() -> dict:
    return yaml.safe_load((EXPERIMENTS / "cityscapes_r2.yaml").read_text())


@fuzz(150)
@given(tree=trees)
def test_random_yaml_trees(folder, tree):
    _load_text(folder, yaml.safe_dump(tree, allow_unicode=True))


@fuzz(250)
@given(data=st.data())
def test_real_config_with_one_value_replaced_added_or_removed(folder, real_raw, data):
    raw = yaml.safe_load(yaml.safe_dump(real_raw))
    section = data.draw(st.sampled_from([None, "model", "data", "train", "eval", "reported"]))
    node = raw if section is None else raw[section]
    action = data.draw(st.sampled_from(["replace", "add", "remove"]))
    if action == "add":
        node[data.draw(st.text(max_size=10))] = data.draw(trees)
    else:
        key = data.draw(st.sampled_from(sorted(node)))
        if action == "remove":
            del node[key]
        else:
            node[key] = data.draw(trees)
    _load_text(folder, yaml.safe_dump(raw, allow_unicode=True))


@fuzz(100)
@given(content=st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_bytes_and_text(folder, content):
    _load_text(folder, content)


@fuzz(150)
@given(
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(
                lambda key, value: f"{key}={value}",
                st.sampled_from(["model.depth", "train.lr", "data.crop_size", "eval.mode", "x.y", "train", ""]),
                st.text(max_size=15) | st.sampled_from(["[1, 2", "{a: b", "1e999", "-0", ".nan", "[]", "&a [*a]"]),
            ),
        ),
        max_size=3,
    )
)
def test_random_overrides(folder, overrides):
    _load_text(folder, (EXPERIMENTS / "cityscapes_r2.yaml").read_text(), overrides=overrides)


def test_non_finite_and_huge_numbers_are_refused(folder, real_raw):
    """Examples the fuzzing found, kept explicit: every float key refuses NaN, inf and integers beyond float."""
    for key, value in (("lr", math.nan), ("lr", math.inf), ("lr", 10**400), ("iterations", 10**400)):
        raw = yaml.safe_load(yaml.safe_dump(real_raw))
        raw["train"][key] = value
        path = folder / "cityscapes_r2.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=f"train.{key}: expected"):
            load_config(path)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints.


def _real_checkpoint(legacy: bool) -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    state = SyntheticSegmenter(variant="R2", num_classes=4).state_dict()
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


CHECKPOINTS = {"zip": _real_checkpoint(legacy=False), "legacy": _real_checkpoint(legacy=True)}


def _positions(size: int):
    """Anywhere, or (more often) in the parts that hold structure: the start (pickle / zip headers) and the end
    (zip central directory)."""
    return st.one_of(
        st.integers(0, size - 1), st.integers(0, min(size, 4096) - 1), st.integers(max(0, size - 2048), size - 1)
    )


def _load(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        path.write_bytes(content)
        model = SyntheticSegmenter(variant="R2", num_classes=4)
        try:
            report = models.load_checkpoint(model, path, source="ccrepro")
        except CheckpointError as err:
            assert str(path) in str(err) or "the state dict" in str(err) or "shape mismatch" in str(err), err
            return
        assert report.missing == () and report.unexpected == ()


def test_the_unmodified_checkpoints_load():
    for content in CHECKPOINTS.values():
        _load(content)


@pytest.mark.parametrize("fmt", sorted(CHECKPOINTS))
@fuzz(120)
@given(data=st.data())
def test_checkpoint_with_flipped_bytes(fmt, data):
    content = bytearray(CHECKPOINTS[fmt])
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(_positions(len(content)))
        content[position] ^= data.draw(st.integers(1, 255))
    _load(bytes(content))


@pytest.mark.parametrize("fmt", sorted(CHECKPOINTS))
@fuzz(40)
@given(data=st.data())
def test_truncated_checkpoint(fmt, data):
    content = CHECKPOINTS[fmt]
    _load(content[: data.draw(_positions(len(content)))])
