"""A segmentor as a diffusion denoiser: ``x0_hat = probabilities(S([I, x_t]))`` in the scheduler's mask range, and
as a Bernoulli refiner: flip logits ``(1 - 2 y_t) logit(P(y_0 = 1 | S([I, y_t, p])))``.

Any registered segmentor (``backbone``: "unet", "attention_unet", "segresnet") with K extra input channels for the
noisy mask reads ``[I, x_t]`` and predicts the clean mask through its own output activation (sigmoid for K = 1,
softmax for K > 1), mapped to the diffused range (``2 p - 1`` for ``pm1``). It has no timestep input: it suits
chains that start from a noised prior at a small T' (PD-DDPM, ``sample.start_step``), where the noise level in
``x_t`` stays low and the network reads it from ``x_t`` itself; from pure noise (MedSegDiff's chain) the
time-conditioned denoisers are the better choice.

Because its architecture is the pre-segmentation network's plus K input channels, it can start from that network's
trained weights (:meth:`SegmentorDenoiser.start_from`, ``train.denoiser_from_prior``): the mask channels of the
first convolution start at zero, so the untrained denoiser returns the pre-segmentation's probabilities whatever
``x_t`` is, and training spends its minutes on what the pre-segmentation gets wrong rather than on learning to
segment from scratch.

``segmentor_refiner`` is the same idea for the Bernoulli chains (HiDiff, BerDiff): the segmentor reads
``[I, y_t, p]`` (C + 2K channels: the image, the binary state and the prior) and its probability ``q`` of each
channel being 1 becomes the flip logits the Bernoulli scheduler expects, ``(1 - 2 y_t) logit(q)``, so that
``y0_hat = |y_t - sigmoid(flip)| = q`` (METHODS 5.3.3). Started from HiDiff's segmentor run, it returns the
segmentor's answer whatever ``y_t`` and ``p`` are; with K > 1 the segmentor's softmax is read channel by channel
(``logit(softmax_k)``), as the Bernoulli chain treats each channel. It replaces the prior residual
(``diffusion.prior_residual`` must be false: the network already starts at the segmentor's answer).

Contents
    1. Model
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffmis.errors import CheckpointError
from diffmis.masks import probabilities
from diffmis.registry import MODELS, SEGMENTORS

__all__ = ["SegmentorDenoiser", "SegmentorRefiner", "channel_logits"]


# ======================================================================================================
# 1. Model
# ======================================================================================================


@MODELS.register("segmentor_denoiser")
class SegmentorDenoiser(nn.Module):
    """``f(x_t, t, cond) = to_range(probabilities(S([I, x_t])))``: an x0 predictor without a timestep input.

    Args:
        in_channels: image channels C (the segmentor reads C + K channels).
        num_classes: K mask channels.
        backbone: registered segmentor name.
        spatial_dims: 2 or 3.
        **backbone_params: the segmentor's own parameters (e.g. ``features`` of "unet").

    Attributes:
        outputs_x0_probabilities: marks a denoiser whose output is already a clean-mask estimate in the mask
            range; the Gaussian methods then require ``diffusion.prediction: x0`` and set :attr:`mask_range`.
        mask_range: ``"pm1"`` (outputs ``2 p - 1``) or ``"01"`` (outputs ``p``).
    """

    outputs_x0_probabilities: ClassVar[bool] = True
    #: mask-sized inputs beside the image, K channels each (x_t here; y_t and the prior for the refiner)
    mask_inputs: ClassVar[int] = 1

    def __init__(self, in_channels: int, num_classes: int, *, backbone: str = "unet", spatial_dims: int = 2,
                 **backbone_params: Any) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.backbone = backbone
        self.backbone_params = dict(backbone_params)
        dims = {} if spatial_dims == 2 else {"spatial_dims": spatial_dims}
        self.net = SEGMENTORS.build(backbone, in_channels=in_channels + self.mask_inputs * num_classes,
                                    num_classes=num_classes,
                                    **self.backbone_params, **dims)
        self.size_multiple = self.net.size_multiple
        self.spatial_dims = spatial_dims
        self.mask_range = "pm1"

    def condition(self, image: Tensor) -> dict[str, Tensor]:
        """``{"image": image}``: the image is concatenated to ``x_t`` at every call."""
        return {"image": image}

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The clean-mask estimate ``(B, K, *spatial)`` in the mask range; ``t`` is not used (see the module)."""
        logits = self.net(torch.cat([cond["image"], x_t.to(cond["image"].dtype)], dim=1)).logits
        p = probabilities(logits.float())
        return 2.0 * p - 1.0 if self.mask_range == "pm1" else p

    @torch.no_grad()
    def start_from(self, segmentor: nn.Module, source: str = "the pre-segmentation network") -> None:
        """Copy a trained segmentor of the same backbone and parameters (reading C channels) into this network.

        Every tensor is copied as it is, except the first convolution's weight, which reads C + K channels here
        (C + 2K for the refiner): its C image channels are copied and its mask channels set to zero, so the
        output equals the segmentor's until training teaches the network to read ``x_t``.

        Raises:
            CheckpointError: a tensor missing on either side, or a shape that differs otherwise (named).
        """
        own = self.net.state_dict()
        theirs = segmentor.state_dict()
        fix = f"give the denoiser the same backbone ('{self.backbone}') and parameters as model.segmentor"
        extra = self.mask_inputs * self.num_classes
        start: dict[str, Tensor] = {}  # built in full before anything is loaded: a misfit changes nothing
        for key, val in own.items():
            if key not in theirs:
                raise CheckpointError(f"{source} does not fit the denoiser: tensor '{key}' is missing from it; {fix}")
            src = theirs[key]
            if src.shape == val.shape:
                start[key] = src.clone()
            elif (src.dim() == val.dim() >= 3 and src.shape[0] == val.shape[0] and src.shape[2:] == val.shape[2:]
                  and val.shape[1] == src.shape[1] + extra and src.shape[1] == self.in_channels):
                start[key] = torch.cat([src, src.new_zeros(src.shape[0], extra, *src.shape[2:])], 1)
            else:
                raise CheckpointError(f"{source} does not fit the denoiser: tensor '{key}' has shape "
                                      f"{tuple(src.shape)} there but {tuple(val.shape)} here; {fix}")
        unexpected = [k for k in theirs if k not in own]
        widened = sum(own[k].shape != theirs[k].shape for k in own)
        if unexpected or widened != 1:
            what = (f"unexpected tensor '{unexpected[0]}'" if unexpected
                    else f"{widened} input convolutions to widen (not 1)")
            raise CheckpointError(f"{source} does not fit the denoiser: {what}; {fix}")
        self.net.load_state_dict(start)


