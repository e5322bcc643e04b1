"""``diffmis calibrate --run RUN --input DIR --masks DIR [--fov DIR] [options]``: fit the temperature of a run's
probability maps on held-out images and write it to ``RUN/calibration.json`` (``diffmis.calibration``); later
predictions with the run apply it.

Exit codes: 0 fitted (and written unless ``--dry-run``); 2 nothing could start (missing run, bad option, no
inputs, a mask that does not fit); 1 a case failed to predict (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from diffmis.cli.commands import add_threads_argument, positive_int

HELP = "fit a run's probability temperature on held-out images and masks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--input", required=True,
                   help="held-out images (a file or a folder, as diffmis predict takes them): never training images")
    p.add_argument("--masks", required=True, metavar="DIR", help="their reference masks, by file stem")
    p.add_argument("--fov", metavar="DIR", default=None, help="field-of-view masks by stem: only pixels inside count")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--segmentor-only", action="store_true",
                   help="calibrate the run's segmentor alone (what diffmis predict --segmentor-only writes)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--ensemble", type=positive_int, default=None, help="ensemble members (default: the run's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="network batch (default: the run's)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation, as diffmis predict --tta")
    p.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from diffmis.calibration import CALIBRATION_FILE
    from diffmis.config import load_config
    from diffmis.errors import CheckpointError, InputError
    from diffmis.inference import calibrate_run, find_inputs

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    if not Path(args.masks).is_dir():
        raise InputError(f"--masks {args.masks} is not a folder of reference masks")
    if args.fov is not None and not Path(args.fov).is_dir():
        raise InputError(f"--fov {args.fov} is not a folder of field-of-view masks")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a diffmis run: {run_dir / 'config.yaml'} is missing")
    inputs = find_inputs(args.input, load_config(run_dir / "config.yaml").data.in_channels)
    try:
        rec = calibrate_run(run_dir, inputs, args.masks, args.fov, checkpoint=args.checkpoint,
                            write=not args.dry_run, device=device, steps=args.steps, ensemble=args.ensemble,
                            batch_size=args.batch_size, tta=args.tta, segmentor_only=args.segmentor_only)
    except RuntimeError as e:
        print(f"diffmis calibrate: error: {e}; nothing written", file=sys.stderr)
        return 1
    t = rec["temperature"]
    kind = "sharpens under-confident maps" if t < 1 else ("softens over-confident maps" if t > 1 else "changes nothing")
    print(f"calibrate: temperature {t:.3g} ({kind}) fitted on {rec['n_cases']} case(s), {rec['fit_pixels']} pixels; "
          f"NLL {rec['nll']['t1']:.4f} -> {rec['nll']['fitted']:.4f}, ECE {rec['ece']['t1']:.4f} -> "
          f"{rec['ece']['fitted']:.4f} on these cases; {rec['seconds']:.1f} s")
    print("calibrate: dry run, nothing written" if args.dry_run else
          f"calibrate: written to {run_dir / CALIBRATION_FILE}; diffmis predict applies it "
          f"(--temperature 1 for the raw maps)")
    return 0
