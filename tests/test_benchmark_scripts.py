"""The benchmark scripts' bookkeeping: a paired ablation reuses a recorded segmentor phase only when it can, and
the tuning table shows which rows are paired and compares each with the default of its own dims."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import render  # noqa: E402
from quality import (check_segphase_from, keep_replaced, raw_ece, recipe_levers, rescore,  # noqa: E402
                     reused_segphase, sample_settings)


def _row(method: str, variant: str, dice: float, seg_dir: Path, *, dims: int = 3, reused: str = "",
         sets: tuple[str, ...] = ()) -> dict:
    seg = {"phase": "segmentor", "run_dir": str(seg_dir), "minutes": 10.0, "steps": 100}
    if reused:
        seg["reused_from"] = reused
    return {"method": method, "variant": variant, "dims": dims, "budget_minutes": 20.0, "sets": list(sets),
            "runs": [seg, {"phase": "method", "run_dir": "x", "minutes": 10.0, "steps": 50}],
            "dice_mean": dice, "ece": 0.01, "error_auroc": 0.9}


def test_reused_segphase_takes_a_recorded_phase_and_refuses_what_it_cannot(tmp_path):
    seg_dir = tmp_path / "runs" / "hidiff_3d@default_segphase"
    doc = {"rows": {"hidiff_3d@default": _row("hidiff", "default", 0.88, seg_dir),
                    "segmentor_3d@default": {"method": "segmentor", "runs": [{"phase": "method", "minutes": 20.0}]}}}
    with pytest.raises(SystemExit, match="run folder .* is gone"):
        reused_segphase(doc, "hidiff_3d@default", 10.0)
    (seg_dir / "checkpoints").mkdir(parents=True)
    got = reused_segphase(doc, "hidiff_3d@default", 10.0)
    assert got["run_dir"] == str(seg_dir) and got["steps"] == 100 and got["reused_from"] == "hidiff_3d@default"
    assert "reused_from" not in doc["rows"]["hidiff_3d@default"]["runs"][0]  # the source row is left as it was
    with pytest.raises(SystemExit, match="no row 'hidiff_3d@other'"):
        reused_segphase(doc, "hidiff_3d@other", 10.0)
    with pytest.raises(SystemExit, match="had no segmentor phase"):
        reused_segphase(doc, "segmentor_3d@default", 10.0)
    with pytest.raises(SystemExit, match="10.0 min, this run's budget gives it 5.0"):
        reused_segphase(doc, "hidiff_3d@default", 5.0)


def test_segphase_from_is_refused_where_it_would_be_ignored():
    check_segphase_from(None, 0.0, ["segmentor"])
    check_segphase_from("default", 0.5, ["segmentor", "hidiff"])  # a mixed list: hidiff reuses it
    with pytest.raises(SystemExit, match="--seg-share is 0"):
        check_segphase_from("default", 0.0, ["hidiff"])
    with pytest.raises(SystemExit, match="none of --methods segmentor medsegdiff has a segmentor phase"):
        check_segphase_from("default", 0.5, ["segmentor", "medsegdiff"])


def test_variants_table_pairs_rows_with_the_default_of_their_dims(tmp_path):
    rows = {"hidiff_3d@default": _row("hidiff", "default", 0.880, tmp_path),
            "hidiff_2d@default": _row("hidiff", "default", 0.860, tmp_path, dims=2),
            "hidiff_3d@noise0": _row("hidiff", "noise0", 0.885, tmp_path, reused="hidiff_3d@default",
                                     sets=("diffusion.prior_noise=0",))}
    table = render.variants_table({"rows": rows, "n_cases": 26, "eval_split": "val", "environment": {}})
    line = next(x for x in table.splitlines() if "| noise0 |" in x)
    assert line.startswith("| HiDiff (refined) (3D) | noise0 |")
    assert "`--seg-share 0.5` `--segphase-from default` `diffusion.prior_noise=0`" in line
    assert line.rstrip().endswith("| +0.005 |")  # against the 3D default (0.880), not the 2D one (0.860)
    default_2d = next(x for x in table.splitlines() if "(2D) | default |" in x)
    assert "--segphase-from" not in default_2d


def test_recipe_levers_record_hidiffs_resolved_segmentor_every():
    """A row records the levers its run used, from the config too: ``segmentor_every: auto`` as what it became, so
    the tuning table can say which rows froze the segmentor."""
    from _tiny import tiny_config

    from diffmis.config import config_from_dict
    from diffmis.methods import build

    def levers(**train) -> dict:
        cfg = config_from_dict(tiny_config("hidiff", Path("/tmp"), **train))
        return recipe_levers(build(cfg), cfg)

    assert levers() == {}  # the paper's alternation, every diffusion lever at its default
    assert levers(segmentor_every="auto", prior_run="/some/run") == {"train.segmentor_every": 0}
    row = _row("hidiff", "default", 0.9, Path("/tmp"))
    row["runs"][1]["levers"] = {"train.segmentor_every": 0, "diffusion.train_timesteps": "sampler"}
    assert render._overrides(row)[1:] == ["train.segmentor_every=0 (config)",
                                          "diffusion.train_timesteps=sampler (config)"]


@pytest.mark.slow
def test_gpu_check_rehearses_on_the_cpu(tmp_path):
    """``benchmarks/gpu.py --device cpu --tiny``: the GPU check's every stage on toy sizes, as planned for a lent
    GPU; every recipe trains and predicts, each row carries what the JSON promises."""
    import json
    import os
    import subprocess

    if __import__("torch").cuda.is_available():
        pytest.skip("--device cpu is refused where a GPU is visible")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"),
                           "--device", "cpu", "--tiny", "--out", str(out), "--skip", "peer"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["tiny"] and doc["environment"]["machine"]["cpu"]["model"]
    assert doc["tests"]["skipped"] and doc["compile"]["skipped"] and doc["peer"] == {"skipped": "--skip"}
    for recipe, row in doc["recipes"].items():
        assert "error" not in row, (recipe, row.get("traceback"))
        assert row["train_images_per_s"] > 0 and row["predict_images_per_s"] > 0 and 0.0 <= row["dice"] <= 1.0
        assert row["nfe_per_batch"] >= 1 and row["latency_one_image_s"]["eager"] > 0
    assert doc["targets"]["every_recipe_trains_and_predicts"]["met"]
    assert not doc["targets"]["cuda_tests_pass"]["met"]  # no GPU here: never reported as met


def test_rescore_predicts_a_recorded_run_again_with_sampling_settings_only(tmp_path):
    assert sample_settings(["sample.start_step=100", "sample.steps=2"]) == {"start_step": 100, "steps": 2}
    for bad in (["train.lr=1e-3"], ["sample.threshold=0.4"], ["sample.steps"], []):
        with pytest.raises(SystemExit):
            sample_settings(bad)
    run = tmp_path / "runs" / "medsegdiff_v2@default"
    row = _row("medsegdiff_v2", "default", 0.75, tmp_path / "seg")
    row["runs"][1]["run_dir"] = str(run)
    doc = {"rows": {"medsegdiff_v2@default": row,
                    "medsegdiff_v2_segmentor@default": {"method": "medsegdiff_v2_segmentor", "dice_mean": 0.78}}}
    seen = {}

    def score_run(run_dir, name, **kw):
        seen.update(run_dir=run_dir, name=name, **kw)
        return {"dice_mean": 0.77}

    with pytest.raises(SystemExit, match="is gone"):
        rescore(doc, "medsegdiff_v2", "default", "anchor100", ["sample.start_step=100"], score_run, {})
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no row 'medsegdiff_v2@other'"):
        rescore(doc, "medsegdiff_v2", "other", "anchor100", ["sample.start_step=100"], score_run, {})
    new, seg = rescore(doc, "medsegdiff_v2", "default", "anchor100", ["sample.start_step=100", "sample.steps=2"],
                       score_run, {"ensemble": 5})
    assert seen == {"run_dir": str(run), "name": "medsegdiff_v2@anchor100", "ensemble": 5, "start_step": 100,
                    "steps": 2}
    assert new["dice_mean"] == 0.77 and new["runs"] == row["runs"] and new["rescored_from"] == "medsegdiff_v2@default"
    assert new["variant"] == "anchor100" and new["sets"] == ["sample.start_step=100", "sample.steps=2"]
    assert seg["dice_mean"] == 0.78 and seg["variant"] == "anchor100"
    again, _ = rescore(doc, "medsegdiff_v2", "default", "default", ["sample.start_step=100"], score_run, {})
    assert again["replaced_row"]["dice_mean"] == 0.75 and "runs" not in again["replaced_row"]


def test_raw_ece_undoes_the_temperature_the_maps_were_written_with(tmp_path):
    """quality.py --calibrate rows keep the raw ensemble's ECE, recovered from the calibrated maps on disk."""
    import torch
    from PIL import Image

    from diffmis.calibration import apply_temperature, calibration_ece
    from diffmis.inference import load_cases

    rng = np.random.default_rng(2)
    for sub in ("raw", "cal", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        prob = rng.random((1, 16, 16)).astype(np.float32)
        mask = (rng.random((16, 16)) < prob[0]).astype(np.uint8) * 255
        np.save(tmp_path / "raw" / f"c{i}.npy", prob)
        np.save(tmp_path / "cal" / f"c{i}.npy", apply_temperature(torch.from_numpy(prob)[None], 0.4)[0].numpy())
        Image.fromarray(mask).save(tmp_path / "masks" / f"c{i}.png")
    raw = calibration_ece(load_cases(tmp_path / "raw", tmp_path / "masks"), 1.0)
    assert abs(raw_ece(tmp_path / "cal", tmp_path / "masks", None, 0.4) - raw) < 1e-4
    assert abs(calibration_ece(load_cases(tmp_path / "cal", tmp_path / "masks"), 1.0) - raw) > 1e-3


def test_temperature_script_names_a_row_that_was_not_predicted(tmp_path):
    import temperature

    with pytest.raises(SystemExit, match="predict row 'hidiff@x' with benchmarks/quality.py"):
        temperature.load(tmp_path / "mni_tune", "val", "hidiff@x")


def test_calibrated_rows_get_their_own_table_and_target_row():
    def row(method, variant, ece, cal=None, dice=0.9):
        r = {"method": method, "variant": variant, "dice_mean": dice, "dice_std": 0.01, "iou_mean": 0.8,
             "hd95_mean": 1.0, "ece": ece, "error_auroc": 0.97, "nfe_per_image": 1, "seconds_per_image": 0.1,
             "params": 1e6, "budget_minutes": 5, "runs": [{"phase": "method", "minutes": 5 - 1 / 6, "steps": 100}],
             "cpu": {"model": "X", "isa": "AVX2", "threads": 2}}
        if cal is not None:
            r["calibration"] = {"temperature": cal, "n_cases": 28, "seconds": 5.5, "reserve_seconds": 10.0}
            r["ece_raw"] = 0.04
        return r

    doc = {"rows": {"segmentor@default": row("segmentor", "default", 0.013),
                    "hidiff@default": row("hidiff", "default", 0.032),
                    "hidiff_segmentor@default": row("hidiff_segmentor", "default", 0.015),
                    "hidiff@calibrated": row("hidiff", "calibrated", 0.002, cal=0.3),
                    "segmentor@calibrated": row("segmentor", "calibrated", 0.004, cal=0.65)},
           "n_cases": 24, "eval_split": "test", "environment": {}}
    table = render.quality_table(doc)
    line = next(x for x in table.splitlines() if x.startswith("| HiDiff (refined) |") and "kept for" in x)
    assert "4.83 (100) + 10 s kept for calibration" in line and "| 0.30 (28, 5.5) |" in line
    assert "| 0.040 -> 0.002 |" in line
    targets = render.targets_table({"mni": doc})
    assert "| hidiff 0.002 / 0.013 (UNet calibrated too: 0.004) |" in targets
    assert "| hidiff 0.032 / 0.013 |" in targets  # the raw row stays as it was


def test_quality_table_names_the_rows_run_before_the_time_aware_schedule():
    def row(method, commit=None):
        r = {"method": method, "variant": "default", "dice_mean": 0.9, "dice_std": 0.01, "iou_mean": 0.8,
             "hd95_mean": 1.0, "ece": 0.01, "error_auroc": 0.97, "nfe_per_image": 1, "seconds_per_image": 0.1,
             "params": 1e6, "budget_minutes": 5, "runs": [{"phase": "method", "minutes": 5, "steps": 100}]}
        if commit:
            r["commit"] = commit
        return r

    doc = {"rows": {"segmentor@default": row("segmentor", "abc"), "hidiff@default": row("hidiff", "abc"),
                    "hidiff_segmentor@default": row("hidiff_segmentor", "abc"),
                    "pd_ddpm@default": row("pd_ddpm"), "pd_ddpm_segmentor@default": row("pd_ddpm_segmentor"),
                    "medsegdiff@default": row("medsegdiff")},
           "n_cases": 24, "eval_split": "test", "environment": {}}
    head = render.quality_table(doc).splitlines()[0]
    assert head.endswith("constant ones are unaffected): PD-DDPM, MedSegDiff")  # once each, table order
    for r in doc["rows"].values():  # a file of older rows only says nothing of it
        r.pop("commit", None)
    assert "learning-rate decay" not in render.quality_table(doc)


def test_a_row_rerun_on_another_cpu_kind_or_commit_keeps_the_row_it_replaces():
    epyc = {"model": "AMD EPYC", "isa": "AVX512-BF16", "native_bf16": True, "threads": 2}
    xeon = {"model": "Intel Xeon", "isa": "AMX", "native_bf16": True, "threads": 2}
    old = {"method": "hidiff", "dice_mean": 0.80, "cpu": epyc, "runs": [{"phase": "method"}]}
    old_seg = {"method": "hidiff_segmentor", "dice_mean": 0.76, "cpu": epyc, "runs": []}
    doc = {"rows": {"hidiff@default": old, "hidiff_segmentor@default": old_seg},
           "commands": {"hidiff@default": "python benchmarks/quality.py --dataset kvasir --methods hidiff"}}
    new = keep_replaced(doc, "hidiff@default", {"dice_mean": 0.79, "cpu": xeon, "commit": "abc"})
    assert new["replaced_row"]["dice_mean"] == 0.80 and "runs" not in new["replaced_row"]
    assert new["replaced_row"]["cpu"] == epyc
    assert new["replaced_row"]["command"] == doc["commands"]["hidiff@default"]
    seg = keep_replaced(doc, "hidiff_segmentor@default", {"dice_mean": 0.77, "cpu": xeon, "commit": "abc"})
    assert seg["replaced_row"]["dice_mean"] == 0.76  # the segmentor row shares its method row's command
    assert seg["replaced_row"]["command"] == doc["commands"]["hidiff@default"]
    # the same kind, another commit (the row before had none: before the time-aware schedule): kept too
    doc["rows"]["segmentor@default"] = {"dice_mean": 0.77, "cpu": xeon, "runs": []}
    assert keep_replaced(doc, "segmentor@default", {"dice_mean": 0.80, "cpu": xeon, "commit": "abc"})[
        "replaced_row"]["dice_mean"] == 0.77
    # the same kind and commit: a plain rerun replaces the row outright; a new key has nothing to keep
    doc["rows"]["segmentor@default"] = {"dice_mean": 0.80, "cpu": dict(xeon), "commit": "abc", "runs": []}
    assert "replaced_row" not in keep_replaced(doc, "segmentor@default",
                                               {"dice_mean": 0.81, "cpu": xeon, "commit": "abc"})
    assert "replaced_row" not in keep_replaced(doc, "medsegdiff@default", {"dice_mean": 0.5, "cpu": xeon})
    # a rescore in place already keeps its own replaced row
    kept = {"dice_mean": 0.1}
    assert keep_replaced(doc, "hidiff@default", {"dice_mean": 0.79, "cpu": xeon, "replaced_row": kept})[
        "replaced_row"] is kept
