"""diffmis MedSegDiff against the peer implementation, ``med-seg-diff-pytorch`` 0.3.3 (lucidrains), on CPU.

The peer: ``Unet(dim=32, image_size=S, mask_channels=1, input_img_channels=3, dim_mults=(1, 2, 4, 8))`` wrapped in
``MedSegDiff(unet, timesteps=1000)`` (cosine schedule, noise prediction), about 13.5M parameters at S=128 (its
FF-Parser maps grow with S). diffmis: the ``medsegdiff`` recipe (same schedule and objective) in two layouts
(:data:`LAYOUTS`), each within 10% of the peer's parameter count at 128x128: ``peer_widths``, the peer's widths
at each of its resolutions with its 256-wide bottleneck one level deeper and one ResBlock per level (as the
shipped configs), and ``four_levels``, the earlier choice (the peer's four levels, two ResBlocks, the
closest parameter count). Both are reported.

Per image size (128 and 256) and batch 8, in one process, the variants alternate step by step (the order
rotates every repeat):

* ``train``: one optimizer step, forward (the method's training loss: random t, q_sample, network, MSE) +
  backward + AdamW step; no gradient clipping or EMA in either;
* ``denoise``: one network evaluation as in sampling (``torch.inference_mode``; diffmis reuses the condition
  computed once per image, as its sampler does).

Variants: ``peer_fp32``; ``diffmis_fp32`` and ``diffmis_fp32_four_levels`` (the two layouts in fp32);
``diffmis_auto`` (``peer_widths`` in the precision diffmis resolves on this CPU: bf16 autocast where the CPU has
native bf16, else fp32 again). Median of ``--repeats`` steps after ``--warmup`` steps; the diffmis speed-up (peer
time / diffmis time) is computed repeat by repeat (adjacent steps, so load changes on a shared machine mostly
cancel) and summarised by its median. Threads: diffmis's default (the usable cores less those other processes
keep busy; ``--threads`` to fix it), the same for every variant.
Peak memory: each (size, mode, variant) also runs alone in a fresh subprocess (two training steps, or one
denoising step; before the group's timing, with this process's heap released) whose peak RSS (VmHWM; imports
included) is reported, with the RSS after building as the baseline.

Memory guard: a larger size runs at a halved batch (recorded in its row) when a variant's peak RSS,
extrapolated from its measurement at the smaller size, would exceed ``--max-gib`` (default 0.6 x MemAvailable):
the peer's training step needs about 5.4 GiB at 128x128 batch 8, so about 20 GiB at 256x256.

Every process runs with one allocator setting (``--malloc``, default ``glibc``: the tuning the diffmis CLI
applies, for both implementations). Writes ``benchmarks/results/speed.json``.

    flock /tmp/diffmis-bench.lock .venv/bin/python benchmarks/speed.py
    .venv/bin/python benchmarks/speed.py --quick      # smoke test: 64x64, batch 2, 3 repeats, no file
    flock /tmp/diffmis-bench.lock .venv/bin/python benchmarks/speed.py --resume   # finish an interrupted run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MALLOC_SETTINGS,
    RESULTS,
    ROOT,
    CpuMonitor,
    current_rss_mib,
    ensure_malloc,
    environment,
    peak_rss_mib,
    stats,
    timed,
    write_result,
)

OUT = RESULTS / "speed.json"
PEER = {"dim": 32, "mask_channels": 1, "input_img_channels": 3, "dim_mults": (1, 2, 4, 8)}
PEER_DIFFUSION = {"timesteps": 1000}  # MedSegDiff defaults: cosine betas, objective pred_noise
C_IMG, K = 3, 1
VARIANTS = ("peer_fp32", "diffmis_fp32", "diffmis_auto", "diffmis_fp32_four_levels")
MODES = ("train", "denoise")
MATCH_SIZE = 128
LR = 1e-4


# ======================================================================================================
# Models
# ======================================================================================================


def peer_model(size: int):
    from med_seg_diff_pytorch import MedSegDiff, Unet

    unet = Unet(image_size=size, **PEER)
    return MedSegDiff(unet, **PEER_DIFFUSION)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


#: diffmis MedSegDiff layouts compared with the peer (both within 10% of its parameter count at 128x128)
LAYOUTS: dict[str, dict[str, Any]] = {
    # the peer's widths at each of its resolutions (32, 32, 64, 128 at 1/1 .. 1/8) and its 256-wide bottleneck,
    # one level deeper (1/16), with one ResBlock per level as the shipped configs
    "peer_widths": {"width": 32, "channel_mult": [1, 1, 2, 4, 8], "num_res_blocks": 1, "attention_levels": [4],
                    "head_channels": 32},
    # the earlier choice: the peer's four levels and base width, the closest parameter count (2 ResBlocks)
    "four_levels": {"width": 32, "channel_mult": [1, 2, 4, 6], "num_res_blocks": 2, "attention_levels": [3],
                    "head_channels": 32},
}
#: variant -> (layout, precision): precision "auto" is what diffmis resolves on this CPU (bf16 with native bf16)
DIFFMIS_VARIANTS = {"diffmis_fp32": ("peer_widths", "fp32"), "diffmis_auto": ("peer_widths", "auto"),
                    "diffmis_fp32_four_levels": ("four_levels", "fp32")}


def diffmis_config(params: dict[str, Any], size: int, batch: int):
    from diffmis.config import config_from_dict

    return config_from_dict({
        "experiment": {"name": "speed", "recipe": "medsegdiff"},
        "data": {"kind": "synthetic", "image_size": size, "in_channels": C_IMG, "num_classes": K},
        "model": {"name": "medsegdiff", "params": {**params, "image_size": size}},
        "diffusion": {"kind": "gaussian", "timesteps": 1000, "schedule": "cosine", "prediction": "eps"},
        "train": {"batch_size": batch, "lr": LR},
    })


def diffmis_method(params: dict[str, Any], size: int, batch: int):
    from diffmis.methods import build

    return build(diffmis_config(params, size, batch))


def layout_params() -> tuple[dict[str, Any], int]:
    """Each layout's parameter count at 128x128 and its ratio to the peer's; every one must be within 10%."""
    import torch

    torch.manual_seed(0)
    target = n_params(peer_model(MATCH_SIZE).model)
    rows = {}
    for name, c in LAYOUTS.items():
        n = n_params(diffmis_method(c, MATCH_SIZE, 1).denoiser)
        rows[name] = {"params": c, "n_params": n, "rel_diff": round(n / target - 1, 4)}
        if abs(n / target - 1) > 0.10:
            raise SystemExit(f"layout {name} has {n} parameters, more than 10% from the peer's {target}")
    return rows, target


# ======================================================================================================
# Steps
# ======================================================================================================


def make_step(variant: str, mode: str, size: int, batch: int) -> tuple[Callable[[], Any], int]:
    """A closure running one step of ``variant`` in ``mode`` on fixed random inputs; and the network's size."""
    import torch

    torch.manual_seed(0)
    image = torch.rand(batch, C_IMG, size, size)
    mask = (torch.rand(batch, K, size, size) > 0.7).float()
    x_t = torch.randn(batch, K, size, size)
    t = torch.full((batch,), 500, dtype=torch.int64)
    if variant == "peer_fp32":
        model = peer_model(size)
        net = model.model
        if mode == "train":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=LR)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                loss = model(mask, image)  # samples t, normalises the mask to [-1, 1], q_sample, MSE on eps
                loss.backward()
                opt.step()
        else:
            net.eval()

            def step() -> None:
                with torch.inference_mode():
                    net(x_t, t, image)
        return step, n_params(net)

    from diffmis.hardware import resolve_precision
    from diffmis.utils import autocast

    layout, requested = DIFFMIS_VARIANTS[variant]
    method = diffmis_method(LAYOUTS[layout], size, batch)
    run = resolve_precision(requested, "auto", "cpu")
    precision = run.precision
    if run.channels_last:
        method = method.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    if mode == "train":
        method.train()
        opt = torch.optim.AdamW(method.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(0)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(cpu, precision):
                out = method.loss(image, mask, 0, gen)
            out.total.backward()
            opt.step()
    else:
        method.eval()
        with torch.inference_mode():
            cond = method.denoiser.condition(image)

        def step() -> None:
            with torch.inference_mode(), autocast(cpu, precision):
                method.denoiser(x_t, t, cond).float()  # the sampler's model_fn
    return step, n_params(method.denoiser)


# ======================================================================================================
# Memory: one configuration alone in a subprocess
# ======================================================================================================


def memory_worker(args: argparse.Namespace) -> None:
    ensure_malloc(args.malloc)
    from diffmis.hardware import set_threads

    set_threads(args.threads or None)
    base0 = current_rss_mib()
    step, _ = make_step(args.variant, args.mode, args.size, args.batch)
    built = current_rss_mib()
    times = [timed(step) for _ in range(args.mem_steps if args.mode == "train" else 1)]
    print(json.dumps({"peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_import_mib": base0,
                      "rss_after_build_mib": built, "step_s": [round(x, 3) for x in times]}))


def measure_memory(variant: str, mode: str, size: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", "--variant", variant, "--mode", mode,
           "--size", str(size), "--batch", str(batch), "--malloc", args.malloc, "--mem-steps", str(args.mem_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ======================================================================================================
# Main
# ======================================================================================================


def release_heap() -> None:
    """Collect garbage and hand the free heap back to the OS (glibc ``malloc_trim``): with the glibc tuning a
    process otherwise keeps its peak. Called between groups only; each group warms up again before timing."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def mem_available_mib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return float("inf")


def group_batch(mode: str, size: int, batch: int, measured: dict[tuple[str, str], dict[str, Any]],
                budget_mib: float) -> tuple[int, dict[str, float]]:
    """The batch for (size, mode): ``batch``, halved while a variant's peak RSS, extrapolated from its
    measurement at a smaller size (activations ~ pixels x batch), would exceed ``budget_mib``."""
    def estimate(v: str, b: int) -> Optional[float]:
        m = measured.get((mode, v))
        if m is None:
            return None
        act = max(0.0, m["peak_rss_mib"] - m["rss_after_build_mib"])
        return m["rss_after_build_mib"] + act * (size * size * b) / (m["size"] ** 2 * m["batch"])

    b = batch
    while b > 1 and any((e := estimate(v, b)) is not None and e > budget_mib for v in VARIANTS):
        b //= 2
    return b, {v: round(e) for v in VARIANTS if (e := estimate(v, batch)) is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--malloc", default="glibc", choices=MALLOC_SETTINGS)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0, the default: diffmis's default, the usable cores less busy ones)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses (and the batch guard)")
    p.add_argument("--mem-steps", type=int, default=2,
                   help="training steps of each peak-RSS subprocess (the second holds the AdamW state and the "
                        "activations); denoise: 1")
    p.add_argument("--max-gib", type=float, default=None,
                   help="memory budget of one configuration (default: 0.6 x MemAvailable at start); a larger size "
                        "whose extrapolated peak exceeds it runs at a halved batch (recorded)")
    p.add_argument("--quick", action="store_true", help="64x64, batch 2, 3 repeats; no result file")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--resume", action="store_true",
                   help="keep the finished groups of an interrupted run in --out (same settings) and run the rest")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        return memory_worker(args)
    if args.quick:
        args.sizes, args.batch, args.repeats, args.mem_steps = [64], 2, 3, 1
    args.sizes = sorted(args.sizes)  # the memory guard extrapolates from the smaller sizes
    ensure_malloc(args.malloc)
    import torch

    from diffmis.hardware import resolve_precision, set_threads

    set_threads(args.threads or None)
    env = environment()
    budget = args.max_gib * 1024 if args.max_gib else 0.6 * mem_available_mib()
    env["mem_available_mib_start"] = round(mem_available_mib())
    mon = CpuMonitor()
    t_start = time.time()
    layouts, peer_n128 = layout_params()
    auto = resolve_precision("auto", "auto", "cpu")
    print(f"peer {peer_n128 / 1e6:.2f}M parameters at {MATCH_SIZE}; diffmis layouts "
          + ", ".join(f"{k} {v['n_params'] / 1e6:.2f}M" for k, v in layouts.items())
          + f"; diffmis_auto: {auto.describe()}", flush=True)

    results: list[dict[str, Any]] = []
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    earlier: dict[str, Any] = {}
    if args.resume and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        same = ("batch", "repeats", "warmup", "malloc", "torch_threads")
        mismatch = [k for k in same if earlier["settings"].get(k) != {
            "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup, "malloc": args.malloc,
            "torch_threads": torch.get_num_threads()}[k]]
        if mismatch or earlier["diffmis"].get("layouts") != layouts:
            raise SystemExit(f"--resume: {args.out} was run with other settings ({mismatch or 'diffmis params'})")
        results.extend(r for r in earlier["results"] if r["size"] in args.sizes and r["mode"] in args.modes)
        for r in results:
            for v, row in r["variants"].items():
                if "peak_rss_mib" in row.get("memory", {}):
                    measured[(r["mode"], v)] = {**row["memory"], "size": r["size"], "batch": r["batch"]}
        print(f"resuming: kept {[(r['size'], r['mode']) for r in results]} from {args.out}", flush=True)
    done = {(r["size"], r["mode"]) for r in results}

    def result(complete: bool) -> dict[str, Any]:
        return {
            "benchmark": "speed",
            "complete": complete,
            "settings": {"sizes": args.sizes, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                         "modes": args.modes, "malloc": args.malloc, "torch_threads": torch.get_num_threads(),
                         "order": "alternating, rotated every repeat", "optimizer": f"AdamW lr {LR}",
                         "diffmis_auto": auto.record(),
                         "speedup": "peer_fp32 step time / diffmis step time, repeat by repeat",
                         "memory": "peak RSS (VmHWM) of a fresh subprocess running only that configuration "
                                   f"({args.mem_steps} training steps / 1 denoising step), imports included",
                         "memory_budget_mib": round(budget)},
            "peer": {"package": "med-seg-diff-pytorch", "version": _version("med-seg-diff-pytorch"),
                     "unet": {**PEER, "dim_mults": list(PEER["dim_mults"]), "image_size": "per size"},
                     "diffusion": {**PEER_DIFFUSION, "beta_schedule": "cosine", "objective": "pred_noise"},
                     "n_params_128": peer_n128},
            "diffmis": {"recipe": "medsegdiff", "layouts": layouts,
                        "variants": {v: {"layout": lay, "precision": p} for v, (lay, p) in DIFFMIS_VARIANTS.items()},
                        "diffusion": "T=1000 cosine eps"},
            "results": results,
            "total_s": round(time.time() - t_start, 1),
            "environment": env,
            "load": mon.summary(),
            **({"resumed_from": {"environment": earlier["environment"], "load": earlier["load"],
                                 "total_s": earlier["total_s"], "groups": sorted(done)}} if earlier else {}),
        }

    for size in args.sizes:
        for mode in args.modes:
            if (size, mode) in done:
                continue
            batch, est = (args.batch, {}) if args.no_memory else group_batch(mode, size, args.batch, measured, budget)
            if batch != args.batch:
                print(f"  {size}px {mode}: batch {batch} instead of {args.batch} (extrapolated peak RSS at batch "
                      f"{args.batch}: {est} MiB > budget {budget:.0f} MiB)", flush=True)
            t_group = time.time()
            release_heap()  # the previous group's heap must not sit beside the subprocesses below
            memory: dict[str, dict[str, Any]] = {}
            if not args.no_memory:  # first, so that nothing else holds memory meanwhile
                for v in VARIANTS:
                    memory[v] = measure_memory(v, mode, size, batch, args)
                    if "peak_rss_mib" in memory[v]:
                        measured[(mode, v)] = {**memory[v], "size": size, "batch": batch}
                    mon.sample()
            steps: dict[str, Callable[[], Any]] = {}
            sizes_n: dict[str, int] = {}
            for v in VARIANTS:
                steps[v], sizes_n[v] = make_step(v, mode, size, batch)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.warmup):
                for v in VARIANTS:
                    timed(steps[v])
            for rep in range(args.repeats):
                order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
                for v in order:
                    times[v].append(timed(steps[v]))
                mon.sample()
                if rep == 0:
                    per = sum(times[v][0] for v in VARIANTS)
                    print(f"  {size}px {mode}: {per:.1f} s per repeat, about {per * (args.repeats - 1) / 60:.1f} "
                          f"min left in this group", flush=True)
            del steps
            row: dict[str, Any] = {"size": size, "mode": mode, "batch": batch, "variants": {}, "speedup": {}}
            if batch != args.batch:
                row["batch_note"] = (f"batch {args.batch} would need about {max(est.values())} MiB (extrapolated "
                                     f"from the smaller size) > budget {budget:.0f} MiB")
                row["estimated_peak_rss_mib_at_requested_batch"] = est
            for v in VARIANTS:
                s = stats(times[v])
                row["variants"][v] = {"n_params": sizes_n[v], "step_s": s,
                                      "images_per_s": round(batch / s["median"], 3)}
            for v in VARIANTS[1:]:
                row["speedup"][f"{v}_vs_peer_fp32"] = stats(
                    [a / b for a, b in zip(times["peer_fp32"], times[v])], 3)
            for v, mem in memory.items():
                row["variants"][v]["memory"] = mem
            row["group_s"] = round(time.time() - t_group, 1)
            results.append(row)
            print(f"{size}px {mode} batch {batch}: " + ", ".join(
                f"{v} {row['variants'][v]['step_s']['median']:.3f} s"
                + (f" / {row['variants'][v]['memory'].get('peak_rss_mib', float('nan')):.0f} MiB"
                   if "memory" in row["variants"][v] else "") for v in VARIANTS)
                + "; speed-up " + ", ".join(f"{k.split('_vs')[0]} x{v['median']:.2f}" for k, v in row["speedup"].items()),
                flush=True)
            if not args.quick:
                write_result(args.out, result(False))  # partial: an interrupted run keeps its groups

    final = result(True)
    print(json.dumps(final["load"]))
    if args.quick:
        print("quick run: no result file written")
        return
    write_result(args.out, final)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
