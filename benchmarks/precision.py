"""Precision and layout on this CPU: what ``precision: auto`` picks against the explicit choices.

Runs ``diffmis benchmark CONFIG --size S`` (the real trainer and predictor on synthetic data) as separate processes,
one variant after the other, in ``--rounds`` rounds with the variant order rotated each round (adjacent runs see the
same machine state), after one discarded warm-up run. Variants:

* ``auto``: the default (``--precision auto``; channels_last auto);
* ``fp32``, ``bf16``: explicit precision, channels_last auto;
* ``fp32_nchw``, ``fp32_cl``, ``bf16_nchw``, ``bf16_cl``: explicit precision and layout (what auto's layout rule
  is chosen from);
* with ``--emulate-avx2``: ``avx2_fp32`` and ``avx2_bf16``, the same with oneDNN and ATen capped to AVX2
  (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``): how a CPU without native bf16 fares (emulated bf16);
  ``auto`` resolves to fp32 there.

Writes ``benchmarks/results/precision.json`` (or ``--out``): per variant the median training step and prediction
time over the rounds, the resolved precision of ``auto``, and the acceptance check "auto within 15% of the faster
of fp32 and bf16" for training and prediction.

    .venv/bin/python benchmarks/precision.py                       # hidiff_mni at 96, 3 rounds
    .venv/bin/python benchmarks/precision.py --emulate-avx2        # + the AVX2-capped variants
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, CpuMonitor, environment, write_result  # noqa: E402

AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
VARIANTS: dict[str, dict[str, Any]] = {
    "auto": {"precision": "auto", "cl": None},
    "fp32": {"precision": "fp32", "cl": None},
    "bf16": {"precision": "bf16", "cl": None},
    "fp32_nchw": {"precision": "fp32", "cl": False},
    "fp32_cl": {"precision": "fp32", "cl": True},
    "bf16_nchw": {"precision": "bf16", "cl": False},
    "bf16_cl": {"precision": "bf16", "cl": True},
    "avx2_auto": {"precision": "auto", "cl": None, "env": AVX2_CAP},
    "avx2_bf16": {"precision": "bf16", "cl": None, "env": AVX2_CAP},
}


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    v = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="diffmis-precision-") as tmp:
        out = Path(tmp) / "r.json"
        cmd = [str(ROOT / ".venv" / "bin" / "diffmis"), "benchmark", args.config, "--size", str(args.size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--predict-images", str(args.images),
               "--precision", v["precision"], "--out", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if v["cl"] is not None:
            cmd += ["--set", f"train.channels_last={str(v['cl']).lower()}"]
        env = {**os.environ, **v.get("env", {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        res = json.loads(out.read_text())
    return {"train_step_s": res["train"]["step_s_median"], "predict_s_per_image": res["predict"]["seconds_per_image"],
            "precision": res["settings"]["precision"], "channels_last": res["settings"]["channels_last"],
            "reason": res["settings"]["precision_reason"], "threads": res["machine"]["torch_threads"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="hidiff_mni")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images", type=int, default=4, help="timed prediction images per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: diffmis's (the usable cores)")
    p.add_argument("--emulate-avx2", action="store_true", help="also run the AVX2-capped variants")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = p.parse_args()
    names = args.variants or [n for n in VARIANTS if args.emulate_avx2 or not n.startswith("avx2")]
    monitor = CpuMonitor()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    run_variant(names[0], args)  # warm-up, discarded: the first process after a pause starts cold
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            res = run_variant(name, args)
            runs[name].append(res)
            print(f"round {r + 1}: {name:<10} train {res['train_step_s']:.3f} s/step  predict "
                  f"{res['predict_s_per_image']:.3f} s/image  ({res['precision']}, cl={res['channels_last']})",
                  flush=True)
            monitor.sample()
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {"train_step_s": round(statistics.median(x["train_step_s"] for x in rs), 4),
                         "predict_s_per_image": round(statistics.median(x["predict_s_per_image"] for x in rs), 4),
                         "precision": rs[0]["precision"], "channels_last": rs[0]["channels_last"],
                         "reason": rs[0]["reason"], "runs": rs}
    check: dict[str, Any] = {}
    if {"auto", "fp32", "bf16"} <= set(summary):
        for key in ("train_step_s", "predict_s_per_image"):
            best = min(summary["fp32"][key], summary["bf16"][key])
            check[key] = {"auto": summary["auto"][key], "best_explicit": best,
                          "auto_over_best": round(summary["auto"][key] / best, 3),
                          "within_15pct": summary["auto"][key] <= 1.15 * best}
    if {"avx2_auto", "avx2_bf16"} <= set(summary):
        a, b = summary["avx2_auto"], summary["avx2_bf16"]
        check["emulated_bf16_cost"] = {"train": round(b["train_step_s"] / a["train_step_s"], 1),
                                       "predict": round(b["predict_s_per_image"] / a["predict_s_per_image"], 1)}
    write_result(args.out, {
        "benchmark": "precision", "command": "python benchmarks/precision.py " + " ".join(sys.argv[1:]),
        "settings": {"config": args.config, "size": args.size, "steps": args.steps, "warmup": args.warmup,
                     "images": args.images, "rounds": args.rounds, "threads": args.threads,
                     "order": "variants rotated every round; separate processes"},
        "results": summary, "check": check, "environment": environment(), "load": monitor.summary()})
    for key, c in check.items():
        print(key, c)


if __name__ == "__main__":
    main()
