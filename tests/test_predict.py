"""Prediction: Predictor in memory, files and folders (PNG/JPEG, NIfTI, DICOM), sliding windows, PD-DDPM priors,
uncertainty consistent with ensemble.py, resumable folders, and bad inputs named clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from _tiny import tiny_config
from PIL import Image

from diffmis.cli.main import main
from diffmis.config import config_from_dict
from diffmis.data import normalize_intensity
from diffmis.errors import CheckpointError, ConfigError, InputError
from diffmis.inference import InputCase, Predictor, find_inputs, predict_paths
from diffmis.inference import predictor as predictor_module
from diffmis.methods import build
from diffmis.training.trainer import train

# ------------------------------------------------------------------------------------------------------------
# runs, trained once for the module
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``seg``: a segmentor trained on 32x32 patches at native size (DRIVE-like, sliding windows);
    ``pd``: PD-DDPM (own pre-segmentation net, start step 20 of T = 50) on 32x32 resized images."""
    root = tmp_path_factory.mktemp("runs")
    d = tiny_config("segmentor", root, steps=1)
    d["data"].update(image_size=None, patch_size=[32, 32])
    train(config_from_dict(d), root / "seg", log=lambda s: None)
    d = tiny_config("pd_ddpm", root, steps=1)
    train(config_from_dict(d), root / "pd", log=lambda s: None)
    return {"seg": root / "seg", "pd": root / "pd"}


@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def _grey(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(90, 20, (h, w))
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2] += 100
    return np.clip(img, 0, 255).astype(np.uint8)


def _record_windows(module: torch.nn.Module) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    return seen


# ------------------------------------------------------------------------------------------------------------
# in memory
# ------------------------------------------------------------------------------------------------------------


class _PixelNet(torch.nn.Module):
    """A 1x1-convolution segmentor: windowing geometry at DRIVE size without the cost of a UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x):
        from diffmis.models import SegmentorOutput

        return SegmentorOutput(logits=self.conv(x), features=[])


def test_sliding_window_returns_native_size(runs, monkeypatch):
    """A patch-trained run predicts any size through MONAI's SlidingWindowInferer; the net sees only 32x32."""
    from monai.inferers import SlidingWindowInferer

    from diffmis.methods import SegmentorMethod

    p = Predictor.from_run(runs["seg"], batch_size=16)
    assert isinstance(p.inferer, SlidingWindowInferer)
    calls = []
    real_call = SlidingWindowInferer.__call__
    monkeypatch.setattr(SlidingWindowInferer, "__call__",
                        lambda self, x, net, *a, **k: calls.append(tuple(x.shape)) or real_call(self, x, net, *a, **k))
    seen = _record_windows(p.method.segmentor)
    for h, w in [(70, 90), (20, 25)]:  # not a multiple of the window; smaller than one window
        seen.clear()
        r = p.predict_array(_grey(h, w, 0), f"img{h}x{w}")
        assert r.label.shape == r.variance.shape == r.entropy.shape == (h, w)
        assert r.probability.shape == (1, h, w) and r.label.dtype == np.int64
        assert set(np.unique(r.label)) <= {0, 1}
        assert seen and all(s[-2:] == (32, 32) for s in seen), seen
        assert np.all(r.variance == 0)  # one deterministic member
    assert calls == [(1, 1, 70, 90), (1, 1, 32, 32)]  # the small image is padded up to one window

    net = _PixelNet()
    seen = _record_windows(net)
    drive = Predictor(SegmentorMethod(net, 1, {}), p.cfg, batch_size=64)
    r = drive.predict_array(_grey(584, 565, 0), "drive")  # DRIVE: 565 x 584 pixels
    assert r.label.shape == (584, 565) and r.probability.shape == (1, 584, 565)
    assert all(s[-2:] == (32, 32) for s in seen)
    assert sum(s[0] for s in seen) == 24 * 24  # overlap 0.25: stride 24, ceil((584 - 32) / 24) + 1 = 24 rows
    # a 1x1 convolution is translation-invariant: stitched windows equal the whole image in one pass
    with torch.no_grad():
        x = torch.from_numpy(normalize_intensity(_grey(584, 565, 0)[None].astype(np.float32), "minmax",
                                                           (0.0, 1.0)))[None]
        whole = torch.sigmoid(net.conv(x))[0].numpy()
    np.testing.assert_allclose(r.probability, whole, atol=1e-5)


