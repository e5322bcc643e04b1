"""Ensembles: fusion rules on hand-made samples, uncertainty maps, one batched network call per step."""

import math
from pathlib import Path

import pytest
import torch

from diffmis.ensemble import EnsembleResult, ensemble_predict, fuse, uncertainty_maps
from diffmis.masks import hard_labels
from diffmis.errors import ConfigError
from diffmis.sampling import gaussian_sample
from diffmis.schedulers import GaussianScheduler


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- fusion
def test_mean_and_mean_squared_known_values():
    samples = torch.tensor([0.0, 0.5, 1.0, 0.5]).view(4, 1, 1, 1, 1).repeat(1, 1, 1, 2, 2)  # (N=4, B=1, 1, 2, 2)
    assert torch.allclose(fuse(samples, "mean"), torch.full((1, 1, 2, 2), 0.5))
    assert torch.allclose(fuse(samples, "mean_squared"), torch.full((1, 1, 2, 2), 0.25))
    with pytest.raises(ConfigError, match="fuse"):
        fuse(samples, "vote")


def test_staple_of_three_raters_where_two_agree():
    truth = torch.bernoulli(torch.full((2, 1, 8, 8), 0.5), generator=gen(1))
    third = truth.clone()
    third[:, :, :2] = 1 - third[:, :, :2]  # the third rater is wrong on two rows
    samples = torch.stack([truth * 0.9 + 0.05, truth, third])  # probabilities; binarised at 0.5
    fused = fuse(samples, "staple")
    assert fused.shape == truth.shape and torch.isfinite(fused).all()
    assert torch.allclose(fused, truth, atol=1e-6)
    # the mean would have given 1/3 or 2/3 where the raters disagree
    top = truth[:, :, :2]
    assert torch.allclose(fuse((samples > 0.5).float(), "mean")[:, :, :2], (2 * top + 1 - top) / 3)


def test_staple_degenerate_and_multiclass():
    zeros = torch.zeros(3, 1, 1, 4, 4)
    assert torch.equal(fuse(zeros, "staple"), torch.zeros(1, 1, 4, 4))  # EM undefined -> vote fraction, not NaN
    assert torch.equal(fuse(torch.ones(3, 1, 1, 4, 4), "staple"), torch.ones(1, 1, 4, 4))
    # K = 3: each class a binary STAPLE on the members' argmax; two of three members agree everywhere
    lab = torch.randint(0, 3, (1, 6, 6), generator=gen(2))
    onehot = torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float()
    other = torch.nn.functional.one_hot((lab + 1) % 3, 3).permute(0, 3, 1, 2).float()
    samples = torch.stack([onehot * 0.7 + 0.1, onehot, other])
    fused = fuse(samples, "staple")
    assert fused.shape == (1, 3, 6, 6) and torch.equal(hard_labels(fused), lab)


def test_hard_labels_label_maps():
    p1 = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2)
    assert torch.equal(hard_labels(p1, 0.5), torch.tensor([[[0, 1]]]))
    assert hard_labels(p1).dtype == torch.int64
    pk = torch.tensor([[0.1, 0.7], [0.5, 0.2], [0.4, 0.1]]).view(1, 3, 1, 2)
    assert torch.equal(hard_labels(pk), torch.tensor([[[1, 0]]]))


def test_uncertainty_maps_known_values():
    samples = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1).repeat(1, 1, 1, 2, 2)  # disagreeing members
    u = uncertainty_maps(samples)
    assert torch.allclose(u["variance"], torch.full((1, 1, 2, 2), 0.25))
    assert torch.allclose(u["entropy"], torch.ones(1, 1, 2, 2))  # binary entropy of 1/2 = 1 bit
    agree = uncertainty_maps(torch.ones(3, 2, 1, 2, 2))
    assert torch.equal(agree["variance"], torch.zeros(2, 1, 2, 2))
    assert torch.equal(agree["entropy"], torch.zeros(2, 1, 2, 2))
    uniform = uncertainty_maps(torch.full((2, 1, 4, 3, 3), 0.25))  # K = 4, uniform mean
    assert uniform["entropy"].shape == (1, 1, 3, 3)
    assert torch.allclose(uniform["entropy"], torch.full((1, 1, 3, 3), math.log2(4)))


# ---------------------------------------------------------------------------------------------- ensemble_predict
class DummyMethod:
    """A 'method' whose sample runs a Gaussian sampler and counts the batched model_fn calls."""

    def __init__(self, num_classes: int = 1):
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(2 + num_classes, num_classes, 3, padding=1)
        self.k = num_classes
        self.scheduler = GaussianScheduler(100, "cosine", "x0")
        self.batches: list[int] = []
        self.images = None
        self.init = None

    def sample(self, image, *, generator=None, steps=3, init=None, start_step=None):
        self.images, self.init = image, init

        def model_fn(x_t, t):
            self.batches.append(x_t.shape[0])
            return torch.tanh(self.net(torch.cat([image, x_t], dim=1)))

        shape = (image.shape[0], self.k, *image.shape[2:])
        return gaussian_sample(model_fn, self.scheduler, shape, steps=steps, sampler="ddim", eta=1.0, init=init,
                               start_step=start_step, generator=generator)


