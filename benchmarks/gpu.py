"""The GPU check: one prepared command for a lent GPU (issue 16). Writes one JSON (``benchmarks/results/gpu.json``).

Stages, in order of importance, each written to the JSON as soon as it ends (a run cut short still reports
what it measured); a stage that would start after ``--budget-s`` is recorded as skipped:

1. ``machine``: GPU name, capability, memory, driver (``nvidia-smi``), torch, CPU.
2. ``tests``: the CUDA-marked tests (``pytest -m cuda tests/test_cuda.py``, a subprocess): autocast dtypes,
   the fp16 gradient scaler, bit-exact resume with deterministic algorithms, prediction equal to the CPU's,
   CUDA-graph replay equal to eager calls, the trainer's collectives on nccl.
3. ``recipes``: every Kvasir-SEG recipe trained ``--steps`` steps at 256x256 (the recipe's batch, precision
   ``auto``, validation off; data from ``--data``), then the validation split predicted with the recipe's
   default sampler and ensemble. Per recipe: training images/s (median of the trainer's 10-step windows after
   the first two), peak GPU memory, the resolved precision and layout, prediction seconds and images/s, NFE,
   the mean Dice reached, and the latency of one 256x256 image with an ensemble of 5 (median of 10 calls),
   with and without CUDA graphs.
4. ``peer``: diffmis MedSegDiff against ``med-seg-diff-pytorch`` 0.3.3 at equal parameters (the layout
   ``peer_widths`` of ``benchmarks/speed.py``, within 10% of the peer's count at 128x128), one training step at
   batch 8 and 128x128 / 256x256: the peer in its default precision (fp32; cuDNN's TF32 default for both),
   diffmis fp32, bf16 (what ``precision: auto`` resolves here) and bf16 channels-last. Median of ``--repeats``
   steps after ``--warmup``, variants alternating step by step.
5. ``compile``: ``torch.compile`` of the MedSegDiff denoiser in the bf16 training step (a subprocess bounded by
   the time left; ``--compile-modes``), timed beside the peer: compile seconds, step time, the speed-up over the
   peer and the steps after which the compile pays for itself.

On a CPU (``--device cpu --tiny``: 64x64 synthetic data, a few steps, 2 repeats) the same code runs in the test
suite; the CUDA-only parts (tests, graphs, peak GPU memory, compile) are recorded as not applicable.

    python benchmarks/gpu.py --out $OUT/gpu.json        # on the GPU machine (see docs/benchmarks.md "GPU")
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, environment, write_result  # noqa: E402

OUT = RESULTS / "gpu.json"
RECIPES = ("segmentor", "medsegdiff", "medsegdiff_v2", "pd_ddpm", "hidiff", "berdiff")
DATA_CANDIDATES = (ROOT / ".gpudata" / "kvasir-seg", ROOT.parent / "shared" / "data" / "kvasir-seg")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(dev: Any) -> Optional[float]:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None


def reset_peak(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ======================================================================================================
# Stages
# ======================================================================================================


def stage_machine(dev: Any) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(dev)),
                   memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                  "power.draw,temperature.gpu,utilization.gpu", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            out["nvidia_smi"] = f"not available: {err}"
    return out


def stage_tests(dev: Any, budget: Budget) -> dict[str, Any]:
    if dev.type != "cuda":
        return {"skipped": "no CUDA device: the CUDA-marked tests skip themselves"}
    log = Path(tempfile.mkdtemp(prefix="diffmis-gpu-tests-")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={log}",
           str(ROOT / "tests" / "test_cuda.py")]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60, budget.left() - 60))
    except subprocess.TimeoutExpired:
        return {"error": "timed out", "seconds": round(time.time() - t0, 1)}
    out: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
                           "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""}
    if log.is_file():
        import xml.etree.ElementTree as ET

        cases = ET.parse(log).getroot().iter("testcase")
        res = {}
        for c in cases:
            bad = c.find("failure") if c.find("failure") is not None else c.find("error")
            skip = c.find("skipped")
            res[c.get("name")] = ("failed: " + (bad.get("message") or "")[:400]) if bad is not None else \
                ("skipped" if skip is not None else "passed")
        out["cases"] = res
    if proc.returncode != 0:
        out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return out


def _kvasir_sets(args: argparse.Namespace, run_dir: Path, recipe: str) -> list[str]:
    sets = [f"experiment.output_dir={run_dir.parent}", f"experiment.name={run_dir.name}",
            f"train.max_steps={args.steps}", "train.val_every=0", "train.ckpt_every=0", "train.progress=false",
            "train.max_minutes=null", "train.log_every=10", f"data.num_workers={args.workers}"]
    if args.tiny:
        sets += ["data.kind=synthetic", "data.root=null", f"data.image_size=[{args.size}, {args.size}]",
                 "data.synthetic.n_train=8", "data.synthetic.n_val=4", "data.synthetic.n_test=1",
                 "train.batch_size=2", "train.log_every=1", "train.warmup_steps=0", "sample.batch_size=2"]
    else:
        sets.append(f"data.root={args.data}")
    if recipe == "hidiff":
        sets.append("train.pretrain_steps=0")  # every timed step is the full alternate iteration
    return sets


def _val_cases(args: argparse.Namespace, cfg: Any) -> list[tuple[Any, Any]]:
    """(image (C, H, W) raw, mask (H, W) in {0, 1}) of the validation split."""
    import numpy as np

    if args.tiny:
        from diffmis.data import build_dataset

        ds = build_dataset(cfg.data, cfg.data.val_split, train=False)
        out = []
        for i in range(len(ds)):
            it = ds[i]
            img = np.asarray(it["image"], dtype=np.float32) * 255.0
            out.append((img, np.asarray(it["mask"])[-1].astype(np.int64)))
        return out
    from diffmis.data.io import read_image, read_mask
    from diffmis.data.layouts import index_folder, resolve_split

    index = index_folder(args.data)
    split = resolve_split(index, cfg.data.val_split, train_split=cfg.data.train_split, val_split=cfg.data.val_split,
                          test_split=cfg.data.test_split, val_fraction=cfg.data.val_fraction)
    size = tuple(cfg.data.image_size)
    return [(read_image(index.images[i], size=size), (read_mask(index.masks[i], size=size) > 0).astype(np.int64))
            for _, i in split.ids]


def _dice(pred: Any, ref: Any) -> float:
    """Foreground Dice of two (H, W) label maps (the project's conventions: both empty 1, one empty 0)."""
    import torch

    from diffmis.metrics import dice_batch

    return float(dice_batch(torch.from_numpy(pred > 0)[None, None], torch.from_numpy(ref > 0)[None, None])[0, 0])


def _latency(pred: Any, image: Any, dev: Any, n: int) -> float:
    pred.predict_array(image)
    pred.predict_array(image)
    times = []
    for _ in range(n):
        sync(dev)
        t0 = time.perf_counter()
        pred.predict_array(image)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 5)


