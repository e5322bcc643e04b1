"""Quality at equal total CPU minutes: every method trains for the same wall-clock budget, everything counted, then
predicts and is scored, calibration and uncertainty included.

Protocol (one run at a time, all cores, precision auto; the JSON records CPU, flags, threads, allocator, load):

* Budget per method (``--minutes``; default Kvasir-SEG 15, DRIVE 10, MNI 5): the training loop's wall-clock minutes.
  A method that uses a segmentor (HiDiff, PD-DDPM, MedSegDiff-V2's condition model) may spend ``--seg-share`` of
  its budget on a segmentor run first (its own segmentor architecture, the ``segmentor`` recipe's loss) and
  starts from it (``train.prior_run``); both runs' minutes are counted. The UNet baseline gets the whole budget.
* Splits: ``--split eval`` trains on the training split and reports the evaluation split (Kvasir-SEG ``val``,
  DRIVE ``test``, MNI ``test``); ``--split tune`` holds a part of the training data out and reports it (Kvasir-SEG
  the last 80 training cases, DRIVE the 4 images ``data.val_fraction`` carves, MNI the ``val`` slices). Recipes
  are chosen on ``tune``, never on ``eval``.
* Prediction: each run's last weights (EMA where it has them), its default sampler and ensemble (``--ensemble``
  overrides), probability and uncertainty maps written.
* Every row: Dice, IoU, HD95 (mean and std over cases, foreground classes; DRIVE inside the FOV), network
  evaluations and seconds per image, optimizer steps and images seen (per phase), parameters, the expected
  calibration error of the per-pixel probability (top label, 10 bins, pixels pooled) and the AUROC of the
  per-pixel uncertainty (entropy of the member mean) for detecting the per-pixel error.
* Methods with a segmentor also get a row of that segmentor alone (``<method>_segmentor``), from the same run.
* ``--calibrate`` (evaluation protocol, MNI and DRIVE): the method's run reserves ``--calibrate-seconds`` of its
  budget, then fits its probability temperature on the held-out ``val`` images (never trained on, never reported:
  ``diffmis.inference.calibrate_run``) and predicts with it; the row keeps the raw ECE too (``ece_raw``). Its
  segmentor row stays raw.

``--variant NAME --set KEY=VALUE ...`` adds a named row with overrides (the ablations of the recipe levers);
rows accumulate in ``benchmarks/results/quality_<dataset>[_tune].json`` (a rerun replaces its own rows).

    python benchmarks/quality.py --dataset mni --split tune --methods segmentor hidiff
    python benchmarks/quality.py --dataset kvasir --split tune --methods medsegdiff --variant x0seg \\
        --set diffusion.x0_seg_weight=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, CpuMonitor, environment, git_state, write_result  # noqa: E402
from render import row_cpu  # noqa: E402  (the CPU kind as the tables name it)

from diffmis.config import load_config  # noqa: E402
from diffmis.evaluation import evaluate_folders  # noqa: E402
from diffmis.hardware import cpu_info, set_threads  # noqa: E402
from diffmis.inference import Predictor, predict_paths  # noqa: E402
from diffmis.methods import LEVERS, lever_value  # noqa: E402
from diffmis.training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["segmentor", "medsegdiff", "medsegdiff_v2", "pd_ddpm", "hidiff", "berdiff"]
WITH_SEGMENTOR = {"medsegdiff_v2", "pd_ddpm", "hidiff"}
BUDGET = {"kvasir": 15.0, "drive": 10.0, "mni": 5.0}
EVAL_SPLIT = {"kvasir": "val", "drive": "test", "mni": "test"}
KVASIR_SIZE = 128
TUNE_HOLDOUT = 80  # the last Kvasir-SEG training cases, the tuning split
#: held-out split a run of the evaluation protocol may calibrate on: trained on by no run, reported by none
CALIBRATION_SPLIT = {"mni": "val", "drive": "val"}


def shared_data() -> Path:
    env = os.environ.get("DIFFMIS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


# ======================================================================================================
# Data: the dataset folder, and for --split tune a view of it with the held-out training cases as "val"
# ======================================================================================================


def data_setup(dataset: str, split: str, work: Path) -> tuple[Path, list[str], str, str]:
    """``(root, overrides, eval_split, train_split)``: the folder the runs read, the data overrides, the split
    reported and the split trained on."""
    if dataset == "mni":
        from diffmis.data import write_mni

        root = work / "mni_data"
        if not (root / "splits").is_dir():
            write_mni(root)
        return root, ["data.kind=folder"], ("val" if split == "tune" else "test"), "train"
    src = shared_data() / {"kvasir": "kvasir-seg", "drive": "drive"}[dataset]
    if not src.is_dir():
        raise SystemExit(f"dataset {dataset} not found at {src} (set DIFFMIS_SHARED_DATA)")
    sets = [f"data.image_size={KVASIR_SIZE}"] if dataset == "kvasir" else []
    if dataset == "drive":  # data.val_fraction carves the same 4 training images in both protocols
        return src, sets, ("val" if split == "tune" else "test"), "train"
    if split == "eval":
        return src, sets, "val", "train"
    view = work / "kvasir_tune_view"  # the training cases, the last 80 of them held out as "val"
    if view.exists():
        shutil.rmtree(view)
    (view / "splits").mkdir(parents=True)
    for sub in ("images", "masks"):
        os.symlink((src / sub).resolve(), view / sub)
    ids = [s for s in (src / "splits" / "train.txt").read_text().split() if s]
    (view / "splits" / "train.txt").write_text("\n".join(ids[:-TUNE_HOLDOUT]) + "\n")
    (view / "splits" / "val.txt").write_text("\n".join(ids[-TUNE_HOLDOUT:]) + "\n")
    return view, sets, "val", "train"


def split_files(root: Path, split: str, work: Path, cfg_data: Any) -> tuple[list[Path], Path, Optional[Path]]:
    """Images of the reported split and a folder under ``work`` with their reference masks (and FOVs)."""
    from diffmis.data.layouts import index_folder, resolve_split

    index = index_folder(root)
    resolved = resolve_split(index, split, train_split=cfg_data.train_split, val_split=cfg_data.val_split,
                             test_split=cfg_data.test_split, val_fraction=cfg_data.val_fraction)
    ids = [i for _, i in resolved.ids]
    refs = work / f"refs_{split}"
    if refs.exists():
        shutil.rmtree(refs)
    (refs / "masks").mkdir(parents=True)
    if index.fov is not None:
        (refs / "fov").mkdir()
    for i in ids:
        os.symlink(index.masks[i].resolve(), refs / "masks" / index.masks[i].name)
        if index.fov is not None:
            os.symlink(index.fov[i].resolve(), refs / "fov" / index.fov[i].name)
    return [index.images[i] for i in ids], refs / "masks", (refs / "fov") if index.fov is not None else None


# ======================================================================================================
# Training (with the optional segmentor phase) and scoring
# ======================================================================================================


def cpu_record(cpu: dict[str, Any], threads: Optional[int], source: Optional[str] = None) -> dict[str, Any]:
    """A row's ``cpu``: model, ISA and native bf16 of a ``diffmis.hardware`` CPU record, the torch threads, and
    where the record came from when not from the run itself."""
    out = {"model": cpu.get("model"), "isa": cpu.get("isa"), "native_bf16": cpu.get("native_bf16"), "threads": threads}
    return out if source is None else {**out, "from": source}


def keep_replaced(doc: dict[str, Any], key: str, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` about to take ``key``'s place in ``doc``: when the row it replaces ran on another CPU kind (model or
    ISA) or at another commit (or before rows recorded one), keep that row's figures and command under
    ``replaced_row`` so the file still says what the earlier machine or code measured. A rerun on the same kind
    and commit replaces the row outright; a row that already keeps an older one (a rescore in place) is left as is."""
    old = doc["rows"].get(key)
    if old is None or "replaced_row" in row:
        return row
    env = doc.get("environment") or {}  # an old row without its own CPU record ran on the file's machine
    if row_cpu(row, env) == row_cpu(old, env) and row.get("commit") == old.get("commit"):
        return row
    row["replaced_row"] = {k: v for k, v in old.items() if k not in ("runs", "replaced_row")}
    commands = doc.get("commands") or {}  # a segmentor row shares its method row's command
    row["replaced_row"]["command"] = commands.get(key) or commands.get(key.replace("_segmentor@", "@"))
    return row


