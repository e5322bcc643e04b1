"""``diffmis data check|prepare``: validate a dataset before training; write the built-in datasets.

Usage::

    diffmis data check DIR [--num-classes K] [--labels V0 V1 ...] [--in-channels C] [--split NAME ...]
                           [--quick] [--workers N] [--json REPORT.json]
    diffmis data check --config CONFIG.yaml [--set data.root=DIR ...]   # settings from the data section
    diffmis data prepare mni-brain OUT
    diffmis data prepare synthetic OUT [--n 64] [--size 64] [--num-classes 1] [--channels 3] [--seed 0]

``check`` prints counts, image sizes and every problem with its file; exit code 0 when clean, 2 otherwise.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from diffmis.cli.commands import positive_int

HELP = "dataset tools: check a dataset, prepare the built-in one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_verb", metavar="SUBVERB", required=True)
    c = sub.add_parser("check", help="validate a dataset folder (folder or nnU-Net raw layout)",
                       description="Decode every file and list every problem with the file it concerns. "
                                   "Exit code 0 when clean, 2 when not.")
    c.add_argument("root", nargs="?", help="dataset folder (default: data.root of --config)")
    c.add_argument("--config", help="take root, num_classes, labels, in_channels from this config's data section")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with --config), e.g. --set data.root=DIR")
    c.add_argument("--num-classes", type=positive_int, default=None,
                   help="K: 1 = binary masks {0,1} or {0,255}; K >= 2 = label maps 0..K-1 "
                        "(default: dataset.json for nnU-Net, else 1)")
    c.add_argument("--labels", type=int, nargs="+", default=None, metavar="V",
                   help="stored mask value of each class, background first (2 values when K = 1)")
    c.add_argument("--in-channels", type=positive_int, default=None, help="expected image channels (default: not checked)")
    c.add_argument("--split", dest="splits", action="append", default=None, metavar="NAME",
                   help="check only this split and its files (repeatable; default: every split and file)")
    c.add_argument("--quick", action="store_true", help="read headers only (what training runs at start)")
    c.add_argument("--workers", type=positive_int, default=None, help="decoding threads (default: cores, at most 8)")
    c.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")

    pr = sub.add_parser("prepare", help="write a built-in dataset in the folder layout")
    which = pr.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    m = which.add_parser("mni-brain", help="grey/white matter on axial MNI152 template slices (offline)")
    m.add_argument("out", help="output folder")
    s = which.add_parser("synthetic", help="textured shapes with noise (fast tests)")
    s.add_argument("out", help="output folder")
    s.add_argument("--n", type=positive_int, default=64, help="number of samples")
    s.add_argument("--size", type=positive_int, nargs="+", default=[64], help="H [W] in pixels")
    s.add_argument("--num-classes", type=positive_int, default=1, help="K: 1 = binary, >= 2 = label maps")
    s.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels")
    s.add_argument("--seed", type=int, default=0)


def _check(args: argparse.Namespace) -> int:
    from diffmis.data import check_dataset
    from diffmis.errors import InputError
    from diffmis.utils import write_json

    root, num_classes, labels, in_channels = args.root, args.num_classes, args.labels, args.in_channels
    if args.config:
        from diffmis.config import load_config

        data = load_config(args.config, args.overrides).data
        root = root or data.root
        num_classes = num_classes if num_classes is not None else data.num_classes
        labels = labels if labels is not None else data.labels
        in_channels = in_channels if in_channels is not None else data.in_channels
    elif args.overrides:
        raise InputError("--set needs --config")
    if not root:
        raise InputError("give a dataset folder, or --config with data.root set")
    report = check_dataset(root, num_classes=num_classes, labels=labels, splits=args.splits,
                           in_channels=in_channels, full=not args.quick, workers=args.workers)
    print(report.summary())
    if args.json:
        write_json(args.json, asdict(report) | {"ok": report.ok})
    return 0 if report.ok else 2


def _prepare(args: argparse.Namespace) -> int:
    from diffmis.data import write_mni, write_synthetic

    if args.dataset == "mni-brain":
        out = write_mni(args.out)
        print(f"wrote the MNI brain set to {out}; check it with: diffmis data check {out} --num-classes 3")
        return 0
    size = (args.size[0], args.size[-1])
    out = write_synthetic(args.out, args.n, size, args.num_classes, args.channels, args.seed)
    print(f"wrote {args.n} synthetic samples to {out}; check it with: diffmis data check {out} "
          f"--num-classes {args.num_classes}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _check(args) if args.data_verb == "check" else _prepare(args)
