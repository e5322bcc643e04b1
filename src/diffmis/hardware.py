"""The machine at hand: CPU model and ISA flags, usable cores, and the precision / layout / threads chosen for it.

Nothing here assumes one kind of machine. The choices are made at run time from what the process can see:

* **Precision** (``train.precision: auto``, the default): on CUDA bf16 where the device supports it, else fp16
  with a gradient scaler (compute capability >= 5.3), else fp32. On a CPU bf16 only where the CPU executes it
  natively (AMX-BF16 or AVX512-BF16 in its flags, and neither oneDNN nor ATen capped below that ISA by
  ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY``), else fp32: without native bf16, autocast emulates it and
  runs many times slower (``benchmarks/results/precision.json``). An explicit ``fp32`` / ``bf16`` / ``fp16``
  always wins; an explicit ``bf16`` on a CPU without native bf16 warns with the measured cost.
* **channels_last** (``train.channels_last: auto``): on only where it measured faster for that device kind, and
  so far that is nowhere: NCHW measured faster for fp32 (Intel Xeon with AMX, AMD EPYC Zen 4) and for bf16 on
  AVX512-BF16 without AMX (EPYC Zen 4, ``benchmarks/results/precision.json``); bf16 on AMX and CUDA have not
  been compared here, so they stay NCHW until ``benchmarks/precision.py`` shows otherwise. ``true`` forces it.
* **Threads**: the cores this process may use (CPU affinity, capped by a cgroup CPU quota), less the cores other
  processes keep busy at normal priority when it starts (:func:`default_threads`); ``--threads`` overrides it.

Imports nothing heavy at module level (the CLI reads the CPU before torch loads).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

__all__ = [
    "CpuInfo",
    "CudaInfo",
    "Resolved",
    "cpu_info",
    "cuda_info",
    "prefer_fast_kernels",
    "usable_cores",
    "default_threads",
    "busy_cores",
    "ThreadChoice",
    "resolve_precision",
    "resolve_for",
    "set_threads",
    "machine_record",
    "EMULATED_BF16_COST",
]

Precision = Literal["fp32", "bf16", "fp16"]
Requested = Literal["auto", "fp32", "bf16", "fp16"]

#: What emulated bf16 cost where it was measured (``benchmarks/precision.py``; results/precision.json): the
#: hidiff_mni config at 96x96, batch 8, 2 threads, AMD EPYC (Zen 4) with oneDNN and ATen capped to AVX2.
#: Quoted by the warning an explicit ``bf16`` gets on a CPU without native bf16.
EMULATED_BF16_COST = "training 18x and prediction 48x slower than fp32 (hidiff_mni 96x96, AVX2-capped EPYC)"

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above which bf16 dot products run natively
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}


# ======================================================================================================
# CPU
# ======================================================================================================


@dataclass(frozen=True)
class CpuInfo:
    """What the process knows about its CPU.

    Attributes:
        model: marketing name (``/proc/cpuinfo`` "model name"), else what ``platform`` says.
        arch: ``platform.machine()`` (``x86_64``, ``aarch64``, ...).
        flags: ISA feature flags (``/proc/cpuinfo`` "flags" / "Features"), lower case.
        onednn_cap: ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) if set, upper case.
        aten_cap: ``ATEN_CPU_CAPABILITY`` if set, lower case.
    """

    model: str
    arch: str
    flags: frozenset[str] = field(default_factory=frozenset)
    onednn_cap: Optional[str] = None
    aten_cap: Optional[str] = None

    @property
    def native_bf16(self) -> bool:
        """True where bf16 matrix work runs in hardware: AMX-BF16 or AVX512-BF16 (x86), not capped below it."""
        if self.arch not in ("x86_64", "AMD64", "i686", "x86"):
            return False  # aarch64 etc.: not measured in this project -> fp32
        if not ({"amx_bf16", "avx512_bf16"} & self.flags):
            return False
        if self.onednn_cap is not None and self.onednn_cap not in _ONEDNN_BF16_ISAS:
            return False
        if self.aten_cap is not None and self.aten_cap not in ("avx512", "default"):
            return False
        return True

    @property
    def isa(self) -> str:
        """Short name of the widest relevant ISA: ``AMX``, ``AVX512-BF16``, ``AVX512``, ``AVX2``, ... ."""
        f = self.flags
        for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX512", "avx512f"),
                           ("AVX2", "avx2"), ("AVX", "avx"), ("NEON", "asimd")):
            if flag in f:
                return name
        return "baseline"

    def isa_summary(self) -> str:
        """The ISA and any cap put on it, e.g. ``AVX512-BF16, ONEDNN_MAX_CPU_ISA=AVX2``."""
        caps = [f"ONEDNN_MAX_CPU_ISA={self.onednn_cap}"] if self.onednn_cap else []
        caps += [f"ATEN_CPU_CAPABILITY={self.aten_cap}"] if self.aten_cap else []
        return ", ".join([self.isa, *caps])

    def summary(self) -> str:
        return f"{self.model} ({self.isa_summary()})"

    def record(self) -> dict[str, Any]:
        """JSON-able record for benchmark files: model, ISA, the flags that matter, caps."""
        relevant = sorted(x for x in self.flags if x.startswith(("avx", "amx", "fma", "sse4", "f16c", "asimd",
                                                                  "sve", "bf16", "i8mm")))
        return {"model": self.model, "arch": self.arch, "isa": self.isa, "native_bf16": self.native_bf16,
                "flags": relevant, "onednn_max_cpu_isa": self.onednn_cap, "aten_cpu_capability": self.aten_cap}


def _read_cpuinfo() -> tuple[Optional[str], frozenset[str]]:
    model: Optional[str] = None
    flags: frozenset[str] = frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.lower().split())
    return model, flags


def cpu_info() -> CpuInfo:
    """The CPU of this process (read each call: cheap, and tests may change the environment)."""
    model, flags = _read_cpuinfo()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    return CpuInfo(model=model or platform.processor() or platform.machine() or "unknown",
                   arch=platform.machine(), flags=flags, onednn_cap=onednn.upper() if onednn else None,
                   aten_cap=aten.lower() if aten else None)


def _cgroup_quota() -> Optional[float]:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (rounded up), >= 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _cpu_times() -> Optional[tuple[float, float]]:
    """(CPU seconds the whole machine spent busy at normal priority, this process's own CPU seconds)."""
    import resource

    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    # user, nice, system, idle, iowait, irq, softirq, steal: "nice" (niced processes) and idle/iowait left out
    busy = sum(fields[i] for i in (0, 2, 5, 6, 7) if i < len(fields)) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime


def busy_cores(interval: float = 0.25) -> float:
    """Cores that *other* processes keep busy at normal priority, measured over ``interval`` seconds (0 where
    ``/proc/stat`` is missing). Niced processes are not counted: they measured harmless (threads.json)."""
    import time

    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None:
        return 0.0
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / interval)


