"""Prediction over files: find the inputs, read them, run a :class:`~diffmis.inference.predictor.Predictor`, write
the outputs. One bad case is reported by name and the others still run; outputs are written atomically (maps
first, the mask last), so an interrupted job resumes by skipping complete cases.

Inputs: PNG/JPEG/TIFF/BMP images; NIfTI volumes, segmented slice-wise along the run's ``data.slice_axis`` and
written back as volumes with the input's affine and header (nnU-Net multi-channel cases ``<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ... are grouped into one input ``<case>``); DICOM series (a folder of DICOM files, read
with SimpleITK and written as NIfTI with the series' geometry). Outputs are lossless: PNG label maps (K = 1:
{0, 255}; K > 1: the class index 0..K-1) or NIfTI, never JPEG. On request: probability maps
(``prob/<id>.npy``, float32 (K, H, W) or (K, X, Y, Z)) and uncertainty maps (``uncertainty/<id>.npy``, the
ensemble variance, and ``entropy/<id>.npy``, the entropy of the member mean in bits; both (H, W) or (X, Y, Z)).
"""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np

from diffmis.data import IMAGE_SUFFIXES, NIFTI_SUFFIXES, file_stem, read_image, read_label_map, read_volume, \
    volume_shape, write_volume_like
from diffmis.errors import DiffmisError, InputError
from diffmis.inference.predictor import Prediction, Predictor
from diffmis.utils import atomic_write_bytes, write_json

