"""The in-memory predictor: ``Predictor.from_run(RUN)``, then ``predict_array`` / ``predict_batch`` /
``predict_volume`` on raw arrays. Files are the job of :mod:`diffmis.inference.files`.

Geometry (the same as training):

- ``data.image_size`` set: each image is resized to it (raw intensities, before normalisation, as the dataset
  does) and the results are resized back to the input's size (bilinear).
- ``data.patch_size`` set (e.g. DRIVE, trained on random patches): sliding windows of the patch size
  (``diffmis.windows``: overlap 0.25, Gaussian blending) over the image at its working size (native when
  ``image_size`` is None); images smaller than a window are padded up to one and cropped back.
- neither: the whole native image, padded to a multiple of 32 and cropped back.

The network sees named tensors: the image, and an optional prior mask (PD-DDPM start) that is resized, padded
and windowed with it; it returns named tensors (the fused probability, the member mean and the ensemble
variance), each blended over the windows. The entropy is computed once, from the blended member mean.

Batching: the ensemble members of an image always go through the network together (``ensemble_predict``);
images ``batch_size`` at a time, volume slices ``batch_size`` at a time, sliding windows ``batch_size`` per call.
Sampling noise comes from one generator seeded per network batch, so results are reproducible for a given input
list, batch size and seed.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from diffmis.calibration import apply_temperature, run_temperature
from diffmis.checkpoint import load_checkpoint
from diffmis.config import Config, load_config
from diffmis.cuda_graphs import StepGraphs
from diffmis.data import normalize_intensity, resize_image, resize_labels
from diffmis.ensemble import FUSE_METHODS, entropy_bits, ensemble_predict
from diffmis.errors import CheckpointError, ConfigError, InputError
from diffmis.hardware import prefer_fast_kernels, resolve_for
from diffmis.masks import hard_labels, one_hot
from diffmis.methods import Method, SegmentorMethod, build
from diffmis.utils import autocast
from diffmis.windows import crop_windows, pad_to, sliding_window_inferer

__all__ = ["Predictor", "Prediction"]

_NATIVE_MULTIPLE = 32  # native-size inference pads to this multiple (every model's total downsampling divides it)
PathLike = Union[str, Path]


@dataclass
class Prediction:
    """One image's (or volume's) result at the input's size.

    ``label``: (H, W) int64 ({0, 1} for K = 1, 0..K-1 otherwise); ``probability``: (K, H, W) fused probabilities
    in [0, 1]; ``variance``: (H, W) ensemble variance summed over channels; ``entropy``: (H, W) entropy of the
    member mean in bits (:func:`diffmis.ensemble.entropy_bits`; with one member it is the entropy of its
    probabilities and the variance is zero); ``nfe``: batched network evaluations spent on the batch (or all
    batches of a volume) this result came from. Volumes: (X, Y, Z) maps and (K, X, Y, Z) probabilities.
    """

    label: np.ndarray
    probability: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray
    nfe: int


class Predictor:
    """A trained method plus its config, ready to segment arrays.

    Args:
        method: the built method with weights loaded (EMA weights where the run had them).
        cfg: the run's resolved config.
        device: where the network runs (default: where ``method``'s parameters are).
        steps, ensemble, fuse, start_step, sampler, precision, batch_size: sampling settings; None takes the
            run's ``sample`` section (``precision``: ``train.precision``, resolved for ``device`` when ``auto``).
            ``start_step=0`` runs the full chain from pure noise on a run whose default is a PD-DDPM start.
        prior: PD-DDPM pre-segmentation source: a :class:`Predictor` (e.g. of a segmentor run) whose hard masks
            start the chain at ``start_step``; None uses prior masks given per call, else the method's own
            pre-segmentation network (PD-DDPM runs).
        seed: seed of the sampling noise (one CPU generator per network batch: a seed gives the same masks, to
            rounding, on a CPU and on a GPU).
        tta: mirror test-time augmentation: average the outputs over the flips of every subset of the spatial
            axes (4 passes in 2D, 8 in 3D).
        cuda_graphs: replay the per-step network calls from CUDA graphs (``diffmis.cuda_graphs``); None (the
            default): on for CUDA devices whenever the method has a per-step network. Ignored on CPUs.
        temperature: applied to the final probability and member mean (``diffmis.calibration``; labels never
            move); None takes ``sample.temperature`` (:meth:`from_run`: the run's ``calibration.json`` first).

    Raises:
        ConfigError: a setting that does not fit the run (a sampler of another family, steps or start step out
            of range, a prior for a run that cannot start from one, unknown fusion).
    """

    def __init__(self, method: Method, cfg: Config, *, device: Optional[Union[str, torch.device]] = None,
                 steps: Optional[int] = None, ensemble: Optional[int] = None, fuse: Optional[str] = None,
                 start_step: Optional[int] = None, sampler: Optional[str] = None, precision: Optional[str] = None,
                 batch_size: Optional[int] = None, prior: Optional["Predictor"] = None, seed: int = 0,
                 tta: bool = False, cuda_graphs: Optional[bool] = None,
                 temperature: Optional[float] = None) -> None:
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
        self.tta = bool(tta)
        self.spatial_dims = cfg.data.spatial_dims
        self.temperature = float(cfg.sample.temperature if temperature is None else temperature)
        self.temperature_source = "sample.temperature" if temperature is None else "argument"
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {temperature!r}")

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
        self.resolved = resolve_for(requested, cfg.train.channels_last if precision is None else "auto", self.device,
                                    cfg.data.spatial_dims)
        self.precision = self.resolved.precision
        if self.resolved.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        prefer_fast_kernels(self.device)
        net = method.step_network() if self.device.type == "cuda" and cuda_graphs is not False else None
        self.graphs: Optional[StepGraphs] = StepGraphs(net) if net is not None else None

        # sampler settings, checked against the method (its samplers, T, whether it takes a start step)
        method.check_sampling(steps=steps, sampler=sampler, start_step=start_step)
        self.sampler = sampler or method.default_sampler
        self.pure_noise = start_step == 0  # the full chain from noise, even where the default is a PD-DDPM start
        self.start_step = None if self.pure_noise else (start_step or method.default_start_step)
        self.steps = int(steps) if steps is not None else int(method.default_steps)
        method.check_sampling(steps=self.steps, start_step=self.start_step)
        untrained = method.untrained_timesteps(self.steps, self.start_step)
        if untrained:
            warnings.warn(
                f"this {cfg.experiment.recipe} run trained its network only at the timesteps its default sampler "
                f"visits (diffusion.train_timesteps: sampler, sample.steps {method.default_steps}); {self.steps} steps"
                f"{f' from start step {self.start_step}' if self.start_step else ''} also visit timesteps "
                f"{untrained}, where it never trained: expect worse masks. Predict with the run's own steps, or "
                f"train with diffusion.train_timesteps: all", UserWarning, stacklevel=3)
        if prior is not None:
            if not method.takes_start_step:
                raise ConfigError(f"a prior (PD-DDPM start) needs a Gaussian diffusion run; this run is "
                                  f"{cfg.experiment.recipe}")
            if self.start_step is None:
                raise ConfigError("a prior needs a start step (--start-step, or sample.start_step of the run)")
            if prior.num_classes != self.num_classes or prior.in_channels != self.in_channels:
                raise ConfigError(f"the prior run predicts {prior.num_classes} class channel(s) from "
                                  f"{prior.in_channels} image channel(s); this run {self.num_classes} from "
                                  f"{self.in_channels}")
        self.prior = prior

        d = cfg.data
        self.image_size: Optional[tuple[int, int]] = tuple(d.image_size) if d.image_size else None  # type: ignore
        self.patch_size: Optional[tuple[int, int]] = tuple(d.patch_size) if d.patch_size else None  # type: ignore
        self.inferer = None
        if self.patch_size is not None:  # built once; MONAI caches the Gaussian importance map across calls
            self.inferer = sliding_window_inferer(self.patch_size, self.batch_size, with_coord=True)
        self._nfe = 0

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run: PathLike, *, checkpoint: Literal["best", "last"] = "best",
                 use_ema: Optional[bool] = None, device: Optional[Union[str, torch.device]] = None,
                 segmentor_only: bool = False, prior: Optional[Union["Predictor", PathLike]] = None,
                 **kwargs: Any) -> "Predictor":
        """Load a run folder (config and weights come from the run; ``best`` falls back to ``last``).

        Args:
            use_ema: load the EMA weights where the run has them (default: the run's ``sample.use_ema``).
            device: default CPU.
            segmentor_only: predict with the run's segmentor alone (:meth:`Method.segmentor_module`, e.g. a
                diffusion method's prior or condition network): one forward pass.
            temperature: None: the run's ``calibration.json`` where it was fitted for the same network (the whole
                method or its segmentor alone) and checkpoint, else the config's ``sample.temperature``.
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
        if segmentor_only:
            seg = method.segmentor_module()
            if seg is None:
                raise ConfigError(f"{run} ({cfg.experiment.recipe}) has no segmentor to predict with alone")
            for key in ("steps", "sampler", "start_step"):
                if kwargs.get(key) not in (None, "direct"):
                    raise ConfigError(f"--segmentor-only predicts with one forward pass: {key} does not apply")
                kwargs.pop(key, None)
            if kwargs.get("ensemble") is None:  # one deterministic forward pass: members would be identical
                kwargs["ensemble"] = 1
            method = SegmentorMethod(seg, cfg.data.num_classes)
        if prior is not None and not isinstance(prior, Predictor):
            prior = cls.from_run(prior, device=dev, ensemble=1, batch_size=kwargs.get("batch_size"))
        pred = cls(method, cfg, device=dev, prior=prior, **kwargs)
        if kwargs.get("temperature") is None:
            t = run_temperature(run, segmentor_only=segmentor_only, checkpoint=ck.name, default=pred.temperature,
                                settings=pred.sampling_settings())
            if t != pred.temperature:
                pred.temperature, pred.temperature_source = t, str(run / "calibration.json")
        return pred

    def sampling_settings(self) -> dict[str, Any]:
        """The settings that shape the probability maps (a temperature is fitted to, and checked against, them)."""
        return {"sampler": self.sampler, "steps": self.steps, "ensemble": self.ensemble, "fuse": self.fuse,
                "start_step": self.start_step, "tta": self.tta}

    # ---- network space -------------------------------------------------------------------------------------

    def check_channels(self, channels: int, source: str) -> None:
        """Raise an InputError naming ``source`` and both counts unless the model takes ``channels``."""
        if channels != self.in_channels:
            raise InputError(f"{source}: the input has {channels} channel(s) but the model takes "
                             f"{self.in_channels} (data.in_channels of the run)")

    def fit_channels(self, image: np.ndarray, source: str) -> np.ndarray:
        """``(C, H, W)`` image as the model takes it: a grey image for a 3-channel run is repeated to 3 channels
        (as training reads a grey image in a colour dataset); any other mismatch is an InputError."""
        if image.shape[0] == 1 and self.in_channels == 3:
            return np.repeat(image, 3, axis=0)
        self.check_channels(image.shape[0], source)
        return image

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

    def _to_network(self, image: np.ndarray, source: str, prior: Optional[np.ndarray]
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw (C, H, W) image [+ (H, W) prior labels] -> normalised (C, h, w) [+ one-hot (K, h, w)] at the
        working size."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise InputError(f"{source}: expected a (C, H, W) or (H, W) image, got shape {image.shape}")
        image = self.fit_channels(image, source)
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise InputError(f"{source}: the image holds NaN or infinite values; nothing was predicted for it")
        hw = tuple(image.shape[1:])
        resize = self.image_size is not None and hw != self.image_size
        if resize:
            image = resize_image(image.astype(np.float32, copy=False), self.image_size)
        arr = normalize_intensity(image, self.cfg.data.normalize, tuple(self.cfg.data.ct_window))
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if prior is None:
            return x, None
        if tuple(np.shape(prior)) != hw:
            raise InputError(f"{source}: the prior mask is {tuple(np.shape(prior))}, the image {hw}")
        lab = self._prior_classes(prior, source)
        if resize:
            lab = resize_labels(lab, self.image_size)
        return x, one_hot(lab, self.num_classes, dim=0)

    def _members(self, image: torch.Tensor, coords: Any = None, prior: Optional[torch.Tensor] = None
                 ) -> dict[str, torch.Tensor]:
        """(B, C, h, w) network-space image [+ (B, K, h, w) prior] -> ``{"probability", "mean", "variance"}``:
        the fused probabilities, the member mean (B, K, h, w) and the ensemble variance (B, 1, h, w). Under
        sliding windows MONAI passes the windows' ``coords``, by which the prior is cropped."""
        kw: dict[str, Any] = {"steps": self.steps, "sampler": self.sampler, "eta": self.eta}
        if self.pure_noise:
            kw["start_step"] = 0
        elif self.start_step is not None:
            kw["start_step"] = self.start_step
            if prior is not None:  # given masks (files or a prior run); else the method's own pre-segmentation
                kw["init"] = crop_windows(prior, coords) if coords is not None else prior
        gen = torch.Generator().manual_seed(self.seed)  # on the CPU: the same noise, so masks, on any device
        if self.resolved.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        graphs = self.graphs.active() if self.graphs is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast(self.device, self.precision), graphs:
            res = ensemble_predict(self.method, image, n=self.ensemble, fuse=self.fuse, threshold=self.threshold,
                                   generator=gen, **kw)
        self._nfe += res.nfe
        return {"probability": res.probability.float(), "mean": res.mean.float(), "variance": res.variance.float()}

    def _forward(self, image: torch.Tensor, prior: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) [+ (B, K, *spatial)] at the working size -> the named outputs at that size, on the
        CPU; with mirror test-time augmentation (``tta``) the mean over the flips of every spatial axis subset."""
        if not self.tta:
            return self._forward_once(image, prior)
        nd = image.dim() - 2
        total: dict[str, torch.Tensor] = {}
        flips = [tuple(2 + a for a in range(nd) if (mask >> a) & 1) for mask in range(2 ** nd)]
        for dims in flips:
            flip = (lambda t: t.flip(dims)) if dims else (lambda t: t)
            out = self._forward_once(flip(image), None if prior is None else flip(prior))
            for k, v in out.items():
                total[k] = total[k] + flip(v) if k in total else flip(v)
        return {k: v / len(flips) for k, v in total.items()}

    def _forward_once(self, image: torch.Tensor, prior: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        image = image.to(self.device)
        prior = prior.to(self.device) if prior is not None else None
        spatial = tuple(image.shape[2:])
        if self.inferer is not None:
            size = self.patch_size
        elif self.image_size is None:
            m = _NATIVE_MULTIPLE
            size = tuple(-(-d // m) * m for d in spatial)
        else:
            size = spatial
        image = pad_to(image, size)
        if prior is not None:
            prior = pad_to(prior, size)
        if self.inferer is not None:
            out = self.inferer(image, self._members, prior=prior)
        else:
            out = self._members(image, None, prior)
        crop = (Ellipsis, *(slice(0, d) for d in spatial))
        return {k: v[crop].float().cpu() for k, v in out.items()}

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
        if self.spatial_dims == 3:
            raise InputError(f"{sources[0]}: this is a 3D run (data.spatial_dims=3); it segments whole volumes "
                             "(NIfTI or DICOM, or Predictor.predict_volume), not 2D images")
        priors: list[Optional[np.ndarray]] = list(prior_masks) if prior_masks is not None else [None] * n
        given = [p is not None for p in priors]
        if any(given) and not all(given):
            raise InputError(f"prior masks given for some images of a batch only: {sources}")
        if (any(given) or self.prior is not None) and (not self.method.takes_start_step or self.start_step is None):
            raise ConfigError("prior masks need a Gaussian diffusion run and a start step (--start-step)")
        if not any(given) and self.prior is not None:
            priors = [p.label for p in self.prior.predict_batch(images, sources)]
        if self.start_step is not None and priors[0] is None and not self.method.own_prior:
            raise InputError(f"{sources[0]}: start step {self.start_step} needs a prior (prior masks or a prior "
                             "run, --prior): this run has no pre-segmentation network")
        xs = [self._to_network(im, s, p) for im, s, p in zip(images, sources, priors)]
        if len({tuple(x.shape) for x, _ in xs}) > 1:
            raise InputError(f"images of one batch must share their size without data.image_size: "
                             f"{[tuple(x.shape[1:]) for x, _ in xs]}")
        self._nfe = 0
        out = self._forward(torch.stack([x for x, _ in xs]),
                            torch.stack([p for _, p in xs]) if priors[0] is not None else None)  # type: ignore
        nfe = self._nfe
        results = []
        for i, im in enumerate(images):
            hw = tuple(np.shape(im)[-2:])
            o = {k: v[i: i + 1] for k, v in out.items()}
            if tuple(o["probability"].shape[-2:]) != hw:  # back from image_size to the input's size
                o = {k: F.interpolate(v, size=hw, mode="bilinear", align_corners=False) for k, v in o.items()}
            results.append(self._result(o, nfe))
        return results

    def predict_array(self, image: np.ndarray, source: str = "<array>",
                      prior_mask: Optional[np.ndarray] = None) -> Prediction:
        """Segment one 2D image.

        Args:
            image: (C, H, W) or (H, W) raw intensities (the run's resizing and normalisation are applied here).
            source: name used in error messages (e.g. the file).
            prior_mask: optional (H, W) label map (0..K-1; for K = 1 any non-zero value is foreground): the
                PD-DDPM pre-segmentation the chain starts from at the start step.
        Returns:
            a :class:`Prediction` at the input's (H, W).
        Raises:
            InputError: wrong channel count (both counts named), bad shape, prior mask mismatch.
        """
        return self.predict_batch([image], [source], None if prior_mask is None else [prior_mask])[0]

    def predict_volume(self, volume: np.ndarray, axis: Optional[int] = None, source: str = "<volume>",
                       prior_mask: Optional[np.ndarray] = None,
                       progress: Optional[Callable[[int], None]] = None,
                       spacing: Optional[Sequence[float]] = None) -> Prediction:
        """Segment a (C, X, Y, Z) or (X, Y, Z) volume.

        2D runs: slice by slice along ``axis`` (spatial axis 0..2; default ``data.slice_axis``), ``batch_size``
        slices per network batch; each slice is normalised on its own, as training does. 3D runs: the whole
        volume, normalised as a whole, resampled to the run's ``data.spacing`` (which needs ``spacing``, the
        volume's voxel size in mm), segmented by sliding windows of ``data.patch_size`` (``batch_size`` windows
        per network call, Gaussian blending, outputs accumulated on the CPU) and resampled back. ``prior_mask``:
        optional (X, Y, Z) label volume. Returns (X, Y, Z) maps and (K, X, Y, Z) probabilities."""
        vol = np.asarray(volume)
        if vol.ndim == 3:
            vol = vol[None]
        if vol.ndim != 4:
            raise InputError(f"{source}: expected a (C, X, Y, Z) or (X, Y, Z) volume, got shape {volume.shape}")
        vol = self.fit_channels(vol, source) if self.spatial_dims == 3 else vol
        self.check_channels(vol.shape[0], source)
        if prior_mask is not None and tuple(np.shape(prior_mask)) != vol.shape[1:]:
            raise InputError(f"{source}: the prior mask is {tuple(np.shape(prior_mask))}, the volume {vol.shape[1:]}")
        if self.spatial_dims == 3:
            return self._predict_volume_3d(vol, source, prior_mask, spacing)
        axis = self.cfg.data.slice_axis if axis is None else axis
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

    def _predict_volume_3d(self, vol: np.ndarray, source: str, prior_mask: Optional[np.ndarray],
                           spacing: Optional[Sequence[float]]) -> Prediction:
        """The 3D-run path of :meth:`predict_volume` (``vol``: (C, X, Y, Z) raw intensities)."""
        from diffmis.data.transforms import resample_volume

        if vol.dtype.kind == "f" and not np.isfinite(vol).all():
            raise InputError(f"{source}: the volume holds NaN or infinite values; nothing was predicted for it")
        target = self.cfg.data.spacing
        shape = tuple(vol.shape[1:])
        resampled = False
        lab = None if prior_mask is None else self._prior_classes(prior_mask, source)
        if target is not None:
            if spacing is None:
                raise InputError(f"{source}: the run resamples volumes to data.spacing={list(target)} mm; give the "
                                 "volume's voxel size (spacing=...), or predict from a NIfTI/DICOM file")
            new, lab = resample_volume(vol.astype(np.float32, copy=False), lab, spacing, target)
            resampled = new.shape[1:] != shape
            vol = new
        arr = normalize_intensity(vol, self.cfg.data.normalize, tuple(self.cfg.data.ct_window))
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
        prior = None
        if lab is not None:
            prior = one_hot(lab, self.num_classes, dim=0)[None]
        elif self.prior is not None:
            prior_pred = self.prior.predict_volume(vol, None, source, spacing=target)  # same grid as ``vol``
            prior = one_hot(prior_pred.label, self.num_classes, dim=0)[None]
        if self.start_step is not None and prior is None and not self.method.own_prior:
            raise InputError(f"{source}: start step {self.start_step} needs a prior (prior masks or a prior run, "
                             "--prior): this run has no pre-segmentation network")
        self._nfe = 0
        o = self._forward(x, prior)
        if resampled:  # back to the input's grid
            o = {k: F.interpolate(v, size=shape, mode="trilinear", align_corners=False) for k, v in o.items()}
        return self._result(o, self._nfe)

    def _result(self, o: dict[str, torch.Tensor], nfe: int) -> Prediction:
        """One image's or volume's named outputs (batch 1, at the input's size) -> :class:`Prediction`: labels from
        the fused probability, then the temperature on it and on the member mean, whose entropy is the map."""
        prob = o["probability"].clamp(0.0, 1.0)
        label = hard_labels(prob, self.threshold)[0].numpy()
        mean = o["mean"].clamp(0.0, 1.0)
        if self.temperature != 1.0:
            prob, mean = apply_temperature(prob, self.temperature), apply_temperature(mean, self.temperature)
        entropy = entropy_bits(mean)  # of the (blended, resized) member mean
        return Prediction(label=label, probability=prob[0].numpy(), variance=o["variance"].clamp_min(0.0)[0, 0].numpy(),
                          entropy=entropy[0, 0].numpy(), nfe=nfe)

