"""Every registered method, through the Method interface only: gradients reach every trainable parameter from its
training phases, the loss of a known input has its known value, a few dozen steps on one tiny batch make it learn
(Dice on that batch > 0.9), and sampling with an oracle network returns the truth.

A new method is tested by being registered and given an entry in :data:`ENTRIES` (its tiny config, how to make
its network an oracle, and the known loss of its fresh network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from _tiny import RECIPES, tiny_config
from diffmis.config import config_from_dict
from diffmis.errors import ConfigError
from diffmis.losses import segmentation_loss_terms
from diffmis.masks import hard_labels, hard_one_hot, one_hot, probabilities
from diffmis.methods import METHODS, Method, build
from diffmis.methods.medsegdiff_v2 import anchor_loss
from diffmis.metrics import dice_batch
from diffmis.models.segmentors import SegmentorOutput

SIZE = 32


def truth_masks(k: int, n: int = 4) -> torch.Tensor:
    """(n, K, 32, 32) one-hot masks: a disc (class 1) and, for K = 3, a square (class 2), placed per image."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        cy, cx = 10 + 3 * i, 12 + 2 * i
        labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 1
        if k > 1:
            labels[i][20:27, 4 + i:11 + i] = 2
    return one_hot(labels, k)


def images_of(mask: torch.Tensor) -> torch.Tensor:
    """A 1-channel image that shows the mask: class c has intensity c / K plus a little texture."""
    k = mask.shape[1]
    lab = mask.argmax(1).float() if k > 1 else mask[:, 0]
    g = torch.Generator().manual_seed(0)
    return (lab / max(k - 1, 1) + 0.05 * torch.randn(lab.shape, generator=g))[:, None]


# ------------------------------------------------------------------------------------------------------
# per-method entries: an oracle for sampling, the known loss of a fresh network
# ------------------------------------------------------------------------------------------------------


