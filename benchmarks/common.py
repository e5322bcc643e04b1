"""Shared helpers of the benchmark scripts: the machine and software record, the allocator setting, timing.

Every result JSON carries :func:`environment` (git commit and whether ``src/`` differs from it, CPU model, cores,
torch threads and version, load average, the allocator variables) and a :class:`CpuMonitor` summary: the load
average sampled during the run and the CPU time that *other* processes used meanwhile (the machine is shared; a
high ``others_cores`` means the timings are noisy).

Allocator settings (:data:`MALLOC_SETTINGS`), applied to a process through its environment at start:

* ``default``: glibc with its defaults (``GLIBC_TUNABLES`` and ``LD_PRELOAD`` unset);
* ``glibc``: the tuning that the diffmis CLI applies (``GLIBC_TUNABLES`` = :data:`GLIBC_TUNING`);
* ``mallopt``: glibc defaults at start, then ``diffmis.utils.tune_malloc()`` (mallopt) in the process;
* ``jemalloc``, ``tcmalloc``: ``LD_PRELOAD`` of the Debian libraries (``libjemalloc2``,
  ``libtcmalloc-minimal4``) where installed.

``DIFFMIS_NO_MALLOC_TUNING=1`` is set in every case so that nothing re-executes itself with another setting.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from diffmis.benchmarking import cpu_model  # the CPU model name; also in every `diffmis benchmark` JSON
from diffmis.hardware import machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the value the diffmis CLI (and the Makefile) put in GLIBC_TUNABLES
GLIBC_TUNING = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=68719476736"
_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_PRELOADS = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so")}
MALLOC_SETTINGS = ("default", "glibc", "mallopt", "jemalloc", "tcmalloc")
_ENV_KEYS = ("GLIBC_TUNABLES", "LD_PRELOAD", "DIFFMIS_NO_MALLOC_TUNING", "DIFFMIS_MALLOC_SETTING", "OMP_NUM_THREADS",
             "MKL_NUM_THREADS")


# ======================================================================================================
# Machine and software
# ======================================================================================================


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    return []


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (empty where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def git_state() -> dict[str, Any]:
    """HEAD commit and the files under src/ and benchmarks/ that differ from it (uncommitted)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "src", "benchmarks").splitlines()
                 if not ln[3:].startswith("benchmarks/results/")]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "uncommitted": []}
    return {"commit": sha, "uncommitted": dirty}


def environment() -> dict[str, Any]:
    """The record every result carries (call it in the measuring process, after torch threads are set)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        **git_state(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "machine": machine_record(),  # CPU model, ISA flags and caps, usable cores, native bf16
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "glibc": platform.libc_ver()[1],
        "loadavg_start": loadavg(),
        "env": {k: os.environ.get(k) for k in _ENV_KEYS if os.environ.get(k) is not None},
        "malloc_setting": os.environ.get("DIFFMIS_MALLOC_SETTING", describe_malloc(os.environ)),
    }


# ======================================================================================================
# Load on the machine while we measure
# ======================================================================================================


def _busy_jiffies() -> Optional[int]:
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(f) - f[3] - (f[4] if len(f) > 4 else 0)  # all but idle and iowait
    return None


def _own_cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CpuMonitor:
    """CPU used by other processes between ``start`` and ``summary`` (from /proc/stat minus our own rusage,
    children included), plus load-average samples taken by :meth:`sample`."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.busy0 = _busy_jiffies()
        self.own0 = _own_cpu_seconds()
        self.samples: list[float] = []
        self.sample()

    def sample(self) -> None:
        la = loadavg()
        if la:
            self.samples.append(la[0])

    def summary(self) -> dict[str, Any]:
        self.sample()
        wall = time.time() - self.t0
        out: dict[str, Any] = {"wall_s": round(wall, 1), "loadavg_end": loadavg(),
                               "loadavg_1m_max": max(self.samples) if self.samples else None,
                               "loadavg_1m_mean": round(statistics.fmean(self.samples), 2) if self.samples else None}
        busy1 = _busy_jiffies()
        if self.busy0 is not None and busy1 is not None and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            total = (busy1 - self.busy0) / hz
            own = _own_cpu_seconds() - self.own0
            out["own_cores"] = round(own / wall, 2)
            out["others_cores"] = round(max(0.0, total - own) / wall, 2)
        return out


# ======================================================================================================
# Allocator settings
# ======================================================================================================


def find_preload(name: str) -> Optional[str]:
    for d in _LIBDIRS:
        for lib in _PRELOADS[name]:
            p = Path(d) / lib
            if p.exists():
                return str(p)
    return None


def available_malloc_settings() -> list[str]:
    return [s for s in MALLOC_SETTINGS if s not in _PRELOADS or find_preload(s)]


def malloc_env(setting: str, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment of a child process that runs with ``setting`` (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "DIFFMIS_REEXECED"):
        env.pop(k, None)
    env["DIFFMIS_NO_MALLOC_TUNING"] = "1"
    env["DIFFMIS_MALLOC_SETTING"] = setting
    if setting == "glibc":
        env["GLIBC_TUNABLES"] = GLIBC_TUNING
    elif setting in _PRELOADS:
        lib = find_preload(setting)
        if lib is None:
            raise RuntimeError(f"{setting} is not installed (apt-get install libjemalloc2 libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = lib
    elif setting not in ("default", "mallopt"):
        raise ValueError(f"unknown malloc setting {setting!r}; one of {MALLOC_SETTINGS}")
    return env


def describe_malloc(env: dict[str, str]) -> str:
    if env.get("LD_PRELOAD"):
        return f"LD_PRELOAD={env['LD_PRELOAD']}"
    if env.get("GLIBC_TUNABLES"):
        return "glibc" if env["GLIBC_TUNABLES"] == GLIBC_TUNING else f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}"
    return "default"


def ensure_malloc(setting: str) -> None:
    """Make the current process run with ``setting``: re-execute it once with the environment of that setting
    when the environment differs (GLIBC_TUNABLES and LD_PRELOAD are read at process start); apply mallopt."""
    want = malloc_env(setting)
    keys = ("GLIBC_TUNABLES", "LD_PRELOAD", "DIFFMIS_MALLOC_SETTING")
    if any(os.environ.get(k) != want.get(k) for k in keys):
        if os.environ.get("_DIFFMIS_BENCH_REEXEC"):
            raise RuntimeError(f"could not apply the malloc setting {setting!r}")
        want["_DIFFMIS_BENCH_REEXEC"] = "1"
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], want)
    os.environ["DIFFMIS_NO_MALLOC_TUNING"] = "1"
    if setting == "mallopt":
        from diffmis.utils import tune_malloc

        tune_malloc()


# ======================================================================================================
# Timing
# ======================================================================================================


def peak_rss_mib() -> float:
    """Peak resident set size of this process image, in MiB.

    ``VmHWM`` of /proc/self/status where available: ``getrusage().ru_maxrss`` survives ``exec`` and so, in a
    child started by ``subprocess`` (vfork + exec), starts at the *parent's* peak; VmHWM belongs to the new image.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def current_rss_mib() -> Optional[float]:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return None


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stats(values: Iterable[float], digits: int = 4) -> dict[str, Any]:
    v = list(values)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0], v[0], v[0]]
    return {"n": len(v), "median": round(statistics.median(v), digits), "min": round(min(v), digits),
            "max": round(max(v), digits), "q1": round(q[0], digits), "q3": round(q[2], digits),
            "values": [round(x, digits) for x in v]}


def write_result(path: Path, obj: dict[str, Any]) -> None:
    from diffmis.utils import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
