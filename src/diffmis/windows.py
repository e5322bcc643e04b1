"""Sliding-window geometry, shared by prediction and by in-training validation of patch-trained runs.

A patch-trained run (``data.patch_size``, e.g. DRIVE vessels) sees whole images through MONAI's
``SlidingWindowInferer``: windows of the patch size, overlap 0.25, Gaussian blending, ``batch_size`` windows per
network call. The network function may return a tensor or a dict of named tensors (each blended), and with
``with_coord=True`` it also receives each window's slices into the (padded) input, so tensors that travel with
the image (a prior mask) are cropped by the caller (:func:`crop_windows`). Images smaller than a window are padded
first (:func:`pad_to`), by the caller, so that those slices stay valid.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sliding_window_inferer", "crop_windows", "pad_to", "OVERLAP"]

#: fraction of a window shared with its neighbour
OVERLAP = 0.25


def sliding_window_inferer(patch_size: Sequence[int], batch_size: int, padding_mode: str = "constant",
                           with_coord: bool = False) -> Any:
    """MONAI ``SlidingWindowInferer`` with diffmis's window geometry (see the module docstring)."""
    from monai.inferers import SlidingWindowInferer

    return SlidingWindowInferer(roi_size=tuple(patch_size), sw_batch_size=batch_size, overlap=OVERLAP,
                                mode="gaussian", padding_mode=padding_mode, progress=False, with_coord=with_coord)


def crop_windows(x: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
    """The windows ``coords`` (MONAI's per-window slices, batch slice first) of ``x``, stacked along the batch."""
    return torch.cat([x[tuple(c)] for c in coords])


def pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pad ``x`` (..., *spatial) at the end of each spatial axis to at least ``size``: reflect where the image is
    large enough, else replicate."""
    spatial = x.shape[-len(size):]
    extra = [max(0, s - d) for s, d in zip(size, spatial)]
    if not any(extra):
        return x
    pads: list[int] = []
    for e in reversed(extra):  # F.pad wants the last axis first
        pads += [0, e]
    mode = "reflect" if all(e < d for e, d in zip(extra, spatial)) else "replicate"
    return F.pad(x, pads, mode=mode)
