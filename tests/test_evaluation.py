"""Folder evaluation: pairing by stem, failures and errors naming files, FOV, NIfTI 3D spacing, summary/CSV, CLI."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from diffmis.cli.main import main
from diffmis.errors import DataError, InputError
from diffmis.evaluation import evaluate_folders, read_scored_labels


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def square(top=4, left=4, side=10, size=32, value=255):
    m = np.zeros((size, size), np.uint8)
    m[top : top + side, left : left + side] = value
    return m


@pytest.fixture
def binary_set(tmp_path):
    """Case a: prediction shifted 2 columns (Dice 0.8); case b: exact; references {0, 255}."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    save_png(ref / "a.png", square())
    save_png(pred / "a.png", square(left=6))
    save_png(ref / "b.png", square(top=10))
    save_png(pred / "b.png", square(top=10, value=1))  # a {0, 1} prediction pairs with a {0, 255} reference
    return tmp_path


def test_binary_folder_hand_computed(binary_set):
    res = evaluate_folders(binary_set / "pred", binary_set / "ref")
    assert res.classes == ["1"] and [c.id for c in res.cases] == ["a", "b"]
    a, b = res.cases
    assert a.metrics["1"]["Dice"] == pytest.approx(0.8)
    assert a.metrics["1"]["IoU"] == pytest.approx(2 / 3)
    assert a.metrics["1"]["HD95"] == pytest.approx(2.0)
    assert a.metrics["1"]["ASSD"] == pytest.approx(1.0)
    assert b.metrics["1"] == {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "ASSD": 0.0}
    assert res.mean["1"]["Dice"] == pytest.approx(0.9)
    assert res.foreground_mean["Dice"] == pytest.approx(0.9)
    assert res.missing == [] and res.extra == []

    summary = res.to_summary()
    assert summary["n_cases"] == 2 and "empty" in summary["conventions"]
    assert set(summary) >= {"metric_per_case", "mean", "foreground_mean", "std", "conventions", "n_cases"}
    case = summary["metric_per_case"][0]
    assert case["id"] == "a" and case["pred"].endswith("a.png") and case["metrics"]["1"]["Dice"] == pytest.approx(0.8)
    assert summary["std"]["1"]["Dice"] == pytest.approx(np.std([0.8, 1.0], ddof=1))


def test_summary_and_csv_files(binary_set, tmp_path):
    res = evaluate_folders(binary_set / "pred", binary_set / "ref", out_dir=tmp_path / "eval")
    loaded = json.loads((tmp_path / "eval" / "summary.json").read_text())  # strict JSON
    assert loaded["mean"]["1"]["Dice"] == pytest.approx(0.9)
    rows = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").open()))
    assert [(r["id"], r["class"]) for r in rows] == [("a", "1"), ("b", "1")]
    assert float(rows[0]["Dice"]) == pytest.approx(0.8)
    assert res.write_csv(tmp_path / "x.csv").exists()


def test_empty_truth_and_prediction_conventions(tmp_path):
    save_png(tmp_path / "ref" / "both.png", np.zeros((32, 32)))
    save_png(tmp_path / "pred" / "both.png", np.zeros((32, 32)))
    save_png(tmp_path / "ref" / "fp.png", np.zeros((32, 32)))
    save_png(tmp_path / "pred" / "fp.png", square())
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", num_classes=1)
    both, fp = res.cases
    assert both.metrics["1"] == {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "ASSD": 0.0}
    diag = np.hypot(31, 31)
    assert fp.metrics["1"]["Dice"] == 0.0 and fp.metrics["1"]["HD95"] == pytest.approx(diag)
    assert res.to_summary()["distance_penalised"] == {"1": ["fp"]}


def test_missing_and_extra_predictions(binary_set):
    (binary_set / "pred" / "b.png").unlink()
    save_png(binary_set / "pred" / "zzz.png", square())
    res = evaluate_folders(binary_set / "pred", binary_set / "ref")
    assert res.missing == ["b"]
    assert [p.name for p in res.extra] == ["zzz.png"]
    b = res.cases[1]
    assert b.missing and b.metrics["1"]["Dice"] == 0.0 and b.metrics["1"]["HD95"] == pytest.approx(np.hypot(31, 31))
    assert res.mean["1"]["Dice"] == pytest.approx(0.4)
    s = res.to_summary()
    assert s["missing_predictions"] == ["b"] and s["metric_per_case"][1]["pred"] is None


