"""The forward-process interface shared by the whole library.

Every process here is a linear Gaussian diffusion with marginal

    q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I),

equivalently the Ito SDE  dx = f(t) x dt + g(t) dw  with

    f(t) = d log alpha / dt,        g(t)^2 = d sigma^2 / dt - 2 f(t) sigma(t)^2,

and log-SNR  lambda(t) = log(alpha^2 / sigma^2), which decreases in t. A process is a frozen
(hashable) dataclass of Python floats whose methods are pure jnp functions of arrays: it can be
closed over or passed as a static argument to `jax.jit`. All schedule arithmetic is float32 (or
float64 under x64), whatever the network's compute dtype.

Subclasses define `log_alpha(t)` and `sigma(t)` (or override `log_snr`/`t_from_log_snr` with closed
forms); drift and diffusion default to forward-mode derivatives (`jax.jvp`, as VDM does for
d gamma / dt) and are overridden where a closed form is cheaper.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def schedule_dtype():
    """float64 when x64 is enabled, else float32 (never the network's bfloat16)."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def as_time(t) -> Array:
    """Casts a time (scalar or per-example vector) to the schedule dtype."""
    return jnp.asarray(t, dtype=schedule_dtype())


def bcast(a: Array, x: Array) -> Array:
    """Reshapes a scalar or per-example vector `a` (B,) to broadcast against x (B, ...)."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _is_concrete(t) -> bool:
    return not isinstance(t, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class Process:
    """Base class: x_t = alpha(t) x_0 + sigma(t) eps on t in [t_min, t_max]."""

    t_min: float
    t_max: float

    name = "process"
    # True for processes whose prior at t_max is N(0, I) (VP family); False for N(0, sigma_max^2 I).
    variance_preserving = True

    # --- marginal ---------------------------------------------------------------------------
    def log_alpha(self, t) -> Array:
        raise NotImplementedError

    def sigma(self, t) -> Array:
        raise NotImplementedError

    def alpha(self, t) -> Array:
        return jnp.exp(self.log_alpha(t))

    def log_sigma(self, t) -> Array:
        return jnp.log(self.sigma(t))

    def log_snr(self, t) -> Array:
        """lambda(t) = log(alpha(t)^2 / sigma(t)^2)."""
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def t_from_log_snr(self, lam) -> Array:
        """Inverse of `log_snr` (closed form in every subclass)."""
        raise NotImplementedError

    def marginal_prob(self, x0: Array, t) -> tuple[Array, Array]:
        """Mean alpha(t) x0 and std sigma(t) of q(x_t | x_0) (score_sde's `marginal_prob`)."""
        t = as_time(t)
        return bcast(self.alpha(t), x0) * x0, bcast(self.sigma(t), x0)

    def add_noise(self, x0: Array, eps: Array, t) -> Array:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        mean, std = self.marginal_prob(x0, t)
        return mean + std * eps

    # --- SDE ----------------------------------------------------------------------------------
    def f(self, t) -> Array:
        """Drift coefficient f(t) = d log alpha / dt (the drift is f(t) x)."""
        t = as_time(t)
        return jax.jvp(self.log_alpha, (t,), (jnp.ones_like(t),))[1]

    def g2(self, t) -> Array:
        """Squared diffusion g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2."""
        t = as_time(t)
        var, dvar = jax.jvp(lambda s: self.sigma(s) ** 2, (t,), (jnp.ones_like(t),))
        return dvar - 2.0 * self.f(t) * var

    def g(self, t) -> Array:
        return jnp.sqrt(self.g2(t))

    def drift(self, x: Array, t) -> Array:
        return bcast(self.f(t), x) * x

    def diffusion(self, t) -> Array:
        return self.g(t)

    def sde(self, x: Array, t) -> tuple[Array, Array]:
        """(drift f(t) x, diffusion g(t)) of the forward SDE, as in score_sde."""
        return self.drift(x, t), self.diffusion(t)

    # --- prior --------------------------------------------------------------------------------
    def prior_std(self) -> float:
        """Std of the prior N(0, s^2 I) at t_max: 1 (VP family) or sigma(t_max) (VE family)."""
        if self.variance_preserving:
            return 1.0
        with jax.ensure_compile_time_eval():  # a Python float even when called under jit
            return float(self.sigma(jnp.float32(self.t_max)))

    def prior_sample(self, key, shape, dtype=jnp.float32) -> Array:
        return self.prior_std() * jax.random.normal(key, shape, dtype)

    def prior_logp(self, x: Array) -> Array:
        """log N(x; 0, s^2 I) summed over all but the leading (batch) axis."""
        s = self.prior_std()
        d = np.prod(x.shape[1:])
        sq = jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=-1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - 0.5 * sq / (s * s)

    # --- helpers ------------------------------------------------------------------------------
    def edm_sigma(self, t) -> Array:
        """sigma / alpha: the noise level of x_t / alpha(t) (EDM's sigma, Karras et al. 2022)."""
        return jnp.exp(-0.5 * self.log_snr(t))

    def t_from_edm_sigma(self, s) -> Array:
        return self.t_from_log_snr(-2.0 * jnp.log(as_time(s)))

    def check_t(self, t, what: str = "t") -> None:
        """Raises ValueError if a concrete t lies outside [t_min, t_max] (no-op under tracing)."""
        if not _is_concrete(t):
            return
        arr = np.asarray(t, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} must be finite, got {arr}")
        lo, hi = float(arr.min()), float(arr.max())
        tol = 1e-6 * max(1.0, abs(self.t_max))
        if lo < self.t_min - tol or hi > self.t_max + tol:
            raise ValueError(
                f"{what} outside the time range of {self.describe()}: got values in [{lo:g}, {hi:g}], "
                f"allowed [{self.t_min:g}, {self.t_max:g}]"
            )

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"
