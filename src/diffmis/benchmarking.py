"""Speed of a config on this machine: what ``diffmis benchmark CONFIG`` measures.

No dataset is needed: a synthetic set of the config's working size, channels and classes goes through the
real trainer (``diffmis.training.train``, the config's precision, channels_last, batch size and, for HiDiff,
the full alternate step: refiner step + segmentor step) and the real predictor (the config's sampler, steps and
ensemble). Step times come from the trainer's per-step log (``metrics.jsonl``), warm-up steps left out.

The quality benchmarks on real data (Dice at equal budget, Dice versus NFE, ablations, the peer comparison)
are the scripts under ``benchmarks/`` in the source tree; see docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from diffmis.config import Config, load_config
from diffmis.errors import ConfigError
from diffmis.hardware import cpu_info, machine_record, resolve_for

# torch and numpy are imported inside the functions: benchmarks/common.py takes cpu_model() from here in
# processes that must not load torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return cpu_info().model


def machine_info() -> dict[str, Any]:
    """CPU model and ISA flags, cores, torch threads and versions, allocator setting, load: the record a timing
    needs (:func:`diffmis.hardware.machine_record`)."""
    return machine_record()


def _working_size(cfg: Config, size: Optional[int]) -> tuple[int, int]:
    if size:
        return (size, size)
    if cfg.data.patch_size:
        return tuple(cfg.data.patch_size)  # type: ignore[return-value]
    if cfg.data.image_size:
        return tuple(cfg.data.image_size)  # type: ignore[return-value]
    raise ConfigError("the config has neither data.image_size nor data.patch_size: pass --size")


def speed_profile(config: str | Path, overrides: tuple[str, ...] = (), *, steps: int = 5, warmup: int = 2,
                  size: Optional[int] = None, batch: Optional[int] = None, precision: Optional[str] = None,
                  predict_images: int = 4, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time training steps and prediction of ``config`` (with ``--set`` style ``overrides``) on synthetic data.

    Returns a dict: ``params``, ``train`` (median/min/max step seconds and images/s over ``steps`` steps after
    ``warmup``), ``predict`` (seconds per image over ``predict_images`` images after one warm-up image, NFE
    per image, sampler settings), ``settings`` and ``machine``.
    """
    if steps < 1 or warmup < 0 or predict_images < 1:
        raise ConfigError("steps and predict_images must be >= 1, warmup >= 0")
    import numpy as np
    import torch

    from diffmis.inference import Predictor
    from diffmis.methods import build
    from diffmis.training import train

    base = load_config(config, list(overrides))
    h, w = _working_size(base, size)
    bs = batch or base.train.batch_size
    sets = [*overrides, "data.kind=synthetic", "data.root=null", f"data.image_size=[{h}, {w}]",
            "data.patch_size=null", f"data.synthetic.n_train={max(2 * bs, 8)}", "data.synthetic.n_val=1",
            "data.synthetic.n_test=1", f"train.batch_size={bs}", f"train.max_steps={warmup + steps}",
            "train.log_every=1", "train.val_every=0", "train.ckpt_every=0", "train.progress=false",
            "train.max_minutes=null", "train.grad_accum=1", "train.calibrate=false"]
    sets.append("train.pretrain_steps=0")  # every timed step is a full training iteration (e.g. HiDiff's two)
    if precision:
        sets.append(f"train.precision={precision}")
    cfg = load_config(config, sets)
    params = sum(p.numel() for p in build(cfg).parameters())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = resolve_for(cfg.train.precision, cfg.train.channels_last, dev)
    if res.warning:
        log(f"warning: {res.warning}")
    log(f"benchmark: {cfg.experiment.recipe} ({cfg.model.name}, {params / 1e6:.2f}M parameters) at {h}x{w}, "
        f"batch {bs}, {res.describe()}, {torch.get_num_threads()} torch thread(s) on {cpu_info().summary()}")
    with tempfile.TemporaryDirectory(prefix="diffmis-benchmark-") as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        train(cfg, run, log=lambda s: None)
        train_wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        setup = next((r for r in lines if r.get("phase") == "setup"), {})
        step_s = [bs / r["images_per_s"] for r in lines if r.get("phase") == "train" and r.get("images_per_s")]
        timed = step_s[warmup:] or step_s
        med = statistics.median(timed)
        train_res = {"step_s_median": round(med, 4), "step_s_min": round(min(timed), 4),
                     "step_s_max": round(max(timed), 4), "images_per_s": round(bs / med, 3),
                     "timed_steps": len(timed), "warmup_steps": warmup, "wall_s": round(train_wall, 1)}
        log(f"  training: {med:.3f} s/step (median of {len(timed)}), {bs / med:.2f} images/s")

        pred = Predictor.from_run(run, checkpoint="last")
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 256, (cfg.data.in_channels, h, w)).astype(np.uint8)
                for _ in range(predict_images + 1)]
        pred.predict_array(imgs[0], "warm-up")
        t1 = time.perf_counter()
        nfe = [pred.predict_array(im, f"image {i}").nfe for i, im in enumerate(imgs[1:])]
        per_image = (time.perf_counter() - t1) / predict_images
        predict_res = {"seconds_per_image": round(per_image, 4), "nfe_per_image": float(np.mean(nfe)),
                       "sampler": pred.sampler, "steps": pred.steps, "ensemble": pred.ensemble,
                       "start_step": pred.start_step, "images": predict_images}
        log(f"  prediction: {per_image:.3f} s/image ({pred.sampler}, {pred.steps} steps, ensemble {pred.ensemble},"
            f" NFE {predict_res['nfe_per_image']:.0f} batched calls per image)")
    return {"benchmark": "speed_profile", "config": str(config), "recipe": cfg.experiment.recipe,
            "model": cfg.model.name, "params": params,
            "settings": {"size": [h, w], "batch": bs, "precision_requested": cfg.train.precision,
                         "channels_last_requested": cfg.train.channels_last,
                         "precision": setup.get("precision"), "channels_last": setup.get("channels_last"),
                         "precision_reason": setup.get("reason"), "overrides": list(overrides)},
            "train": train_res, "predict": predict_res, "machine": machine_info()}
