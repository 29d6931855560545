"""Tests of models.losses: cross-entropy with ignore, OHEM on hand-made probabilities, decode + 0.4 aux."""

import math

import pytest
import torch
import torch.nn.functional as F

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
    ohem = OHEMCrossEntropy(ignore_index=IGNORE, thresh=thresh, min_kept=min_kept)
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
    ohem = SegLoss(decode_loss=OHEMCrossEntropy(min_kept=5))
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
