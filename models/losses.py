"""Segmentation losses: cross-entropy with an ignore index, the official CCNet OHEM cross-entropy, and the
decode + 0.4 x auxiliary combination."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating-point (B, C, H, W) tensor, got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(
            f"target must be an integer label tensor (int64/int32/uint8), got "
            f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}"
        )
    batch, classes, height, width = logits.shape
    if tuple(target.shape) != (batch, height, width):
        raise ValueError(
            f"target must be (B, H, W) = {(batch, height, width)} to match logits, got {tuple(target.shape)}"
        )
    labels = target[target != ignore_index]
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"target labels must be in [0, {classes}) or the ignore index {ignore_index}, "
            f"found values in [{int(labels.min())}, {int(labels.max())}]"
        )


def _mean_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean over non-ignored pixels; 0 (still differentiable) when every pixel is ignored, where
    F.cross_entropy's mean would be NaN."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy: logits (B, C, H, W), target (B, H, W) labels -> scalar mean over pixels whose
    label is not `ignore_index` (255 on Cityscapes)."""

    def __init__(self, *, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logits, target, self.ignore_index)
        return _mean_cross_entropy(logits, target.long(), self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


class OHEMCrossEntropy(nn.Module):
    """Online hard example mining cross-entropy, with the official CCNet semantics (`OhemCrossEntropy2d`):

    Over the whole batch, p = softmax probability of each valid pixel's true class. If there are fewer valid
    pixels than `min_kept`, all of them are kept. Otherwise the threshold is `thresh`, raised to the
    `min_kept`-th smallest p when that is larger, and the pixels with p <= threshold are kept (so at least
    `min_kept` of the hardest). The loss is the cross-entropy mean over the kept pixels. The selection is not
    differentiated.
    """

    def __init__(self, *, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100000) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"thresh must be in (0, 1], got {thresh!r}")
        if not isinstance(min_kept, int) or min_kept < 0:
            raise ValueError(f"min_kept must be an int >= 0, got {min_kept!r}")
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = min_kept

    def kept_mask(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool: the pixels the loss is computed on."""
        _check_inputs(logits, target, self.ignore_index)
        target = target.long()
        with torch.no_grad():
            valid = target != self.ignore_index
            num_valid = int(valid.sum())
            if num_valid == 0 or self.min_kept > num_valid:
                return valid
            probs = torch.softmax(logits.detach().float(), dim=1)
            true_prob = probs.gather(1, target.clamp(min=0).masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
            threshold = torch.tensor(self.thresh, dtype=true_prob.dtype, device=true_prob.device)
            if self.min_kept > 0:
                kth = true_prob[valid].kthvalue(self.min_kept).values
                threshold = torch.maximum(threshold, kth)
            return valid & (true_prob <= threshold)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = self.kept_mask(logits, target)
        return _mean_cross_entropy(
            logits, target.long().masked_fill(~kept, self.ignore_index), self.ignore_index
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, thresh={self.thresh}, min_kept={self.min_kept}"


class SegLoss(nn.Module):
    """decode_loss(logits) + aux_weight * aux_loss(aux_logits), the official and mmsegmentation recipe
    (aux weight 0.4). The official OHEM run applies OHEM to the decode output only and plain cross-entropy
    to the auxiliary one: `SegLoss(decode_loss=OHEMCrossEntropy())`.

    forward(outputs, target): outputs is the train-mode model output `(logits, aux_logits)` (aux_logits may be
    None) or bare logits; returns the scalar total. `parts()` returns the terms as well.
    """

    def __init__(
        self,
        *,
        decode_loss: nn.Module | None = None,
        aux_loss: nn.Module | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight!r}")
        self.decode_loss = decode_loss if decode_loss is not None else CrossEntropy(ignore_index=ignore_index)
        self.aux_loss = aux_loss if aux_loss is not None else CrossEntropy(ignore_index=ignore_index)
        self.aux_weight = aux_weight

    def parts(self, outputs, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"decode", "aux" (absent without aux logits), "total"}."""
        logits, aux_logits = outputs if isinstance(outputs, tuple | list) else (outputs, None)
        parts = {"decode": self.decode_loss(logits, target)}
        total = parts["decode"]
        if aux_logits is not None:
            parts["aux"] = self.aux_loss(aux_logits, target)
            total = total + self.aux_weight * parts["aux"]
        parts["total"] = total
        return parts

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        return self.parts(outputs, target)["total"]
