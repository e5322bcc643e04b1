"""Ablations at equal CPU budget (METHODS.md section 11 gives the papers' directions).

- MedSegDiff with Dynamic Conditional Encoding off, and with the FF-Parser off (MIDL Table 2: each adds Dice);
- MedSegDiff-V2 with the anchor condition (U-SA) off, and with the SS-Former off (V2 paper: each adds Dice);
- HiDiff's refined output against its own co-trained segmentor alone (the paper's central claim);
- PD-DDPM started from its noised pre-segmentation against the same network sampled from pure noise with the
  same number of network evaluations per sample (NFE);
- the CPU-budget default of the Gaussian configs (x0-prediction) against the papers' eps-prediction;
- HiDiff with one Bernoulli-DDIM step against its default T = 10 steps (same run).

Every variant is trained by ``benchmarks/quality.py``'s machinery for ``--minutes`` on the same data and
seed and predicted with the config's default sampler. The full models (medsegdiff, medsegdiff_v2, hidiff,
pd_ddpm) are taken from a ``quality.py`` run of the same dataset when one with the same budget exists in
``--quality-work`` (its JSON under benchmarks/results/ says so); otherwise they are trained here too.

    python benchmarks/ablation.py --dataset mni --minutes 4

Writes ``benchmarks/results/ablation_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from quality import EVAL_SPLIT, REPO, dataset_root, predict_and_score, run_diffmis, split_files  # noqa: E402

#: (row name, config recipe, overrides); an empty override tuple is the full model
VARIANTS: list[tuple[str, str, tuple[str, ...]]] = [
    ("medsegdiff", "medsegdiff", ()),
    ("medsegdiff_no_dce", "medsegdiff", ("model.params.dce=false",)),
    ("medsegdiff_no_ff_parser", "medsegdiff", ("model.params.ff_parser=false",)),
    ("medsegdiff_eps", "medsegdiff", ("diffusion.prediction=eps",)),
    ("medsegdiff_v2", "medsegdiff_v2", ()),
    ("medsegdiff_v2_no_anchor", "medsegdiff_v2", ("model.params.anchor=false",)),
    ("medsegdiff_v2_no_ss_former", "medsegdiff_v2", ("model.params.ss_former=false",)),
    ("hidiff", "hidiff", ()),
    ("pd_ddpm", "pd_ddpm", ()),
]

#: (what is compared, with, without, the papers' direction)
COMPARISONS = [
    ("DCE", "medsegdiff", "medsegdiff_no_dce", "MedSegDiff MIDL Table 2: + Dy-Cond adds 1.7-1.9 Dice points"),
    ("FF-Parser", "medsegdiff", "medsegdiff_no_ff_parser",
     "MedSegDiff MIDL Table 2: + FF-Parser adds 1.2-1.5 Dice points"),
    ("x0 target (the configs' CPU default) vs eps", "medsegdiff", "medsegdiff_eps",
     "the papers train eps-prediction for 40k-100k GPU steps"),
    ("anchor (U-SA)", "medsegdiff_v2", "medsegdiff_v2_no_anchor", "MedSegDiff-V2: the anchor condition adds Dice"),
    ("SS-Former", "medsegdiff_v2", "medsegdiff_v2_no_ss_former", "MedSegDiff-V2: the SS-Former adds Dice"),
    ("HiDiff refiner", "hidiff", "hidiff_segmentor", "HiDiff: the refined Dice exceeds its segmentor's"),
    ("HiDiff refiner, 1 Bernoulli-DDIM step", "hidiff_1step", "hidiff_segmentor",
     "HiDiff: the refined Dice exceeds its segmentor's"),
    ("HiDiff 1 step vs 10 steps", "hidiff_1step", "hidiff", "HiDiff samples T = 10 steps"),
    ("PD-DDPM start", "pd_ddpm", "pd_ddpm_pure_noise",
     "PD-DDPM: starting from the noised pre-segmentation beats pure noise at few steps"),
]


def reusable(dataset_tag: str, name: str, minutes: float, quality_work: Path) -> Optional[dict[str, Any]]:
    """The quality.py row of a full model trained with the same budget, if its run folder still exists."""
    f = REPO / "benchmarks" / "results" / f"quality_{dataset_tag}.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    row = data.get("results", {}).get(name)
    if data.get("settings", {}).get("minutes") != minutes or row is None:
        return None
    if data.get("settings", {}).get("ensemble") is not None or data.get("settings", {}).get("limit"):
        return None  # predicted with other settings than the config defaults used here
    run = quality_work / dataset_tag / "runs" / name
    if not (run / "state.json").is_file() and not any(run.glob("**/state.json")):
        return None
    return {**row, "run_dir": str(run), "reused_from": f.name}


def main() -> None:
    ap = argparse.ArgumentParser(description="ablations at equal CPU budget")
    ap.add_argument("--dataset", choices=["kvasir", "drive", "mni"], default="mni")
    ap.add_argument("--size", type=int, default=None, help="Kvasir working size (default 128)")
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/diffmis_ablation")
    ap.add_argument("--quality-work", default="/tmp/diffmis_quality",
                    help="quality.py's --work, where full-model runs of the same budget may be reused")
    ap.add_argument("--no-reuse", action="store_true", help="train the full models here too")
    ap.add_argument("--only", nargs="+", default=None, help="variant names to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dataset == "kvasir" and args.size is None:
        args.size = 128
    tag = f"{args.dataset}_{args.size}" if args.dataset == "kvasir" else args.dataset
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    root = dataset_root(args.dataset, work)
    images, ref_dir, fov_dir, _ = split_files(root, EVAL_SPLIT[args.dataset], work)
    k = 3 if args.dataset == "mni" else 1
    out_json = REPO / "benchmarks" / "results" / f"ablation_{tag}.json"
    rows: dict[str, Any] = {}
    if out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("settings", {}).get("minutes") == args.minutes:
            rows = old.get("rows", {})

    def save() -> None:
        comps = []
        for what, with_, without, paper in COMPARISONS:
            if with_ in rows and without in rows:
                comps.append({"component": what, "with": with_, "without": without,
                              "dice_with": rows[with_]["dice_mean"], "dice_without": rows[without]["dice_mean"],
                              "delta": rows[with_]["dice_mean"] - rows[without]["dice_mean"], "paper": paper})
        write_result(out_json, {
            "benchmark": "ablation", "dataset": args.dataset, "eval_split": EVAL_SPLIT[args.dataset],
            "command": " ".join(["python", *sys.argv]),
            "settings": {"minutes": args.minutes, "size": args.size, "seed": args.seed, "threads": args.threads},
            "rows": rows, "comparisons": comps, "machine": environment()})

    for name, recipe, extra in VARIANTS:
        if args.only and name not in args.only:
            continue
        print(f"=== {name} ({recipe} {' '.join(extra) or 'full'}) on {tag}: {args.minutes} min", flush=True)
        info = None if (extra or args.no_reuse) else reusable(tag, name, args.minutes, Path(args.quality_work))
        if info is None:
            info = run_diffmis(recipe, args.dataset, root, args, work, name=name, extra=extra)
            predict_and_score(info, name, images, work, ref_dir, fov_dir, k)
        rows[name] = info
        print(f"{name}: Dice {info['dice_mean']:.4f} +- {info['dice_std']:.4f} ({info.get('steps')} steps)",
              flush=True)
        extra_rows: list[tuple[str, dict[str, Any]]] = []
        if name == "hidiff":
            if "hidiff_segmentor" not in rows:
                extra_rows.append(("hidiff_segmentor", {"segmentor_only": True}))
            extra_rows.append(("hidiff_1step", {"steps": 1}))
        if name == "pd_ddpm":
            # equal NFE per sample: the PD start costs its prior pass + `steps` denoiser passes
            st = int(info.get("predict_settings", {}).get("steps") or info.get("sample_steps") or 5)
            extra_rows.append(("pd_ddpm_pure_noise", {"start_step": 0, "steps": st + 1}))
        for extra_name, kw in extra_rows:
            r = predict_and_score({"run_dir": info["run_dir"], "steps": info.get("steps")}, extra_name, images,
                                  work, ref_dir, fov_dir, k, **kw)
            rows[extra_name] = r
            print(f"{extra_name}: Dice {r['dice_mean']:.4f} (NFE {r['nfe_per_image']})", flush=True)
        save()
    save()
    print(json.dumps(json.loads(out_json.read_text())["comparisons"], indent=1))


if __name__ == "__main__":
    main()
