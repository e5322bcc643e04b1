"""``diffmis quickstart``: the whole pipeline on the built-in MNI brain-tissue set, offline, on any CPU.

1. writes the built-in dataset (MNI152 2009 T1 template shipped inside nilearn; background / grey matter /
   white matter, axial slices) in the folder layout;
2. sizes the training to the machine: it times a few segmentor steps and HiDiff steps here, then plans a
   segmentor phase and an alternate-collaborative HiDiff phase (a fixed recipe scaled to fit the budget, at
   96x96, or 64x64 where even the smallest plan would not fit) and prints the plan;
3. trains HiDiff (a UNet segmentor and the BBDM refiner, T = 10) with that plan, then fits its probability
   temperature on the val slices (the recipe's ``train.calibrate``; labels do not move);
4. predicts the test slices with the segmentor alone and with HiDiff (ensemble with uncertainty maps);
5. evaluates both (Dice, IoU, HD95, ASSD) and writes the HTML report; prints a table and the report path.

The recipe is the shipped ``hidiff_mni`` config with the quickstart's smaller networks (:data:`OVERRIDES`).
The plan's numbers come from the MNI *val* split (never the test split it reports on): with 600 segmentor
steps then 200 HiDiff steps (cosine learning rate) both rows reach val Dice 0.90; half of that, 0.86-0.89.

Safety: the output folder is the quickstart's own. Options are checked before anything is written; an existing
folder is replaced only when it holds a previous quickstart (its ``.diffmis-quickstart`` marker) or is empty;
any other folder is refused, so a mistyped ``--out`` never deletes a user's files.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from diffmis.config import Config, load_config
from diffmis.errors import ConfigError, InputError

__all__ = ["QuickstartResult", "Plan", "plan_training", "run_quickstart", "run_quickstart_3d", "quickstart_config",
           "MARKER"]

#: file that marks a folder as a quickstart output (and so replaceable by the next quickstart)
MARKER = ".diffmis-quickstart"
#: the quickstart's changes to the shipped hidiff_mni recipe: smaller networks, the built-in set on disk; the BBDM
#: refiner trained from scratch alongside its segmentor (the recipe's segmentor refiner starts from a segmentor
#: run, which the quickstart's single run does not have)
OVERRIDES = (
    "experiment.name=hidiff_mni", "data.kind=folder", "model.name=bbdm",
    'model.params={"width": 16, "channel_mult": [1, 1, 2, 2, 4]}', "diffusion.prior_residual=true",
    "train.denoiser_from_prior=false", "model.segmentor.params.features=[16, 16, 32, 64, 128, 16]",
    "train.lr_schedule=cosine", "train.warmup_steps=20", "train.ema_decay=0.99", "train.val_every=0",
    "train.ckpt_every=0", "train.log_every=10", "sample.ensemble=4", "sample.batch_size=16",
    # the plan below was chosen on validation with the co-trained segmentor's own priors (the recipe's
    # prior_noise came later, tuned at 128x128 with larger networks)
    "diffusion.prior_noise=0.0",
)
#: the full plan (segmentor steps, then HiDiff steps) and the smallest one run at 96x96
FULL_PLAN = (600, 200)
MIN_SCALE = 0.5
SIZES = (96, 64)


@dataclass
class QuickstartResult:
    run_dir: Path
    report: Path
    dice: dict[str, float]
    steps: int
    seconds: float
    plan: "Plan"


@dataclass(frozen=True)
class Plan:
    """What the quickstart trains: ``segmentor_steps`` (segmentor alone) then ``hidiff_steps`` (refiner and
    segmentor alternating) at ``image_size``, from the measured step times; ``minutes``: the predicted time."""

    image_size: int
    segmentor_steps: int
    hidiff_steps: int
    segmentor_step_s: float
    hidiff_step_s: float
    minutes: float
    note: str = ""
    geometry: str = ""

    @property
    def steps(self) -> int:
        return self.segmentor_steps + self.hidiff_steps

    def describe(self) -> str:
        return (f"{self.segmentor_steps} segmentor steps ({self.segmentor_step_s:.2f} s each) + {self.hidiff_steps} "
                f"HiDiff steps ({self.hidiff_step_s:.2f} s each) at "
                f"{self.geometry or f'{self.image_size}x{self.image_size}'}: about "
                f"{self.minutes:.1f} min{'; ' + self.note if self.note else ''}")


def quickstart_config(data_root: Path, out_dir: Path, image_size: int = 96, seed: int = 0,
                      extra: tuple[str, ...] = ()) -> Config:
    """The quickstart's config: the shipped ``hidiff_mni`` recipe with :data:`OVERRIDES`, reading ``data_root``."""
    return load_config("hidiff_mni", [*OVERRIDES, f"data.root={data_root}", f"data.image_size={image_size}",
                                      f"experiment.output_dir={out_dir}", f"experiment.seed={seed}", *extra])


