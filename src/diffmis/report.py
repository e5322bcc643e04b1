"""A self-contained HTML report of a run folder.

:func:`write_report` reads what a run folder holds and writes one HTML file with every figure embedded as a
base64 PNG (no external assets, no network):

==============================  ===========================================================================
``RUN/config.yaml``             run name and a config summary (full config in a collapsible block)
``RUN/metrics.jsonl``           training curves: train loss terms and validation Dice against the step
``RUN/eval/<set>/summary.json`` metrics side by side, one column per prediction set (``diffmis evaluate``)
  (per-case paths)              best / median / worst cases by foreground Dice of the first set
                                (alphabetical): image, truth, each set's prediction and uncertainty map
``RUN/nfe.json``                Dice against the number of network evaluations (NFE)
==============================  ===========================================================================

Anything missing or unreadable gives a section that says so; only a missing run folder is an error.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from diffmis.errors import DiffmisError, InputError
from diffmis.data import NIFTI_SUFFIXES, file_stem
from diffmis.evaluation import read_scored_labels
from diffmis.utils import atomic_write_text

__all__ = ["write_report"]

PathLike = Union[str, Path]

# keys of train lines in metrics.jsonl that are not loss terms
_NOT_LOSS = {"step", "phase", "time", "lr", "images_per_s", "epoch"}
# metrics where smaller is better (bold = best in the comparison table)
_LOWER_IS_BETTER = {"HD95", "ASSD", "ECE"}
# config keys shown in the summary table when present
_CONFIG_KEYS = (
    "experiment.recipe", "experiment.seed", "data.root", "data.num_classes", "data.image_size", "model.name",
    "model.segmentor.name", "diffusion.kind", "diffusion.timesteps", "diffusion.schedule", "train.max_steps",
    "train.batch_size", "train.lr", "train.precision", "sample.sampler", "sample.steps", "sample.ensemble",
    "sample.fuse",
)
# Overlay colours: chosen to stand out on grey scans and on red/orange fundus and endoscopy images alike.
_CLASS_COLOURS = ((0.15, 0.9, 0.3), (0.2, 0.55, 1.0), (1.0, 0.85, 0.1), (0.8, 0.3, 0.9), (0.1, 0.85, 0.85))
_ERRORS = {
    "correct": (0.15, 0.9, 0.3),
    "false positive": (1.0, 0.2, 0.85),
    "missed": (0.1, 0.8, 1.0),
    "wrong class": (1.0, 0.6, 0.0),
}

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1d2330; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #d0d5dd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #667085; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #d0d5dd; padding: 4px 10px; text-align: right; }
th { background: #f2f4f7; } td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
.missing { color: #b54708; background: #fffaeb; border-left: 4px solid #f79009; padding: 6px 10px; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.note { color: #475467; font-size: 0.9em; }
"""


# ---------------------------------------------------------------- reading the run folder


@dataclass
class _EvalSet:
    """One prediction set: ``RUN/eval/<name>/summary.json`` as written by ``diffmis evaluate``."""

    name: str
    folder: Path
    summary: dict[str, Any]
    cases: dict[str, dict[str, Any]] = field(init=False)  # id -> per-case entry

    def __post_init__(self) -> None:
        entries = self.summary["metric_per_case"]
        self.cases = {c["id"]: c for c in entries if isinstance(c, dict) and isinstance(c.get("id"), str)}

    def get(self, key: str) -> Any:
        """A top-level key of the summary, or None."""
        return self.summary.get(key)


@dataclass
class _Run:
    root: Path
    name: str
    config: Optional[dict[str, Any]] = None
    config_text: Optional[str] = None
    problems: dict[str, str] = field(default_factory=dict)  # section -> why it is missing
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    evals: dict[str, _EvalSet] = field(default_factory=dict)
    eval_errors: dict[str, str] = field(default_factory=dict)
    nfe: Optional[list[dict[str, Any]]] = None


