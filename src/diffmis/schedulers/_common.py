"""Helpers shared by the Gaussian and Bernoulli schedulers: timestep gathering, respaced sampling chains, and the
samplers' random draws."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from diffmis.errors import ConfigError

Timestep = Union[int, torch.Tensor]


def draw_normal(shape: Sequence[int], generator: Optional[torch.Generator], device: Union[str, torch.device],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn on the generator's own device: a CPU generator gives the same
    noise whichever device samples (the predictor's choice, so a seed means the same masks on a CPU and a GPU)."""
    where = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def draw_bernoulli(p: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``y ~ B(p)`` elementwise (0./1. in ``p``'s dtype): ``u < p`` with ``u`` uniform, drawn on the generator's own
    device as :func:`draw_normal`."""
    where = generator.device if generator is not None else p.device
    u = torch.rand(p.shape, generator=generator, device=where, dtype=torch.float32).to(p.device)
    return (u < p).to(p.dtype)


def linear_betas(timesteps: int) -> torch.Tensor:
    """(T,) float64 ``linspace(s*1e-4, s*0.02, T)`` with ``s = 1000 / T`` (METHODS 1.2; may exceed 1 for T < 20)."""
    s = 1000.0 / timesteps
    return torch.linspace(s * 1e-4, s * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, power: int = 2) -> torch.Tensor:
    """(T,) float64 cosine betas: ``f(u) = cos(((u + 0.008) / 1.008) pi / 2) ** power``,
    ``beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999)``. ``power=2``: Nichol & Dhariwal; ``power=1``: HiDiff's
    unsquared ``cosine`` (METHODS 5.3.5).

    Written here rather than taken from MONAI's ``NoiseSchedules["cosine"]``, which evaluates it in float32:
    ``1 - f(t+1)/f(t)`` then loses about three significant digits of the small early betas (4.1246e-5 instead of
    4.1284e-5 for T = 1000).
    """
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** power
    return (1.0 - f[1:] / f[:-1]).clamp(max=0.999)


def table_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype in which schedule coefficients are applied to ``x``: at least float32 (bf16/fp16 inputs get float32)."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Look up ``table[t]`` shaped to broadcast against ``like``.

    Python-int timesteps never come here: the schedulers read those from their float64 CPU tables as python
    floats, so that a sampling loop on an accelerator does no device-to-host read.

    Args:
        table: (T,) schedule values, already on ``like``'s device.
        t: 0-dim tensor, or (B,) int64 per-sample timesteps (returned as (B, 1, ..., 1), ``like.ndim`` dims).
        like: the tensor the coefficient multiplies, (B, ...).
    """
    t = t.to(device=table.device, dtype=torch.long)
    v = table[t]
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def respaced_timesteps(num_indices: int, steps: int) -> list[int]:
    """Evenly spaced timestep indices in ``[0, num_indices)`` for a reverse chain, in the order they are visited.

    Both ends are included: the chain starts at ``num_indices - 1`` and ends at ``0`` (improved-diffusion's
    respacing of one section). Spacing is ``(num_indices - 1) / (steps - 1) >= 1``, so rounding keeps the indices
    distinct; ``steps == num_indices`` gives every index.

    Args:
        num_indices: size of the sub-range (``T`` for a full chain, ``T'`` for a PD-DDPM start), >= 1.
        steps: number of reverse steps (network evaluations), ``1 <= steps <= num_indices``.

    Returns:
        Descending list of ``steps`` int indices, first ``num_indices - 1``, last ``0``.

    Raises:
        ConfigError: ``steps`` is not in ``[1, num_indices]``.
    """
    if num_indices < 1:
        raise ConfigError(f"the reverse chain needs at least one timestep, got a range of {num_indices}")
    if not 1 <= steps <= num_indices:
        raise ConfigError(
            f"sample.steps={steps} must be between 1 and the number of timesteps it spaces ({num_indices})"
        )
    if steps == 1:
        return [num_indices - 1]
    stride = (num_indices - 1) / (steps - 1)
    return [int(round(i * stride)) for i in range(steps - 1, -1, -1)]
