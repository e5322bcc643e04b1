"""Allocator settings compared on one small diffmis training run: glibc default, the CLI's glibc tuning, the
in-process mallopt form, jemalloc and tcmalloc (LD_PRELOAD, where installed).

Each run is a fresh subprocess (allocator variables are read at process start) that calls the real trainer,
``diffmis.training.train``, on the ``configs/<recipe>_kvasir.yaml`` networks with synthetic data (no decoding in
the measurement): by default MedSegDiff at 64x64, batch 8, 20 optimizer steps, precision auto (what this CPU
resolves, recorded). Settings alternate (the order rotates every repeat) and every setting runs ``--repeats``
times, with diffmis's default threads (``--threads``). Measured per run: the median step time after
``--warmup`` steps (from the trainer's per-step ``images_per_s`` in metrics.jsonl), the whole subprocess wall time
(start-up and imports included), peak RSS and minor page faults. Speed-ups against ``default`` are taken repeat by repeat.

Writes ``benchmarks/results/malloc.json``. The machine may be shared: run it under the benchmark lock,

    flock /tmp/diffmis-bench.lock .venv/bin/python benchmarks/malloc.py
    .venv/bin/python benchmarks/malloc.py --quick      # smoke test: 32x32, 4 steps, 1 repeat, no file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffmis.hardware import resolve_precision  # noqa: E402
from common import (  # noqa: E402
    MALLOC_SETTINGS,
    RESULTS,
    ROOT,
    CpuMonitor,
    available_malloc_settings,
    environment,
    malloc_env,
    peak_rss_mib,
    stats,
    write_result,
)

OUT = RESULTS / "malloc.json"


def worker(args: argparse.Namespace) -> None:
    """One training run in this process; prints one JSON line."""
    t_proc = time.time()
    if args.worker == "mallopt":
        from diffmis.utils import tune_malloc

        assert tune_malloc(), "mallopt is not available"
    import torch

    from diffmis.hardware import set_threads

    set_threads(args.threads or None)
    from diffmis.config import load_config
    from diffmis.training import train

    cfg = load_config(ROOT / "configs" / f"{args.recipe}_kvasir.yaml", [
        "data.kind=synthetic", "data.root=null", f"data.image_size={args.size}", "data.augment.prob=0",
        f"data.synthetic.n_train={max(16, args.batch * 4)}", f"model.params.image_size={args.size}",
        f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.log_every=1",
        "train.val_every=0", "train.ckpt_every=0", "train.progress=false", "train.pretrain_steps=0",
        f"train.precision={args.precision}", "train.channels_last=auto",
    ] if args.recipe != "segmentor" else [])
    with tempfile.TemporaryDirectory(prefix="diffmis-malloc-") as tmp:
        res = train(cfg, Path(tmp) / "run", log=lambda s: None)
        lines = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [args.batch / r["images_per_s"] for r in lines if r.get("phase") == "train" and r["step"] > args.warmup]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "step_s": statistics.median(steps), "steps_timed": len(steps), "loop_s": res.seconds,
        "process_s": time.time() - t_proc, "peak_rss_mib": peak_rss_mib(), "minor_faults": ru.ru_minflt,
        "major_faults": ru.ru_majflt, "torch_threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "ld_preload": os.environ.get("LD_PRELOAD"),
    }))


def run_one(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, "--recipe", args.recipe,
           "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--precision", args.precision, "--threads", str(args.threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=malloc_env(setting), cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=None, choices=MALLOC_SETTINGS,
                   help="default: every available one")
    p.add_argument("--recipe", default="medsegdiff")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median step time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="default auto: what this machine resolves (recorded)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0, the default: diffmis's default, the usable cores)")
    p.add_argument("--quick", action="store_true", help="32x32, 4 steps (2 warm-up), 1 repeat; no result file")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.size, args.steps, args.warmup, args.repeats = 32, 4, 2, 1
    settings = args.settings or available_malloc_settings()
    missing = sorted(set(MALLOC_SETTINGS) - set(available_malloc_settings()))
    env = environment()
    mon = CpuMonitor()
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = settings[rep % len(settings):] + settings[:rep % len(settings)]
        for s in order:
            r = run_one(s, args)
            mon.sample()
            runs.append({"setting": s, "repeat": rep, **r})
            print(f"repeat {rep} {s:9s} step {r['step_s'] * 1000:7.1f} ms  process {r['process_s']:6.1f} s  "
                  f"rss {r['peak_rss_mib']:7.0f} MiB  minor faults {r['minor_faults']:>9d}", flush=True)
    summary: dict[str, Any] = {}
    for s in settings:
        mine = [r for r in runs if r["setting"] == s]
        base = {r["repeat"]: r for r in runs if r["setting"] == "default"}
        summary[s] = {
            "step_s": stats([r["step_s"] for r in mine]),
            "images_per_s_median": round(args.batch / statistics.median(r["step_s"] for r in mine), 2),
            "process_s": stats([r["process_s"] for r in mine], 2),
            "peak_rss_mib": stats([r["peak_rss_mib"] for r in mine], 0),
            "minor_faults": stats([r["minor_faults"] for r in mine], 0),
        }
        if base and s != "default":
            ratios = [base[r["repeat"]]["step_s"] / r["step_s"] for r in mine if r["repeat"] in base]
            summary[s]["speedup_vs_default"] = stats(ratios, 3)
    result = {
        "benchmark": "malloc",
        "workload": {"trainer": "diffmis.training.train", "recipe": args.recipe,
                     "networks": f"configs/{args.recipe}_kvasir.yaml", "data": "synthetic (no decoding)",
                     "size": args.size, "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup,
                     "precision": args.precision, "channels_last": "auto",
                     "resolved": resolve_precision(args.precision, "auto", "cpu").record(),
                     "repeats": args.repeats, "order": "alternating, rotated every repeat",
                     "torch_threads": args.threads or "default"},
        "settings": {s: {k: v for k, v in malloc_env(s, {}).items() if k in ("GLIBC_TUNABLES", "LD_PRELOAD")}
                     for s in settings},
        "not_available": missing,
        "summary": summary,
        "runs": runs,
        "environment": env,
        "load": mon.summary(),
    }
    print(json.dumps({"summary": {s: {"step_ms": v["step_s"]["median"] * 1000,
                                      "x_default": v.get("speedup_vs_default", {}).get("median")}
                                  for s, v in summary.items()}, "load": result["load"]}, indent=1))
    if args.quick:
        print("quick run: no result file written")
        return
    write_result(args.out, result)


if __name__ == "__main__":
    main()
