"""Samplers: oracle recovery (DDIM / DDPM / Bernoulli), PD-DDPM start, DDIM(eta=1) == DDPM, NFE, determinism."""

import pytest
import torch

from diffmis.errors import ConfigError
from diffmis.sampling import SampleOutput, bernoulli_sample, gaussian_sample, propose_start_step
from diffmis.schedulers import BernoulliScheduler, GaussianScheduler

SHAPE = (2, 1, 6, 6)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_oracle(s: GaussianScheduler, x0: torch.Tensor, calls: list | None = None):
    """model_fn that returns the exact eps / x0 / v for a fixed clean x0 (in the mask range)."""
    abar = s.alphas_cumprod.float()

    def model_fn(x_t, t):
        if calls is not None:
            calls.append((x_t.clone(), t.clone()))
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = (x_t - a * x0) / b
        return {"eps": eps, "x0": x0.expand_as(x_t), "v": a * eps - b * x0}[s.prediction]

    return model_fn


def soft_x0(s: GaussianScheduler, seed: int = 0) -> torch.Tensor:
    """Clean values strictly inside the mask range (so clamping cannot hide errors)."""
    low, high = s.clip_range
    u = torch.rand(SHAPE, generator=gen(seed)) * 0.9 + 0.05
    return low + (high - low) * u


# ---------------------------------------------------------------------------------------------- Gaussian
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_eta0_with_oracle_recovers_x0(schedule, prediction):
    s = GaussianScheduler(1000, schedule, prediction)
    x0 = soft_x0(s)
    for steps in (5, 10, 50):
        out = gaussian_sample(gaussian_oracle(s, x0), s, SHAPE, steps=steps, sampler="ddim", generator=gen(steps))
        assert isinstance(out, SampleOutput) and out.nfe == steps
        assert (out.probs - s.x0_to_prob(x0)).abs().max() < 1e-4, steps


@pytest.mark.parametrize("mask_range", ["pm1", "01"])
@pytest.mark.parametrize("steps", [1000, 20])
def test_ddpm_ancestral_with_oracle_recovers_x0(mask_range, steps):
    s = GaussianScheduler(1000, "linear", "eps", mask_range)
    x0 = soft_x0(s, 1)
    out = gaussian_sample(gaussian_oracle(s, x0), s, SHAPE, steps=steps, sampler="ddpm", generator=gen())
    assert out.nfe == steps
    assert (out.probs - s.x0_to_prob(x0)).abs().max() < 1e-4


@pytest.mark.parametrize("schedule, steps", [("linear", 7), ("cosine", 30)])
def test_ddim_eta1_equals_respaced_ddpm(schedule, steps):
    """DDIM with eta = 1 is the ancestral sampler of the respaced chain: hand DDIM == MONAI-stepped DDPM."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    s = GaussianScheduler(1000, schedule, "eps")

    def model_fn(x, t):
        return torch.tanh(net(x)) + 1e-3 * t.view(-1, 1, 1, 1)

    with torch.no_grad():
        a = gaussian_sample(model_fn, s, SHAPE, steps=steps, sampler="ddim", eta=1.0, generator=gen(3))
        b = gaussian_sample(model_fn, s, SHAPE, steps=steps, sampler="ddpm", generator=gen(3))
    assert torch.allclose(a.probs, b.probs, atol=1e-5)


def test_ddpm_step_matches_methods_posterior():
    """One respaced ancestral step equals METHODS 1.2's posterior with the respaced betas, plus sqrt(beta~) z."""
    s = GaussianScheduler(1000, "cosine", "x0")
    chain = s.sampling_timesteps(4)  # [999, 666, 333, 0]
    assert chain == [999, 666, 333, 0]
    x0 = soft_x0(s)
    x_t = torch.randn(SHAPE, generator=gen(1))
    x_prev, x0_hat = s.ddpm(chain).step(x0, x_t, 666, generator=gen(2))
    ab_t, ab_p = s.alphas_cumprod[666].item(), s.alphas_cumprod[333].item()
    beta, alpha = 1 - ab_t / ab_p, ab_t / ab_p
    mean = beta * ab_p**0.5 / (1 - ab_t) * x0 + (1 - ab_p) * alpha**0.5 / (1 - ab_t) * x_t
    var = beta * (1 - ab_p) / (1 - ab_t)
    z = torch.randn(SHAPE, generator=gen(2))
    assert torch.allclose(x_prev, mean + var**0.5 * z, atol=1e-5)
    assert torch.allclose(x0_hat, x0)