def _load_config(run: _Run) -> None:
    import yaml

    path = run.root / "config.yaml"
    if not path.is_file():
        run.problems["config"] = f"no config.yaml in {run.root}"
        return
    run.config_text = path.read_text(encoding="utf-8", errors="replace")
    try:
        loaded = yaml.safe_load(run.config_text)
    except yaml.YAMLError as err:
        run.problems["config"] = f"{path} is not valid YAML: {err}"
        return
    if not isinstance(loaded, dict):
        run.problems["config"] = f"{path} does not hold a mapping"
        return
    run.config = loaded
    name = _dotted(loaded, "experiment.name")
    if isinstance(name, str) and name:
        run.name = name


def _load_log(run: _Run) -> None:
    path = run.root / "metrics.jsonl"
    if not path.is_file():
        run.problems["curves"] = f"no metrics.jsonl in {run.root}"
        return
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            run.bad_lines += 1
            continue
        if isinstance(rec, dict) and _num(rec.get("step")) is not None:
            run.records.append(rec)
        else:
            run.bad_lines += 1


def _load_evals(run: _Run) -> None:
    eval_root = run.root / "eval"
    for sub in sorted(eval_root.iterdir()) if eval_root.is_dir() else []:
        summary = sub / "summary.json"
        if not summary.is_file():
            continue
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            run.eval_errors[sub.name] = f"{summary}: not valid JSON ({err})"
            continue
        if not isinstance(data, dict) or not isinstance(data.get("metric_per_case"), list):
            run.eval_errors[sub.name] = f"{summary}: not a diffmis evaluate summary (no metric_per_case list)"
            continue
        run.evals[sub.name] = _EvalSet(sub.name, sub, data)


def _load_nfe(run: _Run) -> None:
    path = run.root / "nfe.json"
    if not path.is_file():
        return
    try:
        nfe = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        run.problems["nfe"] = f"{path} is not valid JSON: {err}"
        return
    if isinstance(nfe, list):
        run.nfe = [r for r in nfe if isinstance(r, dict)]
    else:
        run.problems["nfe"] = f"{path} should hold a list of {{method, sampler, steps, nfe, dice}}"


def _load_run(root: Path) -> _Run:
    """Everything the report shows, with a note for each part that is missing or unreadable."""
    run = _Run(root=root, name=root.resolve().name)
    _load_config(run)
    _load_log(run)
    _load_evals(run)
    _load_nfe(run)
    return run


# ---------------------------------------------------------------- small helpers


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _num(value: Any) -> Optional[float]:
    """A finite float, or None for anything else (None, strings, NaN, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 4) -> str:
    v = _num(value)
    return "&mdash;" if v is None else f"{v:.{digits}f}"


def _png(fig: Any) -> str:
    """Render a matplotlib Figure to an ``<img>`` tag holding a base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _figure(width: float, height: float) -> Any:
    # The object-oriented API: no pyplot state, no backend switch at import (Agg canvas in _png).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _dotted(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """HTML table; cells are already escaped/formatted; the first ``left`` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


# ---------------------------------------------------------------- sections


def _config_section(run: _Run) -> str:
    out = ["<h2>Configuration</h2>"]
    if run.config is None:
        out.append(_missing(run.problems.get("config", "no configuration")))
        return "".join(out)
    rows = [[_esc(k), _esc(v)] for k in _CONFIG_KEYS if (v := _dotted(run.config, k)) is not None]
    setup = [r for r in run.records if r.get("phase") == "setup"]
    if setup:  # what the training machine resolved "auto" to (metrics.jsonl setup line)
        s = setup[-1]
        cpu = s.get("cpu") if isinstance(s.get("cpu"), dict) else {}
        rows.append(["trained with", _esc(f"{s.get('precision')} ({s.get('reason')}), channels_last="
                                          f"{str(s.get('channels_last')).lower()}, {s.get('torch_threads')} thread(s)"
                                          + (f", {cpu.get('model')}" if cpu.get("model") else ""))])
    out.append(_table(["key", "value"], rows, left=2) if rows else "<p>No summary keys found.</p>")
    out.append(f"<details><summary>full config.yaml</summary><pre>{_esc(run.config_text)}</pre></details>")
    return "".join(out)


