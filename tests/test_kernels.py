"""Tests of `repro.measure.kernels`: the traffic / work counter, the design formulas of `ops.cca_triton` it
confirms, the committed `results/kernel_model.csv` and `results/kernel_resources.csv` and the issue's goals on
them, and ahead-of-time compilation for sm_80 / sm_90.

Counting needs the Triton interpreter (CPU only); the committed-CSV checks and compilation run anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import triton
import triton.language as tl

import ops.cca_triton as cca_triton
from repro.measure import kernels

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
interpreter_only = pytest.mark.skipif(not cca_triton.INTERPRETED,
                                      reason="counting runs the kernels in the Triton interpreter (CPU)")


@triton.jit
def _strided_copy(src, dst, n, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    values = tl.load(src + offsets, mask=mask)
    tl.store(dst + offsets * STRIDE, values, mask=mask)


@triton.jit
def _one_dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rows, cols, inner = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b))


@interpreter_only
def test_counter_counts_bytes_sectors_and_macs_of_known_kernels():
    source = torch.arange(64, dtype=torch.float32)
    target = torch.zeros(64 * 8)
    with kernels.count() as counter:
        _strided_copy[(1,)](source, target, 40, STRIDE=8, BLOCK=64)  # 40 of 64 lanes active
        _one_dot[(1,)](torch.ones(16, 32), torch.ones(32, 64), torch.zeros(16, 64), M=16, N=64, K=32)
    copy, dot = counter.kernels["_strided_copy"], counter.kernels["_one_dot"]
    assert copy.load_bytes == 40 * 4 and copy.load_sector_bytes == 160  # contiguous: 5 sectors
    assert copy.store_bytes == 40 * 4 and copy.store_sector_bytes == 40 * 32  # 32-byte stride: one each
    assert copy.macs == 0 and copy.launches == 1
    assert dot.macs == 16 * 64 * 32
    assert dot.bytes == (16 * 32 + 32 * 64 + 16 * 64) * 4
    assert torch.equal(target[::8][:40], source[:40])  # the wrapped interpreter still computes


@interpreter_only
def test_counts_follow_the_design_formulas():
    """fp32, B = 2, H = 17, W = 13, Cqk 16, Cv 32, with the GPU launchers' fp32 tiles (every line one tile): the
    counts equal the bytes and MACs the module docstring of ops.cca_triton states, to the byte (so the ratios
    to the minimum do not depend on the batch)."""
    batch, qk, v, height, width = 2, 16, 32, 17, 13
    rows = pd.DataFrame(kernels.model_rows(batch, qk, v, height, width, "fp32"))
    total = rows[rows["kernel"] == "all"].set_index("pass")
    pixels, s = batch * height * width, 4
    # Forward: q, k, v read by both passes, out written, read back and written, LSE written, read, written.
    assert total.loc["forward", "useful_bytes"] == pixels * (s * (4 * qk + 5 * v) + 3 * 4)
    # Backward: delta reads out and dO, writes delta; each pass reads LSE, delta, q and k twice, dO, v; the
    # column pass writes fp32 partial dq, dk, dv, the row pass reads them and writes the gradients.
    delta = pixels * (2 * v * s + 4)
    passes = 2 * pixels * (8 + s * (4 * qk + 2 * v))
    partials = 2 * pixels * 4 * (2 * qk + v)
    assert total.loc["backward", "useful_bytes"] == delta + passes + partials + pixels * s * (2 * qk + v)
    # MACs: whole tiles (lines padded to 32 and 16 positions), channels in blocks of 16.
    tiles = batch * (width * 32 * 32 + height * 16 * 16)
    assert total.loc["forward", "macs"] == tiles * (qk + v)
    assert total.loc["backward", "macs"] == tiles * (3 * qk + 2 * v)
    # Channels-last: every access is whole channel vectors, so the sectors moved are the useful bytes up to
    # the partial sectors at the ends of each vector.
    assert (total["sector_bytes"] <= 1.1 * total["useful_bytes"]).all()


def _copy_bytes(pixels: int, itemsize: int, qk: int, v: int, pass_name: str) -> int:
    """What the launchers' layout copies of NCHW inputs read and write: q, k, v in the forward, dO in the backward
    (q, k, v reach the backward as the copies autograd saved)."""
    channels = 2 * qk + v if pass_name == "forward" else v
    return 2 * pixels * itemsize * channels


@interpreter_only
def test_nchw_inputs_are_copied_once_and_the_copies_counted():
    """NCHW inputs: the launchers copy them into channels_last (counted as kernel layout_copy: q, k, v in the
    forward, dO in the backward), after which the kernels move exactly what they move on channels-last inputs.
    Read in place instead (nchw_in_place), the useful bytes are the same but the column pass touches one element
    per 32-byte sector: more sectors than the copies and the kernels together."""
    batch, qk, v, height, width = 1, 16, 32, 17, 13
    rows = {layout: pd.DataFrame(kernels.model_rows(batch, qk, v, height, width, "fp32", layout)).set_index(
        ["pass", "kernel"]) for layout in kernels.LAYOUTS}
    last, nchw, in_place = rows["channels_last"], rows["nchw"], rows["nchw_in_place"]
    for pass_name in ("forward", "backward"):
        copies = nchw.loc[(pass_name, kernels.COPY_KERNEL)]
        assert copies["launches"] == (3 if pass_name == "forward" else 1)
        expected = _copy_bytes(batch * height * width, 4, qk, v, pass_name)
        assert copies["useful_bytes"] == expected and copies["load_bytes"] == copies["store_bytes"]
        assert expected <= copies["sector_bytes"] <= expected + 32 * copies["launches"] * 2  # dense copies
        for kernel in last.loc[pass_name].index.drop("all"):
            for column in ("launches", "useful_bytes", "sector_bytes", "macs"):
                assert nchw.loc[(pass_name, kernel), column] == last.loc[(pass_name, kernel), column], (kernel, column)
        assert (pass_name, kernels.COPY_KERNEL) not in in_place.index
        total = (pass_name, "all")
        assert in_place.loc[total, "useful_bytes"] == last.loc[total, "useful_bytes"]
        assert in_place.loc[total, "sector_bytes"] > nchw.loc[total, "sector_bytes"] > last.loc[total, "sector_bytes"]
    assert in_place.loc[("forward", "all"), "sector_bytes"] > 2 * last.loc[("forward", "all"), "sector_bytes"]


def test_unknown_layout_is_refused_by_name():
    with pytest.raises(ValueError, match="layout must be one of .*'nchw_in_place'.*got 'nhwc'"):
        kernels.model_rows(1, 2, 2, 3, 3, "fp32", "nhwc")


# ----------------------------------------------------------------------------------------------------------
# The committed rows (generated by `python -m repro.kernels`) and the goals on them
# ----------------------------------------------------------------------------------------------------------


# The goal shapes whose rows are committed: all of them, channels-last; B = 1 also with NCHW inputs (copied by
# the launchers, and read in place).
COMMITTED_SHAPES = kernels.GOAL_SHAPES
NCHW_SHAPES = kernels.GOAL_SHAPES[:1]
NCHW_LAYOUTS = ("nchw", "nchw_in_place")


def _model() -> pd.DataFrame:
    frame = pd.read_csv(RESULTS / "kernel_model.csv")
    return frame[frame["kernel"] == "all"]


def test_goal_rows_take_the_worst_goal_shape_row_per_dtype():
    """goal_rows: worst value over the goal shapes (other shapes, layouts and per-kernel rows ignored), per dtype
    and tiles; the blocks-per-SM limit from the fewest blocks of a main kernel on a target, with the default
    tiles (2, or the kernel's floor: 1 for sm_90's whole-line backward)."""
    floor = {dtype: kernels.forward_floor_bytes(1, 64, 512, 97, 97, size) for dtype, size in (("bf16", 2), ("fp32", 4))}
    base = {"kernel": "all", "layout": "channels_last", "qk_channels": 64, "v_channels": 512, "height": 97,
            "width": 97, "pass": "forward", "dtype": "bf16", "batch": 1, "useful_ratio": 2.4, "macs": 1}

    def row(factor, **changes):
        dtype, batch = changes.get("dtype", "bf16"), changes.get("batch", 1)
        useful = int(floor[dtype] * batch * factor)
        return {**base, **changes, "useful_bytes": useful, "sector_bytes": useful}

    model = pd.DataFrame([
        row(1.0), row(1.05, batch=2), row(9.0, layout="nchw"), row(9.0, kernel="_x"), row(9.0, height=17),
        row(1.01, dtype="fp32"),
    ])
    resources = pd.DataFrame([
        {"kernel": name, "dtype": "bf16", "shape": kernels.RESOURCE_GOAL_SHAPE, "target": "sm_90",
         "blocks_per_sm": blocks, "source": "default"}
        for name, blocks in (("_line_forward_kernel", 2), ("_line_forward_kernel", 1), ("_line_backward_kernel", 1))
    ] + [{"kernel": "_delta_kernel", "dtype": "bf16", "shape": kernels.RESOURCE_GOAL_SHAPE, "target": "sm_90",
          "blocks_per_sm": 0, "source": "default"}]
      # A tuner candidate is not what the goal is about: the launchers' default tiles are.
      + [{"kernel": "_line_forward_kernel", "dtype": "bf16", "shape": kernels.RESOURCE_GOAL_SHAPE, "target": "sm_90",
          "blocks_per_sm": 0, "source": "tuner"}])
    rows = kernels.goal_rows(model, resources).set_index(["goal", "dtype", "target"])
    goal = "forward bytes over the two-pass floor"
    bf16 = rows.loc[(goal, "bf16", "counted sm_90")]  # no target column: MODEL_TARGET's tiles
    assert bf16["value"] == pytest.approx(1.05, abs=1e-6) and bf16["batches"] == "1, 2" and not bf16["holds"]
    assert rows.loc[(goal, "fp32", "counted sm_90"), "holds"]
    # Rows counted with another target's tiles are goal rows of their own.
    model["target"] = "sm_90"
    model.loc[len(model)] = {**row(1.0), "target": "sm_80"}
    by_target = kernels.goal_rows(model).set_index(["goal", "dtype", "target"])
    assert by_target.loc[(goal, "bf16", "counted sm_80"), "holds"]
    assert by_target.loc[(goal, "bf16", "counted sm_90"), "value"] == pytest.approx(1.05, abs=1e-6)
    blocks = rows.loc[("_line_forward_kernel blocks per SM", "bf16", "sm_90")]
    assert blocks["value"] == 1 and not blocks["holds"]
    backward = rows.loc[("_line_backward_kernel blocks per SM", "bf16", "sm_90")]
    assert backward["limit"] == ">= 1" and backward["holds"]
    assert not any("_delta_kernel" in goal for goal, _, _ in rows.index)


def _committed_row(frame, shape, dtype, pass_name, layout, target=kernels.MODEL_TARGET) -> pd.Series:
    batch, qk, v, height, width = shape
    rows = frame[(frame["batch"] == batch) & (frame["qk_channels"] == qk) & (frame["v_channels"] == v)
                 & (frame["height"] == height) & (frame["width"] == width) & (frame["dtype"] == dtype)
                 & (frame["pass"] == pass_name) & (frame["layout"] == layout) & (frame["target"] == target)]
    assert len(rows) == 1, (shape, dtype, pass_name, layout, target)
    return rows.iloc[0]


def test_committed_model_rows_cover_the_goal_shapes():
    frame = _model()
    for layout, shapes in (("channels_last", COMMITTED_SHAPES), *((layout, NCHW_SHAPES) for layout in NCHW_LAYOUTS)):
        for shape in shapes:
            for dtype in ("fp32", "bf16"):
                for pass_name in ("forward", "backward"):
                    _committed_row(frame, shape, dtype, pass_name, layout)


def test_committed_counts_are_linear_in_the_batch():
    """B = 2 moves and computes twice what B = 1 does (each image is its own set of programs), so the ratios to
    the minimum do not depend on the batch."""
    frame = _model()
    one, two = (shape for shape in COMMITTED_SHAPES if shape[0] in (1, 2))
    for dtype in ("fp32", "bf16"):
        for pass_name in ("forward", "backward"):
            small, large = (_committed_row(frame, shape, dtype, pass_name, "channels_last") for shape in (one, two))
            for column in ("useful_bytes", "macs", "minimum_bytes"):
                assert large[column] == 2 * small[column], (dtype, pass_name, column)
            # Sectors: the second image's per-pixel buffers (LSE, delta: 97 x 97 x 4 bytes) start mid-sector.
            assert abs(large["sector_bytes"] - 2 * small["sector_bytes"]) <= 0.001 * large["sector_bytes"]


def test_committed_nchw_rows_are_the_channels_last_kernels_plus_the_copies():
    """NCHW inputs copied by the launchers: the kernels' counts are the channels-last ones, the copies add what
    they read and write (forward: q, k, v; backward: dO), and all of it moves fewer sectors than reading NCHW in
    place, which moves the channels-last useful bytes in more sectors."""
    frame = pd.read_csv(RESULTS / "kernel_model.csv")
    for shape in NCHW_SHAPES:
        batch, qk, v, height, width = shape
        for dtype in ("fp32", "bf16"):
            for pass_name in ("forward", "backward"):
                last, nchw, in_place = (_committed_row(frame[frame["kernel"] == "all"], shape, dtype, pass_name, layout)
                                        for layout in ("channels_last", *NCHW_LAYOUTS))
                copies = _committed_row(frame[frame["kernel"] == kernels.COPY_KERNEL], shape, dtype, pass_name,
                                        "nchw")
                itemsize = 4 if dtype == "fp32" else 2
                assert copies["useful_bytes"] == _copy_bytes(batch * height * width, itemsize, qk, v, pass_name)
                assert nchw["useful_bytes"] == last["useful_bytes"] + copies["useful_bytes"]
                assert nchw["sector_bytes"] == last["sector_bytes"] + copies["sector_bytes"]
                assert in_place["useful_bytes"] == last["useful_bytes"]
                assert in_place["sector_bytes"] > nchw["sector_bytes"], (dtype, pass_name)


def test_committed_sm_80_rows_trade_backward_bytes_for_occupancy():
    """bf16 with the tiles the launchers pick on sm_80 (counted with --target sm_80): the forward tiles are
    sm_90's, so are its counts; the backward's 64-wide tiles (2 blocks per SM there) re-read dO and v and pass
    fp32 partial sums through memory: above the 3x bytes goal that sm_90's 128-wide tiles meet."""
    frame = _model()
    limit = kernels.GOALS["backward bytes over the minimum (128-wide tiles)"].limit
    for shape in COMMITTED_SHAPES:
        sm_80, sm_90 = ({pass_name: _committed_row(frame, shape, "bf16", pass_name, "channels_last", target)
                         for pass_name in ("forward", "backward")} for target in ("sm_80", "sm_90"))
        for column in ("useful_bytes", "sector_bytes", "macs"):
            assert sm_80["forward"][column] == sm_90["forward"][column], column
        assert sm_80["backward"]["macs"] == sm_90["backward"]["macs"]  # 2 x 2 tiles of 64 cover what one of 128 does
        assert sm_90["backward"]["useful_ratio"] <= limit < sm_80["backward"]["useful_ratio"]


