"""Fault injection: bad numbers are refused up front, nothing is lost, runs survive signals, full disks, crashes
between renames and a second writer, and every output path error is one sentence (issue: nothing lost, nothing
silent)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from _tiny import tiny_config
from diffmis.cli.main import main
from diffmis.config import config_from_dict, load_config
from diffmis.errors import CheckpointError, ConfigError, DataError
from diffmis.training import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, recipe: str = "segmentor", **train_kw) -> dict:
    return tiny_config(recipe, tmp_path, **train_kw)


# ------------------------------------------------------------------------------------------------------
# bad numbers, refused up front
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, words", [
    ("data.image_size", 0, "positive"), ("data.image_size", [-32, 32], "positive"),
    ("data.patch_size", 0, "positive"), ("train.batch_size", 0, "greater than or equal to 1"),
])
def test_config_domains(key, value, words):
    with pytest.raises(ConfigError, match=f"{key.split('.')[1]}.*{words}"):
        load_config(overrides=[f"{key}={json.dumps(value)}"])


def test_a_size_the_network_cannot_take_fails_before_training(tmp_path):
    cfg = tiny(tmp_path, "medsegdiff")
    cfg["data"]["image_size"] = [36, 36]  # channel_mult [1, 2]: the network needs multiples of 2... and 4 in UNet
    cfg["model"]["params"]["channel_mult"] = [1, 2, 2, 2]  # multiples of 8
    with pytest.raises(ConfigError, match=r"data.image_size=\[36, 36\] is not a multiple of 8.*\[32, 32\] or \[40, 40\]"):
        train(config_from_dict(cfg), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("argv, words", [
    (["data", "check", ".", "--num-classes", "0"], "must be >= 1"),
    (["benchmark", "x.yaml", "--size", "0"], "must be >= 1"),
    (["benchmark", "x.yaml", "--size", "-8"], "must be >= 1"),
    (["benchmark", "x.yaml", "--batch", "0"], "must be >= 1"),
    (["predict", "--run", "r", "--input", "i", "--output", "o", "--threads", "-1"], "must be >= 1"),
    (["predict", "--run", "r", "--input", "i", "--output", "o", "--ensemble", "0"], "must be >= 1"),
])
def test_cli_numbers_are_checked(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def _nifti_set(root: Path, bad: bool) -> None:
    """A 2-case nnU-Net raw dataset; case 1's image holds NaN voxels when ``bad``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in range(2):
        img = np.random.default_rng(c).normal(size=(16, 16, 4)).astype(np.float32)
        if bad and c == 1:
            img[2:5, 2:5, 1] = np.nan
        lab = (img > 1).astype(np.uint8) if not (bad and c == 1) else np.zeros((16, 16, 4), np.uint8)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "imagesTr" / f"case_{c:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / f"case_{c:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0,
                                                   "x": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))


def test_nan_voxels_are_a_problem_everywhere(tmp_path, capsys):
    root = tmp_path / "ds"
    _nifti_set(root, bad=True)
    assert main(["data", "check", str(root)]) == 2
    out = capsys.readouterr().out
    assert "case_001_0000.nii.gz" in out and "NaN or infinite" in out
    cfg = tiny(tmp_path)
    cfg["data"] = {"kind": "nnunet", "root": str(root), "in_channels": 1, "num_classes": 1, "image_size": [16, 16],
                   "val_fraction": 0.5}
    with pytest.raises(DataError, match="case_001_0000.nii.gz.*NaN or infinite"):
        train(config_from_dict(cfg), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_predict_refuses_non_finite_input_and_writes_nothing_for_it(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=1)
    train(config_from_dict(cfg), tmp_path / "run")
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(np.full((32, 32, 3), np.nan, np.float32), np.eye(4)), str(inp / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((32, 32, 3), np.inf, np.float32), np.eye(4)), str(inp / "inf.nii.gz"))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(inp / "ok.png")
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", str(inp), "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "nan.nii.gz" in err and "inf.nii.gz" in err and "NaN or infinite" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix in (".png", ".gz")) == ["ok.png"]


def test_huge_image_is_a_problem_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from diffmis.data import write_synthetic

    root = write_synthetic(tmp_path / "ds", n=6, size=(32, 32), num_classes=1, channels=1)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 200)  # every 32x32 image is now "a bomb" (> 2 x 200)
    from diffmis.data import check_dataset

    report = check_dataset(root)
    assert not report.ok and any("too large to decode safely" in msg for _, msg in report.problems)


