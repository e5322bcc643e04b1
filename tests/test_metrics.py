"""Metrics against hand-computed values on toy masks; empty-mask conventions; FOV; calibration; lenient protocol."""

import math

import numpy as np
import pytest
import torch

from diffmis.errors import InputError
from diffmis.masks import one_hot
from diffmis.metrics import (
    LENIENT_THRESHOLDS,
    calibration,
    dice_batch,
    image_diagonal,
    iou_batch,
    lenient_multithreshold,
    reliability_bins,
    segmentation_metrics,
)


def square(size=32, top=4, left=4, side=10):
    m = torch.zeros(1, 1, size, size)
    m[..., top : top + side, left : left + side] = 1
    return m


def test_shifted_square_hand_computed():
    # Two 10x10 squares, the prediction shifted 2 columns right.
    # Overlap 10 x 8 = 80: Dice = 2*80 / 200 = 0.8, IoU = 80 / 120 = 2/3.
    # Boundary pixels (36 each). Prediction -> reference: the 8 shared top and 8 shared bottom pixels are at 0,
    # the 2 + 2 overhanging top/bottom pixels at 1 and 2, the left column (inside the reference) at
    # min(2, distance to the top/bottom edge) = 1, 2, 2, 2, 2, 2, 2, 1, the right column at 2 (8 pixels).
    # That is 16 zeros, 4 ones and 16 twos; the reverse direction is the mirror image.
    # HD95 = 95th percentile = 2; ASSD = (4 * 1 + 16 * 2) / 36 = 1.
    ref, pred = square(), square(left=6)
    s = segmentation_metrics(pred, ref)
    assert s.dice.item() == pytest.approx(0.8)
    assert s.iou.item() == pytest.approx(2 / 3)
    assert s.hd95.item() == pytest.approx(2.0)
    assert s.assd.item() == pytest.approx(1.0)
    assert dice_batch(pred, ref).item() == pytest.approx(0.8)
    assert iou_batch(pred, ref).item() == pytest.approx(2 / 3)


def test_parallel_lines_with_anisotropic_spacing():
    # One-pixel lines 3 rows apart: every boundary pixel is 3 rows from the other line.
    # With 2 units per row the distance is 6, for all pixels: HD95 = ASSD = 6.
    ref = torch.zeros(1, 1, 20, 20)
    pred = torch.zeros(1, 1, 20, 20)
    ref[0, 0, 5, 3:15] = 1
    pred[0, 0, 8, 3:15] = 1
    s = segmentation_metrics(pred, ref, spacing=(2.0, 1.0))
    assert s.hd95.item() == pytest.approx(6.0)
    assert s.assd.item() == pytest.approx(6.0)
    assert s.dice.item() == 0.0


def test_3d_sheets_with_anisotropic_spacing():
    ref = torch.zeros(1, 1, 12, 12, 8)
    pred = torch.zeros(1, 1, 12, 12, 8)
    ref[0, 0, 2:10, 2:10, 2] = 1
    pred[0, 0, 2:10, 2:10, 4] = 1
    s = segmentation_metrics(pred, ref, spacing=(0.5, 0.5, 2.5))  # two slices of 2.5 apart -> 5
    assert s.hd95.item() == pytest.approx(5.0)
    assert s.assd.item() == pytest.approx(5.0)


def test_empty_mask_conventions():
    empty = torch.zeros(1, 1, 32, 32)
    full = square()
    diag = math.sqrt((31 * 2.0) ** 2 + 31**2)
    assert image_diagonal((32, 32), (2.0, 1.0)) == pytest.approx(diag)

    both = segmentation_metrics(empty, empty, spacing=(2.0, 1.0))
    assert (both.dice.item(), both.iou.item(), both.hd95.item(), both.assd.item()) == (1.0, 1.0, 0.0, 0.0)
    for pred, ref in ((full, empty), (empty, full)):
        one = segmentation_metrics(pred, ref, spacing=(2.0, 1.0))
        assert (one.dice.item(), one.iou.item()) == (0.0, 0.0)
        assert one.hd95.item() == pytest.approx(diag) and one.assd.item() == pytest.approx(diag)
        assert dice_batch(pred, ref).item() == 0.0
    assert dice_batch(empty, empty).item() == 1.0 and iou_batch(empty, empty).item() == 1.0


def test_fov_restricts_overlap_and_distances():
    ref = square()
    pred = square()
    pred[0, 0, 28:31, 28:31] = 1  # a false positive in the corner
    fov = torch.ones(1, 1, 32, 32)
    fov[..., 25:, 25:] = 0  # ... outside the field of view
    inside = segmentation_metrics(pred, ref, fov=fov)
    assert inside.dice.item() == 1.0 and inside.hd95.item() == 0.0 and inside.assd.item() == 0.0
    outside = segmentation_metrics(pred, ref)
    assert outside.dice.item() == pytest.approx(200 / 209)
    assert outside.hd95.item() > 10
    assert dice_batch(pred, ref, fov).item() == 1.0


