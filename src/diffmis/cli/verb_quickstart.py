"""``diffmis quickstart [--out DIR] [--minutes M]``: the built-in demo (offline, any CPU)."""

from __future__ import annotations

import argparse

from diffmis.cli.commands import add_threads_argument, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="quickstart",
                   help="output folder, default ./quickstart: created, or replaced if a previous quickstart wrote "
                        "it; a non-empty folder of anything else is refused")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="training budget in minutes (default 5): the quickstart times a few steps on this machine "
                        "and sizes its plan to the budget; the whole run takes about a minute more")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="slice size the networks see, a multiple of 32 (default: 96, or 64 on a slow machine)")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from diffmis.quickstart import run_quickstart

    run_quickstart(args.out, minutes=args.minutes, seed=args.seed, image_size=args.image_size)
    return 0
