"""Dice versus network evaluations per image (NFE), on runs trained by ``benchmarks/quality.py``.

- medsegdiff: DDIM with 5/10/20/50/100 steps, and 1000-step ancestral sampling on a 10-image subset;
- pd_ddpm: start steps T' in {100, 200, 300, 500} of T = 1000 with 2-20 DDIM steps below T';
- hidiff: 10, 5, 2 and 1 Bernoulli-DDIM steps;
- ensembles of 1, 5 and 10 members with mean and STAPLE fusion (hidiff and medsegdiff at their defaults).

    python benchmarks/nfe.py --dataset kvasir --size 128 [--cases 40]

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
from quality import EVAL_SPLIT, REPO, dataset_root, score, split_files  # noqa: E402

from diffmis.inference import Predictor, predict_paths  # noqa: E402


def measure(run: Path, images, ref_dir, fov_dir, k: int, work: Path, name: str, **kw: Any) -> dict[str, Any]:
    pred = Predictor.from_run(run, checkpoint="last", **kw)
    out = work / "nfe_pred" / name
    t0 = time.time()
    s = predict_paths(pred, images, out, overwrite=True, progress=False)
    sec = (time.time() - t0) / len(images)
    res = score(out, ref_dir, fov_dir, k, work / "nfe_eval" / name)
    row = {"name": name, "nfe": s.nfe_per_image, "seconds_per_image": sec, "dice": res["dice_mean"],
           "dice_std": res["dice_std"], "n_cases": res["n_cases"], **{k2: v for k2, v in kw.items()}}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description="Dice versus NFE")
    ap.add_argument("--dataset", choices=["kvasir", "drive", "mni"], default="kvasir")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--work", default="/tmp/diffmis_quality")
    ap.add_argument("--cases", type=int, default=40, help="evaluation cases (first N of the split)")
    ap.add_argument("--ancestral-cases", type=int, default=10)
    args = ap.parse_args()
    tag = f"{args.dataset}_{args.size}" if args.dataset == "kvasir" else args.dataset
    work = Path(args.work) / tag
    runs = work / "runs"
    root = dataset_root(args.dataset, work)
    images, ref_dir, fov_dir, _ = split_files(root, EVAL_SPLIT[args.dataset])
    images = images[: args.cases]
    keep = {p.stem for p in images}
    for f in list(ref_dir.iterdir()):
        if f.stem not in keep:
            f.unlink()
    k = 3 if args.dataset == "mni" else 1
    rows: list[dict[str, Any]] = []
    series: dict[str, list[tuple[float, float]]] = {}

    def add(series_name: str, row: dict[str, Any]) -> None:
        row["series"] = series_name
        rows.append(row)
        series.setdefault(series_name, []).append((row["nfe"], row["dice"]))

    if (runs / "medsegdiff").is_dir():
        for st in (5, 10, 20, 50, 100):
            add("medsegdiff DDIM", measure(runs / "medsegdiff", images, ref_dir, fov_dir, k, work, f"msd_ddim{st}",
                                           steps=st, sampler="ddim", ensemble=1))
        sub = images[: args.ancestral_cases]
        add("medsegdiff DDPM-1000 (subset)", measure(runs / "medsegdiff", sub, ref_dir, fov_dir, k, work,
                                                     "msd_ddpm1000", steps=1000, sampler="ddpm", ensemble=1))
        for n in (1, 5, 10):
            for fuse in ("mean", "staple"):
                if n == 1 and fuse == "staple":
                    continue
                add(f"medsegdiff DDIM-10 ensemble ({fuse})",
                    measure(runs / "medsegdiff", images, ref_dir, fov_dir, k, work, f"msd_ens{n}_{fuse}",
                            steps=10, sampler="ddim", ensemble=n, fuse=fuse))
    if (runs / "pd_ddpm").is_dir():
        for tp in (100, 200, 300, 500):
            for st in (2, 5, 10, 20):
                add(f"pd_ddpm T'={tp}", measure(runs / "pd_ddpm", images, ref_dir, fov_dir, k, work,
                                                 f"pd_{tp}_{st}", steps=st, sampler="ddim", ensemble=1,
                                                 start_step=tp))
    if (runs / "hidiff").is_dir():
        for st in (10, 5, 2, 1):
            add("hidiff Bernoulli-DDIM", measure(runs / "hidiff", images, ref_dir, fov_dir, k, work, f"hd_{st}",
                                                 steps=st, sampler="bernoulli_ddim", ensemble=1))
        for n in (1, 5, 10):
            for fuse in ("mean", "staple"):
                if n == 1 and fuse == "staple":
                    continue
                add(f"hidiff ensemble ({fuse})", measure(runs / "hidiff", images, ref_dir, fov_dir, k, work,
                                                         f"hd_ens{n}_{fuse}", steps=10, ensemble=n, fuse=fuse))
    if (runs / "segmentor").is_dir():
        add("segmentor", measure(runs / "segmentor", images, ref_dir, fov_dir, k, work, "seg", ensemble=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image (NFE, log scale)")
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice vs NFE, {tag} ({len(images)} cases)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = REPO / "benchmarks" / "results" / f"nfe_{tag}.png"
    fig.savefig(png, dpi=110)
    write_result(REPO / "benchmarks" / "results" / f"nfe_{tag}.json", {
        "benchmark": "nfe", "dataset": args.dataset, "command": " ".join(["python", *sys.argv]),
        "settings": {"cases": len(images), "ancestral_cases": args.ancestral_cases, "runs": str(runs)},
        "rows": rows, "plot": png.name, "machine": environment()})


if __name__ == "__main__":
    main()
