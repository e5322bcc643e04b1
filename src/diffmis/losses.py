"""Loss terms shared by the methods (each method weights its terms in one place, ``methods.base.compose``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmis.masks import probabilities

__all__ = ["soft_dice_loss", "segmentation_loss_terms", "bce_on_probabilities"]


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice, averaged over batch and channels.

    Args:
        probs: (B, K, H, W) in [0, 1].
        target: (B, K, H, W) one-hot in {0, 1}.
    Returns:
        scalar in [0, 1].
    """
    dims = tuple(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def bce_on_probabilities(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of probabilities (not logits), in float32 outside autocast: CUDA autocast refuses
    ``F.binary_cross_entropy`` (its log is unsafe in half precision). ``probs`` must be clamped away from 0 and 1
    by the caller when they can reach them."""
    with torch.autocast(device_type=probs.device.type, enabled=False):
        return F.binary_cross_entropy(probs.float(), target.float())


def segmentation_loss_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dice and cross-entropy terms of a discriminative segmentor.

    Args:
        logits: (B, K, H, W) raw scores.
        target: (B, K, H, W) one-hot in {0, 1}; for K = 1 the foreground channel.
    Returns:
        {"dice": soft Dice loss, "ce": BCE (K = 1) or categorical CE (K > 1)}, both scalars >= 0.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        ce = F.binary_cross_entropy_with_logits(logits, target)
    else:
        ce = F.cross_entropy(logits, target.argmax(dim=1))
    return {"dice": soft_dice_loss(probabilities(logits), target), "ce": ce}