def test_evaluate_refuses_another_voxel_grid(tmp_path):
    from diffmis.evaluation import evaluate_folders

    lab = np.zeros((8, 8, 4), np.uint8)
    lab[2:5, 2:5] = 1
    for d, zoom in (("ref", 1.0), ("pred", 2.0)):
        (tmp_path / d).mkdir()
        nib.save(nib.Nifti1Image(lab, np.diag([zoom, zoom, zoom, 1])), str(tmp_path / d / "c.nii.gz"))
    with pytest.raises(DataError, match="voxel spacing mismatch.*another grid"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_evaluate_refuses_a_gapped_label_set_naming_the_fix(tmp_path, capsys):
    m = np.zeros((32, 32), np.uint8)
    m[4:20, 4:20] = 128  # a 0/128 mask saved by an image editor: not the labels 0..K
    for d, arr in (("ref", m), ("pred", (m > 0).astype(np.uint8))):
        (tmp_path / d).mkdir()
        Image.fromarray(arr).save(tmp_path / d / "c.png")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 2
    err = capsys.readouterr().err
    assert "c.png" in err and "128" in err and "--labels" in err


def test_jpeg_masks_get_the_lossless_hint(tmp_path, capsys):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"c{i}.png")
        mm = np.zeros((32, 32), np.uint8)
        mm[5:20, 8:25] = 255
        Image.fromarray(mm).save(tmp_path / "masks" / f"c{i}.jpg", quality=70)  # ringing: values besides 0/255
    assert main(["data", "check", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "c0.jpg" in out and "lossy" in out and "PNG" in out


def test_a_grey_image_is_repeated_for_a_three_channel_run(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=1)
    cfg["data"]["in_channels"] = 3
    train(config_from_dict(cfg), tmp_path / "run")
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray((np.random.default_rng(1).random((32, 32)) * 255).astype(np.uint8)).save(inp / "g.png")
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", str(inp), "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert Image.open(tmp_path / "out" / "g.png").size == (32, 32)


def test_a_patch_larger_than_the_image_is_refused_naming_the_case(tmp_path):
    from diffmis.data import write_synthetic

    root = write_synthetic(tmp_path / "ds", n=6, size=(32, 32), num_classes=1, channels=1)
    cfg = tiny(tmp_path, steps=1)
    cfg["data"] = {"kind": "folder", "root": str(root), "in_channels": 1, "num_classes": 1, "image_size": None,
                   "patch_size": [64, 64], "val_fraction": 0.34}
    with pytest.raises(DataError, match=r"32x32, smaller than data.patch_size=\[64, 64\]"):
        train(config_from_dict(cfg), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg["data"]["image_size"] = [48, 48]  # resized first: a patch larger than the resized image is a config error
    with pytest.raises(ConfigError, match="patch_size"):
        train(config_from_dict(cfg), tmp_path / "run")


# ------------------------------------------------------------------------------------------------------
# run folders: one writer, logs that do not lie, resume that keeps the run what it was
# ------------------------------------------------------------------------------------------------------


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    from diffmis.training.run_folder import RunFolder

    holder = RunFolder(tmp_path / "run", main=True)
    holder._acquire()
    try:
        with pytest.raises(CheckpointError, match=rf"in use by diffmis train \(pid {os.getpid()} on .+\)"):
            train(config_from_dict(tiny(tmp_path, steps=1)), tmp_path / "run")
    finally:
        holder.close()
    train(config_from_dict(tiny(tmp_path, steps=1)), tmp_path / "run")  # free again


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_crash_logs_every_step_once(tmp_path, monkeypatch):
    """kill -9 after step 3 with the last checkpoint at step 2: the resumed log holds steps 1..4 once each."""
    from diffmis.methods.segmentor import SegmentorMethod

    cfg = config_from_dict(tiny(tmp_path, steps=4, ckpt_every=2))
    real = SegmentorMethod.loss

    def crash(self, image, mask, step=0, generator=None):
        if step == 3:
            raise SystemExit("simulated kill")  # not caught by the trainer: nothing is saved at step 3
        return real(self, image, mask, step, generator)

    monkeypatch.setattr(SegmentorMethod, "loss", crash)
    with pytest.raises(SystemExit):
        train(cfg, tmp_path / "run")
    assert [r["step"] for r in _lines(tmp_path / "run") if r["phase"] == "train"] == [1, 2, 3]
    monkeypatch.setattr(SegmentorMethod, "loss", real)
    train(cfg, tmp_path / "run", resume=True)
    assert [r["step"] for r in _lines(tmp_path / "run") if r["phase"] == "train"] == [1, 2, 3, 4]


def test_resume_refuses_changes_of_the_model_and_records_allowed_ones(tmp_path):
    from diffmis.training import resolve_run_config

    d = tiny(tmp_path, steps=2)
    train(config_from_dict(d), tmp_path / "run")
    cfg, run = resolve_run_config(None, str(tmp_path / "run"), True, ["data.image_size=16"])
    with pytest.raises(CheckpointError, match=r"--resume would change data.image_size"):
        train(cfg, run, resume=True)
    other = tmp_path / "other.yaml"
    d2 = tiny(tmp_path, steps=2)
    d2["model"]["params"]["features"] = [4, 4, 8, 8, 16, 4]
    other.write_text(yaml.safe_dump(d2))
    cfg, run = resolve_run_config(str(other), str(tmp_path / "run"), True)
    with pytest.raises(CheckpointError, match=r"would change model.params.features"):
        train(cfg, run, resume=True)
    cfg, run = resolve_run_config(None, str(tmp_path / "run"), True, ["train.max_steps=3"])
    assert train(cfg, run, resume=True).step == 3
    resumed = [r for r in _lines(run) if r["phase"] == "resume"]
    assert resumed and resumed[-1]["changed"] == ["train.max_steps"]


def test_a_folder_from_a_failed_start_is_reused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: config\n")
    (run / "metrics.jsonl").write_text('{"step": 7, "phase": "train", "loss": 1.0}\n')
    (run / "checkpoints").mkdir()  # e.g. a disk-full first save left it empty
    train(config_from_dict(tiny(tmp_path, steps=1)), run)
    assert [r["step"] for r in _lines(run) if r["phase"] == "train"] == [1]


# ------------------------------------------------------------------------------------------------------
# signals and faults
# ------------------------------------------------------------------------------------------------------


def test_sigterm_saves_last_and_exits_with_a_message(tmp_path):
    cfg = tiny(tmp_path, steps=100000, log_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "DIFFMIS_NO_MALLOC_TUNING": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffmis", "train", str(tmp_path / "c.yaml"), "--out", str(run),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and sum(1 for _ in open(run / "metrics.jsonl")) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume continues" in err
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] >= 3
    d = dict(cfg)
    d["train"] = {**d["train"], "max_steps": state["step"] + 1}
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(d))
    assert main(["train", str(tmp_path / "c2.yaml"), "--out", str(run), "--resume"]) == 0


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import diffmis.checkpoint as ck

    cfg = config_from_dict(tiny(tmp_path, steps=4, ckpt_every=2))
    real = ck.save_file
    calls = {"n": 0}

    def full(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (model, optimizer... ) succeeds, the next ones hit a full disk
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last.*MiB needed.*previous checkpoint is "
                                              r"intact"):
        train(cfg, tmp_path / "run")
    monkeypatch.setattr(ck, "save_file", real)
    assert json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())["step"] == 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))  # nothing left behind


