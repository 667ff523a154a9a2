"""Denoising diffusion GAN (Xiao, Kreis, Vahdat 2022): the T-step chain (T = 2..8), the DDPM posterior
that turns the generator's x0 into x_t, and the GAN losses.

Schedule (the official code's `get_sigma_schedule` with `var_func_vp`): on the grid
s_k = eps_small + (1 - eps_small) k / T, k = 0..T, eps_small = 1e-3,

    var(s) = 1 - exp(2 m(s)),  m(s) = -(beta_max - beta_min) s^2 / 4 - beta_min s / 2   (VP SDE)
    abar(s_k) = 1 - var(s_k),  beta_k = 1 - abar(s_k) / abar(s_{k-1})  (k = 1..T),  beta_0 = 1e-8
    (geometric: var(s) = beta_min (beta_max / beta_min)^s);  defaults beta_min 0.1, beta_max 20.

The forward chain (`Diffusion_Coefficients`): a_k = sqrt(1 - beta_k), sigma_k = sqrt(beta_k),
abar_k^{1/2} = prod_{j <= k} a_j (including beta_0),

    x_t = abar_t^{1/2} x0 + sqrt(1 - abar_t) n,   x_{t+1} = a_{t+1} x_t + sigma_{t+1} n'   (t = 0..T-1)

and the pair (x_t, x_{t+1}) is what the discriminator D(x_t, t, x_{t+1}) sees; t = 0 is the data
itself up to the 1e-8 of beta_0. The posterior (`Posterior_Coefficients`) uses beta_1..beta_T with
alphabar_t = prod_{j <= t+1} (1 - beta_j) (index t = 0..T-1) and alphabar_{-1} = 1:

    q(x_t | x_{t+1}, x0) = N(c1_t x0 + c2_t x_{t+1}, v_t),
    c1 = beta_{t+1} sqrt(alphabar_{t-1}) / (1 - alphabar_t),
    c2 = (1 - alphabar_{t-1}) sqrt(1 - beta_{t+1}) / (1 - alphabar_t),
    v  = beta_{t+1} (1 - alphabar_{t-1}) / (1 - alphabar_t)   (0 at t = 0: no noise in the last step).

Losses (non-saturating GAN, R1 on real data):
    D:  softplus(-D(x_t, t, x_{t+1})) + softplus(D(x'_t, t, x_{t+1}))   (x'_t: posterior sample of G's x0)
    G:  softplus(-D(x'_t, t, x_{t+1}))
    R1: gamma/2 E ||grad_{x_t} D(x_t, t, x_{t+1})||^2  at real x_t
Generation is `sampling.ddgan.ddgan_sample`. Maths layer: jax only.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes.base import bcast, schedule_dtype

Array = jax.Array

EPS_SMALL = 1e-3
FIRST_BETA = 1e-8


def _var_vp(s, beta_min, beta_max):
    m = -0.25 * s ** 2 * (beta_max - beta_min) - 0.5 * s * beta_min
    return -np.expm1(2.0 * m)


@functools.lru_cache(maxsize=32)
def ddgan_betas(num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0,
                geometric: bool = False) -> np.ndarray:
    """beta_0..beta_T (T + 1,) float64, beta_0 = 1e-8 (see the module docstring)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps (T) must be a positive integer, got {num_steps!r}")
    if not 0 < beta_min < beta_max:
        raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min!r}, beta_max={beta_max!r}")
    s = np.arange(num_steps + 1, dtype=np.float64) / num_steps * (1.0 - EPS_SMALL) + EPS_SMALL
    var = beta_min * (beta_max / beta_min) ** s if geometric else _var_vp(s, beta_min, beta_max)
    abar = 1.0 - var
    betas = 1.0 - abar[1:] / abar[:-1]
    out = np.concatenate([[FIRST_BETA], betas])
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class DDGANSchedule:
    """The T-step chain of DDGAN; tables in the schedule dtype (float32, float64 under x64)."""

    num_steps: int = 4
    beta_min: float = 0.1
    beta_max: float = 20.0
    geometric: bool = False

    def __post_init__(self):
        ddgan_betas(self.num_steps, self.beta_min, self.beta_max, self.geometric)   # validates

    def _np(self):
        b = ddgan_betas(self.num_steps, self.beta_min, self.beta_max, self.geometric)
        a_s = np.sqrt(1.0 - b)
        a_cum = np.cumprod(a_s)
        bp = b[1:]
        abar = np.cumprod(1.0 - bp)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        return {
            "betas": b, "a_s": a_s, "sigmas": np.sqrt(b), "a_cum": a_cum,
            "sigma_cum": np.sqrt(1.0 - a_cum ** 2),
            "post_c1": bp * np.sqrt(abar_prev) / (1.0 - abar),
            "post_c2": (1.0 - abar_prev) * np.sqrt(1.0 - bp) / (1.0 - abar),
            "post_var": bp * (1.0 - abar_prev) / (1.0 - abar),
        }

    def table(self, name: str) -> Array:
        return jnp.asarray(self._np()[name], schedule_dtype())

    def _check_t(self, t):
        if not isinstance(t, jax.core.Tracer):
            tt = np.asarray(t)
            if tt.size and (tt.min() < 0 or tt.max() > self.num_steps - 1):
                raise ValueError(f"t must lie in 0..{self.num_steps - 1} (T = {self.num_steps}), got {tt}")
        return jnp.asarray(t, jnp.int32)

    # ------------------------------------------------------------------ forward chain
    def q_sample(self, x0, t, noise) -> Array:
        """x_t = abar_t^{1/2} x0 + sqrt(1 - abar_t) noise (t = 0..T, per example)."""
        t = jnp.asarray(t, jnp.int32)
        a, s = self.table("a_cum")[t], self.table("sigma_cum")[t]
        return (bcast(a, x0) * x0 + bcast(s, x0) * noise).astype(jnp.result_type(x0, jnp.float32))

    def q_sample_pairs(self, x0, t, key) -> tuple[Array, Array]:
        """(x_t, x_{t+1}) for t = 0..T-1 (per example): x_{t+1} = a_{t+1} x_t + sigma_{t+1} n'."""
        t = self._check_t(t)
        k1, k2 = jax.random.split(key)
        x_t = self.q_sample(x0, t, jax.random.normal(k1, x0.shape, jnp.float32))
        a, s = self.table("a_s")[t + 1], self.table("sigmas")[t + 1]
        x_tp1 = bcast(a, x_t) * x_t + bcast(s, x_t) * jax.random.normal(k2, x0.shape, jnp.float32)
        return x_t, x_tp1.astype(x_t.dtype)

    # -------------------------------------------------------------------- posterior
    def posterior_mean_variance(self, x0, x_tp1, t) -> tuple[Array, Array]:
        """Mean c1_t x0 + c2_t x_{t+1} and variance v_t (broadcast to x) of q(x_t | x_{t+1}, x0)."""
        t = self._check_t(t)
        c1, c2, v = (self.table(n)[t] for n in ("post_c1", "post_c2", "post_var"))
        mean = bcast(c1, x0) * x0 + bcast(c2, x_tp1) * x_tp1
        return mean, jnp.broadcast_to(bcast(v, x_tp1), mean.shape)

    def sample_posterior(self, x0, x_tp1, t, key=None, *, noise=None) -> Array:
        """x_t ~ q(x_t | x_{t+1}, x0): mean + [t > 0] sqrt(max(v_t, 1e-20)) n, n from key (or noise)."""
        mean, var = self.posterior_mean_variance(x0, x_tp1, t)
        if noise is None:
            noise = jax.random.normal(key, mean.shape, jnp.float32)
        t = jnp.asarray(t, jnp.int32)
        mask = bcast((t != 0).astype(mean.dtype), mean)
        return (mean + mask * jnp.sqrt(jnp.maximum(var, 1e-20)) * noise).astype(jnp.float32)


