"""How much of a row's calibration error is over- or under-confidence: one temperature per row, fitted on the
tuning split's probability maps, then applied to the evaluation split's maps of the same recipe.

Reads the probability maps (``pred/<row>/prob/*.npy``) and reference masks that ``benchmarks/quality.py`` left in
its work folder, so the rows must have been predicted there first (``--split tune`` for the fit, the default split
for the check). A temperature ``T`` rescales the fused probability without changing any label:

    K = 1:  p' = sigmoid(logit(p) / T)          K > 1:  p' = softmax(log(p / sum_k p_k) / T)

``T`` minimises the negative log-likelihood of the tuning split's pixels (a grid of 121 values, 0.05 to 5, log
spaced); the ECE (top label, 10 bins, pixels pooled, DRIVE inside the FOV: ``benchmarks/quality.py``'s) is
reported at ``T = 1`` and at the fitted ``T`` on both splits. ``T < 1`` sharpens an under-confident map.

This is an analysis, not a recipe setting: no shipped config applies a temperature, and the quality rows are
the raw ensembles' and softmaxes'.

    python benchmarks/temperature.py --dataset mni --pairs hidiff@segref:hidiff@default \\
        segmentor@default:segmentor@default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_result  # noqa: E402
from quality import EVAL_SPLIT  # noqa: E402

from diffmis.data import LABEL_SUFFIXES  # noqa: E402
from diffmis.evaluation import index_files, read_scored_labels  # noqa: E402
from diffmis.masks import one_hot  # noqa: E402
from diffmis.metrics import calibration  # noqa: E402

GRID = np.geomspace(0.05, 5.0, 121)
EPS = 1e-7


def temper(prob: np.ndarray, temperature: float) -> np.ndarray:
    """``(K, *spatial)`` probabilities at ``temperature`` (see the module docstring); labels are unchanged."""
    if prob.shape[0] == 1:
        p = np.clip(prob, EPS, 1.0 - EPS)
        return 1.0 / (1.0 + np.exp(-np.log(p / (1.0 - p)) / temperature))
    p = np.clip(prob, EPS, None)
    logits = np.log(p / p.sum(0, keepdims=True)) / temperature
    logits -= logits.max(0, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(0, keepdims=True)


def nll(cases: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]], temperature: float) -> float:
    """Mean negative log-likelihood per pixel (inside the FOV where there is one) at ``temperature``."""
    total, count = 0.0, 0
    for prob, target, fov in cases:
        q = temper(prob, temperature)
        if q.shape[0] == 1:
            ll = target[0] * np.log(np.clip(q[0], EPS, 1)) + (1 - target[0]) * np.log(np.clip(1 - q[0], EPS, 1))
        else:
            ll = (target * np.log(np.clip(q, EPS, 1))).sum(0)
        keep = np.ones(ll.shape, bool) if fov is None else fov
        total -= float(ll[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


def ece(cases: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]], temperature: float) -> float:
    """Top-label ECE over the pooled pixels at ``temperature`` (:func:`diffmis.metrics.calibration`)."""
    pooled = None
    for prob, target, fov in cases:
        cal = calibration(torch.from_numpy(temper(prob, temperature)), torch.from_numpy(target),
                          fov=None if fov is None else torch.from_numpy(fov)[None])
        pooled = cal if pooled is None else pooled.merge(cal)
    return float(pooled.top_label.ece) if pooled is not None else float("nan")


def fit(cases: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]) -> float:
    """The grid temperature of the lowest NLL."""
    return float(GRID[int(np.argmin([nll(cases, t) for t in GRID]))])


def load(work: Path, split: str, row: str) -> list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """``(prob, target, fov)`` per case of a row that quality.py predicted into ``work``."""
    prob_dir, refs = work / "pred" / row / "prob", work / f"refs_{split}"
    probs = index_files(prob_dir, (".npy",), "probability") if prob_dir.is_dir() else {}
    if not probs:
        raise SystemExit(f"no probability maps in {prob_dir}: predict row '{row}' with benchmarks/quality.py "
                         f"(--work {work.parent}) first")
    masks = index_files(refs / "masks", LABEL_SUFFIXES, "reference")
    fovs = index_files(refs / "fov", LABEL_SUFFIXES, "FOV") if (refs / "fov").is_dir() else {}
    cases = []
    for case, f in probs.items():
        if case not in masks:
            raise SystemExit(f"no reference mask for case '{case}' in {refs / 'masks'}")
        labels, _ = read_scored_labels(masks[case])
        prob = np.load(f).astype(np.float64)
        prob = prob[None] if prob.ndim == labels.ndim else prob
        target = one_hot(labels, prob.shape[0], dim=0, check=True).numpy().astype(np.float64)
        fov = read_scored_labels(fovs[case])[0] > 0 if case in fovs else None
        cases.append((np.clip(prob, 0.0, 1.0), target, fov))
    return cases


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
        t = fit(tune)
        row: dict[str, Any] = {"tune_row": tune_row, "temperature": t,
                               "tune": {"ece_t1": ece(tune, 1.0), "ece_fitted": ece(tune, t),
                                        "nll_t1": nll(tune, 1.0), "nll_fitted": nll(tune, t), "n_cases": len(tune)}}
        if eval_row:
            split = EVAL_SPLIT[args.dataset]
            ev = load(Path(args.work) / args.dataset, split, eval_row)
            row["eval_row"] = eval_row
            row["eval"] = {"split": split, "ece_t1": ece(ev, 1.0), "ece_fitted": ece(ev, t),
                           "nll_t1": nll(ev, 1.0), "nll_fitted": nll(ev, t), "n_cases": len(ev)}
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
