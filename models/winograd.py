"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016), written with PyTorch's own GEMMs, for CPU inference.

Each 4x4 block of outputs is computed from the 6x6 input tile around it: the tile is transformed (V = B^T d B),
multiplied element-wise with the transformed kernel (U = G g G^T, once per model) and summed over input
channels, which for all tiles at once is 36 independent matrix products M[xi] = U[xi] (O x C) @ V[xi] (C x T),
then transformed back (Y = A^T M A). That is 36 / (16 * 9) = 1/4 of the direct convolution's multiply-adds,
done by MKL's batched GEMM at full vector width; the transforms are two more small GEMMs and two copies.
Interpolation points 0, +-1, +-2 and infinity: the same rounding class as NNPACK's F(6x6, 3x3) and smaller
(relative differences from the direct convolution ~1e-5 of the largest output, fp32).

Dilated convolutions (padding = dilation = d, the ResNet-D8 backbones' layer3 / layer4) go the same way: the
outputs whose coordinates are congruent to (a, b) modulo d read only the inputs congruent to (a, b), so each of
the d^2 phase images is an undilated 3x3 convolution ("space to batch", as TensorFlow's atrous convolution);
the phases are read through strides, not copied out.

`Workspace`: the padded input, tiles and GEMM results of one call are reused by the next (one workspace can be
shared by all the convolutions of a model), so a forward does not page in fresh memory for them; tiles are
processed in row chunks of at most `CHUNK_BYTES` so its size stays bounded for large images.
"""

from __future__ import annotations

import threading

import torch

_BT = torch.tensor([[4, 0, -5, 0, 1, 0],
                    [0, -4, -4, 1, 1, 0],
                    [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0],
                    [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0],
                   [-1 / 6, -1 / 6, -1 / 6],
                   [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6],
                   [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0],
                    [0, 1, -1, 2, -2, 0],
                    [0, 1, 1, 4, 4, 0],
                    [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
TILE, OUT = 6, 4  # input tile and output block sides
CHUNK_BYTES = 160 * 2**20  # at most this many bytes of transformed tiles per GEMM chunk


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) weights -> (36, O, C) transformed kernel G g G^T (computed in float64, stored in the
    weight's dtype)."""
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"kernel_transform expects (O, C, 3, 3) weights, got {tuple(weight.shape)}")
    transformed = torch.einsum("ik,ockl,jl->ijoc", _G, weight.detach().double().cpu(), _G)
    return transformed.reshape(TILE * TILE, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


class Workspace:
    """Named scratch buffers, grown on demand and reused across calls; a lock makes concurrent forwards of
    models sharing it take turns in the convolution."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()  # scratch only; a copied model gets its own (shared among its convolutions via memo)

    def __reduce__(self):
        return (Workspace, ())

    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


_MATRICES: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


def _matrices(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(36 x 36) input transform kron(B^T, B^T) and (16 x 36) output transform kron(A^T, A^T)."""
    if dtype not in _MATRICES:
        _MATRICES[dtype] = (torch.kron(_BT, _BT).to(dtype), torch.kron(_AT, _AT).to(dtype))
    return _MATRICES[dtype]


def conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None = None, *, dilation: int = 1,
            workspace: Workspace | None = None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)` for a 3x3 `weight` whose
    `kernel_transform` is `transformed`; x (N, C, H, W) on the CPU, NCHW or channels_last (the output has the
    same layout)."""
    if x.dim() != 4 or transformed.dim() != 3 or transformed.shape[0] != TILE * TILE:
        raise ValueError(f"conv3x3 expects x (N, C, H, W) and a (36, O, C) kernel, got {tuple(x.shape)} and "
                         f"{tuple(transformed.shape)}")
    if x.shape[1] != transformed.shape[2]:
        raise ValueError(f"x has {x.shape[1]} channels, the kernel expects {transformed.shape[2]}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    workspace = workspace if workspace is not None else Workspace()
    with workspace.lock:
        return _conv3x3(x, transformed, bias, dilation, workspace)


def _conv3x3(x, transformed, bias, d, workspace):
    batch, channels, height, width = x.shape
    out_channels = transformed.shape[1]
    dtype = x.dtype
    kin, kout = _matrices(dtype)
    rows, cols = -(-height // d), -(-width // d)  # output size of each phase image
    tiles_h, tiles_w = -(-rows // OUT), -(-cols // OUT)
    padded_h, padded_w = d * (OUT * tiles_h + 2), d * (OUT * tiles_w + 2)
    # Zero-padded input (the conv's own padding d on the top / left, enough on the bottom / right for whole
    # tiles of every phase): borders zeroed, interior copied, in a reused buffer.
    padded = workspace.get("padded", (batch, channels, padded_h, padded_w), dtype)
    padded[:, :, :d].zero_()
    padded[:, :, d + height:].zero_()
    padded[:, :, d:d + height, :d].zero_()
    padded[:, :, d:d + height, d + width:].zero_()
    padded[:, :, d:d + height, d:d + width].copy_(x)
    # Row r = d * i + a of the padded image is row i of phase a; 6x6 windows every 4 rows / columns of a phase.
    phases = padded.view(batch, channels, OUT * tiles_h + 2, d, OUT * tiles_w + 2, d)
    windows = phases.unfold(2, TILE, OUT).unfold(4, TILE, OUT)  # N C th a tw b 6 6
    windows = windows.permute(1, 0, 3, 5, 2, 4, 6, 7)  # C N a b th tw 6 6
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    full = d * OUT * tiles_h == height and d * OUT * tiles_w == width
    out = torch.empty((batch, out_channels, d * OUT * tiles_h, d * OUT * tiles_w), dtype=dtype,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    blocks = out.view(batch, out_channels, tiles_h, OUT, d, tiles_w, OUT, d)  # N O th i a tw j b
    per_row = batch * d * d * tiles_w  # tiles in one row of tiles (all images and phases)
    chunk = max(1, min(tiles_h, CHUNK_BYTES // max(1, channels * per_row * TILE * TILE * x.element_size())))
    bias_view = bias.view(1, -1, 1, 1, 1, 1, 1, 1) if bias is not None else None
    for start in range(0, tiles_h, chunk):
        stop = min(tiles_h, start + chunk)
        count = (stop - start) * per_row
        tiles = workspace.get("tiles", (channels, batch, d, d, stop - start, tiles_w, TILE, TILE), dtype)
        tiles.copy_(windows[:, :, :, :, start:stop])
        inputs = workspace.get("inputs", (TILE * TILE, channels * count), dtype)
        torch.mm(kin, tiles.view(channels * count, TILE * TILE).t(), out=inputs)
        products = workspace.get("products", (TILE * TILE, out_channels, count), dtype)
        torch.bmm(transformed, inputs.view(TILE * TILE, channels, count), out=products)
        outputs = workspace.get("outputs", (OUT * OUT, out_channels * count), dtype)
        torch.mm(kout, products.view(TILE * TILE, out_channels * count), out=outputs)
        # (i, j, O, N, a, b, th, tw) -> the output blocks (N, O, th, i, a, tw, j, b), bias added on the way
        values = outputs.view(OUT, OUT, out_channels, batch, d, d, stop - start, tiles_w).permute(
            3, 2, 6, 0, 4, 7, 1, 5)
        target = blocks[:, :, start:stop]
        if bias_view is None:
            target.copy_(values)
        else:
            torch.add(values, bias_view, out=target)
    if not full:
        out = out[:, :, :height, :width]
        out = out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return out
