"""Segmentation losses: cross-entropy with an ignore index (averaged over the labelled pixels or over all
pixels, as the sources differ), the official CCNet OHEM cross-entropy, and the decode + 0.4 x auxiliary
combination."""

from __future__ import annotations

import numpy as np
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


AVERAGES = ("valid_pixels", "all_pixels")


def _mean_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, average: str = "valid_pixels"
) -> torch.Tensor:
    """Per-pixel cross-entropy summed, over the number of non-ignored pixels ("valid_pixels"; 0, still
    differentiable, when every pixel is ignored, where F.cross_entropy's mean would be NaN) or over every
    pixel of the batch, ignored ones counting 0 ("all_pixels")."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if average == "all_pixels":
        return total / target.numel()
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy: logits (B, C, H, W), target (B, H, W) labels -> scalar.

    `average`: "valid_pixels" divides the summed loss by the pixels whose label is not `ignore_index` (255 on
    Cityscapes) - torch's nn.CrossEntropyLoss, which the official code and sssegmentation use;
    "all_pixels" divides by B x H x W, ignored pixels counting 0 - mmsegmentation's CrossEntropyLoss with its
    default avg_non_ignore=False, kept by every mmsegmentation CCNet config.
    """

    def __init__(self, *, ignore_index: int = 255, average: str = "valid_pixels") -> None:
        super().__init__()
        _check_average(average)
        self.ignore_index = ignore_index
        self.average = average

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logits, target, self.ignore_index)
        return _mean_cross_entropy(logits, target.long(), self.ignore_index, self.average)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, average={self.average!r}"


class OHEMCrossEntropy(nn.Module):
    """Online hard example mining cross-entropy as the official CCNet code computes it (`OhemCrossEntropy2d`
    in speedinghzl/CCNet utils/loss.py, used on the decode output by CriterionOhemDSN):

    1. The threshold is found at 1/`factor` resolution: the softmax probabilities (B, C, H, W) are shrunk by
       `scipy.ndimage.zoom(p, (1, 1, 1/factor, 1/factor), order=1)` and the labels by the same zoom with
       order 0 (nearest); `min_kept` becomes `min_kept // factor**2`. If that is at least the number of
       valid pixels there, the threshold is 1.0 (every valid pixel kept). Otherwise it is `thresh`, raised to
       the `min_kept // factor**2`-th smallest true-class probability when that is larger.
    2. At full resolution, the valid pixels whose true-class probability is <= the threshold are kept, and
       the loss is the cross-entropy mean over them.
    The selection is not differentiated (it runs on NumPy, as the official code's does).
    """

    def __init__(
        self, *, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100000, factor: int = 8
    ) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"thresh must be in (0, 1], got {thresh!r}")
        if not isinstance(min_kept, int) or min_kept < 0:
            raise ValueError(f"min_kept must be an int >= 0, got {min_kept!r}")
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an int >= 1, got {factor!r}")
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = min_kept
        self.factor = factor

    def threshold(self, probs: np.ndarray, target: np.ndarray) -> float:
        """The probability threshold from (B, C, H, W) float32 probabilities and (B, H, W) labels, found at
        1/factor resolution (step 1 of the class docstring)."""
        from scipy import ndimage

        zoom = 1.0 / self.factor
        small_probs = ndimage.zoom(probs, (1.0, 1.0, zoom, zoom), order=1)
        small_target = ndimage.zoom(target, (1.0, zoom, zoom), order=0)
        min_kept = self.min_kept // (self.factor * self.factor)
        labels = small_target.ravel()
        valid = labels != self.ignore_index
        num_valid = int(valid.sum())
        if min_kept >= num_valid:
            return 1.0
        classes = small_probs.shape[1]
        flat = np.moveaxis(small_probs, 1, 0).reshape(classes, -1)[:, valid]
        true_prob = flat[labels[valid], np.arange(num_valid)]
        threshold = self.thresh
        if min_kept > 0:
            kth = np.partition(true_prob, min_kept - 1)[min_kept - 1]
            if kth > self.thresh:
                threshold = float(kth)
        return threshold

    def kept_mask(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool: the pixels the loss is computed on."""
        _check_inputs(logits, target, self.ignore_index)
        with torch.no_grad():
            target = target.long()
            valid = target != self.ignore_index
            probs = torch.softmax(logits.detach().float(), dim=1)
            threshold = self.threshold(probs.cpu().numpy(), target.cpu().numpy().astype(np.int32))
            true_prob = probs.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
            return valid & (true_prob <= threshold)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = self.kept_mask(logits, target)
        return _mean_cross_entropy(
            logits, target.long().masked_fill(~kept, self.ignore_index), self.ignore_index
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, thresh={self.thresh}, min_kept={self.min_kept}, "
            f"factor={self.factor}"
        )


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
