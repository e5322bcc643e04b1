"""Markdown tables (for README.md and docs/benchmarks.md) from the JSON under benchmarks/results/.

    python benchmarks/render.py                 # every table whose JSON exists, to stdout
    python benchmarks/render.py --out FILE.md   # also written to a file
    python benchmarks/render.py --readme README.md   # refill its <!-- render:FILE.json --> blocks

Nothing is measured here: the figures are the JSON's, rounded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["segmentor", "medsegdiff", "medsegdiff_v2", "pd_ddpm", "pd_ddpm_segmentor", "hidiff", "hidiff_segmentor",
         "peer"]
LABEL = {"segmentor": "UNet segmentor (baseline)", "medsegdiff": "MedSegDiff", "medsegdiff_v2": "MedSegDiff-V2",
         "pd_ddpm": "PD-DDPM", "pd_ddpm_segmentor": "PD-DDPM's pre-segmentation net alone",
         "hidiff": "HiDiff (refined)", "hidiff_segmentor": "HiDiff's co-trained segmentor alone",
         "peer": "peer: med-seg-diff-pytorch 0.3.3"}


def _load(name: str) -> Optional[dict[str, Any]]:
    f = RESULTS / name
    return json.loads(f.read_text()) if f.is_file() else None


def _sampler(r: dict[str, Any]) -> str:
    ps = r.get("predict_settings") or {}
    if ps.get("segmentor_only") or ps.get("prior_only"):  # prior_only: the name in older result files
        return "one pass"
    s = ps.get("sampler") or r.get("sampler") or ""
    if s == "direct":
        return "one pass"
    steps = ps.get("steps") or r.get("sample_steps")
    out = f"{s} {steps}" if steps else s
    if ps.get("start_step") or r.get("start_step"):
        out += f" below T'={ps.get('start_step') or r.get('start_step')}"
    ens = ps.get("ensemble") or r.get("ensemble")
    if ens and ens > 1:
        out += f", ensemble {ens}"
    return out


def quality_table(data: dict[str, Any]) -> str:
    st = data["settings"]
    res = data["results"]
    lines = [f"Command: `{data['command']}` ({st['minutes']:g} min of training per method, "
             f"{st.get('threads', 1)} torch thread(s); {next(iter(res.values()))['n_cases']} {data['eval_split']} "
             f"cases; mean +- std over cases)", "",
             "| method | params | train steps | sampler | Dice | IoU | HD95 (px) | batched calls / image | s / image |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    best = max((r["dice_mean"] for m, r in res.items() if m != "peer"), default=None)
    for m in ORDER:
        if m not in res:
            continue
        r = res[m]
        dice = f"{r['dice_mean']:.3f} +- {r['dice_std']:.3f}"
        if best is not None and r["dice_mean"] == best:
            dice = f"**{dice}**"
        nfe = r.get("nfe_per_image")
        params = "(in the row above)" if m.endswith("_segmentor") else f"{r.get('params', 0) / 1e6:.1f} M"
        lines.append(f"| {LABEL[m]} | {params} | {r.get('steps', '')} | {_sampler(r)} | {dice} "
                     f"| {r['iou_mean']:.3f} | {r['hd95_mean']:.1f} | {nfe:g} | {r['seconds_per_image']:.2f} |")
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


def ablation_table(data: dict[str, Any]) -> str:
    lines = [f"Command: `{data['command']}`", "",
             "| component | Dice with | Dice without | difference | the papers |", "|---|---:|---:|---:|---|"]
    for c in data["comparisons"]:
        lines.append(f"| {c['component']} | {c['dice_with']:.3f} | {c['dice_without']:.3f} | {c['delta']:+.3f} | "
                     f"{c['paper']} |")
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


def fill_readme(readme: Path) -> None:
    """Replace each ``<!-- render:NAME -->`` ... ``<!-- /render -->`` block of README.md with NAME's table."""
    import re

    text = readme.read_text()

    def table(m: "re.Match[str]") -> str:
        name = m.group(1)
        data = _load(name)
        if data is None:
            return m.group(0)
        kind = name.split("_")[0]
        body = {"quality": quality_table, "nfe": nfe_table, "ablation": ablation_table}[kind](data)
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
        parts += [f"### {f.name}", "", quality_table(json.loads(f.read_text())), ""]
    for f in sorted(RESULTS.glob("nfe_*.json")):
        parts += [f"### {f.name}", "", nfe_table(json.loads(f.read_text())), ""]
    for f in sorted(RESULTS.glob("ablation_*.json")):
        parts += [f"### {f.name}", "", ablation_table(json.loads(f.read_text())), ""]
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
