"""Public criss-cross attention API: `criss_cross_attention()` with backend dispatch, and the
`CrissCrossAttention` module (the paper's CCA block: 1x1 q/k/v convs, scalar gamma, residual).

For every pixel (i, j) the energies are the dot products of `query[:, :, i, j]` with `key` at the
H + W - 1 pixels of row i and column j (the pixel itself counted once), one softmax runs over all of them
jointly, no 1/sqrt(d) scaling, and the output is the softmax-weighted sum of `value` at those pixels. This
is the official / mmcv formulation (column branch with -inf on its diagonal, concatenated with the row
branch).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ops._checks import check_qkv
from ops.cca_naive import criss_cross_attention_naive

BACKENDS = ("auto", "naive", "triton")


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for `device`; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown criss-cross attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        # The interpreter is a correctness tool, far slower than the naive path: auto never picks it on CPU.
        return "triton" if device.type == "cuda" and triton_available(device) else "naive"
    return backend


def criss_cross_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Criss-cross attention.

    Args:
        query, key: (B, Cqk, H, W).
        value: (B, Cv, H, W).
        backend: "naive" (pure PyTorch, any device), "triton" (fused kernel) or "auto" (triton on CUDA,
            naive otherwise).

    Returns:
        (B, Cv, H, W), in the dtype of the inputs.
    """
    check_qkv(query, key, value, "criss_cross_attention")
    resolved = resolve_backend(backend, query.device)
    if resolved == "naive":
        return criss_cross_attention_naive(query, key, value)
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
        return self.gamma * out + x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, qk_channels={self.qk_channels}, backend={self.backend!r}"
