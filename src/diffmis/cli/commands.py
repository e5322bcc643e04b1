"""Verb definitions: each verb adds its arguments and has a run function that calls the library."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

VerbFn = Callable[[argparse.Namespace], int]


def _not_yet(issue: int, what: str) -> VerbFn:
    def run(_: argparse.Namespace) -> int:
        print(f"diffmis: '{what}' is not implemented yet; it arrives with issue #{issue}.", file=sys.stderr)
        return 3

    return run


def _no_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], VerbFn]] = {
    "quickstart": ("train, predict, evaluate and report on the built-in MNI brain set (CPU, minutes)", _no_args,
                   _not_yet(6, "quickstart")),
    "train": ("train a method from a YAML config", _no_args, _not_yet(5, "train")),
    "predict": ("segment images/volumes with a trained run", _no_args, _not_yet(6, "predict")),
    "evaluate": ("metrics of predicted masks against references", _no_args, _not_yet(6, "evaluate")),
    "report": ("self-contained HTML report of a run", _no_args, _not_yet(6, "report")),
    "benchmark": ("speed and quality measurements (JSON out)", _no_args, _not_yet(7, "benchmark")),
    "data": ("dataset tools: check, prepare", _no_args, _not_yet(2, "data")),
}
