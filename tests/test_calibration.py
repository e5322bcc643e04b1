"""Temperature calibration: the fit recovers known temperatures (binary and multi-class, FOV respected), a
temperature moves no label, ``diffmis calibrate`` writes a run's temperature and prediction applies it only where
it was fitted, and bad calibration input is refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny import tiny_config
from PIL import Image

from diffmis.calibration import apply_temperature, calibration_ece, fit_temperature, temperature_nll
from diffmis.cli.main import main
from diffmis.config import config_from_dict
from diffmis.errors import CheckpointError, ConfigError, DataError
from diffmis.inference import Predictor, calibrate_run, find_inputs
from diffmis.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_binary_fit_recovers_a_known_under_confidence_and_keeps_the_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, size=(1, 200, 200))
    labels = (rng.random(z.shape[1:]) < 1.0 / (1.0 + np.exp(-z[0]))).astype(np.float64)
    under = 1.0 / (1.0 + np.exp(-z / 2.0))  # the calibrated logit halved: T = 0.5 restores it
    cases = [(under, labels[None], None)]
    t = fit_temperature(cases)
    assert 0.4 < t < 0.63
    assert calibration_ece(cases, t) < 0.5 * calibration_ece(cases, 1.0)
    assert temperature_nll(cases, t) < temperature_nll(cases, 1.0)
    tempered = apply_temperature(torch.from_numpy(under), t, dim=0).numpy()
    assert ((tempered > 0.5) == (under > 0.5)).all()  # a temperature moves no label
    fov = np.zeros((200, 200), bool)
    fov[:100] = True  # pixels outside the FOV do not count
    assert fit_temperature([(under, labels[None], fov)]) == fit_temperature([(under[:, :100], labels[None, :100],
                                                                              None)])
    # a pixel budget draws a subset: the fit stays near the truth
    assert 0.4 < fit_temperature(cases, max_pixels=5000) < 0.63


def test_multiclass_fit_recovers_a_known_over_confidence():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.5, size=(3, 150, 150))
    p_true = np.exp(z) / np.exp(z).sum(0)
    u = rng.random(z.shape[1:])
    labels = (u[None] > np.cumsum(p_true, 0)).sum(0)  # a draw from the true probabilities
    over = np.exp(2 * z) / np.exp(2 * z).sum(0)  # logits doubled: T = 2 restores them
    target = np.eye(3)[labels].transpose(2, 0, 1)
    t = fit_temperature([(over, target, None)])
    assert 1.6 < t < 2.5
    q = apply_temperature(torch.from_numpy(over), t, dim=0)
    assert torch.allclose(q.sum(0), torch.ones(150, 150, dtype=q.dtype))
    assert (q.argmax(0).numpy() == over.argmax(0)).all()


def test_apply_temperature_known_values_and_bad_temperatures():
    p = torch.tensor([[[[1 / (1 + np.exp(-1.0)), 0.5, 1 / (1 + np.exp(2.0))]]]])  # logits 1, 0, -2
    out = apply_temperature(p, 0.5)
    expect = torch.sigmoid(torch.tensor([2.0, 0.0, -4.0], dtype=p.dtype))
    assert torch.allclose(out[0, 0, 0], expect, atol=1e-6)
    assert apply_temperature(p, 1.0) is p
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number"):
            apply_temperature(p, bad)


# ------------------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A HiDiff run (segmentor prior + Bernoulli refiner, 3 members), and 4 held-out 32x32 images with masks."""
    root = tmp_path_factory.mktemp("cal")
    d = tiny_config("hidiff", root, steps=2)
    d["sample"]["ensemble"] = 3
    train(config_from_dict(d), root / "hidiff", log=lambda s: None)
    rng = np.random.default_rng(5)
    for i in range(4):
        img = rng.normal(90, 20, (32, 32))
        yy, xx = np.mgrid[:32, :32]
        disc = (yy - 16) ** 2 + (xx - 10 - 3 * i) ** 2 < 64
        img[disc] += 100
        (root / "images").mkdir(exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"c{i}.png")
    return root


