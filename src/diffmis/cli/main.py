"""The ``diffmis`` console script: one parser, one function per verb."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

# glibc malloc tuning: with glibc's defaults PyTorch on CPU spends much of its time in page faults (every large
# buffer is mmapped and returned). mallopt() at start keeps freed memory in the heap: measured as fast as
# GLIBC_TUNABLES set before start (benchmarks/results/malloc.json), without re-executing the process.


def _tune_allocator() -> None:
    if os.environ.get("DIFFMIS_NO_MALLOC_TUNING") or "GLIBC_TUNABLES" in os.environ:
        return
    from diffmis.allocator import tune_malloc

    if tune_malloc():
        os.environ["DIFFMIS_MALLOC_TUNED"] = "1"  # recorded by diffmis.hardware.machine_record


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
    for name, help_text in commands.VERB_LIST.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the verb that runs: --help stays fast
            add_args, fn = commands.load_verb(name)
            add_args(p)
            p.set_defaults(func=fn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _tune_allocator()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 0
    from diffmis.errors import DiffmisError

    try:
        if hasattr(args, "threads"):  # verbs that run networks: threads = usable cores unless --threads says
            from diffmis.hardware import set_threads

            choice = set_threads(args.threads)
            if choice.threads < choice.usable and not choice.explicit:
                print(f"diffmis {args.verb}: {choice.describe()} (--threads N to choose)", file=sys.stderr)
        return int(args.func(args) or 0)
    except DiffmisError as err:
        signum = getattr(err, "signum", None)  # training stopped by SIGTERM/SIGUSR1 after saving
        print(f"diffmis {args.verb}: {'stopped' if signum else 'error'}: {err}", file=sys.stderr)
        return 128 + signum if signum else 2
    except OSError as err:  # an output (or input) path that cannot be used: one sentence naming it
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        why = err.strerror or str(err)
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            why += " (a file stands where a folder is needed; choose another path or move the file)"
        elif isinstance(err, PermissionError):
            why += " (choose a path you may write to)"
        print(f"diffmis {args.verb}: error: cannot use{where}: {why}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffmis {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