def _curves_section(run: _Run) -> str:
    out = ["<h2>Training curves</h2>"]
    if "curves" in run.problems:
        out.append(_missing(run.problems["curves"]))
        return "".join(out)
    train = [r for r in run.records if r.get("phase", "train") == "train"]
    val = [r for r in run.records if r.get("phase") == "val"]
    terms = sorted({k for r in train for k, v in r.items() if k not in _NOT_LOSS and _num(v) is not None})
    if "loss" in terms:  # the total first
        terms.remove("loss")
        terms.insert(0, "loss")
    has_val = any(_num(r.get("dice")) is not None or isinstance(r.get("dice_per_class"), list) for r in val)
    if not terms and not has_val:
        out.append(_missing(f"metrics.jsonl has no train loss or validation Dice values ({len(run.records)} lines)"))
    else:
        fig = _figure(12, 3.6)
        ax_loss, ax_val = fig.subplots(1, 2)
        for term in terms:
            pts = [(r["step"], _num(r.get(term))) for r in train if _num(r.get(term)) is not None]
            ax_loss.plot(*zip(*pts), label=term, lw=2.0 if term == "loss" else 1.2)
        ax_loss.set(title="train loss terms", xlabel="step")
        if terms:
            ax_loss.legend(fontsize=8)
            positive = all(_num(r.get(t)) is None or _num(r.get(t)) > 0 for r in train for t in terms)
            if positive:
                ax_loss.set_yscale("log")
        else:
            ax_loss.text(0.5, 0.5, "no train lines", ha="center", va="center", transform=ax_loss.transAxes)
        pts = [(r["step"], _num(r.get("dice"))) for r in val if _num(r.get("dice")) is not None]
        if pts:
            ax_val.plot(*zip(*pts), "o-", color="black", lw=2, label="mean foreground")
        n_cls = max((len(r["dice_per_class"]) for r in val if isinstance(r.get("dice_per_class"), list)), default=0)
        if n_cls > 1:
            for c in range(n_cls):
                cpts = [
                    (r["step"], _num(r["dice_per_class"][c]))
                    for r in val
                    if isinstance(r.get("dice_per_class"), list) and len(r["dice_per_class"]) > c
                    and _num(r["dice_per_class"][c]) is not None
                ]
                if cpts:
                    ax_val.plot(*zip(*cpts), ".--", lw=1, label=f"class {c + 1}")
        ax_val.set(title="validation Dice", xlabel="step", ylim=(0, 1))
        if has_val:
            ax_val.legend(fontsize=8)
        else:
            ax_val.text(0.5, 0.5, "no validation lines", ha="center", va="center", transform=ax_val.transAxes)
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(_png(fig))
    last = run.records[-1] if run.records else {}
    facts = [f"{len(train)} train lines, {len(val)} validation lines"]
    if _num(last.get("step")) is not None:
        facts.append(f"last step {int(last['step'])}")
    if _num(last.get("time")) is not None:
        facts.append(f"{last['time'] / 60:.1f} min")
    if run.bad_lines:
        facts.append(f"{run.bad_lines} unreadable line(s) skipped")
    out.append(f'<p class="note">{_esc("; ".join(facts))}</p>')
    return "".join(out)