@dataclass(frozen=True)
class ThreadChoice:
    """Torch threads chosen for this process: ``threads``, of ``usable`` cores, with others keeping ``busy`` busy."""

    threads: int
    usable: int
    busy: float = 0.0
    explicit: bool = False

    def describe(self) -> str:
        if self.explicit:
            return f"{self.threads} torch thread(s) (--threads)"
        why = f"; other processes keep {self.busy:.1f} core(s) busy" if self.threads < self.usable else ""
        return f"{self.threads} torch thread(s) of {self.usable} usable core(s){why}"


def default_threads(measure_load: bool = True) -> ThreadChoice:
    """Torch threads by default: :func:`usable_cores`, less the cores other processes keep busy at normal
    priority (a second thread on a core another job holds made a training step 2.3x slower than one thread,
    ``benchmarks/results/threads.json``), shared among the processes torchrun starts on this node
    (``LOCAL_WORLD_SIZE``); at least 1."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    share = int(local) if local and local.isdigit() and int(local) > 0 else 1
    usable = usable_cores()
    busy = busy_cores() if measure_load and usable > 1 else 0.0
    n = usable - min(usable - 1, int(busy + 0.5))
    return ThreadChoice(threads=max(1, n // share), usable=usable, busy=round(busy, 2))


def set_threads(threads: Optional[int] = None) -> ThreadChoice:
    """Set torch's intra-op threads to ``threads`` (default :func:`default_threads`); return the choice.

    Raises:
        ValueError: ``threads`` < 1.
    """
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    choice = default_threads() if threads is None else ThreadChoice(int(threads), usable_cores(), explicit=True)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


# ======================================================================================================
# CUDA
# ======================================================================================================


@dataclass(frozen=True)
class CudaInfo:
    """A CUDA device: name, compute capability, bf16 support."""

    name: str
    capability: tuple[int, int]
    bf16: bool


def cuda_info(device: Any = None) -> Optional[CudaInfo]:
    """The CUDA device's description, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    idx = torch.device(device).index if device is not None and torch.device(device).index is not None else \
        torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    return CudaInfo(name=torch.cuda.get_device_name(idx), capability=(int(cap[0]), int(cap[1])),
                    bf16=bool(torch.cuda.is_bf16_supported()) and cap[0] >= 8)


# ======================================================================================================
# Resolution
# ======================================================================================================


@dataclass(frozen=True)
class Resolved:
    """The precision and layout a run uses on this device, and why.

    Attributes:
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast dtype; fp32 = no autocast).
        channels_last: convert the model and inputs to channels-last.
        grad_scaler: train with a gradient scaler (fp16).
        reason: one phrase, e.g. ``auto: CPU has no native bf16``.
        warning: a line to show the user (explicit bf16 on a CPU that emulates it), else None.
    """

    precision: Precision
    channels_last: bool
    grad_scaler: bool
    reason: str
    warning: Optional[str] = None

    def describe(self) -> str:
        return f"precision={self.precision} ({self.reason}), channels_last={str(self.channels_last).lower()}"

    def record(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last, "grad_scaler": self.grad_scaler,
                "reason": self.reason}


