"""Exponential moving average of a module's floating-point parameters and buffers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copy updated as ``shadow <- d * shadow + (1 - d) * param`` with a warm-up
    ``d = min(decay, (1 + n) / (10 + n))`` so that short runs are not dominated by the initial weights."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = module
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for k, v in self.module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the module (restored on exit)."""
        backup = {k: v.detach().clone() for k, v in self.module.state_dict().items() if k in self.shadow}
        self.module.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self.module.load_state_dict(backup, strict=False)
