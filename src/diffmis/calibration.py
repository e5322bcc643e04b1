"""Temperature calibration of a run's probability maps: fit one temperature on held-out cases, apply it at
prediction time.

A temperature ``T`` rescales the fused probability without changing any label:

    K = 1:  p' = sigmoid(logit(p) / T)          K > 1:  p' = softmax(log(p / sum_k p_k) / T)

``T < 1`` sharpens an under-confident map (e.g. a refiner trained with a focal loss), ``T > 1`` softens an
over-confident one. :func:`fit_temperature` picks the ``T`` of the lowest negative log-likelihood of the reference
labels on a grid of 121 values (0.05 to 5, log spaced). The cases must be held out from training: a fit on
training cases measures how sure the network is of what it has seen.

This module is the arithmetic and the run's ``calibration.json`` record (layer 5). Predicting held-out images
with a run and fitting on them is :mod:`diffmis.inference.calibrate` (``diffmis calibrate``, ``train.calibrate``);
:meth:`diffmis.inference.Predictor.from_run` applies the record (an explicit ``temperature=`` wins;
``temperature=1`` predicts the raw maps).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from diffmis.errors import CheckpointError, InputError

__all__ = ["GRID", "CALIBRATION_FILE", "Case", "apply_temperature", "temperature_nll", "fit_temperature",
           "calibration_ece", "fit_record", "read_calibration", "run_temperature", "summary"]

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


def fit_record(run: Path, cases: list[Case], settings: dict[str, Any], checkpoint: str,
               previous: Optional[dict[str, Any]], write: bool, max_pixels: Optional[int], t0: float,
               log: Callable[[str], None], source: dict[str, Any], segmentor_only: bool) -> dict[str, Any]:
    """Fit the temperature of ``cases`` (a run's raw maps, predicted with the sampling ``settings`` from
    ``checkpoint``), build the record (see :func:`diffmis.inference.calibrate_run`) and write it to
    ``run/calibration.json`` unless ``write`` is False; ``previous``, the record it replaces, is kept in it."""
    t = fit_temperature(cases, max_pixels=max_pixels)
    n_pixels = int(sum(int(c[2].sum()) if c[2] is not None else int(np.prod(c[0].shape[1:])) for c in cases))
    rec: dict[str, Any] = {
        "temperature": t,
        "segmentor_only": segmentor_only,
        "checkpoint": checkpoint,
        "predict": dict(settings),
        "nll": {"t1": temperature_nll(cases, 1.0, max_pixels), "fitted": temperature_nll(cases, t, max_pixels)},
        "ece": {"t1": calibration_ece(cases, 1.0), "fitted": calibration_ece(cases, t)},
        "n_cases": len(cases), "n_pixels": n_pixels, "fit_pixels": min(n_pixels, max_pixels or n_pixels),
        **source,
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


def summary(rec: dict[str, Any]) -> str:
    """One line of a calibration record: where it was fitted, the temperature, the ECE before and after there."""
    where = f"'{rec['split']}' " if "split" in rec else "held-out "
    return (f"calibrated on {rec['n_cases']} {where}case(s) in {rec['seconds']:.1f} s: temperature "
            f"{rec['temperature']:.3g}, ECE {rec['ece']['t1']:.4f} -> {rec['ece']['fitted']:.4f} on them")