def test_uncertainty_matches_ensemble_and_one_batch(runs, monkeypatch):
    """Variance and entropy (bits) are ensemble.py's; the members and the prior go through one sampler call (the
    method gets the B images with members=n and repeats the prior image-major inside)."""
    p = Predictor.from_run(runs["pd"], ensemble=3)
    results, sample_calls = [], []
    real_ep, real_sample = predictor_module.ensemble_predict, type(p.method).sample

    def spy_ep(*a, **k):
        results.append(real_ep(*a, **k))
        return results[-1]

    def spy_sample(self, image, **k):
        sample_calls.append((image.shape[0] * k.get("members", 1), k.get("init")))
        return real_sample(self, image, **k)

    monkeypatch.setattr(predictor_module, "ensemble_predict", spy_ep)
    monkeypatch.setattr(type(p.method), "sample", spy_sample)
    r = p.predict_array(_grey(32, 32, 1), "a")  # 32x32 = the run's image_size: no resizing
    res = results[-1]
    assert len(sample_calls) == 1 and sample_calls[0][0] == 3  # 3 members, one batch
    np.testing.assert_allclose(r.probability, res.probability[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(r.variance, res.uncertainty["variance"][0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(r.entropy, res.uncertainty["entropy"][0, 0].numpy(), atol=1e-5)
    assert 0 <= r.entropy.min() and r.entropy.max() <= 1.0 + 1e-6 and r.entropy.max() > 0.1  # bits, K = 1
    assert r.nfe == p.steps + 1  # the prior pass once per image, not once per member

    # two images with different prior masks: the sampler's init is [a, a, a, b, b, b]
    sample_calls.clear()
    zeros, ones = np.zeros((32, 32), np.int64), np.full((32, 32), 255, np.int64)
    out = p.predict_batch([_grey(32, 32, 1), _grey(32, 32, 2)], ["a", "b"], [zeros, ones])
    assert len(out) == 2 and len(sample_calls) == 1
    batch, init = sample_calls[0]
    assert batch == 6 and init.shape == (2, 1, 32, 32)
    assert [float(v) for v in init.mean(dim=(1, 2, 3))] == [0, 1]
    from diffmis.methods.base import repeat_members

    assert [float(v) for v in repeat_members(init, 3).mean(dim=(1, 2, 3))] == [0, 0, 0, 1, 1, 1]

    # a resized input: maps come back at the input's size
    r = p.predict_array(_grey(45, 61, 3), "c")
    assert r.label.shape == r.entropy.shape == (45, 61) and r.probability.shape == (1, 45, 61)


def test_prior_from_a_segmentor_run(runs, monkeypatch):
    """``prior=`` another run: its hard masks start the chain (what ``--prior RUN`` does)."""
    seg = Predictor.from_run(runs["seg"])
    p = Predictor.from_run(runs["pd"], prior=seg, start_step=10, steps=2)
    inits = []
    real = type(p.method).sample
    monkeypatch.setattr(type(p.method), "sample",
                        lambda self, image, **k: inits.append(k["init"]) or real(self, image, **k))
    img = _grey(32, 32, 4)
    r = p.predict_array(img, "x")
    assert r.label.shape == (32, 32) and r.nfe == 2  # the prior run's pass is not this run's NFE
    np.testing.assert_array_equal(inits[0][0, 0].numpy(), seg.predict_array(img).label)
    with pytest.raises(ConfigError, match="start step"):  # conditional start needs T'
        Predictor(build(config_from_dict(tiny_config("conditional_unet", Path(".")))),
                  config_from_dict(tiny_config("conditional_unet", Path("."))), prior=seg)


def test_volume_slices_along_the_slice_axis(runs):
    """Slices are taken along data.slice_axis, each predicted like a 2D image, stacked back in place."""
    p = Predictor.from_run(runs["seg"], batch_size=2)
    cfg = p.cfg.model_copy(update={"data": p.cfg.data.model_copy(update={"slice_axis": 1})})
    p1 = Predictor(p.method, cfg, batch_size=2)
    vol = np.stack([_grey(32, 40, s) for s in range(5)], axis=1).astype(np.float32)  # (32, 5, 40)
    seen = _record_windows(p.method.segmentor)
    r = p1.predict_volume(vol, source="v")
    assert r.label.shape == r.entropy.shape == (32, 5, 40) and r.probability.shape == (1, 32, 5, 40)
    assert all(s[-2:] == (32, 32) for s in seen)
    for i in (0, 3):
        np.testing.assert_array_equal(r.label[:, i], p.predict_array(vol[:, i], "s").label)
    with pytest.raises(InputError, match="v: the input has 2 channel"):
        p1.predict_volume(np.zeros((2, 32, 5, 40)), source="v")


def test_settings_that_do_not_fit_the_run(runs):
    with pytest.raises(ConfigError, match="sampler 'ddim' does not fit this segmentor run"):
        Predictor.from_run(runs["seg"], sampler="ddim")
    with pytest.raises(ConfigError, match="start step .* needs a Gaussian"):
        Predictor.from_run(runs["seg"], start_step=5)
    with pytest.raises(ConfigError, match=r"steps=30 is outside 1\.\.20"):
        Predictor.from_run(runs["pd"], steps=30)
    with pytest.raises(ConfigError, match="fuse"):
        Predictor.from_run(runs["pd"], fuse="median")


# ------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------


def test_folder_outputs_are_lossless_and_resumable(runs, tmp_path):
    inp = tmp_path / "in"
    for i in range(3):
        _png(inp / f"case{i}.png", _grey(40 + 8 * i, 50, i))
    Image.fromarray(_grey(48, 40, 7)).save(inp / "photo.jpg", quality=80)
    p = Predictor.from_run(runs["seg"], batch_size=64)
    out = tmp_path / "out"
    s = predict_paths(p, find_inputs(inp), out, save_prob=True, save_uncertainty=True, progress=False)
    ids = ["case0", "case1", "case2", "photo"]
    assert s.written == ids and not s.failed and not s.skipped
    for sid in ids:
        lab = np.asarray(Image.open(out / f"{sid}.png"))
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 255}
        prob = np.load(out / "prob" / f"{sid}.npy")
        assert prob.shape == (1, *lab.shape) and prob.dtype == np.float32
        np.testing.assert_array_equal(lab == 255, prob[0] > 0.5)
        assert np.load(out / "uncertainty" / f"{sid}.npy").shape == lab.shape
        assert np.load(out / "entropy" / f"{sid}.npy").shape == lab.shape
    assert not list(out.glob("*.jp*g"))
    assert json.loads((out / "predict_summary.json").read_text())["written"] == ids

    before = {f: f.stat().st_mtime_ns for f in out.rglob("*.png")}
    (out / "case1.png").unlink()
    s = predict_paths(p, find_inputs(inp), out, save_prob=True, save_uncertainty=True, progress=False)
    assert s.written == ["case1"] and s.skipped == ["case0", "case2", "photo"]
    assert all(f.stat().st_mtime_ns == t for f, t in before.items() if f.name != "case1.png")
    (out / "prob" / "photo.npy").unlink()  # an incomplete case is redone
    s = predict_paths(p, find_inputs(inp), out, save_prob=True, save_uncertainty=True, progress=False)
    assert s.written == ["photo"]
    s = predict_paths(p, find_inputs(inp), out, overwrite=True, progress=False)
    assert len(s.written) == 4


def test_multiclass_label_values(tmp_path):
    """K > 1: PNG label maps hold the class index 0..K-1 (what evaluate reads)."""
    d = tiny_config("segmentor", tmp_path, num_classes=3)
    cfg = config_from_dict(d)
    torch.manual_seed(0)
    p = Predictor(build(cfg), cfg)
    _png(tmp_path / "in" / "a.png", _grey(32, 48, 0))
    s = predict_paths(p, [tmp_path / "in" / "a.png"], tmp_path / "out", save_prob=True, progress=False)
    assert s.written == ["a"]
    lab = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert lab.shape == (32, 48) and set(np.unique(lab)) <= {0, 1, 2}
    np.testing.assert_array_equal(lab, np.load(tmp_path / "out" / "prob" / "a.npy").argmax(0))


def test_nifti_volume_keeps_affine_and_header(runs, tmp_path, cli_env):
    """CLI on a NIfTI file: a volume mask on the input's grid (affine, header, shape), maps on request."""
    affine = np.array([[0.8, 0, 0, -12.5], [0, 0.8, 0, 30.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    data = np.stack([_grey(32, 40, s) for s in range(4)], axis=-1).astype(np.int16) * 10 - 300  # (32, 40, 4)
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b"diffmis test"
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "ct_0000.nii.gz")
    rc = main(["predict", "--run", str(runs["seg"]), "--input", str(tmp_path / "ct_0000.nii.gz"),
               "--output", str(tmp_path / "out"), "--prob", "--uncertainty", "--no-progress"])
    assert rc == 0
    out = nib.load(tmp_path / "out" / "ct.nii.gz")  # nnU-Net channel suffix dropped, like nnU-Net does
    assert out.shape == data.shape
    np.testing.assert_array_equal(out.affine, nib.load(tmp_path / "ct_0000.nii.gz").affine)
    assert out.header["descrip"].tobytes().rstrip(b"\0") == b"diffmis test"
    assert out.header.get_xyzt_units() == ("mm", "sec")
    lab = np.asarray(out.dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    assert np.load(tmp_path / "out" / "prob" / "ct.npy").shape == (1, 32, 40, 4)
    assert np.load(tmp_path / "out" / "entropy" / "ct.npy").shape == (32, 40, 4)
    # slice z of the volume is the 2D prediction of that slice
    p = Predictor.from_run(runs["seg"])
    np.testing.assert_array_equal(lab[..., 2], p.predict_array(data[..., 2].astype(np.float32)).label)


def test_dicom_series(runs, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    arr = np.stack([_grey(32, 36, s) for s in range(3)]).astype(np.int16)  # (Z, Y, X)
    vol = sitk.GetImageFromArray(arr)
    vol.SetSpacing((0.7, 0.7, 3.0))
    vol.SetOrigin((-10.0, 5.0, 20.0))
    series = tmp_path / "in" / "series1"
    series.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.1"
    for z in range(arr.shape[0]):
        sl = vol[:, :, z]
        for tag, value in [("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"), ("0008|0060", "CT"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.7\\0.7"), ("0018|0050", "3.0"),
                           ("0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0013", str(z + 1)), ("0008|0018", f"{uid}.3.{z + 1}")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"slice{z}.dcm"))
        writer.Execute(sl)
    cases = find_inputs(tmp_path / "in")
    assert cases == [InputCase("series1", "dicom", (series,))]
    s = predict_paths(Predictor.from_run(runs["seg"]), cases, tmp_path / "out", progress=False)
    assert s.written == ["series1"], s.failed
    out = sitk.ReadImage(str(tmp_path / "out" / "series1.nii.gz"))
    assert out.GetSize() == vol.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), vol.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), vol.GetOrigin(), atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1}


def test_prior_mask_folder_and_run_on_the_cli(runs, tmp_path, cli_env):
    inp = tmp_path / "in"
    for i in range(2):
        _png(inp / f"im{i}.png", _grey(32, 32, i))
        _png(tmp_path / "priors" / f"im{i}.png", (_grey(32, 32, i) > 150) * 255)
    common = ["predict", "--run", str(runs["pd"]), "--input", str(inp), "--steps", "2", "--ensemble", "2",
              "--batch-size", "2", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "o1"), "--prior", str(tmp_path / "priors"),
                          "--start-step", "10"]) == 0
    assert main(common + ["--output", str(tmp_path / "o2"), "--prior", str(runs["seg"]), "--start-step", "10",
                          "--fuse", "staple", "--uncertainty"]) == 0
    for o in ("o1", "o2"):
        assert sorted(f.name for f in (tmp_path / o).glob("*.png")) == ["im0.png", "im1.png"]
    (tmp_path / "priors" / "im1.png").unlink()
    assert main(common + ["--output", str(tmp_path / "o3"), "--prior", str(tmp_path / "priors"),
                          "--start-step", "10"]) == 1  # im1 has no prior: named, im0 still written
    assert (tmp_path / "o3" / "im0.png").is_file() and not (tmp_path / "o3" / "im1.png").exists()
    assert "no prior mask named im1" in json.loads((tmp_path / "o3" / "predict_summary.json").read_text())[
        "failed"]["im1"]


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------


def test_missing_run_folder_exits_2(tmp_path, cli_env, capsys):
    _png(tmp_path / "in" / "a.png", _grey(32, 32, 0))
    rc = main(["predict", "--run", str(tmp_path / "nope"), "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out")])
    assert rc == 2
    assert f"run folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_wrong_channel_count_names_file_and_counts(runs, tmp_path):
    rgb = _png(tmp_path / "in" / "colour.png", np.stack([_grey(32, 32, i) for i in range(3)], -1))
    p = Predictor.from_run(runs["seg"])
    with pytest.raises(InputError, match=r"colour\.png: the input has 3 channel\(s\) but the model takes 1"):
        p.predict_array(np.moveaxis(np.asarray(Image.open(rgb)), -1, 0), str(rgb))
    s = predict_paths(p, [rgb], tmp_path / "out", progress=False)
    assert list(s.failed) == ["colour"] and "3 channel(s)" in s.failed["colour"] and str(rgb) in s.failed["colour"]


def test_corrupt_file_among_ten(runs, tmp_path, cli_env, capsys):
    inp = tmp_path / "in"
    for i in range(10):
        _png(inp / f"img{i:02d}.png", _grey(32, 40, i))
    bad = inp / "img04.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    rc = main(["predict", "--run", str(runs["seg"]), "--input", str(inp), "--output", str(tmp_path / "out"),
               "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 1
    assert str(bad) in err and "10/10" in err  # named; the progress bar ran on stderr
    assert sorted(f.stem for f in (tmp_path / "out").glob("*.png")) == [f"img{i:02d}" for i in range(10) if i != 4]
    # a second run only retries the bad one
    rc = main(["predict", "--run", str(runs["seg"]), "--input", str(inp), "--output", str(tmp_path / "out"),
               "--no-progress"])
    assert rc == 1 and "9 already present, 1 failed" in capsys.readouterr().out


def test_checkpoint_of_another_model(runs, tmp_path, cli_env, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs["seg"], other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["params"]["features"] = [8, 8, 16, 16, 32, 16]
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"does not fit this model: tensor '[\w.]+'"):
        Predictor.from_run(other)
    cfg["experiment"]["recipe"] = "medsegdiff"
    cfg["model"] = tiny_config("medsegdiff", tmp_path)["model"]
    cfg["diffusion"] = tiny_config("medsegdiff", tmp_path)["diffusion"]
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="written by recipe 'segmentor'.*builds recipe 'medsegdiff'"):
        Predictor.from_run(other)
    _png(tmp_path / "in" / "a.png", _grey(32, 32, 0))
    assert main(["predict", "--run", str(other), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "recipe 'segmentor'" in capsys.readouterr().err


def test_find_inputs_groups_nnunet_channels_and_rejects_clashes(tmp_path):
    for case in ("a", "b"):
        for c in range(2):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / f"{case}_{c:04d}.nii.gz")
    cases = find_inputs(tmp_path, in_channels=2)
    assert [(c.id, len(c.paths)) for c in cases] == [("a", 2), ("b", 2)]
    assert [c.id for c in find_inputs(tmp_path, in_channels=1)] == ["a_0000", "a_0001", "b_0000", "b_0001"]
    _png(tmp_path / "x" / "s.png", np.zeros((4, 4)))
    _png(tmp_path / "x" / "s.tif", np.zeros((4, 4)))
    with pytest.raises(InputError, match="both be written as 's'"):
        find_inputs(tmp_path / "x")
    with pytest.raises(InputError, match="does not exist"):
        find_inputs(tmp_path / "missing")
    with pytest.raises(InputError, match="would overwrite it"):
        predict_paths(None, [InputCase("s", "image", (tmp_path / "x" / "s.png",))], tmp_path / "x")  # type: ignore


def test_start_step_zero_samples_from_pure_noise(runs, monkeypatch):
    """start_step=0 on a PD-DDPM run: no prior pass, the whole chain from noise (NFE = steps), and the method
    is told so (not silently given its default T')."""
    p = Predictor.from_run(runs["pd"], start_step=0, steps=3, ensemble=1)
    assert p.start_step is None and p.pure_noise
    seen = []
    real = type(p.method).sample
    monkeypatch.setattr(type(p.method), "sample",
                        lambda self, image, **k: (seen.append(k.get("start_step")), real(self, image, **k))[1])
    r = p.predict_array(_grey(32, 32, 1), "a")
    assert seen == [0] and r.nfe == 3
    monkeypatch.undo()
    pd = Predictor.from_run(runs["pd"], steps=3, ensemble=1)
    assert pd.start_step is not None and pd.predict_array(_grey(32, 32, 1), "a").nfe == 4  # prior pass + 3


def test_predicting_at_timesteps_a_sampler_trained_network_never_saw_warns():
    """``diffusion.train_timesteps: sampler`` trains the network at its default sampler's timesteps only: another
    chain is allowed (the NFE sweeps use it) but warned about, naming the timesteps and the fix."""
    import warnings

    d = tiny_config("hidiff", Path("."))
    d["diffusion"]["train_timesteps"] = "sampler"
    d["sample"]["steps"] = 1
    cfg = config_from_dict(d)
    method = build(cfg)
    assert method.untrained_timesteps(1) == []
    assert method.untrained_timesteps(3) == [t for t in method.scheduler.sampling_timesteps(3) if t != 9] != []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor(method, cfg)  # the run's own chain: no warning
    with pytest.warns(UserWarning, match=r"only at the timesteps its default sampler visits.*3 steps also visit "
                                         r"timesteps \[\d, 0\].*diffusion.train_timesteps: all"):
        Predictor(method, cfg, steps=3)

    pd = tiny_config("pd_ddpm", Path("."))  # T = 50, start step 20, 3 steps
    pd["diffusion"]["train_timesteps"] = "sampler"
    method = build(config_from_dict(pd))
    assert method.untrained_timesteps(3, 20) == []
    assert 49 in method.untrained_timesteps(3, None)  # the full chain from noise starts where it never trained
    pd["diffusion"]["train_timesteps"] = "all"
    assert build(config_from_dict(pd)).untrained_timesteps(10, None) == []
