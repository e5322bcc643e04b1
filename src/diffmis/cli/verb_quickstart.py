"""``diffmis quickstart [--out DIR] [--minutes M]``: the built-in demo (offline, CPU)."""

from __future__ import annotations

import argparse

from diffmis.cli.commands import add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="quickstart", help="output folder (replaced), default ./quickstart")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="training budget in minutes: more gives better masks (default 5; the whole run "
                        "takes about 2 minutes more)")
    p.add_argument("--image-size", type=int, default=96, help="slice size the networks see (default 96)")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from diffmis.quickstart import run_quickstart

    run_quickstart(args.out, minutes=args.minutes, seed=args.seed, image_size=args.image_size)
    return 0