__all__ = ["InputCase", "find_inputs", "PredictSummary", "predict_paths"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")
PathLike = Union[str, Path]


@dataclass(frozen=True)
class InputCase:
    """One thing to predict: ``kind`` ``image`` (one 2D file), ``nifti`` (one file per channel) or ``dicom``
    (a series folder); ``id`` names its outputs."""

    id: str
    kind: Literal["image", "nifti", "dicom"]
    paths: tuple[Path, ...]

    @property
    def name(self) -> str:
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"{self.paths[0].parent / self.id}_{{{', '.join(p.name for p in self.paths)}}}"


_INPUT_SUFFIXES = (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES)


def _stem(name: str) -> str:
    """``name`` without an image or NIfTI suffix."""
    return file_stem(name, _INPUT_SUFFIXES) or name


def _looks_dicom(f: Path) -> bool:
    if f.suffix.lower() == ".dcm":
        return True
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_dir(p: Path) -> bool:
    if not p.is_dir():
        return False
    files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    return any(_looks_dicom(f) for f in files[:3])


def _group_volumes(files: list[Path], in_channels: Optional[int]) -> list[InputCase]:
    """nnU-Net naming (``<case>_<XXXX>.nii.gz``, channels 0..C-1 of every case) -> one case per ``<case>``;
    any other set of NIfTI files -> one case per file."""
    parsed: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL_RE.match(_stem(f.name))
        if m is None:
            parsed = {}
            break
        parsed.setdefault(m["case"], {})[int(m["chan"])] = f
    if parsed:
        counts = {len(ch) for ch in parsed.values()}
        ok = len(counts) == 1 and all(sorted(ch) == list(range(len(ch))) for ch in parsed.values())
        if ok and (in_channels is None or counts == {in_channels}):
            return [InputCase(case, "nifti", tuple(ch[i] for i in range(len(ch)))) for case, ch in parsed.items()]
    return [InputCase(_stem(f.name), "nifti", (f,)) for f in files]


def find_inputs(path: PathLike, in_channels: Optional[int] = None) -> list[InputCase]:
    """Cases to predict under ``path``: an image or NIfTI file, a DICOM series folder, or a folder of those
    (files and DICOM sub-folders, sorted by name). ``in_channels`` decides nnU-Net channel grouping.

    Raises:
        InputError: the path does not exist, holds nothing to predict, or two inputs share an output name.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    if _is_dicom_dir(p):
        return [InputCase(p.name, "dicom", (p,))]
    if p.is_file():
        if file_stem(p, NIFTI_SUFFIXES):
            return _group_volumes([p], in_channels)
        if file_stem(p, IMAGE_SUFFIXES):
            return [InputCase(_stem(p.name), "image", (p,))]
        raise InputError(f"{p}: not an image (png/jpg/tif/bmp) or NIfTI volume (.nii/.nii.gz)")
    cases: list[InputCase] = []
    volumes: list[Path] = []
    for f in sorted(p.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_file() and file_stem(f, NIFTI_SUFFIXES):
            volumes.append(f)
        elif f.is_file() and file_stem(f, IMAGE_SUFFIXES):
            cases.append(InputCase(_stem(f.name), "image", (f,)))
        elif _is_dicom_dir(f):
            cases.append(InputCase(f.name, "dicom", (f,)))
    cases += _group_volumes(volumes, in_channels) if volumes else []
    if not cases:
        raise InputError(f"no images (png/jpg/tif/bmp), NIfTI volumes or DICOM series found in {p}")
    seen: dict[str, InputCase] = {}
    for c in cases:
        if c.id in seen:
            raise InputError(f"{seen[c.id].name} and {c.name} would both be written as '{c.id}': rename one")
        seen[c.id] = c
    return sorted(cases, key=lambda c: c.id)


@dataclass
class PredictSummary:
    """What :func:`predict_paths` did: ids written, skipped (outputs present), failed (id -> message)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    nfe_per_image: Optional[float] = None
    seconds_per_image: Optional[float] = None


def _read_nifti_case(case: InputCase) -> np.ndarray:
    vols = [read_volume(p) for p in case.paths]
    for v in vols[1:]:
        if v.data.shape != vols[0].data.shape:
            raise InputError(f"{v.path}: shape {v.data.shape} differs from {vols[0].path.name} {vols[0].data.shape}")
    return np.stack([np.asarray(v.data, dtype=np.float32) for v in vols])  # (C, X, Y, Z)


def _read_dicom(path: Path) -> tuple[Any, np.ndarray]:
    """A DICOM series folder -> (SimpleITK image, (C, X, Y, Z) float32 in the voxel order NIfTI uses)."""
    import SimpleITK as sitk

    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise InputError(f"{path}: no DICOM series found")
        if len(ids) > 1:
            raise InputError(f"{path}: holds {len(ids)} DICOM series; give one folder per series")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
        img = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read the DICOM series ({str(err).strip().splitlines()[-1]})") from None
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (Z, Y, X) or (Z, Y, X, C)
    if arr.ndim == 3:
        arr = arr[..., None]
    return img, np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    return buf.getvalue()


def _png_bytes(label: np.ndarray, k: int) -> bytes:
    from PIL import Image

    arr = (label.astype(np.uint8) * 255) if k == 1 else label.astype(np.uint8 if k <= 256 else np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class _Writer:
    """Output paths of a case; writes maps first and the mask last, each atomically, so that an existing
    mask means a complete case (what resuming relies on)."""

    def __init__(self, out: Path, save_prob: bool, save_uncertainty: bool) -> None:
        self.out, self.save_prob, self.save_unc = out, save_prob, save_uncertainty

    def mask(self, case: InputCase) -> Path:
        return self.out / f"{case.id}{'.png' if case.kind == 'image' else '.nii.gz'}"

    def needed(self, case: InputCase) -> list[Path]:
        paths = [self.mask(case)]
        if self.save_prob:
            paths.append(self.out / "prob" / f"{case.id}.npy")
        if self.save_unc:
            paths += [self.out / "uncertainty" / f"{case.id}.npy", self.out / "entropy" / f"{case.id}.npy"]
        return paths

    def maps(self, case: InputCase, pred: Prediction) -> None:
        if self.save_prob:
            atomic_write_bytes(self.out / "prob" / f"{case.id}.npy", _npy_bytes(pred.probability))
        if self.save_unc:
            atomic_write_bytes(self.out / "uncertainty" / f"{case.id}.npy", _npy_bytes(pred.variance))
            atomic_write_bytes(self.out / "entropy" / f"{case.id}.npy", _npy_bytes(pred.entropy))

    def volume(self, target: Path, write: Callable[[Path], None]) -> None:
        tmp = target.with_name(f".{target.name[: -len('.nii.gz')]}.tmp.nii.gz")
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()


def _index_priors(prior_dir: Path) -> dict[str, Path]:
    if not prior_dir.is_dir():
        raise InputError(f"prior mask folder {prior_dir} does not exist")
    out: dict[str, Path] = {}
    for f in sorted(prior_dir.iterdir()):
        stem = file_stem(f, _INPUT_SUFFIXES)
        if f.is_file() and stem and not f.name.startswith("."):
            out.setdefault(stem, f)
    return out


def _prior_for(case: InputCase, priors: Optional[dict[str, Path]], prior_dir: Optional[Path]) -> Optional[np.ndarray]:
    if priors is None:
        return None
    f = priors.get(case.id)
    if f is None:
        raise InputError(f"{case.name}: no prior mask named {case.id}.* in {prior_dir}")
    return read_label_map(f)[0]


def predict_paths(predictor: Predictor, inputs: Sequence[Union[PathLike, InputCase]], output: PathLike, *,
                  save_prob: bool = False, save_uncertainty: bool = False, overwrite: bool = False,
                  prior_dir: Optional[PathLike] = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> PredictSummary:
    """Predict every input into ``output``; a case that fails is reported by name and the others still run.

    Args:
        inputs: cases from :func:`find_inputs`, or paths (each given to :func:`find_inputs`).
        save_prob, save_uncertainty: also write ``prob/``, ``uncertainty/`` and ``entropy/`` ``.npy`` maps.
        overwrite: recompute cases whose outputs exist. Otherwise the run is resumable: a case whose requested
            outputs all exist is skipped (outputs are written atomically, the mask last).
        prior_dir: PD-DDPM pre-segmentations named like the outputs (``<id>.png`` / ``<id>.nii.gz``).
        progress: show a progress bar (stderr).

    Writes ``predict_summary.json`` (this invocation's :class:`PredictSummary`) into ``output``.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[InputCase] = []
    for item in inputs:
        cases += [item] if isinstance(item, InputCase) else find_inputs(item, predictor.in_channels)
    priors = _index_priors(Path(prior_dir)) if prior_dir is not None else None
    writer = _Writer(out, save_prob, save_uncertainty)
    for case in cases:
        if writer.mask(case).resolve() in {p.resolve() for p in case.paths}:
            raise InputError(f"{case.name}: its mask would overwrite it; choose another output folder")
    summary = PredictSummary()
    k = predictor.num_classes
    from tqdm import tqdm

    bar = tqdm(total=len(cases), desc="predict", unit="case", dynamic_ncols=True, disable=not progress)
    nfes: list[float] = []
    times: list[float] = []

    def fail(case: InputCase, err: BaseException) -> None:
        msg = str(err) if isinstance(err, DiffmisError) else f"{case.name}: {type(err).__name__}: {err}"
        if case.name not in msg:
            msg = f"{case.name}: {msg}"
        summary.failed[case.id] = msg
        log(f"predict: FAILED {msg}")
        bar.update(1)

    def done(case: InputCase, nfe: float, seconds: float) -> None:
        summary.written.append(case.id)
        nfes.append(nfe)
        times.append(seconds)
        bar.update(1)

    # 2D images wait here until a batch is full: (case, image, prior)
    pending: list[tuple[InputCase, np.ndarray, Optional[np.ndarray]]] = []
    same_size_needed = predictor.image_size is None

    def flush() -> None:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        t0 = time.perf_counter()
        try:
            preds = predictor.predict_batch([b[1] for b in batch], [b[0].name for b in batch],
                                            None if priors is None else [b[2] for b in batch])
        except Exception as err:  # noqa: BLE001  (one bad case must not stop the others)
            if len(batch) == 1:
                fail(batch[0][0], err)
                return
            for item in batch:  # find the case that fails: one at a time
                pending.append(item)
                flush()
            return
        per = (time.perf_counter() - t0) / len(batch)
        for (case, _, _), pred in zip(batch, preds):
            try:
                writer.maps(case, pred)
                atomic_write_bytes(writer.mask(case), _png_bytes(pred.label, k))
            except Exception as err:  # noqa: BLE001
                fail(case, err)
                continue
            done(case, pred.nfe, per)

    for case in cases:
        if not overwrite and all(p.exists() for p in writer.needed(case)):
            summary.skipped.append(case.id)
            bar.update(1)
            continue
        try:
            prior = _prior_for(case, priors, Path(prior_dir) if prior_dir else None)
            if case.kind == "image":
                if predictor.spatial_dims == 3:
                    raise InputError(f"{case.name}: a 2D image; this 3D run (data.spatial_dims=3) segments volumes "
                                     "(NIfTI or DICOM)")
                image = read_image(case.paths[0])
                image = predictor.fit_channels(image, case.name)
                if pending and same_size_needed and image.shape[1:] != pending[0][1].shape[1:]:
                    flush()
                pending.append((case, image, prior))
                if len(pending) >= predictor.batch_size:
                    flush()
                continue
            flush()
            t0 = time.perf_counter()
            axis = predictor.cfg.data.slice_axis
            if case.kind == "nifti":
                data = _read_nifti_case(case)
                spacing = volume_shape(case.paths[0])[1]
                pred = predictor.predict_volume(data, axis, case.name, prior_mask=prior, spacing=spacing)
                writer.maps(case, pred)
                slices = np.moveaxis(pred.label, axis, 0)
                writer.volume(writer.mask(case),
                              lambda tmp: write_volume_like(case.paths[0], slices, tmp, slice_axis=axis))
            else:
                import SimpleITK as sitk

                img, data = _read_dicom(case.paths[0])
                pred = predictor.predict_volume(data, axis, case.name, prior_mask=prior,
                                                spacing=tuple(float(v) for v in img.GetSpacing()))
                writer.maps(case, pred)
                lab = sitk.GetImageFromArray(np.transpose(pred.label, (2, 1, 0)).astype(
                    np.uint8 if k <= 256 else np.int32))
                lab.CopyInformation(img)
                writer.volume(writer.mask(case), lambda tmp: sitk.WriteImage(lab, str(tmp)))
            done(case, pred.nfe, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001  (one bad case must not stop the others)
            fail(case, err)
    flush()
    bar.close()
    if nfes:
        summary.nfe_per_image = float(np.mean(nfes))
        summary.seconds_per_image = float(np.mean(times))
    write_json(out / "predict_summary.json", asdict(summary))
    return summary
