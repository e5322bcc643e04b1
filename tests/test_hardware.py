"""Precision, layout and threads chosen for the machine at hand (diffmis.hardware), with CPUs and GPUs mocked."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny import tiny_config
from diffmis import hardware
from diffmis.config import config_from_dict
from diffmis.hardware import CpuInfo, CudaInfo, resolve_precision
from diffmis.training import train
from diffmis.checkpoint import read_state

AMX = CpuInfo("Intel Xeon (Sapphire Rapids)", "x86_64",
              frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"}))
ZEN4 = CpuInfo("AMD EPYC (Zen 4)", "x86_64", frozenset({"avx2", "avx512f", "avx512_bf16", "fma"}))
AVX2 = CpuInfo("AMD EPYC (Zen 2)", "x86_64", frozenset({"avx", "avx2", "fma", "f16c"}))
AVX512_NO_BF16 = CpuInfo("Intel Xeon (Skylake)", "x86_64", frozenset({"avx2", "avx512f", "avx512bw"}))
ARM = CpuInfo("Neoverse V1", "aarch64", frozenset({"asimd", "bf16", "sve"}))
H100 = CudaInfo("NVIDIA H100", (9, 0), bf16=True)
V100 = CudaInfo("Tesla V100", (7, 0), bf16=False)
K80 = CudaInfo("Tesla K80", (3, 7), bf16=False)


# ------------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpu, want", [(AMX, "bf16"), (ZEN4, "bf16"), (AVX2, "fp32"), (AVX512_NO_BF16, "fp32"),
                                       (ARM, "fp32")], ids=["amx", "avx512bf16", "avx2", "avx512", "arm"])
def test_auto_on_cpus(cpu, want):
    r = resolve_precision("auto", "auto", "cpu", cpu=cpu)
    assert r.precision == want and not r.grad_scaler and r.warning is None
    assert not r.channels_last  # NCHW measured faster (benchmarks/results/precision.json)
    assert r.reason.startswith("auto: CPU has " + ("native bf16" if want == "bf16" else "no native bf16"))


@pytest.mark.parametrize("gpu, want, scaler", [(H100, "bf16", False), (V100, "fp16", True), (K80, "fp32", False)])
def test_auto_on_gpus(gpu, want, scaler):
    r = resolve_precision("auto", "auto", "cuda", cuda=gpu)
    assert (r.precision, r.grad_scaler) == (want, scaler)
    assert not r.channels_last  # not measured on CUDA: off


def test_explicit_choices_win_and_emulated_bf16_warns():
    assert resolve_precision("fp32", "auto", "cpu", cpu=AMX).precision == "fp32"
    assert resolve_precision("fp32", True, "cpu", cpu=AMX).channels_last is True
    assert resolve_precision("bf16", False, "cpu", cpu=AMX).channels_last is False
    assert resolve_precision("fp16", "auto", "cuda", cuda=H100).grad_scaler  # fp16 always gets a scaler
    r = resolve_precision("bf16", "auto", "cpu", cpu=AVX2)
    assert r.precision == "bf16" and r.reason == "explicit"
    assert r.warning and "emulates" in r.warning and "slower than fp32" in r.warning and "AVX2" in r.warning
    assert resolve_precision("bf16", "auto", "cpu", cpu=ZEN4).warning is None
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp8", "auto", "cpu", cpu=AMX)
    with pytest.raises(ValueError, match="channels_last"):
        resolve_precision("auto", "yes", "cpu", cpu=AMX)


def test_isa_caps_turn_native_bf16_off():
    """oneDNN or ATen capped below the bf16 ISA (how this project emulates an AVX2-only CPU) counts as no bf16."""
    capped = CpuInfo(ZEN4.model, ZEN4.arch, ZEN4.flags, onednn_cap="AVX2")
    assert not capped.native_bf16 and resolve_precision("auto", "auto", "cpu", cpu=capped).precision == "fp32"
    assert not CpuInfo(ZEN4.model, ZEN4.arch, ZEN4.flags, aten_cap="avx2").native_bf16
    assert CpuInfo(AMX.model, AMX.arch, AMX.flags, onednn_cap="AVX512_CORE_AMX").native_bf16


def test_cpu_info_reads_flags_and_caps(monkeypatch):
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: ("Test CPU", frozenset({"avx2", "avx512_bf16"})))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = hardware.cpu_info()
    assert info.model == "Test CPU" and info.onednn_cap == "AVX2" and not info.native_bf16
    rec = info.record()
    assert rec["flags"] == ["avx2", "avx512_bf16"] and rec["onednn_max_cpu_isa"] == "AVX2"
    assert "AVX512-BF16" in info.summary() and "ONEDNN_MAX_CPU_ISA=AVX2" in info.summary()


# ------------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------------


def test_usable_cores_follow_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(hardware, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: None)
    assert hardware.usable_cores() == 4
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: 1.5)  # 150% of a CPU: two threads
    assert hardware.usable_cores() == 2
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: 0.2)
    assert hardware.usable_cores() == 1
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: 8.0)
    assert hardware.usable_cores() == 4
    assert hardware.default_threads().threads == 4
    monkeypatch.setattr(hardware, "busy_cores", lambda: 1.2)  # another job holds a core: leave it alone
    choice = hardware.default_threads()
    assert (choice.threads, choice.usable) == (3, 4) and "keep 1.2 core(s) busy" in choice.describe()
    monkeypatch.setattr(hardware, "busy_cores", lambda: 7.0)
    assert hardware.default_threads().threads == 1  # never fewer than one
    monkeypatch.setattr(hardware, "busy_cores", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the node's cores are shared by its processes
    assert hardware.default_threads().threads == 2


def test_busy_cores_sees_a_competitor_but_not_a_niced_one():
    """A normal-priority busy loop counts as (about) one busy core, a ``nice -n 19`` one as none (/proc/stat)."""
    import subprocess
    import sys
    import time

    if not hardware.Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")

    def busy_with(cmd: list[str]) -> float:
        spin = subprocess.Popen(cmd)
        try:
            time.sleep(0.3)
            return hardware.busy_cores(0.5)
        finally:
            spin.kill()
            spin.wait()

    idle = hardware.busy_cores(0.5)
    if idle > 0.5:  # another job already holds a core: the difference below would be noise
        pytest.skip(f"the machine is busy ({idle:.1f} cores at normal priority); this needs an idle machine")
    loop = [sys.executable, "-c", "while True: pass"]
    normal = busy_with(loop)
    niced = busy_with(["nice", "-n", "19", *loop])
    assert 0.5 < normal < 2.0  # one busy loop, plus whatever else the machine does
    assert niced < normal - 0.4


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert hardware.set_threads(1).threads == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(hardware, "default_threads", lambda: hardware.ThreadChoice(2, 2))
        assert hardware.set_threads().threads == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match=">= 1"):
            hardware.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_option(tmp_path, capsys):
    from diffmis.cli.main import main

    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            main(["train", "x.yaml", "--threads", "0"])
        assert "must be >= 1" in capsys.readouterr().err
        main(["benchmark", "does-not-exist.yaml", "--threads", "1"])  # fails on the config, after the threads
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------
# the trainer uses and records the choice
# ------------------------------------------------------------------------------------------------------


def test_training_records_the_resolved_precision(tmp_path, capsys):
    cfg = config_from_dict(tiny_config("segmentor", tmp_path, steps=2, precision="auto", channels_last="auto"))
    train(cfg, tmp_path / "run")
    want = resolve_precision("auto", "auto", "cpu")
    setup = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["phase"] == "setup" and setup["precision"] == want.precision
    assert setup["channels_last"] == want.channels_last and setup["reason"] == want.reason
    assert setup["cpu"]["model"] and "flags" in setup["cpu"]
    assert f"precision={want.precision} ({want.reason})" in capsys.readouterr().out
    assert read_state(tmp_path / "run" / "checkpoints" / "last")["resolved"]["precision"] == want.precision
    assert "precision: auto" in (tmp_path / "run" / "config.yaml").read_text()  # the request stays in the config


def test_explicit_bf16_on_a_cpu_without_it_warns(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_info", lambda: AVX2)
    cfg = config_from_dict(tiny_config("segmentor", tmp_path, steps=1, precision="bf16"))
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "warning: precision=bf16 on a CPU without native bf16" in out and "slower than fp32" in out


def test_fp16_trains_with_a_gradient_scaler_and_resumes_exactly(tmp_path):
    """fp16 gets one GradScaler per optimizer (HiDiff: two); its state is checkpointed and restored."""
    from safetensors.torch import load_file

    base = tiny_config("hidiff", tmp_path, steps=4, precision="fp16")
    train(config_from_dict(base), tmp_path / "full")
    state = read_state(tmp_path / "full" / "checkpoints" / "last")
    assert state["resolved"]["grad_scaler"] and len(state["grad_scalers"]) == 2
    assert all(s["scale"] > 0 for s in state["grad_scalers"])
    train(config_from_dict(base), tmp_path / "part", stop_after=2)
    train(config_from_dict(base), tmp_path / "part", resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_state(tmp_path / "part" / "checkpoints" / "last")["grad_scalers"] == state["grad_scalers"]
