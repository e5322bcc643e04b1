"""Calibrating a run (layer 7): predict held-out images with its raw maps and fit one temperature to them
(:mod:`diffmis.calibration` holds the arithmetic and the ``calibration.json`` record that
:meth:`Predictor.from_run` applies). ``diffmis calibrate`` calls :func:`calibrate_run` on image and mask files;
``train.calibrate`` (``diffmis train``, the quickstart) calls :func:`calibrate_split` on the run's val split."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from diffmis.calibration import Case, fit_record, read_calibration
from diffmis.errors import CheckpointError, DataError, InputError
from diffmis.inference.files import predict_paths
from diffmis.inference.predictor import Predictor

__all__ = ["load_cases", "calibrate_run", "calibrate_split"]

PathLike = Union[str, Path]


def _raw_predictor(run: Path, checkpoint: str, predict_kw: dict[str, Any]) -> tuple[Predictor, str]:
    """The run's predictor at temperature 1 (the raw maps a temperature is fitted to), and the checkpoint it
    loaded (``best`` falls back to ``last``, as :meth:`Predictor.from_run` does)."""
    pred = Predictor.from_run(run, checkpoint=checkpoint, temperature=1.0, **predict_kw)
    return pred, "best" if checkpoint == "best" and (run / "checkpoints" / "best").is_dir() else "last"


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
    t0 = time.time()
    run = Path(run)
    if not inputs:
        raise InputError("no images to calibrate on")
    previous = read_calibration(run) if write else None
    pred, resolved = _raw_predictor(run, checkpoint, predict_kw)
    tmp = Path(tempfile.mkdtemp(prefix="calibrate_", dir=run))
    try:
        s = predict_paths(pred, inputs, tmp, save_prob=True, overwrite=True, progress=False, log=log)
        if s.failed:
            raise RuntimeError("calibration: prediction failed for " + "; ".join(s.failed.values()))
        cases = load_cases(tmp / "prob", mask_dir, fov_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    source = {"masks": str(Path(mask_dir).resolve()), "fov": str(Path(fov_dir).resolve()) if fov_dir else None}
    return fit_record(run, cases, pred.sampling_settings(), resolved, previous, write, max_pixels, t0, log, source,
                      bool(predict_kw.get("segmentor_only", False)))


def calibrate_split(run: PathLike, split: Optional[str] = None, *, checkpoint: str = "best", write: bool = True,
                    max_pixels: Optional[int] = 4_000_000, log: Callable[[str], None] = print,
                    **predict_kw: Any) -> dict[str, Any]:
    """:func:`calibrate_run` on a split of the run's own dataset (default ``data.val_split``; any 2D ``data.kind``,
    built-in ones included), its images and masks at their stored size as :func:`calibrate_run` reads files: what
    ``train.calibrate`` does after training. The split must be held out from training.

    Raises:
        ConfigError: a 3D run (fit on its volume files with :func:`calibrate_run`). InputError: an empty split.
        DataError: as reading the dataset for training.
    """
    from diffmis.config import load_config
    from diffmis.data import build_dataset
    from diffmis.errors import ConfigError
    from diffmis.masks import one_hot

    t0 = time.time()
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run} is not a diffmis run: {run / 'config.yaml'} is missing")
    cfg = load_config(run / "config.yaml")
    if cfg.data.spatial_dims == 3:
        raise ConfigError("calibrating on the dataset works for 2D runs; for volumes fit on held-out volume files: "
                          f"diffmis calibrate --run {run} --input IMAGES --masks LABELS")
    split = split or cfg.data.val_split
    # the cases as they are stored, as diffmis predict reads files: the predictor resizes to data.image_size and its
    # maps come back at the stored size, where the temperature will be applied (synthetic images are made at it)
    stored = {} if cfg.data.kind == "synthetic" else {"image_size": None}
    ds = build_dataset(cfg.data.model_copy(update={"cache": False, **stored}), split, train=False)  # read once
    if len(ds) == 0:
        raise InputError(f"the '{split}' split of the run's data has no cases to calibrate on")
    previous = read_calibration(run) if write else None
    pred, resolved = _raw_predictor(run, checkpoint, predict_kw)
    raws = [(ds.ids[i], *ds.source.load(i)) for i in range(len(ds))]
    cases: list[Case] = []
    start = 0
    while start < len(raws):  # network batches of images of one size
        end = start + 1
        while (end < len(raws) and end - start < pred.batch_size
               and raws[end][1].shape == raws[start][1].shape):
            end += 1
        chunk = raws[start:end]
        outs = pred.predict_batch([r[1] for r in chunk], [f"{split} case {r[0]}" for r in chunk])
        for (_, _, labels, fov), out in zip(chunk, outs):
            target = one_hot(np.asarray(labels), out.probability.shape[0], dim=0, check=True).numpy()
            cases.append((out.probability.astype(np.float64), target.astype(np.float64),
                          None if fov is None else np.asarray(fov) > 0))
        start = end
    source = {"split": split, "data": str(cfg.data.root or cfg.data.kind)}
    return fit_record(run, cases, pred.sampling_settings(), resolved, previous, write, max_pixels, t0, log, source,
                      bool(predict_kw.get("segmentor_only", False)))
