"""PD-DDPM (Guo et al., arXiv 2210.17408, ISBI 2023; METHODS 4): a Gaussian mask DDPM whose reverse chain starts
from the noised pre-segmentation of a separately trained segmentor at T' < T, so far fewer steps are needed.

    y_pre = hard labels of the pre-segmentation network f_seg(I)                       (METHODS 4.2 step 1)
    x_{T'-1} ~ q(x_{T'-1} | x_0 = y_pre)                                               (step 2; no ADDPM off-by-one)
    run the reverse steps over [0, T') only                                           (step 3)

Training is MedSegDiff's denoising loss; the pre-segmentation network (``model.segmentor``) trains alongside
with Dice + CE (term ``prior``), or comes frozen from a segmentor run (``train.prior_run``). With
``diffusion.recycle`` a fraction of each batch is noised from the pre-segmentation itself at t < T', the starts
sampling sees (with ``diffusion.train_timesteps: sampler`` the very indices it visits), so the denoiser learns
to correct the segmentor's mistakes. T' is ``sample.start_step`` (``diffmis.sampling.propose_start_step``
gives the SNR rule of METHODS 4.3); ``--start-step 0`` runs the same network from pure noise.

The denoiser can be the pre-segmentation network itself, widened to read ``[I, x_t]``
(``model.name: segmentor_denoiser``, models/segmentor_denoiser.py); with ``train.denoiser_from_prior`` it starts
from the segmentor run's weights, so before its first step the method returns its pre-segmentation and every
step after refines a network that can already segment.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffmis.config import Config
from diffmis.losses import segmentation_loss_terms
from diffmis.masks import probabilities
from diffmis.methods.base import LossOutput, compose, register, segmentor_from_config
from diffmis.methods.medsegdiff import GaussianMaskDiffusion

__all__ = ["PDDPM"]


@register("pd_ddpm")
class PDDPM(GaussianMaskDiffusion):
    """A Gaussian mask DDPM + its pre-segmentation network ``prior``; sampling starts at ``default_start_step``.

    Args:
        prior: the pre-segmentation segmentor.
        prior_trainable: train it alongside (Dice + CE, term ``prior``); False freezes it.
    """

    own_prior = True
    levers = GaussianMaskDiffusion.levers + ("train.denoiser_from_prior",)
    warm_start_model = "segmentor_denoiser"

    def __init__(self, denoiser: nn.Module, *args: Any, prior: nn.Module, prior_trainable: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(denoiser, *args, **kwargs)
        self.prior = prior
        self.prior_trainable = prior_trainable
        if not prior_trainable:
            for p in prior.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "PDDPM":
        prior = segmentor_from_config(cfg, "the pre-segmentation network")
        return super().from_config(cfg, prior=prior, prior_trainable=cfg.train.prior_run is None, **kwargs)

    def segmentor_module(self) -> nn.Module:
        return self.prior

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        raw, _, _ = self.diffusion_terms(image, mask, generator)
        if self.prior_trainable:  # the pre-segmentation network trains alongside
            seg = segmentation_loss_terms(self.prior(image).logits, mask)
            raw["prior"] = seg["dice"] + seg["ce"]
        return compose(raw, self.loss_weights, {**self.term_weights(), "prior": 1.0})

    @torch.no_grad()
    def start_prior(self, image: Tensor) -> Tensor:
        """The pre-segmentation probabilities (B, K, H, W) of ``image``."""
        return probabilities(self.prior(image).logits.float())

    def recycles_prior(self) -> bool:
        """Recycled samples always start from the pre-segmentation (at t uniform in [0, T) without a T')."""
        return True
