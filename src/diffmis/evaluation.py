"""Metrics over folders: pair predictions with references by file stem, score every case and class.

:func:`evaluate_folders` reads hard label maps (PNG/TIFF/BMP/GIF images, or NIfTI volumes scored in 3D with
the voxel spacing of the reference header), scores them with :mod:`diffmis.metrics` and returns an
:class:`EvaluationResult` that writes an nnU-Net-like ``summary.json`` and a per-case CSV. The format and the
conventions are documented in ``docs/evaluation.md``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from diffmis.data import IMAGE_SUFFIXES, LABEL_SUFFIXES, file_stem, read_label_map
from diffmis.errors import DataError, InputError
from diffmis.masks import one_hot
from diffmis.metrics import (
    EMPTY_MASK_CONVENTIONS,
    LENIENT_THRESHOLDS,
    Calibration,
    calibration,
    error_detection_auroc,
    image_diagonal,
    lenient_multithreshold,
    segmentation_metrics,
)
from diffmis.utils import atomic_write_text, write_json

__all__ = [
    "METRICS",
    "index_files",
    "read_scored_labels",
    "CaseResult",
    "EvaluationResult",
    "evaluate_folders",
]

PathLike = Union[str, Path]

METRICS: tuple[str, ...] = ("Dice", "IoU", "HD95", "ASSD")

LENIENT_NOTE = (
    "Dice_lenient / IoU_lenient: the MedSegDiff authors' protocol (scripts/segmentation_env.py): each probability "
    "map divided by its own maximum, thresholded at {thresholds}, Dice/IoU averaged over the thresholds. Lenient; "
    "not comparable with Dice/IoU of the hard masks."
)


# ---------------------------------------------------------------- files


def index_files(folder: PathLike, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """Map file stem -> path for the files of ``folder`` whose name ends with one of ``suffixes``.

    Args:
        folder: the folder to list (not recursive; hidden files are skipped).
        suffixes: accepted file endings, e.g. ``(".png", ".nii.gz")``.
        what: what the folder holds, for error messages ("prediction", "reference", ...).

    Raises:
        InputError: ``folder`` is not a directory.
        DataError: two files share a stem (e.g. ``a.png`` and ``a.tif``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = file_stem(path, suffixes)
        if stem is None:
            continue
        if stem in found:
            raise DataError(f"two {what} files share the stem '{stem}': {found[stem]} and {path}")
        found[stem] = path
    return found


def read_scored_labels(path: PathLike) -> tuple[np.ndarray, Optional[tuple[float, ...]]]:
    """A mask file as it is scored: :func:`diffmis.data.read_label_map`, except that a file whose values are all
    in {0, 255} is a binary mask and becomes {0, 1} (any other file is a label map 0..K-1 as stored).

    Returns:
        ``(labels, spacing)``: int64 ``(H, W)`` or ``(X, Y, Z)``, and the NIfTI voxel size (None for 2D files).

    Raises:
        DataError: the file cannot be read, is not a label map, or holds negative values.
    """
    labels, spacing = read_label_map(path)
    values = np.unique(labels)
    if 255 in values and set(values.tolist()) <= {0, 255}:
        labels = (labels == 255).astype(np.int64)
    return labels, spacing


def _read_npy(path: Path, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several unrelated types for corrupt files
        raise DataError(f"cannot read {what} file {path}: {err}") from err
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{path}: {what} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


# ---------------------------------------------------------------- results


def convention(kinds: set[str], spacing_given: bool) -> str:
    """One sentence naming how the cases were scored (``docs/evaluation.md``, "Per image or per volume")."""
    unit = "the given spacing" if spacing_given else None
    if kinds == {"volume"}:
        return ("per volume: each NIfTI case is one 3D score (slice-wise predictions reassembled into their "
                f"volume), distances in mm from {unit or 'the reference header spacing'}")
    if kinds == {"image"}:
        return f"per image: each 2D mask is one score, distances in {unit or 'pixels'}"
    return "mixed: NIfTI cases scored per volume (mm), 2D masks per image (pixels)"


def _clean(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class CaseResult:
    """Scores of one case.

    Attributes:
        id: the file stem shared by prediction and reference.
        ref: the reference file.
        pred: the prediction file; None when it is missing (then the case counts as a failure).
        metrics: class label (``"1"``, ``"2"``, ...) -> metric name -> value.
        penalised: classes where exactly one mask was empty (or the prediction is missing), so HD95/ASSD hold
            the image diagonal.
        image: the image of the case, when an image folder was given and holds it.
        uncertainty: the uncertainty map (``.npy``) of the case, when given.
    """

    id: str
    ref: Path
    pred: Optional[Path]
    metrics: dict[str, dict[str, float]]
    penalised: list[str] = field(default_factory=list)
    image: Optional[Path] = None
    uncertainty: Optional[Path] = None

    @property
    def missing(self) -> bool:
        return self.pred is None

    @property
    def foreground_dice(self) -> float:
        """Mean Dice over the foreground classes."""
        return float(np.mean([m["Dice"] for m in self.metrics.values()]))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "pred": self.pred, "ref": self.ref}
        if self.image is not None:
            out["image"] = self.image
        if self.uncertainty is not None:
            out["uncertainty"] = self.uncertainty
        out["missing"] = self.missing
        out["metrics"] = self.metrics
        return out


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate_folders` found.

    Attributes:
        cases: one :class:`CaseResult` per reference file, sorted by id.
        classes: foreground class labels scored, as strings (``["1"]`` for a binary task).
        metric_names: metric keys present per class (``Dice, IoU, HD95, ASSD`` and, with probability maps,
            ``ECE``; with the lenient protocol ``Dice_lenient, IoU_lenient``).
        missing: ids of references without a prediction.
        extra: prediction files without a reference (not scored).
        calibration: pixels of all cases pooled, when probability maps were given.
        options: how the evaluation was run (folders, labels, spacing, FOV, lenient, bins).
        error_detection: with uncertainty maps, ``{"auroc", "n_pixels", "n_errors"}``: how well the per-pixel
            uncertainty ranks the wrong pixels (label != reference, inside the FOV) above the right ones, all
            cases' pixels pooled.
    """

    cases: list[CaseResult]
    classes: list[str]
    metric_names: list[str]
    missing: list[str]
    extra: list[Path]
    calibration: Optional[Calibration]
    options: dict[str, Any]
    error_detection: Optional[dict[str, Any]] = None

    def _values(self, cls: str, metric: str) -> np.ndarray:
        return np.array([c.metrics[cls][metric] for c in self.cases if metric in c.metrics[cls]], dtype=np.float64)

    @property
    def mean(self) -> dict[str, dict[str, float]]:
        """Class -> metric -> mean over cases (missing predictions included as failures)."""
        return {
            k: {m: float(np.mean(v)) if (v := self._values(k, m)).size else math.nan for m in self.metric_names}
            for k in self.classes
        }

    @property
    def std(self) -> dict[str, dict[str, float]]:
        """Class -> metric -> sample standard deviation over cases (ddof = 1; 0 for a single case)."""
        out: dict[str, dict[str, float]] = {}
        for k in self.classes:
            out[k] = {}
            for m in self.metric_names:
                v = self._values(k, m)
                out[k][m] = float(np.std(v, ddof=1)) if v.size > 1 else (0.0 if v.size else math.nan)
        return out

    @property
    def foreground_mean(self) -> dict[str, float]:
        """Metric -> mean over the foreground classes of the class means."""
        mean = self.mean
        return {m: float(np.mean([mean[k][m] for k in self.classes])) for m in self.metric_names}

    def to_summary(self) -> dict[str, Any]:
        """The ``summary.json`` content (strict JSON: NaN written as null)."""
        summary: dict[str, Any] = {
            "metric_per_case": [c.to_dict() for c in self.cases],
            "mean": self.mean,
            "foreground_mean": self.foreground_mean,
            "std": self.std,
            "n_cases": len(self.cases),
            "classes": self.classes,
            "conventions": EMPTY_MASK_CONVENTIONS,
            "distance_unit": "spacing units: NIfTI header voxel size (mm), pixels for 2D images unless --spacing",
            "missing_predictions": self.missing,
            "extra_predictions": self.extra,
            "distance_penalised": {k: [c.id for c in self.cases if k in c.penalised] for k in self.classes},
            "options": self.options,
        }
        if self.calibration is not None:
            per_class = self.calibration.per_class
            # per_class holds one entry per probability channel: K = 1 -> foreground only, else 0..K-1.
            offset = 0 if len(per_class) == 1 else 1
            summary["calibration"] = {
                "n_bins": self.calibration.top_label.n_bins,
                "top_label": self.calibration.top_label.to_dict(),
                "per_class": {k: per_class[int(k) - 1 + offset].to_dict() for k in self.classes},
            }
        if self.error_detection is not None:
            summary["error_detection"] = self.error_detection
        if self.options.get("lenient"):
            summary["lenient_protocol"] = LENIENT_NOTE.format(thresholds=list(LENIENT_THRESHOLDS))
        return _clean(summary)

    def write_summary(self, path: PathLike) -> Path:
        """Write :meth:`to_summary` as indented JSON; returns the path."""
        write_json(path, self.to_summary())
        return Path(path)

    def write_csv(self, path: PathLike) -> Path:
        """Write one row per case and class: id, class, metrics, missing, pred, ref; returns the path."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "class", *self.metric_names, "missing", "pred", "ref"])
        for c in self.cases:
            for k in self.classes:
                values = [c.metrics[k].get(m, math.nan) for m in self.metric_names]
                cells = [f"{v:.6g}" if math.isfinite(v) else "" for v in values]
                writer.writerow([c.id, k, *cells, int(c.missing), c.pred or "", c.ref])
        atomic_write_text(path, buf.getvalue())
        return Path(path)


# ---------------------------------------------------------------- evaluation


def _infer_num_labels(refs: dict[str, Path]) -> int:
    """Largest reference label + 1. The labels found must be 0..K-1 without gaps: {0, 128} is a mask saved with
    another foreground value, not a 129-label task, and is refused naming the file and the fix."""
    seen: dict[int, Path] = {}
    for path in refs.values():
        labels, _ = read_scored_labels(path)
        for v in np.unique(labels).tolist():
            seen.setdefault(int(v), path)
    values = sorted(seen)
    top = max(values, default=1)
    missing = sorted(set(range(top + 1)) - set(values))
    if missing:
        odd = [v for v in values if v > len(values) - 1]
        raise DataError(
            f"{seen[odd[0]]}: holds label value {odd[0]}, but the references hold only the values "
            f"{{{', '.join(map(str, values))}}}: label maps must hold 0..K-1 (a binary mask {{0, 1}} or {{0, 255}}); "
            f"re-save the masks with {odd[0]} written as {values.index(odd[0])}, or pass --labels N when labels up "
            f"to N-1 are absent from every reference")
    return max(top, 1) + 1


def _check_labels(labels: np.ndarray, num_labels: int, path: Path) -> None:
    if labels.size and labels.max() >= num_labels:
        raise DataError(
            f"{path}: label {int(labels.max())} is outside 0..{num_labels - 1} "
            f"({num_labels} labels; set --labels / num_classes if the task has more)"
        )


def _prob_channels(prob: np.ndarray, ref_shape: tuple[int, ...], num_labels: int, path: Path) -> np.ndarray:
    """Return probabilities as ``(1, *spatial)`` (binary task: foreground) or ``(num_labels, *spatial)``."""
    if prob.shape == ref_shape:
        prob = prob[None]
    if prob.ndim != len(ref_shape) + 1 or prob.shape[1:] != ref_shape:
        raise DataError(f"{path}: probability map shape {prob.shape} does not fit the reference shape {ref_shape}")
    k = prob.shape[0]
    if num_labels == 2 and k == 2:
        prob = prob[1:]  # (background, foreground) of a binary task: the foreground channel says it all
    elif k != num_labels and not (k == 1 and num_labels == 2):
        raise DataError(
            f"{path}: {k} probability channels for {num_labels} labels "
            "(expected 1 channel for a binary task, or one channel per label including background)"
        )
    # float32 maps written by a sigmoid/softmax may overshoot [0, 1] by rounding; more than that is an error.
    if not np.isfinite(prob).all() or prob.min() < -1e-5 or prob.max() > 1.0 + 1e-5:
        raise DataError(f"{path}: probabilities must lie in [0, 1], found {prob.min():.4g}..{prob.max():.4g}")
    return np.clip(prob, 0.0, 1.0)


def _case_spacing(
    spacing: Optional[Sequence[float]], header: Optional[tuple[float, ...]], ndim: int, ref_path: Path
) -> Optional[tuple[float, ...]]:
    """The spacing a case is scored with: ``spacing`` (one value = all axes), else the header's, else None (1)."""
    sp = tuple(float(v) for v in spacing) if spacing is not None else header
    if sp is not None and len(sp) == 1:
        sp = sp * ndim
    if sp is not None and len(sp) != ndim:
        raise InputError(f"spacing {sp} has {len(sp)} values but {ref_path} has {ndim} axes")
    return sp


def _read_fov(
    fovs: dict[str, Path], fov_dir: Optional[PathLike], case_id: str, ref_shape: tuple[int, ...], ref_path: Path
) -> torch.Tensor:
    """The FOV of a case as ``(1, 1, *spatial)`` bool."""
    if case_id not in fovs:
        raise InputError(f"no FOV mask for case '{case_id}' in {fov_dir}")
    fov, _ = read_scored_labels(fovs[case_id])
    if fov.shape != ref_shape:
        raise DataError(
            f"size mismatch for case '{case_id}': FOV {fovs[case_id]} has shape {fov.shape}, "
            f"reference {ref_path} has shape {ref_shape}"
        )
    return torch.from_numpy(fov > 0)[None, None]


def _probability_scores(
    prob_path: Path,
    ref_onehot: torch.Tensor,
    classes: list[str],
    fov: Optional[torch.Tensor],
    n_bins: int,
    lenient: bool,
) -> tuple[dict[str, dict[str, float]], Calibration]:
    """ECE (and lenient Dice/IoU) per class from one probability map; ``ref_onehot`` is ``(N, *spatial)``."""
    n_labels = ref_onehot.shape[0]
    prob = torch.from_numpy(
        _prob_channels(_read_npy(prob_path, "probability"), tuple(ref_onehot.shape[1:]), n_labels, prob_path)
    )
    # K = 1: the foreground channel of a binary task; K = N: channel k is label k (class k at index k).
    offset = 0 if prob.shape[0] == 1 else 1
    target = ref_onehot[1:] if prob.shape[0] == 1 else ref_onehot
    cal = calibration(prob, target, n_bins=n_bins, fov=None if fov is None else fov[0])
    scores = {k: {"ECE": cal.per_class[i + offset].ece} for i, k in enumerate(classes)}
    if lenient:
        ls = lenient_multithreshold(prob[None], target[None], fov=fov)
        for i, k in enumerate(classes):
            scores[k]["Dice_lenient"] = float(ls.dice[0, i + offset])
            scores[k]["IoU_lenient"] = float(ls.iou[0, i + offset])
    return scores, cal


def evaluate_folders(
    pred_dir: PathLike,
    ref_dir: PathLike,
    *,
    num_classes: Optional[int] = None,
    fov_dir: Optional[PathLike] = None,
    prob_dir: Optional[PathLike] = None,
    images_dir: Optional[PathLike] = None,
    uncertainty_dir: Optional[PathLike] = None,
    spacing: Optional[Sequence[float]] = None,
    lenient: bool = False,
    n_bins: int = 10,
    out_dir: Optional[PathLike] = None,
) -> EvaluationResult:
    """Score every reference mask of ``ref_dir`` against the prediction with the same stem in ``pred_dir``.

    Args:
        pred_dir: predicted label maps (same formats as references; {0, 255} files count as binary).
        ref_dir: reference label maps: PNG/TIFF/BMP/GIF (2D) or NIfTI (2D/3D, scored in 3D with header spacing).
        num_classes: K as in the tensor conventions: 1 (or 2) for a binary task with labels {0, 1}, K >= 2
            for labels 0..K-1 (background included); default: largest reference label + 1.
        fov_dir: optional field-of-view masks (non-zero = inside) by stem; metrics only see pixels inside.
        prob_dir: optional ``.npy`` probability maps by stem, ``(H, W)`` / ``(1, H, W)`` (binary foreground)
            or ``(K, H, W)`` with one channel per label (3D: ``(..., D)``) in [0, 1]; adds ``ECE`` per class and pooled
            calibration, and is what the lenient protocol scores.
        images_dir: optional images by stem; only recorded per case (for the report).
        uncertainty_dir: optional ``.npy`` uncertainty maps by stem (same shape as the reference): recorded per
            case (for the report) and scored as an error detector (pooled AUROC, ``error_detection``).
        spacing: pixel/voxel size per axis (one value = isotropic) overriding headers; default: NIfTI header
            spacing, 1 for 2D images.
        lenient: add ``Dice_lenient``/``IoU_lenient`` from :func:`diffmis.metrics.lenient_multithreshold`
            (needs ``prob_dir``).
        n_bins: number of reliability bins for calibration.
        out_dir: when given, ``summary.json`` and ``per_case.csv`` are written there.

    Returns:
        :class:`EvaluationResult`; a reference without a prediction is listed in ``missing`` and scored as
        a failure (Dice 0), a prediction without a reference is listed in ``extra``.

    Raises:
        InputError: a folder is missing, ``ref_dir`` holds no masks, an option is invalid, or a case lacks
            its FOV or probability map.
        DataError: a file is unreadable, its size differs from the reference, or its labels are out of range.
    """
    refs = index_files(ref_dir, LABEL_SUFFIXES, "reference")
    if not refs:
        raise InputError(f"no reference masks ({', '.join(LABEL_SUFFIXES)}) in {ref_dir}")
    preds = index_files(pred_dir, LABEL_SUFFIXES, "prediction")
    fovs = index_files(fov_dir, LABEL_SUFFIXES, "FOV") if fov_dir is not None else None
    probs = index_files(prob_dir, (".npy",), "probability") if prob_dir is not None else None
    images = index_files(images_dir, (*LABEL_SUFFIXES, *IMAGE_SUFFIXES), "image") if images_dir is not None else {}
    uncertainties = index_files(uncertainty_dir, (".npy",), "uncertainty") if uncertainty_dir is not None else {}
    if lenient and probs is None:
        raise InputError("the lenient protocol scores probability maps: give prob_dir (--prob DIR)")
    if num_classes is not None and num_classes < 1:
        raise InputError(f"num_classes must be >= 1, got {num_classes}")
    n_labels = max(2, num_classes) if num_classes is not None else _infer_num_labels(refs)
    classes = [str(k) for k in range(1, n_labels)]
    metric_names = list(METRICS)
    if probs is not None:
        metric_names.append("ECE")
    if lenient:
        metric_names += ["Dice_lenient", "IoU_lenient"]

    cases: list[CaseResult] = []
    kinds: set[str] = set()  # "volume" / "image": the scoring convention of each case
    pooled: Optional[Calibration] = None
    unc_values: list[np.ndarray] = []  # per-pixel uncertainty and error of every case, for the pooled AUROC
    err_values: list[np.ndarray] = []
    for case_id, ref_path in refs.items():
        ref, header_spacing = read_scored_labels(ref_path)
        _check_labels(ref, n_labels, ref_path)
        sp = _case_spacing(spacing, header_spacing, ref.ndim, ref_path)
        kinds.add("volume" if ref.ndim == 3 and min(ref.shape) > 1 else "image")
        case = CaseResult(
            id=case_id,
            ref=ref_path.resolve(),
            pred=None,
            metrics={},
            image=images[case_id].resolve() if case_id in images else None,
            uncertainty=uncertainties[case_id].resolve() if case_id in uncertainties else None,
        )
        cases.append(case)
        if case_id not in preds:  # a failure: see EMPTY_MASK_CONVENTIONS
            worst = image_diagonal(ref.shape, sp)
            failure = {"Dice": 0.0, "IoU": 0.0, "HD95": worst, "ASSD": worst}
            if lenient:
                failure.update(Dice_lenient=0.0, IoU_lenient=0.0)
            case.metrics = {k: dict(failure) for k in classes}
            case.penalised = list(classes)
            continue

        pred_path = preds[case_id]
        pred, pred_spacing = read_scored_labels(pred_path)
        if pred_spacing is not None and header_spacing is not None and not np.allclose(
                pred_spacing, header_spacing, rtol=1e-3, atol=1e-6):
            raise DataError(
                f"voxel spacing mismatch for case '{case_id}': prediction {pred_path} has "
                f"{tuple(round(x, 4) for x in pred_spacing)}, reference {ref_path} "
                f"{tuple(round(x, 4) for x in header_spacing)}; the prediction was made on another grid "
                "(resample it to the reference first)")
        if pred.shape != ref.shape:
            raise DataError(
                f"size mismatch for case '{case_id}': prediction {pred_path} has shape {pred.shape}, "
                f"reference {ref_path} has shape {ref.shape}"
            )
        _check_labels(pred, n_labels, pred_path)
        case.pred = pred_path.resolve()
        fov = _read_fov(fovs, fov_dir, case_id, ref.shape, ref_path) if fovs is not None else None
        ref_oh = one_hot(torch.from_numpy(ref)[None], n_labels, check=True).bool()
        pred_oh = one_hot(torch.from_numpy(pred)[None], n_labels, check=True).bool()
        scores = segmentation_metrics(pred_oh[:, 1:], ref_oh[:, 1:], spacing=sp, fov=fov)
        for i, k in enumerate(classes):
            case.metrics[k] = {
                "Dice": float(scores.dice[0, i]),
                "IoU": float(scores.iou[0, i]),
                "HD95": float(scores.hd95[0, i]),
                "ASSD": float(scores.assd[0, i]),
            }
            if bool(scores.ref_empty[0, i]) != bool(scores.pred_empty[0, i]):
                case.penalised.append(k)
        if case_id in uncertainties:
            unc = _read_npy(uncertainties[case_id], "uncertainty")
            if unc.shape != ref.shape:
                raise DataError(f"uncertainty map {uncertainties[case_id]} has shape {unc.shape}, the reference "
                                f"{ref.shape}")
            inside = np.ones(ref.shape, dtype=bool) if fov is None else fov.numpy().astype(bool).reshape(ref.shape)
            unc_values.append(unc[inside].astype(np.float32))
            err_values.append((pred != ref)[inside])
        if probs is not None:
            if case_id not in probs:
                raise InputError(f"no probability map '{case_id}.npy' in {prob_dir}")
            prob_scores, cal = _probability_scores(probs[case_id], ref_oh[0], classes, fov, n_bins, lenient)
            for k in classes:
                case.metrics[k].update(prob_scores[k])
            pooled = cal if pooled is None else pooled.merge(cal)

    options = {
        "convention": convention(kinds, spacing is not None),
        "pred_dir": Path(pred_dir).resolve(),
        "ref_dir": Path(ref_dir).resolve(),
        "num_labels": n_labels,
        "spacing": list(spacing) if spacing is not None else "header (NIfTI) or 1 (2D images)",
        "fov_dir": Path(fov_dir).resolve() if fov_dir is not None else None,
        "prob_dir": Path(prob_dir).resolve() if prob_dir is not None else None,
        "lenient": lenient,
        "n_bins": n_bins,
    }
    result = EvaluationResult(
        cases=cases,
        classes=classes,
        metric_names=metric_names,
        missing=[c.id for c in cases if c.missing],
        extra=[p.resolve() for stem, p in preds.items() if stem not in refs],
        calibration=pooled,
        options=options,
    )
    if unc_values:
        err = np.concatenate(err_values)
        result.error_detection = {"auroc": error_detection_auroc(np.concatenate(unc_values), err),
                                  "n_pixels": int(err.size), "n_errors": int(err.sum()),
                                  "uncertainty_dir": Path(uncertainty_dir).resolve()}  # type: ignore[arg-type]
    if out_dir is not None:
        result.write_summary(Path(out_dir) / "summary.json")
        result.write_csv(Path(out_dir) / "per_case.csv")
    return result