def _goal(name: str) -> pd.DataFrame:
    """The counted regression limit `name` of kernels.GOALS on the committed goal-shape rows: one goal row per
    (dtype, tiles) it applies to, each over every committed goal shape; every one holds."""
    rows = kernels.goal_rows(pd.read_csv(RESULTS / "kernel_model.csv"))
    rows = rows[rows["goal"] == name]
    assert not rows.empty, name
    for row in rows.itertuples():
        assert row.batches == ", ".join(str(shape[0]) for shape in COMMITTED_SHAPES)
        assert row.holds, f"{name} {row.dtype} {row.target}: {row.value:.4f}, limit {row.limit}"
    return rows.set_index(["dtype", "target"])


def test_forward_bytes_stay_at_the_two_pass_floor():
    """Forward: q, k, v read by both line passes, out and the LSE written, read back and written (2.445x the
    minimum at the goal shapes), nothing more (+2% allowed: a change that re-reads anything fails)."""
    rows = _goal("forward bytes over the two-pass floor")
    assert {"fp32", "bf16"} <= {dtype for dtype, _ in rows.index}


def test_forward_and_backward_sectors_stay_within_one_percent_of_the_bytes():
    for pass_name in ("forward", "backward"):
        rows = _goal(f"{pass_name} 32-byte sectors over useful bytes")
        assert {"fp32", "bf16"} <= {dtype for dtype, _ in rows.index}


