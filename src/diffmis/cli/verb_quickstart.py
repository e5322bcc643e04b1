"""``diffmis quickstart [--out DIR] [--minutes M]``: the built-in demo (offline, any CPU)."""

from __future__ import annotations

import argparse

from diffmis.cli.commands import add_threads_argument, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder, default ./quickstart: created, or replaced if a previous quickstart wrote "
                        "it; a non-empty folder of anything else is refused")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="training budget in minutes (default 5): the quickstart times a few steps on this machine "
                        "and sizes its plan to the budget; the whole run takes about a minute more")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="slice size the networks see, a multiple of 32 (default: 96, or 64 on a slow machine)")
    p.add_argument("--3d", dest="three_d", action="store_true",
                   help="the volume demo: 3D MNI slabs, HiDiff with 3D networks, sliding-window prediction, "
                        "per-volume scores (default --out ./quickstart3d)")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from diffmis.errors import ConfigError
    from diffmis.quickstart import run_quickstart, run_quickstart_3d

    if args.three_d:
        if args.image_size is not None:
            raise ConfigError("--image-size sizes the 2D quickstart's slices; the 3D quickstart trains on 48x48x16 "
                              "patches (drop --image-size)")
        run_quickstart_3d(args.out or "quickstart3d", minutes=args.minutes, seed=args.seed)
        return 0
    run_quickstart(args.out or "quickstart", minutes=args.minutes, seed=args.seed, image_size=args.image_size)
    return 0