def train_run(cfg_name: str, name: str, minutes: float, work: Path, sets: list[str]) -> dict[str, Any]:
    cfg = load_config(cfg_name, [f"experiment.output_dir={work / 'runs'}", f"experiment.name={name}",
                                 f"train.max_minutes={minutes}", "train.max_steps=100000000", "train.val_every=0",
                                 "train.ckpt_every=0", "train.progress=false", "train.calibrate=false", *sets])
    run_dir = work / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    res = train(cfg, run_dir, log=lambda s: print(s, flush=True))
    setup = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {"run_dir": str(run_dir), "minutes": minutes, "steps": res.step, "wall_seconds": round(time.time() - t0, 1),
            "images_seen": res.step * cfg.train.batch_size * cfg.train.grad_accum,
            "params": sum(p.numel() for p in res.method.parameters()), "precision": setup.get("precision"),
            "config": cfg_name, "overrides": list(sets),
            "levers": recipe_levers(res.method, cfg)}


def recipe_levers(method: Any, cfg: Any) -> dict[str, Any]:
    """The recipe levers a run used where they differ from their defaults, from any source (config or override):
    the method's levers (``diffmis.methods.LEVERS``), HiDiff's ``train.segmentor_every`` as resolved (``auto`` -> 0
    or 1; the paper's alternation, 1, is the default)."""
    levers = {}
    for key in type(method).levers:
        v = method.segmentor_every if key == "train.segmentor_every" else lever_value(cfg, key)
        if v != LEVERS[key]:
            levers[key] = v
    return levers


