"""Public criss-cross attention API: `criss_cross_attention()` with backend dispatch, and the
`CrissCrossAttention` module (the paper's CCA block: 1x1 q/k/v convs, scalar gamma, residual).

For every pixel (i, j) the energies are the dot products of `query[:, :, i, j]` with `key` at the
H + W - 1 pixels of row i and column j (the pixel itself counted once), one softmax runs over all of them
jointly, no 1/sqrt(d) scaling, and the output is the softmax-weighted sum of `value` at those pixels. This
is the official / mmcv formulation (column branch with -inf on its diagonal, concatenated with the row
branch).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ops._checks import check_qkv
from ops.cca_export import criss_cross_attention_export
from ops.cca_naive import criss_cross_attention_naive

# "export": the functional formulation of `ops.cca_export` (same function as naive, for ONNX export).
BACKENDS = ("auto", "naive", "triton", "export")


def triton_installed() -> bool:
    """Whether the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Whether the Triton backend can run on `device`: CUDA with triton installed, or any device when the
    Triton interpreter is switched on (TRITON_INTERPRET=1, which is how CI runs the kernels on CPU)."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type == "cpu"


# Evidence for backend="auto" on CUDA: one row per (GPU model, dtype, shape) that `python -m repro.bench` timed
# on that GPU, naive and Triton side by side (written by `repro.measure.bench.write_auto_backend_evidence` from
# results/ops_bench.csv, committed with the package). A small file beside this module rather than the results
# CSV itself: `ops` never imports `repro` nor depends on where results live, and an installed package carries it.
AUTO_EVIDENCE = Path(__file__).with_name("auto_backend.csv")
EVIDENCE_COLUMNS = ("device", "dtype", "batch", "channels", "qk_channels", "height", "width",
                    "naive_fwd_ms", "triton_fwd_ms", "naive_fwd_bwd_ms", "triton_fwd_bwd_ms", "torch", "triton",
                    "date")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@cache
def load_auto_evidence(path: Path = AUTO_EVIDENCE) -> tuple[dict[str, str], ...]:
    """The rows of the evidence file (read once per path, on first use, never at import); () if it is absent.
    A file with other columns is an error naming the file and the columns expected."""
    if not path.is_file():
        return ()
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != EVIDENCE_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the expected {EVIDENCE_COLUMNS}")
        return tuple(reader)


def triton_proven_faster(device_name: str, dtype: torch.dtype, *, path: Path | None = None) -> bool:
    """Whether the evidence shows the Triton backend faster than naive on the GPU model `device_name` at
    `dtype`: at least one row for that model and dtype, and Triton faster in every such row, forward and
    forward + backward. Another GPU model or dtype proves nothing."""
    dtype_name = DTYPE_NAMES.get(dtype)
    rows = [row for row in load_auto_evidence(AUTO_EVIDENCE if path is None else path)
            if row["device"] == f"cuda: {device_name}" and row["dtype"] == dtype_name]
    return bool(rows) and all(
        float(row["triton_fwd_ms"]) < float(row["naive_fwd_ms"])
        and float(row["triton_fwd_bwd_ms"]) < float(row["naive_fwd_bwd_ms"])
        for row in rows
    )


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Turn "auto" into a concrete backend for `device` and `dtype`; reject unknown names.

    "auto" picks Triton only on CUDA, and only where a committed benchmark row (`AUTO_EVIDENCE`) shows it
    faster than naive on this GPU model at this dtype; everywhere else it picks naive. The fused kernel saves
    memory (no (B, H, W, H + W) map) but whether it is faster is a measurement, not an assumption; until a GPU
    has measured it, naive is the safe default. `backend="triton"` asks for the kernel explicitly.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown criss-cross attention backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    # The interpreter is a correctness tool, far slower than the naive path: auto never picks it on CPU.
    if device.type != "cuda" or not triton_available(device) or not torch.cuda.is_available():
        return "naive"
    return "triton" if triton_proven_faster(torch.cuda.get_device_name(device), dtype) else "naive"


def criss_cross_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Criss-cross attention.

    Args:
        query, key: (B, Cqk, H, W).
        value: (B, Cv, H, W).
        backend: "naive" (pure PyTorch, any device), "triton" (fused kernel), "export" (functional ops only,
            what `torch.onnx.export` can trace; see `ops.cca_export`) or "auto" (triton on CUDA where a
            committed benchmark shows it faster than naive on this GPU at this dtype, naive otherwise; see
            `resolve_backend`).

    Returns:
        (B, Cv, H, W), in the dtype of the inputs.
    """
    check_qkv(query, key, value, "criss_cross_attention")
    resolved = resolve_backend(backend, query.device, query.dtype)
    if resolved == "naive":
        return criss_cross_attention_naive(query, key, value)
    if resolved == "export":
        return criss_cross_attention_export(query, key, value)
    return _triton(query, key, value)


def _triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Fake tensors (shape tracing, memory estimates) run the custom op's fake implementation only: no kernel
    # is launched, so any device will do as long as triton is installed to register the op.
    traced = isinstance(query, FakeTensor) and triton_installed()
    if not traced and not triton_available(query.device):
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor and the triton package, got a tensor on {query.device}; "
            "set TRITON_INTERPRET=1 before triton is first imported to run the kernels on CPU in the Triton "
            "interpreter, or use backend='naive'"
        )
    # Imported here so that importing `ops` never imports triton (and never decides the interpreter mode).
    from ops.cca_triton import criss_cross_attention_triton

    return criss_cross_attention_triton(query, key, value)


class CrissCrossAttention(nn.Module):
    """The CCA block: `gamma * criss_cross_attention(q(x), k(x), v(x)) + x`.

    Args:
        in_channels: C of the input (B, C, H, W); the value projection keeps C.
        qk_channels: channels of query and key (default in_channels // 8, as in the paper).
        backend: attention backend, see `criss_cross_attention`.
    """

    def __init__(self, in_channels: int, *, qk_channels: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        qk_channels = max(in_channels // 8, 1) if qk_channels is None else qk_channels
        if qk_channels < 1:
            raise ValueError(f"qk_channels must be >= 1, got {qk_channels}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown criss-cross attention backend {backend!r}; expected one of {BACKENDS}")
        self.in_channels = in_channels
        self.qk_channels = qk_channels
        self.backend = backend
        self.query_conv = nn.Conv2d(in_channels, qk_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, qk_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        # Zero at start, as in the paper: the block begins as the identity.
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CrissCrossAttention expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        out = criss_cross_attention(
            self.query_conv(x), self.key_conv(x), self.value_conv(x), backend=self.backend
        )
        # One op (no separate gamma * out map), laid out like x: the naive backend returns channels_last memory,
        # and an NCHW model's next conv and the head's concatenation are faster when everything stays NCHW.
        return torch.addcmul(x, self.gamma, out)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, qk_channels={self.qk_channels}, backend={self.backend!r}"
