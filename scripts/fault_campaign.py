"""Rerun the bad-input and fault cases of the "nothing lost, nothing silent" issue through the CLI, as a user
would, and print for each: the exit code, the first line the command printed (stderr first), and whether
anything was lost.

    .venv/bin/python scripts/fault_campaign.py [--work /tmp/diffmis_faults]

Takes about three minutes on two cores (it trains a few tiny runs). The default test suite covers the same
classes (tests/test_faults.py); this script is the user's-eye view, for issue notes and for checking by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "diffmis"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def run(args: list[str], cwd: Path | None = None, **kw) -> tuple[int, str]:
    p = subprocess.run(EXE + args, capture_output=True, text=True, cwd=cwd, env=ENV, **kw)
    lines = [ln for ln in (p.stderr.splitlines() + p.stdout.splitlines()) if ln.strip()]
    errors = [ln for ln in lines if " error" in ln or "stopped" in ln or "problem" in ln.lower()]
    return p.returncode, (errors or lines or [""])[0][:220]


def show(case: str, rc: int, line: str, kept: str = "") -> None:
    print(f"- {case}\n    rc={rc}  {line}" + (f"\n    {kept}" if kept else ""), flush=True)


def tiny_yaml(path: Path, data_root: Path, **train) -> Path:
    cfg = {"base": str(ROOT / "configs/segmentor_kvasir.yaml"),
           "data": {"root": str(data_root), "image_size": [32, 32]},
           "model": {"params": {"features": [8, 8, 16, 16, 32, 8]}},
           "train": {"max_steps": 2, "batch_size": 2, "val_every": 0, "ckpt_every": 2, "progress": False,
                     "precision": "fp32", **train}}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/diffmis_faults")
    w = Path(ap.parse_args().work)
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "src"))
    from diffmis.data import write_synthetic

    ds = write_synthetic(w / "ds", n=8, size=(32, 32), num_classes=1, channels=3)
    cfg = tiny_yaml(w / "tiny.yaml", ds)

    print("## Data loss")
    own = w / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("precious")
    for extra in (["--minutes", "-1"], ["--image-size", "0"]):
        rc, line = run(["quickstart", "--out", ".", *extra], cwd=own)
        show(f"quickstart --out . {' '.join(extra)} (in a folder of one's own files)", rc, line,
             f"thesis.tex still there: {(own / 'thesis.tex').exists()}")
    rc, line = run(["quickstart", "--out", str(own), "--minutes", "1"])
    show("quickstart --out FOLDER_OF_OWN_FILES --minutes 1", rc, line,
         f"thesis.tex still there: {(own / 'thesis.tex').exists()}")

    print("## Bad numbers")
    nn = w / "nn"
    for sub in ("imagesTr", "labelsTr"):
        (nn / sub).mkdir(parents=True)
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "x": 1},
                                                 "numTraining": 2, "file_ending": ".nii.gz"}))
    for i in range(2):
        vol = np.random.default_rng(i).random((16, 16, 4)).astype(np.float32)
        if i == 1:
            vol[3, 3, 1] = np.nan
            vol[4, 4, 2] = np.inf
        lab = np.zeros((16, 16, 4), np.uint8)
        lab[4:9, 4:9] = 1
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(nn / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(nn / "labelsTr" / f"case_{i:03d}.nii.gz"))
    show("data check NIFTI_SET_WITH_NAN_INF", *run(["data", "check", str(nn)]))
    nncfg = w / "nn.yaml"
    nncfg.write_text(json.dumps({"base": str(cfg), "data": {"kind": "nnunet", "root": str(nn), "in_channels": 1,
                                                            "image_size": [16, 16], "val_fraction": 0.5}}))
    show("train NN.yaml (the NaN set)", *run(["train", str(nncfg), "--out", str(w / "r_nan")]),
         f"checkpoints written: {(w / 'r_nan' / 'checkpoints').exists()}")
    rc, line = run(["train", str(cfg), "--out", str(w / "r_ok")])
    show("train TINY.yaml (a valid run, used below)", rc, line)
    bad_in = w / "bad_in"
    bad_in.mkdir()
    nib.save(nib.Nifti1Image(np.full((32, 32, 2), np.nan, np.float32), np.eye(4)), str(bad_in / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((32, 32, 2), np.inf, np.float32), np.eye(4)), str(bad_in / "inf.nii.gz"))
    rc, line = run(["predict", "--run", str(w / "r_ok"), "--input", str(bad_in), "--output", str(w / "p_nan"),
                    "--no-progress"])
    written = sorted(p.name for p in (w / "p_nan").glob("*.nii.gz")) if (w / "p_nan").exists() else []
    show("predict on an all-NaN and an all-inf volume", rc, line, f"masks written: {written}")
    for args in (["data", "check", str(ds), "--num-classes", "0"], ["benchmark", str(cfg), "--size", "0"],
                 ["benchmark", str(cfg), "--batch", "0"], ["benchmark", str(cfg), "--size", "-8"],
                 ["predict", "--run", str(w / "r_ok"), "--input", str(ds), "--output", str(w / "p"), "--threads",
                  "-1"]):
        show(" ".join(a if not a.startswith(str(w)) else Path(a).name.upper() for a in args), *run(args))
    for kv in ("data.image_size=0", "data.image_size=[-32,32]", "data.patch_size=0", "data.patch_size=[64,64]",
               "data.image_size=[36,36]"):
        show(f"train TINY.yaml --set {kv}", *run(["train", str(cfg), "--set", kv, "--out", str(w / "r_bad")]))
    empty = w / "empty.yaml"
    empty.write_text("")
    show("train EMPTY.yaml", *run(["train", str(empty), "--out", str(w / "r_empty")]))
    dup = w / "dup.yaml"
    dup.write_text(f"base: {ROOT / 'configs/segmentor_kvasir.yaml'}\ntrain:\n  lr: 1.0e-3\ntrain:\n  lr: 1.0e-4\n")
    show("train DUPLICATE_SECTION.yaml", *run(["train", str(dup), "--out", str(w / "r_dup")]))
    for d, zoom in (("ref", 1.0), ("pred", 2.0)):
        (w / "grid" / d).mkdir(parents=True)
        lab = np.zeros((8, 8, 4), np.uint8)
        lab[2:5, 2:5] = 1
        nib.save(nib.Nifti1Image(lab, np.diag([zoom, zoom, zoom, 1])), str(w / "grid" / d / "c.nii.gz"))
    show("evaluate a prediction on another voxel grid",
         *run(["evaluate", "--pred", str(w / "grid/pred"), "--ref", str(w / "grid/ref")]))
    big = w / "big"
    shutil.copytree(ds, big)
    victim = sorted((big / "images").iterdir())[0]
    Image.new("L", (14000, 14000)).save(victim.with_suffix(".png"))
    show("data check with a 196-megapixel PNG", *run(["data", "check", str(big)]))

    print("## Run folders")
    long_cfg = tiny_yaml(w / "long.yaml", ds, max_steps=100000, ckpt_every=5, log_every=1)
    first = subprocess.Popen(EXE + ["train", str(long_cfg), "--out", str(w / "r_lock"), "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for _ in range(600):
        if (w / "r_lock" / "checkpoints" / "last").exists():
            break
        time.sleep(0.1)
    show("a second train into the same --out while the first runs",
         *run(["train", str(long_cfg), "--out", str(w / "r_lock"), "--threads", "1"]))
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    show("SIGTERM to the first", first.returncode, [ln for ln in err.splitlines() if ln.strip()][-1][:220])

    crash = subprocess.Popen(EXE + ["train", str(long_cfg), "--out", str(w / "r_kill"), "--threads", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    time.sleep(12)
    crash.kill()
    crash.wait()
    short = tiny_yaml(w / "short.yaml", ds, max_steps=40, ckpt_every=5, log_every=1)
    rc, line = run(["train", str(short), "--out", str(w / "r_kill"), "--resume", "--threads", "1"])
    steps = [json.loads(ln)["step"] for ln in (w / "r_kill" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in ln and '"step"' in ln]
    show("kill -9, then --resume to step 40", rc, line,
         f"train steps logged: {len(steps)}, distinct: {len(set(steps))}")
    show("--resume --set data.image_size=[64,64]",
         *run(["train", "--out", str(w / "r_kill"), "--resume", "--set", "data.image_size=[64,64]"]))
    other = w / "other.yaml"
    other.write_text(json.dumps({"base": str(short), "model": {"params": {"features": [8, 8, 16, 16, 64, 8]}}}))
    show("--resume with another config (wider network)",
         *run(["train", str(other), "--out", str(w / "r_kill"), "--resume"]))
    run(["train", str(cfg), "--set", "data.image_size=[36,36]", "--out", str(w / "r_fail")])
    show("a fresh run into the folder of a failed start", *run(["train", str(cfg), "--out", str(w / "r_fail")]),
         f"metrics lines: {len((w / 'r_fail' / 'metrics.jsonl').read_text().splitlines())}")
    ck = w / "r_ok" / "checkpoints"
    (ck / "last").rename(ck / ".last.old")
    rc, line = run(["train", str(tiny_yaml(w / "more.yaml", ds, max_steps=4)), "--out", str(w / "r_ok"), "--resume"])
    show("--resume after a crash between the renames of a save (only .last.old left)", rc, line,
         f"last restored: {(ck / 'last').exists()}, stale folders: {[p.name for p in ck.glob('.last*')]}")

    print("## Output paths")
    afile = w / "a_file"
    afile.write_text("x")
    for args in (["predict", "--run", str(w / "r_ok"), "--input", str(ds / "images"), "--output", str(afile)],
                 ["evaluate", "--pred", str(ds / "masks"), "--ref", str(ds / "masks"), "--out", str(afile / "x")],
                 ["train", str(cfg), "--out", str(afile)]):
        show(" ".join(a if not a.startswith(str(w)) else Path(a).name.upper() for a in args), *run(args))
    ro = w / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        try:
            show("predict --output READ_ONLY_FOLDER", *run(["predict", "--run", str(w / "r_ok"), "--input",
                                                            str(ds / "images"), "--output", str(ro / "p")]))
            show("data check --json READ_ONLY/x.json", *run(["data", "check", str(ds), "--json", str(ro / "x.json")]))
        finally:
            subprocess.run(["umount", str(ro)])
    full = w / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(full)], capture_output=True).returncode == 0:
        try:
            show("train with a disk that fills at the first checkpoint",
                 *run(["train", str(cfg), "--out", str(full / "r"), "--set", "model.params.features=[32,32,64,128,256,32]"]),
                 f"folder: {sorted(p.name for p in (full / 'r').iterdir()) if (full / 'r').exists() else None}")
        finally:
            subprocess.run(["umount", str(full)])

    print("## Masks and images")
    m = np.zeros((32, 32), np.uint8)
    m[4:20, 4:20] = 128
    for d, arr in (("ref", m), ("pred", (m > 0).astype(np.uint8))):
        (w / "m128" / d).mkdir(parents=True)
        Image.fromarray(arr).save(w / "m128" / d / "c.png")
    show("evaluate against a mask holding 0/128", *run(["evaluate", "--pred", str(w / "m128/pred"), "--ref",
                                                         str(w / "m128/ref")]))
    jp = w / "jpeg"
    shutil.copytree(ds, jp)
    for p in sorted((jp / "masks").iterdir()):
        Image.open(p).convert("L").point(lambda v: 255 if v else 0).save(p.with_suffix(".jpg"), quality=70)
        p.unlink()
    show("data check with JPEG masks", *run(["data", "check", str(jp)]))
    grey = w / "grey"
    grey.mkdir()
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(grey / "g.png")
    rc, line = run(["predict", "--run", str(w / "r_ok"), "--input", str(grey), "--output", str(w / "p_grey"),
                    "--no-progress"])
    show("predict a greyscale PNG with a 3-channel run", rc, line,
         f"written: {sorted(p.name for p in (w / 'p_grey').glob('*.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
