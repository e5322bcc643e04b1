"""In-training validation: mean foreground Dice of the method's default sampler on the validation split."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from diffmis.config import Config
from diffmis.hardware import Resolved
from diffmis.masks import hard_one_hot
from diffmis.methods import Method
from diffmis.metrics import dice_batch
from diffmis.training import distributed as distu
from diffmis.training.batches import collate
from diffmis.utils import autocast
from diffmis.windows import sliding_window_inferer

__all__ = ["validate"]


@torch.no_grad()
def validate(method: Method, ds: Any, cfg: Config, device: torch.device, max_batches: Optional[int],
             info: distu.DistInfo, run: Resolved) -> dict[str, Any]:
    """Mean foreground Dice on ``ds`` with the config's sampler (a fixed generator: comparable across steps).

    At most ``max_batches * sample.batch_size`` images, shared over the ranks. Patch-trained runs
    (``data.patch_size``) predict each whole image with sliding windows of the patch size (``diffmis.windows``),
    as ``diffmis predict`` does. ``run`` is the resolved precision and layout.

    Returns:
        ``{"dice", "dice_per_class", "n_cases", "nfe"}`` ({} when the rank saw no image).
    """
    method.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.experiment.seed + 12345)
    bs = cfg.sample.batch_size
    idx = list(range(info.rank, len(ds), info.world_size))
    if max_batches is not None:
        idx = idx[:max_batches * bs]
    inferer = sliding_window_inferer(cfg.data.patch_size, bs, padding_mode="reflect") if cfg.data.patch_size else None
    per_batch = 1 if inferer is not None else bs  # whole images one at a time, windows batched
    calls = [0]

    def sample_probs(image: torch.Tensor) -> torch.Tensor:
        out = method.sample(image, eta=cfg.sample.eta, generator=gen)  # the run's sampler and steps
        calls[0] += out.nfe
        return out.probs.float()

    scores: list[list[float]] = []
    nfe = 0
    for start in range(0, len(idx), per_batch):
        batch = collate([ds[i] for i in idx[start:start + per_batch]])
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        if run.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        calls[0] = 0
        with autocast(device, run.precision):
            probs = inferer(image, sample_probs) if inferer is not None else sample_probs(image)
        nfe = calls[0]
        d = dice_batch(hard_one_hot(probs.float(), cfg.sample.threshold), mask)  # (B, K)
        scores.extend((d[:, 1:] if d.shape[1] > 1 else d).tolist())  # foreground classes
    gathered = [s for part in distu.all_gather_objects(scores) for s in part]
    method.train()
    if not gathered:
        return {}
    arr = np.array(gathered, dtype=np.float64)
    return {"dice": float(np.nanmean(arr)), "dice_per_class": np.nanmean(arr, axis=0).tolist(),
            "n_cases": len(gathered), "nfe": nfe}
