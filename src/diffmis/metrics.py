"""Segmentation metrics: overlap, surface distance, calibration and the authors' lenient protocol.

Everything here works on one-hot tensors ``(B, K, *spatial)`` (2D or 3D) so that the same code serves
training-time validation (:func:`dice_batch`, on any device) and folder evaluation
(:func:`segmentation_metrics`, per case and per class). Per-case scores come from MONAI (``compute_dice``,
``compute_iou``, ``compute_hausdorff_distance`` with ``percentile=95``, ``compute_average_surface_distance``);
:func:`dice_batch` is a vectorised equivalent of the Dice for training. This module adds what MONAI leaves
to the caller:

- **Empty masks** follow :data:`EMPTY_MASK_CONVENTIONS`, applied explicitly rather than inherited from
  MONAI defaults (which differ between metrics and versions).
- **Field of view**: with ``fov`` given, both masks are restricted to it before anything is computed, so
  pixels outside the FOV count neither for overlap nor for surface distances (DRIVE protocol).
- **Spacing**: distances are in physical units (``spacing`` per spatial axis); the default is 1 per axis.
- **Calibration**: reliability bins and expected calibration error (ECE) of probability maps.
- **The lenient multi-threshold protocol** of the MedSegDiff code (METHODS.md 2.6), only under its own
  name :func:`lenient_multithreshold`; it is never what ``Dice`` means elsewhere in diffmis.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou

from diffmis.errors import InputError

__all__ = [
    "EMPTY_MASK_CONVENTIONS",
    "LENIENT_THRESHOLDS",
    "Spacing",
    "dice_batch",
    "iou_batch",
    "image_diagonal",
    "SegmentationScores",
    "segmentation_metrics",
    "ReliabilityBins",
    "reliability_bins",
    "Calibration",
    "calibration",
    "LenientScores",
    "lenient_multithreshold",
    "error_detection_auroc",
]

Spacing = Optional[Union[float, Sequence[float]]]

EMPTY_MASK_CONVENTIONS = (
    "Per case and class, with T the reference and P the prediction (both restricted to the FOV when one is "
    "given): T and P both empty -> Dice = IoU = 1, HD95 = ASSD = 0. Exactly one of T, P empty -> Dice = IoU = 0, "
    "HD95 = ASSD = the image diagonal (largest distance between two pixel/voxel centres, in spacing units), "
    "the worst possible value, so that missing or spurious structures are penalised and means stay defined. "
    "A missing prediction file counts as a failure: Dice = IoU = 0 and HD95 = ASSD = the diagonal for every class."
)

LENIENT_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


# ---------------------------------------------------------------- shapes and helpers


def _check_pair(pred: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if pred.shape != ref.shape:
        raise InputError(f"{what}: prediction shape {tuple(pred.shape)} != reference shape {tuple(ref.shape)}")
    if pred.ndim < 3:
        raise InputError(f"{what}: expected (B, K, *spatial) tensors, got shape {tuple(pred.shape)}")


def _fov_bool(fov: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Return ``fov`` as a bool tensor broadcastable to ``like`` ``(B, K, *spatial)``, or None."""
    if fov is None:
        return None
    fov = fov.to(device=like.device).bool()
    if fov.ndim != like.ndim or fov.shape[0] not in (1, like.shape[0]) or fov.shape[1] != 1:
        raise InputError(f"fov: expected shape (B, 1, *spatial) for masks {tuple(like.shape)}, got {tuple(fov.shape)}")
    if fov.shape[2:] != like.shape[2:]:
        raise InputError(f"fov: spatial shape {tuple(fov.shape[2:])} != mask spatial shape {tuple(like.shape[2:])}")
    return fov


def _spacing_tuple(spacing: Spacing, n_spatial: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * n_spatial
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * n_spatial
    values = tuple(float(s) for s in spacing)
    if len(values) != n_spatial:
        raise InputError(f"spacing: {len(values)} values given for {n_spatial} spatial axes")
    if any(not s > 0 for s in values):
        raise InputError(f"spacing: values must be positive, got {values}")
    return values


def image_diagonal(spatial_shape: Sequence[int], spacing: Spacing = None) -> float:
    """Largest distance between two pixel (voxel) centres of a grid, in spacing units.

    Args:
        spatial_shape: grid size per spatial axis.
        spacing: physical size of a pixel per axis (a scalar means isotropic); default 1.

    Returns:
        ``sqrt(sum(((n_i - 1) * s_i) ** 2))``; the value given to HD95/ASSD when exactly one mask is empty.
    """
    sp = _spacing_tuple(spacing, len(spatial_shape))
    return math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(spatial_shape, sp)))