def test_calibrate_run_writes_the_temperature_and_prediction_applies_it(held_out, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
    run, images = held_out / "hidiff", held_out / "images"
    img = np.asarray(Image.open(images / "c0.png"))
    raw = Predictor.from_run(run).predict_array(img)
    assert Predictor.from_run(run).temperature == 1.0  # nothing fitted yet: sample.temperature
    rec = calibrate_run(run, find_inputs(images), held_out / "masks", log=lambda s: None)
    stored = json.loads((run / "calibration.json").read_text())
    t = stored["temperature"]
    assert t == rec["temperature"] and stored["n_cases"] == 4 and stored["checkpoint"] in ("best", "last")
    assert stored["predict"]["ensemble"] == 3 and not stored["segmentor_only"]
    assert rec["nll"]["fitted"] <= rec["nll"]["t1"] + 1e-12  # T = 1 is on the grid: the fit is never worse
    pred = Predictor.from_run(run)
    assert pred.temperature == t and pred.temperature_source == str(run / "calibration.json")
    cal = pred.predict_array(img)
    np.testing.assert_array_equal(cal.label, raw.label)  # labels never move
    expect = apply_temperature(torch.from_numpy(raw.probability)[None], t)[0].numpy()
    np.testing.assert_allclose(cal.probability, expect, atol=1e-5)
    assert Predictor.from_run(run, temperature=1.0).temperature == 1.0  # explicit wins: the raw maps
    np.testing.assert_allclose(Predictor.from_run(run, temperature=1.0).predict_array(img).probability,
                               raw.probability, atol=1e-6)
    # fitted for the whole method: the segmentor alone keeps its raw softmax
    assert Predictor.from_run(run, segmentor_only=True).temperature == 1.0
    with pytest.warns(UserWarning, match="other sampling settings.*ensemble 3 -> 1"):
        assert Predictor.from_run(run, ensemble=1).temperature == t
    # the CLI says which temperature it applies, and from where
    assert main(["predict", "--run", str(run), "--input", str(images / "c0.png"), "--output",
                 str(held_out / "out_cal"), "--no-progress", "--threads", "1"]) == 0
    assert f"temperature {t:.3g} ({run / 'calibration.json'})" in capsys.readouterr().err
    # a second fit keeps the record it replaces
    calibrate_run(run, find_inputs(images), held_out / "masks", log=lambda s: None)
    assert json.loads((run / "calibration.json").read_text())["previous"]["temperature"] == t


def test_calibrate_cli_and_bad_input(held_out, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
    run = held_out / "hidiff"
    before = (run / "calibration.json").read_text() if (run / "calibration.json").is_file() else None
    rc = main(["calibrate", "--run", str(run), "--input", str(held_out / "images"), "--masks",
               str(held_out / "masks"), "--dry-run", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "fitted on 4 case(s)" in out and "dry run, nothing written" in out
    after = (run / "calibration.json").read_text() if (run / "calibration.json").is_file() else None
    assert after == before
    # a mask folder without the images' stems: named, exit 2, nothing written
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / "other.png")
    rc = main(["calibrate", "--run", str(run), "--input", str(held_out / "images"), "--masks",
               str(tmp_path / "masks"), "--threads", "1"])
    assert rc == 2 and "no reference mask for case 'c0'" in capsys.readouterr().err
    assert ((run / "calibration.json").read_text() if (run / "calibration.json").is_file() else None) == before
    # a mask of the wrong size
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "masks" / "c0.png")
    for i in (1, 2, 3):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / f"c{i}.png")
    rc = main(["calibrate", "--run", str(run), "--input", str(held_out / "images"), "--masks",
               str(tmp_path / "masks"), "--threads", "1"])
    assert rc == 2 and "the mask is (20, 20), its probability map (32, 32)" in capsys.readouterr().err
    rc = main(["calibrate", "--run", str(tmp_path / "nope"), "--input", str(held_out / "images"), "--masks",
               str(held_out / "masks")])
    assert rc == 2 and "is not a diffmis run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["predict", "--run", str(run), "--input", str(held_out / "images"), "--output", str(tmp_path / "o"),
              "--temperature", "0"])
    assert e.value.code == 2 and "must be a finite number > 0" in capsys.readouterr().err


