"""The ``diffmis`` console script: one parser, one function per verb."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

# glibc malloc tuning: without it PyTorch on CPU spends much of its time in page faults (see README
# "Performance"). GLIBC_TUNABLES is read at process start, so the CLI re-executes itself once with it set.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=68719476736"


def _maybe_reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
    if sys.platform != "linux" or os.environ.get("DIFFMIS_NO_MALLOC_TUNING") or "GLIBC_TUNABLES" in os.environ:
        return
    if os.environ.get("DIFFMIS_REEXECED"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, DIFFMIS_REEXECED="1")
    try:
        os.execve(sys.executable, [sys.executable, "-m", "diffmis", *argv], env)
    except OSError:
        return




def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    from diffmis import __version__
    from diffmis.cli import commands

    parser = argparse.ArgumentParser(
        prog="diffmis",
        description="Diffusion-based medical image segmentation: MedSegDiff, MedSegDiff-V2, PD-DDPM, HiDiff.",
    )
    parser.add_argument("--version", action="version", version=f"diffmis {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    chosen = argv[0] if argv else None
    for name, (help_text, _issue) in commands.VERB_LIST.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the verb that runs: --help stays fast
            add_args, fn = commands.load_verb(name)
            add_args(p)
            p.set_defaults(func=fn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {"train", "quickstart", "predict", "benchmark"}:
        _maybe_reexec_with_malloc_tuning(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 0
    from diffmis.errors import DiffmisError

    try:
        return int(args.func(args) or 0)
    except DiffmisError as err:
        print(f"diffmis {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffmis {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
