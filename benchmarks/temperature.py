"""How much of a row's calibration error is over- or under-confidence: one temperature per row, fitted on the
tuning split's probability maps, then applied to the evaluation split's maps of the same recipe
(``diffmis.calibration``, which ``diffmis calibrate`` uses on a run).

Reads the probability maps (``pred/<row>/prob/*.npy``) and reference masks that ``benchmarks/quality.py`` left in
its work folder, so the rows must have been predicted there first (``--split tune`` for the fit, the default split
for the check). A temperature ``T`` rescales the fused probability without changing any label:

    K = 1:  p' = sigmoid(logit(p) / T)          K > 1:  p' = softmax(log(p / sum_k p_k) / T)

``T`` minimises the negative log-likelihood of the tuning split's pixels (a grid of 121 values, 0.05 to 5, log
spaced); the ECE (top label, 10 bins, pixels pooled, DRIVE inside the FOV: ``benchmarks/quality.py``'s) is
reported at ``T = 1`` and at the fitted ``T`` on both splits. ``T < 1`` sharpens an under-confident map.

This is an analysis of two runs (the fit from the tuning run, the check on the evaluation run): does a
temperature carry over? The quality rows are the raw ensembles' and softmaxes', except the ``calibrated`` rows
(``quality.py --calibrate``), where each run fits its own temperature on held-out images.

    python benchmarks/temperature.py --dataset mni --pairs hidiff@segref:hidiff@default \\
        segmentor@default:segmentor@default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_result  # noqa: E402
from quality import EVAL_SPLIT  # noqa: E402

from diffmis.calibration import GRID, Case, calibration_ece, fit_temperature, temperature_nll  # noqa: E402
from diffmis.inference import load_cases  # noqa: E402


def load(work: Path, split: str, row: str) -> list[Case]:
    """``(prob, target, fov)`` per case of a row that quality.py predicted into ``work``."""
    prob_dir, refs = work / "pred" / row / "prob", work / f"refs_{split}"
    if not prob_dir.is_dir():
        raise SystemExit(f"no probability maps in {prob_dir}: predict row '{row}' with benchmarks/quality.py "
                         f"(--work {work.parent}) first")
    return load_cases(prob_dir, refs / "masks", (refs / "fov") if (refs / "fov").is_dir() else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(EVAL_SPLIT), required=True)
    ap.add_argument("--pairs", nargs="+", required=True, metavar="TUNE_ROW[:EVAL_ROW]",
                    help="a row predicted on the tuning split (fit), and optionally the same recipe's row on the "
                         "evaluation split (check)")
    ap.add_argument("--work", default="/tmp/diffmis_quality", help="quality.py's --work")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    for pair in args.pairs:
        tune_row, _, eval_row = pair.partition(":")
        tune = load(Path(args.work) / f"{args.dataset}_tune", "val", tune_row)
        t = fit_temperature(tune)
        row: dict[str, Any] = {"tune_row": tune_row, "temperature": t,
                               "tune": {"ece_t1": calibration_ece(tune, 1.0), "ece_fitted": calibration_ece(tune, t),
                                        "nll_t1": temperature_nll(tune, 1.0), "nll_fitted": temperature_nll(tune, t),
                                        "n_cases": len(tune)}}
        if eval_row:
            split = EVAL_SPLIT[args.dataset]
            ev = load(Path(args.work) / args.dataset, split, eval_row)
            row["eval_row"] = eval_row
            row["eval"] = {"split": split, "ece_t1": calibration_ece(ev, 1.0), "ece_fitted": calibration_ece(ev, t),
                           "nll_t1": temperature_nll(ev, 1.0), "nll_fitted": temperature_nll(ev, t),
                           "n_cases": len(ev)}
        rows[pair] = row
        e = row.get("eval", {})
        print(f"{pair}: T {t:.3g}; tune ECE {row['tune']['ece_t1']:.4f} -> {row['tune']['ece_fitted']:.4f}"
              + (f"; {e['split']} ECE {e['ece_t1']:.4f} -> {e['ece_fitted']:.4f}" if e else ""), flush=True)
    cmd = "python benchmarks/temperature.py " + " ".join(sys.argv[1:])
    write_result(RESULTS / f"temperature_{args.dataset}.json",
                 {"benchmark": "temperature", "dataset": args.dataset, "grid": [float(GRID[0]), float(GRID[-1]),
                                                                               len(GRID)],
                  "command": cmd, "rows": rows, "environment": environment()})


if __name__ == "__main__":
    main()
