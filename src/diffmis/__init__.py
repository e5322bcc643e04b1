"""diffmis: diffusion-based medical image segmentation (MedSegDiff, MedSegDiff-V2, PD-DDPM, HiDiff).

The public API is imported lazily so that ``import diffmis`` stays cheap and free of side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": "diffmis.config",
    "dump_config": "diffmis.config",
    "Config": "diffmis.config",
    "ConfigError": "diffmis.config",
    "build": "diffmis.methods",
    "METHODS": "diffmis.methods",
    "ensemble_predict": "diffmis.ensemble",
    "Predictor": "diffmis.inference",
    "build_dataset": "diffmis.data",
    "check_dataset": "diffmis.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffmis' has no attribute '{name}'")
