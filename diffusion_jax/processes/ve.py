"""Variance-exploding family: alpha(t) = 1.

  VE   sigma(t) = sigma_min (sigma_max / sigma_min)^t     (score_sde; g^2 = 2 sigma^2 log(sigma_max/sigma_min))
  EDM  sigma(t) = t on [sigma_min, sigma_max]              (Karras et al. 2022; g^2 = 2 t)
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time


class _VarExploding(Process):
    variance_preserving = False

    def log_alpha(self, t):
        return jnp.zeros_like(as_time(t))

    def f(self, t):
        return jnp.zeros_like(as_time(t))

    def log_snr(self, t):
        return -2.0 * self.log_sigma(t)


@dataclasses.dataclass(frozen=True)
class VE(_VarExploding):
    """score_sde's VE SDE (NCSN): geometric sigma between sigma_min and sigma_max."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0
    name = "ve"

    def log_sigma(self, t):
        return math.log(self.sigma_min) + as_time(t) * math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def t_from_log_snr(self, lam):
        return (-0.5 * as_time(lam) - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    def g2(self, t):
        return 2.0 * math.log(self.sigma_max / self.sigma_min) * self.sigma(t) ** 2


@dataclasses.dataclass(frozen=True)
class EDM(_VarExploding):
    """EDM's process: x_sigma = x_0 + sigma eps with time equal to the noise level, t = sigma."""

    t_min: float = 0.002
    t_max: float = 80.0
    name = "edm"

    def sigma(self, t):
        return as_time(t)

    def log_sigma(self, t):
        return jnp.log(as_time(t))

    def t_from_log_snr(self, lam):
        return jnp.exp(-0.5 * as_time(lam))

    def g2(self, t):
        return 2.0 * as_time(t)