def plan_training(budget_minutes: float, measure: Callable[[int], tuple[float, float]],
                  sizes: tuple[int, ...] = SIZES, full_plan: tuple[int, int] = FULL_PLAN) -> Plan:
    """Scale ``full_plan`` (segmentor steps, HiDiff steps; default :data:`FULL_PLAN`) to ``budget_minutes`` of
    training on this machine.

    ``measure(size)`` returns the seconds of one segmentor step and one HiDiff step at ``size``. The largest size
    whose smallest plan (``MIN_SCALE`` x the full plan) fits ``1.5 x budget`` is used, with the full plan scaled
    down (never below ``MIN_SCALE``) to fit the budget; when no size fits, the smallest size runs its smallest
    plan and the note says it will take longer than the budget.
    """
    if budget_minutes <= 0:
        raise ConfigError(f"the training budget must be > 0 minutes, got {budget_minutes}")
    budget = budget_minutes * 60.0
    plan = None
    for size in sizes:
        seg_s, hid_s = measure(size)
        full = full_plan[0] * seg_s + full_plan[1] * hid_s
        scale = min(1.0, budget / full)
        if scale >= MIN_SCALE or MIN_SCALE * full <= 1.5 * budget:
            scale = max(scale, MIN_SCALE)
            plan = (size, scale, seg_s, hid_s, "")
            break
        plan = (size, MIN_SCALE, seg_s, hid_s, f"this machine needs more than {budget_minutes:g} min for the "
                                               f"smallest plan")
    size, scale, seg_s, hid_s, note = plan  # type: ignore[misc]
    p_steps, h_steps = round(full_plan[0] * scale), round(full_plan[1] * scale)
    return Plan(image_size=size, segmentor_steps=p_steps, hidiff_steps=h_steps, segmentor_step_s=seg_s,
                hidiff_step_s=hid_s, minutes=(p_steps * seg_s + h_steps * hid_s) / 60.0, note=note)


def _measure_steps(data_root: Path, size: int, seed: int, make: Optional[Callable[..., Config]] = None
                   ) -> tuple[float, float]:
    """Seconds of one segmentor step and one HiDiff step at ``size``, through the real trainer (3 steps of each;
    the first of each kind warms up and is left out). ``make``: the config builder (default: the 2D one)."""
    from diffmis.training import train

    make = make or quickstart_config
    with tempfile.TemporaryDirectory(prefix="diffmis-quickstart-") as tmp:
        cfg = make(data_root, Path(tmp), size, seed, (
            "train.max_steps=6", "train.pretrain_steps=3", "train.log_every=1", "train.progress=false",
            "train.warmup_steps=0", "train.calibrate=false"))
        train(cfg, Path(tmp) / "run", log=lambda s: None)
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        secs = [cfg.train.batch_size / r["images_per_s"] for r in lines if r.get("phase") == "train"]
    return statistics.median(secs[1:3]), statistics.median(secs[4:6])


