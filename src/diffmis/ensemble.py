"""Ensembles of diffusion samples: fusion (mean, true STAPLE, the authors' mean-squared rule) and uncertainty.

METHODS 1.5: Wolleb et al. average 5 samples and threshold at 0.5; the official MedSegDiff function called
``staple`` is algebraically the square of the sample mean (kept here as ``"mean_squared"``, for reproduction
only); ``"staple"`` is the real STAPLE EM algorithm (Warfield et al. 2004) from SimpleITK.

Hard masks are always an int64 label map ``(B, H, W)``: for K = 1 the labels are ``prob > threshold`` in
{0, 1}; for K > 1 the argmax over channels (0 = background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch

from diffmis.errors import ConfigError
from diffmis.masks import hard_labels, one_hot

__all__ = ["EnsembleResult", "FUSE_METHODS", "fuse", "uncertainty_maps", "entropy_bits", "ensemble_predict"]

FuseMethod = Literal["mean", "staple", "mean_squared"]
FUSE_METHODS: tuple[str, ...] = ("mean", "staple", "mean_squared")


@dataclass
class EnsembleResult:
    """Fused prediction of an ensemble of n samples per image.

    Attributes:
        mask: (B, H, W) int64 label map ({0, 1} for K = 1; argmax class for K > 1).
        probability: (B, K, H, W) float in [0, 1], the fused probability (per-class STAPLE posteriors for
            ``"staple"``; not renormalised over channels).
        mean: (B, K, H, W) the member mean.
        variance: (B, 1, H, W) the ensemble variance summed over channels (see :func:`uncertainty_maps`).
        samples: (N, B, K, H, W) member probabilities when kept, else None.
        nfe: batched network evaluations used for the whole ensemble (the n members share each call).
        fusion: the fusion rule used.
    """

    mask: torch.Tensor
    probability: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    samples: Optional[torch.Tensor] = None
    nfe: int = 0
    fusion: str = "mean"

    @property
    def uncertainty(self) -> dict[str, torch.Tensor]:
        """``{"variance": (B, 1, H, W), "entropy": (B, 1, H, W)}`` (the entropy of :attr:`mean`, in bits)."""
        return {"variance": self.variance, "entropy": entropy_bits(self.mean)}


def fuse(samples: torch.Tensor, method: FuseMethod = "mean", threshold: float = 0.5) -> torch.Tensor:
    """Fuse N member probabilities into one probability map.

    * ``"mean"``: pixel-wise mean of the member probabilities.
    * ``"mean_squared"``: the square of that mean: what the official MedSegDiff ``staple`` function computes
      (METHODS 1.5); for reproducing their numbers only.
    * ``"staple"``: STAPLE (EM over member sensitivities/specificities) via SimpleITK's ``STAPLEImageFilter``,
      run per image and, for K > 1, per class on binary masks. Members are first made hard: K = 1
      ``prob > threshold``; K > 1 argmax, then one-hot. Pixels where STAPLE is undefined (every member gives the
      same constant mask, so EM divides by zero) take the members' vote fraction instead.

    Args:
        samples: (N, B, K, *spatial) member probabilities in [0, 1] (2D or 3D).
        method: fusion rule.
        threshold: K = 1 binarisation threshold of the members for ``"staple"``.

    Returns:
        (B, K, H, W) float in [0, 1] on ``samples``' device.
    """
    if samples.ndim not in (5, 6):
        raise ValueError(f"samples must be (N, B, K, H, W) or (N, B, K, X, Y, Z), got shape {tuple(samples.shape)}")
    if method == "mean":
        return samples.mean(dim=0)
    if method == "mean_squared":
        return samples.mean(dim=0) ** 2
    if method == "staple":
        return _staple(samples, threshold)
    raise ConfigError(f"sample.fuse must be 'mean', 'staple' or 'mean_squared', got {method!r}")


def _staple(samples: torch.Tensor, threshold: float) -> torch.Tensor:
    import SimpleITK as sitk  # only STAPLE needs it: imported here, so prediction runs where it is not installed

    n, _, k = samples.shape[:3]
    if k == 1:
        hard = samples > threshold  # (N, B, 1, H, W)
    else:
        hard = one_hot(samples.argmax(dim=2), k, dim=2).bool()
    hard_np = hard.to(torch.uint8).cpu().numpy()
    vote = hard_np.mean(axis=0)  # (B, K, H, W) fallback where STAPLE is undefined
    out = np.empty(vote.shape, dtype=np.float64)
    for b in range(hard_np.shape[1]):
        for c in range(k):
            raters = [sitk.GetImageFromArray(hard_np[i, b, c]) for i in range(n)]
            f = sitk.STAPLEImageFilter()
            f.SetForegroundValue(1.0)
            post = sitk.GetArrayFromImage(f.Execute(raters))
            out[b, c] = np.where(np.isfinite(post), post, vote[b, c])
    return torch.from_numpy(np.clip(out, 0.0, 1.0)).to(device=samples.device, dtype=samples.dtype)


def entropy_bits(mean: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-pixel entropy of member-mean probabilities ``(B, K, *spatial)``, in **bits**, ``(B, 1, *spatial)``:
    binary entropy for K = 1 (in [0, 1]); for K > 1 the categorical entropy of the mean renormalised over channels
    (in [0, log2 K])."""
    if mean.shape[1] == 1:
        q = mean.clamp(0.0, 1.0)
        ent = -(torch.xlogy(q, q) + torch.xlogy(1.0 - q, 1.0 - q))
    else:
        q = mean / mean.sum(dim=1, keepdim=True).clamp_min(eps)
        ent = -torch.xlogy(q, q).sum(dim=1, keepdim=True)
    return ent / math.log(2.0)


