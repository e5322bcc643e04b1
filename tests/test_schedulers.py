"""Schedulers: Gaussian forward process and parameterisations, Bernoulli tables, posterior, DDIM rule and loss."""

import itertools
import math

import pytest
import torch

from diffmis.errors import ConfigError
from diffmis.schedulers import BernoulliScheduler, GaussianScheduler, bernoulli_posterior


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- Gaussian
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_moments_match_forward_marginal(schedule):
    s = GaussianScheduler(1000, schedule)
    g = gen(1)
    t = torch.tensor([0, 250, 700, 999])
    x0 = torch.tensor([1.0, -1.0, 0.5, -0.3]).view(4, 1, 1, 1).expand(4, 1, 100, 100)
    xt = s.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    abar = s.alphas_cumprod[t].float()
    mean = xt.mean(dim=(1, 2, 3))
    var = xt.var(dim=(1, 2, 3))
    assert torch.allclose(mean, abar.sqrt() * x0[:, 0, 0, 0], atol=0.03)  # 1e4 pixels: std of mean <= 0.01
    assert torch.allclose(var, 1 - abar, atol=0.03, rtol=0.05)


def test_add_noise_at_t0_is_nearly_x0_and_int_t_equals_tensor_t():
    s = GaussianScheduler(1000, "linear")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=gen())
    assert (s.add_noise(x0, noise, 0) - x0).abs().max() < 0.05  # sqrt(1 - abar_0) = 0.01
    assert torch.allclose(s.add_noise(x0, noise, 300), s.add_noise(x0, noise, torch.tensor([300, 300])))


def test_linear_schedule_formula_and_scaling():
    s = GaussianScheduler(1000, "linear")
    assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), atol=1e-9)
    s100 = GaussianScheduler(100, "linear")  # s = 10: 1e-3 .. 0.2
    assert torch.allclose(s100.betas, torch.linspace(1e-3, 0.2, 100, dtype=torch.float64), atol=1e-8)
    with pytest.raises(ConfigError, match="linear.*invalid.*timesteps=10"):
        GaussianScheduler(10, "linear")


def test_cosine_schedule_matches_nichol_dhariwal():
    T = 1000
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((t + 1) / T) / f(t / T), 0.999) for t in range(T)], dtype=torch.float64)
    s = GaussianScheduler(T, "cosine")
    assert torch.allclose(s.betas, betas, rtol=1e-9, atol=1e-12)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-9, atol=1e-15)


# METHODS 4.3: (T', sqrt(abar), SNR) with the start sample at index T' - 1
SNR_TABLE = {
    "linear": [(100, "0.947", "8.7"), (200, "0.812", "1.93"), (250, "0.724", "1.10"), (300, "0.630", "0.66"),
               (400, "0.442", "0.24"), (500, "0.280", "0.085"), (600, "0.161", "0.027")],
    "cosine": [(100, "0.986", "34.8"), (200, "0.948", "8.87"), (250, "0.920", "5.54"), (300, "0.887", "3.69"),
               (400, "0.805", "1.84"), (500, "0.703", "0.98"), (600, "0.584", "0.52")],
}