def resolve_precision(requested: str, channels_last: Union[bool, str], device_type: str, *,
                      cpu: Optional[CpuInfo] = None, cuda: Optional[CudaInfo] = None) -> Resolved:
    """Turn ``train.precision`` / ``train.channels_last`` (``auto`` or explicit) into what this device runs.

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        channels_last: ``auto``, True or False.
        device_type: ``cpu`` or ``cuda`` (other devices: fp32, NCHW).
        cpu: the CPU (default :func:`cpu_info`); only read for CPU devices.
        cuda: the CUDA device (default :func:`cuda_info`); only read for CUDA devices.

    Raises:
        ValueError: an unknown precision name.
    """
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16; got {requested!r}")
    warning = None
    if device_type == "cuda":
        dev = cuda if cuda is not None else cuda_info()
        if requested != "auto":
            prec, reason = requested, "explicit"
        elif dev is not None and dev.bf16:
            prec, reason = "bf16", f"auto: {dev.name} supports bf16"
        elif dev is not None and dev.capability >= (5, 3):
            prec, reason = "fp16", f"auto: {dev.name} (sm_{dev.capability[0]}{dev.capability[1]}) has no bf16"
        else:
            prec, reason = "fp32", "auto: this GPU has no fast half precision"
    elif device_type == "cpu":
        info = cpu if cpu is not None else cpu_info()
        if requested != "auto":
            prec, reason = requested, "explicit"
            if requested == "bf16" and not info.native_bf16:
                warning = (f"precision=bf16 on a CPU without native bf16 ({info.summary()}): autocast emulates "
                           f"it; measured {EMULATED_BF16_COST}. Use precision: auto (fp32 here).")
        elif info.native_bf16:
            prec, reason = "bf16", f"auto: CPU has native bf16 ({info.isa_summary()})"
        else:
            prec, reason = "fp32", f"auto: CPU has no native bf16 ({info.isa_summary()})"
    else:
        prec = requested if requested != "auto" else "fp32"
        reason = "explicit" if requested != "auto" else f"auto: {device_type} device"
    if channels_last == "auto":
        cl = False  # faster nowhere it was compared (module docstring; results/precision.json)
    elif isinstance(channels_last, bool):
        cl = channels_last
    else:
        raise ValueError(f"channels_last must be auto, true or false; got {channels_last!r}")
    return Resolved(precision=prec, channels_last=cl, grad_scaler=prec == "fp16", reason=reason,  # type: ignore[arg-type]
                    warning=warning)


def resolve_for(requested: str, channels_last: Union[bool, str], device: Any, spatial_dims: int = 2) -> Resolved:
    """:func:`resolve_precision` for a ``torch.device`` (or its name) on this machine; 3D runs
    (``spatial_dims=3``) keep the contiguous layout (channels-last is a 4-D memory format)."""
    import dataclasses

    import torch

    dev = torch.device(device)
    out = resolve_precision(requested, channels_last, dev.type, cuda=cuda_info(dev) if dev.type == "cuda" else None)
    if spatial_dims == 3 and out.channels_last:
        out = dataclasses.replace(out, channels_last=False)
    if spatial_dims == 3 and requested == "auto" and dev.type == "cpu" and out.precision == "bf16":
        # measured on MSD Hippocampus (AMD EPYC, AVX512-BF16): 3D training under bf16 autocast diverged to NaN in
        # 2 of 4 identical 150-step segmentor runs (the order of the threads' bf16 accumulations differs from run
        # to run); fp32 never did, at 1.23x the step time
        out = dataclasses.replace(out, precision="fp32", reason="auto: 3D on a CPU, where bf16 training "
                                                                 "diverged to NaN")
    return out


def prefer_fast_kernels(device: Any) -> None:
    """For work on ``device`` (a ``torch.device`` or its name): on a CUDA device, let cuDNN time its convolution
    algorithms once per shape and keep the fastest (``cudnn.benchmark``; training and sampling repeat the same
    shapes thousands of times). Nothing elsewhere, nor when deterministic algorithms were asked for
    (``torch.use_deterministic_algorithms``): the choice could differ between runs."""
    import torch

    if torch.device(device).type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True


def machine_record() -> dict[str, Any]:
    """CPU (model, ISA flags, caps), usable cores, torch threads and versions, GPU, allocator, load: the record
    every benchmark JSON carries."""
    import torch

    cuda = cuda_info()
    info: dict[str, Any] = {
        "cpu": cpu_info().record(), "usable_cores": usable_cores(), "os_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "cuda": None if cuda is None else {"name": cuda.name, "capability": list(cuda.capability), "bf16": cuda.bf16},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "ld_preload": os.environ.get("LD_PRELOAD"),
        "malloc_tuned_in_process": os.environ.get("DIFFMIS_MALLOC_TUNED") == "1",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info