def run_recipe(recipe: str, args: argparse.Namespace, dev: Any, work: Path) -> dict[str, Any]:
    import numpy as np

    from diffmis.config import load_config
    from diffmis.inference import Predictor
    from diffmis.training import train

    run_dir = work / recipe
    cfg = load_config(f"{recipe}_kvasir", _kvasir_sets(args, run_dir, recipe))
    reset_peak(dev)
    t0 = time.time()
    res = train(cfg, run_dir, log=lambda s: print(f"    {s}", flush=True))
    train_wall = time.time() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    setup = next((r for r in lines if r.get("phase") == "setup"), {})
    rates = [r["images_per_s"] for r in lines if r.get("phase") == "train" and r.get("images_per_s")]
    timed = rates[2:] or rates
    row: dict[str, Any] = {
        "params": sum(p.numel() for p in res.method.parameters()), "steps": res.step,
        "batch": cfg.train.batch_size, "size": list(cfg.data.image_size),
        "precision": setup.get("precision"), "channels_last": setup.get("channels_last"),
        "precision_reason": setup.get("reason"), "train_images_per_s": round(statistics.median(timed), 2),
        "train_wall_s": round(train_wall, 1), "train_peak_mib": peak_mib(dev)}
    print(f"  {recipe}: {row['train_images_per_s']} images/s training ({row['precision']})", flush=True)
    del res

    cases = _val_cases(args, cfg)
    pred = Predictor.from_run(run_dir, checkpoint="last", device=dev)
    bs = cfg.sample.batch_size
    pred.predict_batch([c[0] for c in cases[:bs]])  # warm-up: cuDNN's algorithm choice, graph captures
    reset_peak(dev)
    sync(dev)
    t1 = time.perf_counter()
    dices, nfe = [], []
    for i in range(0, len(cases), bs):
        chunk = cases[i:i + bs]
        for p, (_, ref) in zip(pred.predict_batch([c[0] for c in chunk]), chunk):
            dices.append(_dice(p.label, ref))
            nfe.append(p.nfe)
    sync(dev)
    per_image = (time.perf_counter() - t1) / len(cases)
    row.update({"val_cases": len(cases), "dice": round(float(np.mean(dices)), 4),
                "predict_seconds_per_image": round(per_image, 5), "predict_images_per_s": round(1 / per_image, 2),
                "predict_peak_mib": peak_mib(dev), "sampler": pred.sampler, "sampling_steps": pred.steps,
                "ensemble": pred.ensemble, "nfe_per_batch": int(np.median(nfe)), "predict_batch": bs,
                "predict_precision": pred.precision,
                "graphs": pred.graphs.stats() if pred.graphs is not None else None})
    # one image, an ensemble of 5 (the default of the diffusion recipes), with and without CUDA graphs
    lat: dict[str, Any] = {}
    for graphs in ((True, False) if dev.type == "cuda" else (False,)):
        p1 = Predictor.from_run(run_dir, checkpoint="last", device=dev, batch_size=1, cuda_graphs=graphs,
                                ensemble=5 if pred.ensemble > 1 else 1)
        lat["graphs" if graphs else "eager"] = _latency(p1, cases[0][0], dev, args.latency_calls)
    row["latency_one_image_s"] = lat
    row["latency_ensemble"] = 5 if pred.ensemble > 1 else 1
    print(f"  {recipe}: Dice {row['dice']}, {row['predict_images_per_s']} images/s predicting "
          f"(ensemble {pred.ensemble}, NFE {row['nfe_per_batch']}), latency {lat}", flush=True)
    return row


