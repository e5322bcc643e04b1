"""Training: every recipe trains, resumes bit-identically, stops cleanly on NaN; checkpoint mismatches are named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny import RECIPES, tiny_config
from diffmis.config import config_from_dict, dump_config
from diffmis.methods import build
from diffmis.errors import CheckpointError, DataError
from diffmis.checkpoint import load_checkpoint
from diffmis.training.trainer import TrainingError, train


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_is_bit_identical(recipe, tmp_path):
    """Uninterrupted 4 steps == 2 steps, stop, resume for 2 more (weights, EMA and optimizer state)."""
    cfg = config_from_dict(tiny_config(recipe, tmp_path, steps=4, val_every=2))
    full = train(cfg, tmp_path / "full")
    assert full.step == 4 and full.stopped == "max_steps"
    part = train(cfg, tmp_path / "part", stop_after=2)
    assert part.step == 2 and part.stopped == "stop_after"
    again = train(cfg, tmp_path / "part", resume=True)
    assert again.step == 4
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{recipe}: tensor {k} differs after resume"
    ema_a = tmp_path / "full" / "checkpoints" / "last" / "ema.safetensors"
    ema_b = tmp_path / "part" / "checkpoints" / "last" / "ema.safetensors"
    assert ema_a.is_file() == ema_b.is_file() == (recipe != "segmentor")  # EMA on the diffusion weights
    if ema_a.is_file():
        ea, eb = load_file(str(ema_a)), load_file(str(ema_b))
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    oa = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "part" / "checkpoints" / "last" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # the run folder has the resolved config, a metrics log with named terms and a validation line
    lines = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["phase"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_lines)
    assert any(r["phase"] == "val" and 0.0 <= r["dice"] <= 1.0 for r in lines)
    assert (tmp_path / "full" / "config.yaml").read_text() == dump_config(cfg)


def test_hidiff_alternates_and_logs_terms(tmp_path):
    cfg = config_from_dict(tiny_config("hidiff", tmp_path, steps=3, pretrain_steps=1, w_diff=0.5))
    train(cfg, tmp_path / "run")
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if r["phase"] == "train"]
    first, later = lines[0], lines[-1]
    assert "kl" not in first and "dice" in first  # pre-training: the segmentor step alone
    assert {"kl", "focal", "dice", "ce", "bbdm"} <= set(later)  # refiner terms + L_S + w_diff * L_BBDM


def test_checkpoint_into_other_model_names_tensor(tmp_path):
    cfg = config_from_dict(tiny_config("conditional_unet", tmp_path, steps=1))
    train(cfg, tmp_path / "run")
    other = build(config_from_dict(tiny_config("medsegdiff", tmp_path)))
    with pytest.raises(CheckpointError, match=r"tensor 'denoiser\.[\w.]+'"):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last", other)
    with pytest.raises(CheckpointError, match="written by recipe 'conditional_unet'.*builds recipe 'medsegdiff'"):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last", other,
                        expect={"recipe": "medsegdiff", "model": "medsegdiff"})


def test_nonfinite_loss_stops_and_saves(tmp_path, monkeypatch):
    from diffmis.methods.medsegdiff import GaussianMaskDiffusion

    real = GaussianMaskDiffusion.loss

    def poisoned(self, image, mask, step=0, generator=None):
        out = real(self, image, mask, step, generator)
        if step >= 2:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(GaussianMaskDiffusion, "loss", poisoned)
    cfg = config_from_dict(tiny_config("conditional_unet", tmp_path, steps=5))
    with pytest.raises(TrainingError, match="non-finite loss at step 2"):
        train(cfg, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())


def test_bad_dataset_fails_before_training(tmp_path):
    from diffmis.data import write_synthetic

    root = tmp_path / "ds"
    write_synthetic(root, 6, (32, 32), num_classes=1, channels=1, seed=0)
    victim = sorted((root / "masks").iterdir())[0]
    victim.unlink()
    d = tiny_config("segmentor", tmp_path, steps=2)
    d["data"].update({"kind": "folder", "root": str(root), "val_split": "val"})
    cfg = config_from_dict(d)
    with pytest.raises(DataError, match=victim.stem):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_run_needs_resume(tmp_path):
    cfg = config_from_dict(tiny_config("segmentor", tmp_path, steps=1))
    train(cfg, tmp_path / "run")
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize("recipe", ["pd_ddpm", "hidiff"])
def test_patch_trained_run_validates_whole_images_with_sliding_windows(recipe, tmp_path):
    """A run trained on 32x32 patches validates on native 56x48 images (sliding windows, like `predict`)."""
    from diffmis.data import write_synthetic

    root = write_synthetic(tmp_path / "ds", 12, size=(56, 48), channels=1)
    cfg = tiny_config(recipe, tmp_path, steps=2, val_every=1, val_max_batches=1)
    cfg["data"].update({"kind": "folder", "root": str(root), "image_size": None, "patch_size": [32, 32]})
    del cfg["data"]["synthetic"]
    cfg["sample"]["batch_size"] = 2
    res = train(config_from_dict(cfg), tmp_path / "run")
    vals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v.get("phase") == "val"]
    assert vals and all(0.0 <= v["dice"] <= 1.0 for v in vals)
    # windows of 32 over 56x48, overlap 0.25 (stride 24): 2 x 2 = 4 windows, 2 window batches of 2; each batch
    # costs the prior/segmentor pass + 3 sampler steps
    assert vals[0]["nfe"] == 2 * (1 + 3)
    assert vals[0]["n_cases"] == 2
    assert res.best_dice is not None


def test_lr_factor_follows_the_larger_of_steps_and_minutes():
    from diffmis.training.trainer import lr_factor

    def factor(schedule, step, time_share=0.0, warmup=0):
        cfg = config_from_dict(tiny_config("segmentor", Path("."), steps=100, lr_schedule=schedule,
                                           warmup_steps=warmup))
        return lr_factor(step, cfg, time_share)

    assert factor("cosine", 0) == pytest.approx(1.0) and factor("cosine", 50) == pytest.approx(0.5)
    assert factor("cosine", 0, time_share=0.5) == pytest.approx(0.5)       # half the minutes spent
    assert factor("cosine", 50, time_share=0.25) == pytest.approx(0.5)     # the steps are further on
    assert factor("cosine", 10, time_share=1.7) == pytest.approx(0.0)      # past the budget: the end
    assert factor("poly", 0, time_share=0.5) == pytest.approx(0.5 ** 0.9)
    assert factor("constant", 90, time_share=0.9) == 1.0
    assert factor("cosine", 4, time_share=0.9, warmup=10) == pytest.approx(0.5)  # warm-up counts steps only


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_time_budget_decays_the_schedule(schedule, tmp_path):
    """A run ended by train.max_minutes (max_steps out of reach) decays over its minutes."""
    cfg = config_from_dict(tiny_config("segmentor", tmp_path, steps=10 ** 8, max_minutes=0.04,
                                       lr_schedule=schedule))
    res = train(cfg, tmp_path / "run")
    assert res.stopped == "max_minutes" and res.step > 3
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in lines if r["phase"] == "train"]
    if schedule == "constant":
        assert lrs == [1e-3] * len(lrs)
        return
    assert lrs[0] > 0.9e-3 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    # the last step began within one step's time of the budget's end: close to zero (before: 1e-3 throughout)
    step_s = res.seconds / res.step
    assert lrs[-1] <= 1e-3 * 0.5 * (1 - math.cos(math.pi * min(1.0, 2 * step_s / 2.4))) + 1e-9
