"""Tiny configs shared by the training, prediction and CLI tests (32x32 synthetic data, widths of 8)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

SEG = {"name": "unet", "params": {"features": [8, 8, 16, 16, 32, 8]}}
GAUSS = {"kind": "gaussian", "timesteps": 50, "schedule": "cosine", "prediction": "x0"}  # as the shipped configs

RECIPES: dict[str, dict[str, Any]] = {
    "segmentor": {"model": {"name": "unet", "params": {"features": [8, 8, 16, 16, 32, 8]}},
                  "diffusion": {"kind": "none"}, "sample": {"sampler": "direct"}},
    "conditional_unet": {"model": {"name": "conditional_unet",
                                   "params": {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                              "attention_levels": [], "head_channels": 8}},
                         "diffusion": GAUSS},
    "medsegdiff": {"model": {"name": "medsegdiff", "params": {"size": "S", "width": 8, "channel_mult": [1, 2],
                                                              "num_res_blocks": 1, "attention_levels": []}},
                   "diffusion": GAUSS},
    "medsegdiff_v2": {"model": {"name": "medsegdiff_v2",
                                "params": {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                           "attention_levels": [], "head_channels": 8, "ssformer_depth": 1,
                                           "ssformer_heads": 2, "image_size": 32, "anchor_alpha": 2},
                                "segmentor": SEG},
                      "diffusion": GAUSS},
    "pd_ddpm": {"model": {"name": "conditional_unet",
                          "params": {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                     "attention_levels": [], "head_channels": 8},
                          "segmentor": SEG},
                "diffusion": GAUSS, "sample": {"start_step": 20}},
    "berdiff": {"model": {"name": "conditional_unet",
                          "params": {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                     "attention_levels": [], "head_channels": 8}},
                "diffusion": {"kind": "bernoulli", "timesteps": 10, "schedule": "cosine", "focal_gamma": 0.0,
                              "prior_residual": False},
                "sample": {"sampler": "bernoulli_ddim", "steps": 3}},
    "hidiff": {"model": {"name": "bbdm", "params": {"width": 8, "channel_mult": [1, 2, 2]}, "segmentor": SEG},
               "diffusion": {"kind": "bernoulli", "timesteps": 10, "schedule": "cosine"},
               "sample": {"sampler": "bernoulli_ddim", "steps": 3}, "train": {"lr_schedule": "poly"}},
}


def tiny_config(recipe: str, out: Path, *, num_classes: int = 1, steps: int = 4, **train: Any) -> dict[str, Any]:
    r = copy.deepcopy(RECIPES[recipe])  # callers edit the result; RECIPES must stay as written
    cfg: dict[str, Any] = {
        "experiment": {"name": recipe, "recipe": recipe, "seed": 3, "output_dir": str(out)},
        "data": {"kind": "synthetic", "image_size": [32, 32], "in_channels": 1, "num_classes": num_classes,
                 "augment": {"flip": True, "rotate90": True, "prob": 0.5},
                 "synthetic": {"n_train": 8, "n_val": 2, "n_test": 2}},
        "model": r["model"],
        "diffusion": r["diffusion"],
        # fp32: the tests compare numbers exactly; precision "auto" has its own tests (test_hardware.py)
        "train": {"max_steps": steps, "batch_size": 2, "lr": 1e-3, "log_every": 1, "ema_decay": 0.9,
                  "progress": False, "precision": "fp32", **r.get("train", {}), **train},
        "sample": {"steps": 3, "batch_size": 4, **r.get("sample", {})},
    }
    return cfg
