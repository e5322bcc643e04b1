"""Gaussian diffusion on masks: schedules, forward noising, loss targets and the DDPM / DDIM reverse steps.

Equations are METHODS 1.2 (Ho et al. DDPM; Nichol & Dhariwal cosine schedule) and Song et al. DDIM eq. 12/16.

What comes from MONAI and what is written here, and why:

* Beta schedules are computed here in float64 (``schedulers/_common.py``): MONAI's ``NoiseSchedules`` builds
  them in float32, which costs the cosine schedule's small early betas about three significant digits.
* Ancestral (DDPM) steps use ``monai.networks.schedulers.DDPMScheduler.step``. MONAI's ``set_timesteps`` does not
  respace: after it, ``step(t)`` still uses the one-step posterior ``q(x_{t-1} | x_t, x_0)`` while the next call
  is at a much smaller ``t``. We therefore give MONAI a *respaced chain*: a ``DDPMScheduler`` whose schedule is
  the sub-sequence ``abar[t_i]`` of the chain's timesteps, with ``beta'_i = 1 - abar[t_i] / abar[t_{i-1}]``
  (improved-diffusion's respacing), registered as the MONAI noise schedule ``diffmis_alphas_cumprod``. MONAI is
  stepped with the chain position ``i`` and the network sees the original index ``t_i``.
* DDIM steps are written by hand (:meth:`GaussianScheduler.ddim_step`). MONAI's ``DDIMScheduler`` does not fit:
  its previous timestep is ``t - T // steps`` while ``set_timesteps`` places timesteps by rounded ``linspace``,
  so the two disagree whenever ``steps`` does not divide ``T``; it has no sub-range ``[0, T')`` (PD-DDPM);
  after clipping ``x0_hat`` it keeps the unclipped ``eps`` (so ``x_{t-1}`` is built from an inconsistent pair);
  and it takes one python-int timestep only.
* ``add_noise`` / ``training_target`` / ``pred_to_x0_eps`` are written here because they take per-sample
  ``(B,)`` timesteps and must not change dtype or device of the scheduler's tables (MONAI's ``add_noise``
  reassigns its ``alphas_cumprod`` to the input's dtype, e.g. bf16, for all later calls).
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from monai.networks.schedulers import DDPMScheduler, NoiseSchedules

from diffmis.errors import ConfigError
from diffmis.schedulers._common import (
    Timestep,
    cosine_betas,
    draw_normal,
    gather,
    linear_betas,
    respaced_timesteps,
    table_dtype,
)

__all__ = ["GaussianScheduler", "RespacedDDPM"]

_MONAI_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@NoiseSchedules.add_def("diffmis_alphas_cumprod", "A schedule given by its alphas_cumprod (a respaced chain)")
def _schedule_from_alphas_cumprod(num_train_timesteps: int, alphas_cumprod: torch.Tensor):
    """(betas, alphas, alphas_cumprod) of the chain whose cumulative products are ``alphas_cumprod`` (length T)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if abar.shape != (num_train_timesteps,):
        raise ValueError(f"alphas_cumprod must have shape ({num_train_timesteps},), got {tuple(abar.shape)}")
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    alphas = abar / prev  # respacing: alpha'_i = abar[t_i] / abar[t_{i-1}], abar[t_{-1}] = 1
    return 1.0 - alphas, alphas, abar


