"""Volumes at equal CPU minutes: 3D methods against the same methods trained 2D slice-wise, all scored per volume.

Data: MSD Task04 Hippocampus (``../shared/data/msd-hippocampus``, nnU-Net raw layout, 1 mm, 3 classes). Rows:

* ``<method>_3d``: the ``<method>_hippocampus`` config (3D networks, 32x48x32 patches, whole volumes predicted by
  sliding windows);
* ``<method>_2d``: the ``<method>_hippocampus2d`` config (2D networks on axial slices resized to 64x64; every
  test volume predicted slice by slice, reassembled on the volume's grid);
* ``<method>_3d_segmentor`` / ``<method>_2d_segmentor``: the segmentor inside a PD-DDPM or HiDiff run, alone.

Every prediction is a NIfTI volume on its input's grid, scored per volume with the header spacing (Dice, IoU,
HD95 in mm, mean and std over volumes, foreground classes averaged), plus ECE and the error-detection AUROC of the
entropy, as ``benchmarks/quality.py`` does. Budget: ``--minutes`` of training per method (default 20), a
segmentor phase of ``--seg-share`` counted in it. ``--split tune`` reports the ``val`` cases (choose recipes
there), ``--split eval`` the ``test`` cases. One run at a time; rows accumulate in
``benchmarks/results/volumes_hippocampus[_tune].json`` (a rerun replaces its own rows).

    python benchmarks/volumes.py --methods segmentor hidiff pd_ddpm --dims 3 2 --minutes 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, CpuMonitor, environment, write_result  # noqa: E402
from quality import (WITH_SEGMENTOR, check_segphase_from, predict_score, reused_segphase, shared_data,  # noqa: E402
                     train_and_score)

from diffmis.config import load_config  # noqa: E402
from diffmis.data.layouts import index_nnunet, resolve_split  # noqa: E402
from diffmis.hardware import set_threads  # noqa: E402

METHODS = ["segmentor", "medsegdiff", "medsegdiff_v2", "pd_ddpm", "hidiff", "berdiff"]
SLICE_METHODS = ("segmentor", "pd_ddpm", "hidiff")  # the shipped hippocampus2d configs


def split_volumes(root: Path, split: str, work: Path) -> tuple[list[Path], Path]:
    """Links ``<case>.nii.gz`` to the split's images (one channel) and a folder of its reference labels."""
    index = index_nnunet(root)
    ids = [i for _, i in resolve_split(index, split).ids]
    imgs, refs = work / f"images_{split}", work / f"refs_{split}"
    for d in (imgs, refs):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    out = []
    for c in ids:
        os.symlink(index.train[c][0].resolve(), imgs / f"{c}.nii.gz")
        os.symlink(index.train_labels[c].resolve(), refs / f"{c}.nii.gz")
        out.append(imgs / f"{c}.nii.gz")
    return out, refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["eval", "tune"], default="eval")
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per method (default 20)")
    ap.add_argument("--methods", nargs="+", default=["segmentor", "pd_ddpm", "hidiff"], choices=METHODS)
    ap.add_argument("--dims", nargs="+", type=int, default=[3, 2], choices=[2, 3])
    ap.add_argument("--seg-share", type=float, default=0.0,
                    help="fraction of the budget a method with a segmentor spends on a segmentor run first")
    ap.add_argument("--variant", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--segphase-from", default=None, metavar="VARIANT",
                    help="with --seg-share: start from the segmentor phase that VARIANT's row of the same method "
                         "trained (a paired ablation; its minutes still count) instead of training one")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="/tmp/diffmis_volumes")
    args = ap.parse_args()
    check_segphase_from(args.segphase_from, args.seg_share, args.methods)
    threads = set_threads(args.threads).threads
    root = shared_data() / "msd-hippocampus"
    if not root.is_dir():
        raise SystemExit(f"{root} not found (set DIFFMIS_SHARED_DATA)")
    split = "test" if args.split == "eval" else "val"
    tag = "hippocampus" + ("_tune" if args.split == "tune" else "")
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    images, refs = split_volumes(root, split, work)
    # tuning: train on the training split only (the val cases are what is reported)
    data_sets = [f"data.root={root}", "train.val_every=0"]
    out_json = RESULTS / f"volumes_{tag}.json"
    doc: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": {}}
    monitor = CpuMonitor()
    for dims in args.dims:
        dataset = "hippocampus" if dims == 3 else "hippocampus2d"
        for m in args.methods:
            if dims == 2 and m not in SLICE_METHODS:
                print(f"--- {m}: no 2D hippocampus config; skipped", flush=True)
                continue
            key = f"{m}_{dims}d@{args.variant}"
            print(f"=== {key}: {args.minutes} min", flush=True)
            share = args.seg_share if m in WITH_SEGMENTOR else 0.0
            k = load_config(f"{m}_{dataset}", data_sets).data.num_classes

            def score_run(run_dir: str, name: str, **more: Any) -> dict[str, Any]:
                return predict_score(run_dir, name, images, work, refs, None, k, **more)

            seg = (reused_segphase(doc, f"{m}_{dims}d@{args.segphase_from}", args.minutes * share)
                   if args.segphase_from and share > 0 else None)
            row, seg_row = train_and_score(m, dataset, key, args.minutes, share, work, data_sets, list(args.sets),
                                           score_run, {"dims": dims, "variant": args.variant}, seg)
            doc["rows"][key] = row
            print(f"{key}: Dice {row['dice_mean']:.4f} +- {row['dice_std']:.4f}, HD95 {row['hd95_mean']:.2f} mm, "
                  f"steps {row['steps']}, s/volume {row['seconds_per_image']}", flush=True)
            if seg_row is not None:
                doc["rows"][f"{m}_{dims}d_segmentor@{args.variant}"] = seg_row
                print(f"{m}_{dims}d_segmentor: Dice {seg_row['dice_mean']:.4f}", flush=True)
            doc.update({"benchmark": "volumes", "dataset": "msd-hippocampus", "split": args.split,
                        "eval_split": split, "n_cases": len(images), "threads": threads,
                        "protocol": "equal training minutes per method (segmentor phase counted), last weights, "
                                    "default sampler; every prediction a volume on its input grid, scored per "
                                    "volume with the header spacing (HD95 in mm); ECE top-label 10 bins pooled; "
                                    "AUROC of the entropy for the error"})
            doc.setdefault("commands", {})[key] = "python benchmarks/volumes.py " + " ".join(sys.argv[1:])
            doc["environment"] = environment()
            doc["load"] = monitor.summary()
            write_result(out_json, doc)


if __name__ == "__main__":
    main()