def test_bf16_backward_with_whole_line_tiles_stays_below_three_times_the_minimum():
    rows = _goal("backward bytes over the minimum (128-wide tiles)")
    assert list(rows.index) == [("bf16", f"counted {kernels.MODEL_TARGET}")]


def test_backward_bytes_stay_at_the_floor_of_their_tiles():
    """Every backward (bf16 whole-line on sm_90, bf16 64-wide on sm_80, fp32 32-wide) at its line-tile floor: fp32's
    tf32x3 dots spill above 32-wide tiles, so a 97-pixel line takes 4 x 4 tile pairs that re-read q, k, dO and v
    and pass fp32 partial sums through memory (9.05x the minimum), sm_80's 64-wide tiles 2 x 2 (6.28x)."""
    rows = _goal("backward bytes over the line-tile floor")
    assert ("fp32", f"counted {kernels.MODEL_TARGET}") in rows.index


def test_multiply_accumulates_stay_at_whole_tiles():
    """A 97-pixel line is padded to a 128 tile (tl.dot tiles are powers of two >= 16): 1.7503x the MACs of the
    attended pairs, and no more."""
    for pass_name in ("forward", "backward"):
        _goal(f"{pass_name} MACs over whole tiles")
    frame = _model()
    goal_rows = frame[(frame["layout"] == "channels_last") & (frame["height"] == 97) & (frame["width"] == 97)]
    assert (goal_rows["macs_ratio"] <= (128 / 97) ** 2 * 194 / 193 * (1 + 1e-12)).all()


