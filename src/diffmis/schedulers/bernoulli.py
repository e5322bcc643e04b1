"""Bernoulli diffusion with a prior (HiDiff's BBDM, METHODS 5.3; BerDiff is the prior p = 1/2, METHODS 5.7).

Every mask channel is an independent Bernoulli variable (multi-class masks: each one-hot channel on its own).
The forward chain mixes the mask with the prior ``p`` (the segmentor's probabilities), so its stationary law is
``B(p)``; the network predicts the probability that a pixel of ``y_t`` is flipped with respect to ``y_0``
(XOR noise, METHODS 5.3.3) as a logit.

The prior for K = 1 is a sigmoid probability; a softmax over a single channel is identically 1 and would make
the chain degenerate (METHODS 5.2). Building ``p`` is the caller's job.

Nothing here comes from MONAI: it has no Bernoulli diffusion, no unsquared cosine and no ``alpha_bar_linear``
schedule (the float64 beta tables are shared with the Gaussian scheduler, ``schedulers/_common.py``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from diffmis.errors import ConfigError
from diffmis.schedulers._common import Timestep, cosine_betas, gather, linear_betas, respaced_timesteps

__all__ = ["BernoulliScheduler", "bernoulli_posterior", "bernoulli_kl"]

Prior = Union[torch.Tensor, float]
_LN2 = math.log(2.0)
_EPS = 1e-6  # probability clamp for logs (float32 resolves 1 - 1e-6)


def bernoulli_posterior(
    y_t: torch.Tensor,
    y0: torch.Tensor,
    p: Prior,
    alpha_t: Union[torch.Tensor, float],
    abar_prev: Union[torch.Tensor, float],
) -> torch.Tensor:
    """``theta_post`` of ``q(y_{t-1} | y_t, y_0, p) = B(theta_post)`` (METHODS 5.3.2).

    ``theta1 = [alpha_t y_t + (1 - alpha_t) n(y_t)] [abar_{t-1} y0 + (1 - abar_{t-1}) p]``,
    ``theta0 = [alpha_t (1 - y_t) + (1 - alpha_t) n(y_t)] [abar_{t-1} (1 - y0) + (1 - abar_{t-1}) (1 - p)]``,
    ``theta_post = theta1 / (theta0 + theta1)``, where ``n(y_t) = y_t p + (1 - y_t)(1 - p)`` is the probability
    that pure noise produced ``y_t`` (equal to METHODS' ``|1 - y_t - p|`` for binary ``y_t``).

    Args:
        y_t: (B, K, H, W) in {0, 1}.
        y0: (B, K, H, W) in [0, 1]: the true mask, or the model's ``y0_hat`` (then this is the model posterior).
        p: prior probabilities (B, K, H, W) in [0, 1], or a float (0.5 = BerDiff).
        alpha_t: one-step ``alpha`` of the (possibly respaced) step, float or broadcastable tensor.
        abar_prev: ``abar`` at the previous index (1 after the last step), float or broadcastable tensor.

    Returns:
        (B, K, H, W) in [0, 1].
    """
    noise = y_t * p + (1.0 - y_t) * (1.0 - p)
    theta1 = (alpha_t * y_t + (1.0 - alpha_t) * noise) * (abar_prev * y0 + (1.0 - abar_prev) * p)
    theta0 = (alpha_t * (1.0 - y_t) + (1.0 - alpha_t) * noise) * (
        abar_prev * (1.0 - y0) + (1.0 - abar_prev) * (1.0 - p)
    )
    return (theta1 / (theta0 + theta1).clamp_min(1e-12)).clamp(0.0, 1.0)


def bernoulli_kl(q: torch.Tensor, m: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Elementwise ``KL(B(q) || B(m))`` in nats; ``m`` is clamped to ``[eps, 1 - eps]``, ``0 log 0 = 0``.

    ``q log q`` is written as ``q * log(max(q, eps))`` rather than ``xlogy(q, q)``: the gradient of xlogy with
    respect to its second argument is ``q / q``, NaN at q = 0, which HiDiff's segmentor step (gradients through
    the prior into the true posterior ``q``) reaches whenever a posterior is exactly 0 or 1.
    """
    m = m.clamp(eps, 1.0 - eps)
    q1 = 1.0 - q
    return q * (q.clamp_min(eps).log() - m.log()) + q1 * (q1.clamp_min(eps).log() - torch.log1p(-m))


class BernoulliScheduler:
    """Bernoulli diffusion toward a prior ``B(p)`` (METHODS 5.3), T = 10 by default.

    Timesteps are 0-indexed, ``t in {0, ..., T-1}``; ``t`` is a python int or an int64 ``(B,)`` tensor.

    Args:
        timesteps: ``T`` (>= 1).
        schedule: (METHODS 5.3.5) ``"cosine"``: HiDiff's cosine, *not squared*,
            ``abar(u) = cos(((u + 0.008) / 1.008) pi / 2)``, ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)``;
            ``"cosine2"``: the standard squared cosine (Nichol & Dhariwal); ``"alpha_bar_linear"``:
            ``beta_t = 1 / (T - t)`` (abar = 1 - (t+1)/T); ``"linear"``: ``linspace(s*1e-4, s*0.02, T)``,
            ``s = 1000/T``, invalid (betas > 1) for ``T < 20``, e.g. the released HiDiff default T = 10.
        focal_gamma: default focal exponent of :meth:`loss` (``diffusion.focal_gamma``), >= 0.

    Attributes:
        betas, alphas, alphas_cumprod: (T,) float64.

    Raises:
        ConfigError: unknown schedule, ``timesteps < 1``, or betas outside [0, 1].
    """

    def __init__(
        self,
        timesteps: int = 10,
        schedule: Literal["cosine", "cosine2", "alpha_bar_linear", "linear"] = "cosine",
        focal_gamma: float = 2.0,
    ) -> None:
        if int(timesteps) < 1:
            raise ConfigError(f"diffusion.timesteps must be >= 1, got {timesteps}")
        if focal_gamma < 0:
            raise ConfigError(f"diffusion.focal_gamma must be >= 0, got {focal_gamma}")
        self.timesteps = int(timesteps)
        self.schedule = schedule
        self.focal_gamma = float(focal_gamma)
        self.betas = _bernoulli_betas(schedule, self.timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"BernoulliScheduler(timesteps={self.timesteps}, schedule={self.schedule!r}, "
            f"focal_gamma={self.focal_gamma})"
        )

    def _abar(self, t: Timestep, like: torch.Tensor):
        """``abar_t``: a python float for an int ``t`` (no device work), else a tensor broadcast to ``like``."""
        if isinstance(t, int):
            return float(self.alphas_cumprod[t])
        if like.device not in self._cache:
            self._cache[like.device] = self.alphas_cumprod.to(device=like.device, dtype=torch.float32)
        return gather(self._cache[like.device], t, like)

    def _abar_prev(self, t_prev: Timestep, like: torch.Tensor):
        """``abar`` at ``t_prev``, with ``abar_{-1} = 1``."""
        if isinstance(t_prev, int):
            return 1.0 if t_prev < 0 else self._abar(t_prev, like)
        t_prev = t_prev.to(like.device)
        return torch.where(_bcast(t_prev, like) < 0, 1.0, self._abar(t_prev.clamp_min(0), like))

    # ---------------------------------------------------------------- forward process
    def q_probs(self, y0: torch.Tensor, p: Prior, t: Timestep) -> torch.Tensor:
        """Marginal ``q(y_t | y_0, p) = B(abar_t y0 + (1 - abar_t) p)`` (METHODS 5.3.1).

        Args:
            y0: (B, K, H, W) in {0, 1} (one-hot mask). p: prior (B, K, H, W) in [0, 1] or a float.
            t: int or (B,) int64.

        Returns:
            (B, K, H, W) Bernoulli means in [0, 1].
        """
        abar = self._abar(t, y0)
        return abar * y0 + (1.0 - abar) * p

    def q_sample(
        self, y0: torch.Tensor, p: Prior, t: Timestep, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Draw ``y_t ~ q(y_t | y_0, p)``: (B, K, H, W) float in {0, 1}, outside the autograd graph."""
        return torch.bernoulli(self.q_probs(y0, p, t).detach().clamp(0.0, 1.0), generator=generator)

    def posterior_probs(
        self, y_t: torch.Tensor, y0: torch.Tensor, p: Prior, t: Timestep, t_prev: Optional[Timestep] = None
    ) -> torch.Tensor:
        """Mean of ``q(y_{t_prev} | y_t, y_0, p)`` (METHODS 5.3.2).

        With ``t_prev < t - 1`` (a respaced chain) the step uses ``alpha = abar_t / abar_{t_prev}``: Bernoulli
        transitions toward the same ``p`` compose into one of the same form, so this is the exact posterior of
        the respaced chain. At ``t = 0`` (``t_prev = -1``, ``abar_{-1} = 1``) it equals ``y0``.

        Args:
            y_t: (B, K, H, W) in {0, 1}. y0: (B, K, H, W) in [0, 1] (true mask or ``y0_hat``).
            p: prior (B, K, H, W) in [0, 1] or a float.
            t: int or (B,) int64. t_prev: same type, ``-1 <= t_prev < t``; default ``t - 1``.

        Returns:
            (B, K, H, W) in [0, 1].
        """
        if t_prev is None:
            t_prev = t - 1
        abar_t = self._abar(t, y_t)
        abar_prev = self._abar_prev(t_prev, y_t)
        return bernoulli_posterior(y_t, y0, p, abar_t / abar_prev, abar_prev)

    # ---------------------------------------------------------------- parameterisation and reverse steps
    def prior_flip_logits(self, y_t: torch.Tensor, p: torch.Tensor, t: Timestep, eps: float = 1e-4) -> torch.Tensor:
        """Flip logits of the Bayes posterior that assumes ``y_0 ~ B(p)``: the refiner's starting point.

        With ``q(y_t | y_0, p) = B(abar_t y_0 + (1 - abar_t) p)`` (METHODS 5.3.1) and the prior ``y_0 ~ B(p)``,
        ``P(y_0 = 1 | y_t) = p l_1 / (p l_1 + (1 - p) l_0)`` where ``l_k = q(y_t | y_0 = k, p)``; the flip
        probability is ``P(y_0 != y_t | y_t)``. Added to the network's output (``diffusion.prior_residual``),
        an untrained refiner already returns the segmentor's answer (``y0_hat -> p`` at large t, ``-> y_t`` at
        small t) and training learns the correction.

        Args:
            y_t: (B, K, H, W) in {0, 1}. p: (B, K, H, W) prior in [0, 1]. t: int or (B,) int64.
        Returns:
            (B, K, H, W) logits, clamped to probabilities in [eps, 1 - eps].
        """
        abar = self._abar(t, y_t)
        q1 = abar + (1.0 - abar) * p  # P(y_t = 1 | y_0 = 1)
        q0 = (1.0 - abar) * p  # P(y_t = 1 | y_0 = 0)
        l1 = y_t * q1 + (1.0 - y_t) * (1.0 - q1)
        l0 = y_t * q0 + (1.0 - y_t) * (1.0 - q0)
        post1 = p * l1 / (p * l1 + (1.0 - p) * l0).clamp_min(1e-12)
        flip = (y_t * (1.0 - post1) + (1.0 - y_t) * post1).clamp(eps, 1.0 - eps)
        return torch.log(flip) - torch.log1p(-flip)

    @staticmethod
    def flip_logits_to_y0(flip_logits: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """``y0_hat = |y_t - sigmoid(flip_logits)|`` (METHODS 5.3.3), computed as ``sigmoid((1 - 2 y_t) logits)``.

        Args:
            flip_logits: (B, K, H, W) real: logit of the probability that ``y_t`` is flipped w.r.t. ``y_0``.
            y_t: (B, K, H, W) in {0, 1}.

        Returns:
            (B, K, H, W) in [0, 1].
        """
        return torch.sigmoid((1.0 - 2.0 * y_t) * flip_logits.float())

    def ddim_probs(self, y_t: torch.Tensor, y0_hat: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Bernoulli-DDIM skip rule (METHODS 5.3.6): mean of ``y_{t_prev}`` given ``y_t`` and ``y0_hat``.

        ``sigma = (1 - abar_prev) / (1 - abar_t)``, ``mean = sigma y_t + (abar_prev - sigma abar_t) y0_hat``.
        It preserves the marginal ``abar_prev y0 + (1 - abar_prev) p`` for any prior ``p`` and is a convex
        combination of ``y_t`` and ``y0_hat`` (the two weights sum to 1), hence in [0, 1].

        Args:
            y_t: (B, K, H, W) in {0, 1}. y0_hat: (B, K, H, W) in [0, 1].
            t, t_prev: python ints, ``-1 <= t_prev < t`` (``-1``: ``abar_prev = 1``, returns ``y0_hat``).

        Returns:
            (B, K, H, W) in [0, 1].
        """
        ab_t = float(self.alphas_cumprod[t])
        ab_p = 1.0 if t_prev < 0 else float(self.alphas_cumprod[t_prev])
        sigma = (1.0 - ab_p) / (1.0 - ab_t)
        return (sigma * y_t + (ab_p - sigma * ab_t) * y0_hat).clamp(0.0, 1.0)

    def sampling_timesteps(self, steps: int) -> list[int]:
        """Descending indices of a reverse chain with ``steps`` evaluations (``T - 1`` first, 0 last)."""
        return respaced_timesteps(self.timesteps, steps)

    # ---------------------------------------------------------------- loss
    def loss(
        self,
        flip_logits: torch.Tensor,
        y0: torch.Tensor,
        y_t: torch.Tensor,
        p: Prior,
        t: Timestep,
        *,
        gamma: Optional[float] = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> dict[str, torch.Tensor]:
        """BBDM loss terms from one network pass (METHODS 5.3.4); the caller weights them (``kl + lambda focal``).

        * ``"kl"``: for ``t > 0`` the pixel-mean of ``KL(B(theta_post(y_t, y0)) || B(theta_post(y_t, y0_hat)))``;
          for ``t = 0`` the pixel-mean negative log-likelihood of ``y0`` under ``B(y0_hat)``; both in bits.
        * ``"focal"``: pixel-mean of ``(1 - p_t)^gamma BCE(eps_hat, |y_t - y0|)`` with ``p_t = exp(-BCE)``, in nats.

        The t = 0 NLL and the focal term use logits directly (``log y0_hat = logsigmoid((1 - 2 y_t) logits)``);
        the KL clamps the model posterior to ``[1e-6, 1 - 1e-6]``. Computed in float32.

        Args:
            flip_logits: (B, K, H, W) network output at ``(y_t, t)`` (one pass serves both terms).
            y0: (B, K, H, W) in {0, 1}. y_t: (B, K, H, W) in {0, 1}, a draw of :meth:`q_sample` ``(y0, p, t)``.
            p: prior (B, K, H, W) in [0, 1] or a float; for K = 1 a sigmoid probability (see module docstring).
            t: (B,) int64 or int.
            gamma: focal exponent, >= 0; default the constructor's ``focal_gamma`` (2).
            reduction: ``"mean"``: scalars (mean over batch and pixels); ``"none"``: (B,) per-sample pixel means.

        Returns:
            ``{"kl": ..., "focal": ...}``, finite, differentiable w.r.t. ``flip_logits``.
        """
        gamma = self.focal_gamma if gamma is None else float(gamma)
        logits = flip_logits.float()
        y0 = y0.float()
        y_t = y_t.float()
        if isinstance(p, torch.Tensor):
            p = p.float()
        y0_logits = (1.0 - 2.0 * y_t) * logits
        y0_hat = torch.sigmoid(y0_logits)

        # t > 0: KL between true and model posteriors (METHODS 5.3.2 with y0 and y0_hat)
        true_post = self.posterior_probs(y_t, y0, p, t)
        model_post = self.posterior_probs(y_t, y0_hat, p, t)
        kl = bernoulli_kl(true_post, model_post) / _LN2
        # t = 0: decoder NLL of y0 under B(y0_hat)
        nll = F.binary_cross_entropy_with_logits(y0_logits, y0, reduction="none") / _LN2
        is_first = (torch.as_tensor(t, device=logits.device) == 0)
        kl_term = torch.where(_bcast(is_first, logits), nll, kl)

        # focal loss on the XOR noise target |y_t - y0|
        bce = F.binary_cross_entropy_with_logits(logits, (y_t - y0).abs(), reduction="none")
        focal = (1.0 - torch.exp(-bce)) ** gamma * bce

        dims = tuple(range(1, logits.ndim))
        out = {"kl": kl_term.mean(dim=dims), "focal": focal.mean(dim=dims)}
        if reduction == "mean":
            out = {k: v.mean() for k, v in out.items()}
        return out


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or 0-dim tensor reshaped to broadcast against (B, ...) ``like``."""
    return v if v.ndim == 0 else v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def _bernoulli_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """(T,) float64 betas in [0, 1] for the named schedule (METHODS 5.3.5)."""
    if schedule == "cosine":
        betas = cosine_betas(timesteps, power=1)  # HiDiff's cosine: not squared
    elif schedule == "cosine2":
        betas = cosine_betas(timesteps, power=2)
    elif schedule == "alpha_bar_linear":
        betas = 1.0 / (timesteps - torch.arange(timesteps, dtype=torch.float64))  # abar_t = 1 - (t+1)/T
    elif schedule == "linear":
        betas = linear_betas(timesteps)
    else:
        raise ConfigError(
            "diffusion.schedule must be 'cosine', 'cosine2', 'alpha_bar_linear' or 'linear' for Bernoulli "
            f"diffusion, got {schedule!r}"
        )
    if float(betas.max()) > 1.0 or float(betas.min()) < 0.0:
        raise ConfigError(
            f"diffusion.schedule={schedule!r} is invalid for timesteps={timesteps}: its betas reach "
            f"{float(betas.max()):.2f} > 1 (METHODS 5.3.5); use 'cosine', 'cosine2' or 'alpha_bar_linear'"
        )
    return betas