def _gaussian_oracle(method: Method, truth: torch.Tensor) -> None:
    """x0-prediction: the network returns the true mask in the diffused range, whatever x_t."""
    x0 = method.scheduler.mask_to_x0(truth)
    method.denoiser.forward = lambda x_t, t, cond: x0.repeat_interleave(x_t.shape[0] // x0.shape[0], 0)


def _bernoulli_oracle(method: Method, truth: torch.Tensor) -> None:
    """Flip logits +-40 of the true XOR noise |y_t - y0|."""
    def fwd(y_t, t, cond):
        y0 = truth.repeat_interleave(y_t.shape[0] // truth.shape[0], 0)  # members are image-major
        return 40.0 * (2.0 * (y_t - y0).abs() - 1.0)

    method.network.forward = fwd


def _segmentor_oracle(method: Method, truth: torch.Tensor) -> None:
    seg = method.segmentor_module()
    seg.forward = lambda image: SegmentorOutput(logits=40.0 * (2.0 * truth - 1.0), features=[])


def _gaussian_known(method: Method, image: torch.Tensor, mask: torch.Tensor) -> None:
    """A fresh denoiser predicts exactly 0 (zero-initialised head): with the x0 target in [-1, 1] the MSE is 1."""
    raw, cond, t = method.diffusion_terms(image, mask, torch.Generator().manual_seed(0))
    assert raw["diffusion"].item() == pytest.approx(1.0, abs=1e-6)
    out = method.loss(image, mask, 0, torch.Generator().manual_seed(0))
    assert set(out.terms) >= {"diffusion"}


def _bernoulli_known(method: Method, image: torch.Tensor, mask: torch.Tensor) -> None:
    """A fresh refiner outputs flip logit 0 (zero head): the BCE of probability 1/2 is ln 2 per pixel, so the focal
    term is 0.5^gamma ln 2, whatever the noise target."""
    method.prior_residual = False
    gamma = method.scheduler.focal_gamma
    _, cond, _ = method.prior_and_condition(image)
    terms = method.bbdm_terms(mask, cond, torch.Generator().manual_seed(0))
    assert terms["focal"].item() == pytest.approx(0.5 ** gamma * math.log(2.0), rel=1e-5)
    assert torch.isfinite(terms["kl"]) and terms["kl"].item() >= 0


def _segmentor_known(method: Method, image: torch.Tensor, mask: torch.Tensor) -> None:
    """Logits 0: BCE ln 2 (K = 1) or CE ln K, soft Dice of probability 1/2 (or 1/K) computed by hand."""
    seg = method.segmentor_module()
    k = mask.shape[1]
    seg.forward = lambda img: SegmentorOutput(logits=torch.zeros(img.shape[0], k, SIZE, SIZE), features=[])
    out = method.loss(image, mask)
    p = 0.5 if k == 1 else 1.0 / k
    dims = (2, 3)
    dice = (1 - (2 * p * mask.sum(dims) + 1e-5) / (p * SIZE * SIZE + mask.sum(dims) + 1e-5)).mean()
    assert out.terms["ce"].item() == pytest.approx(math.log(2.0) if k == 1 else math.log(k), rel=1e-5)
    assert out.terms["dice"].item() == pytest.approx(dice.item(), rel=1e-5)


@dataclass(frozen=True)
class Entry:
    oracle: Callable[[Method, torch.Tensor], None]
    known: Callable[[Method, torch.Tensor, torch.Tensor], None]
    lr: float = 3e-3
    steps: int = 60


ENTRIES: dict[str, Entry] = {
    "segmentor": Entry(_segmentor_oracle, _segmentor_known),
    "conditional_unet": Entry(_gaussian_oracle, _gaussian_known),
    "medsegdiff": Entry(_gaussian_oracle, _gaussian_known),
    "medsegdiff_v2": Entry(_gaussian_oracle, _gaussian_known),
    "pd_ddpm": Entry(_gaussian_oracle, _gaussian_known),
    "berdiff": Entry(_bernoulli_oracle, _bernoulli_known, lr=1e-2, steps=100),
    "hidiff": Entry(_bernoulli_oracle, _bernoulli_known, lr=1e-2),
}


def test_every_registered_method_has_an_entry_and_a_tiny_config():
    assert set(METHODS.names()) == set(ENTRIES) == set(RECIPES)


def make(recipe: str, k: int = 1, **train) -> Method:
    torch.manual_seed(0)
    cfg = config_from_dict(tiny_config(recipe, Path("/tmp"), num_classes=k, **train))
    method = build(cfg)
    assert isinstance(method, Method) and method.name in (recipe, "medsegdiff")
    return method


# ------------------------------------------------------------------------------------------------------
# the shared tests
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("recipe", sorted(ENTRIES))
def test_phases_reach_every_trainable_parameter(recipe, k):
    method = make(recipe, k)
    mask = truth_masks(k, 2)
    image = images_of(mask)
    groups = method.parameter_groups()
    grouped = [p for ps in groups.values() for p in ps]
    assert len(grouped) == len({id(p) for p in grouped}) == len([p for p in method.parameters() if p.requires_grad])
    step = getattr(method, "pretrain_steps", 0)  # an iteration past any segmentor-only pre-training
    method.zero_grad(set_to_none=True)
    for phase in method.phases(step):
        assert phase.group in groups
        out = phase.loss(image, mask, step, torch.Generator().manual_seed(1))
        assert out.total.ndim == 0 and torch.isfinite(out.total)
        out.total.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{recipe}: no gradient reaches {missing[:5]}"


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("recipe", sorted(ENTRIES))
def test_known_loss_of_a_fresh_network(recipe, k):
    method = make(recipe, k)
    mask = truth_masks(k, 2)
    ENTRIES[recipe].known(method, images_of(mask), mask)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("recipe", sorted(ENTRIES))
def test_oracle_network_samples_the_truth(recipe, k):
    method = make(recipe, k).eval()
    mask = truth_masks(k, 2)
    ENTRIES[recipe].oracle(method, mask)
    kw = {"start_step": 0} if method.own_prior else {}
    with torch.no_grad():
        out = method.sample(images_of(mask), generator=torch.Generator().manual_seed(2), members=2, **kw)
    assert out.probs.shape == (4, k, SIZE, SIZE) and out.nfe >= 1
    assert torch.equal(hard_labels(out.probs), hard_labels(mask.repeat_interleave(2, 0)))


@pytest.mark.parametrize("recipe", sorted(ENTRIES))
def test_oracle_network_samples_the_truth_on_volumes(recipe):
    """The same method code on (B, K, X, Y, Z): schedulers, samplers and the members' repetition work on volumes
    unchanged (3D networks; the oracle replaces the denoiser, the segmentors run for real)."""
    torch.manual_seed(0)
    d = tiny_config(recipe, Path("/tmp"), num_classes=3)
    d["data"] = {"kind": "mni", "spatial_dims": 3, "image_size": None, "patch_size": [32, 32, 16],
                 "in_channels": 1, "num_classes": 3}
    method = build(config_from_dict(d)).eval()
    assert all(getattr(m, "spatial_dims", 3) == 3 for m in method.modules())
    zz, yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), torch.arange(16), indexing="ij")
    labels = torch.zeros(2, 32, 32, 16, dtype=torch.long)
    for i in range(2):
        labels[i][(zz - 12 - 3 * i) ** 2 + (yy - 14) ** 2 + (xx - 8) ** 2 <= 30] = 1  # a ball
        labels[i][20:27, 4 + i:11 + i, 3:9] = 2  # a box
    mask = one_hot(labels, 3)
    ENTRIES[recipe].oracle(method, mask)
    kw = {"start_step": 0} if method.own_prior else {}
    with torch.no_grad():
        out = method.sample(images_of(mask), generator=torch.Generator().manual_seed(2), members=2, **kw)
    assert out.probs.shape == (4, 3, 32, 32, 16)
    assert torch.equal(hard_labels(out.probs), hard_labels(mask.repeat_interleave(2, 0)))


