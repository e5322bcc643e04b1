"""BerDiff (Chen et al., MICCAI 2023; METHODS 5.7): Bernoulli diffusion on the mask with the uniform prior 1/2.

The mask is corrupted by XOR noise toward ``B(1/2)``; a denoiser conditioned on the image (by default the
``conditional_unet``: ``[I, y_t]`` -> K flip logits) predicts which pixels of ``y_t`` are flipped:

    q(y_t | y_0) = B(abar_t y_0 + (1 - abar_t) / 2)                                   (METHODS 5.7)
    y0_hat = |y_t - sigmoid(f_theta(y_t, t, I))|                                        (XOR parameterisation)
    L = KL(q(y_{t-1} | y_t, y_0) || p_theta(y_{t-1} | y_t)) + lambda BCE(flip)         (``ltype="mix"``)
    sample: y_{T-1} ~ B(1/2), then Bernoulli-DDIM (or ancestral) steps; the last step returns y0_hat

The Bernoulli math is the scheduler's (``schedulers/bernoulli.py``, the prior diffusion with p = 1/2, so the
released BerDiff ``q_mean`` bug cannot occur); BCE is the scheduler's focal term with ``diffusion.focal_gamma: 0``.
HiDiff (:mod:`diffmis.methods.hidiff`) is this chain with a segmentor's prior instead of 1/2.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffmis.config import Config
from diffmis.errors import ConfigError
from diffmis.methods.base import (LossOutput, Method, build_model, check_share, check_train_timesteps, compose,
                                  register, repeat_members)
from diffmis.sampling import SampleOutput, bernoulli_sample
from diffmis.schedulers import BernoulliScheduler

__all__ = ["BerDiff", "bernoulli_scheduler"]


def bernoulli_scheduler(cfg: Config) -> BernoulliScheduler:
    """The Bernoulli scheduler of ``cfg.diffusion``; a non-Bernoulli config is refused."""
    d = cfg.diffusion
    if d.kind != "bernoulli":
        raise ConfigError(f"recipe '{cfg.experiment.recipe}' needs diffusion.kind='bernoulli', got '{d.kind}'")
    return BernoulliScheduler(d.timesteps, d.schedule, focal_gamma=d.focal_gamma)


@register("berdiff")
class BerDiff(Method):
    """Bernoulli mask diffusion with a prior: uniform (1/2) here, a segmentor's in :class:`HiDiff`.

    Args:
        denoiser: ``forward(y_t, t, cond) -> (B, K, H, W)`` flip logits.
        scheduler: the Bernoulli schedule.
        num_classes: K (each channel an independent Bernoulli variable).
        loss_weights: ``train.loss_weights`` (terms ``kl``, ``focal``).
        focal_lambda: weight of the focal / BCE term (``diffusion.focal_lambda``).
        prior_residual: add the prior's Bayes flip logits to the network output (``diffusion.prior_residual``).
        default_steps, default_sampler: the sampler used when :meth:`sample` is called without them.
        train_timesteps: ``"all"`` (uniform over [0, T), the papers') or ``"sampler"`` (only the indices the default
            sampler visits: with one Bernoulli-DDIM step, T - 1 alone, the one step sampling takes).
        first_step_share: share of each training batch at the default sampler's first timestep (T - 1).
    """

    samplers = ("bernoulli_ddim", "bernoulli")
    levers = ("diffusion.train_timesteps", "diffusion.first_step_share")
    #: attribute that holds the denoiser (its state-dict prefix; HiDiff keeps the released name "refiner")
    network_name = "denoiser"

    def __init__(self, denoiser: nn.Module, scheduler: BernoulliScheduler, num_classes: int,
                 loss_weights: Optional[dict[str, float]] = None, *, focal_lambda: float = 1.0,
                 prior_residual: bool = False, default_steps: Optional[int] = None,
                 default_sampler: str = "bernoulli_ddim", train_timesteps: str = "all",
                 first_step_share: float = 0.0) -> None:
        super().__init__()
        if prior_residual and getattr(denoiser, "starts_at_prior_answer", False):
            raise ConfigError(f"diffusion.prior_residual adds the prior's flips to a {type(denoiser).__name__}, "
                              "whose output is already a whole answer; set diffusion.prior_residual: false")
        setattr(self, self.network_name, denoiser)
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights or {})
        self.focal_lambda = focal_lambda
        self.prior_residual = prior_residual
        self.timesteps = scheduler.timesteps
        self.default_steps = min(default_steps or scheduler.timesteps, scheduler.timesteps)
        self.default_sampler = default_sampler
        self.train_timesteps = check_train_timesteps(train_timesteps)
        self.first_step_share = check_share("diffusion.first_step_share", first_step_share)

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "BerDiff":
        scheduler = bernoulli_scheduler(cfg)
        if "denoiser" not in kwargs:
            kwargs["denoiser"] = build_model(cfg.model.name, dict(cfg.model.params), in_channels=cfg.data.in_channels,
                                             num_classes=cfg.data.num_classes, spatial_dims=cfg.data.spatial_dims)
        sampler = cfg.sample.sampler if cfg.sample.sampler in cls.samplers else cls.samplers[0]
        return cls(scheduler=scheduler, num_classes=cfg.data.num_classes, loss_weights=dict(cfg.train.loss_weights),
                   focal_lambda=cfg.diffusion.focal_lambda, prior_residual=cfg.diffusion.prior_residual,
                   default_steps=cfg.sample.steps, default_sampler=sampler,
                   train_timesteps=cfg.diffusion.train_timesteps, first_step_share=cfg.diffusion.first_step_share,
                   **kwargs)

    @property
    def network(self) -> nn.Module:
        """The denoiser (``denoiser``; HiDiff's ``refiner``)."""
        return getattr(self, self.network_name)

    def ema_module(self) -> nn.Module:
        return self.network

    # ---- the prior and the condition ----------------------------------------------------------------------

    def prior_and_condition(self, image: Tensor) -> tuple[Tensor, dict[str, Any], int]:
        """``(p, cond, nfe)``: the prior (B, K, H, W) in [0, 1] (here 1/2 everywhere), the denoiser's condition,
        and the network evaluations spent on them (0 here)."""
        b, _, *spatial = image.shape
        prior = torch.full((b, self.num_classes, *spatial), 0.5, device=image.device)
        return prior, {**self.network.condition(image), "prior": prior}, 0

    def flip_logits(self, y_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """Network flip logits (B, K, H, W), plus the prior's Bayes flip logits when ``prior_residual``."""
        logits = self.network(y_t, t, cond).float()
        if self.prior_residual:
            logits = logits + self.scheduler.prior_flip_logits(y_t, cond["prior"].float(), t)
        return logits

    # ---- training -----------------------------------------------------------------------------------------

    def bbdm_terms(self, mask: Tensor, cond: dict[str, Any], generator: Optional[torch.Generator]
                   ) -> dict[str, Tensor]:
        """``{"kl", "focal"}`` of one batch (METHODS 5.3.4): ``y_t ~ q(y_t | y_0, p)`` at a uniform ``t`` (over
        [0, T), or over the default sampler's indices with ``train_timesteps="sampler"``)."""
        prior = cond["prior"]
        t = self.training_timesteps(mask.shape[0], generator, mask.device)
        y_t = self.scheduler.q_sample(mask, prior, t, generator=generator)
        return self.scheduler.loss(self.flip_logits(y_t, t, cond), mask, y_t, prior.float(), t)

    def step_network(self) -> nn.Module:
        return self.network

    def sampling_chain(self, steps: int, start_step: Optional[int] = None) -> list[int]:
        return self.scheduler.sampling_timesteps(steps)  # no start step here (check_sampling refuses one)

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        _, cond, _ = self.prior_and_condition(image)
        return compose(self.bbdm_terms(mask, cond, generator), self.loss_weights,
                       {"kl": 1.0, "focal": self.focal_lambda})

    # ---- sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, image: Tensor, *, steps: Optional[int] = None, sampler: Optional[str] = None,
               generator: Optional[torch.Generator] = None, members: int = 1, **_: Any) -> SampleOutput:
        """Probabilities (B * members, K, H, W), image-major: the prior and condition are computed once per
        image and repeated for the members; the NFE counts their network passes."""
        prior, cond, extra_nfe = self.prior_and_condition(image)
        cond = repeat_members(cond, members)

        def model_fn(y_t: Tensor, t: Tensor) -> Tensor:
            return self.flip_logits(y_t, t, cond)

        res = bernoulli_sample(model_fn, self.scheduler, cond["prior"], steps=steps or self.default_steps,
                               sampler=sampler or self.default_sampler, generator=generator)
        res.nfe += extra_nfe
        return res