def _metric_rows(evals: dict[str, _EvalSet]) -> list[list[str]]:
    names = list(evals)
    classes: list[str] = []
    metrics: list[str] = []
    for s in evals.values():
        for k, row in (s.get("mean") or {}).items():
            if k not in classes:
                classes.append(k)
            metrics.extend(m for m in row if m not in metrics)
    rows: list[list[str]] = []
    previous = [""]  # the row label is written once per group of rows

    def add(label: str, metric: str, values: list[Optional[float]], stds: list[Optional[float]]) -> None:
        finite = [v for v in values if v is not None]
        best = (min(finite) if metric in _LOWER_IS_BETTER else max(finite)) if len(finite) > 1 else None
        cells = []
        for v, sd in zip(values, stds):
            text = _fmt(v) + (f" &plusmn; {_fmt(sd)}" if sd is not None else "")
            cells.append(f"<b>{text}</b>" if best is not None and v == best else text)
        shown = "" if label == previous[0] else _esc(label)
        previous[0] = label
        rows.append([shown, _esc(metric), *cells])

    for k in classes:
        for m in metrics:
            vals = [_num(((s.get("mean") or {}).get(k) or {}).get(m)) for s in evals.values()]
            stds = [_num(((s.get("std") or {}).get(k) or {}).get(m)) for s in evals.values()]
            if any(v is not None for v in vals):
                add(f"class {k}", m, vals, stds)
    if len(classes) > 1:
        for m in metrics:
            vals = [_num((s.get("foreground_mean") or {}).get(m)) for s in evals.values()]
            if any(v is not None for v in vals):
                add("foreground mean", m, vals, [None] * len(names))
    rows.append(["cases", "", *(_esc(s.get("n_cases") or len(s.cases)) for s in evals.values())])
    rows.append(["missing predictions", "", *(_esc(len(s.get("missing_predictions") or [])) for s in evals.values())])
    return rows