def test_size_mismatch_names_both_files(binary_set):
    save_png(binary_set / "pred" / "a.png", np.zeros((30, 32)))
    with pytest.raises(DataError) as err:
        evaluate_folders(binary_set / "pred", binary_set / "ref")
    msg = str(err.value)
    assert "'a'" in msg and str(binary_set / "pred" / "a.png") in msg and "(30, 32)" in msg


def test_labels_out_of_range_and_missing_folder(tmp_path):
    save_png(tmp_path / "ref" / "a.png", square(value=1))
    save_png(tmp_path / "pred" / "a.png", square(value=2))
    with pytest.raises(DataError, match=r"pred/a.png: label 2 is outside 0..1"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    with pytest.raises(InputError, match="reference folder not found"):
        evaluate_folders(tmp_path / "pred", tmp_path / "nope")


def test_multiclass_label_maps(tmp_path):
    ref = np.zeros((32, 32), np.uint8)
    ref[2:12, 2:12] = 1
    ref[16:26, 16:26] = 2
    pred = ref.copy()
    pred[16:26, 16:26] = 0  # class 2 missed entirely
    save_png(tmp_path / "ref" / "c.png", ref)
    save_png(tmp_path / "pred" / "c.png", pred)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert res.classes == ["1", "2"]
    assert res.cases[0].metrics["1"]["Dice"] == 1.0 and res.cases[0].metrics["2"]["Dice"] == 0.0
    assert res.foreground_mean["Dice"] == pytest.approx(0.5)
    assert res.cases[0].foreground_dice == pytest.approx(0.5)


def test_fov_folder(tmp_path):
    pred = square()
    pred[28:31, 28:31] = 255
    fov = np.full((32, 32), 255, np.uint8)
    fov[25:, 25:] = 0
    save_png(tmp_path / "ref" / "r.png", square())
    save_png(tmp_path / "pred" / "r.png", pred)
    save_png(tmp_path / "fov" / "r.png", fov)
    with_fov = evaluate_folders(tmp_path / "pred", tmp_path / "ref", fov_dir=tmp_path / "fov")
    without = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert with_fov.cases[0].metrics["1"]["Dice"] == 1.0 and with_fov.cases[0].metrics["1"]["HD95"] == 0.0
    assert without.cases[0].metrics["1"]["Dice"] < 1.0
    (tmp_path / "fov" / "r.png").unlink()
    with pytest.raises(InputError, match="no FOV mask for case 'r'"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", fov_dir=tmp_path / "fov")


def save_nifti(path: Path, arr: np.ndarray, zooms) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr.astype(np.uint8), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def test_nifti_3d_uses_header_spacing(tmp_path):
    ref = np.zeros((12, 12, 8), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:10, 2:10, 2] = 1
    pred[2:10, 2:10, 4] = 1  # two slices apart along z
    save_nifti(tmp_path / "ref" / "v.nii.gz", ref, (0.5, 0.5, 2.5))
    save_nifti(tmp_path / "pred" / "v.nii.gz", pred, (0.5, 0.5, 2.5))
    labels, spacing = read_scored_labels(tmp_path / "ref" / "v.nii.gz")
    assert labels.shape == (12, 12, 8) and spacing == (0.5, 0.5, 2.5)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert res.cases[0].id == "v"
    assert res.cases[0].metrics["1"]["HD95"] == pytest.approx(5.0)
    assert res.cases[0].metrics["1"]["ASSD"] == pytest.approx(5.0)
    iso = evaluate_folders(tmp_path / "pred", tmp_path / "ref", spacing=[1.0])  # override: 2 voxels -> 2
    assert iso.cases[0].metrics["1"]["HD95"] == pytest.approx(2.0)


def test_probabilities_calibration_and_lenient(binary_set):
    probs = binary_set / "prob"
    probs.mkdir()
    p = square(left=6).astype(np.float32) / 255 * 0.3  # faint map, 0.3 where the (shifted) prediction is
    np.save(probs / "a.npy", p)
    np.save(probs / "b.npy", square(top=10).astype(np.float32)[None] / 255 * 0.9)  # (1, H, W)
    with pytest.raises(InputError, match="prob"):
        evaluate_folders(binary_set / "pred", binary_set / "ref", lenient=True)
    res = evaluate_folders(binary_set / "pred", binary_set / "ref", prob_dir=probs, lenient=True)
    assert res.metric_names == ["Dice", "IoU", "HD95", "ASSD", "ECE", "Dice_lenient", "IoU_lenient"]
    a = res.cases[0].metrics["1"]
    # After max normalisation the faint map is the shifted square at every threshold: Dice 0.8 each time.
    assert a["Dice_lenient"] == pytest.approx(0.8)
    # Foreground pixels of p: 80 right (truth 1) + 20 wrong at 0.3; background 0 everywhere: 20 truth pixels.
    # Class-wise ECE = (100 * |0.8 - 0.3| + 924 * |20/924 - 0|) / 1024.
    assert a["ECE"] == pytest.approx((100 * 0.5 + 20) / 1024)
    summary = res.to_summary()
    assert "lenient" in summary["lenient_protocol"] and summary["calibration"]["n_bins"] == 10
    assert sum(summary["calibration"]["per_class"]["1"]["counts"]) == 2 * 32 * 32
    np.save(probs / "b.npy", np.zeros((3, 32, 32), np.float32))
    with pytest.raises(DataError, match="b.npy: 3 probability channels"):
        evaluate_folders(binary_set / "pred", binary_set / "ref", prob_dir=probs)


# ---------------------------------------------------------------- CLI exit codes


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")


def test_cli_clean_run(binary_set, capsys):
    out = binary_set / "s.json"
    rc = main(["evaluate", "--pred", str(binary_set / "pred"), "--ref", str(binary_set / "ref"),
               "--out", str(out), "--csv", str(binary_set / "c.csv")])
    assert rc == 0
    assert json.loads(out.read_text())["n_cases"] == 2 and (binary_set / "c.csv").exists()
    assert "0.9000" in capsys.readouterr().out


def test_cli_missing_ref_dir_exits_2(binary_set, capsys):
    rc = main(["evaluate", "--pred", str(binary_set / "pred"), "--ref", str(binary_set / "missing")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "reference folder not found" in err and str(binary_set / "missing") in err


def test_cli_missing_prediction_names_case(binary_set, capsys):
    (binary_set / "pred" / "b.png").unlink()
    rc = main(["evaluate", "--pred", str(binary_set / "pred"), "--ref", str(binary_set / "ref")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no prediction" in err and ": b" in err
    assert json.loads((binary_set / "pred" / "summary.json").read_text())["missing_predictions"] == ["b"]


def test_uncertainty_scored_as_an_error_detector(binary_set, capsys):
    """Pooled AUROC of the uncertainty for the wrong pixels: 1 when it marks exactly them, 0 when it marks
    exactly the right ones, 0.5 when it is flat; the CLI prints it."""
    err_a = (square() > 0) != (square(left=6) > 0)  # case a: the 2-column shifts; case b is exact
    unc = binary_set / "unc"
    unc.mkdir()
    for name, maps in (("perfect", (err_a, np.zeros((32, 32), bool))), ("inverse", (~err_a, np.ones((32, 32), bool))),
                       ("flat", (np.zeros((32, 32)), np.zeros((32, 32))))):
        np.save(unc / "a.npy", maps[0].astype(np.float32))
        np.save(unc / "b.npy", maps[1].astype(np.float32))
        res = evaluate_folders(binary_set / "pred", binary_set / "ref", uncertainty_dir=unc)
        det = res.to_summary()["error_detection"]
        assert det["n_pixels"] == 2 * 32 * 32 and det["n_errors"] == int(err_a.sum()) == 40
        assert det["auroc"] == pytest.approx({"perfect": 1.0, "inverse": 0.0, "flat": 0.5}[name])
    np.save(unc / "a.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match="uncertainty map .*a.npy has shape"):
        evaluate_folders(binary_set / "pred", binary_set / "ref", uncertainty_dir=unc)
    np.save(unc / "a.npy", err_a.astype(np.float32))
    assert main(["evaluate", "--pred", str(binary_set / "pred"), "--ref", str(binary_set / "ref"),
                 "--uncertainty", str(unc)]) == 0
    assert "error detection by the uncertainty: AUROC 1.000" in capsys.readouterr().out


def test_error_detection_auroc_hand_computed():
    from diffmis.metrics import error_detection_auroc

    # wrong pixels {0.35, 0.8} against right {0.1, 0.4}: 3 of the 4 pairs ordered right
    assert error_detection_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert error_detection_auroc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == 0.5  # a tie counts half
    assert np.isnan(error_detection_auroc(np.ones(3), np.zeros(3, bool)))