# ---------------------------------------------------------------- overlap


def _empty_flags(pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred_empty, ref_empty)``, each ``(B, K)`` bool, for bool masks ``(B, K, *spatial)``."""
    return ~pred.flatten(2).any(-1), ~ref.flatten(2).any(-1)


def _restrict(
    pred_onehot: torch.Tensor, ref_onehot: torch.Tensor, fov: Optional[torch.Tensor], what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both masks as bool, restricted to the FOV when one is given."""
    _check_pair(pred_onehot, ref_onehot, what)
    pred, ref = pred_onehot.bool(), ref_onehot.bool()
    f = _fov_bool(fov, pred)
    if f is not None:
        pred, ref = pred & f, ref & f
    return pred, ref


def _with_empty_conventions(score: torch.Tensor, pred_empty: torch.Tensor, ref_empty: torch.Tensor) -> torch.Tensor:
    """Set overlap scores of empty masks: both empty -> 1, exactly one empty -> 0 (not left to MONAI defaults)."""
    score = torch.where(pred_empty & ref_empty, torch.ones_like(score), score)
    return torch.where(pred_empty ^ ref_empty, torch.zeros_like(score), score)


def _dice_iou(pred: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Three reductions for the whole batch: MONAI's compute_dice loops over images and channels in Python
    # with a device sync each, too slow for validation during training.
    inter = (pred & ref).flatten(2).sum(-1).to(dtype)
    p_sum = pred.flatten(2).sum(-1).to(dtype)
    r_sum = ref.flatten(2).sum(-1).to(dtype)
    dice = 2.0 * inter / (p_sum + r_sum).clamp_min(1.0)
    iou = inter / (p_sum + r_sum - inter).clamp_min(1.0)
    pred_empty, ref_empty = p_sum == 0, r_sum == 0
    return _with_empty_conventions(dice, pred_empty, ref_empty), _with_empty_conventions(iou, pred_empty, ref_empty)


def dice_batch(
    pred_onehot: torch.Tensor, ref_onehot: torch.Tensor, fov: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dice per image and channel, vectorised on any device, for validation during training.

    Gives the same values as :func:`segmentation_metrics` (which goes through MONAI) in a few reductions.

    Args:
        pred_onehot: ``(B, K, *spatial)`` hard prediction in {0, 1} (float or bool).
        ref_onehot: ``(B, K, *spatial)`` reference in {0, 1}.
        fov: optional ``(B, 1, *spatial)`` field-of-view mask; only pixels inside it count.

    Returns:
        ``(B, K)`` float32 Dice on the inputs' device; both masks empty -> 1, exactly one empty -> 0.
    """
    pred, ref = _restrict(pred_onehot, ref_onehot, fov, "dice_batch")
    return _dice_iou(pred, ref, torch.float32)[0]


def iou_batch(
    pred_onehot: torch.Tensor, ref_onehot: torch.Tensor, fov: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """IoU (Jaccard) per image and channel with the same arguments and conventions as :func:`dice_batch`."""
    pred, ref = _restrict(pred_onehot, ref_onehot, fov, "iou_batch")
    return _dice_iou(pred, ref, torch.float32)[1]


# ---------------------------------------------------------------- surface distances


@dataclass(frozen=True)
class SegmentationScores:
    """Per-case, per-class metrics; every field is ``(B, K)``.

    Attributes:
        dice: Dice coefficient in [0, 1].
        iou: intersection over union in [0, 1].
        hd95: symmetric 95th-percentile Hausdorff distance, in spacing units.
        assd: average symmetric surface distance, in spacing units.
        ref_empty: the reference channel is empty (inside the FOV).
        pred_empty: the predicted channel is empty (inside the FOV).
    """

    dice: torch.Tensor
    iou: torch.Tensor
    hd95: torch.Tensor
    assd: torch.Tensor
    ref_empty: torch.Tensor
    pred_empty: torch.Tensor


def segmentation_metrics(
    pred_onehot: torch.Tensor,
    ref_onehot: torch.Tensor,
    *,
    spacing: Spacing = None,
    fov: Optional[torch.Tensor] = None,
) -> SegmentationScores:
    """Dice, IoU, HD95 and ASSD per case and class (2D or 3D), with :data:`EMPTY_MASK_CONVENTIONS`.

    Args:
        pred_onehot: ``(B, K, *spatial)`` hard prediction in {0, 1}; each channel is scored on its own.
        ref_onehot: ``(B, K, *spatial)`` reference in {0, 1}.
        spacing: pixel/voxel size per spatial axis (scalar = isotropic); distances are in its unit.
        fov: optional ``(B, 1, *spatial)`` field-of-view mask; both masks are restricted to it first, so
            overlap and surface distances only see pixels inside it.

    Returns:
        :class:`SegmentationScores` on the CPU, float64 scores.
    """
    pred, ref = _restrict(
        pred_onehot.cpu(), ref_onehot.cpu(), None if fov is None else fov.cpu(), "segmentation_metrics"
    )
    sp = _spacing_tuple(spacing, pred.ndim - 2)
    pred_empty, ref_empty = _empty_flags(pred, ref)
    p64, r64 = pred.double(), ref.double()
    dice = compute_dice(p64, r64, include_background=True, ignore_empty=False).double()
    iou = compute_iou(p64, r64, include_background=True, ignore_empty=False).double()
    dice = _with_empty_conventions(dice, pred_empty, ref_empty)
    iou = _with_empty_conventions(iou, pred_empty, ref_empty)
    diagonal = image_diagonal(pred.shape[2:], sp)
    # Both empty -> 0; exactly one empty -> the diagonal; the rest is filled below.
    hd95 = torch.full(pred_empty.shape, diagonal, dtype=torch.float64)
    hd95[pred_empty & ref_empty] = 0.0
    assd = hd95.clone()
    both = (~pred_empty) & (~ref_empty)
    for b, k in both.nonzero().tolist():
        p, r = pred[b : b + 1, k : k + 1].float(), ref[b : b + 1, k : k + 1].float()
        with warnings.catch_warnings():
            # MONAI calls one of its own deprecated arguments internally (monai 1.5-1.6).
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd95[b, k] = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=sp))
            assd[b, k] = float(
                compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=sp)
            )
    return SegmentationScores(dice=dice, iou=iou, hd95=hd95, assd=assd, ref_empty=ref_empty, pred_empty=pred_empty)


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBins:
    """Sufficient statistics of a reliability diagram; bins of equal width over [0, 1].

    Bin ``i`` holds confidences in ``(i / n, (i + 1) / n]`` (bin 0 also holds 0). Bins from several cases
    :meth:`merge` into pooled statistics.

    Attributes:
        counts: ``(n_bins,)`` int64 number of pixels per bin.
        confidence_sum: ``(n_bins,)`` float64 sum of confidences per bin.
        accuracy_sum: ``(n_bins,)`` float64 number of correct pixels per bin.
    """

    counts: np.ndarray
    confidence_sum: np.ndarray
    accuracy_sum: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def edges(self) -> np.ndarray:
        """``(n_bins + 1,)`` bin edges from 0 to 1."""
        return np.linspace(0.0, 1.0, self.n_bins + 1)

    @property
    def confidence(self) -> np.ndarray:
        """Mean confidence per bin; NaN for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.confidence_sum / self.counts, np.nan)

    @property
    def accuracy(self) -> np.ndarray:
        """Fraction of correct pixels per bin; NaN for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.accuracy_sum / self.counts, np.nan)

    @property
    def ece(self) -> float:
        """Expected calibration error ``sum_i n_i / N * |acc_i - conf_i|``; NaN when there are no pixels."""
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        gap = np.abs(self.accuracy_sum - self.confidence_sum)  # = n_i * |acc_i - conf_i|
        return float(gap.sum() / total)

    def merge(self, other: "ReliabilityBins") -> "ReliabilityBins":
        """Pool the pixels of two sets of bins with the same number of bins."""
        if other.n_bins != self.n_bins:
            raise InputError(f"cannot merge reliability bins: {self.n_bins} bins vs {other.n_bins}")
        return ReliabilityBins(
            self.counts + other.counts,
            self.confidence_sum + other.confidence_sum,
            self.accuracy_sum + other.accuracy_sum,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready lists (empty bins give NaN confidence/accuracy)."""
        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "confidence": self.confidence.tolist(),
            "accuracy": self.accuracy.tolist(),
            "ece": self.ece,
        }


