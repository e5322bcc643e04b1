"""Noise math (layer 2): Gaussian DDPM/DDIM on masks and Bernoulli diffusion with a prior; no pixel semantics."""

from diffmis.schedulers._common import draw_bernoulli, draw_normal
from diffmis.schedulers.bernoulli import BernoulliScheduler, bernoulli_kl, bernoulli_posterior
from diffmis.schedulers.gaussian import GaussianScheduler, RespacedDDPM

__all__ = ["GaussianScheduler", "RespacedDDPM", "BernoulliScheduler", "bernoulli_posterior", "bernoulli_kl",
           "draw_normal", "draw_bernoulli"]