def stage_recipes(args: argparse.Namespace, dev: Any, budget: Budget, doc: dict[str, Any],
                  save: Callable[[], None]) -> None:
    work = Path(tempfile.mkdtemp(prefix="diffmis-gpu-runs-"))
    rows: dict[str, Any] = doc.setdefault("recipes", {})
    for recipe in args.recipes:
        if budget.left() < 30:
            rows[recipe] = {"skipped": "out of time"}
            continue
        try:
            rows[recipe] = run_recipe(recipe, args, dev, work)
        except Exception as err:  # noqa: BLE001 - record and go on with the next recipe
            import traceback

            rows[recipe] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
            print(f"  {recipe}: ERROR {err}", flush=True)
        save()


# ---- the peer comparison ------------------------------------------------------------------------------


def peer_steps(size: int, batch: int, dev: Any, variants: list[str], mode: Optional[str] = None
               ) -> dict[str, Callable[[], None]]:
    import torch

    from diffmis.utils import autocast
    from speed import LAYOUTS, diffmis_method, peer_model

    torch.manual_seed(0)
    image = torch.rand(batch, 3, size, size, device=dev)
    mask = (torch.rand(batch, 1, size, size, device=dev) > 0.7).float()
    steps: dict[str, Callable[[], None]] = {}
    for v in variants:
        if v == "peer_fp32":
            model = peer_model(size).to(dev).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                model(mask, image).backward()
                opt.step()
        else:
            precision = "fp32" if "fp32" in v else "bf16"
            method = diffmis_method(LAYOUTS["peer_widths"], size, batch).to(dev).train()
            img = image
            if v.endswith("_cl"):
                method = method.to(memory_format=torch.channels_last)
                img = image.contiguous(memory_format=torch.channels_last)
            if v.endswith("_compiled"):
                method.denoiser = torch.compile(method.denoiser, mode=mode)
            opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
            gen = torch.Generator(device=dev).manual_seed(0)

            def step(method=method, opt=opt, img=img, precision=precision, gen=gen) -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(dev, precision):
                    out = method.loss(img, mask, 0, gen)
                out.total.backward()
                opt.step()
        steps[v] = step
    return steps


