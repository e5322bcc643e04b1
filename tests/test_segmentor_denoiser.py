"""A segmentor as PD-DDPM's denoiser and as HiDiff's refiner (models/segmentor_denoiser.py), and
``train.denoiser_from_prior``: the widened copy of a trained segmentor returns that network's probabilities
whatever the noisy mask (and prior), a run started that way predicts its segmentor's answer before training and
learns after, and wrong settings are refused with the key and the fix named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from _tiny import SEG, tiny_config
from diffmis.config import config_from_dict
from diffmis.errors import CheckpointError, ConfigError
from diffmis.masks import hard_labels, one_hot, probabilities
from diffmis.methods import build
from diffmis.metrics import dice_batch
from diffmis.models.segmentor_denoiser import SegmentorDenoiser, SegmentorRefiner, channel_logits
from diffmis.schedulers import BernoulliScheduler
from diffmis.models.segmentors import UNetSegmentor
from diffmis.training.trainer import train

FEATURES = SEG["params"]["features"]


def _pd_config(out: Path, **train_kw) -> dict:
    d = tiny_config("pd_ddpm", out, **train_kw)
    d["model"]["name"] = "segmentor_denoiser"
    d["model"]["params"] = {"backbone": "unet", "features": list(FEATURES)}
    return d


def _segmentor_run(out: Path, steps: int) -> Path:
    """A tiny segmentor run of the width the tiny recipes' segmentor has (``SEG``): the run to start from."""
    seg = tiny_config("segmentor", out, steps=steps)
    seg["model"] = copy.deepcopy(SEG)
    return train(config_from_dict(seg)).run_dir


def _scene(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, one-hot mask) 32x32: a bright disc per image on a faintly textured background."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    lab = torch.zeros(n, 32, 32)
    for i in range(n):
        lab[i][(yy - 10 - 3 * i) ** 2 + (xx - 12 - 2 * i) ** 2 <= 36] = 1
    g = torch.Generator().manual_seed(0)
    return (lab + 0.05 * torch.randn(lab.shape, generator=g))[:, None], lab[:, None]


@pytest.mark.parametrize("k", [1, 3])
def test_started_from_a_segmentor_it_returns_the_segmentors_probabilities_whatever_x_t(k):
    torch.manual_seed(0)
    seg = UNetSegmentor(2, k, features=FEATURES)
    for p in seg.parameters():  # a "trained" network: weights away from their initial values
        p.data.add_(0.05 * torch.randn_like(p))
    den = SegmentorDenoiser(2, k, features=FEATURES)
    den.start_from(seg)
    image = torch.randn(3, 2, 32, 32)
    want = probabilities(seg(image).logits)
    t = torch.tensor([0, 5, 9])
    for x_t in (torch.zeros(3, k, 32, 32), 3.0 * torch.randn(3, k, 32, 32)):
        out = den(x_t, t, den.condition(image))
        assert out.shape == (3, k, 32, 32)
        torch.testing.assert_close(out, 2.0 * want - 1.0, atol=1e-5, rtol=0)  # pm1 range
    den.mask_range = "01"
    torch.testing.assert_close(den(x_t, t, den.condition(image)), want, atol=1e-5, rtol=0)
    first = den.net.net.conv_0.conv_0.conv.weight
    assert first.shape[1] == 2 + k and torch.equal(first[:, 2:], torch.zeros_like(first[:, 2:]))


