"""Samplers: Gaussian DDPM / DDIM (with the PD-DDPM start) and Bernoulli ancestral / DDIM (HiDiff's BBDM).

A sampler sees only ``model_fn(x_t: (B, K, H, W), t: (B,) int64) -> (B, K, H, W)``: the network's prediction
(eps / x0 / v for Gaussian models, flip logits for Bernoulli models), with the image condition already bound by
the caller. The number of network evaluations (NFE) is the cost; each sampler reports it.

Randomness comes only from ``generator``, so a sampler is deterministic given it. The draws are made on the
generator's own device and moved to the sampling device: with a CPU generator (the predictor's) a seed gives
the same noise on a CPU and on a GPU, so their masks agree to rounding. The loops do no per-pixel python work
and no device-to-host reads: step coefficients are python floats computed from the schedule tables before use,
timestep vectors are built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import torch

from diffmis.errors import ConfigError
from diffmis.schedulers import BernoulliScheduler, GaussianScheduler, draw_bernoulli, draw_normal

__all__ = ["ModelFn", "SampleOutput", "gaussian_sample", "bernoulli_sample", "propose_start_step"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleOutput:
    """Result of one sampler call.

    Attributes:
        probs: (B, K, H, W) float in [0, 1]: the final ``x0_hat`` mapped to probabilities (Gaussian) or the last
            step's ``y0_hat`` (Bernoulli). K = 1: foreground probability; K > 1: per-channel probabilities
            (not renormalised; fusion/argmax does that).
        nfe: number of network evaluations made (batched calls of ``model_fn``).
        trajectory: (S, B, K, H, W) in [0, 1], the ``x0_hat`` probabilities after each of the S steps; only when
            the sampler was called with ``keep_trajectory=True``.
    """

    probs: torch.Tensor
    nfe: int
    trajectory: Optional[torch.Tensor] = None


def _timestep_rows(chain: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    """(S, B) int64: row i is the timestep vector of step i (one host-to-device copy, before the loop)."""
    return torch.tensor(list(chain), dtype=torch.long, device=device).unsqueeze(1).expand(-1, batch).contiguous()


def _check_pred(pred: torch.Tensor, x: torch.Tensor) -> None:
    if pred.shape != x.shape:
        raise ValueError(
            f"model_fn returned shape {tuple(pred.shape)} for an input of shape {tuple(x.shape)}; a sampler needs "
            "one output channel per mask channel (drop learned-variance channels before sampling)"
        )


@torch.no_grad()
def gaussian_sample(
    model_fn: ModelFn,
    scheduler: GaussianScheduler,
    shape: Sequence[int],
    *,
    steps: int,
    sampler: Literal["ddim", "ddpm"] = "ddim",
    eta: float = 0.0,
    init: Optional[torch.Tensor] = None,
    start_step: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """Reverse Gaussian diffusion from noise, or from a noised prior mask (PD-DDPM, METHODS 4.2).

    The chain visits ``steps`` evenly spaced indices of ``[0, T')`` from ``T' - 1`` down to 0 (``T' = T``
    unless ``start_step`` is given). ``"ddim"`` uses DDIM with ``eta`` (0 = deterministic); ``"ddpm"`` is
    ancestral sampling over the respaced chain (betas recomputed for the chain, as improved-diffusion's
    respacing; ``steps = T'`` is the ordinary chain).

    PD-DDPM start: ``x`` at index ``T' - 1`` is drawn from ``q(x_{T'-1} | x_0 = init)`` and only indices
    ``< T'`` are run, so the first network call sees index ``T' - 1`` (no ADDPM off-by-one, METHODS 4.2).

    Args:
        model_fn: ``(x_t (B, K, H, W), t (B,) int64) -> (B, K, H, W)`` prediction (eps / x0 / v, per
            ``scheduler.prediction``).
        scheduler: the Gaussian schedule the model was trained with.
        shape: (B, K, H, W) of the sample; must equal ``init.shape`` when ``init`` is given.
        steps: network evaluations, ``1 <= steps <= T'``.
        sampler: ``"ddim"`` or ``"ddpm"``.
        eta: DDIM stochasticity, >= 0 (ignored by ``"ddpm"``).
        init: (B, K, H, W) prior mask in {0, 1} or probabilities in [0, 1] (PD-DDPM pre-segmentation).
        start_step: ``T'`` in [1, T]; requires ``init`` unless it equals ``T``. Default: ``T``.
        generator: the only source of randomness (on any device).
        device: default ``init``'s device, else the generator's, else CPU.
        dtype: floating dtype of the chain; default float32.
        keep_trajectory: also return the per-step ``x0_hat`` probabilities.

    Returns:
        :class:`SampleOutput` with ``probs`` (B, K, H, W) in [0, 1] and ``nfe == steps``.

    Raises:
        ConfigError: ``steps`` / ``start_step`` / ``sampler`` out of range, or ``start_step < T`` without ``init``.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"sample.sampler must be 'ddim' or 'ddpm' for Gaussian diffusion, got {sampler!r}")
    if eta < 0:
        raise ConfigError(f"sample.eta must be >= 0, got {eta}")
    if start_step is not None and int(start_step) < scheduler.timesteps and init is None:
        raise ConfigError(f"sample.start_step={start_step} < T needs a prior mask (init) to start from")
    shape = tuple(int(s) for s in shape)
    if init is not None and tuple(init.shape) != shape:
        raise ValueError(f"init has shape {tuple(init.shape)} but the sample shape is {shape}")
    if device is None:
        device = init.device if init is not None else (generator.device if generator is not None else "cpu")
    device = torch.device(device)
    dtype = dtype or torch.float32

    chain = scheduler.sampling_timesteps(steps, start_step)
    ts = _timestep_rows(chain, shape[0], device)
    x = draw_normal(shape, generator, device, dtype)
    if init is not None:  # PD-DDPM: x_{T'-1} ~ q(x_{T'-1} | x_0 = prior)
        x0_prior = scheduler.mask_to_x0(init.to(device=device, dtype=dtype))
        x = scheduler.add_noise(x0_prior, x, chain[0]).to(dtype)
    ddpm = scheduler.ddpm(chain) if sampler == "ddpm" else None

    trajectory = []
    for i, t in enumerate(chain):
        pred = model_fn(x, ts[i])
        if i == 0:
            _check_pred(pred, x)
        pred = pred.to(dtype)
        if ddpm is not None:
            x, x0 = ddpm.step(pred, x, t, generator=generator)
        else:
            t_prev = chain[i + 1] if i + 1 < len(chain) else -1
            x, x0 = scheduler.ddim_step(pred, x, t, t_prev, eta=eta, generator=generator)
        if keep_trajectory:
            trajectory.append(scheduler.x0_to_prob(x0))
    # after the step at index 0 the chain is at x0_hat (abar_{-1} = 1: no noise, no x_t term)
    return SampleOutput(
        probs=scheduler.x0_to_prob(x),
        nfe=len(chain),
        trajectory=torch.stack(trajectory) if keep_trajectory else None,
    )