def _predict_and_score(run_dir: Path, inputs: list[Path], ref_dir: Path, img_dir: Path,
                       before_scoring: Callable[[], None]) -> tuple[dict[str, float], dict[str, Any], Path]:
    """Both quickstarts' last steps: predict ``inputs`` with the run's segmentor alone and with HiDiff (probability
    and uncertainty maps), score both against ``ref_dir`` and write the report. Returns (foreground Dice by
    name, NFE and seconds per image by name, the report's path)."""
    from diffmis.evaluation import evaluate_folders
    from diffmis.inference import Predictor, predict_paths
    from diffmis.report import write_report

    pred_root = run_dir / "predictions"
    timings: dict[str, Any] = {}
    for name, kwargs in (("segmentor", {"segmentor_only": True}), ("hidiff", {})):
        pred = Predictor.from_run(run_dir, checkpoint="last", **kwargs)
        s = predict_paths(pred, inputs, pred_root / name, save_prob=True, save_uncertainty=(name == "hidiff"))
        timings[name] = {"nfe_per_image": s.nfe_per_image, "seconds_per_image": s.seconds_per_image}
    before_scoring()
    dice: dict[str, float] = {}
    for name in ("segmentor", "hidiff"):
        ev = evaluate_folders(pred_root / name, ref_dir, num_classes=3, images_dir=img_dir,
                              uncertainty_dir=(pred_root / name / "uncertainty") if name == "hidiff" else None,
                              prob_dir=pred_root / name / "prob", out_dir=run_dir / "eval" / name)
        dice[name] = float(ev.foreground_mean["Dice"])
    return dice, timings, write_report(run_dir)