def test_a_segmentor_of_other_widths_is_refused_with_the_tensor_named():
    den = SegmentorDenoiser(1, 1, features=FEATURES)
    before = {k: v.clone() for k, v in den.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor 'net\.conv_0.*same backbone \('unet'\)"):
        den.start_from(UNetSegmentor(1, 1, features=[16, 16, 32, 64, 128, 16]))
    assert all(torch.equal(v, before[k]) for k, v in den.state_dict().items())  # a misfit changes nothing
    with pytest.raises(CheckpointError, match="widen"):  # a segmentor of C + K channels: nothing to widen
        den.start_from(UNetSegmentor(2, 1, features=FEATURES))


def test_it_works_on_volumes_and_other_backbones():
    den = SegmentorDenoiser(1, 3, backbone="segresnet", init_filters=8, spatial_dims=3)
    out = den(torch.randn(2, 3, 16, 16, 16), torch.zeros(2, dtype=torch.long),
              den.condition(torch.randn(2, 1, 16, 16, 16)))
    assert out.shape == (2, 3, 16, 16, 16) and out.min() >= -1 and out.max() <= 1
    out.sum().backward()
    assert all(p.grad is not None for p in den.parameters())


def test_settings_that_cannot_work_are_refused(tmp_path):
    d = _pd_config(tmp_path)
    d["diffusion"]["prediction"] = "eps"
    with pytest.raises(ConfigError, match="needs diffusion.prediction: x0"):
        build(config_from_dict(d))
    d = _pd_config(tmp_path / "a", denoiser_from_prior=True)
    with pytest.raises(ConfigError, match="denoiser_from_prior needs train.prior_run"):
        train(config_from_dict(d))
    seg_run = _segmentor_run(tmp_path / "seg", steps=1)
    d = tiny_config("pd_ddpm", tmp_path / "b", denoiser_from_prior=True, prior_run=str(seg_run))
    with pytest.raises(ConfigError, match="needs model.name: segmentor_denoiser"):
        train(config_from_dict(d))
    with pytest.raises(ConfigError, match="no effect on recipe 'medsegdiff'"):
        build(config_from_dict(tiny_config("medsegdiff", tmp_path / "c", denoiser_from_prior=True)))


def test_a_run_started_from_its_pre_segmentation_predicts_it_then_learns(tmp_path):
    """Train a segmentor run, start PD-DDPM's denoiser from it: before any step, sampling returns the
    pre-segmentation's probabilities (the start is the noised hard labels; the denoiser ignores them); a few
    dozen steps on one batch then take the sampled Dice above 0.9 while the frozen pre-segmentation stays."""
    seg_run = _segmentor_run(tmp_path / "seg", steps=3)
    cfg = config_from_dict(_pd_config(tmp_path / "pd", steps=0, prior_run=str(seg_run), denoiser_from_prior=True))
    method = build(cfg)
    method.setup_training(cfg, log=lambda s: None)
    image, labels = _scene()
    method.eval()
    with torch.no_grad():
        prior = method.start_prior(image)
        out = method.sample(image, generator=torch.Generator().manual_seed(0), members=2)
    torch.testing.assert_close(out.probs, prior.repeat_interleave(2, 0), atol=1e-5, rtol=0)

    mask = one_hot(labels[:, 0].long(), 1)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    assert not any(p.requires_grad for p in method.prior.parameters())  # the pre-segmentation stays frozen
    method.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(60):
        opt.zero_grad(set_to_none=True)
        method.loss(image, mask, step, gen).total.backward()
        opt.step()
    method.eval()
    with torch.no_grad():
        probs = method.sample(image, generator=torch.Generator().manual_seed(2)).probs
        prior_after = method.start_prior(image)
    torch.testing.assert_close(prior_after, prior)
    dice = dice_batch(one_hot(hard_labels(probs), 1), mask).mean().item()
    prior_dice = dice_batch(one_hot(hard_labels(prior), 1), mask).mean().item()
    assert dice > 0.9 and dice > prior_dice, (dice, prior_dice)


def test_auto_starts_from_a_prior_run_where_there_is_one(tmp_path):
    seg_run = _segmentor_run(tmp_path / "seg", steps=1)
    image, _ = _scene(2)
    for prior_run, equal in ((str(seg_run), True), (None, False)):
        cfg = config_from_dict(_pd_config(tmp_path / "pd", prior_run=prior_run, denoiser_from_prior="auto"))
        method = build(cfg)
        logs: list[str] = []
        method.setup_training(cfg, log=logs.append)
        method.eval()
        with torch.no_grad():
            out = method.sample(image, generator=torch.Generator().manual_seed(0)).probs
            prior = method.start_prior(image)
        assert torch.allclose(out, prior, atol=1e-5) is equal
        assert equal or any("from scratch" in line for line in logs)
    plain = config_from_dict(tiny_config("pd_ddpm", tmp_path / "c", prior_run=str(seg_run),
                                         denoiser_from_prior="auto"))
    build(plain).setup_training(plain, log=lambda s: None)  # a time-conditioned denoiser: auto leaves it alone
    build(config_from_dict(tiny_config("medsegdiff", tmp_path / "d", denoiser_from_prior="auto")))  # not refused


# ---- the Bernoulli refiner (HiDiff) -----------------------------------------------------------------------------


def _hidiff_config(out: Path, **train_kw) -> dict:
    d = tiny_config("hidiff", out, **train_kw)
    d["model"]["name"] = "segmentor_refiner"
    d["model"]["params"] = {"backbone": "unet", "features": list(FEATURES)}
    d["diffusion"]["prior_residual"] = False
    return d


def test_channel_logits_are_the_logits_of_each_channels_probability():
    z = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])  # (1, 3, 1, 1)
    q = torch.softmax(z, 1)
    torch.testing.assert_close(channel_logits(z), torch.log(q / (1 - q)))
    torch.testing.assert_close(channel_logits(z[:, :1]), z[:, :1])  # K = 1: the sigmoid's logits themselves
    assert torch.isfinite(channel_logits(torch.tensor([[[[80.0]], [[0.0]]]]))).all()  # q = 1 in float: finite


