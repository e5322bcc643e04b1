"""Quality at equal CPU budget: every method trains for the same wall-clock minutes, then predicts and is scored.

For each method (segmentor, medsegdiff, medsegdiff_v2, pd_ddpm, hidiff from ``configs/<method>_<dataset>.yaml``
and the lucidrains ``med-seg-diff-pytorch`` peer) this script trains on the train split for ``--minutes``,
predicts the evaluation split with the method's default sampler (full resolution; sliding windows for
patch-trained DRIVE models), and evaluates Dice, IoU, HD95 (mean and std over cases; DRIVE inside the FOV),
NFE per image, inference seconds per image, training steps, images seen and parameters.

    python benchmarks/quality.py --dataset kvasir --size 128 --minutes 15
    python benchmarks/quality.py --dataset drive --minutes 15
    python benchmarks/quality.py --dataset mni --minutes 15

Writes ``benchmarks/results/quality_<dataset>[_<size>].json``; run folders go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from diffmis.config import load_config  # noqa: E402
from diffmis.evaluation import evaluate_folders  # noqa: E402
from diffmis.inference import Predictor, predict_paths  # noqa: E402
from diffmis.training.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["segmentor", "medsegdiff", "medsegdiff_v2", "pd_ddpm", "hidiff", "peer"]
EVAL_SPLIT = {"kvasir": "val", "drive": "test", "mni": "test"}


def shared_data() -> Path:
    env = os.environ.get("DIFFMIS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def dataset_root(dataset: str, work: Path) -> Path:
    if dataset == "mni":
        from diffmis.data import write_mni

        root = work / "mni_data"
        if not root.exists():
            write_mni(root)
        return root
    root = shared_data() / {"kvasir": "kvasir-seg", "drive": "drive"}[dataset]
    if not root.is_dir():
        raise SystemExit(f"dataset {dataset} not found at {root} (set DIFFMIS_SHARED_DATA)")
    return root


def split_files(root: Path, split: str, work: Path,
                limit: Optional[int] = None) -> tuple[list[Path], Path, Optional[Path], Path]:
    """Images of a split (the first ``limit`` if given), plus a folder under ``work`` with just their reference
    masks (and FOVs) for evaluation (one folder per split and limit: runs in other work folders never share it)."""
    ids = [s.strip() for s in (root / "splits" / f"{split}.txt").read_text().split() if s.strip()]
    ids = ids[:limit] if limit else ids
    tmp = work / f"refs_{split}_{limit or 'all'}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "masks").mkdir(parents=True)
    has_fov = (root / "fov").is_dir()
    if has_fov:
        (tmp / "fov").mkdir()
    images = []
    for sid in ids:
        images.append(next(p for p in (root / "images").glob(f"{sid}.*")))
        m = next(p for p in (root / "masks").glob(f"{sid}.*"))
        os.symlink(m.resolve(), tmp / "masks" / m.name)
        if has_fov:
            f = next(p for p in (root / "fov").glob(f"{sid}.*"))
            os.symlink(f.resolve(), tmp / "fov" / f.name)
    return images, tmp / "masks", (tmp / "fov") if has_fov else None, tmp


def score(pred_dir: Path, ref_dir: Path, fov_dir: Optional[Path], k: int, out_dir: Path) -> dict[str, Any]:
    ev = evaluate_folders(pred_dir, ref_dir, num_classes=k, fov_dir=fov_dir, out_dir=out_dir)
    fg = ev.foreground_mean
    per_case = [c for c in ev.to_summary()["metric_per_case"]]
    dice = [np.mean([m["Dice"] for cls, m in c["metrics"].items() if cls != "0"]) for c in per_case]
    iou = [np.mean([m["IoU"] for cls, m in c["metrics"].items() if cls != "0"]) for c in per_case]
    hd = [np.mean([m["HD95"] for cls, m in c["metrics"].items() if cls != "0"]) for c in per_case]
    return {"dice_mean": float(np.mean(dice)), "dice_std": float(np.std(dice)),
            "iou_mean": float(np.mean(iou)), "iou_std": float(np.std(iou)),
            "hd95_mean": float(np.mean(hd)), "hd95_std": float(np.std(hd)), "n_cases": len(dice),
            "foreground_mean": {k2: float(v) for k2, v in fg.items()}}


def run_diffmis(method: str, dataset: str, root: Path, args, work: Path, *, name: Optional[str] = None,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train ``configs/<method>_<dataset>.yaml`` for ``args.minutes`` into ``work/runs/<name>`` (``extra``: more
    ``--set`` overrides, e.g. an ablation switch)."""
    name = name or method
    cfg_file = REPO / "configs" / f"{method}_{dataset}.yaml"
    overrides = [f"experiment.output_dir={work / 'runs'}", f"experiment.name={name}", f"data.root={root}",
                 f"train.max_minutes={args.minutes}", "train.max_steps=100000000", "train.val_every=0",
                 "train.progress=false", f"experiment.seed={args.seed}"]
    if args.size and dataset == "kvasir":
        overrides.append(f"data.image_size=[{args.size}, {args.size}]")
    if dataset == "mni":
        overrides += ["data.kind=folder"]
    overrides += list(extra)
    cfg = load_config(cfg_file, overrides)
    run_dir = work / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    res = train(cfg, run_dir, log=lambda s: print(s, flush=True))
    train_s = time.time() - t0
    n_params = sum(p.numel() for p in res.method.parameters())
    return {"steps": res.step, "images_seen": res.step * cfg.train.batch_size * cfg.train.grad_accum,
            "train_seconds": train_s, "params": n_params, "run_dir": str(run_dir),
            "sampler": cfg.sample.sampler, "sample_steps": cfg.sample.steps, "ensemble": cfg.sample.ensemble,
            "start_step": cfg.sample.start_step, "image_size": cfg.data.image_size, "patch_size": cfg.data.patch_size,
            "precision": cfg.train.precision, "batch_size": cfg.train.batch_size, "overrides": list(extra)}


