"""MedSegDiff-V2 (Wu et al., arXiv 2301.11798; METHODS 3): the Gaussian DDPM of MedSegDiff with a condition
segmentor whose prediction is the anchor (U-SA) and whose deepest feature is the semantic condition (SS-Former).

The network (``models/medsegdiff_v2.py``) runs the condition segmentor inside ``condition(image)``. What this
file adds is the paper's loss (METHODS 3.2, 3.3):

    L = L_noise(t) + 1[t mod alpha = 0] (L_Dice + beta L_CE)(anchor logits, mask)       alpha = 5, beta = 10

The anchor term supervises the condition segmentor on the samples whose timestep is a multiple of ``alpha``;
``model.params.anchor_alpha`` / ``anchor_beta`` set them. ``train.prior_run`` starts the condition segmentor
from a trained segmentor run (the anchor loss keeps training it).

Sampling may also start from the anchor (``sample.start_step`` T' < T, a PD-DDPM start, METHODS 4.2): the
condition segmentor's hard labels (read from the condition: the segmentor runs once per image) noised to T' - 1,
then the reverse steps below T'. The paper starts from noise (``start_step`` unset); the anchor start is a recipe
lever of this framework, and with it ``diffusion.recycle`` noises the anchor itself for that fraction of each
batch (at t < T', or at the sampler's own timesteps with ``train_timesteps: sampler``), as PD-DDPM does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffmis.config import Config
from diffmis.errors import ConfigError
from diffmis.losses import segmentation_loss_terms
from diffmis.masks import probabilities
from diffmis.methods.base import LossOutput, compose, register, segmentor_from_config
from diffmis.methods.medsegdiff import GaussianMaskDiffusion

__all__ = ["MedSegDiffV2", "anchor_loss"]


def anchor_loss(anchor_logits: Tensor, mask: Tensor, t: Tensor, alpha: int, beta: float) -> Tensor:
    """``1[t mod alpha = 0] (L_Dice + beta L_CE)`` over the batch (METHODS 3.2).

    Args:
        anchor_logits: (B, K, H, W) condition-segmentor logits. mask: (B, K, H, W) one-hot. t: (B,) int64.
    Returns:
        Scalar: Dice + beta CE of the selected samples; an exact zero (still in the graph, for DDP) when no
        sample of the batch is selected.
    """
    sel = (t % alpha) == 0
    logits = anchor_logits.float()
    if not bool(sel.any()):
        return logits.sum() * 0.0
    terms = segmentation_loss_terms(logits[sel], mask[sel])
    return terms["dice"] + beta * terms["ce"]


@register("medsegdiff_v2")
class MedSegDiffV2(GaussianMaskDiffusion):
    """MedSegDiff-V2: the ``medsegdiff_v2`` network (``model.segmentor`` is its condition model) + the anchor loss.

    Args:
        anchor_alpha: the anchor term applies when ``t % anchor_alpha == 0``.
        anchor_beta: weight of the cross-entropy inside the anchor term.
    """

    method_params = ("anchor_alpha", "anchor_beta")
    own_prior = True  # the condition segmentor's prediction can start the chain (sample.start_step)

    def __init__(self, denoiser: nn.Module, *args: Any, anchor_alpha: int = 5, anchor_beta: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(denoiser, *args, **kwargs)
        if int(anchor_alpha) < 1:
            raise ConfigError(f"model.params.anchor_alpha must be >= 1, got {anchor_alpha}")
        self.anchor_alpha = int(anchor_alpha)
        self.anchor_beta = float(anchor_beta)

    @classmethod
    def denoiser_kwargs(cls, cfg: Config) -> dict[str, Any]:
        if cfg.model.name != "medsegdiff_v2":
            raise ConfigError(f"recipe 'medsegdiff_v2' needs model.name 'medsegdiff_v2', got '{cfg.model.name}'")
        return {**super().denoiser_kwargs(cfg), "segmentor": segmentor_from_config(cfg, "the condition model")}

    def segmentor_module(self) -> nn.Module:
        return self.denoiser.segmentor

    @torch.no_grad()
    def start_prior(self, image: Tensor) -> Tensor:
        """The anchor: the condition segmentor's probabilities (B, K, H, W) of ``image``."""
        return probabilities(self.denoiser.segmentor(image).logits.float())

    def start_prior_from(self, image: Tensor, cond: dict[str, Any]) -> tuple[Optional[Tensor], int]:
        """The anchor of the condition already computed: no second pass of the condition segmentor."""
        return probabilities(cond["anchor_logits"].float()), 0

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        raw, cond, t = self.diffusion_terms(image, mask, generator)
        raw["anchor"] = anchor_loss(cond["anchor_logits"], mask, t, self.anchor_alpha, self.anchor_beta)
        return compose(raw, self.loss_weights, {**self.term_weights(), "anchor": 1.0})
