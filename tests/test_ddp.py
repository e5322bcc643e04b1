"""Data parallel under torchrun (gloo on CPU): ranks end with identical weights; only rank 0 writes the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _tiny import tiny_config

pytestmark = pytest.mark.ddp


def _torchrun(cfg: dict, tmp_path: Path, extra_env: dict[str, str] | None = None):
    """Train ``cfg`` on two ranks; returns the process, the run folder and each rank's final weights."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir, wdir = tmp_path / "run", tmp_path / "weights"
    wdir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFMIS_NO_MALLOC_TUNING="1", **(extra_env or {}))
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", str(worker), str(cfg_file),
                           str(run_dir), str(wdir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = load_file(str(wdir / "rank0.safetensors")), load_file(str(wdir / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"rank weights differ at {k}"
    return proc, run_dir, w0


@pytest.mark.parametrize("recipe", ["medsegdiff", "hidiff"])
def test_torchrun_two_ranks(recipe, tmp_path):
    cfg = tiny_config(recipe, tmp_path, steps=3, val_every=3)
    cfg["train"]["ckpt_every"] = 3
    proc, run_dir, w0 = _torchrun(cfg, tmp_path)
    # the weights moved (gradients were applied) and equal the checkpoint rank 0 wrote
    ck = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(ck[k], w0[k]) for k in ck)
    # rank 0 alone wrote: one log line per step (two writers would append twice), one TensorBoard file
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["phase"] == "train"] == [1, 2, 3]
    assert len([r for r in lines if r["phase"] == "val"]) == 1
    assert len(list((run_dir / "tensorboard").glob("events.*"))) == 1
    # the two ranks read different halves of the data: world size 2 doubles the images per step
    assert "world=2" in proc.stdout


def test_torchrun_time_budget_ends_every_rank_at_one_step(tmp_path):
    """A train.max_minutes budget under torchrun: the ranks take one elapsed time (the largest over them), so they
    stop at the same step with the same weights and decay the learning rate alike, even when rank 1's clock runs
    slow (each rank on its own clock, rank 0 stopped while rank 1 waited in the next step's all-reduce)."""
    cfg = tiny_config("segmentor", tmp_path, steps=10 ** 8, max_minutes=0.05, lr_schedule="cosine")
    proc, run_dir, _ = _torchrun(cfg, tmp_path, {"DIFFMIS_TEST_SLOW_CLOCK": "1"})
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in lines if r["phase"] == "train"]
    assert len(lrs) > 3 and lrs[0] > 0.9e-3 and lrs[-1] < 0.5e-3