def segmentor_sets(method: str, dataset: str) -> list[str]:
    """Overrides that turn ``segmentor_<dataset>`` into the segmentor phase of ``method``: its architecture."""
    seg = load_config(f"{method}_{dataset}").model.segmentor
    assert seg is not None
    return [f"model.name={seg.name}", f"model.params={json.dumps(seg.params)}"]


def score(pred_dir: Path, ref_dir: Path, fov_dir: Optional[Path], k: int, out_dir: Path) -> dict[str, Any]:
    ev = evaluate_folders(pred_dir, ref_dir, num_classes=k, fov_dir=fov_dir, prob_dir=pred_dir / "prob",
                          uncertainty_dir=pred_dir / "entropy", out_dir=out_dir)
    per_case = ev.to_summary()["metric_per_case"]

    def per(metric: str) -> list[float]:
        return [float(np.mean([m[metric] for cls, m in c["metrics"].items()])) for c in per_case]

    dice, iou, hd = per("Dice"), per("IoU"), per("HD95")
    cal = ev.calibration
    return {"dice_mean": float(np.mean(dice)), "dice_std": float(np.std(dice)), "iou_mean": float(np.mean(iou)),
            "iou_std": float(np.std(iou)), "hd95_mean": float(np.mean(hd)), "hd95_std": float(np.std(hd)),
            "ece": float(cal.top_label.ece) if cal is not None else None,
            "error_auroc": (ev.error_detection or {}).get("auroc"), "n_cases": len(dice)}


