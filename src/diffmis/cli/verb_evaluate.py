"""``diffmis evaluate``: metrics of predicted masks against reference masks (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from diffmis.cli.commands import positive_int

HELP = "metrics of predicted masks against reference masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR", help="predicted label maps (PNG/TIFF or NIfTI)")
    parser.add_argument("--ref", required=True, metavar="DIR", help="reference label maps with the same file stems")
    parser.add_argument("--out", metavar="FILE", help="summary JSON (default: PRED/summary.json)")
    parser.add_argument("--csv", metavar="FILE", help="also write one row per case and class to this CSV")
    parser.add_argument("--fov", metavar="DIR", help="field-of-view masks by stem: only pixels inside count")
    parser.add_argument("--prob", metavar="DIR", help="probability maps (.npy, (H,W) or (K,H,W)) by stem: adds ECE")
    parser.add_argument(
        "--labels", type=positive_int, metavar="N", help="labels are 0..N-1, background included (default: from the references)"
    )
    parser.add_argument(
        "--spacing", type=float, nargs="+", metavar="S",
        help="pixel/voxel size per axis, or one value for all (default: NIfTI header, 1 for 2D images)",
    )
    parser.add_argument("--images", metavar="DIR", help="images by stem, recorded per case for the report")
    parser.add_argument("--uncertainty", metavar="DIR",
                        help="uncertainty maps (.npy) by stem: scored as an error detector (AUROC), shown in the report")
    parser.add_argument(
        "--lenient", action="store_true",
        help="also report the MedSegDiff authors' lenient multi-threshold Dice/IoU (needs --prob; not comparable)",
    )
    parser.add_argument("--bins", type=positive_int, default=10, metavar="N", help="reliability bins for ECE (default 10)")


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def run(args: argparse.Namespace) -> int:
    from diffmis.evaluation import evaluate_folders

    result = evaluate_folders(
        args.pred,
        args.ref,
        num_classes=args.labels,
        fov_dir=args.fov,
        prob_dir=args.prob,
        images_dir=args.images,
        uncertainty_dir=args.uncertainty,
        spacing=args.spacing,
        lenient=args.lenient,
        n_bins=args.bins,
    )
    out = Path(args.out) if args.out else Path(args.pred) / "summary.json"
    result.write_summary(out)
    if args.csv:
        result.write_csv(args.csv)

    names = result.metric_names
    print(f"{'class':<12}" + "".join(f"{m:>14}" for m in names))
    for k, row in result.mean.items():
        print(f"{k:<12}" + "".join(f"{_fmt(row[m]):>14}" for m in names))
    if len(result.classes) > 1:
        fg = result.foreground_mean
        print(f"{'foreground':<12}" + "".join(f"{_fmt(fg[m]):>14}" for m in names))
    if result.error_detection is not None:
        det = result.error_detection
        print(f"error detection by the uncertainty: AUROC {_fmt(det['auroc'])} ({det['n_errors']} wrong of "
              f"{det['n_pixels']} pixels)")
    print(f"convention: {result.options['convention']}")
    print(f"{len(result.cases)} cases; summary: {out}" + (f"; per case: {args.csv}" if args.csv else ""))
    for path in result.extra:
        print(f"diffmis evaluate: warning: prediction without a reference, not scored: {path}", file=sys.stderr)
    if result.missing:
        print(
            f"diffmis evaluate: error: {len(result.missing)} case(s) of {args.ref} have no prediction in {args.pred} "
            f"(scored as failures, Dice 0): {', '.join(result.missing)}",
            file=sys.stderr,
        )
        return 1
    return 0