def _approx_printed(text: str):
    """pytest.approx to within half a unit of the last printed digit."""
    decimals = len(text.split(".")[1])
    return pytest.approx(float(text), abs=0.5 * 10**-decimals + 1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_snr_matches_methods_table(schedule):
    s = GaussianScheduler(1000, schedule)
    for t_start, sqrt_abar, snr in SNR_TABLE[schedule]:
        assert float(s.alphas_cumprod[t_start - 1].sqrt()) == _approx_printed(sqrt_abar)
        assert float(s.snr(t_start - 1)) == _approx_printed(snr)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_target_round_trips_through_pred_to_x0_eps(prediction):
    s = GaussianScheduler(1000, "cosine", prediction)
    x0 = torch.rand(3, 2, 4, 4, generator=gen()) * 1.8 - 0.9
    noise = torch.randn(3, 2, 4, 4, generator=gen(1))
    t = torch.tensor([5, 400, 990])
    xt = s.add_noise(x0, noise, t)
    x0_hat, eps_hat = s.pred_to_x0_eps(s.training_target(x0, noise, t), xt, t)
    assert torch.allclose(x0_hat, x0, atol=2e-3)  # t = 990: 1/sqrt(abar) amplifies float32 rounding
    assert torch.allclose(eps_hat, noise, atol=1e-4)


@pytest.mark.parametrize("mask_range", ["pm1", "01"])
def test_x0_clamped_and_eps_consistent_with_clamp(mask_range):
    s = GaussianScheduler(1000, "linear", "eps", mask_range)
    xt = torch.randn(2, 1, 5, 5, generator=gen())
    pred = 3 * torch.randn(2, 1, 5, 5, generator=gen(1))
    t = torch.tensor([100, 600])
    x0, eps = s.pred_to_x0_eps(pred, xt, t)
    low, high = s.clip_range
    assert x0.min() >= low and x0.max() <= high and (x0 == high).any()
    assert torch.allclose(s.add_noise(x0, eps, t), xt, atol=1e-5)


def test_mask_range_maps():
    m = torch.tensor([0.0, 0.25, 1.0])
    pm1 = GaussianScheduler(mask_range="pm1")
    assert torch.equal(pm1.mask_to_x0(m), torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.equal(pm1.x0_to_prob(torch.tensor([-3.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))
    z1 = GaussianScheduler(mask_range="01")
    assert torch.equal(z1.mask_to_x0(m), m)
    assert torch.equal(z1.x0_to_prob(torch.tensor([-0.2, 0.3, 1.4])), torch.tensor([0.0, 0.3, 1.0]))


def test_unknown_options_raise_config_error():
    with pytest.raises(ConfigError, match="prediction"):
        GaussianScheduler(prediction="score")
    with pytest.raises(ConfigError, match="schedule"):
        GaussianScheduler(schedule="cosine2")
    with pytest.raises(ConfigError, match="schedule"):
        BernoulliScheduler(schedule="sigmoid")


# ---------------------------------------------------------------------------------------------- Bernoulli
def test_bernoulli_abar_tables_match_methods():  # METHODS 5.3.5
    expected = {
        "cosine": [0.986, 0.948, 0.887, 0.805, 0.703, 0.584, 0.451, 0.307, 0.155, 0.0002],
        "cosine2": [0.972, 0.899, 0.787, 0.648, 0.494, 0.341, 0.203, 0.094, 0.024, 0.0],
        "alpha_bar_linear": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
    }
    for name, abar in expected.items():
        got = BernoulliScheduler(10, name).alphas_cumprod
        assert torch.allclose(got, torch.tensor(abar, dtype=torch.float64), atol=6e-4), name


def test_bernoulli_linear_t10_raises_clear_error():
    with pytest.raises(ConfigError, match=r"linear.*invalid for timesteps=10.*2\.00"):
        BernoulliScheduler(10, "linear")
    assert BernoulliScheduler(1000, "linear").alphas_cumprod[-1] > 0


def _brute_force_posterior(y_t, y0, p, alpha, abar_prev):
    """P(y_{t-1} = 1 | y_t, y0) by enumerating y_{t-1} in {0, 1} (Bayes)."""
    bern = lambda y, m: m if y == 1 else 1 - m  # noqa: E731
    w = [bern(prev, abar_prev * y0 + (1 - abar_prev) * p) * bern(y_t, alpha * prev + (1 - alpha) * p)
         for prev in (0, 1)]
    return w[1] / (w[0] + w[1])


def test_bernoulli_posterior_equals_brute_force_bayes():
    g = gen(3)
    for _ in range(40):
        alpha, abar_prev, p = (0.02 + 0.96 * torch.rand(3, generator=g, dtype=torch.float64)).tolist()
        for y_t, y0 in itertools.product((0, 1), (0, 1)):
            got = bernoulli_posterior(torch.tensor(float(y_t)), torch.tensor(float(y0)), p, alpha, abar_prev)
            assert float(got) == pytest.approx(_brute_force_posterior(y_t, y0, p, alpha, abar_prev), abs=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "cosine2", "alpha_bar_linear"])
def test_scheduler_posterior_brute_force_incl_respaced_steps(schedule):
    s = BernoulliScheduler(10, schedule)
    abar = s.alphas_cumprod.tolist()
    g = gen(4)
    y_t = torch.bernoulli(torch.full((4, 1, 3, 3), 0.5), generator=g)
    y0 = torch.bernoulli(torch.full((4, 1, 3, 3), 0.5), generator=g)
    p = torch.rand(4, 1, 3, 3, generator=g)
    for t, t_prev in [(9, 8), (5, 4), (1, 0), (9, 3), (7, 0), (0, -1)]:
        got = s.posterior_probs(y_t, y0, p, torch.full((4,), t), torch.full((4,), t_prev))
        ab_p = 1.0 if t_prev < 0 else abar[t_prev]
        for idx in itertools.product(range(4), [0], range(3), range(3)):
            want = _brute_force_posterior(int(y_t[idx]), int(y0[idx]), float(p[idx]), abar[t] / ab_p, ab_p)
            assert float(got[idx]) == pytest.approx(want, abs=1e-5)
    assert torch.equal(s.posterior_probs(y_t, y0, p, 0), y0)  # t = 0: the posterior is y0 itself


def test_q_probs_formula_and_q_sample_mean():
    s = BernoulliScheduler(10, "cosine")
    y0 = torch.zeros(2, 1, 100, 100)
    y0[:, :, :50] = 1
    p = torch.full_like(y0, 0.3)
    t = torch.tensor([2, 8])
    q = s.q_probs(y0, p, t)
    abar = s.alphas_cumprod[t].float()
    assert torch.allclose(q[:, 0, 0, 0], abar + (1 - abar) * 0.3)
    assert torch.allclose(q[:, 0, -1, 0], (1 - abar) * 0.3)
    y = s.q_sample(y0, p, t, generator=gen())
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(y[:, 0, :50].mean(dim=(1, 2)), q[:, 0, 0, 0], atol=0.02)


@pytest.mark.parametrize("t, t_prev", [(9, 6), (6, 2), (9, 0), (3, 2)])
def test_bernoulli_ddim_rule_preserves_marginal_for_nonuniform_prior(t, t_prev):
    s = BernoulliScheduler(10, "cosine")
    g = gen(5)
    n = 100_000  # Monte Carlo pixels; four groups (y0, p) of 25 000: std of a group mean <= 0.0032
    y0 = (torch.arange(n) % 2).float().view(1, 1, 1, n)
    p = torch.where(torch.arange(n) % 4 < 2, 0.2, 0.85).view(1, 1, 1, n)
    y_t = s.q_sample(y0, p, t, generator=g)
    mean = s.ddim_probs(y_t, y0, t, t_prev)  # oracle y0_hat = y0
    assert mean.min() >= 0 and mean.max() <= 1
    y_prev = torch.bernoulli(mean, generator=g)
    want = s.q_probs(y0, p, t_prev)
    for a, b in itertools.product((0.0, 1.0), (0.2, 0.85)):
        sel = (y0 == a) & (p == b)
        assert float(y_prev[sel].mean()) == pytest.approx(float(want[sel][0]), abs=1e-2)


def test_ddim_probs_is_convex_and_returns_y0_hat_at_the_end():
    s = BernoulliScheduler(10, "cosine2")
    y_t = torch.bernoulli(torch.full((2, 3, 4, 4), 0.5), generator=gen())
    y0_hat = torch.rand(2, 3, 4, 4, generator=gen(1))
    for t, t_prev in [(9, 8), (9, 0), (4, 1)]:
        m = s.ddim_probs(y_t, y0_hat, t, t_prev)
        assert m.min() >= 0 and m.max() <= 1
    assert torch.allclose(s.ddim_probs(y_t, y0_hat, 0, -1), y0_hat)


def test_flip_logits_to_y0():
    y_t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    logits = torch.tensor([2.0, 2.0, -1.0, -1.0])
    want = (y_t - torch.sigmoid(logits)).abs()
    assert torch.allclose(BernoulliScheduler.flip_logits_to_y0(logits, y_t), want)


def test_bernoulli_loss_finite_with_nonzero_gradients_at_random_init():
    torch.manual_seed(0)
    s = BernoulliScheduler(10, "cosine")
    net = torch.nn.Conv2d(4, 2, 3, padding=1)  # tiny model: [y_t, p] -> flip logits, K = 2
    g = gen(6)
    y0 = torch.bernoulli(torch.full((4, 2, 8, 8), 0.4), generator=g)
    p = torch.rand(4, 2, 8, 8, generator=g)
    t = torch.tensor([0, 3, 7, 9])
    y_t = s.q_sample(y0, p, t, generator=g)
    logits = net(torch.cat([y_t, p], dim=1))
    terms = s.loss(logits, y0, y_t, p, t)
    assert set(terms) == {"kl", "focal"}
    total = terms["kl"] + 1.0 * terms["focal"]
    assert torch.isfinite(total) and total > 0
    total.backward()
    for prm in net.parameters():
        assert torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0
    per_sample = s.loss(logits.detach(), y0, y_t, p, t, reduction="none")
    assert per_sample["kl"].shape == (4,) and per_sample["focal"].shape == (4,)


def test_bernoulli_loss_known_values():
    s = BernoulliScheduler(10, "cosine")
    g = gen(7)
    y0 = torch.bernoulli(torch.full((2, 1, 6, 6), 0.5), generator=g)
    p = torch.rand(2, 1, 6, 6, generator=g)
    y_t = s.q_sample(y0, p, 4, generator=g)
    flips = (y_t - y0).abs()
    # oracle logits: the right flips with high confidence -> KL and focal near 0
    oracle = s.loss(30.0 * (2 * flips - 1), y0, y_t, p, torch.tensor([4, 4]))
    assert oracle["kl"] < 1e-4 and oracle["focal"] < 1e-6
    # t = 0: the KL term is the NLL of y0 under y0_hat, in bits; zero logits give y0_hat = 1/2 -> 1 bit
    zero = s.loss(torch.zeros_like(y0), y0, y_t, p, torch.tensor([0, 0]))
    assert float(zero["kl"]) == pytest.approx(1.0, abs=1e-5)
    # focal with eps_hat = 1/2: BCE = ln 2, p_t = 1/2 -> (1/2)^gamma ln 2
    assert float(zero["focal"]) == pytest.approx(0.25 * math.log(2), abs=1e-6)
    g1 = s.loss(torch.zeros_like(y0), y0, y_t, p, 0, gamma=1.0)
    assert float(g1["focal"]) == pytest.approx(0.5 * math.log(2), abs=1e-6)
    # extreme wrong logits stay finite
    wrong = s.loss(-100.0 * (2 * flips - 1), y0, y_t, p, torch.tensor([0, 5]))
    assert all(torch.isfinite(v) for v in wrong.values())


def test_bernoulli_kl_gradient_finite_at_degenerate_posterior():
    """q exactly 0 or 1 (a prior of 0 or 1 with a matching mask) must give finite gradients w.r.t. q and m."""
    from diffmis.schedulers.bernoulli import bernoulli_kl

    q = torch.tensor([0.0, 1.0, 0.3], requires_grad=True)
    m = torch.tensor([0.2, 0.9, 0.3], requires_grad=True)
    kl = bernoulli_kl(q, m)
    kl.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(m.grad).all()
    assert kl[2].abs() < 1e-6 and kl[0] > 0 and kl[1] > 0


def test_prior_flip_logits_is_bayes_posterior():
    """Flip probability = P(y0 != y_t | y_t) under y0 ~ B(p), checked by enumeration over y0 in {0, 1}."""
    sch = BernoulliScheduler(10, "cosine")
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 4, 4, generator=g) * 0.98 + 0.01
    y_t = (torch.rand(2, 3, 4, 4, generator=g) > 0.5).float()
    for t in (0, 4, 9):
        abar = float(sch.alphas_cumprod[t])
        joint = {}
        for y0 in (0.0, 1.0):
            m = abar * y0 + (1 - abar) * p
            lik = torch.where(y_t > 0.5, m, 1 - m)
            joint[y0] = (p if y0 == 1.0 else 1 - p) * lik
        post1 = joint[1.0] / (joint[0.0] + joint[1.0])
        flip = torch.where(y_t > 0.5, 1 - post1, post1).clamp(1e-4, 1 - 1e-4)
        got = torch.sigmoid(sch.prior_flip_logits(y_t, p, t))
        assert torch.allclose(got, flip, atol=1e-5)
    # nearly pure noise at the last step: y0_hat = |y_t - flip| is the prior itself
    y0_hat = sch.flip_logits_to_y0(sch.prior_flip_logits(y_t, p, 9), y_t)
    assert torch.allclose(y0_hat, p, atol=2e-3)
