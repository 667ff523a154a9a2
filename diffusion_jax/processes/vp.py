"""Variance-preserving family: linear-beta VP, cosine, sub-VP and the discrete DDPM schedule.

With B(t) = int_0^t beta(s) ds:
  VP        alpha = exp(-B/2),  sigma = sqrt(1 - exp(-B)),   f = -beta/2, g^2 = beta
  sub-VP    alpha = exp(-B/2),  sigma = 1 - exp(-B),         f = -beta/2, g^2 = beta (1 - exp(-2B))
  cosine    alpha = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s))   (Nichol & Dhariwal 2021), sigma^2 = 1 - alpha^2
  discrete  log alpha_n = 1/2 sum_{i<=n} log(1 - beta_i) at t_n = (n+1)/T, piecewise-linear in t
            in between (DPM-Solver's NoiseScheduleVP('discrete')), sigma^2 = 1 - alpha^2.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes.base import Process, as_time, schedule_dtype


def _sigma_from_log_alpha(log_alpha):
    """sigma = sqrt(1 - alpha^2), computed as sqrt(-expm1(2 log alpha)) for accuracy near t = 0."""
    return jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def _log_alpha_from_log_snr_vp(lam):
    """For alpha^2 + sigma^2 = 1: alpha^2 = sigmoid(lambda), so log alpha = -softplus(-lambda)/2."""
    return -0.5 * jnp.logaddexp(0.0, -lam)


class _VarPreserving(Process):
    """alpha^2 + sigma^2 = 1: sigma and log-SNR follow from log alpha."""

    def sigma(self, t):
        return _sigma_from_log_alpha(self.log_alpha(as_time(t)))

    def log_sigma(self, t):
        return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(as_time(t))))

    def g2(self, t):
        return -2.0 * self.f(t)


@dataclasses.dataclass(frozen=True)
class VPLinear(_VarPreserving):
    """score_sde's VP SDE with beta(t) = beta_min + t (beta_max - beta_min)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name = "vp"

    def beta(self, t):
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        t = as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def log_alpha(self, t):
        return -0.5 * self.int_beta(t)

    def log_snr(self, t):
        # lambda = -log(exp(B) - 1)
        return -jnp.log(jnp.expm1(self.int_beta(t)))

    def _t_from_int_beta(self, b):
        db = self.beta_max - self.beta_min
        return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min ** 2 + 2.0 * db * b))

    def t_from_log_snr(self, lam):
        return self._t_from_int_beta(jnp.logaddexp(0.0, -as_time(lam)))

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)


@dataclasses.dataclass(frozen=True)
class SubVP(VPLinear):
    """score_sde's sub-VP SDE: same drift as VP, sigma(t) = 1 - exp(-B(t))."""

    name = "subvp"

    def sigma(self, t):
        return -jnp.expm1(-self.int_beta(t))

    def log_sigma(self, t):
        return jnp.log(self.sigma(t))

    def log_snr(self, t):
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def t_from_log_snr(self, lam):
        # With u = alpha: exp(lambda/2) = u / (1 - u^2)  =>  c u^2 + u - c = 0, c = exp(lambda/2).
        lam = as_time(lam)
        c = jnp.exp(0.5 * lam)
        r = jnp.sqrt(1.0 + 4.0 * c * c)
        # B = -log(u^2) = -log(1 - u/c) = 2 log(1 + r) - log 4 - lambda; each form is accurate on one side.
        b_hi = -jnp.log1p(-2.0 / (1.0 + r))
        b_lo = 2.0 * jnp.log1p(r) - math.log(4.0) - lam
        return self._t_from_int_beta(jnp.where(lam > 0, b_hi, b_lo))

    def g2(self, t):
        return self.beta(t) * -jnp.expm1(-2.0 * self.int_beta(t))


