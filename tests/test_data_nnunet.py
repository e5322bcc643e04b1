"""nnU-Net raw datasets: slice-wise NIfTI reading, write-back with the original affine/spacing, checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from diffmis.config import DataConfig
from diffmis.data import build_dataset, check_dataset, dataset_info, read_volume, write_volume_like
from diffmis.errors import DataError

SHAPE = (10, 12, 6)
SPACING = (0.8, 1.2, 2.5)


def _affine() -> np.ndarray:
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(SPACING)
    aff[:3, 3] = (-40.5, 12.25, 7.0)
    return aff


def _write_case(root: Path, case: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:7, 3:9, 1:5] = 1
    labels[4:6, 5:7, 2:4] = 2
    for c in range(2):  # two MR-like sequences of different scales
        img = (labels * (100 + 50 * c) + rng.normal(500 * (c + 1), 20, SHAPE)).astype(np.int16)
        nib.save(nib.Nifti1Image(img, _affine()), str(root / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, _affine()), str(root / "labelsTr" / f"{case}.nii.gz"))
    return labels


@pytest.fixture()
def nnunet(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "Dataset001_Toy"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = {f"case_{i:04d}": _write_case(root, f"case_{i:04d}", i) for i in range(3)}
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": 3, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root, labels


def test_nifti_round_trip_keeps_affine_and_spacing(nnunet: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, labels = nnunet
    assert check_dataset(root).ok
    cfg = DataConfig(kind="nnunet", root=str(root), in_channels=2, num_classes=3, image_size=None,
                     normalize="zscore", val_fraction=0.34)
    ds = build_dataset(cfg, "val", train=False)
    (case,) = {i.rsplit("_s", 1)[0] for i in ds.ids}
    assert len(ds) == SHAPE[2] and ds.ids[0] == f"{case}_s0000"
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["image"].shape == (2, SHAPE[0], SHAPE[1]) and items[0]["mask"].shape == (3, SHAPE[0], SHAPE[1])
    img = items[3]["image"].numpy()
    np.testing.assert_allclose(img.mean(axis=(1, 2)), 0.0, atol=1e-4)  # z-score per slice and channel
    np.testing.assert_allclose(img.std(axis=(1, 2)), 1.0, atol=1e-3)
    pred = np.stack([it["mask"].argmax(0).numpy() for it in items])  # (S, X, Y): "predictions"
    ref = root / "imagesTr" / f"{case}_0000.nii.gz"
    out = write_volume_like(ref, pred, tmp_path / "pred" / f"{case}.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, _affine(), atol=1e-5)
    np.testing.assert_allclose(back.header.get_zooms()[:3], SPACING, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels[case])
    assert back.get_data_dtype() == np.uint8
    vol = read_volume(out)
    assert vol.spacing == pytest.approx(SPACING) and vol.data.shape == SHAPE


def test_other_slice_axis_and_shape_errors(nnunet: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, labels = nnunet
    cfg = DataConfig(kind="nnunet", root=str(root), in_channels=2, num_classes=3, image_size=(8, 8),
                     slice_axis=0, cache=False)
    ds = build_dataset(cfg, "train", train=False)
    assert len(ds) == 3 * SHAPE[0] and ds[0]["image"].shape == (2, 8, 8)
    ref = root / "labelsTr" / "case_0001.nii.gz"
    stack = labels["case_0001"]  # slices along axis 0 stacked first: the (X, Y, Z) array itself
    out = write_volume_like(ref, stack, tmp_path / "p.nii.gz", slice_axis=0)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), labels["case_0001"])
    with pytest.raises(DataError, match=r"needs \(10, 12, 6\)"):
        write_volume_like(ref, np.zeros((6, 10, 11), np.uint8), tmp_path / "bad.nii.gz", slice_axis=0)
    info = dataset_info(cfg)
    assert info["class_names"] == ["background", "a", "b"] and info["splits"]["train"] == 3 * SHAPE[0]


def test_nnunet_problems_name_their_files(nnunet: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = nnunet
    (root / "imagesTr" / "case_0001_0001.nii.gz").unlink()
    lab = nib.load(str(root / "labelsTr" / "case_0002.nii.gz"))
    bad = np.asarray(lab.dataobj)[:, :, :5].copy()
    bad[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(bad, lab.affine), str(root / "labelsTr" / "case_0002.nii.gz"))
    report = check_dataset(root)
    files = {Path(f).name: m for f, m in report.problems}
    assert "missing channel" in files["case_0001_0001.nii.gz"]
    assert "shape (10, 12, 5) differs" in files["case_0002.nii.gz"]
    assert any("{5}" in m for f, m in report.problems if f.endswith("case_0002.nii.gz"))
    cfg = DataConfig(kind="nnunet", root=str(root), in_channels=2, num_classes=4)
    with pytest.raises(DataError, match="num_classes must be 3"):
        build_dataset(cfg, "train", train=False)


def test_2d_png_nnunet(tmp_path: Path) -> None:
    root = tmp_path / "Dataset002_Png"
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((16, 20, 3), 40 * i, np.uint8)).save(root / "imagesTr" / f"im{i}_0000.png")
        lab = np.zeros((16, 20), np.uint8)
        lab[4:9, 5:12] = 1
        Image.fromarray(lab).save(root / "labelsTr" / f"im{i}.png")
    meta = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "road": 1},
            "numTraining": 2, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert check_dataset(root).ok
    ds = build_dataset(DataConfig(kind="nnunet", root=str(root), image_size=None), "train", train=False)
    item = ds[1]
    assert item["image"].shape == (3, 16, 20) and item["mask"].shape == (1, 16, 20)
    assert item["mask"].sum() == 5 * 7