def _prepare_out(out: Path) -> None:
    """Make ``out`` the quickstart's folder: create it, or replace a previous quickstart's; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; name a folder for the quickstart's output")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise InputError(f"--out {out} is not empty and was not written by a quickstart; name a new or empty "
                             "folder (nothing was changed)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by diffmis quickstart; the next quickstart into this folder replaces it\n")


def run_quickstart(out: str | Path = "quickstart", minutes: float = 5.0, seed: int = 0,
                   image_size: Optional[int] = None, plan: Optional[Plan] = None,
                   log: Callable[[str], None] = print) -> QuickstartResult:
    """Run the quickstart into ``out`` (see the module docstring for what it replaces).

    Args:
        minutes: training budget; the plan is sized to it from step times measured here.
        image_size: a fixed working size (skips the size choice); None: 96, or 64 on a slow machine.
        plan: train exactly this plan instead of measuring and planning (``minutes`` and ``image_size`` unused).
    Raises:
        ConfigError: a budget <= 0 or an image size that is not a positive multiple of 32 (checked first).
        InputError: ``out`` is a file, or a non-empty folder that no quickstart wrote.
    """
    if not minutes > 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    if image_size is not None and (image_size < 32 or image_size % 32):
        raise ConfigError(f"--image-size must be a positive multiple of 32 (the networks downsample 5 times), "
                          f"got {image_size}")
    from diffmis.data import write_mni
    from diffmis.hardware import cpu_info, resolve_for
    from diffmis.training import train

    t0 = time.time()
    out = Path(out)
    _prepare_out(out)
    log(f"[1/5] building the MNI brain-tissue dataset (offline, from the nilearn package) -> {out / 'data'}")
    data_root = write_mni(out / "data")

    res = resolve_for(quickstart_config(data_root, out).train.precision, "auto", "cpu")
    import torch

    log(f"[2/5] sizing the training to this machine: {cpu_info().summary()}, {torch.get_num_threads()} "
        f"thread(s), {res.describe()}")
    if plan is None:
        plan = plan_training(minutes, lambda s: _measure_steps(data_root, s, seed),
                             (image_size,) if image_size else SIZES)
    log(f"      plan: {plan.describe()}")
    cfg = quickstart_config(data_root, out / "runs", plan.image_size, seed, (
        f"train.max_steps={plan.steps}", f"train.pretrain_steps={plan.segmentor_steps}",
        f"train.max_minutes={max(1.0, 2.0 * plan.minutes):.2f}"))  # a safety net if the machine slows down

    log(f"[3/5] training HiDiff (UNet segmentor + BBDM refiner, T=10): {plan.steps} steps")
    result = train(cfg, out / "runs" / cfg.experiment.name)
    run_dir = result.run_dir
    if cfg.train.calibrate:  # the recipe's train.calibrate: a temperature from the val slices
        from diffmis.calibration import summary
        from diffmis.inference import calibrate_split

        log(f"      {summary(calibrate_split(run_dir, log=log))}")

    log(f"[4/5] predicting the test slices: segmentor alone, and HiDiff ({cfg.sample.ensemble}-member ensemble + "
        "uncertainty)")
    test_ids = [s.strip() for s in (data_root / "splits" / "test.txt").read_text().split() if s.strip()]
    ref_dir, img_dir = out / "test_masks", out / "test_images"
    ref_dir.mkdir()
    img_dir.mkdir()
    inputs = []
    for sid in test_ids:
        img = next(p for p in (data_root / "images").glob(f"{sid}.*"))
        msk = next(p for p in (data_root / "masks").glob(f"{sid}.*"))
        shutil.copy(img, img_dir / img.name)
        shutil.copy(msk, ref_dir / msk.name)
        inputs.append(img_dir / img.name)
    dice, timings, report = _predict_and_score(run_dir, inputs, ref_dir, img_dir,
                                               lambda: log("[5/5] evaluating and writing the report"))
    seconds = time.time() - t0
    log("")
    log(f"{'method':<12}{'Dice (GM+WM mean)':>20}{'NFE/sample':>12}{'s/image':>10}")
    for name in ("segmentor", "hidiff"):
        tm = timings[name]
        log(f"{name:<12}{dice[name]:>20.4f}{(tm['nfe_per_image'] or 0):>12.0f}{(tm['seconds_per_image'] or 0):>10.3f}")
    log(f"\ntrained {result.step} steps at {plan.image_size}x{plan.image_size} in {result.seconds / 60:.1f} min; "
        f"total {seconds / 60:.1f} min")
    log(f"report: {report.resolve()}")
    return QuickstartResult(run_dir=run_dir, report=report, dice=dice, steps=result.step, seconds=seconds, plan=plan)


# ======================================================================================================
# 3D: ``diffmis quickstart --3d``
# ======================================================================================================

#: the 3D quickstart's changes to the shipped hidiff_mni3d recipe (the built-in slabs written as nnU-Net raw data)
OVERRIDES_3D = (
    "experiment.name=hidiff_mni3d", "data.kind=nnunet", "train.lr_schedule=cosine", "train.warmup_steps=20",
    "train.ema_decay=0.99", "train.val_every=0", "train.ckpt_every=0", "train.log_every=10", "sample.ensemble=4",
    "diffusion.prior_noise=0.0",
)
#: the full 3D plan (segmentor steps, then HiDiff steps) on patches of PATCH_3D
FULL_PLAN_3D = (600, 200)
PATCH_3D = (48, 48, 16)


def quickstart_config_3d(data_root: Path, out_dir: Path, size: int = 0, seed: int = 0,
                         extra: tuple[str, ...] = ()) -> Config:
    """The 3D quickstart's config: the shipped ``hidiff_mni3d`` recipe with :data:`OVERRIDES_3D` reading
    ``data_root`` (``size`` is unused: the patch is :data:`PATCH_3D`)."""
    return load_config("hidiff_mni3d", [*OVERRIDES_3D, f"data.root={data_root}",
                                        f"data.patch_size={list(PATCH_3D)}", f"experiment.output_dir={out_dir}",
                                        f"experiment.seed={seed}", *extra])


def run_quickstart_3d(out: str | Path = "quickstart3d", minutes: float = 5.0, seed: int = 0,
                      plan: Optional[Plan] = None, log: Callable[[str], None] = print) -> QuickstartResult:
    """The quickstart on volumes: the 3D MNI slabs (nnU-Net raw layout), HiDiff in 3D (3D UNet segmentor + 3D
    BBDM refiner) trained on 48x48x16 patches for a plan sized to ``minutes``, the test volume predicted with
    sliding windows by the segmentor alone and by HiDiff (NIfTI on the input's affine, uncertainty maps), scored
    per volume in mm (Dice, IoU, HD95, ASSD), and the report. Same folder safety as :func:`run_quickstart`."""
    if not minutes > 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    from diffmis.data import write_mni3d
    from diffmis.hardware import cpu_info, resolve_for
    from diffmis.training import train

    t0 = time.time()
    out = Path(out)
    _prepare_out(out)
    log(f"[1/5] building the 3D MNI brain-tissue volumes (2 mm slabs, nnU-Net raw layout) -> {out / 'data'}")
    data_root = write_mni3d(out / "data")
    import torch

    res = resolve_for(quickstart_config_3d(data_root, out).train.precision, "auto", "cpu", 3)
    log(f"[2/5] sizing the training to this machine: {cpu_info().summary()}, {torch.get_num_threads()} "
        f"thread(s), {res.describe()}")
    geometry = "x".join(str(v) for v in PATCH_3D) + " patches"
    if plan is None:
        def measure(size: int) -> tuple[float, float]:
            return _measure_steps(data_root, size, seed, quickstart_config_3d)

        # one geometry (the patch), the 3D plan
        plan = replace(plan_training(minutes, measure, sizes=(0,), full_plan=FULL_PLAN_3D), geometry=geometry)
    log(f"      plan: {plan.describe()}")
    cfg = quickstart_config_3d(data_root, out / "runs", 0, seed, (
        f"train.max_steps={plan.steps}", f"train.pretrain_steps={plan.segmentor_steps}",
        f"train.max_minutes={max(1.0, 2.0 * plan.minutes):.2f}"))
    log(f"[3/5] training HiDiff in 3D (UNet segmentor + BBDM refiner, T=10): {plan.steps} steps")
    result = train(cfg, out / "runs" / cfg.experiment.name)
    run_dir = result.run_dir

    log(f"[4/5] predicting the test volume(s) with sliding windows: segmentor alone, and HiDiff "
        f"({cfg.sample.ensemble}-member ensemble + uncertainty)")
    test_ids = [s.strip() for s in (data_root / "splits" / "test.txt").read_text().split() if s.strip()]
    ref_dir, img_dir = out / "test_masks", out / "test_images"
    ref_dir.mkdir()
    img_dir.mkdir()
    inputs = []
    for cid in test_ids:
        shutil.copy(data_root / "imagesTr" / f"{cid}_0000.nii.gz", img_dir / f"{cid}.nii.gz")
        shutil.copy(data_root / "labelsTr" / f"{cid}.nii.gz", ref_dir / f"{cid}.nii.gz")
        inputs.append(img_dir / f"{cid}.nii.gz")
    dice, timings, report = _predict_and_score(run_dir, inputs, ref_dir, img_dir,
                                               lambda: log("[5/5] evaluating per volume (mm) and writing the report"))
    seconds = time.time() - t0
    log("")
    log(f"{'method':<12}{'per-volume Dice (GM+WM mean)':>30}{'NFE/volume':>12}{'s/volume':>10}")
    for name in ("segmentor", "hidiff"):
        tm = timings[name]
        log(f"{name:<12}{dice[name]:>30.4f}{(tm['nfe_per_image'] or 0):>12.0f}"
            f"{(tm['seconds_per_image'] or 0):>10.2f}")
    log(f"\ntrained {result.step} steps on {geometry} in {result.seconds / 60:.1f} min; total {seconds / 60:.1f} min")
    log(f"report: {report.resolve()}")
    return QuickstartResult(run_dir=run_dir, report=report, dice=dice, steps=result.step, seconds=seconds, plan=plan)
