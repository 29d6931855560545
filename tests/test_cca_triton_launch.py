"""Tests of the launch layer of `ops.cca_triton`: image chunks (`Blocks.images_per_launch`, the L2 policy and its
working-set formulas) and the tuner (`blocks="tune"`, `Tuner`).

Kernels run on the `op_device` fixture (the Triton interpreter on CPU, natively on CUDA). The tuner's selection
logic is checked with an injected timer: the real one (triton.testing.do_bench) needs a GPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import ops.cca_triton as cca_triton
from ops.cca_naive import criss_cross_attention_naive as _naive

CUDA = torch.cuda.is_available()
SMALL_BLOCKS = cca_triton.Blocks(line=16, qk_channels=16, v_channels=16)


def _inputs(batch, qk_channels, v_channels, height, width, *, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, channels, height, width) for channels in (qk_channels, qk_channels, v_channels, v_channels)]
    return tuple(torch.randn(*shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes)


def _run(launches):
    for launch in launches:
        launch.launch()


# ----------------------------------------------------------------------------------------------------------
# Image chunks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        (3, 4, 6, 5, 7),  # every line one tile
        (3, 3, 5, 17, 4),  # columns of two 16-tiles: the backward's partial sums go through memory
    ],
)
@pytest.mark.parametrize("images_per_launch", [1, 2])
def test_chunked_launches_equal_unchunked_bitwise(shape, images_per_launch, op_device):
    """A program covers one line of one image, so chunking changes which launch runs it, not what it computes:
    out, LSE and all three gradients are bitwise those of the whole-batch launch."""
    query, key, value, grad = _inputs(*shape, device=op_device)
    chunked = dataclasses.replace(SMALL_BLOCKS, images_per_launch=images_per_launch)
    out, lse = cca_triton.cca_triton_forward(query, key, value, blocks=SMALL_BLOCKS)
    out_chunked, lse_chunked = cca_triton.cca_triton_forward(query, key, value, blocks=chunked)
    assert torch.equal(out, out_chunked) and torch.equal(lse, lse_chunked)
    grads = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks=SMALL_BLOCKS)
    grads_chunked = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks=chunked)
    for name, whole, parts in zip(("d query", "d key", "d value"), grads, grads_chunked, strict=True):
        assert torch.equal(whole, parts), name


def test_auto_chunks_equal_unchunked_bitwise_and_follow_the_l2(op_device):
    """"auto" with an L2 that holds two images of the forward's working set (half of it is the budget) but one of
    the backward's: chunks of 2 and 1, results bitwise the whole batch's; NCHW inputs (another set of strides)."""
    batch, qk_channels, v_channels, height, width = 3, 4, 6, 5, 7
    query, key, value, grad = _inputs(batch, qk_channels, v_channels, height, width, device=op_device)
    forward_image = cca_triton.forward_working_set_bytes(qk_channels, v_channels, height, width, torch.float32)
    backward_image = cca_triton.backward_working_set_bytes(qk_channels, v_channels, height, width, torch.float32)
    l2 = 4 * forward_image
    assert backward_image <= l2 // 2 < 2 * backward_image
    auto = dataclasses.replace(SMALL_BLOCKS, images_per_launch="auto")
    (out, lse), forward = cca_triton.plan_forward(query, key, value, blocks=auto, l2_cache_bytes=l2)
    assert [launch.images for launch in forward] == [(0, 2), (0, 2), (2, 3), (2, 3)]
    _run(forward)
    reference_out, reference_lse = cca_triton.cca_triton_forward(query, key, value, blocks=SMALL_BLOCKS)
    assert torch.equal(out, reference_out) and torch.equal(lse, reference_lse)
    grads, backward = cca_triton.plan_backward(grad, query, key, value, out, lse, blocks=auto, l2_cache_bytes=l2)
    assert [launch.images for launch in backward] == [(image, image + 1) for image in range(3) for _ in range(3)]
    _run(backward)
    reference = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks=SMALL_BLOCKS)
    for actual, expected in zip(grads, reference, strict=True):
        assert torch.equal(actual, expected)


def _tensor_args(launch):
    return [arg for arg in launch.args if isinstance(arg, torch.Tensor)]


def test_forward_plan_runs_both_passes_of_a_chunk_before_the_next():
    query, key, value, _ = _inputs(5, 4, 6, 3, 7)
    blocks = dataclasses.replace(SMALL_BLOCKS, images_per_launch=2)
    (out, lse), launches = cca_triton.plan_forward(query, key, value, blocks=blocks)
    order = [(launch.kernel.__name__, launch.constexprs["MASK_DIAG"], launch.images) for launch in launches]
    assert order == [("_line_forward_kernel", column, images)
                     for images in [(0, 2), (2, 4), (4, 5)] for column in (True, False)]
    for launch in launches:
        first, stop = launch.images
        lines = 7 if launch.constexprs["MASK_DIAG"] else 3
        assert launch.grid[0] == (stop - first) * lines
        # Batch-sliced views of the launcher's tensors: same strides, first image at the chunk's first image.
        for arg, whole in zip(_tensor_args(launch), (query, key, value, out, lse), strict=True):
            assert arg.shape[0] == stop - first and arg.stride() == whole.stride()
            assert arg.data_ptr() == whole[first].data_ptr()


def test_backward_plan_runs_delta_and_both_passes_of_a_chunk_before_the_next():
    query, key, value, grad = _inputs(3, 4, 6, 3, 7, dtype=torch.bfloat16)
    out, lse = torch.empty_like(value), torch.empty(3, 3, 7)
    blocks = dataclasses.replace(SMALL_BLOCKS, images_per_launch=2)
    _, launches = cca_triton.plan_backward(grad, query, key, value, out, lse, blocks=blocks)
    order = [(launch.kernel.__name__, launch.constexprs.get("MASK_DIAG"), launch.images) for launch in launches]
    assert order == [entry for images in [(0, 2), (2, 3)] for entry in (
        ("_delta_kernel", None, images), ("_line_backward_kernel", True, images),
        ("_line_backward_kernel", False, images))]
    for launch in launches:
        first, stop = launch.images
        assert all(arg.shape[0] == stop - first for arg in _tensor_args(launch))
    # Within a chunk the three launches see the same delta and partial-sum buffers (bf16: fp32 partials).
    delta, column, row = launches[3:]
    assert _tensor_args(delta)[2].data_ptr() == _tensor_args(column)[5].data_ptr() == _tensor_args(row)[5].data_ptr()
    assert [t.data_ptr() for t in _tensor_args(column)[6:]] == [t.data_ptr() for t in _tensor_args(row)[6:]]


def test_unchunked_plan_passes_the_launchers_own_tensors():
    """images_per_launch None (the default) and any count >= the batch: one launch per kernel over the whole
    batch, with exactly the tensors the launcher holds (no views), as before chunking existed."""
    query, key, value, _ = _inputs(2, 4, 6, 3, 7)
    for blocks in (SMALL_BLOCKS, dataclasses.replace(SMALL_BLOCKS, images_per_launch=2)):
        (out, lse), launches = cca_triton.plan_forward(query, key, value, blocks=blocks)
        assert [launch.images for launch in launches] == [(0, 2), (0, 2)]
        for launch in launches:
            assert all(a is b for a, b in zip(_tensor_args(launch), (query, key, value, out, lse), strict=True))
    assert cca_triton.default_blocks(torch.device("cpu"), torch.float32).images_per_launch is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_working_set_formulas_count_what_the_second_pass_reads(dtype):
    """Independently of the formulas: the per-image bytes of the tensors the row pass's launch takes (forward: all
    of them; backward: all but the final gradients it only writes, unless they are the partial sums)."""
    batch, qk_channels, v_channels, height, width = 2, 64, 512, 9, 11
    query, key, value, grad = (torch.empty(batch, channels, height, width, dtype=dtype, device="meta",
                                           memory_format=torch.channels_last)
                               for channels in (qk_channels, qk_channels, v_channels, v_channels))

    def per_image(tensors):
        unique = {id(t): t for t in tensors}.values()
        return sum(t.numel() * t.element_size() // t.shape[0] for t in unique)

    (out, lse), forward = cca_triton.plan_forward(query, key, value, blocks=SMALL_BLOCKS)
    assert per_image(_tensor_args(forward[1])) == cca_triton.forward_working_set_bytes(
        qk_channels, v_channels, height, width, dtype)
    grads, backward = cca_triton.plan_backward(grad, query, key, value, out, lse, blocks=SMALL_BLOCKS)
    row = _tensor_args(backward[2])
    partials = row[6:9]
    read = [t for t in row if not any(t is g for g in grads) or any(t is p for p in partials)]
    assert per_image(read) == cca_triton.backward_working_set_bytes(qk_channels, v_channels, height, width, dtype)


def test_l2_policy():
    fits = cca_triton.l2_images_per_launch
    assert fits(per_image_bytes=10, batch=8, l2_cache_bytes=100) == 5  # half of the L2: 50 bytes
    assert fits(per_image_bytes=10, batch=3, l2_cache_bytes=100) == 3  # never more than the batch
    assert fits(per_image_bytes=51, batch=8, l2_cache_bytes=100) == 8  # one image does not fit: no chunks
    auto = dataclasses.replace(SMALL_BLOCKS, images_per_launch="auto")
    resolve = cca_triton.resolve_images_per_launch
    assert resolve(auto, 8, 10, torch.device("cpu"), 100) == 5
    assert resolve(auto, 8, 10, torch.device("cpu")) == 8  # no L2 known off a GPU: the whole batch
    assert resolve(auto, 8, 10, torch.device("meta")) == 8
    assert resolve(dataclasses.replace(SMALL_BLOCKS, images_per_launch=3), 8, 10, torch.device("cpu")) == 3
    assert resolve(SMALL_BLOCKS, 8, 10, torch.device("cpu"), 100) == 8
    assert cca_triton.image_chunks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert cca_triton.image_chunks(2, 4) == [(0, 2)]
    # The shape, bf16: 21.7 MB forward and 45.8 MB backward per image; 50 MiB L2 (H100 / H200).
    forward = cca_triton.forward_working_set_bytes(64, 512, 97, 97, torch.bfloat16)
    backward = cca_triton.backward_working_set_bytes(64, 512, 97, 97, torch.bfloat16)
    assert forward == 97 * 97 * (2 * (2 * 64 + 2 * 512) + 4)
    assert (fits(forward, 8, 50 * 2**20), fits(backward, 8, 50 * 2**20)) == (1, 8)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", "AUTO", 2.0])
def test_bad_images_per_launch_raises_clear_errors(bad):
    with pytest.raises(ValueError, match=f"images_per_launch must be .*got {bad!r}"):
        dataclasses.replace(SMALL_BLOCKS, images_per_launch=bad)
    if not isinstance(bad, str):
        with pytest.raises(ValueError, match="images_per_launch must be a positive int"):
            cca_triton.image_chunks(4, bad)
    with pytest.raises(ValueError, match="must be positive"):
        cca_triton.l2_images_per_launch(0, 4, 100)


# ----------------------------------------------------------------------------------------------------------
# Tuner: selection logic with an injected timer
# ----------------------------------------------------------------------------------------------------------


def _key(**changes):
    fields = {"pass_name": "forward", "batch": 8, "height": 97, "width": 97, "qk_channels": 64, "v_channels": 512,
              "dtype": "bfloat16", "layout": "channels_last", "allow_tf32": False, "device": "NVIDIA H200",
              "capability": (9, 0)}
    return cca_triton.TuneKey(**{**fields, **changes})


class _Bench:
    """A planner and timer pair: the planner plans the forward on meta tensors (nothing runs) and notes the
    candidate; the timer returns that candidate's time from `times` (or raises what `failures` holds)."""

    def __init__(self, times, failures=None):
        self.times, self.failures, self.timed, self.planned = times, failures or {}, [], []
        self.inputs = tuple(torch.empty(8, channels, 97, 97, dtype=torch.bfloat16, device="meta",
                                        memory_format=torch.channels_last) for channels in (64, 64, 512))

    def plan(self, blocks):
        self.planned.append(blocks)
        if blocks in self.failures and self.failures[blocks][0] == "plan":
            raise self.failures[blocks][1]
        return cca_triton.plan_forward(*self.inputs, blocks=blocks, l2_cache_bytes=50 * 2**20)[1]

    def timer(self, run):
        blocks = self.planned[-1]
        self.timed.append(blocks)
        if blocks in self.failures and self.failures[blocks][0] == "time":
            raise self.failures[blocks][1]
        return self.times[blocks]