def reliability_bins(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 10, mask: Optional[torch.Tensor] = None
) -> ReliabilityBins:
    """Bin confidences and count how often the corresponding event was right.

    Args:
        confidence: any shape, values in [0, 1].
        correct: same shape, {0, 1} or bool: whether the event the confidence refers to happened.
        n_bins: number of equal-width bins over [0, 1].
        mask: optional bool tensor of the same shape; only pixels where it is true are counted.

    Returns:
        :class:`ReliabilityBins`.
    """
    if confidence.shape != correct.shape:
        raise InputError(f"reliability_bins: confidence {tuple(confidence.shape)} != correct {tuple(correct.shape)}")
    if n_bins < 1:
        raise InputError(f"reliability_bins: n_bins must be >= 1, got {n_bins}")
    conf = confidence.detach().double().cpu().flatten()
    ok = correct.detach().double().cpu().flatten()
    if mask is not None:
        keep = mask.detach().bool().cpu().flatten()
        conf, ok = conf[keep], ok[keep]
    if conf.numel() and (float(conf.min()) < 0.0 or float(conf.max()) > 1.0):
        raise InputError(
            f"reliability_bins: confidences must lie in [0, 1], got {float(conf.min())}..{float(conf.max())}"
        )
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    idx = torch.bucketize(conf, inner, right=False)  # x in (e_i, e_{i+1}] -> i
    counts = torch.bincount(idx, minlength=n_bins).numpy().astype(np.int64)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf).numpy()
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, ok).numpy()
    return ReliabilityBins(counts, conf_sum, acc_sum)


