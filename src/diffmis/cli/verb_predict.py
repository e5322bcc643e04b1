"""``diffmis predict --run RUN --input DIR|FILE --output DIR [options]``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="trained run folder (config and weights come from it)")
    p.add_argument("--input", required=True, help="an image, a NIfTI volume, a DICOM series folder, or a folder")
    p.add_argument("--output", required=True, help="output folder (PNG label maps / NIfTI masks)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "bernoulli", "bernoulli_ddim"])
    p.add_argument("--ensemble", type=int, default=None, help="ensemble members, run as one batch")
    p.add_argument("--fuse", choices=["mean", "staple", "mean_squared"], default=None)
    p.add_argument("--prior", default=None,
                   help="PD-DDPM start: a segmentor run folder, or a folder of prior masks (same stems)")
    p.add_argument("--start-step", type=int, default=None, help="PD-DDPM start step T' (1..T)")
    p.add_argument("--batch-size", type=int, default=None, help="sliding-window batch size")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    p.add_argument("--prob", action="store_true", help="also write probability maps (prob/<id>.npy)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write uncertainty maps (uncertainty/<id>.npy variance, entropy/<id>.npy)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffmis.errors import InputError
    from diffmis.inference import Predictor, find_inputs, predict_paths

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from pathlib import Path

    prior = None
    prior_dir = None
    if args.prior is not None:
        if (Path(args.prior) / "config.yaml").is_file():
            prior = Predictor.from_run(args.prior, device=device, ensemble=1)
        elif Path(args.prior).is_dir():
            prior_dir = Path(args.prior)
        else:
            raise InputError(f"--prior {args.prior} is neither a run folder nor a folder of masks")
    pred = Predictor.from_run(args.run, checkpoint=args.checkpoint, device=device, steps=args.steps,
                              ensemble=args.ensemble, fuse=args.fuse, start_step=args.start_step,
                              sampler=args.sampler, precision=args.precision, batch_size=args.batch_size,
                              prior=prior, seed=args.seed)
    inputs = find_inputs(args.input)
    s = predict_paths(pred, inputs, args.output, save_prob=args.prob, save_uncertainty=args.uncertainty,
                      overwrite=args.overwrite, prior_dir=prior_dir)
    print(f"predict: {len(s.written)} written, {len(s.skipped)} already present, {len(s.failed)} failed -> "
          f"{args.output}" + (f"; NFE/image {s.nfe_per_image:.0f}, {s.seconds_per_image:.2f} s/image"
                              if s.nfe_per_image is not None else ""))
    for sid, msg in s.failed.items():
        print(f"  failed: {msg}")
    return 1 if s.failed else 0