CANDIDATES = cca_triton.tuning_candidates("forward", torch.bfloat16, (9, 0))


def test_tuner_picks_the_fastest_and_records_every_time():
    times = {blocks: 1.0 + index for index, blocks in enumerate(CANDIDATES)}
    fastest = CANDIDATES[3]
    times[fastest] = 0.5
    bench, tuner = _Bench(times), cca_triton.Tuner()
    tuner.timer = bench.timer
    assert tuner.best(_key(), CANDIDATES, bench.plan) == fastest
    tuning = tuner.results[_key()]
    assert tuning.blocks == fastest and tuning.errors == {}
    # Every distinct plan is timed once: "auto" and one image per launch plan the same chunks at this shape.
    assert len(tuning.times_ms) == len(bench.timed) == len(CANDIDATES) - 1
    assert all(tuning.times_ms[blocks] == times[blocks] for blocks in tuning.times_ms)


def test_tuner_breaks_ties_towards_the_earlier_candidate():
    bench = _Bench(dict.fromkeys(CANDIDATES, 2.0))
    tuner = cca_triton.Tuner(timer=bench.timer)
    assert tuner.best(_key(), CANDIDATES, bench.plan) == CANDIDATES[0]


def test_tuner_cache_hit_does_not_time_again():
    bench = _Bench({blocks: 1.0 + index for index, blocks in enumerate(CANDIDATES)})
    tuner = cca_triton.Tuner(timer=bench.timer)
    first = tuner.best(_key(), CANDIDATES, bench.plan)
    timed = len(bench.timed)
    assert tuner.best(_key(), CANDIDATES, bench.plan) == first and len(bench.timed) == timed


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(cca_triton.TuneKey)])
def test_tuner_key_includes_every_element(field):
    other = {"pass_name": "backward", "batch": 2, "height": 65, "width": 129, "qk_channels": 32,
             "v_channels": 256, "dtype": "float16", "layout": "contiguous", "allow_tf32": True,
             "device": "NVIDIA H100 80GB HBM3", "capability": (8, 0)}
    assert set(other) == {field.name for field in dataclasses.fields(cca_triton.TuneKey)}
    bench = _Bench({blocks: 1.0 for blocks in CANDIDATES})
    tuner = cca_triton.Tuner(timer=bench.timer)
    tuner.best(_key(), CANDIDATES, bench.plan)
    timed = len(bench.timed)
    tuner.best(_key(**{field: other[field]}), CANDIDATES, bench.plan)
    assert len(bench.timed) == 2 * timed
    assert len(tuner.results) == 2