@pytest.mark.parametrize("recipe", sorted(ENTRIES))
def test_it_learns_one_tiny_batch(recipe):
    """A few dozen optimizer steps on one batch: the training loss goes down and the default sampler's Dice on
    that batch exceeds 0.9."""
    entry = ENTRIES[recipe]
    method = make(recipe, 1)
    mask = truth_masks(1, 4)
    image = images_of(mask)
    opts = {g: torch.optim.Adam(ps, lr=entry.lr) for g, ps in method.parameter_groups().items()}
    gen = torch.Generator().manual_seed(3)
    losses = []
    method.train()
    for step in range(entry.steps):
        total = 0.0
        for phase in method.phases(step):
            opts[phase.group].zero_grad(set_to_none=True)
            out = phase.loss(image, mask, step, gen)
            out.total.backward()
            opts[phase.group].step()
            total += float(out.total.detach())
        losses.append(total)
    method.eval()
    with torch.no_grad():
        probs = method.sample(image, generator=torch.Generator().manual_seed(4)).probs
    dice = dice_batch(one_hot(hard_labels(probs), 1), mask).mean().item()
    early, late = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert late < early, f"{recipe}: loss {early:.3f} -> {late:.3f}"
    assert dice > 0.9, f"{recipe}: Dice {dice:.3f} on its training batch after {entry.steps} steps"


def test_anchor_loss_values():
    """MedSegDiff-V2's anchor term: Dice + beta CE on the samples with t % alpha == 0, exactly 0 otherwise."""
    mask = truth_masks(1, 2)
    t_sel, t_off = torch.tensor([0, 5]), torch.tensor([1, 2])
    good, bad = 40 * (2 * mask - 1), -40 * (2 * mask - 1)
    assert anchor_loss(good, mask, t_sel, 5, 10.0) < 1e-4
    assert anchor_loss(bad, mask, t_sel, 5, 10.0) > 10
    assert anchor_loss(bad, mask, t_off, 5, 10.0).item() == 0.0
    terms = segmentation_loss_terms(bad[:1], mask[:1])
    assert anchor_loss(bad, mask, torch.tensor([0, 1]), 5, 10.0).item() == pytest.approx(
        (terms["dice"] + 10.0 * terms["ce"]).item(), rel=1e-5)
    k3 = truth_masks(3, 2)
    assert anchor_loss(40 * (2 * k3 - 1), k3, t_sel, 5, 10.0) < 1e-4
    assert probabilities(torch.zeros(1, 1, 2, 2)).unique().item() == 0.5


# ------------------------------------------------------------------------------------------------------
# recipe levers (issue: diffusion that earns its cost)
# ------------------------------------------------------------------------------------------------------


def _with(recipe: str, **diffusion) -> Method:
    torch.manual_seed(0)
    d = tiny_config(recipe, Path("/tmp"))
    d["diffusion"] = {**d["diffusion"], **diffusion}
    return build(config_from_dict(d))


