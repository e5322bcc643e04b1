"""Prediction with a trained run: ``Predictor.from_run(RUN)`` in memory, ``predict_paths`` over files.

Inputs: PNG/JPEG/TIFF/BMP images, NIfTI volumes (segmented slice-wise along the training slice axis and written
back as volumes with the input's affine and header) and DICOM series (a folder of .dcm files, written as
NIfTI). Outputs are lossless: PNG label maps (binary masks as {0, 255}) or NIfTI; probability maps
(``prob/<id>.npy``, float32 (K, H, W) or (K, D, H, W)) and uncertainty maps (``uncertainty/<id>.npy``,
per-pixel ensemble variance, and ``entropy/<id>.npy``) on request.

Geometry: a model trained on resized images (``data.image_size``) sees each input resized to that size and
its probabilities are resized back; a model trained on patches (``data.patch_size``, e.g. DRIVE) runs at
native resolution through MONAI's ``SlidingWindowInferer`` with the patch as window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from diffmis.config import Config, load_config
from diffmis.data import normalize_intensity, read_image
from diffmis.diffusion import GaussianMethod, SegmentationMethod, SegmentorMethod, build
from diffmis.ensemble import EnsembleResult, ensemble_predict
from diffmis.errors import CheckpointError, InputError
from diffmis.training.checkpoint import load_checkpoint, read_state

__all__ = ["Predictor", "Prediction", "predict_paths", "PredictSummary", "IMAGE_EXTS", "find_inputs"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTS = (".nii", ".nii.gz")


@dataclass
class Prediction:
    """One image's result. ``label``: (H, W) int64 (0/1 for K = 1, 0..K-1 otherwise); ``probability``:
    (K, H, W) in [0, 1]; ``variance`` and ``entropy``: (H, W) uncertainty maps (zeros for one deterministic
    member); ``nfe``: network evaluations per image."""

    label: np.ndarray
    probability: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray
    nfe: int


def _entropy(prob: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, 1, H, W) entropy of the mean in nats (binary entropy for K = 1)."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    if prob.shape[1] == 1:
        return -(p * p.log() + (1 - p) * (1 - p).log())
    q = prob / prob.sum(1, keepdim=True).clamp_min(1e-6)
    return -(q.clamp_min(1e-12) * q.clamp_min(1e-12).log()).sum(1, keepdim=True)


class Predictor:
    """A trained method plus its config, ready to segment arrays.

    Args:
        method: the built method with weights loaded (EMA weights where the run had them).
        cfg: the run's resolved config.
        steps, ensemble, fuse, start_step, sampler: sampling settings (config defaults when None).
        prior: PD-DDPM pre-segmentation source: a :class:`Predictor` of a segmentor run, or None (the
            method's own prior segmentor when it has one).
    """

    def __init__(self, method: SegmentationMethod, cfg: Config, *, device: Optional[torch.device] = None,
                 steps: Optional[int] = None, ensemble: Optional[int] = None,
                 fuse: Optional[Literal["mean", "staple", "mean_squared"]] = None, start_step: Optional[int] = None,
                 sampler: Optional[str] = None, precision: Optional[str] = None, batch_size: Optional[int] = None,
                 prior: Optional["Predictor"] = None, seed: int = 0) -> None:
        self.method = method.eval()
        self.cfg = cfg
        self.device = device or next(method.parameters()).device
        self.steps = steps or cfg.sample.steps
        self.ensemble = ensemble or cfg.sample.ensemble
        self.fuse = fuse or cfg.sample.fuse
        self.start_step = start_step if start_step is not None else cfg.sample.start_step
        self.sampler = sampler or cfg.sample.sampler
        self.precision = precision or cfg.train.precision
        self.batch_size = batch_size or cfg.sample.batch_size
        self.prior = prior
        self.seed = seed
        self.in_channels = cfg.data.in_channels
        self.num_classes = cfg.data.num_classes

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run: Union[str, Path], *, checkpoint: Literal["best", "last"] = "best",
                 use_ema: bool = True, device: Optional[Union[str, torch.device]] = None, prior_only: bool = False,
                 **kwargs: Any) -> "Predictor":
        """Load a run folder (config and weights come from the run; ``best`` falls back to ``last``).

        ``prior_only=True`` predicts with the run's segmentor alone (HiDiff's prior, PD-DDPM's pre-segmentation).

        Raises:
            CheckpointError: the folder is missing, incomplete, or its weights do not fit its config.
        """
        run = Path(run)
        if not run.is_dir():
            raise CheckpointError(f"run folder {run} does not exist")
        if not (run / "config.yaml").is_file():
            raise CheckpointError(f"{run} is not a diffmis run: config.yaml is missing")
        cfg = load_config(run / "config.yaml")
        ck = run / "checkpoints" / checkpoint
        if not ck.is_dir():
            ck = run / "checkpoints" / "last"
        if not ck.is_dir():
            raise CheckpointError(f"{run} has no checkpoint (checkpoints/best or checkpoints/last)")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        method = build(cfg)
        state = load_checkpoint(ck, method, expect={"recipe": cfg.experiment.recipe, "model": cfg.model.name})
        ema_mod = method.ema_module()
        if use_ema and ema_mod is not None and "ema_shadow" in state:
            ema_mod.load_state_dict(state["ema_shadow"], strict=False)
        if prior_only:
            seg = getattr(method, "segmentor", None) or getattr(method, "prior", None)
            if seg is None:
                raise CheckpointError(f"{run} ({cfg.experiment.recipe}) has no segmentor to predict with alone")
            method = SegmentorMethod(seg, cfg.data.num_classes, {})
        method.to(dev)
        return cls(method, cfg, device=dev, **kwargs)

    # ---- geometry ------------------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray, source: str) -> torch.Tensor:
        if image.ndim == 2:
            image = image[None]
        if image.shape[0] != self.in_channels:
            raise InputError(f"{source}: the image has {image.shape[0]} channel(s) but the model takes "
                             f"{self.in_channels}")
        arr = normalize_intensity(np.asarray(image, dtype=np.float32), self.cfg.data.normalize,
                                  tuple(self.cfg.data.ct_window))
        return torch.from_numpy(np.ascontiguousarray(arr)).float()

    def _run_members(self, x: torch.Tensor, prior_mask: Optional[torch.Tensor]) -> EnsembleResult:
        kw: dict[str, Any] = {"steps": self.steps, "sampler": self.sampler}
        if isinstance(self.method, GaussianMethod) and (self.start_step is not None):
            kw["start_step"] = self.start_step
            if prior_mask is not None:
                kw["init"] = prior_mask.repeat_interleave(self.ensemble, dim=0)
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        from diffmis.utils import autocast

        with torch.no_grad(), autocast(self.device, self.precision if self.precision != "fp16" else "fp32"):
            return ensemble_predict(self.method, x, n=self.ensemble, fuse=self.fuse,
                                    threshold=self.cfg.sample.threshold, generator=gen, **kw)

    def _net(self, x: torch.Tensor, prior_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(B, C, h, w) normalised -> (B, K + 1, h, w): fused probabilities and the variance channel."""
        res = self._run_members(x, prior_mask)
        var = res.uncertainty["variance"].float()
        return torch.cat([res.probability.float(), var], dim=1), res.nfe

    def _prior_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.prior is None or self.start_step is None:
            return None
        from diffmis.training.trainer import hard_onehot

        return hard_onehot(self.prior._probs(x), 0.5)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Fused probabilities for network-space input x (B, C, h, w); used when this predictor is a prior."""
        out, _ = self._net(x.to(self.device), None)
        return out[:, : self.num_classes]

    def predict_array(self, image: np.ndarray, source: str = "<array>",
                      prior_mask: Optional[np.ndarray] = None) -> Prediction:
        """Segment one 2D image.

        Args:
            image: (C, H, W) or (H, W) raw intensities (the run's normalisation is applied here).
            prior_mask: optional (H, W) label map (0..K-1, or {0, 1}/{0, 255} for K = 1): the PD-DDPM
                pre-segmentation, used with a start step instead of the prior segmentor.
        Returns:
            a :class:`Prediction` at the input's (H, W).
        """
        x = self._prepare(image, source)[None]  # (1, C, H, W)
        h, w = x.shape[-2:]
        c = x.shape[1]
        if prior_mask is not None:
            # carry the prior as extra channels: resizing and sliding windows then treat it like the image
            if prior_mask.shape != (h, w):
                raise InputError(f"{source}: prior mask is {prior_mask.shape}, the image {(h, w)}")
            lab = torch.from_numpy(np.asarray(prior_mask)).long()
            if self.num_classes == 1:
                onehot = (lab > 0).float()[None, None]
            else:
                onehot = F.one_hot(lab.clamp(0, self.num_classes - 1), self.num_classes).permute(2, 0, 1)[None].float()
            x = torch.cat([x, onehot], dim=1)
        dc = self.cfg.data
        nfe_holder = [0]

        def net(t: torch.Tensor) -> torch.Tensor:
            prior = (t[:, c:] > 0.5).float() if t.shape[1] > c else self._prior_for(t)
            out, nfe = self._net(t[:, :c], prior)
            nfe_holder[0] += nfe
            return out

        if dc.patch_size is not None and dc.image_size is None:
            from monai.inferers import SlidingWindowInferer

            ph, pw = dc.patch_size
            if h < ph or w < pw:  # pad small images up to one window (reflect keeps statistics)
                x = F.pad(x, (0, max(0, pw - w), 0, max(0, ph - h)), mode="reflect")
            inferer = SlidingWindowInferer(roi_size=(ph, pw), sw_batch_size=self.batch_size, overlap=0.25,
                                           mode="gaussian", padding_mode="reflect")
            out = inferer(x.to(self.device), net)[..., :h, :w]
            nfe_per_image = nfe_holder[0]
        else:
            size = dc.image_size or dc.patch_size or (h, w)
            xin = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False) if (h, w) != tuple(size) else x
            out = net(xin.to(self.device))
            if (h, w) != tuple(size):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            nfe_per_image = nfe_holder[0]
        out = out.float().cpu()
        prob = out[:, : self.num_classes].clamp(0, 1)
        var = out[:, self.num_classes:].clamp_min(0)
        label = (prob[:, 0] > self.cfg.sample.threshold).long() if self.num_classes == 1 else prob.argmax(1)
        return Prediction(label=label[0].numpy(), probability=prob[0].numpy(), variance=var[0, 0].numpy(),
                          entropy=_entropy(prob)[0, 0].numpy(), nfe=int(nfe_per_image))

    def predict_volume(self, volume: np.ndarray, axis: int, source: str = "<volume>",
                       progress: Optional[Callable[[int], None]] = None) -> Prediction:
        """Segment a (C, X, Y, Z) volume slice by slice along ``axis`` (0..2 of the spatial axes)."""
        if volume.ndim == 3:
            volume = volume[None]
        n = volume.shape[1 + axis]
        labels, probs, vars_, ents = [], [], [], []
        nfe = 0
        for i in range(n):
            sl = np.take(volume, i, axis=1 + axis)
            p = self.predict_array(sl, f"{source} slice {i}")
            labels.append(p.label), probs.append(p.probability), vars_.append(p.variance), ents.append(p.entropy)
            nfe += p.nfe
            if progress:
                progress(1)
        return Prediction(label=np.stack(labels, axis=axis), probability=np.stack(probs, axis=1 + axis),
                          variance=np.stack(vars_, axis=axis), entropy=np.stack(ents, axis=axis), nfe=nfe)


# ------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", *IMAGE_EXTS, ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _is_dicom_dir(p: Path) -> bool:
    return p.is_dir() and any(f.suffix.lower() == ".dcm" for f in p.iterdir())


def find_inputs(path: Union[str, Path]) -> list[Path]:
    """Files (or DICOM series folders) to predict under ``path`` (a file, a DICOM folder, or a folder)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    if p.is_file() or _is_dicom_dir(p):
        return [p]
    out = []
    for f in sorted(p.iterdir()):
        n = f.name.lower()
        if f.is_file() and (n.endswith(IMAGE_EXTS) or n.endswith(VOLUME_EXTS)):
            out.append(f)
        elif _is_dicom_dir(f):
            out.append(f)
    if not out:
        raise InputError(f"no images (png/jpg/tif/bmp), NIfTI volumes or DICOM series found in {p}")
    return out


@dataclass
class PredictSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    nfe_per_image: Optional[float] = None
    seconds_per_image: Optional[float] = None


def _read_volume(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise InputError(f"{path}: cannot read NIfTI ({err})") from None
    if data.ndim == 4:  # (X, Y, Z, C) -> (C, X, Y, Z)
        data = np.moveaxis(data, -1, 0)
    return img, data


def _read_dicom(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(path))
    if not names:
        raise InputError(f"{path}: no DICOM series found")
    reader.SetFileNames(names)
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read DICOM series ({err})") from None
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (Z, Y, X)
    return img, np.transpose(arr, (2, 1, 0))  # (X, Y, Z) like NIfTI


def _save_png_label(label: np.ndarray, k: int, out: Path) -> None:
    from PIL import Image

    arr = (label * 255).astype(np.uint8) if k == 1 else label.astype(np.uint8 if k < 256 else np.uint16)
    Image.fromarray(arr).save(out)


def predict_paths(predictor: Predictor, inputs: Sequence[Path], output: Union[str, Path], *,
                  save_prob: bool = False, save_uncertainty: bool = False, overwrite: bool = False,
                  prior_dir: Optional[Path] = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> PredictSummary:
    """Predict every input into ``output``; a file that fails is reported and the others still run.

    Resumable: an input whose mask already exists in ``output`` is skipped unless ``overwrite``.
    ``prior_dir``: PD-DDPM pre-segmentations as 2D masks with the inputs' stems.
    """
    import time

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary()
    k = predictor.num_classes
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), desc="predict", unit="img", dynamic_ncols=True)
    nfes: list[int] = []
    times: list[float] = []
    for path in inputs:
        sid = _stem(path)
        volume = path.name.lower().endswith(VOLUME_EXTS) or path.is_dir()
        target = out / (f"{sid}.nii.gz" if volume else f"{sid}.png")
        if target.exists() and not overwrite:
            summary.skipped.append(sid)
            if bar:
                bar.update(1)
            continue
        t0 = time.time()
        try:
            if volume:
                import nibabel as nib

                if path.is_dir():
                    sitk_img, data = _read_dicom(path)
                    pred = predictor.predict_volume(data, predictor.cfg.data.slice_axis, str(path))
                    import SimpleITK as sitk

                    lab = sitk.GetImageFromArray(np.transpose(pred.label, (2, 1, 0)).astype(np.uint8))
                    lab.CopyInformation(sitk_img)
                    sitk.WriteImage(lab, str(target))
                else:
                    img, data = _read_volume(path)
                    pred = predictor.predict_volume(data, predictor.cfg.data.slice_axis, str(path))
                    hdr = img.header.copy()
                    hdr.set_data_dtype(np.uint8)
                    nib.save(nib.Nifti1Image(pred.label.astype(np.uint8), img.affine, hdr), str(target))
            else:
                try:
                    arr = read_image(path)
                except Exception as err:
                    raise InputError(f"{path}: cannot read image ({err})") from None
                pm = None
                if prior_dir is not None:
                    cand = [f for f in sorted(prior_dir.glob(f"{sid}.*")) if f.name.lower().endswith(IMAGE_EXTS)]
                    if not cand:
                        raise InputError(f"{path}: no prior mask named {sid}.* in {prior_dir}")
                    from diffmis.data import read_mask

                    pm = read_mask(cand[0])
                pred = predictor.predict_array(arr, str(path), prior_mask=pm)
                _save_png_label(pred.label, k, target)
            if save_prob:
                (out / "prob").mkdir(exist_ok=True)
                np.save(out / "prob" / f"{sid}.npy", pred.probability.astype(np.float32))
            if save_uncertainty:
                (out / "uncertainty").mkdir(exist_ok=True)
                (out / "entropy").mkdir(exist_ok=True)
                np.save(out / "uncertainty" / f"{sid}.npy", pred.variance.astype(np.float32))
                np.save(out / "entropy" / f"{sid}.npy", pred.entropy.astype(np.float32))
            summary.written.append(sid)
            nfes.append(pred.nfe)
            times.append(time.time() - t0)
        except InputError as err:
            summary.failed[sid] = str(err)
            log(f"predict: FAILED {err}")
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if nfes:
        summary.nfe_per_image = float(np.mean(nfes))
        summary.seconds_per_image = float(np.mean(times))
    (out / "predict_summary.json").write_text(json.dumps(summary.__dict__, indent=2))
    return summary
