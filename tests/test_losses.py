"""Tests of models.losses: cross-entropy with ignore (averaged as each source averages it), OHEM on hand-made
probabilities and against the official OhemCrossEntropy2d restated, decode + 0.4 aux."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.losses import CrossEntropy, OHEMCrossEntropy, SegLoss

IGNORE = 255


def _two_class_logits(true_probs, labels):
    """(1, 2, 1, N) logits whose softmax gives each pixel's labelled class the probability in true_probs."""
    logits = torch.zeros(1, 2, 1, len(true_probs), dtype=torch.float64)
    for index, (p, label) in enumerate(zip(true_probs, labels, strict=True)):
        logits[0, label, 0, index] = math.log(p / (1 - p))
    return logits


# True-class probabilities of six pixels; the last one is ignored.
PROBS = [0.9, 0.8, 0.6, 0.5, 0.3, 0.4]
LABELS = [0, 1, 0, 1, 0, IGNORE]


def _example():
    labels_for_logits = [label if label != IGNORE else 0 for label in LABELS]
    logits = _two_class_logits(PROBS, labels_for_logits).requires_grad_()
    target = torch.tensor(LABELS).view(1, 1, -1)
    return logits, target


def _expected(kept_probs):
    return sum(-math.log(p) for p in kept_probs) / len(kept_probs)


def test_cross_entropy_ignores_label():
    logits, target = _example()
    loss = CrossEntropy(ignore_index=IGNORE)(logits, target)
    assert loss.item() == pytest.approx(_expected(PROBS[:5]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=IGNORE))


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = CrossEntropy()(logits, torch.full((1, 2, 2), IGNORE))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    "min_kept, thresh, kept",
    [
        # threshold 0.7 beats the 2nd smallest (0.5): pixels with p <= 0.7.
        (2, 0.7, [0.6, 0.5, 0.3]),
        # the 4th smallest valid p (0.8) is above 0.7: the threshold rises to it.
        (4, 0.7, [0.8, 0.6, 0.5, 0.3]),
        # fewer valid pixels (5) than min_kept: every valid pixel.
        (10, 0.7, [0.9, 0.8, 0.6, 0.5, 0.3]),
        (0, 0.55, [0.5, 0.3]),
    ],
)
def test_ohem_keeps_the_official_selection(min_kept, thresh, kept):
    logits, target = _example()
    # factor 1: the official selection without its 1/8 zoom, on exactly these probabilities.
    ohem = OHEMCrossEntropy(ignore_index=IGNORE, thresh=thresh, min_kept=min_kept, factor=1)
    mask = ohem.kept_mask(logits, target)
    expected_mask = [p in kept and label != IGNORE for p, label in zip(PROBS, LABELS, strict=True)]
    assert mask.view(-1).tolist() == expected_mask
    loss = ohem(logits, target)
    assert loss.item() == pytest.approx(_expected(kept))
    loss.backward()
    dropped = [not k for k in expected_mask]
    assert torch.all(logits.grad[..., torch.tensor(dropped)] == 0)


def test_ohem_with_all_pixels_hard_equals_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, :3] = IGNORE
    ohem = OHEMCrossEntropy(thresh=1.0, min_kept=1)
    torch.testing.assert_close(ohem(logits, target), CrossEntropy()(logits, target))


def test_seg_loss_adds_aux_with_weight():
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    ce = CrossEntropy()
    parts = SegLoss().parts((logits, aux), target)
    torch.testing.assert_close(parts["total"], ce(logits, target) + 0.4 * ce(aux, target))
    torch.testing.assert_close(SegLoss()((logits, None), target), ce(logits, target))
    torch.testing.assert_close(SegLoss()(logits, target), ce(logits, target))
    ohem = SegLoss(decode_loss=OHEMCrossEntropy(min_kept=5, factor=1))
    assert ohem((logits, aux), target).item() != pytest.approx(parts["total"].item())


def test_bad_inputs():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        CrossEntropy()(logits, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        CrossEntropy()(logits, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        CrossEntropy()(logits, torch.full((1, 4, 4), 7))
    with pytest.raises(ValueError, match="thresh"):
        OHEMCrossEntropy(thresh=0.0)
    with pytest.raises(ValueError, match="min_kept"):
        OHEMCrossEntropy(min_kept=-1)
    with pytest.raises(ValueError, match="factor"):
        OHEMCrossEntropy(factor=0)
    with pytest.raises(ValueError, match="average"):
        CrossEntropy(average="labelled")


def _ignore_30_percent(batch=2, classes=5, height=8, width=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, height, width, generator=generator, dtype=torch.float64)
    target = torch.randint(0, classes, (batch, height, width), generator=generator)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=generator)[: int(0.3 * flat.numel())]] = IGNORE
    return logits.requires_grad_(), target