def uncertainty_maps(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel uncertainty of an ensemble.

    * ``"variance"``: population variance across the N members (``unbiased=False``), summed over the K channels
      (the trace of the per-pixel covariance; for K = 1 the variance itself). In [0, 0.25 K].
    * ``"entropy"``: :func:`entropy_bits` of the member mean.

    Args:
        samples: (N, B, K, *spatial) member probabilities in [0, 1] (2D or 3D).

    Returns:
        ``{"variance": (B, 1, H, W), "entropy": (B, 1, H, W)}``.
    """
    return {"variance": samples.var(dim=0, unbiased=False).sum(dim=1, keepdim=True),
            "entropy": entropy_bits(samples.mean(dim=0))}


def ensemble_predict(
    method: Any,
    image: torch.Tensor,
    n: int = 5,
    fuse: FuseMethod = "mean",
    threshold: float = 0.5,
    keep_samples: bool = False,
    generator: Optional[torch.Generator] = None,
    **sample_kwargs: Any,
) -> EnsembleResult:
    """Sample ``n`` segmentations per image in one batched sampler call, fuse them, and map their uncertainty.

    A method with ``supports_members = True`` (every :class:`diffmis.methods.Method`) gets the un-repeated image and
    ``members=n``: it runs its once-per-image parts (a prior segmentor, a condition encoder) on B images and
    repeats their outputs, so an n-member ensemble does not pay n segmentor passes.

    The image batch is repeated with ``repeat_interleave``: the sampler batch is ordered image-major,
    ``[img0 member0, img0 member1, ..., img0 member(n-1), img1 member0, ...]``, so ``B * n`` masks go through the
    network together at every step (the NFE is that of one sample). A tensor ``init`` in ``sample_kwargs`` (a
    PD-DDPM prior) of batch B is repeated the same way; one of batch ``B * n`` is taken as already repeated in
    that order. Other keyword arguments are passed unchanged.

    Args:
        method: any object with ``sample(image (B*n, C, H, W), *, generator, **sample_kwargs) -> SampleOutput``
            (``probs`` (B*n, K, H, W) in [0, 1], ``nfe``), e.g. a :class:`diffmis.methods.Method`.
        image: (B, C, H, W) float32.
        n: ensemble size, >= 1.
        fuse: ``"mean"``, ``"staple"`` or ``"mean_squared"`` (see :func:`fuse`).
        threshold: K = 1 foreground threshold (member binarisation for STAPLE and the final mask), in (0, 1).
        keep_samples: keep the (N, B, K, H, W) member probabilities in the result.
        generator: passed to ``method.sample``; the result is deterministic given it.
        **sample_kwargs: e.g. ``steps``, ``init``, ``start_step``.

    Returns:
        :class:`EnsembleResult`.
    """
    if n < 1:
        raise ConfigError(f"sample.ensemble must be >= 1, got {n}")
    batch = image.shape[0]
    if getattr(method, "supports_members", False):
        # the method repeats internally after its once-per-image work (segmentor prior, condition encoder)
        out = method.sample(image, members=n, generator=generator, **sample_kwargs)
        return _ensemble_result(out, batch, n, fuse, threshold, keep_samples)
    image_rep = image.repeat_interleave(n, dim=0)
    init = sample_kwargs.get("init")
    if isinstance(init, torch.Tensor) and n > 1:
        if init.shape[0] == batch:
            sample_kwargs["init"] = init.repeat_interleave(n, dim=0)
        elif init.shape[0] != batch * n:
            raise ValueError(f"init has batch {init.shape[0]}; expected {batch} (or {batch * n}, already repeated)")
    out = method.sample(image_rep, generator=generator, **sample_kwargs)
    return _ensemble_result(out, batch, n, fuse, threshold, keep_samples)


def _ensemble_result(out: Any, batch: int, n: int, fuse: FuseMethod, threshold: float,
                     keep_samples: bool) -> EnsembleResult:
    probs = out.probs
    if probs.shape[0] != batch * n:
        raise ValueError(f"method.sample returned {probs.shape[0]} samples for a batch of {batch * n}")
    samples = probs.reshape(batch, n, *probs.shape[1:]).transpose(0, 1)  # (N, B, K, H, W)
    probability = _fuse(samples, fuse, threshold)
    return EnsembleResult(
        mask=hard_labels(probability, threshold),
        probability=probability,
        mean=samples.mean(dim=0),
        variance=samples.var(dim=0, unbiased=False).sum(dim=1, keepdim=True),
        samples=samples.contiguous() if keep_samples else None,
        nfe=int(out.nfe),
        fusion=fuse,
    )


_fuse = fuse  # ensemble_predict's ``fuse`` argument shadows the function name