@dataclass(frozen=True)
class Calibration:
    """Calibration of one probability map (or of several, after :meth:`merge`).

    Attributes:
        per_class: one :class:`ReliabilityBins` per probability channel: confidence ``p_k``, event
            "the reference label is k" (class-wise calibration).
        top_label: confidence of the predicted label, event "the predicted label is right". For K = 1 the
            prediction is ``p > 0.5`` with confidence ``max(p, 1 - p)``; for K > 1 it is the argmax of the
            channels renormalised to sum to 1, with that renormalised probability as confidence.
    """

    per_class: list[ReliabilityBins]
    top_label: ReliabilityBins

    def merge(self, other: "Calibration") -> "Calibration":
        """Pool the pixels of two calibrations with the same channels."""
        if len(other.per_class) != len(self.per_class):
            raise InputError(f"cannot merge calibrations of {len(self.per_class)} and {len(other.per_class)} channels")
        return Calibration(
            [a.merge(b) for a, b in zip(self.per_class, other.per_class)], self.top_label.merge(other.top_label)
        )


def calibration(
    prob: torch.Tensor, ref_onehot: torch.Tensor, *, n_bins: int = 10, fov: Optional[torch.Tensor] = None
) -> Calibration:
    """Reliability bins and ECE of one probability map.

    Args:
        prob: ``(K, *spatial)`` probabilities in [0, 1]. K = 1: foreground probability of a binary task;
            K > 1: one channel per label, channel 0 = background.
        ref_onehot: ``(K, *spatial)`` reference in {0, 1}, channels matching ``prob`` (for K = 1 the
            foreground channel only).
        n_bins: number of equal-width confidence bins.
        fov: optional ``(1, *spatial)`` field-of-view mask; only pixels inside it count.

    Returns:
        :class:`Calibration` with class-wise and top-label bins.
    """
    if prob.shape != ref_onehot.shape:
        raise InputError(
            f"calibration: probability shape {tuple(prob.shape)} != reference shape {tuple(ref_onehot.shape)}"
        )
    prob = prob.detach().double().cpu()
    ref = ref_onehot.detach().bool().cpu()
    inside = None
    if fov is not None:
        if tuple(fov.shape) != (1, *prob.shape[1:]):
            raise InputError(f"calibration: fov shape {tuple(fov.shape)} != (1, *spatial) = {(1, *prob.shape[1:])}")
        inside = fov.detach().bool().cpu()[0]
    per_class = [reliability_bins(prob[k], ref[k], n_bins, inside) for k in range(prob.shape[0])]
    if prob.shape[0] == 1:
        p = prob[0]
        conf, correct = torch.maximum(p, 1.0 - p), (p > 0.5) == ref[0]
    else:
        total = prob.sum(0, keepdim=True)
        norm = torch.where(total > 0, prob / total.clamp_min(1e-12), torch.full_like(prob, 1.0 / prob.shape[0]))
        conf, label = norm.max(0)
        correct = ref.gather(0, label.unsqueeze(0))[0]
    top = reliability_bins(conf, correct, n_bins, inside)
    return Calibration(per_class, top)


