"""``diffmis train CONFIG.yaml [--set k=v ...] [--out RUN] [--resume]`` (also under torchrun)."""

from __future__ import annotations

import argparse

from diffmis.cli.commands import add_threads_argument, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume: the run's own config is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=2000 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: experiment.output_dir/experiment.name)")
    p.add_argument("--resume", action="store_true", help="continue exactly from RUN/checkpoints/last")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps in this invocation (saving last); resume later")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from diffmis.training import distributed
    from diffmis.training import resolve_run_config, train

    cfg, run_dir = resolve_run_config(args.config, args.out, args.resume, args.overrides)
    try:
        res = train(cfg, run_dir, resume=args.resume, stop_after=args.stop_after)
        main_process = distributed.is_main_process()
    finally:
        distributed.cleanup()
    if main_process:
        msg = f"done: {res.step} steps ({res.stopped}) in {res.seconds:.0f}s -> {res.run_dir}"
        if res.best_dice is not None:
            msg += f"; best val Dice {res.best_dice:.4f}"
        print(msg)
        if cfg.train.calibrate and res.stopped != "stop_after":
            from diffmis.calibration import CALIBRATION_FILE, summary
            from diffmis.inference import calibrate_split

            print(f"{summary(calibrate_split(res.run_dir))} -> {res.run_dir / CALIBRATION_FILE}")
    return 0