def test_dice_batch_matches_monai_path_per_class():
    g = torch.Generator().manual_seed(0)
    labels_p = torch.randint(0, 3, (3, 16, 16), generator=g)
    labels_r = torch.randint(0, 3, (3, 16, 16), generator=g)
    labels_p[2] = 0  # image 2 has no foreground predicted
    p, r = one_hot(labels_p, 3, check=True).bool(), one_hot(labels_r, 3, check=True).bool()
    assert p.shape == (3, 3, 16, 16) and p.dtype == torch.bool
    fast = dice_batch(p, r)
    assert fast.shape == (3, 3) and fast.dtype == torch.float32
    ref_scores = segmentation_metrics(p, r)
    assert torch.allclose(fast.double(), ref_scores.dice, atol=1e-6)
    assert torch.allclose(iou_batch(p, r).double(), ref_scores.iou, atol=1e-6)
    assert bool(ref_scores.pred_empty[2, 1]) and ref_scores.dice[2, 1].item() == 0.0


def test_shape_errors_name_the_problem():
    with pytest.raises(InputError, match="prediction shape"):
        dice_batch(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(InputError, match="outside 0..1"):
        one_hot(torch.tensor([[0, 2]]), 2, check=True)
    with pytest.raises(InputError, match="spacing"):
        segmentation_metrics(square(), square(), spacing=(1.0, 1.0, 1.0))


def test_ece_hand_computed_binary():
    # Four pixels: p = 0.85, 0.85, 0.15, 0.15; truth = 1, 0, 0, 0; 10 bins.
    # Class-wise: bin (0.8, 0.9]: conf 0.85, acc 1/2 -> 2/4 * 0.35; bin (0.1, 0.2]: conf 0.15, acc 0 -> 2/4 * 0.15.
    # ECE = 0.175 + 0.075 = 0.25.
    # Top label: prediction p > 0.5 = 1, 1, 0, 0 with confidence 0.85 everywhere; 3 of 4 right.
    # ECE = |0.75 - 0.85| = 0.1.
    prob = torch.tensor([[0.85, 0.85, 0.15, 0.15]])
    ref = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    cal = calibration(prob, ref, n_bins=10)
    assert cal.per_class[0].ece == pytest.approx(0.25)
    assert cal.top_label.ece == pytest.approx(0.1)
    bins = cal.per_class[0]
    assert bins.counts.tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 2, 0]
    assert bins.confidence[8] == pytest.approx(0.85) and bins.accuracy[8] == pytest.approx(0.5)
    assert np.isnan(bins.accuracy[0])
    d = bins.to_dict()
    assert len(d["edges"]) == 11 and d["ece"] == pytest.approx(0.25)


def test_ece_multiclass_fov_and_merge():
    # Three classes, two pixels inside the FOV, one outside (ignored).
    prob = torch.tensor([[0.7, 0.2, 0.3], [0.2, 0.55, 0.3], [0.1, 0.25, 0.4]])  # (K=3, N=3)
    labels = torch.tensor([[0, 2, 2]])
    ref = one_hot(labels, 3, check=True).bool()[0]
    fov = torch.tensor([[1, 1, 0]])
    cal = calibration(prob, ref, n_bins=5, fov=fov)
    # Top label: pixel 0 -> class 0 (0.7, right), pixel 1 -> class 1 (0.55, wrong).
    # Bins of width 0.2: 0.55 -> (0.4, 0.6], 0.7 -> (0.6, 0.8]; ECE = (|1 - 0.7| + |0 - 0.55|) / 2 = 0.425.
    assert cal.top_label.ece == pytest.approx(0.425)
    assert int(cal.top_label.counts.sum()) == 2
    pooled = cal.merge(cal)
    assert pooled.top_label.ece == pytest.approx(0.425)
    assert int(pooled.per_class[2].counts.sum()) == 4
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        reliability_bins(torch.tensor([1.5]), torch.tensor([1.0]))


def test_lenient_multithreshold_known_example():
    # p = 0.4, 0.24, 0.1, 0 -> divided by its max 0.4: 1, 0.6, 0.25, 0; truth = 1, 1, 0, 0.
    # t = 0.1: 3 pixels -> Dice 0.8, IoU 2/3; t = 0.3, 0.5: 2 pixels -> 1, 1; t = 0.7, 0.9: 1 pixel -> 2/3, 1/2.
    prob = torch.tensor([0.4, 0.24, 0.1, 0.0]).view(1, 1, 4)
    ref = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    s = lenient_multithreshold(prob, ref)
    assert s.thresholds == LENIENT_THRESHOLDS
    assert s.dice.item() == pytest.approx((0.8 + 1 + 1 + 2 / 3 + 2 / 3) / 5)
    assert s.iou.item() == pytest.approx((2 / 3 + 1 + 1 + 0.5 + 0.5) / 5)
    # The same map under the default protocol (threshold 0.5, no normalisation) predicts nothing: Dice 0.
    assert dice_batch(prob > 0.5, ref).item() == 0.0


def test_lenient_normalises_each_channel_and_respects_fov():
    prob = torch.zeros(1, 2, 8, 8)
    prob[0, 0, :4] = 0.2  # faint channel: normalised to 1
    prob[0, 1, 4:] = 0.9
    prob[0, 1, 0, 0] = 0.95  # bright false positive outside the FOV
    ref = torch.zeros(1, 2, 8, 8)
    ref[0, 0, :4] = 1
    ref[0, 1, 4:] = 1
    fov = torch.ones(1, 1, 8, 8)
    fov[0, 0, 0, 0] = 0
    s = lenient_multithreshold(prob, ref, fov=fov)
    assert torch.allclose(s.dice, torch.ones(1, 2, dtype=torch.float64))