def test_floor_formulas_by_hand():
    """The floors at the issue's shape, per pixel: forward s (4 Cqk + 5 Cv) + 12; backward with n tiles per line
    (fp32, n = 4): delta 2 s Cv + 4, passes 2 (8 + n s (4 Cqk + 2 Cv)), gradients (2 Cqk + Cv) (8 (2n - 1) + s)."""
    assert kernels.forward_floor_bytes(1, 64, 512, 97, 97, 2) == 97 * 97 * (2 * (4 * 64 + 5 * 512) + 12)
    per_pixel = (2 * 4 * 512 + 4) + 2 * (8 + 4 * 4 * (4 * 64 + 2 * 512)) + (2 * 64 + 512) * (8 * 7 + 4)
    assert kernels.backward_floor_bytes(1, 64, 512, 97, 97, 4, (4, 4)) == 97 * 97 * per_pixel == 97 * 97 * 83476
    assert kernels.line_tiles(97, "fp32", "sm_90", "backward") == (32, 4)
    assert kernels.line_tiles(97, "bf16", "sm_90", "backward") == (128, 1)
    assert kernels.line_tiles(97, "bf16", "sm_80", "backward") == (64, 2)
    assert kernels.macs_floor(1, 64, 512, 97, 97, "forward", ((128, 1), (128, 1)), (32, 16)) == (
        2 * 97 * 128 * 128 * (64 + 512))


