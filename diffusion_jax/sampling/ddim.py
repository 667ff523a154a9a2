"""DDIM (Song, Meng & Ermon 2021) with eta, and deterministic DDIM inversion.

A step from t to s < t, with x0_hat = (x_t - sigma_t eps_hat) / alpha_t, is

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,     c = eta sqrt((1 - r) sigma_s^2),

r = exp(lambda_t - lambda_s), i.e. c^2 = eta^2 times the DDPM posterior variance (see `ancestral`):
eta = 1 is ancestral sampling, eta = 0 the deterministic sampler. At eta = 0 the step is the
exponential-integrator (DPM-Solver-1) step of the probability-flow ODE in lambda, written as

    x_s = (alpha_s / alpha_t) x_t - sigma_s expm1(h) eps_hat(x_t, t),     h = (lambda_s - lambda_t) / 2 > 0,

and `ddim_invert` runs the same map backwards, from ts[-1] up to ts[0]:

    x_t = (alpha_t / alpha_s) (x_s + sigma_s expm1(h) eps_hat),

with eps_hat = eps(x_s, s) (plain inversion), then `num_fixed_point_iters` re-evaluations
eps_hat = eps(x_t, t) at the current x_t. The fixed point is the exact inverse of the sampler step,
so the round trip x0 -> x_T -> x0 becomes exact as the iterations converge (the plain inversion is off
by O(step) per step, the familiar "DDIM inversion is not exact").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.sampling.ancestral import denoise, posterior_coefs, state_dtype
from diffusion_jax.sampling.common import SamplerOutput, batch_time, step_noise, track_nonfinite


def _is_zero(eta) -> bool:
    return isinstance(eta, (int, float)) and eta == 0


def _half_step(process: Process, t, s):
    """(alpha_s / alpha_t, sigma_s, expm1(h)) with h = (lambda_s - lambda_t) / 2."""
    t, s = as_time(t), as_time(s)
    ratio = jnp.exp(process.log_alpha(s) - process.log_alpha(t))
    return ratio, process.sigma(s), jnp.expm1(0.5 * (process.log_snr(s) - process.log_snr(t)))


def ddim(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None, eta=0.0, noise_final: bool = False,
         clip_x0: bool = False) -> SamplerOutput:
    """DDIM on the decreasing grid ts: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

    eta = 0 (a Python 0) is deterministic and ignores key/noise; eta > 0 needs key or injected noise
    (N, *x.shape), and the last step drops c z unless noise_final=True (so eta = 1 is `ancestral`).
    eta > 1 clamps sigma_s^2 - c^2 at 0. NFE = N.
    """
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    noise = None if noise is None else jnp.asarray(noise, dtype)
    ts = as_time(ts)
    process.check_t(ts, "sampler grid ts")
    n = ts.shape[0] - 1
    deterministic = _is_zero(eta)

    def step(carry, inp):
        x, bad = carry
        i, t, s = inp
        x0, eps = denoise(eps_fn, process, x, t, cond, dtype, clip_x0)
        if deterministic:
            ratio, sig_s, em1 = _half_step(process, t, s)
            x = ratio * x - sig_s * em1 * eps
        else:
            _, _, var, _ = posterior_coefs(process, t, s)
            c2 = eta ** 2 * var
            c = jnp.sqrt(c2)
            if not noise_final:
                c = jnp.where(i == n - 1, 0.0, c)
            z = step_noise(key, noise, i, x.shape, dtype)
            x = process.alpha(s) * x0 + jnp.sqrt(jnp.maximum(process.sigma(s) ** 2 - c2, 0.0)) * eps + c * z
        x = x.astype(dtype)
        return (x, track_nonfinite(bad, i, x)), None

    init = (x, jnp.asarray(-1, jnp.int32))
    (x, bad), _ = jax.lax.scan(step, init, (jnp.arange(n), ts[:-1], ts[1:]))
    return SamplerOutput(x, n, bad)


def ddim_invert(eps_fn, process: Process, x0, ts, *, cond=None, key=None, noise=None,
                num_fixed_point_iters: int = 0) -> SamplerOutput:
    """Deterministic DDIM inversion: maps x0 (the state at ts[-1]) up the grid to x at ts[0].

    Step k (k = 0..N-1) goes from s = ts[N-k] up to t = ts[N-k-1]:
        x_t = (alpha_t / alpha_s) (x_s + sigma_s expm1(h) eps_hat),   h = (lambda_s - lambda_t) / 2,
    eps_hat = eps(x_s, s), then num_fixed_point_iters times eps_hat = eps(x_t, t) with x_t recomputed:
    the fixed point inverts the eta = 0 `ddim` step exactly. key/noise are ignored.
    NFE = N (1 + num_fixed_point_iters); nonfinite_step counts steps k in this (upward) order.
    """
    if not isinstance(num_fixed_point_iters, int) or num_fixed_point_iters < 0:
        raise ValueError(f"num_fixed_point_iters must be a non-negative int, got {num_fixed_point_iters!r}")
    dtype = state_dtype(x0)
    x = jnp.asarray(x0, dtype)
    ts = as_time(ts)
    process.check_t(ts, "sampler grid ts")
    n = ts.shape[0] - 1

    def eps_at(y, t):
        return eps_fn(y, batch_time(t, y), cond).astype(dtype)

    def step(carry, inp):
        x_s, bad = carry
        k, s, t = inp
        ratio, sig_s, em1 = _half_step(process, t, s)  # ratio = alpha_s / alpha_t

        def up(eps):
            return ((x_s + sig_s * em1 * eps) / ratio).astype(dtype)

        x_t = up(eps_at(x_s, s))
        if num_fixed_point_iters:
            x_t = jax.lax.fori_loop(0, num_fixed_point_iters, lambda _, y: up(eps_at(y, t)), x_t)
        return (x_t, track_nonfinite(bad, k, x_t)), None

    rev = ts[::-1]
    init = (x, jnp.asarray(-1, jnp.int32))
    (x, bad), _ = jax.lax.scan(step, init, (jnp.arange(n), rev[:-1], rev[1:]))
    return SamplerOutput(x, n * (1 + num_fixed_point_iters), bad)