@dataclasses.dataclass(frozen=True)
class Cosine(_VarPreserving):
    """Nichol & Dhariwal's cosine schedule in continuous time; t_max = 0.9946 as in DPM-Solver so
    that beta stays bounded."""

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    name = "cosine"

    def log_alpha(self, t):
        t = as_time(t)
        c = math.log(math.cos(math.pi / 2 * self.s / (1.0 + self.s)))
        return jnp.log(jnp.cos(math.pi / 2 * (t + self.s) / (1.0 + self.s))) - c

    def log_snr(self, t):
        return 2.0 * self.log_alpha(t) - jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    def t_from_log_snr(self, lam):
        log_alpha = _log_alpha_from_log_snr_vp(as_time(lam))
        c = math.log(math.cos(math.pi / 2 * self.s / (1.0 + self.s)))
        return 2.0 * (1.0 + self.s) / math.pi * jnp.arccos(jnp.exp(log_alpha + c)) - self.s

    def f(self, t):
        t = as_time(t)
        return -0.5 * math.pi / (1.0 + self.s) * jnp.tan(math.pi / 2 * (t + self.s) / (1.0 + self.s))


def ddpm_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The discrete beta_n of DDPM ('linear', Ho et al. 2020) or improved DDPM ('cosine', clipped at 0.999)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "cosine":
        s = 0.008
        tt = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        ab = np.cos((tt + s) / (1 + s) * np.pi / 2) ** 2
        return np.minimum(1.0 - ab[1:] / ab[:-1], 0.999)
    raise ValueError(f"unknown discrete beta schedule {kind!r}; expected 'linear' or 'cosine'")


@functools.lru_cache(maxsize=16)
def _ddpm_tables(kind: str, num_steps: int, beta_start: float, beta_end: float):
    """(t_n, log alpha_n) for n = 0..T-1, in float64 (computed once per schedule)."""
    log_alphas = 0.5 * np.cumsum(np.log1p(-ddpm_betas(kind, num_steps, beta_start, beta_end)))
    return np.arange(1, num_steps + 1, dtype=np.float64) / num_steps, log_alphas


@dataclasses.dataclass(frozen=True)
class DiscreteDDPM(_VarPreserving):
    """A T-step DDPM schedule made continuous: t_n = (n + 1)/T for n = 0..T-1, log alpha linearly
    interpolated in t (DPM-Solver's NoiseScheduleVP('discrete')), so every continuous-time sampler
    runs on a model trained with integer timesteps n = T t - 1 (see `timestep_index`)."""

    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    t_min: float = 1e-3
    t_max: float = 1.0
    name = "ddpm"

    def __post_init__(self):
        if self.t_min < 1.0 / self.num_steps - 1e-12:
            object.__setattr__(self, "t_min", 1.0 / self.num_steps)

    def _tables(self):
        ts, log_alphas = _ddpm_tables(self.beta_schedule, self.num_steps, self.beta_start, self.beta_end)
        dt = schedule_dtype()
        return jnp.asarray(ts, dt), jnp.asarray(log_alphas, dt)

    def betas(self) -> np.ndarray:
        return ddpm_betas(self.beta_schedule, self.num_steps, self.beta_start, self.beta_end)

    def log_alpha(self, t):
        ts, la = self._tables()
        t = as_time(t)
        # Linear interpolation with linear extrapolation outside the table (as DPM-Solver's interpolate_fn).
        i = jnp.clip(jnp.searchsorted(ts, t, side="right") - 1, 0, ts.shape[0] - 2)
        w = (t - ts[i]) / (ts[i + 1] - ts[i])
        return la[i] + w * (la[i + 1] - la[i])

    def t_from_log_snr(self, lam):
        ts, la = self._tables()
        log_alpha = _log_alpha_from_log_snr_vp(as_time(lam))
        # log alpha decreases in t: interpolate on the reversed table.
        x, y = la[::-1], ts[::-1]
        i = jnp.clip(jnp.searchsorted(x, log_alpha, side="right") - 1, 0, x.shape[0] - 2)
        w = (log_alpha - x[i]) / (x[i + 1] - x[i])
        return y[i] + w * (y[i + 1] - y[i])

    def timestep_index(self, t):
        """Continuous t -> the discrete model's (fractional) timestep n = T t - 1, in [0, T-1]."""
        return as_time(t) * self.num_steps - 1.0