def test_tuner_skips_failing_candidates_and_records_their_errors():
    times = {blocks: 1.0 + index for index, blocks in enumerate(CANDIDATES)}
    failures = {CANDIDATES[0]: ("plan", ValueError("tile too large")),
                CANDIDATES[3]: ("time", RuntimeError("out of resources: shared memory"))}
    times[CANDIDATES[3]] = 0.1  # would win, but failed
    times[CANDIDATES[5]] = float("nan")  # a timer that returns nonsense counts as a failure
    bench = _Bench(times, failures)
    tuner = cca_triton.Tuner(timer=bench.timer)
    chosen = tuner.best(_key(), CANDIDATES, bench.plan)
    assert chosen == CANDIDATES[1]
    errors = tuner.results[_key()].errors
    assert errors[CANDIDATES[0]] == "ValueError: tile too large"
    assert errors[CANDIDATES[3]] == "RuntimeError: out of resources: shared memory"
    assert "nan" in errors[CANDIDATES[5]]
    assert set(tuner.results[_key()].times_ms).isdisjoint(errors)


def test_tuner_raises_when_no_candidate_runs():
    failures = {blocks: ("time", RuntimeError(f"failure {index}")) for index, blocks in enumerate(CANDIDATES)}
    bench = _Bench({}, failures)
    tuner = cca_triton.Tuner(timer=bench.timer)
    with pytest.raises(RuntimeError, match="no candidate ran for TuneKey.*failure 0.*failure 6"):
        tuner.best(_key(), CANDIDATES, bench.plan)
    assert _key() not in tuner.results
    with pytest.raises(RuntimeError, match="no candidates"):
        tuner.best(_key(), (), bench.plan)