def test_cross_entropy_averages_as_each_source():
    logits, target = _ignore_30_percent()
    valid = target != IGNORE
    assert valid.float().mean().item() == pytest.approx(0.7)
    # Per-pixel loss -log softmax(logits)[label], written out; ignored pixels contribute 0.
    log_probs = logits.detach() - torch.logsumexp(logits.detach(), dim=1, keepdim=True)
    per_pixel = -log_probs.gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1) * valid
    # mmsegmentation mmseg/models/losses/cross_entropy_loss.py line 62: avg_factor = label.numel()
    # (avg_non_ignore=False, the default every CCNet config keeps).
    mmseg = per_pixel.sum() / target.numel()
    # speedinghzl/CCNet utils/criterion.py: nn.CrossEntropyLoss(ignore_index=255), mean over labelled pixels;
    # sssegmentation crossentropyloss.py removes ignored pixels, then takes the mean.
    official = per_pixel.sum() / valid.sum()
    all_pixels = CrossEntropy(ignore_index=IGNORE, average="all_pixels")(logits, target)
    valid_pixels = CrossEntropy(ignore_index=IGNORE, average="valid_pixels")(logits, target)
    torch.testing.assert_close(all_pixels.detach(), mmseg, rtol=1e-6, atol=0)
    torch.testing.assert_close(valid_pixels.detach(), official, rtol=1e-6, atol=0)
    # Every gradient is 1 / 0.7 = 1.43 x larger when averaged over the labelled pixels only.
    (grad_all,) = torch.autograd.grad(all_pixels, logits)
    (grad_valid,) = torch.autograd.grad(valid_pixels, logits)
    torch.testing.assert_close(grad_valid, grad_all / 0.7, rtol=1e-6, atol=1e-12)


def _official_ohem(logits, target, *, thresh, min_kept, factor=8):
    """speedinghzl/CCNet utils/loss.py OhemCrossEntropy2d restated step by step (find_threshold,
    generate_new_target, forward): returns (loss, kept mask, threshold)."""
    probs = torch.softmax(logits.detach(), 1).numpy()
    labels = target.numpy()
    # find_threshold: probabilities zoomed to 1/8 with order 1, labels with order 0, min_kept // 64.
    small = ndimage.zoom(probs, (1.0, 1.0, 1.0 / factor, 1.0 / factor), order=1)
    small_labels = ndimage.zoom(labels, (1.0, 1.0 / factor, 1.0 / factor), order=0).ravel().astype(np.int32)
    kept_small = min_kept // (factor * factor)
    valid_small = small_labels != IGNORE
    if kept_small >= valid_small.sum():
        threshold = 1.0
    else:
        prob = np.rollaxis(small, 1).reshape(small.shape[1], -1)[:, valid_small]
        pred = prob[small_labels[valid_small], np.arange(valid_small.sum())]
        threshold = thresh
        if kept_small > 0:
            k = min(len(pred), kept_small) - 1
            if np.partition(pred, k)[k] > thresh:
                threshold = np.partition(pred, k)[k]
    # generate_new_target: full resolution, kept where the true-class probability <= threshold.
    flat_labels = labels.ravel().astype(np.int32)
    valid = flat_labels != IGNORE
    prob = np.rollaxis(probs, 1).reshape(probs.shape[1], -1)[:, valid]
    pred = prob[flat_labels[valid], np.arange(valid.sum())]
    kept = np.zeros_like(valid)
    kept[np.where(valid)[0][pred <= threshold]] = True
    new_target = torch.from_numpy(np.where(kept, flat_labels, IGNORE).reshape(labels.shape)).long()
    loss = F.cross_entropy(logits, new_target, ignore_index=IGNORE)
    return loss, torch.from_numpy(kept.reshape(labels.shape)), threshold


@pytest.mark.parametrize(
    ("confidence", "min_kept", "branch"),
    [
        (0.0, 100000, "all"),  # min_kept // 64 >= valid pixels at 1/8: every valid pixel is kept
        (0.0, 64 * 100, "thresh"),  # early in training: most probabilities are below 0.7
        (6.0, 64 * 400, "raised"),  # late in training: the threshold rises above 0.7
    ],
)
def test_ohem_matches_the_official_rule(confidence, min_kept, branch):
    generator = torch.Generator().manual_seed(1)
    batch, classes, size = 2, 19, 131
    target = torch.randint(0, classes, (batch, size, size), generator=generator)
    target[:, :20, :] = IGNORE  # a band of ignored pixels (padding)
    logits = torch.randn(batch, classes, size, size, generator=generator)
    logits += confidence * F.one_hot(target.clamp(max=classes - 1), classes).permute(0, 3, 1, 2)
    expected_loss, expected_kept, threshold = _official_ohem(logits, target, thresh=0.7, min_kept=min_kept)
    ohem = OHEMCrossEntropy(ignore_index=IGNORE, thresh=0.7, min_kept=min_kept)
    kept = ohem.kept_mask(logits, target)
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(ohem(logits, target), expected_loss, rtol=1e-6, atol=0)
    if branch == "all":
        assert threshold == 1.0 and torch.equal(kept, target != IGNORE)
    elif branch == "thresh":
        assert threshold == 0.7
    else:
        assert threshold > 0.7
        # The full-resolution rule the project used before kept exactly min_kept pixels: the official one
        # keeps a different number, because its threshold comes from the 1/8 zoom.
        assert int(kept.sum()) != min_kept