def _resources(*, tuner: bool = False) -> pd.DataFrame:
    """The committed compilations: those of the default tiles, or with `tuner` also the tuner's candidates (which
    may spill: the tuner times them and a slow one loses)."""
    frame = pd.read_csv(RESULTS / "kernel_resources.csv", keep_default_na=False)
    return frame if tuner or "source" not in frame else frame[frame["source"] == "default"]


def test_committed_resources_cover_every_launch_config():
    """Every compilation the GPU launchers can ask for (each dtype, each tile they can pick, each tuner candidate)
    has a row per target: a change of tiles, candidates or kernels without regenerating the CSV fails here."""
    frame = _resources(tuner=True)
    assert "source" in frame.columns, "kernel_resources.csv predates the tuner: python -m repro.kernels resources"
    committed = set(zip(frame["kernel"], frame["dtype"], frame["config"], frame["num_warps"], frame["num_stages"],
                        frame["max_registers"].astype(str), frame["target"], strict=True))
    for target in kernels.TARGETS:
        for _, dtype, _, launch, _ in kernels.launch_configs(target):
            key = (launch.kernel.__name__, dtype, kernels.config_string(launch), launch.num_warps, launch.num_stages,
                   str(launch.max_registers or ""), target)
            assert key in committed, key


def test_launch_configs_include_every_tuner_candidate():
    """Each tuner candidate's launches at the issue's shape are among the compilations (so among the committed
    resources), labelled "tuner" unless the default tiles plan the same compilation."""
    shape = (8, 64, 512, 97, 97)
    for target in kernels.TARGETS:
        configs = kernels.launch_configs(target, dtypes=("bf16",), shapes=[shape])
        listed = {(launch.kernel.__name__, kernels.config_string(launch), tuple(sorted(launch.options.items())))
                  for _, _, _, launch, _ in configs}
        capability = divmod(kernels.TARGETS[target][0], 10)
        for pass_name in cca_triton.PASSES:
            for blocks in cca_triton.tuning_candidates(pass_name, torch.bfloat16, capability):
                for planned_pass, launch in kernels.planned_launches(shape, torch.bfloat16, blocks, target):
                    if planned_pass == pass_name:
                        key = (launch.kernel.__name__, kernels.config_string(launch),
                               tuple(sorted(launch.options.items())))
                        assert key in listed, (target, pass_name, blocks, key)
        assert {source for *_, source in configs} == {"default", "tuner"}


def test_no_kernel_spills_or_exceeds_shared_memory():
    frame = _resources()
    spilled = frame[(frame["spill_store_bytes"] > 0) | (frame["spill_load_bytes"] > 0)]
    assert spilled.empty, spilled[["kernel", "dtype", "target", "config", "spill_store_bytes"]].to_string()
    too_big = frame[frame["shared_bytes"] > frame["shared_limit_bytes"]]
    assert too_big.empty, too_big[["kernel", "dtype", "target", "config", "shared_bytes"]].to_string()


def test_line_kernels_use_asynchronous_copies():
    frame = _resources()
    lines = frame[frame["kernel"].str.startswith("_line")]
    assert not lines.empty and lines["async_copy"].astype(str).eq("True").all()


def _main_kernels(name: str) -> pd.DataFrame:
    """The bf16 line kernels at the issue's shape (B = 8, Cqk 64, Cv 512, 97 x 97) with the default tiles."""
    frame = _resources()
    return frame[(frame["kernel"] == name) & (frame["dtype"] == "bf16") & (frame["source"] == "default")
                 & (frame["shape"] == kernels.RESOURCE_GOAL_SHAPE)]


def test_goal_main_forward_kernels_fit_two_blocks_per_sm():
    """sm_90: 8 warps capped at 128 registers; sm_80: 4 warps (its ptxas needs about 185 registers at 8)."""
    forward = _main_kernels("_line_forward_kernel")
    assert len(forward) == 4 and (forward["blocks_per_sm"] >= kernels.MIN_BLOCKS_PER_SM).all()
    goals = kernels.goal_rows(_model(), _resources()).set_index(["goal", "target"])
    assert goals.loc[("_line_forward_kernel blocks per SM", "sm_80"), "holds"]
    assert goals.loc[("_line_forward_kernel blocks per SM", "sm_90"), "holds"]


def test_goal_main_backward_kernels_fit_two_blocks_per_sm_on_sm_80():
    """sm_80 spills a 128-wide backward, so its lines take 64-wide tiles; at 4 warps two blocks fit."""
    backward = _main_kernels("_line_backward_kernel")
    backward = backward[backward["target"] == "sm_80"]
    assert len(backward) == 2 and (backward["blocks_per_sm"] >= kernels.MIN_BLOCKS_PER_SM).all()