def test_x0_segmentation_loss_known_value():
    """Dice + BCE on the predicted x0 read as probabilities: a fresh x0 network predicts 0, i.e. probability 1/2."""
    method = _with("medsegdiff", x0_seg_weight=0.5)
    mask = truth_masks(1, 2)
    raw, _, _ = method.diffusion_terms(images_of(mask), mask, torch.Generator().manual_seed(0))
    dice = (1 - (2 * 0.5 * mask.sum((2, 3)) + 1e-5) / (0.5 * SIZE * SIZE + mask.sum((2, 3)) + 1e-5)).mean()
    assert raw["x0_seg"].item() == pytest.approx(dice.item() + math.log(2.0), rel=1e-4)
    out = method.loss(images_of(mask), mask, 0, torch.Generator().manual_seed(0))
    assert out.total.item() == pytest.approx(raw["diffusion"].item() + 0.5 * raw["x0_seg"].item(), rel=1e-4)
    with pytest.raises(Exception, match="prediction: x0"):
        _with("medsegdiff", x0_seg_weight=1.0, prediction="eps")


def test_x0_logits_reads_the_output_as_clean_mask_logits():
    """``x0_logits``: a fresh network outputs logits 0, i.e. probability 1/2, x0 = 0 in pm1; the added terms are a
    segmentor's Dice + BCE on those logits; known logits give x0 = 2 sigmoid - 1 and gradients where a linear x0
    clamped to the range has none."""
    method = _with("medsegdiff", x0_seg_weight=1.0, x0_logits=True)
    mask = truth_masks(1, 2)
    raw, _, _ = method.diffusion_terms(images_of(mask), mask, torch.Generator().manual_seed(0))
    dice = (1 - (2 * 0.5 * mask.sum((2, 3)) + 1e-5) / (0.5 * SIZE * SIZE + mask.sum((2, 3)) + 1e-5)).mean()
    assert raw["x0_seg"].item() == pytest.approx(dice.item() + math.log(2.0), rel=1e-4)
    assert raw["diffusion"].item() == pytest.approx(1.0, rel=1e-5)  # x0_hat = 0 against a target of +-1
    logits = 3.0 * (2 * mask - 1)
    method.denoiser.forward = lambda x_t, t, cond: logits[: x_t.shape[0]]
    x_t, t = torch.zeros_like(mask), torch.zeros(2, dtype=torch.long)
    pred, out = method.predict(x_t, t, {})
    assert torch.equal(out, logits)
    assert torch.allclose(pred, 2 * torch.sigmoid(logits) - 1)
    x0, _ = method.scheduler.pred_to_x0_eps(pred, x_t, t)
    assert torch.allclose(x0, pred)  # already inside [-1, 1]: the sampler's clamp leaves it alone
    # a far-off logit still has a gradient (a linear output at -3 in pm1 is clamped to probability 0: none)
    far = torch.full((1, 1, 2, 2), -20.0, requires_grad=True)
    terms = segmentation_loss_terms(far, torch.ones(1, 1, 2, 2))
    (terms["dice"] + terms["ce"]).backward()
    assert bool((far.grad < 0).all())
    with pytest.raises(Exception, match="prediction: x0"):
        _with("medsegdiff", x0_logits=True, prediction="eps")
    with pytest.raises(Exception, match="x0_logits has no effect"):
        _with("hidiff", x0_logits=True)


