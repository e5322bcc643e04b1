"""Data-loading throughput on Kvasir-SEG: all 1000 pairs resized to 256x256, one DataLoader epoch at batch 8.

Measured, in images per second:

* ``uncached``: ``data.cache=False``; every item is decoded and resized in the DataLoader workers (what every
  epoch costs without the cache);
* ``cache_fill``: ``build_dataset`` with ``data.cache=True`` decodes and resizes everything on a thread pool
  (and checks every mask) before returning;
* ``first_epoch``: cache fill + the first epoch over the cache (the cold start of a cached run);
* ``cached_epoch``: the second epoch over the cache (every later epoch);
* ``cached_epoch_in_process``: the same with ``num_workers=0`` (no inter-process transfer of batches).

Writes ``benchmarks/results/data_throughput.json`` with the machine (CPU model, cores, torch threads, load
average), torch version and git commit. The machine may be shared: the load average is recorded with the result.

    .venv/bin/python benchmarks/data_throughput.py [--root ../shared/data/kvasir-seg] [--workers 2]
"""

from __future__ import annotations

import sys

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from diffmis.config import DataConfig
from diffmis.data import build_dataset
from diffmis.utils import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, git_state  # noqa: E402  (shared benchmark helpers)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_throughput.json"
DEFAULT_DATA = Path(os.environ.get("DIFFMIS_SHARED_DATA") or ROOT.parent / "shared" / "data") / "kvasir-seg"


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version(),
            **git_state()}


def all_pairs(cfg: DataConfig) -> torch.utils.data.Dataset:
    """Every Kvasir-SEG pair: the train and val splits together."""
    return torch.utils.data.ConcatDataset([build_dataset(cfg, s, train=False) for s in ("train", "val")])


def epoch_seconds(ds: torch.utils.data.Dataset, batch: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += b["image"].shape[0]
    assert n == len(ds)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(DEFAULT_DATA), help="Kvasir-SEG folder (folder layout)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (and cache-fill threads)")
    args = ap.parse_args()

    base = DataConfig(kind="folder", root=args.root, image_size=(args.size, args.size), num_workers=args.workers)
    env = machine()

    uncached = all_pairs(base.model_copy(update={"cache": False}))
    n = len(uncached)  # type: ignore[arg-type]
    t_uncached = epoch_seconds(uncached, args.batch, args.workers)
    print(f"uncached epoch: {n} images in {t_uncached:.1f}s = {n / t_uncached:.0f} images/s")

    t0 = time.perf_counter()
    cached = all_pairs(base.model_copy(update={"cache": True}))
    t_fill = time.perf_counter() - t0
    t_first = epoch_seconds(cached, args.batch, args.workers)
    t_second = epoch_seconds(cached, args.batch, args.workers)
    t_inproc = epoch_seconds(cached, args.batch, 0)
    cache_bytes = sum(a.nbytes for ds in cached.datasets for i in range(len(ds))  # type: ignore[attr-defined]
                      for a in ds.raw(i) if a is not None)
    print(f"cache fill: {t_fill:.1f}s = {n / t_fill:.0f} images/s ({cache_bytes / 2**20:.0f} MiB)")
    print(f"first cached epoch: fill + {t_first:.1f}s = {n / (t_fill + t_first):.0f} images/s")
    print(f"second cached epoch: {t_second:.1f}s = {n / t_second:.0f} images/s "
          f"(in process, no workers: {n / t_inproc:.0f} images/s)")

    result = {
        "benchmark": "data_throughput",
        "dataset": str(args.root), "images": n, "image_size": [args.size, args.size], "batch_size": args.batch,
        "workers": args.workers,
        "uncached": {"seconds": t_uncached, "images_per_s": n / t_uncached},
        "cache_fill": {"seconds": t_fill, "images_per_s": n / t_fill, "cache_mib": cache_bytes / 2**20},
        "first_epoch": {"seconds": t_fill + t_first, "images_per_s": n / (t_fill + t_first)},
        "cached_epoch": {"seconds": t_second, "images_per_s": n / t_second},
        "cached_epoch_in_process": {"seconds": t_inproc, "images_per_s": n / t_inproc},
        "env": env,
    }
    write_json(RESULTS, result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