@torch.no_grad()
def bernoulli_sample(
    model_fn: ModelFn,
    scheduler: BernoulliScheduler,
    prior: torch.Tensor,
    *,
    steps: int,
    sampler: Literal["bernoulli", "bernoulli_ddim"] = "bernoulli",
    generator: Optional[torch.Generator] = None,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """Reverse Bernoulli diffusion toward the prior ``B(p)`` (METHODS 5.3.6).

    Starts from ``y_{T-1} ~ B(prior)`` and visits ``steps`` evenly spaced indices from ``T - 1`` to 0. At each
    step ``y0_hat = |y_t - sigmoid(model_fn(y_t, t))|``; ``"bernoulli"`` then draws ``y_{t_prev}`` from the model
    posterior ``B(theta_post(y_t, y0_hat, p))`` (exact for a respaced chain too, see
    :meth:`BernoulliScheduler.posterior_probs`), ``"bernoulli_ddim"`` from the Bernoulli-DDIM skip rule
    (valid for a non-uniform prior). The last step (index 0) returns the probability ``y0_hat``, not a sample.

    Args:
        model_fn: ``(y_t (B, K, H, W) in {0, 1}, t (B,) int64) -> flip logits (B, K, H, W)``.
        scheduler: the Bernoulli schedule the model was trained with.
        prior: (B, K, H, W) prior probabilities ``p`` in [0, 1] (K = 1: sigmoid of the segmentor logit; a
            uniform ``torch.full(shape, 0.5)`` is BerDiff). Its device is the sampling device.
        steps: network evaluations, ``1 <= steps <= T``.
        sampler: ``"bernoulli"`` (ancestral) or ``"bernoulli_ddim"``.
        generator: the only source of randomness (on any device).
        keep_trajectory: also return the per-step ``y0_hat``.

    Returns:
        :class:`SampleOutput` with ``probs`` (B, K, H, W) in [0, 1] and ``nfe == steps``.
    """
    if sampler not in ("bernoulli", "bernoulli_ddim"):
        raise ConfigError(
            f"sample.sampler must be 'bernoulli' or 'bernoulli_ddim' for Bernoulli diffusion, got {sampler!r}"
        )
    p = prior.float().clamp(0.0, 1.0)
    chain = scheduler.sampling_timesteps(steps)
    ts = _timestep_rows(chain, p.shape[0], p.device)
    y = draw_bernoulli(p, generator)  # y_{T-1} ~ B(p)
    trajectory = []
    y0_hat = p
    for i, t in enumerate(chain):
        logits = model_fn(y, ts[i])
        if i == 0:
            _check_pred(logits, y)
        y0_hat = scheduler.flip_logits_to_y0(logits, y)  # METHODS 5.3.3
        if keep_trajectory:
            trajectory.append(y0_hat)
        if i + 1 == len(chain):
            break
        t_prev = chain[i + 1]
        if sampler == "bernoulli":
            theta = scheduler.posterior_probs(y, y0_hat, p, t, t_prev)
        else:
            theta = scheduler.ddim_probs(y, y0_hat, t, t_prev)
        y = draw_bernoulli(theta, generator)
    return SampleOutput(
        probs=y0_hat, nfe=len(chain), trajectory=torch.stack(trajectory) if keep_trajectory else None
    )


def propose_start_step(scheduler: GaussianScheduler, target_snr: float = 1.0) -> int:
    """Smallest PD-DDPM start step ``T'`` whose start sample is at least as noisy as ``target_snr`` (METHODS 4.3).

    Returns ``T' = t* + 1`` where ``t*`` is the smallest index with ``SNR(t*) = abar/(1 - abar) <= target_snr``:
    the start sample ``x_{T'-1}`` then has SNR <= target (the METHODS 4.3 table lists SNR against ``T'`` in
    this sense: e.g. linear T=1000 gives SNR 1.10 at ``T' = 250``). Per pixel,
    ``KL(q(x_t | a) || q(x_t | b)) = SNR(t) (a - b)^2 / 2``; a wrong pixel has ``|a - b| = 2`` in the ``pm1``
    range and 1 in ``01``, so the same target hides a wrong pixel less well in ``pm1``. Tune on validation.

    Args:
        scheduler: the Gaussian schedule.
        target_snr: > 0.

    Returns:
        int in [1, T]; ``T`` if no index reaches the target.
    """
    if target_snr <= 0:
        raise ValueError(f"target_snr must be > 0, got {target_snr}")
    snr = scheduler.snr(torch.arange(scheduler.timesteps))
    hits = torch.nonzero(snr <= target_snr).flatten()
    return scheduler.timesteps if hits.numel() == 0 else int(hits[0]) + 1
