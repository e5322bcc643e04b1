"""``diffmis quickstart``: the whole pipeline on the built-in MNI brain-tissue set, offline, on a CPU.

1. writes the built-in dataset (MNI152 2009 T1 template shipped inside nilearn; background / grey matter /
   white matter, axial slices) in the folder layout;
2. trains HiDiff (a UNet segmentor and the BBDM refiner, alternate-collaborative, T = 10) for a wall-clock
   budget;
3. predicts the test slices with the segmentor alone and with HiDiff (ensemble with uncertainty maps);
4. evaluates both (Dice, IoU, HD95, ASSD) and writes the HTML report; prints a table and the report path.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from diffmis.config import load_config

__all__ = ["QuickstartResult", "run_quickstart", "quickstart_config"]


@dataclass
class QuickstartResult:
    run_dir: Path
    report: Path
    dice: dict[str, float]
    steps: int
    seconds: float


def quickstart_config(data_root: Path, out_dir: Path, minutes: float, seed: int = 0, image_size: int = 96):
    """The quickstart's config: small networks, bf16, a time budget instead of a step count."""
    return load_config(base={
        "experiment": {"name": "hidiff_mni", "recipe": "hidiff", "seed": seed, "output_dir": str(out_dir)},
        "data": {"kind": "folder", "root": str(data_root), "image_size": [image_size, image_size],
                 "in_channels": 1, "num_classes": 3, "normalize": "minmax", "train_split": "train",
                 "val_split": "val", "test_split": "test",
                 "augment": {"flip": True, "prob": 0.5}},
        "model": {"name": "bbdm", "params": {"width": 16},
                  "segmentor": {"name": "unet", "params": {"features": [16, 16, 32, 64, 128, 16]}}},
        "diffusion": {"kind": "bernoulli", "timesteps": 10, "schedule": "cosine"},
        "train": {"max_steps": 100000, "max_minutes": minutes, "batch_size": 8, "lr": 1e-3,
                  "lr_schedule": "constant", "warmup_steps": 20, "ema_decay": 0.99, "precision": "auto",
                  "w_diff": 0.1, "pretrain_steps": 0, "val_every": 0, "log_every": 10, "grad_clip": 1.0},
        # one Bernoulli-DDIM step (T-1 -> 0) scored best after a few hundred CPU steps: 0.878 vs 0.864 for ten
        # steps on the MNI val slices (benchmarks/results/hidiff_mni.json); `diffmis predict --steps 10` for more
        "sample": {"sampler": "bernoulli_ddim", "steps": 1, "ensemble": 4, "fuse": "mean", "batch_size": 16},
    })


def run_quickstart(out: str | Path = "quickstart", minutes: float = 6.0, seed: int = 0, image_size: int = 96,
                   log: Callable[[str], None] = print) -> QuickstartResult:
    """Run the quickstart into ``out`` (replaced if it exists). ``minutes`` is the training budget."""
    from diffmis.data import write_mni
    from diffmis.evaluation import evaluate_folders
    from diffmis.inference import Predictor, predict_paths
    from diffmis.report import write_report
    from diffmis.training.trainer import train

    t0 = time.time()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log(f"[1/4] building the MNI brain-tissue dataset (offline, from the nilearn package) -> {out / 'data'}")
    data_root = write_mni(out / "data")
    cfg = quickstart_config(data_root, out / "runs", minutes, seed, image_size)

    log(f"[2/4] training HiDiff (UNet segmentor + BBDM refiner, T=10) for {minutes:g} min on "
        f"{image_size}x{image_size} slices")
    res = train(cfg, out / "runs" / cfg.experiment.name)
    run_dir = res.run_dir

    log("[3/4] predicting the test slices: segmentor alone, and HiDiff (4-member ensemble + uncertainty)")
    test_ids = [s.strip() for s in (data_root / "splits" / "test.txt").read_text().split() if s.strip()]
    ref_dir = out / "test_masks"
    img_dir = out / "test_images"
    ref_dir.mkdir()
    img_dir.mkdir()
    inputs = []
    for sid in test_ids:
        img = next(p for p in (data_root / "images").glob(f"{sid}.*"))
        msk = next(p for p in (data_root / "masks").glob(f"{sid}.*"))
        shutil.copy(img, img_dir / img.name)
        shutil.copy(msk, ref_dir / msk.name)
        inputs.append(img_dir / img.name)
    pred_root = run_dir / "predictions"
    timings: dict[str, Any] = {}
    for name, kwargs in (("segmentor", {"prior_only": True}), ("hidiff", {})):
        pred = Predictor.from_run(run_dir, checkpoint="last", **kwargs)
        s = predict_paths(pred, inputs, pred_root / name, save_prob=True, save_uncertainty=(name == "hidiff"))
        timings[name] = {"nfe_per_image": s.nfe_per_image, "seconds_per_image": s.seconds_per_image}

    log("[4/4] evaluating and writing the report")
    dice: dict[str, float] = {}
    for name in ("segmentor", "hidiff"):
        ev = evaluate_folders(pred_root / name, ref_dir, num_classes=3, images_dir=img_dir,
                              uncertainty_dir=(pred_root / name / "uncertainty") if name == "hidiff" else None,
                              prob_dir=pred_root / name / "prob", out_dir=run_dir / "eval" / name)
        dice[name] = float(ev.foreground_mean["Dice"])
    report = write_report(run_dir)
    seconds = time.time() - t0
    log("")
    log(f"{'method':<12}{'Dice (GM+WM mean)':>20}{'NFE/sample':>12}{'s/image':>10}")
    for name in ("segmentor", "hidiff"):
        tm = timings[name]
        log(f"{name:<12}{dice[name]:>20.4f}{(tm['nfe_per_image'] or 0):>12.0f}{(tm['seconds_per_image'] or 0):>10.3f}")
    log(f"\ntrained {res.step} steps; total {seconds / 60:.1f} min")
    log(f"report: {report.resolve()}")
    return QuickstartResult(run_dir=run_dir, report=report, dice=dice, steps=res.step, seconds=seconds)