# ----------------------------------------------------------------------------- GAN losses
def discriminator_loss(d_real, d_fake) -> Array:
    """Non-saturating discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return jnp.mean(jax.nn.softplus(-jnp.asarray(d_real, jnp.float32))) + \
        jnp.mean(jax.nn.softplus(jnp.asarray(d_fake, jnp.float32)))


def generator_loss(d_fake) -> Array:
    """Non-saturating generator loss: mean softplus(-D(fake)) = -mean log sigmoid(D(fake))."""
    return jnp.mean(jax.nn.softplus(-jnp.asarray(d_fake, jnp.float32)))


def r1_penalty(d_fn, x_real, *args, gamma: float = 0.05) -> Array:
    """R1 (Mescheder et al. 2018): gamma/2 mean_b ||grad_x D(x_b, *args)||^2 at real x, with d_fn
    returning per-example logits (B,) (or (B, 1)). DDGAN's CIFAR-10 setting: gamma 0.02 / 0.05."""
    if not gamma >= 0:
        raise ValueError(f"r1 gamma must be >= 0, got {gamma!r}")
    x_real = jnp.asarray(x_real, jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(d_fn(x, *args)))(x_real)
    sq = jnp.sum(jnp.square(grad).reshape(grad.shape[0], -1), axis=-1)
    return 0.5 * gamma * jnp.mean(sq)