class GaussianScheduler:
    """Gaussian DDPM noise schedule on masks (METHODS 1.2), with eps / x0 / v parameterisations.

    Timesteps are 0-indexed, ``t in {0, ..., T-1}``; ``t = 0`` is the last reverse step. Every method that takes
    ``t`` accepts a python int (same step for the whole batch), or an int64 tensor of shape ``(B,)`` (per-sample).

    Args:
        timesteps: number of diffusion steps ``T`` (>= 1).
        schedule: ``"linear"``: ``beta_t = linspace(s*1e-4, s*0.02, T)``, ``s = 1000 / T`` (invalid when
            ``s * 0.02 >= 1``, i.e. ``T <= 20``); ``"cosine"``: Nichol & Dhariwal, betas clipped at 0.999.
        prediction: what the network predicts: ``"eps"`` (noise), ``"x0"`` (clean mask) or ``"v"``
            (``v = sqrt(abar) eps - sqrt(1 - abar) x0``).
        mask_range: value range of the diffused mask ``x0``: ``"pm1"`` maps {0, 1} masks to {-1, 1} (default,
            METHODS 1.4); ``"01"`` diffuses {0, 1} masks directly (the authors' codes). ``x0_hat`` is clamped to
            this range (the authors clamp to [-1, 1] even for {0, 1} masks; we do not).

    Attributes:
        betas: (T,) float64. alphas_cumprod: (T,) float64, ``abar_t = prod_{s<=t} (1 - beta_s)``.

    Raises:
        ConfigError: an unknown option, ``timesteps < 1``, or a linear schedule whose betas reach 1.
    """

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: Literal["linear", "cosine"] = "linear",
        prediction: Literal["eps", "x0", "v"] = "eps",
        mask_range: Literal["pm1", "01"] = "pm1",
    ) -> None:
        if int(timesteps) < 1:
            raise ConfigError(f"diffusion.timesteps must be >= 1, got {timesteps}")
        if prediction not in _MONAI_PREDICTION:
            raise ConfigError(f"diffusion.prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        if mask_range not in ("pm1", "01"):
            raise ConfigError(f"diffusion.mask_range must be 'pm1' or '01', got {mask_range!r}")
        self.timesteps = int(timesteps)
        self.schedule = schedule
        self.prediction = prediction
        self.mask_range = mask_range
        self.betas = _gaussian_betas(schedule, self.timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianScheduler(timesteps={self.timesteps}, schedule={self.schedule!r}, "
            f"prediction={self.prediction!r}, mask_range={self.mask_range!r})"
        )

    # ---------------------------------------------------------------- tables on the input's device / dtype
    def _tables(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (like.device, table_dtype(like))
        if key not in self._cache:
            abar = self.alphas_cumprod
            self._cache[key] = {
                "sqrt_abar": abar.sqrt().to(device=key[0], dtype=key[1]),
                "sqrt_1m_abar": (1.0 - abar).sqrt().to(device=key[0], dtype=key[1]),
            }
        return self._cache[key]

    def _coefs(self, t: Timestep, like: torch.Tensor):
        """(sqrt(abar_t), sqrt(1 - abar_t)): python floats for an int ``t`` (no device work), else tensors."""
        if isinstance(t, int):
            abar = float(self.alphas_cumprod[t])
            return abar**0.5, (1.0 - abar) ** 0.5
        tab = self._tables(like)
        return gather(tab["sqrt_abar"], t, like), gather(tab["sqrt_1m_abar"], t, like)

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high) of ``x0``: (-1, 1) for ``pm1``, (0, 1) for ``01``."""
        return (-1.0, 1.0) if self.mask_range == "pm1" else (0.0, 1.0)

    # ---------------------------------------------------------------- value ranges
    def mask_to_x0(self, mask01: torch.Tensor) -> torch.Tensor:
        """Map a mask (or probabilities) in [0, 1] to the diffused range.

        Args:
            mask01: (B, K, H, W) float in [0, 1] (one-hot masks, or probabilities for a PD-DDPM prior).

        Returns:
            (B, K, H, W): ``2 m - 1`` in [-1, 1] for ``pm1``; ``m`` unchanged for ``01``.
        """
        return mask01 * 2.0 - 1.0 if self.mask_range == "pm1" else mask01

    def x0_to_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`mask_to_x0`, clamped: (B, K, H, W) any real -> (B, K, H, W) in [0, 1]."""
        p = (x0 + 1.0) * 0.5 if self.mask_range == "pm1" else x0
        return p.clamp(0.0, 1.0)

    # ---------------------------------------------------------------- forward process and targets
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """Draw from ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` given the noise (METHODS 1.2).

        Args:
            x0: (B, K, H, W) clean mask in the mask range (see :meth:`mask_to_x0`).
            noise: (B, K, H, W) standard normal.
            t: int or (B,) int64 in [0, T).

        Returns:
            (B, K, H, W) ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (float32 or wider).
        """
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """Regression target of the network for :meth:`add_noise` ``(x0, noise, t)``.

        Returns:
            (B, K, H, W): ``noise`` (eps), ``x0`` (x0), or ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (v).
        """
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self._coefs(t, x0)
        return a * noise - s * x0  # v-parameterisation (Salimans & Ho 2022)

    def pred_to_x0_eps(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: Timestep, clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a network prediction into ``(x0_hat, eps_hat)``.

        ``x0_hat`` is clamped to the mask range (``clip=True``) and ``eps_hat`` is recomputed from the clamped
        ``x0_hat`` so that ``x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat`` holds exactly (DDIM then
        moves along a consistent pair; MONAI's DDIM keeps the unclamped eps).

        Args:
            pred: (B, K, H, W) network output (eps, x0 or v according to ``prediction``).
            x_t: (B, K, H, W) the noisy input the network saw.
            t: int or (B,) int64.
            clip: clamp ``x0_hat`` to :attr:`clip_range`.

        Returns:
            x0_hat (B, K, H, W) in the mask range; eps_hat (B, K, H, W).
        """
        a, s = self._coefs(t, x_t)
        if self.prediction == "eps":
            x0 = (x_t - s * pred) / a
        elif self.prediction == "x0":
            x0 = pred
        else:
            x0 = a * x_t - s * pred  # from v = a eps - s x0 and x_t = a x0 + s eps, with a^2 + s^2 = 1
        if clip:
            x0 = x0.clamp(*self.clip_range)
        eps = (x_t - a * x0) / s
        return x0, eps

    def snr(self, t: Timestep) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (float64; 0-dim for an int ``t``, else (B,))."""
        abar = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long).cpu()]
        return abar / (1.0 - abar)

    # ---------------------------------------------------------------- reverse process
    def sampling_timesteps(self, steps: int, start_step: Optional[int] = None) -> list[int]:
        """Descending timestep indices of a reverse chain of ``steps`` network evaluations.

        Args:
            steps: number of reverse steps, ``1 <= steps <= start_step``.
            start_step: ``T'`` in [1, T]: the chain covers ``[0, T')`` and starts at index ``T' - 1`` (PD-DDPM,
                METHODS 4.2, without the ADDPM off-by-one). None means ``T``.

        Returns:
            ``steps`` ints, first ``start_step - 1``, last 0, evenly spaced.
        """
        n = self.timesteps if start_step is None else int(start_step)
        if not 1 <= n <= self.timesteps:
            raise ConfigError(f"sample.start_step={start_step} must be in [1, diffusion.timesteps={self.timesteps}]")
        return respaced_timesteps(n, steps)

    def abar_prev(self, t_prev: int) -> float:
        """``abar`` at the previous chain index; ``t_prev = -1`` (after the last step) gives 1."""
        return 1.0 if t_prev < 0 else float(self.alphas_cumprod[t_prev])

    def ddim_step(
        self,
        pred: torch.Tensor,
        x_t: torch.Tensor,
        t: int,
        t_prev: int,
        *,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from index ``t`` to ``t_prev < t`` (``-1`` = finish at ``x0_hat``); DDIM eq. 12 and 16.

        ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`` with
        ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``. ``eta = 1`` is the
        ancestral sampler of the respaced chain; ``eta = 0`` is deterministic. Noise is drawn only when
        ``sigma > 0``.

        Args:
            pred: (B, K, H, W) network output at ``(x_t, t)``.
            x_t: (B, K, H, W).
            t, t_prev: python ints, ``-1 <= t_prev < t < T``.
            eta: >= 0.
            generator: for the noise ``z`` (on any device: :func:`draw_normal`).

        Returns:
            x_prev (B, K, H, W); x0_hat (B, K, H, W) in the mask range.
        """
        x0, eps = self.pred_to_x0_eps(pred, x_t, t)
        ab_t = float(self.alphas_cumprod[t])
        ab_p = self.abar_prev(t_prev)
        sigma = eta * ((1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p)) ** 0.5
        x_prev = ab_p**0.5 * x0 + max(1.0 - ab_p - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            z = draw_normal(x_t.shape, generator, x_t.device, x_prev.dtype)
            x_prev = x_prev + sigma * z
        return x_prev, x0

    def ddpm(self, chain: Sequence[int]) -> "RespacedDDPM":
        """Ancestral sampler over the (possibly respaced) chain of distinct indices; its last step ends at x0."""
        return RespacedDDPM(self, chain)


class RespacedDDPM:
    """Ancestral DDPM steps over a respaced chain, delegated to MONAI's ``DDPMScheduler.step``.

    The chain ``t_{n-1} > ... > t_0`` (normally ``t_0 = 0``) defines a shorter Markov chain with
    ``abar'_i = abar[t_i]`` and ``beta'_i = 1 - abar'_i / abar'_{i-1}`` (improved-diffusion respacing); its posterior
    ``q(x_{t_{i-1}} | x_{t_i}, x0)`` (METHODS 1.2 with the primed betas, ``fixed_small`` variance ``beta~``) is
    what MONAI computes when stepped at position ``i``. ``x0_hat`` is clamped to the scheduler's mask range.
    """

    def __init__(self, scheduler: GaussianScheduler, chain: Sequence[int]) -> None:
        asc = sorted(int(t) for t in chain)
        if not asc or asc[0] < 0 or len(set(asc)) != len(asc):
            raise ValueError(f"a DDPM chain must be distinct non-negative indices, got {list(chain)}")
        self._pos = {t: i for i, t in enumerate(asc)}
        low, high = scheduler.clip_range
        self._monai = DDPMScheduler(
            num_train_timesteps=len(asc),
            schedule="diffmis_alphas_cumprod",
            variance_type="fixed_small",
            clip_sample=True,
            prediction_type=_MONAI_PREDICTION[scheduler.prediction],
            clip_sample_min=low,
            clip_sample_max=high,
            alphas_cumprod=scheduler.alphas_cumprod[asc],
        )

    def step(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: int, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``x`` at the chain's previous index given the prediction at index ``t`` (no noise at ``t = 0``).

        Args:
            pred: (B, K, H, W) network output at ``(x_t, t)``. x_t: (B, K, H, W). t: an index of the chain.
            generator: for the noise (a generator on another device than ``x_t`` seeds one on ``x_t``'s).

        Returns:
            x_prev (B, K, H, W); x0_hat (B, K, H, W) in the mask range.
        """
        if generator is not None and generator.device != x_t.device:
            # MONAI draws the noise on x_t's device: a generator there, seeded from the given one (still
            # deterministic given it; unlike DDIM, ancestral DDPM masks then differ between CPU and GPU)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator(device=x_t.device).manual_seed(seed)
        return self._monai.step(pred, self._pos[int(t)], x_t, generator=generator)


def _gaussian_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """(T,) float64 betas of METHODS 1.2."""
    if schedule == "linear":
        betas = linear_betas(timesteps)
        if float(betas[-1]) >= 1.0:
            raise ConfigError(
                f"diffusion.schedule='linear' is invalid for timesteps={timesteps}: its betas reach "
                f"{float(betas[-1]):.2f} >= 1; use 'cosine' or more timesteps"
            )
        return betas
    if schedule == "cosine":
        return cosine_betas(timesteps, power=2)
    raise ConfigError(f"diffusion.schedule must be 'linear' or 'cosine' for Gaussian diffusion, got {schedule!r}")