# ---------------------------------------------------------------- uncertainty as an error detector


def error_detection_auroc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """AUROC of a per-pixel uncertainty for predicting the per-pixel error (Mann-Whitney, ties counted half).

    Args:
        uncertainty: uncertainty values of the pixels (any shape, flattened).
        error: same shape, bool: whether the prediction is wrong at that pixel.

    Returns:
        The probability that a wrong pixel has a higher uncertainty than a right one (0.5: no information);
        NaN when every pixel is right or every pixel is wrong.
    """
    from scipy.stats import rankdata

    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    e = np.asarray(error, dtype=bool).ravel()
    if u.shape != e.shape:
        raise InputError(f"error_detection_auroc: uncertainty {u.shape} and error {e.shape} differ in size")
    n_err = int(e.sum())
    n_ok = e.size - n_err
    if n_err == 0 or n_ok == 0:
        return math.nan
    ranks = rankdata(u)  # average ranks for ties
    return float((ranks[e].sum() - n_err * (n_err + 1) / 2.0) / (n_err * n_ok))


# ---------------------------------------------------------------- lenient protocol (METHODS.md 2.6)


@dataclass(frozen=True)
class LenientScores:
    """Scores of :func:`lenient_multithreshold`; fields ``(B, K)`` float64.

    Attributes:
        dice: Dice averaged over the thresholds.
        iou: IoU averaged over the thresholds.
        thresholds: the thresholds used.
    """

    dice: torch.Tensor
    iou: torch.Tensor
    thresholds: tuple[float, ...]


def lenient_multithreshold(
    prob: torch.Tensor,
    ref_onehot: torch.Tensor,
    *,
    thresholds: Sequence[float] = LENIENT_THRESHOLDS,
    fov: Optional[torch.Tensor] = None,
) -> LenientScores:
    """The MedSegDiff authors' evaluation (``scripts/segmentation_env.py``, METHODS.md 2.6); lenient.

    Each probability channel of each image is divided by its own maximum (so even a faint map reaches 1),
    thresholded at every value of ``thresholds``, scored with Dice and IoU, and the scores are averaged over
    the thresholds. This is not comparable with a fixed 0.5 threshold and is never diffmis's default; use it
    only to compare with numbers published under that protocol. The authors also resize the reference to
    256x256; here the reference is used at its own size.

    Args:
        prob: ``(B, K, *spatial)`` probabilities in [0, 1].
        ref_onehot: ``(B, K, *spatial)`` reference in {0, 1}.
        thresholds: thresholds applied after normalisation (strict ``>``).
        fov: optional ``(B, 1, *spatial)`` field-of-view mask; probabilities outside it are zeroed before the
            normalisation and pixels outside it do not count.

    Returns:
        :class:`LenientScores`, empty-mask conventions as :func:`dice_batch`.
    """
    _check_pair(prob, ref_onehot, "lenient_multithreshold")
    p = prob.detach().double().cpu()
    ref = ref_onehot.bool().cpu()
    f = _fov_bool(None if fov is None else fov.cpu(), p)
    if f is not None:  # zero outside the FOV: then ``p > t`` is false there too
        p, ref = p * f, ref & f
    peak = p.flatten(2).amax(-1).view(*p.shape[:2], *([1] * (p.ndim - 2)))
    p = torch.where(peak > 0, p / peak.clamp_min(1e-12), p)  # per-image, per-channel max normalisation
    dice = torch.zeros(p.shape[:2], dtype=torch.float64)
    iou = torch.zeros_like(dice)
    for t in thresholds:
        hard_dice, hard_iou = _dice_iou(p > t, ref, torch.float64)
        dice += hard_dice
        iou += hard_iou
    n = len(thresholds)
    return LenientScores(dice=dice / n, iou=iou / n, thresholds=tuple(float(t) for t in thresholds))
