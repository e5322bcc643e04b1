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


@pytest.mark.parametrize("recipe", ["medsegdiff", "hidiff"])
def test_torchrun_two_ranks(recipe, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    cfg = tiny_config(recipe, tmp_path, steps=3, val_every=3)
    cfg["train"]["ckpt_every"] = 3
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir, wdir = tmp_path / "run", tmp_path / "weights"
    wdir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFMIS_NO_MALLOC_TUNING="1")
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", str(worker), str(cfg_file),
                           str(run_dir), str(wdir)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = load_file(str(wdir / "rank0.safetensors")), load_file(str(wdir / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"rank weights differ at {k}"
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
