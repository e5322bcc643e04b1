"""3D runs: config rules, 3D data (patches, augmentation, resampling, the built-in slabs), sliding-window
prediction of volumes, NIfTI round trips, per-volume metrics in mm, and the scoring convention.

Everything is small (volumes of a few thousand voxels, networks of a few thousand parameters) and CPU-only.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from diffmis.config import AugmentConfig, DataConfig, load_config
from diffmis.data import build_dataset, write_mni3d
from diffmis.data.mni import mni_volumes
from diffmis.data.transforms import Augmenter3D, normalize_intensity, random_patch_3d, resample_volume
from diffmis.errors import ConfigError, InputError
from diffmis.evaluation import evaluate_folders
from diffmis.inference import Predictor, predict_paths
from diffmis.methods import build
from diffmis.metrics import segmentation_metrics


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- config


def test_3d_config_rules():
    cfg = DataConfig(kind="mni", spatial_dims=3, image_size=None, patch_size=32, in_channels=1, num_classes=3)
    assert cfg.patch_size == (32, 32, 32)  # one number = every axis
    with pytest.raises(ValueError, match="3 entries|has 2 entries"):
        DataConfig(kind="mni", spatial_dims=3, image_size=None, patch_size=[32, 32])
    with pytest.raises(ValueError, match="image_size: null"):
        DataConfig(kind="mni", spatial_dims=3, image_size=[32, 32, 32], patch_size=[32, 32, 32])
    with pytest.raises(ValueError, match="train on patches"):
        DataConfig(kind="mni", spatial_dims=3, image_size=None)
    with pytest.raises(ValueError, match="spatial_dims=3"):
        DataConfig(kind="mni", spacing=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        DataConfig(kind="mni", spatial_dims=3, image_size=None, patch_size=16, spacing=[1.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="multiple of 16"):  # the 3D UNet downsamples 4 times
        cfg = load_config("segmentor_mni3d", ["data.patch_size=[40, 48, 16]"])
        build(cfg).check_geometry(cfg)


# ---------------------------------------------------------------- data


def test_random_patch_3d_oversamples_foreground_and_pads():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[30:33, 2:5, 20:23] = 1  # a small object in a corner
    image = rng.random((1, 40, 40, 40)).astype(np.float32)
    hits = [random_patch_3d(image, labels, (16, 16, 16), rng, 1.0)[1].any() for _ in range(20)]
    assert all(hits)  # every patch centred on a foreground voxel holds it
    uniform = [random_patch_3d(image, labels, (16, 16, 16), rng, 0.0)[1].any() for _ in range(40)]
    assert sum(uniform) < 20  # uniform positions mostly miss it
    small_img, small_lab = random_patch_3d(image[:, :10, :20, :30], labels[:10, :20, :30], (16, 24, 32), rng, 0.5)
    assert small_img.shape == (1, 16, 24, 32) and small_lab.shape == (16, 24, 32)
    a = random_patch_3d(image, labels, (8, 8, 8), np.random.default_rng(5), 0.5)
    b = random_patch_3d(image, labels, (8, 8, 8), np.random.default_rng(5), 0.5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_augmenter_3d_is_reproducible_and_keeps_labels():
    aug = Augmenter3D(AugmentConfig(flip=True, rotate90=True, rotate_degrees=15, scale_range=0.1, intensity=0.1,
                                    prob=1.0))
    assert aug.active
    image = torch.rand(1, 16, 24, 8)
    labels = torch.randint(0, 3, (16, 24, 8))
    out1 = aug(image, labels, None, np.random.default_rng(3))
    out2 = aug(image, labels, None, np.random.default_rng(3))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    assert out1[0].shape == image.shape and out1[1].shape == labels.shape and out1[1].dtype == torch.int64
    assert set(out1[1].unique().tolist()) <= {0, 1, 2}  # nearest resampling invents no label
    out3 = aug(image, labels, None, np.random.default_rng(4))
    assert not torch.equal(out1[0], out3[0])
    assert not Augmenter3D(AugmentConfig()).active


def test_resample_volume_to_a_spacing():
    image = np.random.default_rng(0).random((1, 20, 30, 10)).astype(np.float32)
    labels = np.zeros((20, 30, 10), np.uint8)
    labels[5:15, 10:20, 2:8] = 2
    img, lab = resample_volume(image, labels, (1.0, 1.0, 3.0), (2.0, 2.0, 1.5))
    assert img.shape[1:] == lab.shape  # MONAI keeps the extent between the first and last voxel centres:
    assert all(abs(a - b) <= 1 for a, b in zip(lab.shape, (10, 15, 20)))  # about 20/2 x 30/2 x 30/1.5 voxels
    assert set(np.unique(lab).tolist()) == {0, 2}
    # the object keeps its physical volume: 10 x 10 x 6 voxels of 3 mm^3 = 1800 mm^3, now in voxels of 6 mm^3
    assert abs(int((lab == 2).sum()) * 6.0 - 1800.0) / 1800.0 < 0.2
    same = resample_volume(image, labels, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert same[0] is image and same[1] is labels


def test_zscore_nonzero_keeps_the_background():
    x = np.zeros((1, 4, 4, 4), np.float32)
    x[0, 1:3, 1:3, 1:3] = np.arange(8, dtype=np.float32).reshape(2, 2, 2) + 100
    y = normalize_intensity(x, "zscore_nonzero")
    inside = x[0] != 0
    assert np.all(y[0][~inside] == 0)
    assert abs(float(y[0][inside].mean())) < 1e-5 and abs(float(y[0][inside].std()) - 1) < 1e-4


def test_builtin_3d_slabs_and_their_nnunet_copy(tmp_path):
    vols = mni_volumes()
    assert vols.images.shape == (5, 80, 96, 16) and vols.spacing == (2.0, 2.0, 2.0)
    assert {k: len(v) for k, v in vols.splits.items()} == {"train": 3, "val": 1, "test": 1}
    assert set(np.unique(vols.labels).tolist()) == {0, 1, 2}
    root = write_mni3d(tmp_path / "m3d")
    img = nib.load(str(root / "imagesTr" / "mni3d_z00_0000.nii.gz"))
    assert img.shape == (80, 96, 16) and np.allclose(img.header.get_zooms()[:3], (2, 2, 2))
    cfg = DataConfig(kind="nnunet", root=str(root), spatial_dims=3, image_size=None, patch_size=[32, 32, 16],
                     in_channels=1, num_classes=3)
    train = build_dataset(cfg, "train", train=True)
    assert len(train) >= 64 and train[0]["image"].shape == (1, 32, 32, 16)  # an epoch of patches
    assert train[0]["mask"].shape == (3, 32, 32, 16)
    test = build_dataset(cfg, "test", train=False)
    assert len(test) == 1 and test[0]["image"].shape == (1, 80, 96, 16)
    builtin = build_dataset(cfg.model_copy(update={"kind": "mni", "root": None}), "test", train=False)
    assert torch.equal(builtin[0]["mask"], test[0]["mask"])  # the files hold the built-in volumes


# ---------------------------------------------------------------- prediction


def _tiny_3d(patch=(32, 32, 16), **extra) -> Predictor:
    cfg = load_config("segmentor_mni3d", [f"data.patch_size={list(patch)}", "model.params.features=[4, 4, 4, 8, 8, 4]",
                                          "data.normalize=zscore"] + [f"{k}={v}" for k, v in extra.items()])
    torch.manual_seed(0)
    method = build(cfg)
    for p in method.parameters():  # a network that is not the identity of its init
        p.data.add_(0.05 * torch.randn_like(p))
    return Predictor(method, cfg, ensemble=1, batch_size=2, precision="fp32")  # exact on every CPU


def test_sliding_window_equals_whole_volume_where_both_fit():
    vol = np.random.default_rng(1).normal(size=(1, 32, 32, 16)).astype(np.float32)
    pred = _tiny_3d((32, 32, 16))  # one window covers the volume
    out = pred.predict_volume(vol, source="v")
    x = torch.from_numpy(normalize_intensity(vol, "zscore"))[None]
    with torch.no_grad():
        direct = pred.method.sample(x).probs[0].numpy()
    assert out.probability.shape == (3, 32, 32, 16) and out.label.shape == (32, 32, 16)
    assert np.allclose(out.probability, direct, atol=1e-5)
    big = np.random.default_rng(2).normal(size=(1, 50, 24, 20)).astype(np.float32)  # windows + padding
    many = pred.predict_volume(big, source="big")
    assert many.probability.shape == (3, 50, 24, 20) and many.nfe > 1
    assert np.allclose(many.probability.sum(axis=0), 1.0, atol=1e-4)  # softmax blended stays a distribution


def test_mirror_tta_averages_the_flips():
    vol = np.random.default_rng(3).normal(size=(1, 32, 32, 16)).astype(np.float32)
    plain = _tiny_3d().predict_volume(vol, source="v")
    base = _tiny_3d()
    tta_pred = Predictor(base.method, base.cfg, ensemble=1, tta=True, precision="fp32")
    tta = tta_pred.predict_volume(vol, source="v")
    assert tta.nfe == 8 * plain.nfe
    flipped = _tiny_3d().predict_volume(vol[:, ::-1].copy(), source="v")
    assert not np.allclose(plain.probability, flipped.probability[:, ::-1])  # the net is not flip-invariant ...
    tta_f = tta_pred.predict_volume(vol[:, ::-1].copy())
    assert np.allclose(tta.probability, tta_f.probability[:, ::-1], atol=1e-5)  # ... its TTA average is


def test_3d_run_refuses_2d_images_and_needs_spacing_to_resample():
    pred = _tiny_3d()
    with pytest.raises(InputError, match="3D run"):
        pred.predict_array(np.zeros((1, 32, 32), np.float32))
    resampling = _tiny_3d(**{"data.spacing": "[2.0, 2.0, 2.0]"})
    with pytest.raises(InputError, match="voxel size"):
        resampling.predict_volume(np.zeros((1, 32, 32, 16), np.float32))
    out = resampling.predict_volume(np.random.default_rng(0).random((1, 40, 40, 12)).astype(np.float32),
                                    spacing=(1.0, 1.0, 3.0))
    assert out.label.shape == (40, 40, 12)  # back on the input's grid


def test_nifti_prediction_keeps_the_affine(tmp_path):
    affine = np.array([[0.0, -1.5, 0.0, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(36, 30, 18)).astype(np.float32)
    src = tmp_path / "in" / "case.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(src))
    summary = predict_paths(_tiny_3d(), [src], tmp_path / "out", progress=False)
    assert summary.written == ["case"]
    out = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    assert out.shape == data.shape and np.allclose(out.affine, affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}


# ---------------------------------------------------------------- per-volume scores


def test_per_volume_metrics_in_mm_with_anisotropic_spacing():
    ref = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    ref[..., 4:8, 4:8, 4:8] = True
    spacing = (1.0, 2.0, 3.0)
    for axis, mm in ((2, 1.0), (3, 2.0), (4, 3.0)):
        pred = torch.roll(ref, shifts=1, dims=axis)  # the same cube, one voxel further along one axis
        s = segmentation_metrics(pred, ref, spacing=spacing)
        assert float(s.dice[0, 0]) == pytest.approx(0.75)  # 48 of 64 voxels shared
        assert float(s.iou[0, 0]) == pytest.approx(48 / 80)
        assert float(s.hd95[0, 0]) == pytest.approx(mm)  # the shifted face lies one voxel (mm along that axis) away
        assert 0 < float(s.assd[0, 0]) < mm


def test_evaluate_names_the_per_volume_convention(tmp_path):
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[4:8, 4:8, 4:8] = 1
    pred = np.roll(ref, 1, axis=2)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    for folder, arr in (("ref", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / folder / "c.nii.gz"))
    ev = evaluate_folders(tmp_path / "pred", tmp_path / "ref", num_classes=2)
    assert ev.options["convention"].startswith("per volume")
    assert ev.cases[0].metrics["1"]["HD95"] == pytest.approx(3.0)  # mm from the header: one 3 mm voxel


def test_data_check_finds_a_label_on_another_grid_and_empty_labels(tmp_path):
    from diffmis.data import check_dataset

    root = write_mni3d(tmp_path / "m3d")
    lab = root / "labelsTr" / "mni3d_z00.nii.gz"
    img = nib.load(str(lab))
    moved = img.affine.copy()
    moved[:3, 3] += (10.0, 0.0, 0.0)  # same shape and spacing, shifted by 1 cm
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), str(lab))
    empty = root / "labelsTr" / "mni3d_z16.nii.gz"
    e = nib.load(str(empty))
    nib.save(nib.Nifti1Image(np.zeros(e.shape, np.uint8), e.affine), str(empty))
    report = check_dataset(root, num_classes=3)
    assert any("affine" in msg and "mni3d_z00" in path for path, msg in report.problems)
    assert report.counts["empty_masks"] == 1


def test_3d_runs_on_a_cpu_resolve_auto_to_fp32_contiguous():
    from diffmis.hardware import resolve_for

    res = resolve_for("auto", "auto", "cpu", 3)
    assert res.precision == "fp32" and not res.channels_last  # on every CPU kind (see resolve_for)
    assert resolve_for("bf16", True, "cpu", 3).precision == "bf16"  # an explicit choice is kept
    assert not resolve_for("bf16", True, "cpu", 3).channels_last  # channels-last is a 4-D layout


def test_folder_layout_of_nifti_volumes(tmp_path):
    """images/<id>.nii.gz + masks/<id>.nii.gz + splits/: read whole by a 3D run, refused by a 2D one, checked."""
    from diffmis.data import check_dataset

    vols = mni_volumes()
    root = tmp_path / "vols"
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i, vid in enumerate(vols.ids):
        nib.save(nib.Nifti1Image(vols.images[i], affine), str(root / "images" / f"{vid}.nii.gz"))
        nib.save(nib.Nifti1Image(vols.labels[i], affine), str(root / "masks" / f"{vid}.nii.gz"))
    for name, idx in vols.splits.items():
        (root / "splits" / f"{name}.txt").write_text("".join(f"{vols.ids[i]}\n" for i in idx))
    cfg = DataConfig(kind="folder", root=str(root), spatial_dims=3, image_size=None, patch_size=[32, 32, 16],
                     in_channels=1, num_classes=3)
    train = build_dataset(cfg, "train", train=True)
    assert train[0]["image"].shape == (1, 32, 32, 16) and train[0]["mask"].shape == (3, 32, 32, 16)
    assert build_dataset(cfg, "test", train=False)[0]["image"].shape == (1, 80, 96, 16)
    with pytest.raises(Exception, match="spatial_dims=3"):
        build_dataset(DataConfig(kind="folder", root=str(root), in_channels=1, num_classes=3), "train", train=True)
    assert check_dataset(root, num_classes=3).ok
    bad = np.asarray(nib.load(str(root / "masks" / f"{vols.ids[0]}.nii.gz")).dataobj)[:, :, :8]
    nib.save(nib.Nifti1Image(bad, affine), str(root / "masks" / f"{vols.ids[0]}.nii.gz"))
    report = check_dataset(root, num_classes=3)
    assert any("shape" in msg for _, msg in report.problems)
