"""Independent slow references for the attention ops: explicit loops over each pixel's attended set."""

from __future__ import annotations

import torch


def criss_cross_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel: softmax over the H + W - 1 pixels of row i and column j (the pixel once)."""
    batch, _, height, width = query.shape
    out = value.new_zeros(value.shape)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                positions = [(i, jj) for jj in range(width)] + [(ii, j) for ii in range(height) if ii != i]
                rows = torch.tensor([p[0] for p in positions])
                cols = torch.tensor([p[1] for p in positions])
                energies = (query[b, :, i, j, None] * key[b][:, rows, cols]).sum(0)
                weights = torch.softmax(energies, dim=0)
                out[b, :, i, j] = (value[b][:, rows, cols] * weights).sum(1)
    return out


def non_local_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel: softmax over all H * W pixels."""
    batch, _, height, width = query.shape
    out = value.new_zeros(value.shape)
    for b in range(batch):
        keys = key[b].flatten(1)
        values = value[b].flatten(1)
        for i in range(height):
            for j in range(width):
                weights = torch.softmax((query[b, :, i, j, None] * keys).sum(0), dim=0)
                out[b, :, i, j] = (values * weights).sum(1)
    return out


# A key bias adds the same q . b to every energy of a query pixel; the softmax is shift-invariant, so the
# gradient of every key-projection bias is exactly zero in exact arithmetic (criss-cross and non-local alike).
# In floating point it is rounding noise, whose size and sign differ between CPUs and thread counts.
SHIFT_INVARIANT_SUFFIX = "key_conv.bias"


def assert_gradients_reach_parameters(named_parameters, *, rtol: float = 1e-4) -> None:
    """Every parameter has a gradient; the key-projection biases' are ~0 relative to the largest gradient
    (at most `rtol` of it), every other parameter's is non-zero. Raises AssertionError naming the parameter."""
    grads = {name: parameter.grad for name, parameter in named_parameters}
    missing = [name for name, grad in grads.items() if grad is None]
    assert not missing, f"no gradient for {missing}"
    scale = max(float(grad.abs().max()) for grad in grads.values())
    assert scale > 0, "every gradient is zero"
    for name, grad in grads.items():
        size = float(grad.abs().max())
        if name.endswith(SHIFT_INVARIANT_SUFFIX):
            assert size <= rtol * scale, f"{name}: gradient {size:.3g} should vanish (largest {scale:.3g})"
        else:
            assert size > 0, f"{name}: zero gradient"
