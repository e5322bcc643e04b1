"""HiDiff (Chen et al., arXiv 2407.03548, IEEE TMI 2024; METHODS 5): a discriminative segmentor S gives the prior
``p``; BBDM, a Bernoulli diffusion whose stationary law is ``B(p)``, refines it; S and the refiner R are trained
alternate-collaboratively.

    p = sigmoid / softmax(S(I))                                                        (K = 1: sigmoid, METHODS 5.2)
    q(y_t | y_0, p) = B(abar_t y_0 + (1 - abar_t) p)                                   (5.3.1)
    R([I, y_t, p], t, features of S) -> flip logits; loss KL + lambda focal             (5.3.3, 5.3.4)
    one training iteration (5.5):
      1. refiner step:   p and the features detached;  L_BBDM -> R;  EMA of R
      2. segmentor step: L_S (Dice + CE) + w_diff L_BBDM through p and the features -> S
    sample: y_{T-1} ~ B(p), Bernoulli-DDIM steps, the last returns y0_hat                (5.3.6)

The chain and its loss are BerDiff's (:mod:`diffmis.methods.berdiff`) with the segmentor's prior. With
``diffusion.prior_residual`` (default) the refiner's output is added to the prior's Bayes flip logits, so an
untrained refiner returns the segmentor's answer and training learns the correction. ``train.pretrain_steps``
runs the segmentor step alone first, ``train.segmentor_every: N`` then runs the segmentor step on every N-th
iteration only (0: never, S stays as it started and runs in eval mode, as at sampling; ``auto``: 0 after a
``train.prior_run``, else 1); ``train.prior_run`` starts S from a segmentor run; ``diffusion.prior_noise``
perturbs S's prior in the refiner step, so the refiner learns from mistakes like those S makes on unseen images
(the co-trained S is near-perfect on its own training images).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmis.config import Config
from diffmis.errors import ConfigError
from diffmis.losses import segmentation_loss_terms
from diffmis.masks import probabilities
from diffmis.methods.base import LossOutput, Phase, build_model, compose, register, segmentor_from_config, trainable
from diffmis.methods.berdiff import BerDiff

__all__ = ["HiDiff"]


@register("hidiff")
class HiDiff(BerDiff):
    """HiDiff: segmentor ``segmentor`` (S) + BBDM refiner ``refiner`` (R), alternate-collaborative training.

    Args:
        segmentor: S, ``forward(image) -> SegmentorOutput`` (logits and features fine -> coarse).
        denoiser: the refiner R (attribute ``refiner``), ``forward(y_t, t, {"image", "prior", "features"})
            -> flip logits``.
        w_diff: weight of L_BBDM in the segmentor step (``train.w_diff``).
        pretrain_steps: iterations that run the segmentor step alone (without L_BBDM) first.
        segmentor_every: after those, the segmentor step runs on every N-th iteration (0: never).
        **kwargs: :class:`BerDiff`'s (scheduler, num_classes, loss weights, focal lambda, prior residual, sampler).
    """

    network_name = "refiner"
    levers = ("diffusion.prior_noise", "diffusion.train_timesteps", "train.w_diff", "train.pretrain_steps",
              "train.segmentor_every", "train.denoiser_from_prior")
    warm_start_model = "segmentor_refiner"

    def __init__(self, segmentor: nn.Module, denoiser: nn.Module, *, w_diff: float = 0.1, pretrain_steps: int = 0,
                 segmentor_every: int = 1, prior_residual: bool = True, prior_noise: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(denoiser, prior_residual=prior_residual, **kwargs)
        self.segmentor = segmentor
        self.w_diff = w_diff
        self.pretrain_steps = pretrain_steps
        self.segmentor_every = segmentor_every
        self.prior_noise = prior_noise

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "HiDiff":
        t = cfg.train
        every = (0 if t.prior_run else 1) if t.segmentor_every == "auto" else t.segmentor_every
        if every == 0 and t.prior_run is None and t.pretrain_steps == 0:
            raise ConfigError("train.segmentor_every=0 never trains the segmentor, and it has neither "
                              "train.prior_run nor train.pretrain_steps: its prior would stay random. Give a "
                              "segmentor run (--set train.prior_run=RUN) or segmentor_every >= 1")
        seg = segmentor_from_config(cfg, "the prior segmentor")
        refiner = build_model(cfg.model.name, dict(cfg.model.params), in_channels=cfg.data.in_channels,
                              num_classes=cfg.data.num_classes, segmentor_channels=list(seg.feature_channels),
                              spatial_dims=cfg.data.spatial_dims)
        return super().from_config(cfg, segmentor=seg, denoiser=refiner, w_diff=cfg.train.w_diff,
                                   pretrain_steps=cfg.train.pretrain_steps,
                                   segmentor_every=every, prior_noise=cfg.diffusion.prior_noise,
                                   **kwargs)

    def segmentor_module(self) -> nn.Module:
        return self.segmentor

    # ---- the prior and the condition ----------------------------------------------------------------------

    def prior_and_condition(self, image: Tensor, detach: bool = True, noise: float = 0.0,
                            generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Any], int]:
        """S's prior ``p`` (B, K, H, W) and the refiner's condition ``{"image", "prior", "features"}``; ``detach``
        cuts both from S's graph (the refiner step and sampling); ``noise`` perturbs S's logits with spatially
        smooth noise of that std before ``p`` is taken (:func:`smooth_noise`). One network evaluation."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            out = self.segmentor(image)
            logits = out.logits.float()
            if noise > 0:
                logits = logits + noise * smooth_noise(logits.shape, generator, logits.device)
            prior = probabilities(logits)
            feats = list(out.features)
        if detach:
            prior, feats = prior.detach(), [f.detach() for f in feats]
        return prior, {"image": image, "prior": prior, "features": feats}, 1

    # ---- training: the alternate-collaborative iteration ---------------------------------------------------

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"segmentor": trainable(self.segmentor), "refiner": trainable(self.refiner)}

    def phases(self, step: int) -> list[Phase]:
        if step < self.pretrain_steps:  # the segmentor alone first
            return [Phase("segmentor", self.segmentor_loss_alone)]
        refine = Phase("refiner", self.refiner_loss, ema=True)
        if self.segmentor_frozen(step) or (step - self.pretrain_steps) % self.segmentor_every:  # the refiner alone
            return [refine]
        return [refine, Phase("segmentor", self.segmentor_loss)]

    def segmentor_frozen(self, step: int) -> bool:
        """Whether S is past its last optimizer step at ``step`` (``segmentor_every: 0`` after pre-training)."""
        return self.segmentor_every == 0 and step >= self.pretrain_steps

    def refiner_loss(self, image: Tensor, mask: Tensor, step: int = 0,
                     generator: Optional[torch.Generator] = None) -> LossOutput:
        """Step 1 (METHODS 5.5): L_BBDM with S's prior and features detached (the prior perturbed by
        ``prior_noise``, so that the refiner sees the kind of mistakes S makes on unseen images). A frozen S runs
        in eval mode, as at sampling: its batch-norm statistics stay those it was trained with, its dropout off."""
        was_training = self.segmentor.training
        if was_training and self.segmentor_frozen(step):
            self.segmentor.eval()
        try:
            _, cond, _ = self.prior_and_condition(image, detach=True, noise=self.prior_noise, generator=generator)
        finally:
            self.segmentor.train(was_training)
        return compose(self.bbdm_terms(mask, cond, generator), self.loss_weights,
                       {"kl": 1.0, "focal": self.focal_lambda})

    def segmentor_loss(self, image: Tensor, mask: Tensor, step: int = 0,
                       generator: Optional[torch.Generator] = None, with_bbdm: bool = True) -> LossOutput:
        """Step 2 (METHODS 5.5): L_S + w_diff L_BBDM, with gradients through the prior and the features."""
        out = self.segmentor(image)
        raw = segmentation_loss_terms(out.logits, mask)
        if self.w_diff > 0 and with_bbdm:
            prior = probabilities(out.logits.float())
            bb = self.bbdm_terms(mask, {"image": image, "prior": prior, "features": list(out.features)}, generator)
            raw["bbdm"] = bb["kl"] + self.focal_lambda * bb["focal"]
        return compose(raw, self.loss_weights, {"dice": 1.0, "ce": 1.0, "bbdm": self.w_diff})

    def segmentor_loss_alone(self, image: Tensor, mask: Tensor, step: int = 0,
                             generator: Optional[torch.Generator] = None) -> LossOutput:
        """Segmentor pre-training: L_S alone."""
        return self.segmentor_loss(image, mask, step, generator, with_bbdm=False)

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        """Both losses summed (validation loss logging only; training alternates the phases)."""
        a = self.refiner_loss(image, mask, step, generator)
        b = self.segmentor_loss(image, mask, step, generator)
        return LossOutput(a.total + b.total, {**a.terms, **{f"seg_{k}": v for k, v in b.terms.items()}})


def smooth_noise(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device,
                 scale: int = 8) -> Tensor:
    """Standard-normal noise that varies over about ``scale`` pixels: drawn at 1/``scale`` resolution, upsampled
    bilinearly and renormalised to unit std. Added to logits it moves whole regions across the threshold, the way
    a segmentor's mistakes on unseen images do (blobs, shifted borders), not salt-and-pepper."""
    b, k, *spatial = shape
    low = [max(1, s // scale) for s in spatial]
    gen_dev = generator.device if generator is not None else device
    z = torch.randn((b, k, *low), generator=generator, device=gen_dev).to(device)
    z = F.interpolate(z, size=tuple(spatial), mode="bilinear" if len(spatial) == 2 else "trilinear",
                      align_corners=False)
    return z / z.flatten(1).std(dim=1).clamp_min(1e-6).view(b, *([1] * (z.ndim - 1)))