def _reliability_figure(evals: dict[str, _EvalSet]) -> Optional[str]:
    cal = {}
    for name, s in evals.items():
        summary_cal = s.get("calibration")
        if isinstance(summary_cal, dict) and isinstance(summary_cal.get("top_label"), dict):
            cal[name] = summary_cal["top_label"]
    if not cal:
        return None
    fig = _figure(4.2, 4.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    for name, bins in cal.items():
        pts = [(c, a) for c, a in zip(bins.get("confidence") or [], bins.get("accuracy") or [])
               if _num(c) is not None and _num(a) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{name} (ECE {_fmt(bins.get('ece'), 3)})")
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability (top label)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _metrics_section(run: _Run) -> str:
    out = ["<h2>Metrics</h2>"]
    for name, why in run.eval_errors.items():
        out.append(_missing(f"eval set '{name}' skipped: {why}"))
    if not run.evals:
        out.append(_missing(f"no evaluation summaries (expected {run.root / 'eval' / '<set>' / 'summary.json'}, "
                            "written by `diffmis evaluate --out`)"))
        return "".join(out)
    out.append(_table(["", "metric", *(_esc(n) for n in run.evals)], _metric_rows(run.evals), left=2))
    out.append('<p class="note">mean &plusmn; standard deviation over cases; bold: best of the sets. '
               "HD95/ASSD in spacing units (pixels for 2D images, mm for NIfTI).</p>")
    conventions = next((s.get("conventions") for s in run.evals.values() if s.get("conventions")), None)
    if conventions:
        out.append(f'<p class="note">Conventions: {_esc(conventions)}</p>')
    lenient = next((s.get("lenient_protocol") for s in run.evals.values() if s.get("lenient_protocol")), None)
    if lenient:
        out.append(f'<p class="note">{_esc(lenient)}</p>')
    rel = _reliability_figure(run.evals)
    if rel:
        out.append(rel)
    return "".join(out)


def _resolve(path_value: Any, base: Path) -> Optional[Path]:
    """A per-case path from a summary: as written, else relative to the summary's folder."""
    if not isinstance(path_value, str) or not path_value:
        return None
    p = Path(path_value)
    for cand in (p, base / p):
        if cand.is_file():
            return cand
    return None


def _read_display_image(path: Path) -> np.ndarray:
    """Image as float ``(H, W)`` or ``(H, W, 3)`` in [0, 1] (NIfTI: ``(X, Y, Z)``), for display only."""
    if file_stem(path, NIFTI_SUFFIXES) is not None:
        import nibabel as nib

        arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        while arr.ndim > 3:
            arr = arr[..., 0]
    else:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "I", "I;16", "F") else im, dtype=np.float64)
    lo, hi = np.percentile(arr, [1, 99.5]) if arr.size else (0.0, 1.0)
    return np.clip((arr - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def _slice(arr: np.ndarray, index: Optional[int]) -> np.ndarray:
    """Slice ``index`` of the last axis of a volume; 2D cases (``index`` None) pass through."""
    return arr if index is None else arr[..., index]


def _fill(layers: Sequence[tuple[np.ndarray, Sequence[float]]], shape: tuple[int, ...]) -> np.ndarray:
    """RGBA overlay: each ``(bool mask, rgb)`` layer painted half-transparent on a transparent canvas."""
    rgba = np.zeros((*shape, 4))
    for mask, rgb in layers:
        rgba[mask, :3] = rgb
        rgba[mask, 3] = 0.6
    return rgba


def _truth_overlay(truth: np.ndarray) -> np.ndarray:
    """One colour per class of the reference label map."""
    top = int(truth.max()) if truth.size else 0
    return _fill([(truth == k, _CLASS_COLOURS[(k - 1) % len(_CLASS_COLOURS)]) for k in range(1, top + 1)], truth.shape)


def _error_overlay(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Prediction against reference: correct foreground, false positive, missed, wrong class (colours in _ERRORS)."""
    layers = [
        ((pred > 0) & (pred == truth), _ERRORS["correct"]),
        ((pred > 0) & (truth == 0), _ERRORS["false positive"]),
        ((pred == 0) & (truth > 0), _ERRORS["missed"]),
        ((pred > 0) & (truth > 0) & (pred != truth), _ERRORS["wrong class"]),
    ]
    return _fill(layers, truth.shape)


def _show(ax: Any, background: Optional[np.ndarray], overlay: Optional[np.ndarray], title: str,
          shape: tuple[int, ...]) -> None:
    """Image (or black when there is none) with an optional RGBA overlay."""
    ax.imshow(background if background is not None else np.zeros(shape), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    if overlay is not None:
        ax.imshow(overlay, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _case_dice(entry: dict[str, Any]) -> Optional[float]:
    """Mean foreground Dice of a per-case summary entry, or None when it has none."""
    metrics = entry.get("metrics")
    values = [_num(m.get("Dice")) for m in metrics.values() if isinstance(m, dict)] if isinstance(metrics, dict) else []
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _case_figure(case_id: str, sets: dict[str, _EvalSet], first: str) -> tuple[str, list[str]]:
    """One row of panels for a 2D case; for a volume one row per axis (three orthogonal slices, each through the
    plane with the most reference foreground). Returns the ``<img>`` and notes on files that could not be shown."""
    notes: list[str] = []
    base = sets[first].folder
    entry = sets[first].cases[case_id]
    ref_path = _resolve(entry.get("ref"), base)
    if ref_path is None:
        return "", [f"reference of case '{case_id}' not found ({entry.get('ref')})"]
    truth, _ = read_scored_labels(ref_path)
    views: list[Optional[tuple[int, int]]] = [None]
    if truth.ndim == 3:  # a volume: orthogonal slices through the planes with the most reference foreground
        fg = truth > 0
        views = [(ax, int(np.argmax(fg.sum(axis=tuple(a for a in range(3) if a != ax))))) for ax in range(3)]

    image = None
    image_entry = next((s.cases[case_id]["image"] for s in sets.values()
                        if s.cases.get(case_id, {}).get("image")), None)
    image_path = _resolve(image_entry, base)
    if image_path is not None:
        image = _read_display_image(image_path)
        if image.shape[:truth.ndim] != truth.shape:
            notes.append(f"image {image_path} has size {image.shape[:truth.ndim]}, mask {truth.shape}: not shown")
            image = None
    else:
        notes.append(f"no image for case '{case_id}'" + (f" ({image_entry} not found)" if image_entry else ""))

    # (kind, title, payload): kind is "image", "truth", "pred" (label map or None) or "unc" (float map); the
    # payloads are whole arrays (volumes), cut per view below
    panels: list[tuple[str, str, Any]] = [("image", "image" if image is not None else "image (none)", None),
                                          ("truth", "truth", None)]
    for name, s in sets.items():
        c = s.cases.get(case_id)
        if c is None:
            continue
        fgd = _case_dice(c)
        dice = f" Dice {fgd:.3f}" if fgd is not None else ""
        pred_path = _resolve(c.get("pred"), s.folder)
        pred = None
        if pred_path is not None:
            pred_arr, _ = read_scored_labels(pred_path)
            pred = pred_arr if pred_arr.shape == truth.shape else None
            if pred is None:
                notes.append(f"prediction {pred_path} has shape {pred_arr.shape}, reference {truth.shape}")
        else:
            notes.append(f"{name}: prediction of '{case_id}' not found ({c.get('pred')})")
        panels.append(("pred", f"{name}{dice}" if pred is not None else f"{name} (missing)", pred))
        unc_path = _resolve(c.get("uncertainty"), s.folder)
        if unc_path is not None:
            unc = np.squeeze(np.load(unc_path, allow_pickle=False).astype(np.float64))
            if unc.shape == truth.shape:
                panels.append(("unc", f"{name} uncertainty", unc))
            else:
                notes.append(f"uncertainty {unc_path} has shape {unc.shape}, mask {truth.shape}: not shown")

    def cut(arr: np.ndarray, view: Optional[tuple[int, int]]) -> np.ndarray:
        # a volume's plane turned a quarter so that its second voxel axis runs upwards (z up in the sagittal and
        # coronal planes, y up in the axial one, as NIfTI viewers show RAS volumes)
        return arr if view is None else np.rot90(np.take(arr, view[1], axis=view[0]))

    n = len(panels)
    panel = min(3.4, 13.0 / n)  # inches: the row fills the page width at 90 dpi
    ratios = [h / w for h, w in (cut(truth, v).shape for v in views)]
    fig = _figure(panel * n, sum(panel * r + 0.4 for r in ratios))
    axes = np.asarray(fig.subplots(len(views), n, squeeze=False, gridspec_kw={"height_ratios": ratios}))
    for row, view in enumerate(views):
        truth2d = cut(truth, view)
        img2d = None if image is None else cut(image, view)
        where = "" if view is None else f" ({'xyz'[view[0]]} = {view[1]})"
        for ax, (kind, title, payload) in zip(axes[row], panels):
            title = title + where if kind in ("image",) else title
            if kind == "unc":
                u = cut(payload, view)
                lo = min(0.0, float(u.min()))
                hi = float(u.max())
                im = ax.imshow(u, cmap="magma", interpolation="nearest", vmin=lo, vmax=hi if hi > lo else lo + 1.0)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            elif kind == "truth":
                _show(ax, img2d, _truth_overlay(truth2d), title, truth2d.shape)
            elif kind == "pred":
                _show(ax, img2d, None if payload is None else _error_overlay(cut(payload, view), truth2d), title,
                      truth2d.shape)
            else:
                _show(ax, img2d, None, title, truth2d.shape)
    if views[0] is not None:
        fig.suptitle(f"{case_id}: orthogonal slices through the planes with the most reference foreground",
                     fontsize=10)
    fig.tight_layout()
    return _png(fig), notes


def _cases_section(run: _Run) -> str:
    out = ["<h2>Cases: best, median, worst</h2>"]
    if not run.evals:
        out.append(_missing("no evaluation summaries, so no cases to show"))
        return "".join(out)
    first = next(iter(run.evals))
    scored = []
    for c in run.evals[first].cases.values():
        fg = _case_dice(c)
        if fg is not None and c.get("pred"):
            scored.append((fg, c["id"]))
    if not scored:
        out.append(_missing(f"eval set '{first}' has no case with a prediction and a Dice"))
        return "".join(out)
    scored.sort(key=lambda t: (-t[0], t[1]))
    picks: dict[str, str] = {}
    for label, (score, cid) in (("best", scored[0]), ("median", scored[len(scored) // 2]), ("worst", scored[-1])):
        picks.setdefault(cid, f"{label} (Dice {score:.3f})")
    legend = ", ".join(
        f'<span style="color:rgb({",".join(str(int(255 * c)) for c in rgb)})">&#9632;</span> {_esc(name)}'
        for name, rgb in _ERRORS.items()
    )
    out.append(f'<p class="note">Chosen by mean foreground Dice of the set <b>{_esc(first)}</b>. Truth: one colour '
               f"per class. Predictions against the truth: {legend}.</p>")
    for cid, label in picks.items():
        out.append(f"<h3>{_esc(label)}: {_esc(cid)}</h3>")
        try:
            img, notes = _case_figure(cid, run.evals, first)
        except (OSError, ValueError, DiffmisError) as err:  # unreadable files: say so, keep the report going
            img, notes = "", [f"case '{cid}' could not be drawn: {err}"]
        out.append(img)
        out.extend(_missing(n) for n in notes)
    return "".join(out)


def _nfe_section(run: _Run) -> str:
    out = ["<h2>Dice against network evaluations (NFE)</h2>"]
    if "nfe" in run.problems:
        out.append(_missing(run.problems["nfe"]))
        return "".join(out)
    if run.nfe is None:
        out.append(_missing(f"no nfe.json in {run.root}"))
        return "".join(out)
    rows = sorted(run.nfe, key=lambda r: (str(r.get("method", "")), str(r.get("sampler", "")), _num(r.get("nfe")) or 0))
    table_rows = [
        [_esc(r.get("method", "")), _esc(r.get("sampler", "")), _esc(r.get("steps", "")), _fmt(r.get("nfe"), 0),
         _fmt(r.get("dice"))]
        for r in rows
    ]
    out.append(_table(["method", "sampler", "steps", "NFE", "Dice"], table_rows, left=2))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        x, y = _num(r.get("nfe")), _num(r.get("dice"))
        if x is not None and y is not None and x > 0:
            series.setdefault(f"{r.get('method', '?')} / {r.get('sampler', '?')}", []).append((x, y))
    if series:
        fig = _figure(6, 3.6)
        ax = fig.subplots()
        for label, pts in series.items():
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set(xscale="log", xlabel="NFE per image", ylabel="Dice", title="Dice vs NFE")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(_png(fig))
    return "".join(out)


# ---------------------------------------------------------------- entry point


def write_report(run_dir: PathLike, out: Optional[PathLike] = None) -> Path:
    """Write the HTML report of a run folder.

    Args:
        run_dir: the run folder (``config.yaml``, ``metrics.jsonl``, ``eval/<set>/summary.json``, ``nfe.json``,
            each optional).
        out: the HTML file to write; default ``RUN/report.html``.

    Returns:
        The path of the written file: one self-contained HTML page (figures as base64 PNG).

    Raises:
        InputError: ``run_dir`` does not exist or is not a folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"run folder not found: {root}" + (" (it is a file)" if root.exists() else ""))
    run = _load_run(root)
    target = Path(out) if out is not None else root / "report.html"
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>diffmis report: {_esc(run.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>diffmis report: {_esc(run.name)}</h1>",
        f'<p class="meta">run folder {_esc(root.resolve())} &middot; generated {generated}</p>',
        _config_section(run),
        _curves_section(run),
        _metrics_section(run),
        _cases_section(run),
        _nfe_section(run),
        "</body></html>",
    ]
    atomic_write_text(target, "\n".join(parts))
    return target