def predict_diffmis(info: dict[str, Any], images: list[Path], pred_dir: Path, **kw: Any) -> dict[str, Any]:
    """Predict with the run's default sampler (``kw``: Predictor overrides, e.g. ensemble or segmentor_only)."""
    pred = Predictor.from_run(info["run_dir"], checkpoint="last", **kw)
    t0 = time.time()
    s = predict_paths(pred, images, pred_dir, overwrite=True, progress=False)
    if s.failed:
        raise RuntimeError(f"prediction failed: {s.failed}")
    return {"nfe_per_image": s.nfe_per_image, "seconds_per_image": (time.time() - t0) / len(images),
            "predict_settings": {"sampler": pred.sampler, "steps": pred.steps, "ensemble": pred.ensemble,
                                 "fuse": pred.fuse, "start_step": pred.start_step, **kw}}


def predict_and_score(info: dict[str, Any], name: str, images: list[Path], work: Path, ref_dir: Path,
                      fov_dir: Optional[Path], k: int, **kw: Any) -> dict[str, Any]:
    """Predict ``info["run_dir"]`` into ``work/pred/<name>`` (cleared first; ``kw``: Predictor overrides) and
    score it into ``work/eval/<name>``; ``info`` is returned with both results added."""
    pred_dir = work / "pred" / name
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    info.update(predict_diffmis(info, images, pred_dir, **kw))
    info.update(score(pred_dir, ref_dir, fov_dir, k, work / "eval" / name))
    return info


# ---- the lucidrains peer ---------------------------------------------------------------------------------


def run_peer(dataset: str, root: Path, args, work: Path, images: list[Path], pred_dir: Path) -> dict[str, Any]:
    """Train the peer's paper-faithful MedSegDiff for the same budget, sample with DDIM (``--peer-steps``)."""
    from med_seg_diff_pytorch import MedSegDiff, Unet
    from PIL import Image

    from diffmis.config import DataConfig
    from diffmis.data import build_dataset, normalize_intensity, read_image, resize_image

    if dataset != "kvasir":
        raise ValueError("the peer is run on Kvasir-SEG only (binary, fixed square size)")
    size = args.size or 128
    torch.manual_seed(args.seed)
    dc = DataConfig(kind="folder", root=str(root), image_size=(size, size), in_channels=3, num_classes=1,
                    augment={"flip": True, "prob": 0.5})
    ds = build_dataset(dc, "train", train=True)
    unet = Unet(dim=32, image_size=size, mask_channels=1, input_img_channels=3, dim_mults=(1, 2, 4, 8))
    diffusion = MedSegDiff(unet, timesteps=1000, sampling_timesteps=args.peer_steps)
    opt = torch.optim.AdamW(diffusion.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    steps = 0
    while time.time() - t0 < args.minutes * 60:
        idx = torch.randint(0, len(ds), (8,), generator=g).tolist()
        items = [ds[i] for i in idx]
        img = torch.stack([torch.as_tensor(it["image"]) for it in items])
        mask = torch.stack([torch.as_tensor(it["mask"]) for it in items])
        loss = diffusion(mask, img)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    train_s = time.time() - t0
    diffusion.eval()
    pred_dir.mkdir(parents=True, exist_ok=True)
    t1 = time.time()
    for start in range(0, len(images), 8):  # batches of 8, like diffmis's sample.batch_size
        chunk = images[start:start + 8]
        raws = [read_image(p) for p in chunk]
        x = torch.stack([torch.from_numpy(resize_image(normalize_intensity(r, "minmax"), (size, size))).float()
                         for r in raws])
        with torch.no_grad():
            probs = diffusion.sample(x).float()
        for path, raw, prob in zip(chunk, raws, probs):
            h, w = raw.shape[-2:]
            prob = torch.nn.functional.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)
            Image.fromarray(((prob[0, 0] > 0.5).numpy() * 255).astype(np.uint8)).save(pred_dir / f"{path.stem}.png")
    return {"steps": steps, "images_seen": steps * 8, "train_seconds": train_s,
            "params": sum(p.numel() for p in unet.parameters()), "sampler": "ddim", "sample_steps": args.peer_steps,
            "nfe_per_image": args.peer_steps, "seconds_per_image": (time.time() - t1) / len(images),
            "image_size": [size, size], "precision": "fp32", "batch_size": 8}