def predict_score(run_dir: str, name: str, images: list[Path], work: Path, ref_dir: Path, fov_dir: Optional[Path],
                  k: int, **kw: Any) -> dict[str, Any]:
    pred_dir = work / "pred" / name
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    pred = Predictor.from_run(run_dir, checkpoint="last", **kw)
    t0 = time.time()
    s = predict_paths(pred, images, pred_dir, overwrite=True, progress=False, save_prob=True, save_uncertainty=True)
    if s.failed:
        raise RuntimeError(f"prediction failed: {s.failed}")
    out = {"nfe_per_image": s.nfe_per_image, "seconds_per_image": round((time.time() - t0) / len(images), 4),
           "predict": {"sampler": pred.sampler, "steps": pred.steps, "ensemble": pred.ensemble, "fuse": pred.fuse,
                       "start_step": pred.start_step, "precision": pred.precision, **kw}}
    out.update(score(pred_dir, ref_dir, fov_dir, k, work / "eval" / name))
    return out


def raw_ece(prob_dir: Path, ref_dir: Path, fov_dir: Optional[Path], temperature: float) -> float:
    """The ECE the maps of ``prob_dir`` had before ``temperature`` was applied to them (it is invertible)."""
    from diffmis.calibration import calibration_ece
    from diffmis.inference import load_cases

    return calibration_ece(load_cases(prob_dir, ref_dir, fov_dir), 1.0 / temperature)


def reused_segphase(doc: dict[str, Any], key: str, minutes: float) -> dict[str, Any]:
    """The segmentor phase recorded in ``doc``'s row ``key`` (an earlier variant of the same method), for a
    paired ablation: the lever's run starts from the very segmentor the other variant started from, so the
    difference is the lever's, not a segmentor rerun's (~0.7 Dice points on MNI). Its minutes still count in
    the budget. Refused with the reason when that row, its segmentor phase or its run folder is missing, or when
    the phase had another length than ``minutes``."""
    row = doc.get("rows", {}).get(key)
    if row is None:
        raise SystemExit(f"--segphase-from: no row '{key}' in this result file; run that variant first "
                         f"(with --seg-share) or drop --segphase-from")
    seg = next((r for r in row["runs"] if r["phase"] == "segmentor"), None)
    if seg is None:
        raise SystemExit(f"--segphase-from: row '{key}' had no segmentor phase (it ran without --seg-share)")
    if abs(seg["minutes"] - minutes) > 1e-6:
        raise SystemExit(f"--segphase-from: row '{key}' trained its segmentor for {seg['minutes']} min, this run's "
                         f"budget gives it {minutes} min; use the same --minutes and --seg-share")
    if not (Path(seg["run_dir"]) / "checkpoints").is_dir():
        raise SystemExit(f"--segphase-from: the run folder {seg['run_dir']} of row '{key}' is gone (another "
                         f"--work, or /tmp was cleaned); rerun that variant")
    return {**seg, "reused_from": key}


def check_segphase_from(segphase_from: Optional[str], seg_share: float, methods: list[str]) -> None:
    """Refuse ``--segphase-from`` where it would be ignored: without ``--seg-share`` or without a method that has
    a segmentor phase (a paired ablation that silently trains a fresh segmentor would not be one)."""
    if segphase_from is None:
        return
    if seg_share <= 0:
        raise SystemExit("--segphase-from reuses a segmentor phase, and --seg-share is 0 (no segmentor phase): "
                         "give the --seg-share that the row was trained with, or drop --segphase-from")
    if not WITH_SEGMENTOR & set(methods):
        raise SystemExit(f"--segphase-from: none of --methods {' '.join(methods)} has a segmentor phase (those "
                         f"that do: {', '.join(sorted(WITH_SEGMENTOR))}); drop --segphase-from")


