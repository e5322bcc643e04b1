"""``diffmis report --run RUN [--out FILE]``: one self-contained HTML page about a run."""

from __future__ import annotations

import argparse

HELP = "self-contained HTML report of a run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN", help="run folder (config.yaml, metrics.jsonl, eval/...)")
    parser.add_argument("--out", metavar="FILE", help="HTML file to write (default: RUN/report.html)")


def run(args: argparse.Namespace) -> int:
    from diffmis.report import write_report

    path = write_report(args.run, args.out)
    print(f"report: {path.resolve()}")
    return 0