def main() -> None:
    ap = argparse.ArgumentParser(description="quality at equal CPU budget")
    ap.add_argument("--dataset", choices=["kvasir", "drive", "mni"], required=True)
    ap.add_argument("--size", type=int, default=None, help="Kvasir working size (default 128)")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per method")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--peer-steps", type=int, default=20, help="DDIM steps of the peer's sampler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/diffmis_quality")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases (smoke runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (every method gets the same)")
    ap.add_argument("--rescore", action="store_true",
                    help="re-evaluate the saved predictions of the methods in the JSON (no training)")
    ap.add_argument("--ensemble", type=int, default=None,
                    help="ensemble members at prediction (default: each config's sample.ensemble)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dataset == "kvasir" and args.size is None:
        args.size = 128
    methods = args.methods or (METHODS if args.dataset == "kvasir" else METHODS[:-1])
    tag = f"{args.dataset}_{args.size}" if args.dataset == "kvasir" else args.dataset
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    root = dataset_root(args.dataset, work)
    images, ref_dir, fov_dir, _ = split_files(root, EVAL_SPLIT[args.dataset], work, args.limit)
    k = 3 if args.dataset == "mni" else 1
    out_json = REPO / "benchmarks" / "results" / f"quality_{tag}.json"
    results: dict[str, Any] = {}
    if out_json.is_file():  # keep methods measured earlier with the same settings
        old = json.loads(out_json.read_text())
        if old.get("settings", {}).get("minutes") == args.minutes:
            results = old.get("results", {})
    if args.rescore:
        data = json.loads(out_json.read_text())
        for m, row in data["results"].items():
            if args.methods and m not in args.methods:
                continue
            row.update(score(work / "pred" / m, ref_dir, fov_dir, k, work / "eval" / m))
            print(f"{m}: Dice {row['dice_mean']:.4f} +- {row['dice_std']:.4f} over {row['n_cases']} cases", flush=True)
        data["rescored"] = {"command": " ".join(["python", *sys.argv]), "machine": environment()}
        write_result(out_json, data)
        return
    for m in methods:
        print(f"=== {m} on {tag}: {args.minutes} min", flush=True)
        if m == "peer":
            pred_dir = work / "pred" / m
            if pred_dir.exists():
                shutil.rmtree(pred_dir)
            info = run_peer(args.dataset, root, args, work, images, pred_dir)
            info.update(score(pred_dir, ref_dir, fov_dir, k, work / "eval" / m))
        else:
            info = run_diffmis(m, args.dataset, root, args, work)
            kw = {} if args.ensemble is None else {"ensemble": args.ensemble}
            predict_and_score(info, m, images, work, ref_dir, fov_dir, k, **kw)
        results[m] = info
        if m in ("hidiff", "pd_ddpm"):  # the co-trained segmentor alone: what the diffusion adds to it
            name = f"{m}_segmentor"
            seg = predict_and_score({"run_dir": info["run_dir"], "steps": info["steps"], "params": info["params"]},
                                    name, images, work, ref_dir, fov_dir, k, segmentor_only=True)
            results[name] = seg
            print(f"{name}: Dice {seg['dice_mean']:.4f} +- {seg['dice_std']:.4f}", flush=True)
        print(f"{m}: Dice {info['dice_mean']:.4f} +- {info['dice_std']:.4f}, steps {info['steps']}, "
              f"NFE {info['nfe_per_image']}, {info['seconds_per_image']:.3f} s/image", flush=True)
        write_result(out_json, {
            "benchmark": "quality", "dataset": args.dataset, "eval_split": EVAL_SPLIT[args.dataset],
            "command": " ".join(["python", *sys.argv]),
            "settings": {"minutes": args.minutes, "size": args.size, "seed": args.seed, "limit": args.limit,
                         "peer_steps": args.peer_steps, "threads": args.threads, "ensemble": args.ensemble},
            "results": results, "machine": environment()})


if __name__ == "__main__":
    main()
