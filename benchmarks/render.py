"""Markdown tables (for README.md and docs/benchmarks.md) from the JSON under benchmarks/results/.

    python benchmarks/render.py                 # every table whose JSON exists, to stdout
    python benchmarks/render.py --out FILE.md   # also written to a file
    python benchmarks/render.py --readme README.md   # refill its <!-- render:FILE.json --> blocks
                                                     # (and <!-- render:targets --> from the quality files)

Nothing is measured here: the figures are the JSON's, rounded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["segmentor", "medsegdiff", "medsegdiff_v2", "medsegdiff_v2_segmentor", "pd_ddpm", "pd_ddpm_segmentor",
         "berdiff", "hidiff", "hidiff_segmentor"]
LABEL = {"segmentor": "UNet segmentor (baseline)", "medsegdiff": "MedSegDiff", "medsegdiff_v2": "MedSegDiff-V2",
         "medsegdiff_v2_segmentor": "MedSegDiff-V2's condition segmentor alone", "pd_ddpm": "PD-DDPM",
         "pd_ddpm_segmentor": "PD-DDPM's pre-segmentation net alone", "hidiff": "HiDiff (refined)",
         "hidiff_segmentor": "HiDiff's segmentor alone", "berdiff": "BerDiff"}
DIFFUSION = ("medsegdiff", "medsegdiff_v2", "pd_ddpm", "berdiff", "hidiff")


def _load(name: str) -> Optional[dict[str, Any]]:
    f = RESULTS / name
    return json.loads(f.read_text()) if f.is_file() else None


def _sampler(r: dict[str, Any]) -> str:
    ps = r.get("predict") or {}
    if ps.get("segmentor_only") or ps.get("sampler") == "direct":
        return "one pass"
    out = f"{ps.get('sampler')} {ps.get('steps')}"
    if ps.get("start_step"):
        out += f" below T'={ps['start_step']}"
    if (ps.get("ensemble") or 1) > 1:
        out += f", ensemble {ps['ensemble']}"
    return out


def _f(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _budget(r: dict[str, Any]) -> str:
    phases = [f"{x['minutes']:.3g} ({x['steps']})" for x in r.get("runs", [])]
    if "calibration" in r:  # the training seconds a --calibrate run kept back for fitting its temperature
        phases.append(f"{r['calibration']['reserve_seconds']:g} s kept for calibration")
    return " + ".join(phases)


def quality_table(data: dict[str, Any], variant: str = "default") -> str:
    """The evaluation rows of one dataset (``quality.py``): every method at its default recipe."""
    rows = {r["method"]: r for r in data["rows"].values() if r["variant"] == variant}
    if not rows:
        return "(no rows)"
    any_row = next(iter(rows.values()))
    env = data.get("environment") or {}
    cmds = sorted({c for k, c in (data.get("commands") or {}).items() if k.endswith(f"@{variant}")})
    lines = [f"{data['n_cases']} {data['eval_split']} cases, {any_row['budget_minutes']:g} min of training per method "
             f"(everything counted), {_machines(list(rows.values()), env)}; mean +- std over cases. Commands: "
             + "; ".join(f"`{c}`" for c in cmds) + _schedule_note(list(rows.values())), "",
             "| method | params | minutes (steps) per phase | sampler | Dice | IoU | HD95 (px) | ECE | "
             "uncertainty AUROC | batched calls / image | s / image |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    best = max(r["dice_mean"] for r in rows.values())
    for m in ORDER:
        if m not in rows:
            continue
        r = rows[m]
        dice = f"{r['dice_mean']:.3f} +- {r['dice_std']:.3f}"
        if r["dice_mean"] == best:
            dice = f"**{dice}**"
        params = "(in the row above)" if m.endswith("_segmentor") else f"{r['params'] / 1e6:.1f} M"
        lines.append(f"| {LABEL[m]} | {params} | {_budget(r)} | {_sampler(r)} | {dice} | {r['iou_mean']:.3f} | "
                     f"{r['hd95_mean']:.1f} | {_f(r.get('ece'), '.3f')} | {_f(r.get('error_auroc'), '.3f')} | "
                     f"{r['nfe_per_image']:g} | {r['seconds_per_image']:.2f} |")
    calibrated = [r for r in data["rows"].values() if r["variant"] == "calibrated" and "calibration" in r]
    if variant == "default" and calibrated:
        lines.append("")
        lines.append("Calibrated runs (`--calibrate`: the same recipe trained again with a few seconds of its budget "
                     "kept back for fitting one temperature on the held-out val images, which moves no label; "
                     "ECE raw -> calibrated):")
        lines.append("")
        lines.append("| method | minutes (steps) per phase | temperature (val cases, s) | Dice | "
                     "ECE raw -> calibrated | uncertainty AUROC |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for m in ORDER:
            for r in (x for x in calibrated if x["method"] == m):
                c = r["calibration"]
                lines.append(f"| {LABEL[m]} | {_budget(r)} | {c['temperature']:.2f} ({c['n_cases']}, "
                             f"{c['seconds']:g}) | {r['dice_mean']:.3f} +- {r['dice_std']:.3f} | "
                             f"{_f(r.get('ece_raw'), '.3f')} -> {_f(r.get('ece'), '.3f')} | "
                             f"{_f(r.get('error_auroc'), '.3f')} |")
    return "\n".join(lines)


def _overrides(r: dict[str, Any]) -> list[str]:
    """The row's config overrides, its segmentor phase as the quality.py option that made it, and the recipe
    levers set by the recipe's config rather than by the row's overrides (``(config)``; recorded since 2026-11-30,
    HiDiff's resolved ``train.segmentor_every`` since the fourth session of that day)."""
    seg = [x for x in r.get("runs", []) if x.get("phase") == "segmentor"]
    share = [f"--seg-share {seg[0]['minutes'] / r['budget_minutes']:g}"] if seg else []
    if seg and "reused_from" in seg[0]:  # a paired ablation: the segmentor phase of another variant's row
        share.append(f"--segphase-from {seg[0]['reused_from'].split('@', 1)[1]}")
    sets = list(r.get("sets", []))
    method_run = [x for x in r.get("runs", []) if x.get("phase") == "method"]
    named = {s.split("=")[0] for s in sets}
    from_config = [f"{k}={v:g} (config)" if isinstance(v, float) else f"{k}={v} (config)"
                   for k, v in (method_run[0].get("levers", {}) if method_run else {}).items()
                   if k not in named]
    return share + sets + from_config


def variants_table(data: dict[str, Any]) -> str:
    """The tuning rows of one dataset (``quality.py --split tune --variant``): each lever against its default."""
    env = data.get("environment") or {}
    lines = [f"Tuning split: {data['n_cases']} held-out training cases ({data['eval_split']}), "
             f"{_machines(list(data['rows'].values()), env, tune=True)}.", "",
             "| method | variant | overrides | minutes (steps) per phase | Dice | ECE | uncertainty AUROC | "
             "difference to default (same CPU kind) |", "|---|---|---|---|---:|---:|---:|---:|"]
    rows = sorted(data["rows"].values(), key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 99,
                                                       r["variant"] != "default", r["variant"]))
    for r in rows:
        base = next((x for x in data["rows"].values() if x["method"] == r["method"] and x["variant"] == "default"
                     and x.get("dims") == r.get("dims")), None)  # volumes: the default of the same dims
        if base is not None and row_cpu(base, env) != row_cpu(r, env):
            base = None  # a difference across CPU kinds would be the machines' as much as the lever's
        diff = "" if base is None or r["variant"] == "default" else f"{r['dice_mean'] - base['dice_mean']:+.3f}"
        dims = f" ({r['dims']}D)" if "dims" in r else ""
        lines.append(f"| {LABEL.get(r['method'], r['method'])}{dims} | {r['variant']} | "
                     f"{' '.join(f'`{x}`' for x in _overrides(r)) or '-'} | {_budget(r)} | {r['dice_mean']:.3f} | "
                     f"{_f(r.get('ece'), '.3f')} | {_f(r.get('error_auroc'), '.3f')} | {diff} |")
    return "\n".join(lines)


