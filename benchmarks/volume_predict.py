"""Time and peak memory of predicting one large volume with a 3D method: sliding windows, ensembles.

A synthetic 256x256x160 volume (timing does not depend on the content) is segmented by a 3D HiDiff and a 3D
PD-DDPM (the shipped ``*_mni3d`` recipes: 48x48x16 windows, overlap 0.25, Gaussian blending, 4 windows per network
call, outputs accumulated on the CPU) at their default samplers, with 1 and with 5 ensemble members. Each variant
runs in a fresh process, so its peak resident memory (``VmHWM``, the whole process: Python, torch, the
weights, the volume and every buffer) is its own; the weights are freshly
initialised (the cost of a forward pass does not depend on them).

    python benchmarks/volume_predict.py                  # -> benchmarks/results/volume_predict.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, CpuMonitor, environment, peak_rss_mib, write_result  # noqa: E402

SHAPE = (256, 256, 160)
VARIANTS = [("hidiff_mni3d", 1), ("hidiff_mni3d", 5), ("pd_ddpm_mni3d", 1), ("pd_ddpm_mni3d", 5)]


def child(config: str, ensemble: int, shape: tuple[int, ...]) -> dict[str, Any]:
    import numpy as np
    import torch

    from diffmis.config import load_config
    from diffmis.hardware import set_threads
    from diffmis.inference import Predictor
    from diffmis.methods import build

    set_threads(None)
    cfg = load_config(config)
    torch.manual_seed(0)
    method = build(cfg)
    pred = Predictor(method, cfg, ensemble=ensemble)
    vol = np.random.default_rng(0).normal(100.0, 20.0, size=(1, *shape)).astype(np.float32)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    out = pred.predict_volume(vol, source="synthetic")
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()  # VmHWM of this process image (ru_maxrss would start at the parent's peak)
    return {"config": config, "ensemble": ensemble, "shape": list(shape), "seconds": round(seconds, 1),
            "peak_rss_gib": round(peak / 1024, 3), "rss_before_gib": round(base / 1024, 3),
            "network_calls": out.nfe, "sampler": pred.sampler, "steps": pred.steps,
            "start_step": pred.start_step, "precision": pred.precision, "window": list(cfg.data.patch_size),
            "windows_per_call": pred.batch_size, "label_shape": list(out.label.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "ENSEMBLE"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs=3, default=list(SHAPE))
    ap.add_argument("--variants", nargs="+", default=None, metavar="CONFIG:ENSEMBLE",
                    help="e.g. hidiff_mni3d:1 hidiff_mni3d:5 (default: HiDiff and PD-DDPM with 1 and 5 members)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), tuple(args.shape))))
        return
    monitor = CpuMonitor()
    out_json = RESULTS / "volume_predict.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []  # a rerun replaces its own rows
    variants = [(c, int(e)) for c, e in (v.split(":") for v in args.variants)] if args.variants else VARIANTS
    for config, ens in variants:
        cmd = [sys.executable, __file__, "--child", config, str(ens), "--shape", *map(str, args.shape)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["within_4_gib"] = row["peak_rss_gib"] <= 4.0
        row["command"] = "python benchmarks/volume_predict.py " + " ".join(sys.argv[1:])
        rows = [r for r in rows if (r["config"], r["ensemble"]) != (config, ens)] + [row]
        print(f"{config} x{ens}: {row['seconds']} s, peak {row['peak_rss_gib']} GiB, {row['network_calls']} calls",
              flush=True)
        write_result(out_json, {  # after every row: an interrupted run keeps its rows (each with its command)
            "benchmark": "volume_predict", "rows": rows, "environment": environment(), "load": monitor.summary()})


if __name__ == "__main__":
    main()
