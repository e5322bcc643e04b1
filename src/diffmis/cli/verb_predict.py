"""``diffmis predict --run RUN --input DIR|FILE --output DIR [options]``.

Exit codes: 0 every case written (or already present); 1 some cases failed (each is named, the others are
written); 2 nothing could start (missing run, bad option, no inputs).
"""

from __future__ import annotations

import argparse

from diffmis.cli.commands import add_threads_argument, nonnegative_int, positive_float, positive_int
import sys

HELP = "segment images or volumes with a trained run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="trained run folder (config and weights come from it)")
    p.add_argument("--input", required=True,
                   help="an image (png/jpg/tif/bmp), a NIfTI volume, a DICOM series folder, or a folder of those")
    p.add_argument("--output", required=True,
                   help="output folder: PNG label maps (binary: 0/255; K > 1: class index) or NIfTI masks")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--segmentor-only", action="store_true",
                   help="predict with the run's segmentor alone (HiDiff's prior, PD-DDPM's pre-segmentation, "
                        "MedSegDiff-V2's condition model): one forward pass, to compare a run with its segmentor")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "bernoulli", "bernoulli_ddim", "direct"],
                   help="default: the run's; Gaussian runs take ddim/ddpm, Bernoulli runs bernoulli_ddim/bernoulli")
    p.add_argument("--ensemble", type=positive_int, default=None, help="ensemble members per image, run as one batch")
    p.add_argument("--fuse", choices=["mean", "staple", "mean_squared"], default=None, help="ensemble fusion")
    p.add_argument("--prior", default=None,
                   help="PD-DDPM start: a run folder (e.g. a segmentor) whose masks start the chain, or a folder "
                        "of prior masks named like the outputs (<id>.png / <id>.nii.gz)")
    p.add_argument("--start-step", type=nonnegative_int, default=None,
                   help="PD-DDPM start step T' (1..T); 0 runs the full chain from pure noise")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images / slices / sliding windows per network batch (default: the run's sample.batch_size)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="default: the run's train.precision, resolved for this machine when auto")
    p.add_argument("--prob", action="store_true", help="also write probability maps (prob/<id>.npy)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write uncertainty maps (uncertainty/<id>.npy variance, entropy/<id>.npy in bits)")
    p.add_argument("--overwrite", action="store_true", help="recompute cases whose outputs already exist")
    p.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation: average over the flips of every subset of the spatial axes "
                        "(4 passes per image in 2D, 8 per volume in 3D)")
    p.add_argument("--temperature", type=positive_float, default=None, metavar="T",
                   help="temperature of the probability maps (labels never move); default: the run's "
                        "calibration.json (diffmis calibrate), else its sample.temperature; 1 for the raw maps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from diffmis.errors import InputError
    from diffmis.inference import Predictor, find_inputs, predict_paths

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prior = None
    prior_dir = None
    if args.prior is not None:
        pp = Path(args.prior)
        if (pp / "config.yaml").is_file():
            prior = Predictor.from_run(pp, device=device, ensemble=1, batch_size=args.batch_size)
        elif pp.is_dir():
            prior_dir = pp
        else:
            raise InputError(f"--prior {pp} is neither a run folder nor a folder of prior masks")
    pred = Predictor.from_run(args.run, checkpoint=args.checkpoint, device=device, steps=args.steps,
                              ensemble=args.ensemble, fuse=args.fuse, start_step=args.start_step,
                              sampler=args.sampler, precision=args.precision, batch_size=args.batch_size,
                              prior=prior, seed=args.seed, segmentor_only=args.segmentor_only, tta=args.tta,
                              temperature=args.temperature)
    if prior_dir is not None:
        from diffmis.errors import ConfigError

        if not pred.method.takes_start_step:
            raise ConfigError(f"--prior needs a Gaussian diffusion run; {args.run} is {pred.cfg.experiment.recipe}")
        if pred.start_step is None:
            raise ConfigError("--prior masks need a start step: --start-step (the run has no sample.start_step)")
    if pred.temperature != 1.0:
        source = "--temperature" if args.temperature is not None else pred.temperature_source
        print(f"predict: probability and entropy maps at temperature {pred.temperature:.3g} ({source}); labels "
              f"unchanged (--temperature 1 for the raw maps)", file=sys.stderr)
    inputs = find_inputs(args.input, pred.in_channels)
    s = predict_paths(pred, inputs, args.output, save_prob=args.prob, save_uncertainty=args.uncertainty,
                      overwrite=args.overwrite, prior_dir=prior_dir, progress=not args.no_progress,
                      log=lambda m: print(m, file=sys.stderr))
    timing = (f"; NFE/image {s.nfe_per_image:.0f}, {s.seconds_per_image:.2f} s/image"
              if s.nfe_per_image is not None and s.seconds_per_image is not None else "")
    print(f"predict: {len(s.written)} written, {len(s.skipped)} already present, {len(s.failed)} failed -> "
          f"{args.output}{timing}")
    if s.failed:
        print(f"diffmis predict: error: {len(s.failed)} case(s) failed:", file=sys.stderr)
        for msg in s.failed.values():
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0
