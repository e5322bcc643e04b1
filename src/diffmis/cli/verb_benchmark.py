"""``diffmis benchmark CONFIG.yaml [--set k=v ...]``: training and prediction speed of a config on this machine.

Synthetic data of the config's working size (no dataset needed), the real trainer and predictor; prints a
summary and writes JSON with the machine record (``--out``). The quality benchmarks on real data live in the
source tree's ``benchmarks/`` (docs/benchmarks.md)."""

from __future__ import annotations

import argparse

from diffmis.cli.commands import add_threads_argument, nonnegative_int, positive_int
import json
from pathlib import Path

HELP = "training and prediction speed of a config on this machine (JSON out)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (e.g. configs/medsegdiff_kvasir.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set sample.ensemble=1")
    p.add_argument("--steps", type=positive_int, default=5, help="timed optimizer steps (default 5)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="optimizer steps left out of the timing (default 2)")
    p.add_argument("--size", type=positive_int, default=None, help="square working size (default: the config's)")
    p.add_argument("--batch", type=positive_int, default=None, help="training batch (default: the config's)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32", "config"), default="auto",
                   help="training/prediction precision (default auto: what this machine would choose; 'config': "
                        "the config's train.precision)")
    p.add_argument("--predict-images", type=positive_int, default=4, help="images timed at prediction (default 4)")
    add_threads_argument(p)
    p.add_argument("--out", default=None, metavar="FILE", help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    from diffmis.benchmarking import speed_profile

    precision = None if args.precision == "config" else args.precision
    res = speed_profile(args.config, tuple(args.overrides), steps=args.steps, warmup=args.warmup, size=args.size,
                        batch=args.batch, precision=precision, predict_images=args.predict_images)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    return 0