def targets_table(docs: dict[str, dict[str, Any]]) -> str:
    """The issue's targets, dataset by dataset, from the evaluation rows (default recipes)."""
    lines = ["| target | " + " | ".join(docs) + " |", "|---|" + "---:|" * len(docs)]

    def row(name: str, fn) -> None:
        cells = []
        for d in docs.values():
            r = {x["method"]: x for x in d["rows"].values() if x["variant"] == "default"}
            try:
                cells.append(fn(r))
            except (KeyError, ValueError):  # a method (or every diffusion method) not measured on this set
                cells.append("n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def kind(x: dict[str, Any]) -> str:
        return row_cpu(x, {})

    def diff(a: str, b: str, need: float) -> Any:
        def cell(r: dict[str, Any]) -> str:
            d = r[a]["dice_mean"] - r[b]["dice_mean"]
            if kind(r[a]) != kind(r[b]):  # equal minutes buy different steps on CPUs of other kinds
                return f"{d:+.3f} (rows from CPUs of two kinds)"
            return f"{d:+.3f} {'met' if d >= need - 1e-9 else 'missed'}"
        return cell

    def best_diffusion(r: dict[str, Any]) -> dict[str, Any]:
        """The best diffusion row measured on the UNet's CPU kind (a comparison at equal minutes)."""
        return max((r[m] for m in DIFFUSION if m in r and kind(r[m]) == kind(r["segmentor"])),
                   key=lambda x: x["dice_mean"])

    row("1. HiDiff - its segmentor (>= +0.010)", diff("hidiff", "hidiff_segmentor", 0.01))
    row("2. PD-DDPM - its pre-segmentation (>= 0, > 0 on two)", diff("pd_ddpm", "pd_ddpm_segmentor", 0.0))
    row("3. best diffusion - UNet (>= 0; Kvasir, DRIVE; rows of the UNet's CPU kind)",
        lambda r: (f"{best_diffusion(r)['method']} {best_diffusion(r)['dice_mean'] - r['segmentor']['dice_mean']:+.3f}"))
    row("4. MedSegDiff - UNet (>= -0.030)", diff("medsegdiff", "segmentor", -0.03))
    row("4. MedSegDiff-V2 - UNet (>= -0.030)", diff("medsegdiff_v2", "segmentor", -0.03))

    def best_ece(r: dict[str, Any]) -> dict[str, Any]:
        return min((r[m] for m in DIFFUSION if m in r and kind(r[m]) == kind(r["segmentor"])),
                   key=lambda x: x["ece"])

    row("5. ECE: best-calibrated diffusion ensemble / UNet (same CPU kind)", lambda r: (
        f"{best_ece(r)['method']} {best_ece(r)['ece']:.3f} / {r['segmentor']['ece']:.3f}"))
    cal_docs = {d: {x["method"]: x for x in doc["rows"].values() if x["variant"] == "calibrated" and "calibration" in x}
                for d, doc in docs.items()}
    if any(cal_docs.values()):
        cells = []
        for d, doc in docs.items():
            cal = cal_docs[d]
            unet = next((x for x in doc["rows"].values() if x["method"] == "segmentor" and x["variant"] == "default"),
                        None)
            diff_rows = [cal[m] for m in DIFFUSION if m in cal]
            if not diff_rows or unet is None:
                cells.append("n/a")
                continue
            b = min(diff_rows, key=lambda x: x["ece"])
            cell = f"{b['method']} {b['ece']:.3f} / {unet['ece']:.3f}"
            if "segmentor" in cal:
                cell += f" (UNet calibrated too: {cal['segmentor']['ece']:.3f})"
            cells.append(cell)
        lines.append("| 5. ECE with a temperature fitted on held-out val images (`--calibrate`) / raw UNet | "
                     + " | ".join(cells) + " |")
    row("5. uncertainty AUROC of the errors, best diffusion (>= 0.8)", lambda r: (
        f"{max(r[m]['error_auroc'] for m in DIFFUSION if m in r):.3f}"))
    return "\n".join(lines)


def nfe_table(data: dict[str, Any]) -> str:
    chain = any(r.get("sampler") == "ddpm" for r in data["rows"])
    note = f"; the 1000-step chain on {data['settings']['ancestral_cases']}" if chain else ""
    lines = [f"Command: `{data['command']}` ({data['settings']['cases']} cases{note})", "",
             "| series | setting | network evaluations / image | Dice | s / image |", "|---|---|---:|---:|---:|"]
    for r in data["rows"]:
        setting = ", ".join(f"{k}={r[k]}" for k in ("steps", "start_step", "ensemble", "fuse", "sampler")
                            if r.get(k) is not None)
        lines.append(f"| {r['series']} | {setting or 'one pass'} | {r['network_evals_per_image']:g} | "
                     f"{r['dice']:.3f} | {r['seconds_per_image']:.3f} |")
    h = data.get("headline")
    if h:
        lines += ["", f"Best within 10 network evaluations per image: {h['series']} ({h['name']}): Dice "
                      f"{h['dice']:.3f} at {h['network_evals_per_image']:g} evaluations, {h['seconds_per_image']:.3f} "
                      f"s per image."]
    return "\n".join(lines)


def nfe_plot(json_path: Path) -> Path:
    """Redraw ``<nfe json>.png`` from its rows: Dice against network evaluations, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    series: dict[str, list[tuple[float, float]]] = {}
    for r in data["rows"]:
        series.setdefault(r["series"], []).append((r["network_evals_per_image"], r["dice"]))
    cmap = plt.get_cmap("tab20")
    markers = "os^Dv<>phX*"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot([q[0] for q in pts], [q[1] for q in pts], marker=markers[i % len(markers)], color=cmap(i % 20),
                label=name)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image (members x evaluations per member, log scale)")
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice vs network evaluations, {json_path.stem[4:]} ({data['settings']['cases']} cases)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _schedule_note(rows: list[dict[str, Any]]) -> str:
    """Which rows ran before a decaying lr schedule followed the minutes budget (27b74d2): rows record the commit
    they ran at (``commit``) since right after it, so a row without one is older. Empty when no row records one (a
    file of older rows only)."""
    old = list(dict.fromkeys(LABEL.get(r["method"], r["method"]).split("'")[0] for r in rows if not r.get("commit")))
    if not old or not any(r.get("commit") for r in rows):
        return ""
    return (". Rows run before the learning-rate decay followed the minutes budget (their cosine or poly schedules, "
            "the UNet's, HiDiff's and the segmentor phases', never decayed; constant ones are unaffected): "
            + ", ".join(old))


def _machine(env: dict[str, Any]) -> str:
    m = env.get("machine") or {}
    cpu = m.get("cpu") or {}
    return (f"{cpu.get('model', env.get('cpu', '?'))} ({cpu.get('isa', '?')}), {m.get('torch_threads', '?')} torch "
            f"thread(s), torch {env.get('torch', '?')}")


def row_cpu(r: dict[str, Any], env: dict[str, Any]) -> str:
    """The CPU a quality row ran on: its own record (``cpu``, since 2026-11-30), else the file's environment."""
    cpu = r.get("cpu") or ((env.get("machine") or {}).get("cpu") or {})
    return f"{cpu.get('model', '?')} ({cpu.get('isa', '?')})"


def _machines(rows: list[dict[str, Any]], env: dict[str, Any], tune: bool = False) -> str:
    """:func:`_machine` for a set of rows; rows measured on CPUs of different kinds say which ran where (by method,
    and by variant for the tuning tables)."""
    kinds: dict[str, list[str]] = {}
    for r in rows:
        # "PD-DDPM's ... alone" -> "PD-DDPM", "HiDiff (refined)" -> "HiDiff": a method's rows named once
        label = LABEL.get(r["method"], r["method"]).split("'")[0].split(" (")[0]
        kinds.setdefault(row_cpu(r, env), []).append(f"{label} {r['variant']}" if tune else label)
    m = env.get("machine") or {}
    tail = f"{m.get('torch_threads', '?')} torch thread(s), torch {env.get('torch', '?')}"
    if len(kinds) <= 1:
        return f"{next(iter(kinds), '?')}, {tail}"
    order = sorted(kinds, key=lambda c: len(kinds[c]))  # name the rows of the rarer kinds, "the others" last
    return ("rows from CPUs of different kinds (compare rows of one kind; a budget buys different steps on each): "
            + "; ".join(f"{cpu}: {', '.join(dict.fromkeys(kinds[cpu]))}" for cpu in order[:-1])
            + f"; {order[-1]}: the others; {tail}")


def speed_table(data: dict[str, Any]) -> str:
    """diffmis MedSegDiff against the peer (``speed.py``): step times, peak RSS, speed-ups per size and mode."""
    st = data["settings"]
    lay = data["diffmis"]["layouts"]
    auto = st.get("diffmis_auto") or {}
    lines = [f"Command: `python benchmarks/speed.py` ({_machine(data['environment'])}; medians of "
             f"{st['repeats']} alternating repeats; speed-up = peer time / diffmis time, repeat by repeat). "
             f"Parameters at 128x128: peer {data['peer']['n_params_128'] / 1e6:.1f} M, diffmis "
             + ", ".join(f"{k} {v['n_params'] / 1e6:.1f} M" for k, v in lay.items())
             + f"; `diffmis_auto` ran in {auto.get('precision', '?')} ({auto.get('reason', '')}).", "",
             "| size, step | batch | peer fp32 | diffmis fp32 (peer_widths) | diffmis auto | "
             "diffmis fp32 (four_levels) | speed-up fp32 / auto / four_levels |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        v = r["variants"]

        def cell(name: str) -> str:
            mem = (v[name].get("memory") or {}).get("peak_rss_mib")
            return f"{v[name]['step_s']['median']:.3f} s" + (f", {mem:.0f} MiB" if mem else "")

        sp = r["speedup"]
        lines.append(f"| {r['size']}x{r['size']} {'training step' if r['mode'] == 'train' else 'denoising step'} "
                     f"| {r['batch']} | {cell('peer_fp32')} | {cell('diffmis_fp32')} | {cell('diffmis_auto')} | "
                     f"{cell('diffmis_fp32_four_levels')} | "
                     f"{sp['diffmis_fp32_vs_peer_fp32']['median']:.2f}x / {sp['diffmis_auto_vs_peer_fp32']['median']:.2f}x"
                     f" / {sp['diffmis_fp32_four_levels_vs_peer_fp32']['median']:.2f}x |")
    return "\n".join(lines)


def precision_table(data: dict[str, Any]) -> str:
    """``precision.py``: auto against explicit precision and layout on this CPU."""
    st = data["settings"]
    lines = [f"Command: `{data['command']}` ({st['config']} at {st['size']}x{st['size']}, batch 8; "
             f"{_machine(data['environment'])}; medians of {st['rounds']} rounds)", "",
             "| variant | resolved | training s / step | prediction s / image |", "|---|---|---:|---:|"]
    for name, r in data["results"].items():
        lines.append(f"| {name} | {r['precision']}{' + channels_last' if r['channels_last'] else ''} | "
                     f"{r['train_step_s']:.3f} | {r['predict_s_per_image']:.3f} |")
    c = data.get("check") or {}
    if "train_step_s" in c:
        lines += ["", f"auto / best explicit: training {c['train_step_s']['auto_over_best']:.2f}, prediction "
                      f"{c['predict_s_per_image']['auto_over_best']:.2f} (target <= 1.15)."]
    if "emulated_bf16_cost" in c:
        e = c["emulated_bf16_cost"]
        lines.append(f"bf16 where it is emulated (oneDNN and ATen capped to AVX2): {e['train']}x slower training, "
                     f"{e['predict']}x slower prediction than fp32.")
    return "\n".join(lines)


def threads_table(data: dict[str, Any]) -> str:
    """``threads.py``: step times under contention per thread setting."""
    comps = data["settings"]["competitors"]
    lines = [f"Command: `{data['command']}` ({data['settings']['config']} at {data['settings']['size']}x"
             f"{data['settings']['size']}; {_machine(data['environment'])}). Competitors: "
             + "; ".join(f"`{k}` = {v or 'nothing'}" for k, v in comps.items()), "",
             "| threads | " + " | ".join(f"training s / step, {k}" for k in comps) + " |",
             "|---|" + "---:|" * len(comps)]
    for key, by in data["results"].items():
        cells = [f"{by[k]['train_step_s']:.2f}" + (f" ({by[k]['train_slowdown']}x)" if "train_slowdown" in by[k]
                                                  else "") for k in comps if k in by]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def volumes_table(data: dict[str, Any]) -> str:
    """MSD Hippocampus (``volumes.py``): 3D and 2D slice-wise runs, all scored per volume."""
    rows = [r for r in data["rows"].values() if r.get("variant", "default") == "default"]
    if not rows:
        return "(no rows)"
    env = data.get("environment") or {}
    cmds = sorted(set((data.get("commands") or {}).values()))
    lines = [f"{data['n_cases']} {data['eval_split']} volumes, {rows[0]['budget_minutes']:g} min of training per "
             f"method (segmentor phase counted), {_machine(env)}; per-volume scores, mean +- std over volumes, HD95 "
             "in mm. Commands: " + "; ".join(f"`{c}`" for c in cmds), "",
             "| method | networks | minutes (steps) per phase | sampler | Dice | IoU | HD95 (mm) | ECE | "
             "uncertainty AUROC | batched calls / volume | s / volume |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    best = max(r["dice_mean"] for r in rows)
    order = ["segmentor", "hidiff_segmentor", "hidiff", "pd_ddpm_segmentor", "pd_ddpm", "medsegdiff",
             "medsegdiff_v2", "berdiff"]
    for dims in (3, 2):
        for m in order:
            r = next((x for x in rows if x["method"] == m and x["dims"] == dims), None)
            if r is None:
                continue
            dice = f"{r['dice_mean']:.3f} +- {r['dice_std']:.3f}"
            if r["dice_mean"] == best:
                dice = f"**{dice}**"
            label = LABEL.get(m, m)
            lines.append(f"| {label} | {dims}D | {_budget(r)} | {_sampler(r)} | {dice} | "
                         f"{r['iou_mean']:.3f} +- {r['iou_std']:.3f} | {r['hd95_mean']:.2f} +- {r['hd95_std']:.2f} | "
                         f"{_f(r.get('ece'), '.3f')} | {_f(r.get('error_auroc'), '.3f')} | {r['nfe_per_image']:.1f} | "
                         f"{r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def volume_predict_table(data: dict[str, Any]) -> str:
    """One 256x256x160 volume (``volume_predict.py``): time and peak memory of 3D prediction."""
    env = data.get("environment") or {}
    cmds = dict.fromkeys(r["command"] for r in data["rows"])  # each row keeps the command that measured it
    lines = [f"{_machine(env)}. Command: " + "; ".join(f"`{c}`" for c in cmds), "",
             "| config | ensemble | sampler | windows | batched calls | seconds | peak memory (GiB) |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in data["rows"]:
        sampler = f"{r['sampler']} {r['steps']}" + (f" below T'={r['start_step']}" if r.get("start_step") else "")
        lines.append(f"| `{r['config']}` | {r['ensemble']} | {sampler} | {'x'.join(map(str, r['window']))}, "
                     f"{r['windows_per_call']} per call | {r['network_calls']} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def gpu_table(data: dict[str, Any]) -> str:
    """``gpu.py``: each recipe trained and predicted on a GPU, the peer comparison, the compile stage, the tests."""
    m = data.get("machine") or {}
    st = data["settings"]
    lines = [f"Command: `{data['command']}` on {m.get('gpu', '?')} (sm_{''.join(map(str, m.get('capability', [])))}, "
             f"torch {m.get('torch', '?')}, CUDA {m.get('cuda_runtime', '?')}), commit {data.get('commit_sent')}; "
             f"{st['steps']} training steps at {st['size']}x{st['size']}, validation split predicted with each "
             f"recipe's default sampler. CUDA-marked tests: {(data.get('tests') or {}).get('summary', 'not run')}."]
    rec = {k: v for k, v in (data.get("recipes") or {}).items() if "dice" in v}
    if rec:
        lines += ["", "| recipe | precision | train images/s | train peak MiB | Dice (val) | predict images/s "
                      "(batch 8) | NFE | 1 image, ensemble: graphs / eager |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for k, r in rec.items():
            lat = r.get("latency_one_image_s") or {}
            lat_s = " / ".join(f"{lat[x] * 1e3:.1f} ms" for x in ("graphs", "eager") if x in lat)
            lines.append(f"| {k} | {r['precision']} | {r['train_images_per_s']:.1f} | {r['train_peak_mib']:.0f} | "
                         f"{r['dice']:.3f} | {r['predict_images_per_s']:.1f} | {r['nfe_per_batch']} | "
                         f"{r['latency_ensemble']}: {lat_s} |")
    bad = {k: v.get("error", v.get("skipped")) for k, v in (data.get("recipes") or {}).items() if "dice" not in v}
    if bad:
        lines += [""] + [f"- {k}: {str(v).splitlines()[0][:160]}" for k, v in bad.items()]
    peer = (data.get("peer") or {}).get("sizes")
    if peer:
        names = list(next(iter(peer.values())))
        lines += ["", f"Training step against med-seg-diff-pytorch at equal parameters (batch {data['peer']['batch']}, "
                      "median step time; speed-up = peer / diffmis, step by step):", "",
                  "| size | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for size, row in peer.items():
            lines.append(f"| {size}x{size} | " + " | ".join(
                f"{row[n]['step_s'] * 1e3:.1f} ms" + (f" ({row[n]['speedup_vs_peer']:.2f}x)"
                                                      if "speedup_vs_peer" in row[n] else "") for n in names) + " |")
    comp = data.get("compile") or {}
    if "eager_bf16_step_s" in comp:
        modes = [k for k in comp if k.startswith("compiled_")]
        lines += ["", f"Compile stage ({comp['size']}x{comp['size']}, batch {comp['batch']}, cuDNN benchmark on): "
                      f"peer fp32 {comp['peer_fp32_step_s'] * 1e3:.1f} ms, diffmis bf16 eager "
                      f"{comp['eager_bf16_step_s'] * 1e3:.1f} ms ({comp['eager_speedup_vs_peer']:.2f}x)"
                      + "".join(f"; {k}: {comp[k]['step_s'] * 1e3:.1f} ms after {comp[k]['compile_s']:.0f} s "
                                f"({comp[k]['speedup_vs_peer']:.2f}x)" for k in modes)
                      + (f"; {comp['stopped']}" if "stopped" in comp else "") + "."]
    return "\n".join(lines)


#: result-file name prefix -> the function that renders its Markdown table
TABLES = {"gpu": gpu_table, "quality": quality_table, "nfe": nfe_table, "speed": speed_table,
          "precision": precision_table, "threads": threads_table, "volumes": volumes_table,
          "volume_predict": volume_predict_table}


def table_for(name: str) -> Optional[Callable[[dict], str]]:
    """The table function of a result file: ``*_tune.json`` -> the variants table, otherwise the longest of
    :data:`TABLES`' prefixes that the file's name starts with (``volume_predict.json`` is not a ``volumes`` file)."""
    if name.endswith("_tune.json"):
        return variants_table
    stem = name.removesuffix(".json")
    prefixes = [p for p in TABLES if stem == p or stem.startswith(p + "_")]
    return TABLES[max(prefixes, key=len)] if prefixes else None


def fill_readme(readme: Path) -> None:
    """Replace each ``<!-- render:NAME -->`` ... ``<!-- /render -->`` block of README.md with NAME's table."""
    import re

    text = readme.read_text()

    def table(m: "re.Match[str]") -> str:
        name = m.group(1)
        if name == "targets":
            docs = {d: x for d in ("kvasir", "drive", "mni")  # files of the current protocol (rows by method@variant)
                    if (x := _load(f"quality_{d}.json")) is not None and isinstance(x.get("rows"), dict)}
            return f"<!-- render:targets -->\n{targets_table(docs)}\n<!-- /render -->" if docs else m.group(0)
        data = _load(name)
        if data is None:
            return m.group(0)
        render = table_for(name)
        if render is None:
            print(f"left {name} as it is (no table for that file name)")
            return m.group(0)
        try:
            body = render(data)
        except (KeyError, TypeError):  # a result file of an older format: its block stays as it is
            print(f"left {name} as it is (older format)")
            return m.group(0)
        return f"<!-- render:{name} -->\n{body}\n<!-- /render -->"

    new = re.sub(r"<!-- render:(\S+) -->.*?<!-- /render -->", table, text, flags=re.S)
    readme.write_text(new)
    print(f"filled {readme}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--readme", type=Path, default=None,
                    help="fill the <!-- render:FILE.json --> blocks of this Markdown file")
    args = ap.parse_args()
    if args.readme:
        fill_readme(args.readme)
        for f in sorted(RESULTS.glob("nfe_*.json")):
            print(f"plot {nfe_plot(f)}")
        return
    parts = []
    for f in sorted(RESULTS.glob("quality_*.json")):
        table = variants_table if f.name.endswith("_tune.json") else quality_table
        parts += [f"### {f.name}", "", table(json.loads(f.read_text())), ""]
    for f in sorted(RESULTS.glob("nfe_*.json")):
        parts += [f"### {f.name}", "", nfe_table(json.loads(f.read_text())), ""]
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