def test_a_corrupt_calibration_file_is_named(held_out, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(held_out / "hidiff", run)
    (run / "calibration.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"calibration\.json is not a diffmis calibration record.*calibrate"):
        Predictor.from_run(run)
    (run / "calibration.json").write_text(json.dumps({"temperature": -2}))
    with pytest.raises(CheckpointError, match="not a positive number"):
        Predictor.from_run(run)
    assert Predictor.from_run(run, temperature=1.0).temperature == 1.0  # an explicit temperature needs no file
    with pytest.raises(ConfigError, match="positive number"):
        Predictor.from_run(run, temperature=-1.0)


def test_sample_temperature_in_the_config(held_out, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(held_out / "hidiff", run)
    (run / "calibration.json").unlink(missing_ok=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["sample"]["temperature"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert Predictor.from_run(run).temperature == 0.5
    cfg["sample"]["temperature"] = 0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="temperature"):
        Predictor.from_run(run)



def test_train_calibrate_fits_on_the_val_split_after_training(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config("hidiff", tmp_path, steps=2, calibrate=True)))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    assert "calibrated on 2 'val' case(s)" in capsys.readouterr().out  # the synthetic set's 2 val images
    rec = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert rec["split"] == "val" and rec["n_cases"] == 2
    assert Predictor.from_run(tmp_path / "run").temperature == rec["temperature"]
    # a run stopped early (--stop-after) is not finished: not calibrated
    assert main(["train", str(cfg), "--out", str(tmp_path / "run2"), "--stop-after", "1", "--threads", "1"]) == 0
    assert not (tmp_path / "run2" / "calibration.json").exists()
    # from Python: diffmis.inference.calibrate_split after train(), the same record
    from diffmis.inference import calibrate_split

    again = calibrate_split(tmp_path / "run", write=False)
    assert again["temperature"] == rec["temperature"] and again["n_cases"] == 2


def test_train_calibrate_refuses_what_it_cannot_do_before_training(tmp_path):
    from diffmis.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "data", 8, size=(32, 32), channels=1)
    (root / "splits" / "val.txt").write_text("")  # a val split without cases: named before any training step
    d = tiny_config("hidiff", tmp_path, steps=2, calibrate=True)
    d["data"].update(kind="folder", root=str(root))
    with pytest.raises(DataError, match=r"val\.txt: empty split"):
        train(config_from_dict(d), tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()
    (root / "splits" / "val.txt").unlink()  # no val split at all
    with pytest.raises(DataError, match="val"):
        train(config_from_dict(d), tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()
    from diffmis.config import load_config

    with pytest.raises(ConfigError, match="train.calibrate fits on 2D runs.*diffmis calibrate"):
        load_config("hidiff_mni3d", ["train.calibrate=true"])


def test_calibrating_a_split_fits_where_predictions_apply_it(tmp_path):
    """Images stored larger than data.image_size: the split is fitted at the stored size, as on the files."""
    from diffmis.data.synthetic import write_synthetic
    from diffmis.inference import calibrate_split

    root = write_synthetic(tmp_path / "data", 12, size=(48, 40), channels=1)
    d = tiny_config("hidiff", tmp_path, steps=2)
    d["data"].update(kind="folder", root=str(root))  # image_size stays 32x32
    train(config_from_dict(d), tmp_path / "run", log=lambda s: None)
    val = (root / "splits" / "val.txt").read_text().split()
    files = [root / "images" / f"{i}.png" for i in val]
    by_files = calibrate_run(tmp_path / "run", files, root / "masks", write=False, log=lambda s: None)
    by_split = calibrate_split(tmp_path / "run", write=False, log=lambda s: None)
    assert by_split["n_cases"] == by_files["n_cases"] == len(val)
    assert by_split["n_pixels"] == by_files["n_pixels"] == len(val) * 48 * 40
    assert by_split["temperature"] == by_files["temperature"]
    assert abs(by_split["ece"]["t1"] - by_files["ece"]["t1"]) < 1e-6