@pytest.mark.parametrize("k", [1, 3])
def test_a_refiner_started_from_a_segmentor_returns_its_answer_whatever_y_t_and_the_prior(k):
    """``y0_hat = |y_t - sigmoid(flip)|`` (the Bernoulli scheduler's reading) is the segmentor's probability of
    each channel: its sigmoid for K = 1, its softmax for K = 3; the 2K mask channels of the input start at zero."""
    torch.manual_seed(0)
    seg = UNetSegmentor(2, k, features=FEATURES)
    for p in seg.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ref = SegmentorRefiner(2, k, features=FEATURES, segmentor_channels=[8, 16])
    ref.start_from(seg, "the segmentor")
    image = torch.randn(3, 2, 32, 32)
    want = probabilities(seg(image).logits)
    t = torch.tensor([9, 5, 0])
    for y_t, prior in ((torch.zeros(3, k, 32, 32), torch.full((3, k, 32, 32), 0.5)),
                       (torch.randint(0, 2, (3, k, 32, 32)).float(), torch.rand(3, k, 32, 32))):
        flip = ref(y_t, t, {**ref.condition(image), "prior": prior})
        torch.testing.assert_close(BernoulliScheduler.flip_logits_to_y0(flip, y_t), want, atol=1e-5, rtol=0)
    first = ref.net.net.conv_0.conv_0.conv.weight
    assert first.shape[1] == 2 + 2 * k and torch.equal(first[:, 2:], torch.zeros_like(first[:, 2:]))


def test_a_hidiff_run_started_from_its_segmentor_predicts_its_answer_then_learns(tmp_path):
    """HiDiff with ``segmentor_refiner`` and ``train.denoiser_from_prior``: before any step, sampling returns the
    segmentor's probabilities; 60 refiner steps on one batch (the segmentor frozen: ``segmentor_every: auto``
    after a prior run) take the sampled Dice above 0.9 and above the segmentor's."""
    seg_run = _segmentor_run(tmp_path / "seg", steps=3)
    cfg = config_from_dict(_hidiff_config(tmp_path / "hd", steps=0, prior_run=str(seg_run),
                                          denoiser_from_prior=True, segmentor_every="auto"))
    method = build(cfg)
    logs: list[str] = []
    method.setup_training(cfg, log=logs.append)
    assert any("denoiser initialised from the segmentor" in line for line in logs)
    image, labels = _scene()
    method.eval()
    with torch.no_grad():
        prior, _, _ = method.prior_and_condition(image)
        out = method.sample(image, generator=torch.Generator().manual_seed(0), members=2)
    torch.testing.assert_close(out.probs, prior.repeat_interleave(2, 0), atol=1e-5, rtol=0)

    mask = one_hot(labels[:, 0].long(), 1)
    opt = torch.optim.Adam(method.parameter_groups()["refiner"], lr=3e-3)
    seg_before = {k: v.clone() for k, v in method.segmentor.state_dict().items()}
    method.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(60):
        (phase,) = method.phases(step)  # the refiner alone
        opt.zero_grad(set_to_none=True)
        phase.loss(image, mask, step, gen).total.backward()
        opt.step()
    method.eval()
    with torch.no_grad():
        probs = method.sample(image, generator=torch.Generator().manual_seed(2)).probs
    assert all(torch.equal(v, seg_before[k]) for k, v in method.segmentor.state_dict().items())
    dice = dice_batch(one_hot(hard_labels(probs), 1), mask).mean().item()
    prior_dice = dice_batch(one_hot(hard_labels(prior), 1), mask).mean().item()
    assert dice > 0.9 and dice > prior_dice, (dice, prior_dice)


def test_refiner_settings_that_cannot_work_are_refused(tmp_path):
    d = _hidiff_config(tmp_path)
    d["diffusion"]["prior_residual"] = True
    with pytest.raises(ConfigError, match="prior_residual.*SegmentorRefiner.*set diffusion.prior_residual: false"):
        build(config_from_dict(d))
    seg_run = _segmentor_run(tmp_path / "seg", steps=1)
    d = tiny_config("hidiff", tmp_path / "b", denoiser_from_prior=True, prior_run=str(seg_run))
    with pytest.raises(ConfigError, match="needs model.name: segmentor_refiner"):
        train(config_from_dict(d))