def test_tuner_persists_choices_atomically_across_tuners(tmp_path):
    path = tmp_path / "tune" / "cca.json"
    bench = _Bench({blocks: 1.0 + index for index, blocks in enumerate(CANDIDATES)},
                   {CANDIDATES[0]: ("time", RuntimeError("boom"))})
    tuner = cca_triton.Tuner(timer=bench.timer, cache_path=path)
    chosen = tuner.best(_key(), CANDIDATES, bench.plan)
    assert chosen == CANDIDATES[1] and path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["cca.json"]  # no temporary left behind
    document = json.loads(path.read_text())
    assert document["triton"] == cca_triton.triton.__version__ and len(document["entries"]) == 1

    def must_not_time(run):
        raise AssertionError("a persisted choice was timed again")

    fresh = cca_triton.Tuner(timer=must_not_time, cache_path=path)
    assert fresh.best(_key(), CANDIDATES, bench.plan) == chosen
    assert fresh.results[_key()].errors == {CANDIDATES[0]: "RuntimeError: boom"}
    # A second key is added to the file, the first kept.
    fresh.timer = bench.timer
    fresh.best(_key(batch=4), CANDIDATES, bench.plan)
    assert len(json.loads(path.read_text())["entries"]) == 2
    # Choices made by another Triton version are not used.
    document = json.loads(path.read_text())
    document["triton"] = "0.0.0"
    path.write_text(json.dumps(document))
    other = cca_triton.Tuner(timer=bench.timer, cache_path=path)
    timed = len(bench.timed)
    other.best(_key(), CANDIDATES, bench.plan)
    assert len(bench.timed) > timed