def train_and_score(method: str, dataset: str, key: str, minutes: float, share: float, work: Path,
                    data_sets: list[str], extra_sets: list[str], score_run: Callable[..., dict[str, Any]],
                    fields: dict[str, Any], seg: Optional[dict[str, Any]] = None,
                    calibrate: Optional[Callable[[str], dict[str, Any]]] = None, reserve_seconds: float = 0.0
                    ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """One method's rows at equal total minutes, everything counted: a segmentor run of ``share`` x ``minutes``
    (``segmentor_<dataset>`` with the method's segmentor architecture) that the method starts from
    (``train.prior_run``), then ``<method>_<dataset>`` for the rest, both reading ``data_sets`` and the method's
    run also ``extra_sets`` (an ablation's overrides); ``score_run(run_dir, name, **predict_kw)`` scores the run.
    ``seg``: an earlier variant's segmentor phase to start from instead of training one (:func:`reused_segphase`).
    Returns the method's row and, for a method with a segmentor, the row of that segmentor inside the same run
    predicted alone (what the diffusion adds to it), else None. ``fields`` go into both rows. ``calibrate(run_dir)``
    (``--calibrate``): fit the method run's temperature after ``reserve_seconds`` less training, before scoring."""
    sets = data_sets + extra_sets
    runs = []
    if share > 0:
        if seg is None:
            seg = train_run(f"segmentor_{dataset}", f"{key}_segphase", minutes * share, work,
                            data_sets + segmentor_sets(method, dataset))
        runs.append({"phase": "segmentor", **seg})
        sets = sets + [f"train.prior_run={seg['run_dir']}"]
    run = train_run(f"{method}_{dataset}", key, minutes * (1.0 - share) - reserve_seconds / 60.0, work, sets)
    runs.append({"phase": "method", **run})
    common = {**fields, "sets": list(extra_sets), "budget_minutes": minutes, "runs": runs,
              "steps": sum(r["steps"] for r in runs), "images_seen": sum(r["images_seen"] for r in runs)}
    row = {"method": method, **common, "seg_share": share, "params": run["params"]}
    if calibrate is not None:
        row["calibration"] = {**calibrate(run["run_dir"]), "reserve_seconds": reserve_seconds}
    row.update(score_run(run["run_dir"], key))
    seg_row = None
    if method in WITH_SEGMENTOR:
        seg_row = {"method": f"{method}_segmentor", **common, "params": None}
        seg_row.update(score_run(run["run_dir"], f"{key}_segmentor", segmentor_only=True))
    return row, seg_row


#: ``sample.*`` keys that --rescore-from turns into predictor settings
RESCORE_KEYS = ("steps", "start_step", "sampler", "ensemble", "fuse")


def sample_settings(sets: list[str]) -> dict[str, Any]:
    """``--set sample.KEY=VALUE`` overrides as predictor keyword arguments; anything else is refused (a rescore
    does not train, so a training key would be silently ignored)."""
    import yaml

    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        name = key.removeprefix("sample.")
        if not sep or not key.startswith("sample.") or name not in RESCORE_KEYS:
            raise SystemExit(f"--rescore-from predicts again without training: only --set sample.{{"
                             f"{','.join(RESCORE_KEYS)}}}=VALUE applies, got {item!r}")
        out[name] = yaml.safe_load(value)
    if not out:
        raise SystemExit("--rescore-from needs at least one --set sample.KEY=VALUE (else it repeats the source row)")
    return out


def rescore(doc: dict[str, Any], method: str, source: str, variant: str, sets: list[str],
            score_run: Callable[..., dict[str, Any]], kw: dict[str, Any]
            ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The row of ``method@variant``: the runs of ``method@source`` predicted with the ``sets`` sampling settings.
    The training record (runs, minutes, steps, images seen) is the source row's; the segmentor row, unchanged
    weights and a single pass, is copied. ``variant == source`` replaces the row and keeps the old one's figures
    under ``replaced_row``. Refused when the source row or its method run folder is missing."""
    settings = sample_settings(sets)
    src = doc["rows"].get(f"{method}@{source}")
    if src is None:
        raise SystemExit(f"--rescore-from {source}: no row '{method}@{source}' in this split's results")
    run_dir = next((r["run_dir"] for r in src["runs"] if r["phase"] == "method"), None)
    if run_dir is None or not (Path(run_dir) / "checkpoints").is_dir():
        raise SystemExit(f"--rescore-from {source}: the run folder {run_dir} of '{method}@{source}' is gone")
    keep = ("method", "budget_minutes", "runs", "steps", "images_seen", "seg_share", "params")
    row = {**{k: src[k] for k in keep if k in src}, "variant": variant, "sets": sets,
           "rescored_from": f"{method}@{source}"}
    row.update(score_run(run_dir, f"{method}@{variant}", **{**kw, **settings}))
    if variant == source:  # in place (a recipe's new sampling on its own row): keep what the row said before
        row["replaced_row"] = {k: v for k, v in src.items() if k not in ("runs", "replaced_row")}
    seg_src = doc["rows"].get(f"{method}_segmentor@{source}")
    seg_row = None if seg_src is None else {**seg_src, "variant": variant, "rescored_from": f"{method}@{source}"}
    return row, seg_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(BUDGET), required=True)
    ap.add_argument("--split", choices=["eval", "tune"], default="eval")
    ap.add_argument("--minutes", type=float, default=None, help="budget per method (default: the protocol's)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seg-share", type=float, default=0.0,
                    help="fraction of the budget a method with a segmentor spends on a segmentor run first")
    ap.add_argument("--variant", default=None, help="name of this row set (with --set: an ablation)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the methods' runs (repeatable)")
    ap.add_argument("--segphase-from", default=None, metavar="VARIANT",
                    help="with --seg-share: start from the segmentor phase that VARIANT's row of the same method "
                         "trained (a paired ablation; its minutes still count) instead of training one")
    ap.add_argument("--rescore-from", default=None, metavar="VARIANT",
                    help="no training: predict the runs of this earlier variant again with the --set sample.* "
                         "settings (a sampling lever on the very same weights; its minutes are the source's)")
    ap.add_argument("--calibrate", action="store_true",
                    help="evaluation protocol, MNI and DRIVE: fit each method run's temperature on the held-out val "
                         "images within its budget (diffmis calibrate) and predict with it")
    ap.add_argument("--calibrate-seconds", type=float, default=20.0,
                    help="with --calibrate: training seconds each method run gives up for its calibration")
    ap.add_argument("--ensemble", type=int, default=None, help="ensemble members (default: the configs')")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: diffmis's)")
    ap.add_argument("--work", default="/tmp/diffmis_quality")
    args = ap.parse_args()
    if not 0.0 <= args.seg_share < 1.0:
        raise SystemExit("--seg-share must be in [0, 1)")
    check_segphase_from(args.segphase_from, args.seg_share, args.methods)
    if args.rescore_from and args.segphase_from:
        raise SystemExit("--rescore-from trains nothing: --segphase-from does not apply")
    if args.calibrate and (args.split != "eval" or args.dataset not in CALIBRATION_SPLIT):
        raise SystemExit("--calibrate needs held-out images that no run trains on and no row reports: the "
                         f"evaluation protocol of {' or '.join(sorted(CALIBRATION_SPLIT))} (their val split); "
                         f"{args.dataset} --split {args.split} has none")
    if args.calibrate and args.rescore_from:
        raise SystemExit("--calibrate reserves training time: it does not combine with --rescore-from")
    threads = set_threads(args.threads).threads
    minutes = args.minutes or BUDGET[args.dataset]
    tag = args.dataset + ("_tune" if args.split == "tune" else "")
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    root, data_sets, eval_split, _ = data_setup(args.dataset, args.split, work)
    data_sets = [f"data.root={root}", *data_sets]
    cfg0 = load_config(f"segmentor_{args.dataset}", data_sets)
    images, ref_dir, fov_dir = split_files(root, eval_split, work, cfg0.data)
    k = cfg0.data.num_classes
    calibrate = None
    if args.calibrate:
        from diffmis.inference import calibrate_run

        cal_images, cal_refs, cal_fov = split_files(root, CALIBRATION_SPLIT[args.dataset], work, cfg0.data)

        def calibrate(run_dir: str) -> dict[str, Any]:
            kw_cal = {} if args.ensemble is None else {"ensemble": args.ensemble}
            rec = calibrate_run(run_dir, cal_images, cal_refs, cal_fov, checkpoint="last", log=print, **kw_cal)
            print(f"calibration: T {rec['temperature']:.3g} on {rec['n_cases']} {CALIBRATION_SPLIT[args.dataset]} "
                  f"cases, ECE {rec['ece']['t1']:.4f} -> {rec['ece']['fitted']:.4f}, {rec['seconds']} s", flush=True)
            if rec["seconds"] > args.calibrate_seconds:
                print(f"calibration: warning: {rec['seconds']} s, over the {args.calibrate_seconds} s reserved",
                      flush=True)
            return {"split": CALIBRATION_SPLIT[args.dataset], "temperature": rec["temperature"],
                    "n_cases": rec["n_cases"], "seconds": rec["seconds"], "ece_split_t1": rec["ece"]["t1"],
                    "ece_split_fitted": rec["ece"]["fitted"]}
    out_json = RESULTS / f"quality_{tag}.json"
    doc: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": {}}
    monitor = CpuMonitor()
    variant = args.variant or "default"
    for m in args.methods:
        key = f"{m}@{variant}"
        print(f"=== {key} on {tag}: {minutes} min", flush=True)
        share = args.seg_share if m in WITH_SEGMENTOR else 0.0
        kw = {} if args.ensemble is None or m == "segmentor" else {"ensemble": args.ensemble}

        def score_run(run_dir: str, name: str, **more: Any) -> dict[str, Any]:
            # the segmentor alone (more = {"segmentor_only": True}) is one pass: no --ensemble for it
            return predict_score(run_dir, name, images, work, ref_dir, fov_dir, k, **(more or kw))

        if args.rescore_from:
            row, seg_row = rescore(doc, m, args.rescore_from, variant, list(args.sets), score_run, kw)
        else:
            seg = (reused_segphase(doc, f"{m}@{args.segphase_from}", minutes * share)
                   if args.segphase_from and share > 0 else None)
            row, seg_row = train_and_score(m, args.dataset, key, minutes, share, work, data_sets, list(args.sets),
                                           score_run, {"variant": variant}, seg, calibrate,
                                           args.calibrate_seconds if calibrate is not None else 0.0)
            if "calibration" in row:  # the raw ensemble's ECE on the reported split, from the calibrated maps
                row["ece_raw"] = raw_ece(work / "pred" / key / "prob", ref_dir, fov_dir,
                                         row["calibration"]["temperature"])
        # per row: a file gathers rows measured on different machines over time
        row["cpu"] = seg_row_cpu = cpu_record(cpu_info().record(), threads)
        row["commit"] = git_state()["commit"]  # the code the row ran (a file's rows span many commits)
        doc["rows"][key] = keep_replaced(doc, key, row)
        print(f"{key}: Dice {row['dice_mean']:.4f} +- {row['dice_std']:.4f}, ECE {row['ece']}, AUROC "
              f"{row['error_auroc']}, steps {row['steps']}, NFE {row['nfe_per_image']}", flush=True)
        if seg_row is not None:
            seg_row["cpu"], seg_row["commit"] = seg_row_cpu, row["commit"]
            doc["rows"][f"{m}_segmentor@{variant}"] = keep_replaced(doc, f"{m}_segmentor@{variant}", seg_row)
            print(f"{m}_segmentor@{variant}: Dice {seg_row['dice_mean']:.4f}", flush=True)
        doc.update({"benchmark": "quality", "dataset": args.dataset, "split": args.split, "eval_split": eval_split,
                    "n_cases": len(images), "threads": threads,
                    "protocol": "equal total training minutes per method (segmentor phase counted), last weights, "
                                "default sampler; ECE top-label 10 bins pooled; AUROC of the entropy for the error"})
        doc.setdefault("commands", {})[key] = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
        before = (doc.get("environment") or {}).get("machine") or {}
        for other in doc["rows"].values():  # rows from before the per-row record: the machine the file recorded
            if "cpu" not in other and before.get("cpu"):
                other["cpu"] = cpu_record(before["cpu"], before.get("torch_threads"), "the file's environment")
        doc["environment"] = environment()
        doc["load"] = monitor.summary()
        write_result(out_json, doc)


if __name__ == "__main__":
    main()
