"""Parameter counts and CPU forward times of every registered network; MedSegDiff-B training-step cost.

For each model at its default (MedSegDiff: "B") size, with ``in_channels=3`` and ``K=1``, batch 1:

* parameters;
* forward time (one denoiser step given the cached condition; the condition pass of MedSegDiff-V2 is timed
  separately), median of ``--runs`` runs after ``--warmup`` runs, under ``torch.inference_mode``, in three
  modes: fp32, fp32 + channels_last, bf16 autocast + channels_last;
* and, in a fresh subprocess (so that its peak RSS is its own), MedSegDiff-B forward + backward at batch 2:
  median time and peak resident memory (``resource.getrusage``).

Writes ``benchmarks/results/models_table.json`` (with CPU model, threads, torch version, git commit) and the
table between the ``models_table`` markers of ``docs/models.md``.

    .venv/bin/python benchmarks/models_table.py            # 256x256, the reference run (needs a quiet machine)
    .venv/bin/python benchmarks/models_table.py --quick    # 64x64, 1 warm-up, 3 runs: smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

import diffmis.models  # noqa: F401  (fills the registries)
from diffmis.registry import MODELS, SEGMENTORS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, git_state  # noqa: E402  (shared benchmark helpers)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "models_table.json"
DOC = ROOT / "docs" / "models.md"
START, END = "<!-- models_table:start -->", "<!-- models_table:end -->"
C_IMG, K = 3, 1
MODES = ("fp32", "fp32_cl", "bf16_cl")


# ======================================================================================================
# Environment
# ======================================================================================================


# ======================================================================================================
# Models under test
# ======================================================================================================


def build_cases() -> list[dict[str, Any]]:
    """Each case: name, module, ``run(x)`` closure factory, and an optional one-off condition closure."""
    seg_default = SEGMENTORS.build("unet", in_channels=C_IMG, num_classes=K)
    cases: list[dict[str, Any]] = []
    for name in SEGMENTORS.names():
        cases.append({"name": f"segmentor:{name}", "module": SEGMENTORS.build(name, in_channels=C_IMG, num_classes=K),
                      "kind": "segmentor"})
    for name in MODELS.names():
        kwargs: dict[str, Any] = {"in_channels": C_IMG, "num_classes": K}
        if name == "bbdm":
            kwargs["segmentor_channels"] = seg_default.feature_channels
        label = "medsegdiff (B)" if name == "medsegdiff" else name
        cases.append({"name": label, "module": MODELS.build(name, **kwargs), "kind": name,
                      "segmentor": seg_default})
    return cases


def make_step(case: dict[str, Any], size: int, batch: int,
              channels_last: bool) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
    """Return ``(forward, condition)`` closures on fixed random inputs (condition only for V2's segmentor pass)."""
    module: nn.Module = case["module"]
    cl = to_channels_last if channels_last else (lambda x: x)
    image = cl(torch.randn(batch, C_IMG, size, size))
    if case["kind"] == "segmentor":
        return (lambda: module(image)), None
    t = torch.full((batch,), 500, dtype=torch.int64)
    x_t = cl(torch.randn(batch, K, size, size))
    with torch.inference_mode():
        if case["kind"] == "bbdm":
            cond = {"image": image, "prior": cl(torch.rand(batch, K, size, size)),
                    "features": cl(case["segmentor"](image).features)}
            x_t = (x_t > 0).float()
        else:
            cond = cl(module.condition(image))
    condition = (lambda: module.condition(image)) if case["kind"] == "medsegdiff_v2" else None
    return (lambda: module(x_t, t, cond)), condition


@contextlib.contextmanager
def precision(mode: str) -> Iterator[None]:
    if mode.startswith("bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def to_channels_last(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(memory_format=torch.channels_last) if obj.dim() == 4 else obj
    if isinstance(obj, dict):
        return {k: to_channels_last(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_channels_last(v) for v in obj]
    return obj


def median_time(fn: Callable[[], Any], warmup: int, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_case(case: dict[str, Any], size: int, warmup: int, runs: int) -> dict[str, Any]:
    module: nn.Module = case["module"].eval()
    row: dict[str, Any] = {"model": case["name"], "params": sum(p.numel() for p in module.parameters())}
    for mode in MODES:
        channels_last = mode.endswith("_cl")
        module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        forward, condition = make_step(case, size, batch=1, channels_last=channels_last)
        with precision(mode):
            row[f"forward_s_{mode}"] = median_time(forward, warmup, runs)
            if condition is not None:
                row[f"condition_s_{mode}"] = median_time(condition, warmup, runs)
    module.to(memory_format=torch.contiguous_format)
    return row


# ======================================================================================================
# MedSegDiff-B training step (run in a subprocess: its peak RSS is its own)
# ======================================================================================================


def train_step(size: int, batch: int, warmup: int, runs: int) -> dict[str, Any]:
    model = MODELS.build("medsegdiff", in_channels=C_IMG, num_classes=K, size="B").train()
    image, x_t = torch.randn(batch, C_IMG, size, size), torch.randn(batch, K, size, size)
    noise = torch.randn(batch, K, size, size)
    t = torch.randint(0, 1000, (batch,))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        loss = ((model(x_t, t, {"image": image}) - noise) ** 2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"model": "medsegdiff (B)", "batch": batch, "size": size, "fwd_bwd_s": statistics.median(times),
            "peak_rss_mib": peak / 1024, "rss_after_build_mib": rss_before / 1024, "vmhwm_mib": vm_hwm_mib()}


def vm_hwm_mib() -> float | None:
    """Peak RSS of this process image from ``/proc/self/status`` (cross-check of ``ru_maxrss``; Linux only)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


# ======================================================================================================
# Report
# ======================================================================================================


def render(result: dict[str, Any]) -> str:
    env = result["env"]
    size = result["image_size"]
    lines = [
        f"Measured by `benchmarks/models_table.py{' --quick' if result['quick'] else ''}` on {env['cpu']}, "
        f"{env['threads']} threads, torch {env['torch']}, commit `{env['commit'][:12]}`: batch 1, "
        f"{size}x{size}, in_channels={C_IMG}, K={K}; median of {result['runs']} runs after "
        f"{result['warmup']} warm-up. Forward = one denoiser step with the condition cached "
        "(V2's segmentor pass in brackets).",
    ]
    if result["quick"]:
        lines.append("")
        lines.append(f"**Quick run ({size}x{size}) on a shared, busy machine: smoke-test numbers, not reference "
                     "timings.** Re-run without `--quick` on a quiet machine for the 256x256 table.")
    lines += ["", "| model | parameters | fp32 (s) | fp32 + channels_last (s) | bf16 autocast + channels_last (s) |",
              "|---|---:|---:|---:|---:|"]
    for row in result["models"]:
        cells = []
        for mode in MODES:
            cell = f"{row[f'forward_s_{mode}']:.3f}"
            if f"condition_s_{mode}" in row:
                cell += f" (+{row[f'condition_s_{mode}']:.3f})"
            cells.append(cell)
        lines.append(f"| {row['model']} | {row['params'] / 1e6:.2f} M | " + " | ".join(cells) + " |")
    tr = result["train_step"]
    lines += ["", f"Training step, {tr['model']}, batch {tr['batch']}, {tr['size']}x{tr['size']}, fp32 forward + "
              f"backward: {tr['fwd_bwd_s']:.2f} s, peak RSS {tr['peak_rss_mib']:.0f} MiB (`ru_maxrss`; "
              f"{tr['rss_after_build_mib']:.0f} MiB after imports and building the model)."]
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Models\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64, 1 warm-up, 3 runs (smoke test)")
    parser.add_argument("--size", type=int, help="image size (default 256; 64 with --quick)")
    parser.add_argument("--warmup", type=int, help="warm-up runs (default 2; 1 with --quick)")
    parser.add_argument("--runs", type=int, help="timed runs (default 7; 3 with --quick)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--train-step-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = args.size or (64 if args.quick else 256)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    runs = args.runs or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.train_step_only:
        print(json.dumps(train_step(size, batch=2, warmup=min(warmup, 1), runs=max(1, runs // 2))))
        return

    # The training step runs first, in a subprocess: Linux keeps ru_maxrss across fork/exec, so the parent must
    # still be small (imports only) for the child's peak to be its own.
    cmd = [sys.executable, __file__, "--train-step-only", "--size", str(size), "--warmup", str(warmup),
           "--runs", str(runs)] + (["--threads", str(args.threads)] if args.threads else [])
    step = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(json.dumps(step), flush=True)
    rows = []
    for case in build_cases():
        rows.append(time_case(case, size, warmup, runs))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "env": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "python": platform.python_version(), **git_state()},
        "quick": args.quick, "image_size": size, "batch": 1, "warmup": warmup, "runs": runs,
        "in_channels": C_IMG, "num_classes": K, "models": rows, "train_step": step,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(render(result))
    print(f"wrote {RESULTS.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
