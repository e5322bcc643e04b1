"""Training throughput of every recipe on Kvasir-SEG with the shipped configs, through the real trainer.

For each recipe, a fresh subprocess runs ``diffmis.training.train`` on ``configs/<recipe>_kvasir.yaml`` with
these overrides only: ``data.root`` (the shared copy), ``data.image_size`` (and the FF-Parser/NBP
``model.params.image_size`` of the MedSegDiff models) = ``--size``, ``train.batch_size``, ``train.max_steps`` =
warm-up + timed steps, ``train.log_every=1`` (one metrics line per optimizer step), no validation, no periodic
checkpoints, no progress bar, and for HiDiff ``train.pretrain_steps=0`` (every step is the full alternate step:
refiner step + segmentor step). Precision and channels_last come from the configs (bf16 + channels_last) unless
``--precision`` / ``--no-channels-last`` say otherwise. The trainer's own per-step ``images_per_s`` (data
loading from the in-memory cache included, as in real training) gives the step times; the first ``--warmup``
steps are left out; the median step time gives images/s. Dataset decoding (the cache fill) happens before the
first step and is reported separately as ``startup_s``.

One torch thread by default (``--threads``; see docs/benchmarks.md: two spinning OpenMP threads on a shared
2-core machine lose whole scheduler slices whenever another process holds a core), the CLI's glibc malloc
tuning by default (``--malloc``). Writes ``benchmarks/results/train_speed.json``.

    flock /tmp/diffmis-bench.lock .venv/bin/python benchmarks/train_speed.py
    .venv/bin/python benchmarks/train_speed.py --quick     # smoke test: 64x64, batch 2, 1+2 steps, no file
    .venv/bin/python benchmarks/train_speed.py --recipes medsegdiff hidiff --size 128 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MALLOC_SETTINGS,
    RESULTS,
    ROOT,
    CpuMonitor,
    environment,
    malloc_env,
    peak_rss_mib,
    stats,
    write_result,
)

OUT = RESULTS / "train_speed.json"
RECIPES = ("segmentor", "medsegdiff", "medsegdiff_v2", "pd_ddpm", "hidiff")
DEFAULT_ROOT = Path(os.environ.get("DIFFMIS_SHARED_DATA") or ROOT.parent / "shared" / "data") / "kvasir-seg"


def overrides(recipe: str, args: argparse.Namespace) -> list[str]:
    from diffmis.config import load_config

    base = load_config(ROOT / "configs" / f"{recipe}_{args.dataset}.yaml")
    out = [f"data.root={Path(args.root).resolve()}", f"data.image_size={args.size}",
           f"train.batch_size={args.batch}", f"train.max_steps={args.warmup + args.steps}", "train.log_every=1",
           "train.val_every=0", "train.ckpt_every=0", "train.progress=false"]
    if base.model.name in ("medsegdiff", "medsegdiff_v2"):
        out.append(f"model.params.image_size={args.size}")
    if recipe == "hidiff":
        out.append("train.pretrain_steps=0")
    if args.precision:
        out.append(f"train.precision={args.precision}")
    if args.no_channels_last:
        out.append("train.channels_last=false")
    return out


def worker(args: argparse.Namespace) -> None:
    """Train one recipe for warm-up + timed steps in this process; print one JSON line."""
    t0 = time.time()
    if os.environ.get("DIFFMIS_MALLOC_SETTING") == "mallopt":
        from diffmis.utils import tune_malloc

        tune_malloc()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffmis.config import load_config
    from diffmis.methods import build
    from diffmis.training import train

    recipe = args.worker
    sets = overrides(recipe, args)
    cfg = load_config(ROOT / "configs" / f"{recipe}_{args.dataset}.yaml", sets)
    n_params = sum(p.numel() for p in build(cfg).parameters())
    with tempfile.TemporaryDirectory(prefix="diffmis-train-speed-") as tmp:
        res = train(cfg, Path(tmp) / "run", log=lambda s: None)
        lines = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r.get("phase") == "train"]
    step_s = [args.batch / r["images_per_s"] for r in train_lines]
    timed = step_s[args.warmup:]
    med = statistics.median(timed)
    loop = sum(step_s)
    print(json.dumps({
        "recipe": recipe, "model": cfg.model.name, "segmentor": cfg.model.segmentor.name if cfg.model.segmentor else None,
        "n_params": n_params, "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
        "overrides": sets, "steps_total": res.step, "warmup_step_s": [round(x, 3) for x in step_s[:args.warmup]],
        "step_s": stats(timed, 3), "images_per_s": round(args.batch / med, 3),
        "startup_s": round(res.seconds - loop, 1), "process_s": round(time.time() - t0, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1), "torch_threads": torch.get_num_threads(),
        "loss_last": train_lines[-1].get("loss"),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--dataset", default="kvasir", help="config suffix: configs/<recipe>_<dataset>.yaml")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="the Kvasir-SEG folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps left out")
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default: the config's (bf16)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); 1 by default: see docs/benchmarks.md, threads")
    p.add_argument("--malloc", default="glibc", choices=MALLOC_SETTINGS)
    p.add_argument("--quick", action="store_true", help="64x64, batch 2, 1 warm-up + 2 steps; no result file")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup = 64, 2, 2, 1
    if not Path(args.root).is_dir():
        raise SystemExit(f"{args.root} is not a folder: pass --root /path/to/kvasir-seg")
    env = environment()
    mon = CpuMonitor()
    child_env = malloc_env(args.malloc)
    rows: list[dict[str, Any]] = []
    for recipe in args.recipes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", recipe, "--dataset", args.dataset,
               "--root", args.root, "--size", str(args.size), "--batch", str(args.batch), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        if args.precision:
            cmd += ["--precision", args.precision]
        if args.no_channels_last:
            cmd.append("--no-channels-last")
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True)
        mon.sample()
        if proc.returncode != 0:
            print(f"{recipe}: failed\n{proc.stderr[-3000:]}", flush=True)
            rows.append({"recipe": recipe, "error": proc.stderr[-3000:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{recipe:14s} {row['n_params'] / 1e6:5.2f}M  step {row['step_s']['median']:7.2f} s  "
              f"{row['images_per_s']:6.2f} img/s  startup {row['startup_s']:5.1f} s  rss {row['peak_rss_mib']:6.0f} MiB",
              flush=True)
    result = {
        "benchmark": "train_speed",
        "settings": {"dataset": args.dataset, "root": str(Path(args.root).resolve()), "size": args.size,
                     "batch": args.batch, "warmup_steps": args.warmup, "timed_steps": args.steps,
                     "precision": args.precision or "config (bf16)",
                     "channels_last": (not args.no_channels_last) and "config (true)",
                     "torch_threads": args.threads or "default", "malloc": args.malloc,
                     "trainer": "diffmis.training.train, per-step images_per_s from metrics.jsonl",
                     "hidiff_step": "refiner step + segmentor step (pretrain_steps=0)",
                     "pd_ddpm_step": "denoiser + pre-segmentation net trained together (train.prior_run unset)"},
        "results": rows,
        "environment": env,
        "load": mon.summary(),
    }
    print(json.dumps(result["load"]))
    if args.quick:
        print("quick run: no result file written")
        return
    write_result(args.out, result)


if __name__ == "__main__":
    main()