@MODELS.register("segmentor_refiner")
class SegmentorRefiner(SegmentorDenoiser):
    """``f(y_t, t, cond) = (1 - 2 y_t) logit(q)``, ``q = P(y_0 = 1)`` from ``S([I, y_t, p])``: Bernoulli flip logits.

    Args:
        in_channels, num_classes, backbone, spatial_dims, **backbone_params: as :class:`SegmentorDenoiser`.
        segmentor_channels: HiDiff's segmentor feature widths; accepted and not used (the refiner reads the prior,
            not the features).

    Attributes:
        starts_at_prior_answer: marks a refiner whose output is already a full answer (not a correction of the
            prior's Bayes flips); the Bernoulli methods then refuse ``diffusion.prior_residual: true``.
    """

    outputs_x0_probabilities: ClassVar[bool] = False
    starts_at_prior_answer: ClassVar[bool] = True
    mask_inputs: ClassVar[int] = 2

    def __init__(self, in_channels: int, num_classes: int, *, segmentor_channels: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(in_channels, num_classes, **kwargs)

    def forward(self, y_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Flip logits ``(B, K, *spatial)``: ``y0_hat = |y_t - sigmoid(.)|`` is the network's probability ``q``."""
        image = cond["image"]
        logits = self.net(torch.cat([image, y_t.to(image.dtype), cond["prior"].to(image.dtype)], dim=1)).logits
        return (1.0 - 2.0 * y_t.float()) * channel_logits(logits.float())


def channel_logits(logits: Tensor) -> Tensor:
    """``logit(q_k)`` of each channel's probability: the logits themselves for K = 1 (sigmoid), ``log q_k -
    log(1 - q_k)`` of the softmax for K > 1, computed from ``log_softmax`` (finite while ``q_k < 1 - 1e-6``)."""
    if logits.shape[1] == 1:
        return logits
    log_q = torch.log_softmax(logits, dim=1).clamp(max=-1e-6)
    return log_q - torch.log(-torch.expm1(log_q))