def time_steps(steps: dict[str, Callable[[], None]], dev: Any, warmup: int, repeats: int) -> dict[str, list[float]]:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(dev)
    times: dict[str, list[float]] = {v: [] for v in steps}
    names = list(steps)
    for r in range(repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:  # the order rotates every repeat
            sync(dev)
            t0 = time.perf_counter()
            steps[v]()
            sync(dev)
            times[v].append(time.perf_counter() - t0)
    return times


def stage_peer(args: argparse.Namespace, dev: Any) -> dict[str, Any]:
    import torch

    try:
        import med_seg_diff_pytorch  # noqa: F401
    except ImportError:
        return {"skipped": "med-seg-diff-pytorch is not installed (pip install -e '.[benchmark]')"}
    from speed import LAYOUTS, MATCH_SIZE, diffmis_method, n_params, peer_model

    torch.manual_seed(0)
    target = n_params(peer_model(MATCH_SIZE).model)
    ours = n_params(diffmis_method(LAYOUTS["peer_widths"], MATCH_SIZE, 1).denoiser)
    out: dict[str, Any] = {"params_at_128": {"peer": target, "diffmis": ours, "rel_diff": round(ours / target - 1, 4)},
                           "batch": args.peer_batch, "sizes": {}}
    variants = ["peer_fp32", "diffmis_fp32", "diffmis_bf16"] + (["diffmis_bf16_cl"] if dev.type == "cuda" else [])
    for size in args.peer_sizes:
        steps = peer_steps(size, args.peer_batch, dev, variants)
        times = time_steps(steps, dev, args.warmup, args.repeats)
        med = {v: statistics.median(t) for v, t in times.items()}
        row = {v: {"step_s": round(m, 5), "images_per_s": round(args.peer_batch / m, 1)} for v, m in med.items()}
        for v in variants[1:]:
            ratios = [p / d for p, d in zip(times["peer_fp32"], times[v])]
            row[v]["speedup_vs_peer"] = round(statistics.median(ratios), 3)
        out["sizes"][str(size)] = row
        print(f"  peer {size}x{size}: " + ", ".join(f"{v} {r['step_s'] * 1e3:.1f} ms" for v, r in row.items()),
              flush=True)
        del steps
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def compile_worker(args: argparse.Namespace) -> None:
    """One subprocess: the MedSegDiff training step at ``--peer-sizes[-1]``: the peer (fp32), diffmis bf16 eager,
    then diffmis bf16 with the denoiser compiled (``--compile-modes``). Prints a JSON line after each measurement
    (the caller keeps the last, so a run stopped mid-compile still reports the eager figures)."""
    import torch

    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the trainer sets it on CUDA; for the peer too
    size = args.peer_sizes[-1]
    res: dict[str, Any] = {"size": size, "batch": args.peer_batch, "cudnn_benchmark": True}
    base = peer_steps(size, args.peer_batch, dev, ["peer_fp32", "diffmis_bf16"])
    t = time_steps(base, dev, args.warmup, args.repeats)
    res["peer_fp32_step_s"] = round(statistics.median(t["peer_fp32"]), 5)
    res["eager_bf16_step_s"] = round(statistics.median(t["diffmis_bf16"]), 5)
    res["eager_speedup_vs_peer"] = round(statistics.median(
        [p / d for p, d in zip(t["peer_fp32"], t["diffmis_bf16"])]), 3)
    print(json.dumps(res), flush=True)
    for mode in args.compile_modes:
        t0 = time.perf_counter()
        compiled = peer_steps(size, args.peer_batch, dev, ["diffmis_bf16_compiled"], mode=mode)
        fn = compiled["diffmis_bf16_compiled"]
        for _ in range(3):
            fn()
        sync(dev)
        row: dict[str, Any] = {"compile_s": round(time.perf_counter() - t0, 1)}
        t = time_steps({"peer_fp32": base["peer_fp32"], "c": fn}, dev, 2, args.repeats)
        row["step_s"] = round(statistics.median(t["c"]), 5)
        row["speedup_vs_peer"] = round(statistics.median([p / d for p, d in zip(t["peer_fp32"], t["c"])]), 3)
        gain = res["eager_bf16_step_s"] - row["step_s"]
        row["pays_back_after_steps"] = int(row["compile_s"] / gain) if gain > 0 else None
        res[f"compiled_{mode}"] = row
        print(json.dumps(res), flush=True)
        del compiled, fn


def stage_compile(args: argparse.Namespace, dev: Any, budget: Budget) -> dict[str, Any]:
    if dev.type != "cuda":
        return {"skipped": "measured on CUDA only (inductor on a CPU is another question)"}
    left = budget.left() - 10
    if left < 60:
        return {"skipped": f"out of time ({budget.left():.0f} s left)"}
    cmd = [sys.executable, __file__, "--compile-worker", "--device", "cuda", "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--peer-batch", str(args.peer_batch), "--peer-sizes",
           *[str(s) for s in args.peer_sizes], "--compile-modes", *args.compile_modes]
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        def text(b: Any) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        stdout, stderr, rc, timed_out = text(err.stdout), text(err.stderr), None, True
    rows = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    out: dict[str, Any] = json.loads(rows[-1]) if rows else {}
    if timed_out:
        out["stopped"] = f"the budget's {left:.0f} s ran out before every mode was measured"
    elif rc != 0:
        out["error"] = stderr[-2000:]
    return out


# ======================================================================================================
# Main
# ======================================================================================================


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, read off the measurements."""
    rec = {k: v for k, v in doc.get("recipes", {}).items() if isinstance(v, dict)}
    ok = [k for k, v in rec.items() if "dice" in v]
    tests = doc.get("tests", {})
    out: dict[str, Any] = {
        "every_recipe_trains_and_predicts": {"met": len(ok) == len(RECIPES), "ran": ok,
                                             "failed": [k for k in rec if k not in ok]},
        "cuda_tests_pass": {"met": tests.get("returncode") == 0, "summary": tests.get("summary")},
    }
    peer = doc.get("peer", {}).get("sizes", {})
    if peer:
        sp = {s: r.get("diffmis_bf16", {}).get("speedup_vs_peer") for s, r in peer.items()}
        out["medsegdiff_train_3x_peer"] = {"met": all(v is not None and v >= 3 for v in sp.values()),
                                           "bf16_speedup_by_size": sp}
    lat = {k: v.get("latency_one_image_s") for k, v in rec.items() if v.get("latency_one_image_s")}
    if lat:
        best = {k: min(v.values()) for k, v in lat.items()}
        out["predict_256_ensemble5_le_0.05s"] = {"met": all(b <= 0.05 for b in best.values()), "best_s": best}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="64x64 synthetic data, few steps: the CPU rehearsal")
    p.add_argument("--data", type=Path, default=None, help="Kvasir-SEG folder (default: .gpudata/kvasir-seg, "
                                                           "else ../shared/data/kvasir-seg)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--latency-calls", type=int, default=10)
    p.add_argument("--peer-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--peer-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=480.0, help="stages that would start later are skipped")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "recipes", "peer", "compile"])
    p.add_argument("--compile-modes", nargs="+", default=["default", "reduce-overhead"],
                   help="torch.compile modes measured by the compile stage, in this order")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    if args.compile_worker:
        return compile_worker(args)
    if args.device == "cpu" and torch.cuda.is_available():  # the trainer takes CUDA whenever it sees one
        raise SystemExit("--device cpu on a machine with a GPU: run with CUDA_VISIBLE_DEVICES= set")
    dev = torch.device(args.device)
    args.size = 64 if args.tiny else 256
    if args.tiny:
        args.steps, args.latency_calls, args.peer_sizes = min(args.steps, 3), 2, [64]
        args.peer_batch, args.warmup, args.repeats = 2, 1, 2
    else:
        args.data = args.data or next((d for d in DATA_CANDIDATES if (d / "images").is_dir()), None)
        if args.data is None:
            raise SystemExit("Kvasir-SEG not found: pass --data /path/to/kvasir-seg (images/, masks/, splits/)")
    if args.workers is None:
        args.workers = 8 if dev.type == "cuda" else 0

    budget = Budget(args.budget_s)
    doc: dict[str, Any] = {"benchmark": "gpu_check", "command": " ".join(sys.argv), "tiny": args.tiny,
                           # the device machine gets a copy of the tree without .git: the caller names the commit
                           "commit_sent": os.environ.get("DIFFMIS_COMMIT"),
                           "settings": {"steps": args.steps, "size": args.size, "data": str(args.data),
                                        "workers": args.workers, "peer_sizes": args.peer_sizes,
                                        "peer_batch": args.peer_batch, "warmup": args.warmup,
                                        "repeats": args.repeats, "budget_s": args.budget_s},
                           "environment": environment(), "stages_s": {}}

    def save() -> None:
        doc["targets"] = targets(doc)
        doc["elapsed_s"] = round(time.time() - budget.t0, 1)
        write_result(args.out, doc)

    def stage(name: str, fn: Callable[[], Any]) -> None:
        if name in args.skip:
            doc[name] = {"skipped": "--skip"}
            return
        print(f"== {name} ({budget.left():.0f} s of the budget left)", flush=True)
        t0 = time.time()
        try:
            res = fn()
            if res is not None:
                doc[name] = res
        except Exception as err:  # noqa: BLE001 - a stage's failure is a finding; the others still run
            import traceback

            doc[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            print(f"  {name}: ERROR {err}", flush=True)
        doc["stages_s"][name] = round(time.time() - t0, 1)
        save()

    stage("machine", lambda: stage_machine(dev))
    stage("tests", lambda: stage_tests(dev, budget))
    stage("recipes", lambda: stage_recipes(args, dev, budget, doc, save))
    stage("peer", lambda: stage_peer(args, dev) if budget.left() > 40 else {"skipped": "out of time"})
    stage("compile", lambda: stage_compile(args, dev, budget))
    print(json.dumps(doc["targets"], indent=1))
    print(f"wrote {args.out} in {doc['elapsed_s']} s")


if __name__ == "__main__":
    main()