def test_image_seg_weight_supervises_the_image_encoder_through_its_own_head():
    """``diffusion.image_seg_weight``: a head on MedSegDiff's image encoder, zero-initialised (logits 0, probability
    1/2: the known Dice + BCE), read in the same pass as the prediction; its term is weighted into the total, its
    gradient reaches the image encoder, a few dozen steps on it alone make the head
    segment, and without the lever there is no head at all (old checkpoints keep loading)."""
    method = _with("medsegdiff", image_seg_weight=0.5)
    mask = truth_masks(1, 4)
    image = images_of(mask)
    calls: list[int] = []
    real = method.denoiser.forward
    method.denoiser.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    raw, _, _ = method.diffusion_terms(image, mask, torch.Generator().manual_seed(0))
    assert len(calls) == 1  # the image head rides on the prediction's own forward pass
    method.denoiser.forward = real
    dice = (1 - (2 * 0.5 * mask.sum((2, 3)) + 1e-5) / (0.5 * SIZE * SIZE + mask.sum((2, 3)) + 1e-5)).mean()
    assert raw["image_seg"].item() == pytest.approx(dice.item() + math.log(2.0), rel=1e-4)
    out = method.loss(image, mask, 0, torch.Generator().manual_seed(0))
    assert out.total.item() == pytest.approx(raw["diffusion"].item() + 0.5 * raw["image_seg"].item(), rel=1e-4)

    net = method.denoiser
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    t = torch.zeros(4, dtype=torch.long)
    for step in range(60):
        _, logits = net(torch.randn_like(mask), t, net.condition(image), image_logits=True)
        terms = segmentation_loss_terms(logits, mask)
        opt.zero_grad()
        (terms["dice"] + terms["ce"]).backward()
        if step == 1:  # after one update of the zero-initialised head, the gradient reaches the image path
            assert sum(float(p.grad.abs().sum()) for p in net.image_stem.parameters()) > 0
        opt.step()
    with torch.no_grad():
        _, logits = net(torch.randn_like(mask), t, net.condition(image), image_logits=True)
    assert dice_batch(one_hot(hard_labels(probabilities(logits)), 1), mask).mean().item() > 0.9

    plain = _with("medsegdiff")
    assert plain.denoiser.image_head is None
    assert not any("image_head" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="image_head=True"):
        plain.denoiser(mask, t, {"image": image}, image_logits=True)
    with pytest.raises(ConfigError, match="image_seg_weight needs a denoiser with an image encoder"):
        _with("conditional_unet", image_seg_weight=1.0)
    with pytest.raises(ConfigError, match="image_seg_weight has no effect on recipe 'hidiff'"):
        _with("hidiff", image_seg_weight=1.0)


def test_recycling_noises_a_prediction_not_the_truth():
    """PD-DDPM with recycle = 1: every sample is noised from the pre-segmentation at t < T' (what sampling sees);
    MedSegDiff: from its own prediction from pure noise (one extra network pass), t uniform."""
    pd = _with("pd_ddpm", recycle=1.0)
    mask = truth_masks(1, 4)
    seen: list[torch.Tensor] = []
    real = pd.denoiser.forward
    pd.denoiser.forward = lambda x_t, t, cond: seen.append(t.clone()) or real(x_t, t, cond)
    marker = torch.zeros_like(mask)
    pd.start_prior = lambda image: marker[: image.shape[0]] + 0.9  # a prior of all foreground
    sources: list[torch.Tensor] = []
    real_noise = pd.scheduler.add_noise
    pd.scheduler.add_noise = lambda x0, noise, t: sources.append(x0.clone()) or real_noise(x0, noise, t)
    pd.diffusion_terms(images_of(mask), mask, torch.Generator().manual_seed(0))
    assert bool((seen[-1] < pd.default_start_step).all())
    assert torch.equal(sources[-1], torch.ones_like(mask))  # all-foreground prior in the pm1 range, not the truth
    msd = _with("medsegdiff", recycle=1.0)
    calls: list[int] = []
    real2 = msd.denoiser.forward
    msd.denoiser.forward = lambda x_t, t, cond: calls.append(int(t[0])) or real2(x_t, t, cond)
    msd.diffusion_terms(images_of(mask), mask, torch.Generator().manual_seed(0))
    assert len(calls) == 2 and calls[0] == msd.scheduler.timesteps - 1  # the prediction from pure noise first