def test_main_backward_kernel_on_sm_90_holds_its_one_block_per_sm_floor():
    """P and dP of a 128 x 128 tile in fp32 take 128 KiB of registers, half an SM's register file: one whole-line
    backward block per SM is the floor on sm_90 (64-wide tiles fit two but re-read dO and v: sm_80's 6.3x bytes,
    above 3x). It must not drop to zero blocks (spills or too much shared memory) nor the goal row go missing."""
    backward = _main_kernels("_line_backward_kernel")
    backward = backward[backward["target"] == "sm_90"]
    assert len(backward) == 2 and (backward["blocks_per_sm"] >= 1).all()
    assert (backward["spill_store_bytes"] == 0).all()
    goals = kernels.goal_rows(_model(), _resources()).set_index(["goal", "target"])
    row = goals.loc[("_line_backward_kernel blocks per SM", "sm_90")]
    assert row["limit"] == ">= 1" and row["holds"]


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets_as_committed(tmp_path):
    """Compile the bf16 kernels at the issue's shape for sm_80 and sm_90 without a GPU (triton's bundled ptxas),
    in a process with the interpreter off; the resources equal the committed rows when the triton version is
    the same."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "repro.kernels", "resources", "--quick", "--out-dir",
                             str(tmp_path)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = pd.read_csv(tmp_path / "kernel_resources.csv", keep_default_na=False)
    assert set(fresh["target"]) == {"sm_80", "sm_90"} and len(fresh) >= 8
    defaults = fresh[fresh["source"] == "default"]
    assert (defaults["spill_store_bytes"] == 0).all() and (fresh["registers"] > 0).all()
    committed = _resources(tuner=True)
    columns = ["kernel", "dtype", "target", "config", "num_warps", "num_stages", "max_registers"]
    merged = fresh.merge(committed, on=columns, suffixes=("", "_committed"))
    assert len(merged) == len(fresh)
    same_compiler = merged["triton"] == merged["triton_committed"]
    for name in ("registers", "shared_bytes", "spill_store_bytes"):
        assert (merged.loc[same_compiler, name] == merged.loc[same_compiler, f"{name}_committed"]).all(), name


def test_launch_plans_need_no_device():
    """The launchers plan on meta tensors (what the compiler step uses): at 97 x 97 bf16 every line is one tile,
    so the forward computes each line's energies once and the backward is one kernel per pass."""
    launches = kernels.planned_launches((2, 64, 512, 97, 97), torch.bfloat16)
    names = [launch.kernel.__name__ for _, launch in launches]
    assert names == ["_line_forward_kernel"] * 2 + ["_delta_kernel"] + ["_line_backward_kernel"] * 2
    forward = [launch for _, launch in launches[:2]]
    assert all(launch.constexprs["ONE_KEY_BLOCK"] and launch.grid == (2 * 97, 1) for launch in forward)
    assert launches[3][1].grid == (2 * 97,)


# ---------------------------------------------------------------------------------------------------------
# The L2 model (an LRU cache over the counted address trace): hits, misses and write-backs by hand.


def test_lru_cache_hits_misses_and_evictions_by_hand():
    """Capacity 3 sectors. Loads 1 2 3 miss (3 x 32 bytes read); 1 hits and becomes the newest; 4 misses and
    evicts 2 (the least recently used, clean: nothing written); 2 misses again and evicts 3; 1 still hits."""
    cache = kernels.LRUCache(3 * 32)
    for sector in (1, 2, 3, 1, 4, 2, 1):
        cache.access([sector], write=False, kernel="k")
    assert (cache.hits, cache.misses) == (2, 5)
    assert cache.reads == {"k": 5 * 32} and sum(cache.writes.values()) == 0
    assert list(cache.sectors) == [4, 2, 1]  # oldest first


def test_lru_cache_writes_back_dirty_sectors_to_the_kernel_that_dirtied_them():
    """Capacity 2. Store 1 (by "a": allocated, no read), load 2 (by "b": read), load 3 (by "b": read, evicts 1,
    dirty: "a" writes 32 bytes), store 2 (hit, now dirty by "c"), flush: 2 written back by "c"; 3 is clean."""
    cache = kernels.LRUCache(2 * 32)
    cache.access([1], write=True, kernel="a")
    cache.access([2], write=False, kernel="b")
    cache.access([3], write=False, kernel="b")
    assert cache.writes == {"a": 32} and cache.reads == {"b": 64}
    cache.access([2], write=True, kernel="c")
    cache.flush()
    assert cache.writes == {"a": 32, "c": 32}
    assert cache.dram_bytes() == 128 and cache.dram_bytes("b") == 64 and cache.dram_bytes("c") == 32
    cache.flush()  # nothing dirty is left: a second flush writes nothing
    assert cache.dram_bytes() == 128
    with pytest.raises(ValueError, match="capacity_bytes"):
        kernels.LRUCache(16)


