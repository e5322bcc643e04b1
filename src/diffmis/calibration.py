"""Temperature calibration of a run's probability maps: fit one temperature on held-out cases, apply it at
prediction time.

A temperature ``T`` rescales the fused probability without changing any label:

    K = 1:  p' = sigmoid(logit(p) / T)          K > 1:  p' = softmax(log(p / sum_k p_k) / T)

``T < 1`` sharpens an under-confident map (e.g. a refiner trained with a focal loss), ``T > 1`` softens an
over-confident one. :func:`fit_temperature` picks the ``T`` of the lowest negative log-likelihood of the reference
labels on a grid of 121 values (0.05 to 5, log spaced). The cases must be held out from training: a fit on
training cases measures how sure the network is of what it has seen.

:func:`calibrate_run` (``diffmis calibrate``) predicts held-out images with a run, fits ``T`` and writes it to
``<run>/calibration.json``; :meth:`diffmis.inference.Predictor.from_run` applies it from then on (an explicit
``temperature=`` wins; ``temperature=1`` predicts the raw maps).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from diffmis.errors import CheckpointError, DataError, InputError

__all__ = ["GRID", "CALIBRATION_FILE", "Case", "apply_temperature", "load_cases", "temperature_nll",
           "fit_temperature", "calibration_ece", "calibrate_run", "read_calibration", "run_temperature"]

GRID = np.geomspace(0.05, 5.0, 121)
EPS = 1e-7
CALIBRATION_FILE = "calibration.json"
PathLike = Union[str, Path]
Case = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # (prob (K, *sp), one-hot target (K, *sp), fov or None)


def apply_temperature(prob: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """Probabilities ``prob`` (channels on ``dim``) at ``temperature`` (see the module docstring).

    The labels do not move: for one channel the logit keeps its sign, for several the argmax is kept. Several
    channels come back renormalised over ``dim`` (a STAPLE fusion's per-class posteriors need not sum to one).
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if temperature == 1.0:
        return prob
    work = prob.double() if prob.dtype == torch.float64 else prob.float()
    if prob.shape[dim] == 1:
        p = work.clamp(EPS, 1.0 - EPS)
        return torch.sigmoid(torch.logit(p) / temperature).to(prob.dtype)
    p = work.clamp_min(EPS)
    logp = torch.log(p / p.sum(dim=dim, keepdim=True))
    return torch.softmax(logp / temperature, dim=dim).to(prob.dtype)


def load_cases(prob_dir: PathLike, mask_dir: PathLike, fov_dir: Optional[PathLike] = None) -> list[Case]:
    """``(prob, target, fov)`` per probability map (``<id>.npy``, ``(K, *spatial)`` or ``(*spatial)`` for K = 1) of
    ``prob_dir``, with the reference mask of the same stem in ``mask_dir`` (one-hot) and its FOV in ``fov_dir``.

    Raises:
        InputError: no probability maps, or a map without a reference mask.
        DataError: a mask whose labels do not fit the map's channels, or whose shape differs.
    """
    from diffmis.data import LABEL_SUFFIXES
    from diffmis.evaluation import index_files, read_scored_labels
    from diffmis.masks import one_hot

    prob_dir = Path(prob_dir)
    probs = index_files(prob_dir, (".npy",), "probability") if prob_dir.is_dir() else {}
    if not probs:
        raise InputError(f"no probability maps (.npy) in {prob_dir}")
    masks = index_files(mask_dir, LABEL_SUFFIXES, "reference")
    fovs = index_files(fov_dir, LABEL_SUFFIXES, "FOV") if fov_dir is not None else {}
    cases = []
    for case, f in sorted(probs.items()):
        if case not in masks:
            raise InputError(f"no reference mask for case '{case}' in {mask_dir}")
        labels, _ = read_scored_labels(masks[case])
        prob = np.load(f).astype(np.float64)
        prob = prob[None] if prob.ndim == labels.ndim else prob
        if tuple(prob.shape[1:]) != tuple(labels.shape):
            raise DataError(f"{masks[case]}: the mask is {tuple(labels.shape)}, its probability map "
                            f"{tuple(prob.shape[1:])}")
        target = one_hot(labels, prob.shape[0], dim=0, check=True).numpy().astype(np.float64)
        fov = read_scored_labels(fovs[case])[0] > 0 if case in fovs else None
        cases.append((np.clip(prob, 0.0, 1.0), target, fov))
    return cases


def _pixels(cases: Sequence[Case], max_pixels: Optional[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All scored pixels as ``(logits (N, K'), targets (N,))``: K' = 1 holds the logit of the foreground, else the
    log of the renormalised probabilities; at most ``max_pixels`` of them, drawn without replacement (seeded)."""
    logits, targets = [], []
    for prob, target, fov in cases:
        k = prob.shape[0]
        keep = np.ones(prob.shape[1:], bool) if fov is None else np.asarray(fov, bool)
        p = prob[:, keep].T  # (n, K)
        if k == 1:
            q = np.clip(p, EPS, 1.0 - EPS)
            logits.append(np.log(q / (1.0 - q)))
            targets.append(target[0][keep])
        else:
            q = np.clip(p, EPS, None)
            logits.append(np.log(q / q.sum(1, keepdims=True)))
            targets.append(target[:, keep].argmax(0))
    z = torch.from_numpy(np.concatenate(logits)).double()
    y = torch.from_numpy(np.concatenate(targets)).double()
    if max_pixels is not None and z.shape[0] > max_pixels:
        idx = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_pixels]
        z, y = z[idx], y[idx]
    return z, y


def _nll(z: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    if z.shape[1] == 1:
        s = z[:, 0] / temperature
        return float((y * torch.nn.functional.softplus(-s) + (1 - y) * torch.nn.functional.softplus(s)).mean())
    logq = torch.log_softmax(z / temperature, dim=1)
    return float(-logq.gather(1, y.long()[:, None]).mean())


def temperature_nll(cases: Sequence[Case], temperature: float, max_pixels: Optional[int] = None) -> float:
    """Mean negative log-likelihood per scored pixel (inside the FOV where there is one) at ``temperature``."""
    z, y = _pixels(cases, max_pixels)
    return _nll(z, y, temperature) if z.numel() else float("nan")


def fit_temperature(cases: Sequence[Case], grid: Sequence[float] = tuple(GRID),
                    max_pixels: Optional[int] = None) -> float:
    """The grid temperature of the lowest negative log-likelihood over the scored pixels of ``cases``.

    Raises:
        InputError: no pixel to fit on (every case empty or outside its FOV).
    """
    z, y = _pixels(cases, max_pixels)
    if not z.numel():
        raise InputError("no pixel to fit a temperature on (empty cases, or nothing inside the FOV)")
    losses = [_nll(z, y, float(t)) for t in grid]
    return float(grid[int(np.argmin(losses))])


def calibration_ece(cases: Sequence[Case], temperature: float, n_bins: int = 10) -> float:
    """Top-label ECE over the pooled pixels at ``temperature`` (:func:`diffmis.metrics.calibration`)."""
    from diffmis.metrics import calibration

    pooled = None
    for prob, target, fov in cases:
        q = apply_temperature(torch.from_numpy(prob), temperature, dim=0)
        cal = calibration(q, torch.from_numpy(target), n_bins=n_bins,
                          fov=None if fov is None else torch.from_numpy(np.asarray(fov))[None])
        pooled = cal if pooled is None else pooled.merge(cal)
    return float(pooled.top_label.ece) if pooled is not None else float("nan")


# ---- runs ------------------------------------------------------------------------------------------------


def read_calibration(run: PathLike) -> Optional[dict[str, Any]]:
    """The run's ``calibration.json`` (None when it has none).

    Raises:
        CheckpointError: the file exists but is not a calibration record (the message names the fix).
    """
    path = Path(run) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        t = float(rec["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a diffmis calibration record ({e}); delete it, or fit it again with "
                              f"diffmis calibrate --run {run}") from None
    if not (t > 0 and math.isfinite(t)):
        raise CheckpointError(f"{path}: temperature {t} is not a positive number; fit it again with diffmis "
                              f"calibrate --run {run}")
    return rec


def run_temperature(run: PathLike, *, segmentor_only: bool, checkpoint: str, settings: dict[str, Any],
                    default: float) -> float:
    """The temperature a prediction with a run uses when none is given: its ``calibration.json``'s, when that was
    fitted for the same network (the whole method or its segmentor alone, and the same checkpoint), else
    ``default`` (the config's ``sample.temperature``). Sampling settings that differ from the fit's (ensemble,
    steps, ...) keep the fitted value and warn: the temperature was fitted to the other settings' maps."""
    rec = read_calibration(run)
    if rec is None:
        return default
    if bool(rec.get("segmentor_only")) != segmentor_only or rec.get("checkpoint") != checkpoint:
        return default
    fitted = rec.get("predict", {})
    moved = [f"{k} {fitted[k]} -> {v}" for k, v in settings.items() if k in fitted and fitted[k] != v]
    if moved:
        warnings.warn(f"{Path(run) / CALIBRATION_FILE}: temperature {rec['temperature']:.3g} was fitted with other "
                      f"sampling settings ({', '.join(moved)}); it is applied as fitted. Fit it again with these "
                      f"settings (diffmis calibrate), or pass temperature 1 for the raw maps", UserWarning,
                      stacklevel=3)
    return float(rec["temperature"])


def calibrate_run(run: PathLike, inputs: Sequence[Any], mask_dir: PathLike, fov_dir: Optional[PathLike] = None, *,
                  checkpoint: str = "best", write: bool = True, max_pixels: Optional[int] = 4_000_000,
                  log: Callable[[str], None] = print, **predict_kw: Any) -> dict[str, Any]:
    """Predict ``inputs`` (held-out images, as :func:`diffmis.inference.predict_paths` takes them) with the run's
    raw maps (temperature 1), fit a temperature against the reference masks of ``mask_dir`` (and the FOVs of
    ``fov_dir``), and write it to ``<run>/calibration.json`` (``write=False``: only return it). The record keeps
    the file it replaces under ``previous``.

    ``predict_kw``: :meth:`Predictor.from_run` settings (device, ensemble, steps, batch_size, ...); the record
    names the settings the temperature was fitted with.

    Returns:
        the record: ``temperature``, ``nll`` and ``ece`` at 1 and at the fit, the cases and pixels, seconds.

    Raises:
        CheckpointError, ConfigError: as :meth:`Predictor.from_run`. InputError / DataError: no inputs, a case
        without a reference, a reference that does not fit. RuntimeError: a case failed to predict.
    """
    from diffmis.inference import Predictor, predict_paths

    t0 = time.time()
    run = Path(run)
    if not inputs:
        raise InputError("no images to calibrate on")
    previous = read_calibration(run) if write else None
    pred = Predictor.from_run(run, checkpoint=checkpoint, temperature=1.0, **predict_kw)
    resolved = "best" if checkpoint == "best" and (run / "checkpoints" / "best").is_dir() else "last"
    tmp = Path(tempfile.mkdtemp(prefix="calibrate_", dir=run))
    try:
        s = predict_paths(pred, inputs, tmp, save_prob=True, overwrite=True, progress=False, log=log)
        if s.failed:
            raise RuntimeError("calibration: prediction failed for " + "; ".join(s.failed.values()))
        cases = load_cases(tmp / "prob", mask_dir, fov_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = fit_temperature(cases, max_pixels=max_pixels)
    n_pixels = int(sum(int(c[2].sum()) if c[2] is not None else int(np.prod(c[0].shape[1:])) for c in cases))
    rec: dict[str, Any] = {
        "temperature": t,
        "segmentor_only": bool(predict_kw.get("segmentor_only", False)),
        "checkpoint": resolved,
        "predict": {"sampler": pred.sampler, "steps": pred.steps, "ensemble": pred.ensemble, "fuse": pred.fuse,
                    "start_step": pred.start_step, "tta": pred.tta},
        "nll": {"t1": temperature_nll(cases, 1.0, max_pixels), "fitted": temperature_nll(cases, t, max_pixels)},
        "ece": {"t1": calibration_ece(cases, 1.0), "fitted": calibration_ece(cases, t)},
        "n_cases": len(cases), "n_pixels": n_pixels, "fit_pixels": min(n_pixels, max_pixels or n_pixels),
        "masks": str(Path(mask_dir).resolve()), "fov": str(Path(fov_dir).resolve()) if fov_dir else None,
        "grid": [float(GRID[0]), float(GRID[-1]), len(GRID)],
        "seconds": round(time.time() - t0, 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if t in (float(GRID[0]), float(GRID[-1])):
        log(f"calibrate: warning: the fit ended at the edge of the grid (T = {t:g}); the maps are far from "
            "calibrated, or the held-out cases too few")
    if previous is not None:
        rec["previous"] = previous
    if write:
        out = run / CALIBRATION_FILE
        tmp_file = out.with_suffix(".json.tmp")
        tmp_file.write_text(json.dumps(rec, indent=1) + "\n")
        tmp_file.replace(out)
    return rec
