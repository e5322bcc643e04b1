"""Threads under contention: how a training step and prediction slow down when another process holds a core.

Competitors: ``none``; ``spin``, a pure-Python busy loop at ``nice -n 19``; ``torch``, a one-thread torch
matrix-multiply loop at normal priority, like a second training job. diffmis settings: torch threads 1, all usable
cores (with OpenMP waiting ``active``, libgomp's default spin-then-sleep, or ``passive``,
``OMP_WAIT_POLICY=PASSIVE``), and diffmis's default (``--threads`` not given: the usable cores less those other
processes keep busy at start). For each pair, one ``diffmis benchmark CONFIG --size S`` process runs while the
competitor runs, and its median training step and prediction time are recorded; the competitor starts before and
is killed after. Settings alternate within a round; ``--rounds`` rounds.

Writes ``benchmarks/results/threads.json``: per setting and competitor the median times, and the slowdown against
the same setting without a competitor. The default diffmis uses (docs/benchmarks.md) is chosen from it.

    .venv/bin/python benchmarks/threads.py                 # hidiff_mni at 96, 1 round
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
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, CpuMonitor, environment, write_result  # noqa: E402

COMPETITORS = {
    "none": None,
    "spin": ["nice", "-n", "19", sys.executable, "-c", "while True: pass"],
    "torch": [sys.executable, "-c",
              "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a = (a @ a).tanh()"],
}


DESCRIPTIONS = {"none": None, "spin": "a pure-Python busy loop at nice -n 19",
                "torch": "a one-thread torch 512x512 matmul loop at normal priority"}


def run_setting(threads: Optional[int], wait: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="diffmis-threads-") as tmp:
        out = Path(tmp) / "r.json"
        cmd = [str(ROOT / ".venv" / "bin" / "diffmis"), "benchmark", args.config, "--size", str(args.size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--predict-images", str(args.images),
               "--out", str(out)] + (["--threads", str(threads)] if threads else [])
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if wait == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        res = json.loads(out.read_text())
    return {"train_step_s": res["train"]["step_s_median"], "predict_s_per_image": res["predict"]["seconds_per_image"],
            "wall_s": round(wall, 1), "precision": res["settings"]["precision"],
            "torch_threads": res["machine"]["torch_threads"]}


def main() -> None:
    from diffmis.hardware import usable_cores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="hidiff_mni")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--competitors", nargs="+", default=list(COMPETITORS), choices=list(COMPETITORS))
    p.add_argument("--out", type=Path, default=RESULTS / "threads.json")
    args = p.parse_args()
    cores = usable_cores()
    # (threads, wait): one thread, all cores (libgomp's default waiting and passive), and diffmis's default
    settings: list[tuple[Optional[int], str]] = [(1, "active"), (cores, "active"), (cores, "passive"), (None, "active")]
    monitor = CpuMonitor()
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in range(args.rounds):
        for comp in args.competitors:
            order = settings[r % len(settings):] + settings[:r % len(settings)]
            for threads, wait in order:
                proc: Optional[subprocess.Popen] = None
                if COMPETITORS[comp] is not None:
                    proc = subprocess.Popen(COMPETITORS[comp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                try:
                    res = run_setting(threads, wait, args)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
                key = f"threads={threads or 'default'},{wait}"
                rows.setdefault(key, {}).setdefault(comp, []).append(res)
                print(f"round {r + 1} competitor={comp:<6} {key:<18} train {res['train_step_s']:.3f} s/step  "
                      f"predict {res['predict_s_per_image']:.3f} s/image  wall {res['wall_s']} s", flush=True)
                monitor.sample()
    summary: dict[str, Any] = {}
    for key, by_comp in rows.items():
        summary[key] = {}
        for comp, rs in by_comp.items():
            summary[key][comp] = {"train_step_s": round(statistics.median(x["train_step_s"] for x in rs), 4),
                                  "predict_s_per_image": round(statistics.median(x["predict_s_per_image"] for x in rs), 4),
                                  "runs": rs}
        base = summary[key].get("none")
        for comp, v in summary[key].items():
            if base and comp != "none":
                v["train_slowdown"] = round(v["train_step_s"] / base["train_step_s"], 2)
                v["predict_slowdown"] = round(v["predict_s_per_image"] / base["predict_s_per_image"], 2)
    write_result(args.out, {
        "benchmark": "threads", "command": "python benchmarks/threads.py " + " ".join(sys.argv[1:]),
        "settings": {"config": args.config, "size": args.size, "steps": args.steps, "warmup": args.warmup,
                     "images": args.images, "rounds": args.rounds, "usable_cores": cores,
                     "competitors": {k: v for k, v in DESCRIPTIONS.items() if k in args.competitors}},
        "results": summary, "environment": environment(), "load": monitor.summary()})


if __name__ == "__main__":
    main()
