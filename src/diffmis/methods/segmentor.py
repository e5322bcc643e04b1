"""A discriminative segmentor alone: the baseline every diffusion method is measured against, and the prior /
pre-segmentation / condition network inside HiDiff, PD-DDPM and MedSegDiff-V2.

Loss: soft Dice + cross-entropy on the logits (sigmoid for K = 1, softmax over channels for K > 1). Sampling is
one forward pass (NFE 1); ensemble members are identical copies.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffmis.config import Config
from diffmis.losses import segmentation_loss_terms
from diffmis.masks import probabilities
from diffmis.methods.base import LossOutput, Method, build_segmentor, compose, register, repeat_members
from diffmis.sampling import SampleOutput

__all__ = ["SegmentorMethod"]


@register("segmentor")
class SegmentorMethod(Method):
    """A registered segmentor (``model.segmentor``, or ``model.name`` / ``model.params``) trained with Dice + CE.

    Args:
        segmentor: the network, ``forward(image) -> SegmentorOutput``.
        num_classes: K.
        loss_weights: ``train.loss_weights`` (terms ``dice``, ``ce``).
    """

    samplers = ("direct",)

    def __init__(self, segmentor: nn.Module, num_classes: int, loss_weights: Optional[dict[str, float]] = None) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights or {})

    @classmethod
    def from_config(cls, cfg: Config) -> "SegmentorMethod":
        seg = cfg.model.segmentor
        name, params = (seg.name, seg.params) if seg else (cfg.model.name, cfg.model.params)
        return cls(build_segmentor(name, dict(params), cfg.data.in_channels, cfg.data.num_classes,
                                   cfg.data.spatial_dims),
                   cfg.data.num_classes, dict(cfg.train.loss_weights))

    def segmentor_module(self) -> nn.Module:
        return self.segmentor

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        return compose(segmentation_loss_terms(self.segmentor(image).logits, mask), self.loss_weights,
                       {"dice": 1.0, "ce": 1.0})

    @torch.no_grad()
    def sample(self, image: Tensor, *, members: int = 1, **_: Any) -> SampleOutput:
        """Probabilities (B * members, K, H, W) in [0, 1]: one forward pass; sampler options do not apply."""
        probs = probabilities(self.segmentor(image).logits.float())
        return SampleOutput(probs=repeat_members(probs, members), nfe=1)