def test_ensemble_is_one_batched_call_per_step():
    method = DummyMethod()
    image = torch.randn(2, 2, 8, 8, generator=gen(1))
    res = ensemble_predict(method, image, n=5, fuse="mean", keep_samples=True, generator=gen(2), steps=4)
    assert isinstance(res, EnsembleResult)
    assert method.batches == [10, 10, 10, 10] and res.nfe == 4  # 4 steps, each one call on B * n = 10
    # repeat_interleave order: image b's members are rows b*n .. b*n + n - 1
    assert torch.equal(method.images[:5], image[:1].expand(5, -1, -1, -1))
    assert torch.equal(method.images[5:], image[1:].expand(5, -1, -1, -1))
    assert res.samples.shape == (5, 2, 1, 8, 8)
    assert res.probability.shape == (2, 1, 8, 8) and res.mask.shape == (2, 8, 8) and res.mask.dtype == torch.int64
    assert res.uncertainty["variance"].shape == (2, 1, 8, 8) and res.uncertainty["entropy"].shape == (2, 1, 8, 8)
    assert torch.allclose(res.probability, res.samples.mean(0))
    assert res.uncertainty["variance"].max() > 0  # eta = 1: members differ
    # the members really are different draws for the same image
    assert not torch.equal(res.samples[0, 0], res.samples[1, 0])


def test_ensemble_deterministic_given_generator_and_prior_repeated():
    image = torch.randn(2, 2, 8, 8, generator=gen(1))
    prior = (torch.rand(2, 1, 8, 8, generator=gen(3)) > 0.5).float()
    kw = dict(n=3, fuse="staple", steps=2, init=prior, start_step=30)
    m1, m2 = DummyMethod(), DummyMethod()
    a = ensemble_predict(m1, image, generator=gen(4), **kw)
    b = ensemble_predict(m2, image, generator=gen(4), **kw)
    assert torch.equal(a.probability, b.probability) and torch.equal(a.mask, b.mask) and a.fusion == "staple"
    assert torch.equal(m1.init, prior.repeat_interleave(3, dim=0))
    c = ensemble_predict(DummyMethod(), image, generator=gen(4), **{**kw, "init": prior.repeat_interleave(3, 0)})
    assert torch.equal(a.probability, c.probability)  # an already repeated prior is taken as is
    assert a.samples is None


def test_ensemble_multiclass_mask_is_argmax_label_map():
    res = ensemble_predict(DummyMethod(num_classes=3), torch.randn(1, 2, 6, 6, generator=gen(1)), n=2,
                           generator=gen(2), steps=2)
    assert res.probability.shape == (1, 3, 6, 6) and res.mask.shape == (1, 6, 6)
    assert torch.equal(res.mask, res.probability.argmax(1))


@pytest.mark.parametrize("recipe", ["hidiff", "medsegdiff_v2", "pd_ddpm"])
def test_members_run_the_segmentor_once_per_image_and_match_the_repeated_batch(recipe):
    """Methods take ``members=n``: the prior / condition segmentor sees B images (not B*n), and the samples are
    the ones the plain repeated batch gives with the same generator."""
    from _tiny import tiny_config

    from diffmis.config import Config
    from diffmis.methods import build

    cfg = Config.model_validate(tiny_config(recipe, Path("/tmp")))
    method = build(cfg).eval()
    seg = {"hidiff": lambda: method.segmentor, "pd_ddpm": lambda: method.prior,
           "medsegdiff_v2": lambda: method.denoiser.segmentor}[recipe]()
    seen: list[int] = []
    hook = seg.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    image = torch.rand(2, 1, 32, 32)
    kw = {"steps": 3} if recipe != "pd_ddpm" else {"steps": 3, "start_step": 20}
    with torch.no_grad():
        res = ensemble_predict(method, image, n=4, keep_samples=True, generator=torch.Generator().manual_seed(1),
                               **kw)
        assert seen == [2], seen
        plain = method.sample(image.repeat_interleave(4, 0), generator=torch.Generator().manual_seed(1), **kw)
    hook.remove()
    assert res.samples.shape == (4, 2, 1, 32, 32)
    torch.testing.assert_close(res.samples.transpose(0, 1).reshape(8, 1, 32, 32), plain.probs, atol=1e-5, rtol=0)