def test_tuner_refuses_a_file_that_is_not_a_tuning_file(tmp_path):
    path = tmp_path / "cca.json"
    path.write_text("{not json")
    tuner = cca_triton.Tuner(timer=lambda run: 1.0, cache_path=path)
    with pytest.raises(ValueError, match="cca.json.*not a cca_triton tuning file"):
        tuner.best(_key(), CANDIDATES, _Bench({}).plan)


@pytest.mark.parametrize("capability", [None, (8, 0), (9, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pass_name", cca_triton.PASSES)
def test_tuning_candidates_derive_from_the_defaults(pass_name, dtype, capability):
    device = torch.device("cpu" if capability is None else "cuda")
    base = cca_triton.default_blocks(device, dtype, capability)
    candidates = cca_triton.tuning_candidates(pass_name, dtype, capability)
    assert candidates[0] == base and len(set(candidates)) == len(candidates) <= 8
    assert {blocks.images_per_launch for blocks in candidates} == {None, "auto", 1}
    # The fields a pass's kernels read, and which of them the candidates vary.
    used = {"forward": {"line", "qk_channels", "v_channels", "num_warps", "num_stages", "long_line",
                        "long_line_warps", "max_registers", "images_per_launch"},
            "backward": {"line", "qk_channels", "v_channels", "num_warps", "num_stages", "backward_line",
                         "backward_warps", "images_per_launch"}}[pass_name]
    varied = {"v_channels", "num_stages", "images_per_launch"} | (
        {"num_warps", "max_registers"} if pass_name == "forward" else {"backward_line", "backward_warps"})
    for blocks in candidates:
        changed = {field.name for field in dataclasses.fields(blocks)
                   if getattr(blocks, field.name) != getattr(base, field.name)}
        assert changed <= varied & used, changed
    assert {blocks.v_channels for blocks in candidates} == {base.v_channels, 2 * base.v_channels}
    assert {blocks.num_stages for blocks in candidates} == {base.num_stages, base.num_stages + 1}
    if pass_name == "forward":
        assert {blocks.num_warps for blocks in candidates} == {4, 8}
    else:
        line = base.backward_line or base.line
        assert {blocks.backward_line or blocks.line for blocks in candidates} == {line, max(16, line // 2)}
    with pytest.raises(ValueError, match="pass_name must be one of"):
        cca_triton.tuning_candidates("sideways", dtype, capability)


# ----------------------------------------------------------------------------------------------------------
# Tuning through the public launchers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the interpreter path: on CUDA the real timer runs (see the gpu test)")
def test_tune_runs_every_candidate_and_uses_the_fastest_in_the_interpreter():
    """blocks="tune" on the interpreter with a timer that really runs each candidate's launches once: every
    candidate runs, the forward and backward are tuned on their own keys, the results match the reference."""
    query, key, value, grad = _inputs(2, 3, 5, 4, 6)
    planned = []

    def timer(run):
        run()  # the candidate's launches execute in the interpreter
        planned.append(run)
        return float(10 - len(planned))  # the last candidate timed is the fastest

    tuner = cca_triton.Tuner(timer=timer)
    out, lse = cca_triton.cca_triton_forward(query, key, value, blocks="tune", tuner=tuner)
    grads = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks="tune", tuner=tuner)
    assert {key.pass_name for key in tuner.results} == {"forward", "backward"}
    for tuning in tuner.results.values():
        assert tuning.errors == {} and tuning.blocks == list(tuning.times_ms)[-1]
    as_double = [t.double().requires_grad_() for t in (query, key, value)]
    reference = _naive(*as_double)
    reference_grads = torch.autograd.grad(reference, as_double, grad.double())
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    for actual, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5)
    # The launchers copied the NCHW inputs into channels_last before tuning: the keys name what the kernels read.
    query, key, value, grad = (cca_triton._to_channels_last(t) for t in (query, key, value, grad))
    forward_runs = len(tuner.results[cca_triton.tune_key("forward", query, value, (query, key, value))].times_ms)
    assert len(planned) == forward_runs + len(tuner.results[cca_triton.tune_key(
        "backward", query, value, (query, key, value, grad))].times_ms)


def test_tuning_is_off_by_default_and_switched_on_only_on_cuda(monkeypatch, op_device):
    """Without blocks, calls use default_blocks (deterministic); CCREPRO_TRITON_TUNE=1 tunes only on CUDA;
    blocks="tune" with the GPU timer on CPU, an unknown blocks value or switch value are clear errors."""
    query, key, value, _ = _inputs(1, 2, 3, 3, 4, device=op_device)

    def no_tuner():
        raise AssertionError("the default tuner was used")

    monkeypatch.setattr(cca_triton, "default_tuner", no_tuner)
    monkeypatch.delenv(cca_triton.TUNE_ENV, raising=False)
    cca_triton.cca_triton_forward(query, key, value)
    monkeypatch.setenv(cca_triton.TUNE_ENV, "1")
    if op_device.type == "cpu":
        cca_triton.cca_triton_forward(query, key, value)  # the interpreter never tunes by default
        with pytest.raises(RuntimeError, match="blocks='tune' .*needs a CUDA device.*cpu"):
            cca_triton.cca_triton_forward(query, key, value, blocks="tune", tuner=cca_triton.Tuner())
    else:
        with pytest.raises(AssertionError, match="default tuner"):
            cca_triton.cca_triton_forward(query, key, value)
    monkeypatch.setenv(cca_triton.TUNE_ENV, "yes")
    with pytest.raises(ValueError, match="CCREPRO_TRITON_TUNE must be '0' or '1', got 'yes'"):
        cca_triton.cca_triton_forward(query, key, value)
    with pytest.raises(ValueError, match="blocks must be a Blocks, 'tune' or None, got 'fast'"):
        cca_triton.cca_triton_forward(query, key, value, blocks="fast")


def test_tune_key_describes_the_call():
    query, key, value, grad = _inputs(2, 3, 5, 4, 6)
    forward = cca_triton.tune_key("forward", query, value, (query, key, value))
    assert forward == _key(batch=2, height=4, width=6, qk_channels=3, v_channels=5, dtype="float32",
                           layout="contiguous", device="cpu", capability=None)
    channels_last = tuple(t.contiguous(memory_format=torch.channels_last) for t in (query, key, value))
    assert cca_triton.tune_key("forward", channels_last[0], channels_last[2], channels_last).layout == "channels_last"
    mixed = (channels_last[0], key, value)
    assert cca_triton.tune_key("forward", query, value, mixed, allow_tf32=True).layout == "strided"
    with pytest.raises(ValueError, match="pass_name must be one of"):
        cca_triton.tune_key("both", query, value, (query,))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (triton.testing.do_bench)")
def test_cuda_tune_times_the_candidates_and_matches_the_default():
    """On a GPU: every candidate compiles and runs at a realistic shape (or its error is recorded), the choice is
    cached, and the tuned result equals the default's within bf16 rounding."""
    query, key, value, grad = _inputs(4, 64, 512, 33, 41, dtype=torch.bfloat16, device="cuda")
    query, key, value, grad = (t.contiguous(memory_format=torch.channels_last) for t in (query, key, value, grad))
    tuner = cca_triton.Tuner()
    out, lse = cca_triton.cca_triton_forward(query, key, value, blocks="tune", tuner=tuner)
    grads = cca_triton.cca_triton_backward(grad, query, key, value, out, lse, blocks="tune", tuner=tuner)
    default_out, default_lse = cca_triton.cca_triton_forward(query, key, value)
    default_grads = cca_triton.cca_triton_backward(grad, query, key, value, default_out, default_lse)
    for tuning in tuner.results.values():
        assert tuning.times_ms and all(ms > 0 for ms in tuning.times_ms.values()), tuning.errors
    torch.testing.assert_close(lse, default_lse)
    torch.testing.assert_close(out, default_out, rtol=2e-2, atol=2e-2)
    for actual, expected in zip(grads, default_grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=5e-2, atol=5e-2)
