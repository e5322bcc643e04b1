"""Prediction with a trained run: ``Predictor.from_run(RUN)`` in memory, ``predict_paths`` over files.

Inputs: PNG/JPEG/TIFF/BMP images; NIfTI volumes, segmented slice-wise along the run's ``data.slice_axis`` and
written back as volumes with the input's affine and header (nnU-Net multi-channel cases ``<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ... are grouped into one input ``<case>``); DICOM series (a folder of DICOM files, read
with SimpleITK and written as NIfTI with the series' geometry). Outputs are lossless: PNG label maps (K = 1:
{0, 255}; K > 1: the class index 0..K-1) or NIfTI, never JPEG. On request: probability maps
(``prob/<id>.npy``, float32 (K, H, W) or (K, X, Y, Z)) and uncertainty maps (``uncertainty/<id>.npy``, the
ensemble variance, and ``entropy/<id>.npy``, the entropy of the member mean in bits; both (H, W) or
(X, Y, Z), as :func:`diffmis.ensemble.uncertainty_maps` defines them).

Geometry (the same as training):

- ``data.image_size`` set: each image is resized to it (raw intensities, before normalisation, as the dataset
  does) and the probabilities are resized back to the input's size (bilinear).
- ``data.patch_size`` set (e.g. DRIVE, trained on random patches): MONAI's ``SlidingWindowInferer`` runs the
  network on patch-sized windows (overlap 0.25, Gaussian blending) over the image at its working size (native
  when ``image_size`` is None); images smaller than a window are padded up to one and cropped back.
- neither: the whole native image, padded to a multiple of 32 and cropped back.

Batching: the ensemble members of an image always go through the network together (``ensemble_predict``);
2D images of a folder are grouped ``batch_size`` at a time (same size needed only for sliding-window and
native geometry), volume slices ``batch_size`` at a time, sliding windows ``batch_size`` per call. Sampling
noise comes from one generator seeded per network batch, so results are reproducible for a given input list,
batch size and seed.
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
import torch
import torch.nn.functional as F

from diffmis.config import Config, load_config
from diffmis.data import (normalize_intensity, read_image, read_mask, read_volume, resize_image, resize_labels,
                          write_volume_like)
from diffmis.diffusion import GaussianMethod, HiDiffMethod, SegmentationMethod, SegmentorMethod, build
from diffmis.ensemble import ensemble_predict, hard_mask, uncertainty_maps
from diffmis.errors import CheckpointError, ConfigError, DiffmisError, InputError
from diffmis.hardware import resolve_for
from diffmis.training.checkpoint import load_checkpoint
from diffmis.utils import atomic_write_bytes, autocast, write_json

__all__ = ["Predictor", "Prediction", "InputCase", "predict_paths", "PredictSummary", "IMAGE_EXTS", "VOLUME_EXTS",
           "find_inputs"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTS = (".nii.gz", ".nii")
FUSE_METHODS = ("mean", "staple", "mean_squared")
_NATIVE_MULTIPLE = 32  # native-size inference pads to this multiple (every model's total downsampling divides it)
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")

PathLike = Union[str, Path]


@dataclass
class Prediction:
    """One image's (or volume's) result at the input's size.

    ``label``: (H, W) int64 ({0, 1} for K = 1, 0..K-1 otherwise); ``probability``: (K, H, W) fused probabilities
    in [0, 1]; ``variance``: (H, W) ensemble variance summed over channels; ``entropy``: (H, W) entropy of the
    member mean in bits (see :func:`diffmis.ensemble.uncertainty_maps`; with one member it is the entropy of
    its probabilities and the variance is zero); ``nfe``: batched network evaluations spent on the batch (or
    all batches of a volume) this result came from. Volumes: (X, Y, Z) maps and (K, X, Y, Z) probabilities.
    """

    label: np.ndarray
    probability: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray
    nfe: int


def _method_kind(method: SegmentationMethod) -> str:
    if isinstance(method, GaussianMethod):
        return "gaussian"
    if isinstance(method, HiDiffMethod):
        return "bernoulli"
    return "direct"


def sliding_window_inferer(patch_size: Sequence[int], batch_size: int, padding_mode: str = "constant") -> Any:
    """MONAI ``SlidingWindowInferer`` with diffmis's window geometry (patch-sized windows, overlap 0.25, Gaussian
    blending), shared by :class:`Predictor` and in-training validation of patch-trained runs."""
    from monai.inferers import SlidingWindowInferer

    return SlidingWindowInferer(roi_size=tuple(patch_size), sw_batch_size=batch_size, overlap=0.25, mode="gaussian",
                                padding_mode=padding_mode, progress=False)


_SAMPLERS = {"gaussian": ("ddim", "ddpm"), "bernoulli": ("bernoulli", "bernoulli_ddim"), "direct": ("direct",)}


class Predictor:
    """A trained method plus its config, ready to segment arrays.

    Args:
        method: the built method with weights loaded (EMA weights where the run had them).
        cfg: the run's resolved config.
        device: where the network runs (default: where ``method``'s parameters are).
        steps, ensemble, fuse, start_step, sampler, precision, batch_size: sampling settings; None takes the
            run's ``sample`` section (``precision``: ``train.precision``, resolved for ``device`` when ``auto``).
        prior: PD-DDPM pre-segmentation source for Gaussian runs: a :class:`Predictor` (e.g. of a segmentor
            run) whose hard masks start the chain at ``start_step``; None uses prior masks given per call, else
            the method's own prior segmentor (PD-DDPM runs).
        seed: seed of the sampling noise (one generator per network batch).

    Raises:
        ConfigError: a setting that does not fit the run (sampler of another diffusion kind, steps or start step
            out of range, a prior for a non-Gaussian run, unknown fusion).
    """

    def __init__(self, method: SegmentationMethod, cfg: Config, *, device: Optional[Union[str, torch.device]] = None,
                 steps: Optional[int] = None, ensemble: Optional[int] = None, fuse: Optional[str] = None,
                 start_step: Optional[int] = None, sampler: Optional[str] = None, precision: Optional[str] = None,
                 batch_size: Optional[int] = None, prior: Optional["Predictor"] = None, seed: int = 0) -> None:
        if device is not None:
            method = method.to(torch.device(device))
        self.method = method.eval()
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(method.parameters()).device
        self.in_channels = cfg.data.in_channels
        self.num_classes = cfg.data.num_classes
        self.threshold = cfg.sample.threshold
        self.eta = cfg.sample.eta
        self.seed = seed
        self.kind = _method_kind(method)
        recipe = cfg.experiment.recipe

        self.ensemble = cfg.sample.ensemble if ensemble is None else int(ensemble)
        if self.ensemble < 1:
            raise ConfigError(f"ensemble must be >= 1, got {self.ensemble}")
        self.fuse = fuse or cfg.sample.fuse
        if self.fuse not in FUSE_METHODS:
            raise ConfigError(f"fuse must be one of {', '.join(FUSE_METHODS)}; got {self.fuse!r}")
        self.batch_size = cfg.sample.batch_size if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        requested = precision or cfg.train.precision
        if requested not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16; got {requested!r}")
        if requested == "fp16" and self.device.type == "cpu":
            requested = "fp32"  # CPU fp16 autocast is slow and gains nothing at inference
        # precision and layout are chosen for the device that predicts, not the one that trained (diffmis.hardware)
        self.resolved = resolve_for(requested, cfg.train.channels_last if precision is None else "auto", self.device)
        self.precision = self.resolved.precision
        if self.resolved.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)

        allowed = _SAMPLERS[self.kind]
        if sampler is not None and sampler not in allowed:
            raise ConfigError(f"sampler {sampler!r} does not fit this {recipe} run ({self.kind} sampling); "
                              f"use {' or '.join(allowed)}")
        self.sampler = sampler or method.default_sampler

        if start_step is not None and self.kind != "gaussian":
            raise ConfigError(f"a start step (PD-DDPM start) needs a Gaussian diffusion run; this run is {recipe}")
        self.start_step = start_step if start_step is not None else getattr(method, "default_start_step", None)
        # start_step=0: the full chain from pure noise, even for a run whose default is a PD-DDPM start
        self.pure_noise = start_step == 0
        if self.pure_noise:
            self.start_step = None
        timesteps = getattr(getattr(method, "scheduler", None), "timesteps", None)
        if self.start_step is not None and timesteps is not None and not 1 <= self.start_step <= timesteps:
            raise ConfigError(f"start step {self.start_step} is outside 1..{timesteps} (diffusion.timesteps)")
        default_steps = getattr(method, "default_steps", None) or cfg.sample.steps
        self.steps = int(steps) if steps is not None else int(default_steps)
        if self.kind != "direct":
            limit = self.start_step or timesteps
            if not 1 <= self.steps <= limit:
                raise ConfigError(f"steps={self.steps} is outside 1..{limit} "
                                  f"({'the start step' if self.start_step else 'diffusion.timesteps'})")

        if prior is not None:
            if self.kind != "gaussian":
                raise ConfigError(f"a prior (PD-DDPM start) needs a Gaussian diffusion run; this run is {recipe}")
            if self.start_step is None:
                raise ConfigError("a prior needs a start step (--start-step, or sample.start_step of the run)")
            if prior.num_classes != self.num_classes or prior.in_channels != self.in_channels:
                raise ConfigError(f"the prior run predicts {prior.num_classes} class channel(s) from "
                                  f"{prior.in_channels} image channel(s); this run {self.num_classes} from "
                                  f"{self.in_channels}")
        self.prior = prior

        d = cfg.data
        self.image_size: Optional[tuple[int, int]] = tuple(d.image_size) if d.image_size else None
        self.patch_size: Optional[tuple[int, int]] = tuple(d.patch_size) if d.patch_size else None
        self.inferer = None
        if self.patch_size is not None:  # built once; MONAI caches the Gaussian importance map across calls
            self.inferer = sliding_window_inferer(self.patch_size, self.batch_size)
        self._nfe = 0

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run: PathLike, *, checkpoint: Literal["best", "last"] = "best",
                 use_ema: Optional[bool] = None, device: Optional[Union[str, torch.device]] = None,
                 prior_only: bool = False, prior: Optional[Union["Predictor", PathLike]] = None,
                 **kwargs: Any) -> "Predictor":
        """Load a run folder (config and weights come from the run; ``best`` falls back to ``last``).

        Args:
            use_ema: load the EMA weights where the run has them (default: the run's ``sample.use_ema``).
            device: default CPU.
            prior_only: predict with the run's segmentor alone (HiDiff's prior, PD-DDPM's pre-segmentation).
            prior: a :class:`Predictor` or a run folder whose masks start PD-DDPM sampling (see the class).
            **kwargs: sampling settings of :class:`Predictor`.

        Raises:
            CheckpointError: the folder is missing or incomplete, or the weights were written by another recipe
                or model or do not fit the config (the message names the tensor).
            ConfigError: the run's config is invalid, or a sampling setting does not fit the run.
        """
        run = Path(run)
        if not run.is_dir():
            raise CheckpointError(f"run folder {run} does not exist")
        if not (run / "config.yaml").is_file():
            raise CheckpointError(f"{run} is not a diffmis run: {run / 'config.yaml'} is missing")
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
        shadow = state.get("ema_shadow")
        if (cfg.sample.use_ema if use_ema is None else use_ema) and ema_mod is not None and shadow:
            own = ema_mod.state_dict()
            bad = [k for k, v in shadow.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
            if bad:
                raise CheckpointError(f"{ck / 'ema.safetensors'} does not fit this model: tensor '{bad[0]}'")
            ema_mod.load_state_dict(shadow, strict=False)
        if prior_only:
            seg = getattr(method, "segmentor", None)
            if seg is None:
                seg = getattr(method, "prior", None)
            if seg is None:
                raise CheckpointError(f"{run} ({cfg.experiment.recipe}) has no segmentor to predict with alone")
            if kwargs.get("ensemble") is None:  # one deterministic forward pass: members would be identical
                kwargs["ensemble"] = 1
            method = SegmentorMethod(seg, cfg.data.num_classes, {})
        if prior is not None and not isinstance(prior, Predictor):
            prior = cls.from_run(prior, device=dev, ensemble=1, batch_size=kwargs.get("batch_size"))
        return cls(method, cfg, device=dev, prior=prior, **kwargs)

    # ---- network space -------------------------------------------------------------------------------------

    def check_channels(self, channels: int, source: str) -> None:
        """Raise an InputError naming ``source`` and both counts unless the model takes ``channels``."""
        if channels != self.in_channels:
            raise InputError(f"{source}: the input has {channels} channel(s) but the model takes "
                             f"{self.in_channels} (data.in_channels of the run)")

    def _prior_classes(self, mask: np.ndarray, source: str) -> np.ndarray:
        """A prior mask's stored values -> class indices 0..K-1 (K = 1: any non-zero value is foreground)."""
        lab = np.asarray(mask)
        if lab.dtype.kind not in "iub":
            raise InputError(f"{source}: the prior mask is not an integer label map ({lab.dtype})")
        if self.num_classes == 1:
            return (lab > 0).astype(np.uint8)
        if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
            raise InputError(f"{source}: prior mask label {int(lab.max())} is outside 0..{self.num_classes - 1}")
        return lab.astype(np.uint8 if self.num_classes < 256 else np.int32)

    def _to_network(self, image: np.ndarray, source: str, prior: Optional[np.ndarray]) -> torch.Tensor:
        """Raw (C, H, W) image [+ (H, W) prior labels] -> normalised (C [+ K], h, w) at the working size."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise InputError(f"{source}: expected a (C, H, W) or (H, W) image, got shape {image.shape}")
        self.check_channels(image.shape[0], source)
        hw = tuple(image.shape[1:])
        resize = self.image_size is not None and hw != self.image_size
        if resize:
            image = resize_image(image.astype(np.float32, copy=False), self.image_size)
        arr = normalize_intensity(image, self.cfg.data.normalize, tuple(self.cfg.data.ct_window))
        if prior is not None:
            if tuple(np.shape(prior)) != hw:
                raise InputError(f"{source}: the prior mask is {tuple(np.shape(prior))}, the image {hw}")
            lab = self._prior_classes(prior, source)
            if resize:
                lab = resize_labels(lab, self.image_size)
            if self.num_classes == 1:
                onehot = lab[None].astype(np.float32)
            else:
                onehot = (lab[None] == np.arange(self.num_classes)[:, None, None]).astype(np.float32)
            arr = np.concatenate([arr, onehot], axis=0)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def _members(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C [+ K prior], h, w) network-space input -> (B, 2K + 1, h, w): fused probabilities, the member
        mean and the ensemble variance (MONAI's sliding window calls this once per window batch)."""
        c = self.in_channels
        img = x[:, :c]
        kw: dict[str, Any] = {"steps": self.steps, "sampler": self.sampler}
        extra_nfe = 0
        if self.kind == "gaussian":
            kw["eta"] = self.eta
            if self.pure_noise:
                kw["start_step"] = 0
            elif self.start_step is not None:
                if x.shape[1] > c:  # prior channels carried with the image (resized / windowed alike)
                    init = (x[:, c:] > 0.5).float()
                else:  # the method's own pre-segmentation, once per image (not once per member)
                    p = self.method.prior_probs(img)
                    init = hard_mask(p, 0.5)
                    init = init[:, None].float() if p.shape[1] == 1 else F.one_hot(init, p.shape[1]).permute(
                        0, 3, 1, 2).float()
                    extra_nfe = 1
                kw["init"] = init  # batch B: ensemble_predict repeats it like the image (repeat_interleave)
                kw["start_step"] = self.start_step
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        if self.resolved.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.device, self.precision):
            res = ensemble_predict(self.method, img, n=self.ensemble, fuse=self.fuse, threshold=self.threshold,
                                   keep_samples=True, generator=gen, **kw)
        self._nfe += res.nfe + extra_nfe
        assert res.samples is not None
        mean = res.samples.float().mean(0)
        return torch.cat([res.probability.float(), mean, res.uncertainty["variance"].float()], dim=1)

    @staticmethod
    def _pad(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Pad (bottom/right) to at least (h, w): reflect where the image is large enough, else replicate."""
        ph, pw = max(0, h - x.shape[-2]), max(0, w - x.shape[-1])
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if (ph < x.shape[-2] and pw < x.shape[-1]) else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C [+ K], h, w) at the working size -> (B, 2K + 1, h, w) on the CPU."""
        x = x.to(self.device)
        h, w = x.shape[-2:]
        if self.inferer is not None:
            ph, pw = self.patch_size  # type: ignore[misc]
            out = self.inferer(self._pad(x, ph, pw), self._members)[..., :h, :w]
        elif self.image_size is None:
            m = _NATIVE_MULTIPLE
            out = self._members(self._pad(x, -(-h // m) * m, -(-w // m) * m))[..., :h, :w]
        else:
            out = self._members(x)
        return out.float().cpu()

    # ---- public --------------------------------------------------------------------------------------------

    def predict_batch(self, images: Sequence[np.ndarray], sources: Optional[Sequence[str]] = None,
                      prior_masks: Optional[Sequence[Optional[np.ndarray]]] = None) -> list[Prediction]:
        """Segment several 2D images in one network batch (see :meth:`predict_array`).

        With ``data.image_size`` the images may differ in size; otherwise (sliding window, native) they must
        share it. ``prior_masks``: one (H, W) label map (or None) per image.
        """
        n = len(images)
        if n == 0:
            return []
        sources = list(sources) if sources is not None else [f"<array {i}>" for i in range(n)]
        priors: list[Optional[np.ndarray]] = list(prior_masks) if prior_masks is not None else [None] * n
        given = [p is not None for p in priors]
        if any(given) and not all(given):
            raise InputError(f"prior masks given for some images of a batch only: {sources}")
        if any(given) or self.prior is not None:
            if self.kind != "gaussian" or self.start_step is None:
                raise ConfigError("prior masks need a Gaussian diffusion run and a start step (--start-step)")
        if not any(given) and self.prior is not None:
            priors = [p.label for p in self.prior.predict_batch(images, sources)]
        if self.kind == "gaussian" and self.start_step is not None and priors[0] is None and \
                self.method.prior is None:
            raise InputError(f"{sources[0]}: start step {self.start_step} needs a prior (prior masks or a prior "
                             "run, --prior): this run has no pre-segmentation network")
        xs = [self._to_network(im, s, p) for im, s, p in zip(images, sources, priors)]
        if len({tuple(x.shape) for x in xs}) > 1:
            raise InputError(f"images of one batch must share their size without data.image_size: "
                             f"{[tuple(x.shape[1:]) for x in xs]}")
        self._nfe = 0
        out = self._forward(torch.stack(xs))
        nfe = self._nfe
        k = self.num_classes
        results = []
        for i, im in enumerate(images):
            hw = tuple(np.shape(im)[-2:])
            o = out[i: i + 1]
            if tuple(o.shape[-2:]) != hw:  # back from image_size to the input's size
                o = F.interpolate(o, size=hw, mode="bilinear", align_corners=False)
            prob = o[:, :k].clamp(0.0, 1.0)
            mean = o[:, k: 2 * k].clamp(0.0, 1.0)
            var = o[:, 2 * k:].clamp_min(0.0)
            ent = uncertainty_maps(mean[None])["entropy"]  # entropy of the member mean, bits (as ensemble.py)
            results.append(Prediction(label=hard_mask(prob, self.threshold)[0].numpy(), probability=prob[0].numpy(),
                                      variance=var[0, 0].numpy(), entropy=ent[0, 0].numpy(), nfe=nfe))
        return results

    def predict_array(self, image: np.ndarray, source: str = "<array>",
                      prior_mask: Optional[np.ndarray] = None) -> Prediction:
        """Segment one 2D image.

        Args:
            image: (C, H, W) or (H, W) raw intensities (the run's resizing and normalisation are applied here).
            source: name used in error messages (e.g. the file).
            prior_mask: optional (H, W) label map (0..K-1; for K = 1 any non-zero value is foreground): the
                PD-DDPM pre-segmentation the chain starts from at the start step (Gaussian runs).
        Returns:
            a :class:`Prediction` at the input's (H, W).
        Raises:
            InputError: wrong channel count (both counts named), bad shape, prior mask mismatch.
        """
        return self.predict_batch([image], [source], None if prior_mask is None else [prior_mask])[0]

    def predict_volume(self, volume: np.ndarray, axis: Optional[int] = None, source: str = "<volume>",
                       prior_mask: Optional[np.ndarray] = None,
                       progress: Optional[Callable[[int], None]] = None) -> Prediction:
        """Segment a (C, X, Y, Z) or (X, Y, Z) volume slice by slice along ``axis`` (spatial axis 0..2;
        default ``data.slice_axis``), ``batch_size`` slices per network batch; each slice is normalised on
        its own, as training does. ``prior_mask``: optional (X, Y, Z) label volume. Returns (X, Y, Z) maps
        and (K, X, Y, Z) probabilities."""
        axis = self.cfg.data.slice_axis if axis is None else axis
        vol = np.asarray(volume)
        if vol.ndim == 3:
            vol = vol[None]
        if vol.ndim != 4:
            raise InputError(f"{source}: expected a (C, X, Y, Z) or (X, Y, Z) volume, got shape {volume.shape}")
        self.check_channels(vol.shape[0], source)
        if prior_mask is not None and tuple(np.shape(prior_mask)) != vol.shape[1:]:
            raise InputError(f"{source}: the prior mask is {tuple(np.shape(prior_mask))}, the volume {vol.shape[1:]}")
        slices = np.moveaxis(vol, 1 + axis, 1)  # (C, S, A, B)
        pri = None if prior_mask is None else np.moveaxis(np.asarray(prior_mask), axis, 0)
        n = slices.shape[1]
        parts: list[Prediction] = []
        nfe = 0
        for i0 in range(0, n, self.batch_size):
            idx = range(i0, min(n, i0 + self.batch_size))
            preds = self.predict_batch([slices[:, i] for i in idx], [f"{source} slice {i}" for i in idx],
                                       None if pri is None else [pri[i] for i in idx])
            parts.extend(preds)
            nfe += preds[0].nfe
            if progress:
                progress(len(idx))

        def stack(name: str, ax: int) -> np.ndarray:
            return np.stack([getattr(p, name) for p in parts], axis=ax)

        return Prediction(label=stack("label", axis), probability=stack("probability", 1 + axis),
                          variance=stack("variance", axis), entropy=stack("entropy", axis), nfe=nfe)


# ------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------


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


def _split(name: str) -> tuple[str, str]:
    low = name.lower()
    for ext in (*VOLUME_EXTS, *IMAGE_EXTS):
        if low.endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


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
        m = _CHANNEL_RE.match(_split(f.name)[0])
        if m is None:
            parsed = {}
            break
        parsed.setdefault(m["case"], {})[int(m["chan"])] = f
    if parsed:
        counts = {len(ch) for ch in parsed.values()}
        ok = len(counts) == 1 and all(sorted(ch) == list(range(len(ch))) for ch in parsed.values())
        if ok and (in_channels is None or counts == {in_channels}):
            return [InputCase(case, "nifti", tuple(ch[i] for i in range(len(ch)))) for case, ch in parsed.items()]
    return [InputCase(_split(f.name)[0], "nifti", (f,)) for f in files]


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
        low = p.name.lower()
        if low.endswith(VOLUME_EXTS):
            return _group_volumes([p], in_channels)
        if low.endswith(IMAGE_EXTS):
            return [InputCase(_split(p.name)[0], "image", (p,))]
        raise InputError(f"{p}: not an image (png/jpg/tif/bmp) or NIfTI volume (.nii/.nii.gz)")
    cases: list[InputCase] = []
    volumes: list[Path] = []
    for f in sorted(p.iterdir()):
        low = f.name.lower()
        if f.name.startswith("."):
            continue
        if f.is_file() and low.endswith(VOLUME_EXTS):
            volumes.append(f)
        elif f.is_file() and low.endswith(IMAGE_EXTS):
            cases.append(InputCase(_split(f.name)[0], "image", (f,)))
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
        stem, ext = _split(f.name)
        if f.is_file() and ext and not f.name.startswith("."):
            out.setdefault(stem, f)
    return out


def _prior_for(case: InputCase, priors: Optional[dict[str, Path]], prior_dir: Optional[Path]) -> Optional[np.ndarray]:
    if priors is None:
        return None
    f = priors.get(case.id)
    if f is None:
        raise InputError(f"{case.name}: no prior mask named {case.id}.* in {prior_dir}")
    if f.name.lower().endswith(VOLUME_EXTS):
        data = read_volume(f).data
        if data.dtype.kind == "f":
            if not np.all(data == np.round(data)):
                raise InputError(f"{f}: the prior mask holds non-integer values")
            data = data.astype(np.int32)
        return data
    return read_mask(f)


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
                image = read_image(case.paths[0])
                predictor.check_channels(image.shape[0], case.name)
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
                pred = predictor.predict_volume(data, axis, case.name, prior_mask=prior)
                writer.maps(case, pred)
                slices = np.moveaxis(pred.label, axis, 0)
                writer.volume(writer.mask(case),
                              lambda tmp: write_volume_like(case.paths[0], slices, tmp, slice_axis=axis))
            else:
                import SimpleITK as sitk

                img, data = _read_dicom(case.paths[0])
                pred = predictor.predict_volume(data, axis, case.name, prior_mask=prior)
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
