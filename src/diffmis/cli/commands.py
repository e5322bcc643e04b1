"""Verb table: each verb lives in its own module ``diffmis.cli.verb_<name>`` with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their verb runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

VerbFn = Callable[[argparse.Namespace], int]

# verb -> (help, issue that brings it if its module is missing)
VERB_LIST: dict[str, tuple[str, int]] = {
    "quickstart": ("train, predict, evaluate and report on the built-in MNI brain set (CPU, minutes)", 6),
    "train": ("train a method from a YAML config", 5),
    "predict": ("segment images or volumes with a trained run", 6),
    "evaluate": ("metrics of predicted masks against reference masks", 6),
    "report": ("self-contained HTML report of a run", 6),
    "benchmark": ("speed and quality measurements (JSON out)", 7),
    "data": ("dataset tools: check a dataset, prepare the built-in one", 2),
}


def _not_yet(issue: int, what: str) -> VerbFn:
    def run(_: argparse.Namespace) -> int:
        print(f"diffmis: '{what}' is not implemented yet; it arrives with issue #{issue}.", file=sys.stderr)
        return 3

    return run


def load_verb(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], VerbFn]:
    """Return (add_arguments, run) of a verb, or a placeholder naming the issue that brings it."""
    try:
        mod = importlib.import_module(f"diffmis.cli.verb_{name}")
    except ModuleNotFoundError as err:
        if err.name != f"diffmis.cli.verb_{name}":
            raise
        return (lambda p: p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)), _not_yet(
            VERB_LIST[name][1], name
        )
    return mod.add_arguments, mod.run
