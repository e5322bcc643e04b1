"""Dice versus network evaluations per image (NFE), on the runs ``benchmarks/quality.py`` trained (its ``default``
rows of the evaluation split, read from its work folder).

- medsegdiff: DDIM with 5/10/20/50/100 steps, and 1000-step ancestral sampling on a 10-image subset;
- pd_ddpm: start steps T' in {100, 200, 300, 500} of T = 1000 with 2-20 DDIM steps below T';
- hidiff: 10, 5, 2 and 1 Bernoulli-DDIM steps;
- berdiff: 1, 2, 5, 10 and 20 Bernoulli-DDIM steps over T = 1000;
- ensembles of 1, 5 and 10 members with mean and STAPLE fusion (hidiff and medsegdiff at their defaults);
- medsegdiff_v2 (ensembles of 5, its default): 10 DDIM steps from noise (the paper's start) against starts from
  its anchor (the condition segmentor's labels) at T' in {100, 200, 500} with 2 steps and T' = 100 with 5, and
  the condition segmentor alone.

    python benchmarks/nfe.py --dataset kvasir [--cases 24]

The x axis is network evaluations per image (ensemble members x evaluations per member, a prior segmentor
pass counted once); "nfe" in the JSON is the batched calls per image (members share each call).

Writes ``benchmarks/results/nfe_<tag>.json`` and ``benchmarks/results/nfe_<tag>.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from quality import REPO, data_setup, score, split_files  # noqa: E402

from diffmis.config import load_config  # noqa: E402
from diffmis.inference import Predictor, predict_paths  # noqa: E402


def measure(run: Path, images, ref_dir, fov_dir, k: int, work: Path, name: str, **kw: Any) -> dict[str, Any]:
    pred = Predictor.from_run(run, checkpoint="last", **kw)
    out = work / "nfe_pred" / name
    t0 = time.time()
    s = predict_paths(pred, images, out, overwrite=True, progress=False, save_prob=True, save_uncertainty=True)
    sec = (time.time() - t0) / len(images)
    res = score(out, ref_dir, fov_dir, k, work / "nfe_eval" / name)
    # nfe: batched network calls per image (the ensemble members share each call); network_evals: what an
    # unbatched implementation would pay, members x per-sample calls (a once-per-image prior pass counted once:
    # the calls beyond the sampler's steps)
    once = max(0, round(s.nfe_per_image) - pred.steps) if pred.sampler != "direct" else 0
    evals = (s.nfe_per_image - once) * pred.ensemble + once
    row = {"name": name, "nfe": s.nfe_per_image, "network_evals_per_image": evals, "seconds_per_image": sec,
           "dice": res["dice_mean"], "dice_std": res["dice_std"], "n_cases": res["n_cases"],
           **{k2: v for k2, v in kw.items()}}
    print(row, flush=True)
    return row


ALL_METHODS = ("medsegdiff", "pd_ddpm", "hidiff", "berdiff", "segmentor", "medsegdiff_v2")


def main() -> None:
    ap = argparse.ArgumentParser(description="Dice versus NFE")
    ap.add_argument("--dataset", choices=["kvasir", "drive", "mni"], default="kvasir")
    ap.add_argument("--work", default="/tmp/diffmis_quality")
    ap.add_argument("--cases", type=int, default=24, help="evaluation cases (first N of the split)")
    ap.add_argument("--ancestral-cases", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: diffmis's)")
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS),
                    help="runs to measure (default: all of them that exist)")
    ap.add_argument("--split", choices=["eval", "tune"], default="eval",
                    help="tune: the runs of quality.py --split tune, scored on the split carved from training")
    ap.add_argument("--variant", default="default", help="the quality.py variant whose runs are measured")
    ap.add_argument("--hidiff-ensemble-steps", type=int, default=1,
                    help="Bernoulli-DDIM steps of the HiDiff ensemble rows")
    args = ap.parse_args()
    from diffmis.hardware import set_threads

    threads = set_threads(args.threads).threads
    tag = args.dataset + ("_tune" if args.split == "tune" else "")
    work = Path(args.work) / tag
    root, data_sets, eval_split, _ = data_setup(args.dataset, args.split, work)
    cfg = load_config(f"segmentor_{args.dataset}", [f"data.root={root}", *data_sets])
    images, ref_dir, fov_dir = split_files(root, eval_split, work, cfg.data)
    images = images[: args.cases]
    k = cfg.data.num_classes

    def run_of(method: str) -> Path:  # quality.py names its runs <method>@<variant>
        return work / "runs" / f"{method}@{args.variant}"

    rows: list[dict[str, Any]] = []

    def add(series_name: str, row: dict[str, Any]) -> None:
        row["series"] = series_name
        rows.append(row)

    if "medsegdiff" in args.methods and run_of("medsegdiff").is_dir():
        for st in (5, 10, 20, 50, 100):
            add("medsegdiff DDIM", measure(run_of("medsegdiff"), images, ref_dir, fov_dir, k, work, f"msd_ddim{st}",
                                           steps=st, sampler="ddim", ensemble=1))
        sub = images[: args.ancestral_cases]
        add("medsegdiff DDPM-1000 (subset)", measure(run_of("medsegdiff"), sub, ref_dir, fov_dir, k, work,
                                                     "msd_ddpm1000", steps=1000, sampler="ddpm", ensemble=1))
        for n in (1, 5, 10):
            for fuse in ("mean", "staple"):
                if n == 1 and fuse == "staple":
                    continue
                add(f"medsegdiff DDIM-10 ensemble ({fuse})",
                    measure(run_of("medsegdiff"), images, ref_dir, fov_dir, k, work, f"msd_ens{n}_{fuse}",
                            steps=10, sampler="ddim", ensemble=n, fuse=fuse))
    if "pd_ddpm" in args.methods and run_of("pd_ddpm").is_dir():
        for tp in (100, 200, 300, 500):
            for st in (2, 5, 10, 20):
                add(f"pd_ddpm T'={tp}", measure(run_of("pd_ddpm"), images, ref_dir, fov_dir, k, work,
                                                 f"pd_{tp}_{st}", steps=st, sampler="ddim", ensemble=1,
                                                 start_step=tp))
        for st in (3, 6, 11, 21):  # the same network from pure noise, at the NFE of the T' rows (prior pass + steps)
            add("pd_ddpm net from pure noise", measure(run_of("pd_ddpm"), images, ref_dir, fov_dir, k, work,
                                                       f"pd_noise_{st}", steps=st, sampler="ddim", ensemble=1,
                                                       start_step=0))
    if "hidiff" in args.methods and run_of("hidiff").is_dir():
        for st in (10, 5, 2, 1):
            add("hidiff Bernoulli-DDIM", measure(run_of("hidiff"), images, ref_dir, fov_dir, k, work, f"hd_{st}",
                                                 steps=st, sampler="bernoulli_ddim", ensemble=1))
        for n in (1, 5, 10):
            for fuse in ("mean", "staple"):
                if n == 1 and fuse == "staple":
                    continue
                st = args.hidiff_ensemble_steps
                add(f"hidiff {st}-step ensemble ({fuse})",
                    measure(run_of("hidiff"), images, ref_dir, fov_dir, k, work, f"hd_ens{n}_{fuse}", steps=st,
                            ensemble=n, fuse=fuse))
        add("hidiff segmentor alone", measure(run_of("hidiff"), images, ref_dir, fov_dir, k, work, "hd_seg",
                                              segmentor_only=True))
    if "berdiff" in args.methods and run_of("berdiff").is_dir():
        for st in (1, 2, 5, 10, 20):
            add("berdiff Bernoulli-DDIM", measure(run_of("berdiff"), images, ref_dir, fov_dir, k, work, f"bd_{st}",
                                                  steps=st, sampler="bernoulli_ddim", ensemble=1))
    if "medsegdiff_v2" in args.methods and run_of("medsegdiff_v2").is_dir():
        v2 = run_of("medsegdiff_v2")
        add("medsegdiff_v2 from noise", measure(v2, images, ref_dir, fov_dir, k, work, "v2_noise_10", steps=10,
                                                sampler="ddim", ensemble=5, start_step=0))
        for tp, st in ((100, 2), (200, 2), (500, 2), (100, 5)):
            add(f"medsegdiff_v2 anchor start T'={tp}", measure(v2, images, ref_dir, fov_dir, k, work,
                                                                f"v2_anchor_{tp}_{st}", steps=st, sampler="ddim",
                                                                ensemble=5, start_step=tp))
        add("medsegdiff_v2 condition segmentor alone", measure(v2, images, ref_dir, fov_dir, k, work, "v2_seg",
                                                               segmentor_only=True))
    if "segmentor" in args.methods and run_of("segmentor").is_dir():
        add("segmentor", measure(run_of("segmentor"), images, ref_dir, fov_dir, k, work, "seg", ensemble=1))

    if set(args.methods) != set(ALL_METHODS):
        tag += "_" + "_".join(args.methods)
    if args.variant != "default":
        tag += f"@{args.variant}"
    png = REPO / "benchmarks" / "results" / f"nfe_{tag}.png"  # drawn by render.nfe_plot after the JSON
    # the headline: the best Dice within 10 network evaluations per image
    cheap = [r for r in rows if r["network_evals_per_image"] <= 10 and r["series"] != "segmentor"
             and "segmentor" not in r["series"]]
    headline = max(cheap, key=lambda r: r["dice"]) if cheap else None
    if headline:
        print(f"headline (<= 10 network evaluations): {headline}", flush=True)
    write_result(REPO / "benchmarks" / "results" / f"nfe_{tag}.json", {
        "benchmark": "nfe", "dataset": args.dataset, "command": " ".join(["python", *sys.argv]),
        "split": args.split, "eval_split": eval_split, "variant": args.variant,
        "settings": {"cases": len(images), "ancestral_cases": args.ancestral_cases, "runs": str(work / "runs"),
                     "threads": threads},
        "rows": rows, "headline": headline, "plot": png.name, "machine": environment()})
    from render import nfe_plot

    nfe_plot(REPO / "benchmarks" / "results" / f"nfe_{tag}.json")


if __name__ == "__main__":
    main()