def test_prior_noise_perturbs_the_refiners_prior_only():
    from diffmis.methods.hidiff import smooth_noise

    z = smooth_noise((2, 1, 64, 64), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert z.shape == (2, 1, 64, 64) and z.flatten(1).std(dim=1).allclose(torch.ones(2), atol=1e-4)
    neighbours = torch.corrcoef(torch.stack([z[..., :-1].flatten(), z[..., 1:].flatten()]))[0, 1]
    assert neighbours > 0.9  # smooth: regions move together, not salt and pepper
    method = _with("hidiff", prior_noise=2.0)
    image = images_of(truth_masks(1, 2))
    clean, _, _ = method.prior_and_condition(image)
    noisy, _, _ = method.prior_and_condition(image, noise=2.0, generator=torch.Generator().manual_seed(1))
    assert (clean - noisy).abs().mean() > 0.05
    with torch.no_grad():
        out = method.sample(image, generator=torch.Generator().manual_seed(2))  # sampling uses the clean prior
    assert out.probs.shape == (2, 1, SIZE, SIZE)


def test_training_timesteps_matched_to_the_sampler():
    """``train_timesteps: sampler`` draws only the indices the default sampler visits (PD-DDPM: within [0, T');
    HiDiff with one Bernoulli-DDIM step: T - 1 alone, also in the loss)."""
    for recipe in ("medsegdiff", "pd_ddpm"):
        method = _with(recipe, train_timesteps="sampler")
        chain = method.scheduler.sampling_timesteps(method.default_steps, method.default_start_step)
        t = method.training_timesteps(400, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert set(t.tolist()) == set(chain)  # every visited index drawn, nothing else
        uniform = _with(recipe).training_timesteps(400, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert len(set(uniform.tolist())) > 10 * len(chain)
    for recipe, steps in (("hidiff", 1), ("berdiff", 4)):
        method = _with(recipe, train_timesteps="sampler")
        method.default_steps = steps
        t = method.training_timesteps(400, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert set(t.tolist()) == set(method.scheduler.sampling_timesteps(steps))
        uniform = _with(recipe).training_timesteps(400, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert set(uniform.tolist()) == set(range(method.scheduler.timesteps))
    hidiff = _with("hidiff", train_timesteps="sampler")
    hidiff.default_steps = 1
    seen: list[int] = []
    real = hidiff.scheduler.q_sample
    hidiff.scheduler.q_sample = lambda y0, p, t, generator=None: seen.extend(t.tolist()) or real(y0, p, t, generator)
    mask = truth_masks(1, 4)
    hidiff.refiner_loss(images_of(mask), mask, generator=torch.Generator().manual_seed(0))
    assert seen == [hidiff.scheduler.timesteps - 1] * 4


def test_first_step_share_puts_that_share_of_the_batch_at_the_samplers_first_timestep():
    """``diffusion.first_step_share``: each sample goes to the default chain's first index (T - 1 from pure noise,
    T' - 1 from a PD-DDPM start) with that probability, the rest as ``train_timesteps`` draws them; 0 is uniform,
    1 puts the whole batch there; out of [0, 1] refused; HiDiff does not read it."""
    from diffmis.errors import ConfigError

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cpu = torch.device("cpu")
    for recipe in ("medsegdiff", "berdiff", "pd_ddpm"):
        method = _with(recipe, first_step_share=1.0)
        chain = method.sampling_chain(method.default_steps, method.default_start_step)
        assert chain[0] == (method.default_start_step or method.timesteps) - 1
        assert method.training_timesteps(64, gen(), cpu).tolist() == [chain[0]] * 64
        half = _with(recipe, first_step_share=0.5).training_timesteps(4000, gen(), cpu)
        uniform = _with(recipe).training_timesteps(4000, gen(), cpu)
        # about half at the first index (plus its uniform share), the others spread as before
        base = (uniform == chain[0]).float().mean().item()
        assert base < 0.15 and abs((half == chain[0]).float().mean().item() - (0.5 + 0.5 * base)) < 0.04
        assert len(set(half.tolist())) > 0.5 * len(set(uniform.tolist()))
    method = _with("medsegdiff", first_step_share=0.5, train_timesteps="sampler")
    both, chain = method.training_timesteps(4000, gen(), cpu), method.sampling_chain(method.default_steps)
    expected = 0.5 + 0.5 / len(chain)
    assert set(both.tolist()) == set(chain) and abs((both == chain[0]).float().mean().item() - expected) < 0.04
    with pytest.raises(Exception, match="first_step_share"):
        _with("medsegdiff", first_step_share=1.5)
    with pytest.raises(ConfigError, match=r"diffusion.first_step_share has no effect on recipe 'hidiff'"):
        _with("hidiff", first_step_share=0.5)


def test_hidiff_segmentor_step_every_nth_iteration():
    """``train.segmentor_every``: after the segmentor-only pre-training, the refiner steps every iteration and the
    segmentor every N-th (0: never, refused when nothing else would train the segmentor)."""
    from diffmis.errors import ConfigError

    def groups(**train) -> list[list[str]]:
        method = build(config_from_dict(tiny_config("hidiff", Path("/tmp"), **train)))
        return [[phase.group for phase in method.phases(step)] for step in range(7)]

    both, refiner = ["refiner", "segmentor"], ["refiner"]
    assert groups() == [both] * 7  # the paper's alternation, the default
    assert groups(pretrain_steps=2, segmentor_every=3) == [["segmentor"]] * 2 + [both, refiner, refiner, both,
                                                                                   refiner]
    assert groups(pretrain_steps=1, segmentor_every=0) == [["segmentor"]] + [refiner] * 6
    assert groups(segmentor_every=0, prior_run="/some/run")[0] == refiner  # from_config does not open the run
    assert groups(segmentor_every="auto", prior_run="/some/run") == [refiner] * 7  # S from a segmentor run: frozen
    assert groups(segmentor_every="auto") == [both] * 7
    with pytest.raises(ConfigError, match=r"segmentor_every=0 never trains the segmentor.*train.prior_run"):
        groups(segmentor_every=0)


def test_hidiff_frozen_segmentor_runs_in_eval_mode_in_the_refiner_step():
    """With ``segmentor_every: 0`` S no longer learns: the refiner step runs it as sampling does (eval mode), so a
    batch-norm segmentor's running statistics stay those it was trained with; while S still learns (pre-training,
    alternation) the refiner step leaves its mode alone and the statistics follow the batches."""
    def stats_after_refiner_step(step: int, **train) -> tuple[torch.Tensor, torch.Tensor, bool]:
        cfg = tiny_config("hidiff", Path("/tmp"), **train)
        cfg["model"]["segmentor"] = {"name": "unet", "params": {"features": [8, 8, 16, 16, 32, 8], "norm": "batch"}}
        method = build(config_from_dict(cfg))
        method.train()
        bn = next(m for m in method.segmentor.modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        image, mask = torch.randn(2, 1, 32, 32) + 3.0, (torch.rand(2, 1, 32, 32) > 0.5).float()
        method.refiner_loss(image, mask, step=step, generator=torch.Generator().manual_seed(0))
        return before, bn.running_mean.clone(), method.segmentor.training

    before, after, training = stats_after_refiner_step(3, pretrain_steps=2, segmentor_every=0)
    assert torch.equal(before, after) and training  # frozen: eval for the step, then back to train mode
    before, after, training = stats_after_refiner_step(1, pretrain_steps=2, segmentor_every=0)
    assert not torch.allclose(before, after) and training  # still pre-training: statistics follow the batch
    before, after, _ = stats_after_refiner_step(3, pretrain_steps=2, segmentor_every=1)
    assert not torch.allclose(before, after)  # alternating: S still learns


def test_a_lever_the_method_does_not_read_is_refused():
    from diffmis.errors import ConfigError

    with pytest.raises(ConfigError, match=r"diffusion.prior_noise has no effect on recipe 'medsegdiff'"):
        _with("medsegdiff", prior_noise=1.0)
    with pytest.raises(ConfigError, match=r"diffusion.recycle has no effect on recipe 'hidiff'"):
        _with("hidiff", recycle=0.5)
    with pytest.raises(ConfigError, match=r"diffusion.x0_seg_weight.*'segmentor'.*none of the recipe levers"):
        _with("segmentor", x0_seg_weight=1.0)
    # the train.* levers too: HiDiff's alternation keys elsewhere, PD-DDPM's warm start elsewhere; ``auto`` passes
    for recipe, key, value in [("pd_ddpm", "w_diff", 0.5), ("medsegdiff", "segmentor_every", 0),
                               ("segmentor", "pretrain_steps", 10), ("berdiff", "denoiser_from_prior", True)]:
        d = tiny_config(recipe, Path("/tmp"))
        d["train"] = {**d["train"], key: value}
        with pytest.raises(ConfigError, match=rf"train.{key} has no effect on recipe '{recipe}'"):
            build(config_from_dict(d))
    d = tiny_config("medsegdiff", Path("/tmp"))
    d["train"] = {**d["train"], "segmentor_every": "auto", "denoiser_from_prior": "auto"}
    build(config_from_dict(d))


def test_medsegdiff_image_skips_reach_the_decoder():
    """With the bottleneck cut (its output replaced by zeros), the paper design's output no longer depends on the
    image (the image reaches the decoder only through the bottleneck sum); with ``image_skips`` it still does."""
    from diffmis.models.medsegdiff import MedSegDiff

    class Cut(torch.nn.Module):
        def forward(self, h, emb):
            return torch.zeros_like(h)

    kw = dict(width=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(), image_size=32)
    for skips in (False, True):
        torch.manual_seed(0)
        net = MedSegDiff(1, 1, image_skips=skips, **kw).eval()
        with torch.no_grad():
            for p in net.parameters():  # no zero-initialised layer (the head, the ResBlocks' last convs) hides paths
                p.normal_(0.0, 0.2)
        net.middle = Cut()
        x_t, t = torch.randn(1, 1, 32, 32), torch.tensor([5])
        with torch.no_grad():
            a = net(x_t, t, {"image": torch.randn(1, 1, 32, 32)})
            b = net(x_t, t, {"image": torch.randn(1, 1, 32, 32)})
        assert bool((a - b).abs().max() > 1e-4) == skips


def test_medsegdiff_v2_can_start_from_its_anchor(tmp_path):
    """sample.start_step on a V2 run: the chain starts from the condition segmentor's hard labels noised to T'
    (read from the condition: the segmentor runs once per image, no extra network pass); a start at T' = 1 (x_0
    itself, no noise) with the denoiser replaced by the identity on x_0 returns the anchor's labels exactly."""
    cfg = config_from_dict(tiny_config("medsegdiff_v2", tmp_path))
    m = build(cfg).eval()
    assert m.own_prior and m.default_start_step is None  # the paper's start from noise stays the default
    image = torch.rand(2, 1, 32, 32)
    seg_batches: list[int] = []
    hook = m.denoiser.segmentor.register_forward_hook(lambda mod, args, out: seg_batches.append(args[0].shape[0]))
    out = m.sample(image, steps=2, start_step=20, members=3, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert out.probs.shape == (6, 1, 32, 32) and out.nfe == 2  # 2 steps; the anchor comes with the condition
    assert seg_batches == [2]  # one segmentor pass over the 2 images, shared by the start and the 3 members
    anchor = hard_labels(m.start_prior(image))
    m.denoiser.forward = lambda x_t, t, cond: x_t  # x0-prediction = x_t: at T' = 1 that is the start, x_0
    out = m.sample(image, steps=1, start_step=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hard_labels(out.probs), anchor)
    cfg2 = config_from_dict({**tiny_config("medsegdiff_v2", tmp_path), "sample": {"start_step": 20, "steps": 2}})
    assert build(cfg2).default_start_step == 20


@pytest.mark.parametrize("train_timesteps", ["all", "sampler"])
def test_medsegdiff_v2_recycles_its_anchor_when_it_starts_from_it(tmp_path, train_timesteps):
    """With an anchor start (T' = 20, 2 steps), diffusion.recycle noises the anchor's hard labels at t < T' (the
    sampler's indices 19 and 0 with train_timesteps: sampler); from noise, the model's own x0 at uniform t."""
    base = tiny_config("medsegdiff_v2", tmp_path)
    cfg = config_from_dict({**base, "sample": {"start_step": 20, "steps": 2},
                            "diffusion": {**base.get("diffusion", {}), "recycle": 0.5,
                                          "train_timesteps": train_timesteps}})
    m = build(cfg).eval()
    assert m.recycles_prior()
    image = torch.rand(64, 1, 32, 32)
    rec, t = m.recycle_source(image, m.denoiser.condition(image), torch.Generator().manual_seed(0))
    assert torch.equal(rec, hard_one_hot(m.start_prior(image)))
    allowed = {19, 0} if train_timesteps == "sampler" else set(range(20))
    assert set(t.tolist()) <= allowed and len(set(t.tolist())) > 1
    noise_start = build(config_from_dict({**base, "diffusion": {**base.get("diffusion", {}), "recycle": 0.5}}))
    assert not noise_start.recycles_prior()
    assert noise_start.recycle_source(image[:4], noise_start.denoiser.condition(image[:4]),
                                      torch.Generator().manual_seed(0))[1] is None
