"""Verb table: each verb lives in its own module ``diffmis.cli.verb_<name>`` with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their verb runs."""

from __future__ import annotations

import argparse
import importlib
from typing import Callable

VerbFn = Callable[[argparse.Namespace], int]

# verb -> one-line help (shown by ``diffmis --help``)
VERB_LIST: dict[str, str] = {
    "quickstart": "train, predict, evaluate and report on the built-in MNI brain set (CPU, minutes)",
    "train": "train a method from a YAML config",
    "predict": "segment images or volumes with a trained run",
    "calibrate": "fit a run's probability temperature on held-out images and masks",
    "evaluate": "metrics of predicted masks against reference masks",
    "report": "self-contained HTML report of a run",
    "benchmark": "training and prediction speed of a config on this machine (JSON out)",
    "data": "dataset tools: check a dataset, prepare the built-in one",
}


def load_verb(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], VerbFn]:
    """Return (add_arguments, run) of a verb."""
    mod = importlib.import_module(f"diffmis.cli.verb_{name}")
    return mod.add_arguments, mod.run


def _int_at_least(lo: int, text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the message names the value)."""
    return _int_at_least(1, text)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (the message names the value)."""
    return _int_at_least(0, text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (the message names the value)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch threads (default: the cores this process may use, diffmis.hardware)."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads (default: the cores this process may use: CPU affinity and cgroup quota)")