class _ReferenceLRU:
    """The LRU cache of `kernels.LRUCache`'s docstring, one sector at a time (an OrderedDict): the oracle."""

    def __init__(self, capacity: int):
        self.capacity, self.lines = capacity, OrderedDict()  # sector -> kernel that dirtied it, or None
        self.reads, self.writes, self.hits, self.misses = Counter(), Counter(), 0, 0

    def access(self, sectors, *, write, kernel):
        for sector in sectors:
            if sector in self.lines:
                self.hits += 1
                self.lines.move_to_end(sector)
                if write:
                    self.lines[sector] = kernel
                continue
            self.misses += 1
            if not write:
                self.reads[kernel] += 32
            if len(self.lines) == self.capacity:
                _, dirty = self.lines.popitem(last=False)
                if dirty is not None:
                    self.writes[dirty] += 32
            self.lines[sector] = kernel if write else None

    def flush(self):
        for sector, dirty in self.lines.items():
            if dirty is not None:
                self.writes[dirty] += 32
                self.lines[sector] = None


@pytest.mark.parametrize("lines", [1, 3, 64])
def test_lru_trace_that_fits_hits_after_first_touch_and_one_more_line_misses_every_time(lines):
    """Capacity N sectors: N sectors cycled 5 times miss N times (their first touch) and hit 4 N times; N + 1
    sectors cycled 5 times miss every time (each access finds its sector just evicted); DRAM bytes read are the
    misses x 32. Once through the vectorised replay in one call, once sector by sector (chunks of one)."""
    for one_call in (True, False):
        fits, cycles = kernels.LRUCache(lines * 32), kernels.LRUCache(lines * 32)
        for cache, trace in ((fits, list(range(lines)) * 5), (cycles, list(range(lines + 1)) * 5)):
            for part in ([trace] if one_call else [[sector] for sector in trace]):
                cache.access(part, write=False, kernel="k")
        assert (fits.hits, fits.misses) == (4 * lines, lines)
        assert (cycles.hits, cycles.misses) == (0, 5 * (lines + 1))
        for cache in (fits, cycles):
            assert cache.reads == {"k": cache.misses * 32} and cache.dram_bytes() == cache.misses * 32


