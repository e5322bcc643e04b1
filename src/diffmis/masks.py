"""Masks, one helper per concept: logits -> probabilities, probabilities -> labels, labels -> one-hot.

The conventions everywhere in diffmis: a mask with K channels is one-hot, ``(B, K, *spatial)`` in {0, 1}; K = 1 is
a binary task whose single channel is the foreground (label 1), K > 1 has channel 0 = background. Probabilities
are a sigmoid for K = 1 and a softmax over channels for K > 1 (a softmax over one channel is identically 1: the
HiDiff K = 1 bug, METHODS 5.2). Label maps are integer ``(B, *spatial)``.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from diffmis.errors import InputError

__all__ = ["probabilities", "hard_labels", "one_hot", "hard_one_hot"]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, K, *spatial)`` -> probabilities in [0, 1]: sigmoid for K = 1, softmax over channels for K > 1."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def hard_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Probabilities ``(B, K, *spatial)`` -> label map ``(B, *spatial)`` int64: ``prob > threshold`` in {0, 1}
    for K = 1, the argmax over channels for K > 1 (``threshold`` unused)."""
    if probs.shape[1] == 1:
        return (probs[:, 0] > threshold).long()
    return probs.argmax(dim=1)


def one_hot(labels: Union[np.ndarray, torch.Tensor], num_classes: int, *, dim: int = 1,
            check: bool = False) -> torch.Tensor:
    """Label map -> one-hot float mask, with the class axis inserted at ``dim``.

    Args:
        labels: integer class indices in ``[0, K)`` (``{0, 1}`` when ``num_classes`` is 1), numpy or a tensor,
            e.g. ``(B, H, W)`` (``dim=1``) or one item ``(H, W)`` (``dim=0``). Numpy input is encoded in numpy
            (no thread start-up cost per item in data loading).
        num_classes: K. ``1``: the single foreground channel (``labels == 1``); ``>= 2``: channel k is
            ``labels == k`` (channel 0 = background).
        dim: where the class axis goes.
        check: raise :class:`InputError` for labels outside ``[0, max(K, 2))``.

    Returns:
        float32 tensor in {0, 1} (on ``labels``' device for a tensor input).
    """
    hi = max(num_classes, 2)
    size = labels.size if isinstance(labels, np.ndarray) else labels.numel()
    if check and size:
        lo_v, hi_v = int(labels.min()), int(labels.max())
        if lo_v < 0 or hi_v >= hi:
            raise InputError(f"labels span {lo_v}..{hi_v}, outside 0..{hi - 1}")
    if isinstance(labels, np.ndarray):
        lab = np.expand_dims(labels, dim)
        if num_classes == 1:
            return torch.from_numpy((lab == 1).astype(np.float32))
        shape = [1] * lab.ndim
        shape[dim] = num_classes
        classes = np.arange(num_classes, dtype=lab.dtype).reshape(shape)
        return torch.from_numpy((lab == classes).astype(np.float32))
    lab = labels.long().unsqueeze(dim)
    if num_classes == 1:
        return (lab == 1).float()
    shape = [1] * lab.ndim
    shape[dim] = num_classes
    return (lab == torch.arange(num_classes, device=lab.device).view(shape)).float()


def hard_one_hot(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Probabilities ``(B, K, *spatial)`` -> the one-hot mask of their labels, same shape, float in {0, 1}."""
    return one_hot(hard_labels(probs, threshold), probs.shape[1])