def test_ddim_step_is_deterministic_at_eta0():
    s = GaussianScheduler(1000, "linear")
    pred = torch.randn(SHAPE, generator=gen(1))
    x = torch.randn(SHAPE, generator=gen(2))
    a, _ = s.ddim_step(pred, x, 500, 250, eta=0.0, generator=gen(3))
    b, _ = s.ddim_step(pred, x, 500, 250, eta=0.0, generator=gen(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_pd_ddpm_start_marginal_nfe_and_no_off_by_one(sampler):
    s = GaussianScheduler(1000, "linear", "eps")
    shape = (2, 1, 64, 64)
    prior = torch.zeros(shape)
    prior[:, :, :, :32] = 1.0
    t_start, steps = 300, 6
    calls: list = []
    x0 = s.mask_to_x0(prior)
    out = gaussian_sample(gaussian_oracle(s, x0, calls), s, shape, steps=steps, sampler=sampler, init=prior,
                          start_step=t_start, generator=gen(5))
    # NFE = steps; the first call sees index T' - 1 (METHODS 4.2 without ADDPM's off-by-one); all below T'
    assert out.nfe == steps == len(calls)
    ts = [int(t[0]) for _, t in calls]
    assert ts[0] == t_start - 1 and ts[-1] == 0 and max(ts) < t_start
    assert all(bool((t == t[0]).all()) and t.dtype == torch.int64 and t.shape == (2,) for _, t in calls)
    # the start sample has the marginal of q(x_{T'-1} | x0 = prior): 4096 pixels per (image, half)
    x_start = calls[0][0]
    abar = s.alphas_cumprod[t_start - 1].item()
    for half, value in ((slice(0, 32), 1.0), (slice(32, 64), -1.0)):
        region = x_start[:, :, :, half]
        assert float(region.mean()) == pytest.approx(abar**0.5 * value, abs=0.05)
        assert float(region.var()) == pytest.approx(1 - abar, rel=0.06)
    # oracle + prior = truth: the output is the truth
    assert torch.allclose(out.probs, prior, atol=1e-4)


def test_pd_ddpm_accepts_probability_prior_and_checks_arguments():
    s = GaussianScheduler(100, "cosine", "x0")
    x0 = soft_x0(s)
    oracle = gaussian_oracle(s, x0)
    out = gaussian_sample(oracle, s, SHAPE, steps=3, init=torch.full(SHAPE, 0.3), start_step=40, generator=gen())
    assert out.nfe == 3 and torch.allclose(out.probs, s.x0_to_prob(x0), atol=1e-5)
    with pytest.raises(ConfigError, match="start_step"):
        gaussian_sample(oracle, s, SHAPE, steps=3, start_step=40)  # no prior
    with pytest.raises(ConfigError, match="steps"):
        gaussian_sample(oracle, s, SHAPE, steps=41, init=torch.zeros(SHAPE), start_step=40)
    with pytest.raises(ConfigError, match="start_step"):
        gaussian_sample(oracle, s, SHAPE, steps=3, init=torch.zeros(SHAPE), start_step=101)
    with pytest.raises(ValueError, match="shape"):
        gaussian_sample(lambda x, t: torch.cat([x, x], 1), s, SHAPE, steps=2)


def test_propose_start_step_follows_the_snr_table():
    lin, cos = GaussianScheduler(1000, "linear"), GaussianScheduler(1000, "cosine")
    for s in (lin, cos):
        for target in (0.5, 1.0, 2.0):
            t_start = propose_start_step(s, target)
            assert float(s.snr(t_start - 1)) <= target < float(s.snr(t_start - 2))
    # METHODS 4.3: linear SNR 1.10 at T'=250 and 0.66 at 300; cosine 1.84 at 400 and 0.98 at 500
    assert 250 < propose_start_step(lin, 1.0) <= 300
    assert 400 < propose_start_step(cos, 1.0) <= 500
    assert 300 < propose_start_step(lin, 0.5) <= 400
    assert propose_start_step(lin, 1e-9) == 1000 and propose_start_step(lin, 1e9) == 1


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_gaussian_sampling_is_deterministic_given_the_generator(sampler, eta):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    s = GaussianScheduler(1000, "cosine", "v")

    def run(seed):
        return gaussian_sample(lambda x, t: net(x), s, SHAPE, steps=5, sampler=sampler, eta=eta,
                               generator=gen(seed), keep_trajectory=True)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.probs, b.probs) and not torch.equal(a.probs, c.probs)
    assert a.trajectory.shape == (5, *SHAPE) and torch.equal(a.trajectory[-1], a.probs)
    assert a.probs.min() >= 0 and a.probs.max() <= 1 and not a.probs.requires_grad


# ---------------------------------------------------------------------------------------------- Bernoulli
def bernoulli_oracle(y0: torch.Tensor, calls: list | None = None):
    """Flip logits that are right with high confidence: flip where y_t differs from the true y0."""

    def model_fn(y_t, t):
        if calls is not None:
            calls.append((y_t.clone(), t.clone()))
        return 30.0 * (2.0 * (y_t - y0).abs() - 1.0)

    return model_fn


@pytest.mark.parametrize("sampler", ["bernoulli", "bernoulli_ddim"])
@pytest.mark.parametrize("steps", [10, 4, 1])
def test_bernoulli_sampler_with_oracle_returns_y0_probability(sampler, steps):
    s = BernoulliScheduler(10, "cosine")
    y0 = torch.bernoulli(torch.full((2, 3, 5, 5), 0.5), generator=gen(1))
    prior = torch.rand(2, 3, 5, 5, generator=gen(2))
    calls: list = []
    out = bernoulli_sample(bernoulli_oracle(y0, calls), s, prior, steps=steps, sampler=sampler, generator=gen(3))
    assert out.nfe == steps == len(calls)
    assert [int(t[0]) for _, t in calls] == s.sampling_timesteps(steps)
    assert int(calls[0][1][0]) == 9 and int(calls[-1][1][0]) == (0 if steps > 1 else 9)
    assert torch.allclose(out.probs, y0, atol=1e-6)


def test_bernoulli_start_is_a_draw_of_the_prior():
    s = BernoulliScheduler(10, "cosine2")
    prior = torch.full((1, 1, 100, 100), 0.3)
    prior[..., 50:] = 0.8
    calls: list = []
    bernoulli_sample(bernoulli_oracle(torch.zeros_like(prior), calls), s, prior, steps=2, generator=gen())
    y_start = calls[0][0]
    assert set(y_start.unique().tolist()) <= {0.0, 1.0}
    assert float(y_start[..., :50].mean()) == pytest.approx(0.3, abs=0.03)
    assert float(y_start[..., 50:].mean()) == pytest.approx(0.8, abs=0.03)


@pytest.mark.parametrize("sampler", ["bernoulli", "bernoulli_ddim"])
def test_bernoulli_sampler_random_model_probabilities_and_determinism(sampler):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    s = BernoulliScheduler(10, "alpha_bar_linear")
    prior = torch.rand(2, 2, 6, 6, generator=gen(1))

    def run(seed):
        return bernoulli_sample(lambda y, t: 3 * net(y), s, prior, steps=5, sampler=sampler, generator=gen(seed),
                                keep_trajectory=True)

    a, b, c = run(1), run(1), run(2)
    assert a.probs.shape == prior.shape and a.probs.min() >= 0 and a.probs.max() <= 1
    assert a.trajectory.shape == (5, *prior.shape)
    assert torch.equal(a.probs, b.probs) and not torch.equal(a.probs, c.probs)
    with pytest.raises(ConfigError, match="steps"):
        bernoulli_sample(lambda y, t: net(y), s, prior, steps=11)
    with pytest.raises(ConfigError, match="sampler"):
        bernoulli_sample(lambda y, t: net(y), s, prior, steps=2, sampler="ddim")


def test_draws_come_from_the_generator_and_have_the_right_law():
    from diffmis.schedulers import draw_bernoulli, draw_normal

    p = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(20000, 1)
    a = draw_bernoulli(p, torch.Generator().manual_seed(5))
    b = draw_bernoulli(p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == p.dtype and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(a.mean(0), torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=0.015)
    z = draw_normal((200000,), torch.Generator().manual_seed(1), "cpu", torch.float64)
    assert z.dtype == torch.float64 and abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert torch.equal(z, draw_normal((200000,), torch.Generator().manual_seed(1), "cpu", torch.float64))


def test_step_graphs_patch_forward_while_active_and_run_eagerly_off_cuda():
    from diffmis.cuda_graphs import StepGraphs

    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    ref = net(x)
    g = StepGraphs(net)
    with g.active():
        assert "forward" in net.__dict__
        with torch.no_grad():
            out = net(x)  # CPU tensors: an eager call, no capture
    assert "forward" not in net.__dict__  # the class's forward is back
    assert torch.allclose(out, ref) and g.stats() == {"captures": 0, "replays": 0, "eager_calls": 1,
                                                      "graphs_kept": 0, "errors": []}
    net.forward = lambda t: t * 2  # an instance-level forward is restored as it was
    with StepGraphs(net).active():
        pass
    assert torch.equal(net(x), x * 2)