def test_lru_replay_equals_a_sector_by_sector_lru_on_random_traces():
    """The chunked, vectorised replay against `_ReferenceLRU` on random traces: loads and stores of three
    kernels, sectors drawn from a few more than fit (reuse at every distance), in calls of random sizes (so
    chunks end anywhere), flushes in between: the same hits, misses, bytes per kernel and resident order."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        capacity = int(rng.integers(1, 40))
        universe = int(rng.integers(1, 3 * capacity + 2))
        cache, reference = kernels.LRUCache(capacity * 32), _ReferenceLRU(capacity)
        for _ in range(int(rng.integers(1, 30))):
            sectors = rng.integers(0, universe, size=int(rng.integers(1, 4 * capacity + 2))).tolist()
            write, kernel = bool(rng.random() < 0.4), "abc"[int(rng.integers(3))]
            for target in (cache, reference):
                target.access(sectors, write=write, kernel=kernel)
            if rng.random() < 0.1:
                cache.flush()
                reference.flush()
        assert (cache.hits, cache.misses) == (reference.hits, reference.misses), trial
        assert cache.reads == dict(reference.reads) and cache.writes == dict(reference.writes), trial
        assert cache.sectors == list(reference.lines), trial
        cache.flush()
        reference.flush()
        assert cache.writes == dict(reference.writes), trial


def test_earlier_at_most_counts_like_the_quadratic_definition():
    rng = np.random.default_rng(1)
    for size in (0, 1, 2, 3, 7, 64, 100, 257):
        values = rng.integers(0, max(size // 3, 1), size=size)
        expected = [int((values[:i] <= values[i]).sum()) for i in range(size)]
        assert kernels.earlier_at_most(values).tolist() == expected


@interpreter_only
def test_l2_model_replays_the_interpreters_trace():
    """A kernel that reads 64 floats (8 sectors) and writes them 8 floats apart (64 sectors), twice: with a
    cache of 16 sectors, the second launch's loads hit only if the stores did not evict them (they did: 64
    stores of one sector each), so both launches read 8 sectors from DRAM; every stored sector is written back
    once per launch except those of the second launch still dirty at the flush, written then: 2 x 64 writes in
    all. With a cache that holds everything the second launch reads nothing and the stores of both launches
    hit the same 64 sectors: 64 written back once."""
    source, target = torch.arange(64, dtype=torch.float32), torch.zeros(64 * 8)
    small, large = kernels.LRUCache(16 * 32), kernels.LRUCache(1024 * 32)
    for cache in (small, large):
        with kernels.count(cache):
            for _ in range(2):
                _strided_copy[(1,)](source, target, 64, STRIDE=8, BLOCK=64)
        cache.flush()
    assert small.reads == {"_strided_copy": 2 * 8 * 32} and small.writes == {"_strided_copy": 2 * 64 * 32}
    assert large.reads == {"_strided_copy": 8 * 32} and large.writes == {"_strided_copy": 64 * 32}
    assert large.hits == 8 + 64 and large.misses == 8 + 64


def test_committed_l2_model_rows_are_labelled_and_never_exceed_the_counted_sectors():
    """The L2 view in kernel_model.csv: labelled as a model; a cache can only remove traffic, so the DRAM bytes
    (reads plus write-backs) are at most the 32-byte sectors counted; and a forward whose whole working set
    fits the 50 MiB (bf16, B = 1: 21.7 MB) reads and writes every byte it touches once: the minimum, to 0.1%."""
    frame = pd.read_csv(RESULTS / "kernel_model.csv")
    assert "l2_model_dram_bytes" in frame, "kernel_model.csv predates the L2 model: python -m repro.kernels model"
    rows = frame[frame["l2_model_dram_bytes"].notna()]
    assert not rows.empty and rows["l2_model"].str.startswith("model, not a measurement").all()
    assert (rows["l2_model_dram_read_bytes"] <= rows["sector_bytes"]).all()
    assert (rows["l2_model_dram_read_bytes"] + rows["l2_model_dram_write_bytes"] == rows["l2_model_dram_bytes"]).all()
    assert (rows["l2_model_dram_bytes"] <= rows["sector_bytes"]).all()
    forward = _committed_row(rows[rows["kernel"] == "all"], GOAL_SHAPE_B1, "bf16", "forward", "channels_last")
    assert forward["l2_model_dram_ratio"] == pytest.approx(1.0, abs=1e-3)
    # Each row's label and cache size are its target's L2; a pass's kernels add up to its "all" row.
    if "l2_model_cache_bytes" in rows:
        sized = rows[rows["l2_model_cache_bytes"].notna()]
        assert (sized["l2_model_cache_bytes"] == sized["target"].map(kernels.L2_BYTES_BY_TARGET)).all()
        assert (sized["l2_model"] == sized["target"].map(kernels.l2_model_label)).all()
    key = [column for column in kernels.MODEL_KEY if column != "kernel"]
    per_kernel = rows[rows["kernel"] != "all"].groupby(key)["l2_model_dram_bytes"].sum()
    total = rows[rows["kernel"] == "all"].set_index(key)["l2_model_dram_bytes"]
    assert (per_kernel.reindex(total.index) == total).all()


GOAL_SHAPE_B1 = kernels.GOAL_SHAPES[0]


@interpreter_only
def test_model_command_counts_every_committed_configuration(tmp_path, monkeypatch):
    """`python -m repro.kernels model` without options counts MODEL_CONFIGS, and those are the configurations of
    the committed kernel_model.csv (so regenerating it refreshes every row's L2 columns); with options, their
    product. model_rows is replaced by a stub that records what it was asked to count."""
    asked = []

    def stub(batch, qk, v, height, width, dtype_name, layout, target):
        asked.append((batch, dtype_name, layout, target))
        return [dict(zip(kernels.MODEL_KEY, ("forward", "all", dtype_name, layout, target, batch, qk, v, height,
                                             width), strict=True))]

    monkeypatch.setattr(kernels, "model_rows", stub)
    assert kernels.main(["model", "--out-dir", str(tmp_path)]) == 0
    assert asked == list(kernels.MODEL_CONFIGS)
    assert len(pd.read_csv(tmp_path / "kernel_model.csv")) == len(kernels.MODEL_CONFIGS)
    committed = pd.read_csv(RESULTS / "kernel_model.csv")
    assert {(int(r.batch), r.dtype, r.layout, r.target) for r in committed.itertuples()} == set(kernels.MODEL_CONFIGS)
    asked.clear()
    assert kernels.main(["model", "--out-dir", str(tmp_path), "--batch", "2", "--target", "sm_80"]) == 0
    assert asked == [(2, "bf16", "channels_last", "sm_80"), (2, "fp32", "channels_last", "sm_80")]


def test_committed_minimum_columns_follow_ops_cost():
    """kernel_model.csv's minimum columns are `ops.cost`'s for each row's pass and shape (`python -m repro.kernels
    model --rederive` after the formula changes), and each ratio is the row's count over them."""
    frame = _model()
    for _, row in frame.iterrows():
        derived = kernels.minimum_columns(row)
        assert row["minimum_bytes"] == derived["minimum_bytes"] and row["minimum_macs"] == derived["minimum_macs"]
        assert abs(row["useful_ratio"] * row["minimum_bytes"] - row["useful_bytes"]) <= 1e-6 * row["useful_bytes"]