def test_resume_recovers_a_save_interrupted_between_its_renames(tmp_path):
    cfg = config_from_dict(tiny(tmp_path, steps=2))
    train(cfg, tmp_path / "run")
    cks = tmp_path / "run" / "checkpoints"
    os.replace(cks / "last", cks / ".last.old")  # the crash: last moved aside, the new one not yet in place
    (cks / ".last.tmpabcd").mkdir()  # an incomplete temporary folder of another save
    cfg3 = config_from_dict(tiny(tmp_path, steps=3))
    res = train(cfg3, tmp_path / "run", resume=True)
    assert res.step == 3 and not (cks / ".last.old").exists() and not (cks / ".last.tmpabcd").exists()


# ------------------------------------------------------------------------------------------------------
# output paths: one sentence naming the path
# ------------------------------------------------------------------------------------------------------


def _errors(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if "error" in line or "Traceback" in line]


def test_output_path_errors_are_one_sentence(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=1)
    train(config_from_dict(cfg), tmp_path / "run")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    code = main(["predict", "--run", str(tmp_path / "run"), "--input", str(tmp_path / "img.png"), "--output",
                 str(a_file), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(a_file) in err and "Traceback" not in err and len(_errors(err)) == 1
    assert "a file stands where a folder is needed" in err
    code = main(["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path), "--out", str(a_file / "s.json")])
    err = capsys.readouterr().err
    assert code == 2 and str(a_file) in err and len(_errors(err)) == 1
    (tmp_path / "y.yaml").write_text(yaml.safe_dump(tiny(tmp_path, steps=1)))
    code = main(["train", str(tmp_path / "y.yaml"), "--out", str(a_file / "run")])
    err = capsys.readouterr().err
    assert code == 2 and str(a_file) in err and len(_errors(err)) == 1
