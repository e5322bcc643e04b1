"""MedSegDiff (Wu et al., arXiv 2211.00611; METHODS 1.2, 2): a Gaussian DDPM on the mask, conditioned on the image.

The denoiser is any registered model (``model.name``): ``medsegdiff`` (two encoders, FF-Parser and Dynamic
Conditional Encoding, ``models/medsegdiff.py``) by default, or ``conditional_unet`` (the image concatenated to
``x_t``: the Wolleb / SegDiff baseline, also reachable under its old recipe name ``conditional_unet``). The
scheduler owns the noise (``schedulers/gaussian.py``), the sampler the reverse chain (``sampling.py``); this
file composes them:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   t ~ U{0..T-1}                     (METHODS 1.2)
    L = || target(x0, eps, t) - f_theta(x_t, t, I) ||^2                               (eps / x0 / v target)
    sample: DDIM (eta) or ancestral DDPM over a respaced chain of ``steps`` network calls, from pure noise, or
            from a noised prior mask at T' (the PD-DDPM start, :mod:`diffmis.methods.pd_ddpm`)

MedSegDiff-V2 and PD-DDPM extend :class:`GaussianMaskDiffusion` in their own files.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffmis.config import Config
from diffmis.errors import ConfigError
from diffmis.masks import hard_one_hot
from diffmis.methods.base import (LossOutput, Method, build_model, compose, rand_t, randn_like, register,
                                  repeat_members)
from diffmis.sampling import SampleOutput, gaussian_sample
from diffmis.schedulers import GaussianScheduler

__all__ = ["GaussianMaskDiffusion", "gaussian_scheduler"]


def gaussian_scheduler(cfg: Config) -> GaussianScheduler:
    """The Gaussian scheduler of ``cfg.diffusion``; a non-Gaussian or learned-variance config is refused."""
    d = cfg.diffusion
    if d.kind != "gaussian":
        raise ConfigError(f"recipe '{cfg.experiment.recipe}' needs diffusion.kind='gaussian', got '{d.kind}'")
    if d.learn_sigma:
        raise ConfigError("diffusion.learn_sigma=true (the learned-variance VLB term) is not implemented; "
                          "use the default false")
    return GaussianScheduler(d.timesteps, d.schedule, d.prediction, d.mask_range)


@register("medsegdiff", "conditional_unet")
class GaussianMaskDiffusion(Method):
    """Gaussian DDPM on the mask with a registered denoiser ``f(x_t, t, cond)``; ``cond = denoiser.condition(I)``
    is computed once per image (and per ensemble, not per member).

    Args:
        denoiser: the network (``condition(image) -> dict``, ``forward(x_t, t, cond)``).
        scheduler: the Gaussian schedule.
        num_classes: K.
        loss_weights: ``train.loss_weights`` (term ``diffusion``).
        default_steps, default_sampler: the sampler used when :meth:`sample` is called without them.
    """

    samplers = ("ddim", "ddpm")
    takes_start_step = True

    def __init__(self, denoiser: nn.Module, scheduler: GaussianScheduler, num_classes: int,
                 loss_weights: Optional[dict[str, float]] = None, *, default_steps: int = 10,
                 default_sampler: str = "ddim") -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights or {})
        self.timesteps = scheduler.timesteps
        self.default_steps = default_steps
        self.default_sampler = default_sampler

    @classmethod
    def denoiser_kwargs(cls, cfg: Config) -> dict[str, Any]:
        """Keyword arguments the denoiser gets besides ``model.params`` (V2 adds its condition segmentor)."""
        return {"in_channels": cfg.data.in_channels, "num_classes": cfg.data.num_classes}

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "GaussianMaskDiffusion":
        params = dict(cfg.model.params)
        method_params = {k: params.pop(k) for k in getattr(cls, "method_params", ()) if k in params}
        denoiser = build_model(cfg.model.name, params, **cls.denoiser_kwargs(cfg))
        sampler = cfg.sample.sampler if cfg.sample.sampler in cls.samplers else cls.samplers[0]
        return cls(denoiser, gaussian_scheduler(cfg), cfg.data.num_classes, dict(cfg.train.loss_weights),
                   default_steps=cfg.sample.steps, default_sampler=sampler, **method_params, **kwargs)

    def ema_module(self) -> nn.Module:
        return self.denoiser

    # ---- training -----------------------------------------------------------------------------------------

    def diffusion_terms(self, image: Tensor, mask: Tensor, generator: Optional[torch.Generator]
                        ) -> tuple[dict[str, Tensor], dict[str, Any], Tensor]:
        """The denoising term of one batch: ``({"diffusion": MSE}, cond, t)`` (cond and t for subclasses)."""
        x0 = self.scheduler.mask_to_x0(mask)
        t = rand_t(image.shape[0], self.scheduler.timesteps, generator, image.device)
        noise = randn_like(x0, generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        cond = self.denoiser.condition(image)
        pred = self.denoiser(x_t, t, cond).float()
        target = self.scheduler.training_target(x0, noise, t)
        return {"diffusion": torch.mean((pred - target) ** 2)}, cond, t

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        raw, _, _ = self.diffusion_terms(image, mask, generator)
        return compose(raw, self.loss_weights, {"diffusion": 1.0})

    # ---- sampling -----------------------------------------------------------------------------------------

    def start_prior(self, image: Tensor) -> Optional[Tensor]:
        """The prior mask a PD-DDPM start uses when none is given (None: this method has no prior network)."""
        return None

    @torch.no_grad()
    def sample(self, image: Tensor, *, steps: Optional[int] = None, sampler: Optional[str] = None,
               eta: float = 0.0, start_step: Optional[int] = None, init: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, members: int = 1) -> SampleOutput:
        """Sample ``members`` masks per image (B * members, image-major).

        ``start_step`` T' with ``init`` (or the method's own prior, see :meth:`start_prior`, hard labels, once per
        image) runs the PD-DDPM start; ``start_step=0`` the full chain from pure noise; None the default
        (:attr:`default_start_step`, pure noise when that is None too). The NFE counts a prior pass.
        """
        start = start_step if start_step is not None else self.default_start_step
        if start == 0:  # explicit request for the full chain from pure noise
            start, init = None, None
        extra_nfe = 0
        if start is not None and init is None:
            prior = self.start_prior(image)
            if prior is None:
                raise ConfigError(f"start step {start} needs a prior mask (init): this {self.name} run has no "
                                  "pre-segmentation network")
            init, extra_nfe = hard_one_hot(prior), 1
        if init is not None and init.shape[0] == image.shape[0]:
            init = repeat_members(init, members)
        cond = repeat_members(self.denoiser.condition(image), members)  # once per image, repeated per member
        shape = (image.shape[0] * members, self.num_classes, *image.shape[2:])

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.denoiser(x_t, t, cond).float()

        out = gaussian_sample(model_fn, self.scheduler, shape, steps=steps or self.default_steps,
                              sampler=sampler or self.default_sampler, eta=eta, init=init,
                              start_step=start if init is not None else None, generator=generator,
                              device=image.device)
        out.nfe += extra_nfe
        return out
