"""HiDiff versus its segmentor alone on the built-in MNI brain-tissue set, at an equal number of steps.

Trains (1) the ``segmentor`` recipe and (2) the ``hidiff`` recipe with the same UNet segmentor for the same
number of optimizer steps, then evaluates on the validation slices: the segmentor run, HiDiff's own prior
(its co-trained segmentor) and HiDiff's refined output. Writes benchmarks/results/hidiff_mni.json.

    python benchmarks/hidiff_mni.py [--steps 300] [--size 96] [--out /tmp/hidiff_mni]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from diffmis.config import load_config  # noqa: E402
from diffmis.data import build_dataset  # noqa: E402
from diffmis.metrics import dice_batch  # noqa: E402
from diffmis.quickstart import quickstart_config  # noqa: E402
from diffmis.training.trainer import hard_onehot, train  # noqa: E402
from diffmis.utils import autocast  # noqa: E402


def foreground_dice(method, ds, *, steps: int, ensemble: int, precision: str, prior_only: bool = False) -> dict:
    from diffmis.ensemble import ensemble_predict

    method.eval()
    scores = []
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(len(ds), start + 16))]
        image = torch.stack([torch.as_tensor(it["image"]) for it in items])
        mask = torch.stack([torch.as_tensor(it["mask"]) for it in items])
        with torch.no_grad(), autocast(torch.device("cpu"), precision):
            if prior_only:
                probs = method.prior_probs(image)
            else:
                probs = ensemble_predict(method, image, n=ensemble, fuse="mean", generator=gen, steps=steps).probability
        d = dice_batch(hard_onehot(probs.float()), mask)[:, 1:]
        scores.extend(d.mean(1).tolist())
    return {"dice_mean": float(np.mean(scores)), "dice_std": float(np.std(scores)), "n_cases": len(scores),
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--ensemble", type=int, default=4)
    ap.add_argument("--steps-default", type=int, default=1, choices=[1, 2, 5, 10],
                    help="sampler steps of the headline HiDiff figure (all four are recorded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/diffmis_hidiff_mni")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "hidiff_mni.json"))
    args = ap.parse_args()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    from diffmis.data import write_mni

    data_root = write_mni(out / "data")
    base = quickstart_config(data_root, out / "runs", minutes=10_000, seed=args.seed, image_size=args.size)
    common = [f"train.max_steps={args.steps}", "train.max_minutes=null", "train.progress=false",
              "train.lr_schedule=poly", "train.warmup_steps=0"]
    hid_cfg = load_config(base=base.to_dict(), overrides=common + ["experiment.name=hidiff"])
    seg_d = base.to_dict()
    seg_d["experiment"].update(name="segmentor", recipe="segmentor")
    seg_d["model"] = {"name": seg_d["model"]["segmentor"]["name"], "params": seg_d["model"]["segmentor"]["params"]}
    seg_d["diffusion"] = {"kind": "none"}
    seg_d["sample"]["sampler"] = "direct"
    seg_cfg = load_config(base=seg_d, overrides=common)

    val = build_dataset(base.data, "val", train=False)
    results = {}
    for name, cfg in (("segmentor", seg_cfg), ("hidiff", hid_cfg)):
        t0 = time.time()
        res = train(cfg, out / "runs" / name, log=lambda s: None)
        results[name] = {"train_seconds": time.time() - t0, "steps": res.step, "images_per_s": res.images_per_s}
        method = res.method
        if name == "hidiff":
            results["hidiff_prior"] = foreground_dice(method, val, steps=10, ensemble=1, precision="bf16",
                                                      prior_only=True)
            for st in (1, 2, 5, 10):  # Bernoulli-DDIM steps of T = 10
                for n in sorted({1, args.ensemble}):
                    results[f"hidiff_steps{st}_ens{n}"] = foreground_dice(method, val, steps=st, ensemble=n,
                                                                          precision="bf16")
            results[name].update(results[f"hidiff_steps{args.steps_default}_ens{args.ensemble}"])
        else:
            results[name].update(foreground_dice(method, val, steps=1, ensemble=1, precision="bf16"))
        print(name, results[name], flush=True)
    summary = {
        "benchmark": "hidiff_mni",
        "command": " ".join(["python", *sys.argv]),
        "settings": {"steps": args.steps, "headline_sampler_steps": args.steps_default, "image_size": args.size,
                     "ensemble": args.ensemble, "seed": args.seed,
                     "split": "val", "metric": "mean foreground Dice (GM, WM) per slice, threshold/argmax"},
        "results": results,
        "hidiff_beats_segmentor": results["hidiff"]["dice_mean"] > results["segmentor"]["dice_mean"],
        "machine": environment(),
    }
    write_result(Path(args.result), summary)
    print(f"segmentor {results['segmentor']['dice_mean']:.4f}  hidiff prior {results['hidiff_prior']['dice_mean']:.4f}"
          f"  hidiff refined {results['hidiff']['dice_mean']:.4f}")
    for key, val_ in results.items():
        if key.startswith("hidiff_steps"):
            print(f"  {key}: {val_['dice_mean']:.4f}")


if __name__ == "__main__":
    main()
