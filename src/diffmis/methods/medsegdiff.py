"""MedSegDiff (Wu et al., arXiv 2211.00611; METHODS 1.2, 2): a Gaussian DDPM on the mask, conditioned on the image.

The denoiser is any registered model (``model.name``): ``medsegdiff`` (two encoders, FF-Parser and Dynamic
Conditional Encoding, ``models/medsegdiff.py``) by default, or ``conditional_unet`` (the image concatenated to
``x_t``: the Wolleb / SegDiff baseline, also reachable under its old recipe name ``conditional_unet``). The
scheduler owns the noise (``schedulers/gaussian.py``), the sampler the reverse chain (``sampling.py``); this
file composes them:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   t ~ U{0..T-1}                     (METHODS 1.2)
    L = || target(x0, eps, t) - f_theta(x_t, t, I) ||^2                               (eps / x0 / v target)
        [+ w (Dice + BCE)(x0_hat as probabilities, mask)]                               (Diff-UNet, x0 target)
        [+ w_I (Dice + BCE)(image head's logits, mask)]          (image_seg_weight: deep supervision of E^I)
    x0_logits: x0_hat = to_range(sigmoid / softmax(f_theta)), the added terms a segmentor's Dice + CE on f_theta
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
from diffmis.losses import bce_on_probabilities, segmentation_loss_terms, soft_dice_loss
from diffmis.masks import hard_one_hot, probabilities
from diffmis.methods.base import (LossOutput, Method, build_model, check_share, check_train_timesteps, compose,
                                  model_accepts, rand_share, rand_t, randn_like, register, repeat_members,
                                  select_batch)
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
        x0_seg_weight, x0_logits, recycle, train_timesteps, first_step_share, image_seg_weight: the recipe levers
            of ``diffusion.*``.
        default_start_step: T' used when :meth:`sample` gets no start step (methods with their own prior:
            ``sample.start_step``); None starts from pure noise.
    """

    samplers = ("ddim", "ddpm")
    takes_start_step = True
    levers = ("diffusion.x0_seg_weight", "diffusion.x0_logits", "diffusion.recycle", "diffusion.train_timesteps",
              "diffusion.first_step_share", "diffusion.image_seg_weight")

    def __init__(self, denoiser: nn.Module, scheduler: GaussianScheduler, num_classes: int,
                 loss_weights: Optional[dict[str, float]] = None, *, default_steps: int = 10,
                 default_sampler: str = "ddim", x0_seg_weight: float = 0.0, x0_logits: bool = False,
                 recycle: float = 0.0, train_timesteps: str = "all", first_step_share: float = 0.0,
                 image_seg_weight: float = 0.0, default_start_step: Optional[int] = None) -> None:
        super().__init__()
        if image_seg_weight > 0 and getattr(denoiser, "image_head", None) is None:
            raise ConfigError(f"diffusion.image_seg_weight needs a denoiser with an image encoder and its head "
                              f"(model 'medsegdiff'); '{type(denoiser).__name__}' has none: set it to 0")
        if (x0_seg_weight or recycle or x0_logits) and scheduler.prediction != "x0":
            raise ConfigError("diffusion.x0_seg_weight, diffusion.x0_logits and diffusion.recycle need "
                              f"diffusion.prediction: x0 (got {scheduler.prediction!r})")
        if getattr(denoiser, "outputs_x0_probabilities", False):  # e.g. models/segmentor_denoiser.py
            if x0_logits:
                raise ConfigError(f"model '{type(denoiser).__name__}' already outputs clean-mask probabilities: "
                                  "diffusion.x0_logits reads the output as logits; set it to false")
            if scheduler.prediction != "x0":
                raise ConfigError(f"model '{type(denoiser).__name__}' predicts the clean mask: it needs "
                                  f"diffusion.prediction: x0 (got {scheduler.prediction!r})")
            denoiser.mask_range = scheduler.mask_range
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights or {})
        self.timesteps = scheduler.timesteps
        self.default_steps = default_steps
        self.default_sampler = default_sampler
        self.x0_seg_weight = x0_seg_weight
        self.x0_logits = bool(x0_logits)
        self.recycle = recycle
        self.train_timesteps = check_train_timesteps(train_timesteps)
        self.first_step_share = check_share("diffusion.first_step_share", first_step_share)
        self.image_seg_weight = float(image_seg_weight)
        self.default_start_step = default_start_step

    @classmethod
    def denoiser_kwargs(cls, cfg: Config) -> dict[str, Any]:
        """Keyword arguments the denoiser gets besides ``model.params`` (V2 adds its condition segmentor)."""
        return {"in_channels": cfg.data.in_channels, "num_classes": cfg.data.num_classes,
                "spatial_dims": cfg.data.spatial_dims}

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "GaussianMaskDiffusion":
        params = dict(cfg.model.params)
        method_params = {k: params.pop(k) for k in getattr(cls, "method_params", ()) if k in params}
        extra = {}
        if cfg.diffusion.image_seg_weight > 0:  # the image encoder's segmentation head of its deep supervision
            if not model_accepts(cfg.model.name, "image_head"):
                raise ConfigError(f"diffusion.image_seg_weight needs a denoiser with an image encoder (model "
                                  f"'medsegdiff'); model '{cfg.model.name}' has none: set it to 0")
            extra["image_head"] = True
        denoiser = build_model(cfg.model.name, params, **cls.denoiser_kwargs(cfg), **extra)
        sampler = cfg.sample.sampler if cfg.sample.sampler in cls.samplers else cls.samplers[0]
        return cls(denoiser, gaussian_scheduler(cfg), cfg.data.num_classes, dict(cfg.train.loss_weights),
                   default_steps=cfg.sample.steps, default_sampler=sampler, x0_seg_weight=cfg.diffusion.x0_seg_weight,
                   x0_logits=cfg.diffusion.x0_logits,
                   recycle=cfg.diffusion.recycle, train_timesteps=cfg.diffusion.train_timesteps,
                   first_step_share=cfg.diffusion.first_step_share, image_seg_weight=cfg.diffusion.image_seg_weight,
                   default_start_step=cfg.sample.start_step if cls.own_prior else None, **method_params, **kwargs)

    def ema_module(self) -> nn.Module:
        return self.denoiser

    def predict(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(prediction, raw output)`` of the denoiser in float32: the prediction is what the scheduler reads
        (eps, x0 or v); with ``x0_logits`` the raw output is the clean mask's logits and the prediction
        ``to_range(probabilities(logits))``, otherwise both are the output itself."""
        return self.read_output(self.denoiser(x_t, t, cond))

    def read_output(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(prediction, raw output)`` of a denoiser output (see :meth:`predict`)."""
        out = out.float()
        if self.x0_logits:
            return self.scheduler.mask_to_x0(probabilities(out)), out
        return out, out

    # ---- training -----------------------------------------------------------------------------------------

    def diffusion_terms(self, image: Tensor, mask: Tensor, generator: Optional[torch.Generator]
                        ) -> tuple[dict[str, Tensor], dict[str, Any], Tensor]:
        """The denoising terms of one batch: ``({"diffusion": MSE[, "x0_seg": Dice + BCE]}, cond, t)``.

        ``x_t = sqrt(abar_t) x_src + sqrt(1 - abar_t) eps`` with ``x_src`` the truth, or, for the ``recycle``
        fraction of the batch, a prediction (:meth:`recycle_source`); the target is always the truth's.
        """
        x0 = self.scheduler.mask_to_x0(mask)
        b = image.shape[0]
        t = self.training_timesteps(b, generator, image.device)
        src = x0
        cond = self.denoiser.condition(image)  # once for the batch, shared with the recycled samples' source
        if self.recycle > 0:  # ImgX-DiffSeg's recycling / PD-DDPM's starts: noise a prediction, not the truth
            sel = rand_share(b, self.recycle, generator, image.device)
            if bool(sel.any()):
                rec, t_rec = self.recycle_source(image[sel], select_batch(cond, sel), generator)
                src = x0.clone()
                src[sel] = self.scheduler.mask_to_x0(rec)
                if t_rec is not None:
                    t = t.clone()
                    t[sel] = t_rec
        noise = randn_like(x0, generator)
        x_t = self.scheduler.add_noise(src, noise, t)
        if self.image_seg_weight > 0:  # one pass: the prediction and the image head's logits
            out_raw, image_logits = self.denoiser(x_t, t, cond, image_logits=True)
            pred, out = self.read_output(out_raw)
        else:
            pred, out = self.predict(x_t, t, cond)
        target = self.scheduler.training_target(x0, noise, t)
        raw = {"diffusion": torch.mean((pred - target) ** 2)}
        if self.image_seg_weight > 0:  # deep supervision: the image path locates the structure by itself
            terms = segmentation_loss_terms(image_logits, mask)
            raw["image_seg"] = terms["dice"] + terms["ce"]
        if self.x0_seg_weight > 0 and self.x0_logits:  # a segmentor's Dice + CE on the x0 logits
            terms = segmentation_loss_terms(out, mask)
            raw["x0_seg"] = terms["dice"] + terms["ce"]
        elif self.x0_seg_weight > 0:  # Diff-UNet: segmentation losses on the predicted x0 read as probabilities
            x0_hat, _ = self.scheduler.pred_to_x0_eps(pred, x_t, t, clip=False)
            prob = self.scheduler.x0_to_prob(x0_hat).clamp(1e-4, 1.0 - 1e-4)
            raw["x0_seg"] = soft_dice_loss(prob, mask) + bce_on_probabilities(prob, mask)
        return raw, cond, t

    def step_network(self) -> nn.Module:
        return self.denoiser

    def sampling_chain(self, steps: int, start_step: Optional[int] = None) -> list[int]:
        return self.scheduler.sampling_timesteps(steps, start_step)  # over [0, T') from a PD-DDPM start

    def recycles_prior(self) -> bool:
        """Whether recycled samples are noised from the method's own prior (what its sampling starts from, see
        :meth:`start_prior`) rather than from its own prediction from pure noise."""
        return self.own_prior and self.default_start_step is not None

    @torch.no_grad()
    def recycle_source(self, image: Tensor, cond: dict[str, Any], generator: Optional[torch.Generator]
                       ) -> tuple[Tensor, Optional[Tensor]]:
        """``(mask, t)`` of the recycled samples (hard labels, one-hot); ``cond`` is their condition.

        Where sampling starts from the method's prior (:meth:`recycles_prior`): the prior's labels at timesteps
        uniform in ``[0, T')`` (with ``train_timesteps: sampler``, the very indices the sampler visits), the starts
        sampling sees. Otherwise the model's own prediction of x0 from pure noise at t = T - 1, with timesteps left
        uniform (None).
        """
        if self.recycles_prior():
            start = self.default_start_step or self.scheduler.timesteps
            n = image.shape[0]
            t = (self.training_timesteps(n, generator, image.device) if self.train_timesteps == "sampler"
                 else rand_t(n, start, generator, image.device))
            return hard_one_hot(self.start_prior_from(image, cond)[0]), t
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        x_t = randn_like(torch.empty(shape, device=image.device), generator)
        t = torch.full((image.shape[0],), self.scheduler.timesteps - 1, dtype=torch.long, device=image.device)
        pred, _ = self.predict(x_t, t, cond)
        x0_hat, _ = self.scheduler.pred_to_x0_eps(pred, x_t, t)
        return hard_one_hot(self.scheduler.x0_to_prob(x0_hat)), None

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        raw, _, _ = self.diffusion_terms(image, mask, generator)
        return compose(raw, self.loss_weights, self.term_weights())

    def term_weights(self) -> dict[str, float]:
        """Default weights of the loss terms (``train.loss_weights`` overrides them)."""
        return {"diffusion": 1.0, "x0_seg": self.x0_seg_weight, "image_seg": self.image_seg_weight}

    # ---- sampling -----------------------------------------------------------------------------------------

    def start_prior(self, image: Tensor) -> Optional[Tensor]:
        """The prior mask a PD-DDPM start uses when none is given (None: this method has no prior network)."""
        return None

    def start_prior_from(self, image: Tensor, cond: dict[str, Any]) -> tuple[Optional[Tensor], int]:
        """``(prior, network calls it cost)`` for a sampling start, given the condition already computed for
        ``image``; a method whose condition holds its prior (MedSegDiff-V2's anchor) reads it from there."""
        prior = self.start_prior(image)
        return prior, int(prior is not None)

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
        cond = self.denoiser.condition(image)  # once per image, repeated per member below
        if start is not None and init is None:
            prior, extra_nfe = self.start_prior_from(image, cond)
            if prior is None:
                raise ConfigError(f"start step {start} needs a prior mask (init): this {self.name} run has no "
                                  "pre-segmentation network")
            init = hard_one_hot(prior)
        if init is not None and init.shape[0] == image.shape[0]:
            init = repeat_members(init, members)
        cond = repeat_members(cond, members)
        shape = (image.shape[0] * members, self.num_classes, *image.shape[2:])

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.predict(x_t, t, cond)[0]

        out = gaussian_sample(model_fn, self.scheduler, shape, steps=steps or self.default_steps,
                              sampler=sampler or self.default_sampler, eta=eta, init=init,
                              start_step=start if init is not None else None, generator=generator,
                              device=image.device)
        out.nfe += extra_nfe
        return out
