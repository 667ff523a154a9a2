"""Reverse-SDE samplers: Euler-Maruyama, and score_sde's predictor-corrector (Song et al. 2021, Alg. 2/3).

The reverse-time SDE of dx = f(t) x dt + g(t) dw is

    dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar,       score = -eps / sigma(t),

integrated from ts[0] down to ts[-1]. The reverse-diffusion predictor discretises it with the forward
process's own one-step transition between grid times s < t,

    x_t = a x_s + sqrt(v) z,    a = alpha_t / alpha_s,    v = sigma_t^2 - a^2 sigma_s^2 = (1 - r) sigma_t^2,

(r = exp(lambda_t - lambda_s)), read as x_t = x_s + f_i + G_i z with f_i = (a - 1) x, G_i = sqrt(v), and
reversed as x_s = x_t - f_i + G_i^2 score + G_i z. That is score_sde's ReverseDiffusionPredictor: for VP,
a = sqrt(1 - beta_i) and v = beta_i; for VE, a = 1 and v = sigma_t^2 - sigma_s^2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.sampling.ancestral import state_dtype
from diffusion_jax.sampling.common import SamplerOutput, batch_time, step_noise, track_nonfinite

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


def _score(eps_fn, process, x, t, cond, dtype):
    eps = eps_fn(x, batch_time(t, x), cond).astype(dtype)
    return -eps / process.sigma(t)


def _transition(process: Process, t, s):
    """(a, v) of the forward one-step transition x_t = a x_s + sqrt(v) z between grid times s < t."""
    a = jnp.exp(process.log_alpha(t) - process.log_alpha(s))
    v = -jnp.expm1(process.log_snr(t) - process.log_snr(s)) * process.sigma(t) ** 2
    return a, v


def _euler_maruyama_step(process, x, score, t, s, z, noise_scale):
    """x_s = x_t + [f(t) x_t - g(t)^2 score] (s - t) + g(t) sqrt(t - s) z."""
    dt = s - t
    drift = process.f(t) * x - process.g2(t) * score
    return x + drift * dt + noise_scale * process.g(t) * jnp.sqrt(-dt) * z


def _reverse_diffusion_step(process, x, score, t, s, z, noise_scale):
    """x_s = x_t - (a - 1) x_t + v score + sqrt(v) z    (a, v of the forward transition s -> t)."""
    a, v = _transition(process, t, s)
    return (2.0 - a) * x + v * score + noise_scale * jnp.sqrt(v) * z


def _per_example_norm(y):
    return jnp.sqrt(jnp.sum(jnp.reshape(y, (y.shape[0], -1)) ** 2, axis=-1))


def euler_maruyama(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None,
                   noise_final: bool = False) -> SamplerOutput:
    """Euler-Maruyama in t on the reverse SDE:

        x_s = x_t + [f(t) x_t + g(t)^2 eps_hat / sigma_t] (s - t) + g(t) sqrt(t - s) z.

    The last step adds no noise unless noise_final=True. Injected noise: (N, *x.shape). NFE = N.
    """
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    noise = None if noise is None else jnp.asarray(noise, dtype)
    ts = as_time(ts)
    process.check_t(ts, "sampler grid ts")
    n = ts.shape[0] - 1

    def step(carry, inp):
        x, bad = carry
        i, t, s = inp
        score = _score(eps_fn, process, x, t, cond, dtype)
        z = step_noise(key, noise, i, x.shape, dtype)
        scale = 1.0 if noise_final else jnp.where(i == n - 1, 0.0, 1.0)
        x = _euler_maruyama_step(process, x, score, t, s, z, scale).astype(dtype)
        return (x, track_nonfinite(bad, i, x)), None

    (x, bad), _ = jax.lax.scan(step, (x, jnp.asarray(-1, jnp.int32)), (jnp.arange(n), ts[:-1], ts[1:]))
    return SamplerOutput(x, n, bad)


def predictor_corrector(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None,
                        predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
                        n_corrector_steps: int = 1, langevin_norm: str = "batch",
                        noise_final: bool = False) -> SamplerOutput:
    """score_sde's PC sampler: at each grid step t = ts[i] -> s = ts[i+1], first n_corrector_steps
    Langevin corrector steps at t, then one predictor step from t to s.

    Langevin (score_sde's LangevinCorrector):
        step = 2 alpha_i (snr ||z|| / ||score||)^2,    x <- x + step score(x, t) + sqrt(2 step) z,
    with alpha_i = a^2 = (alpha_t / alpha_s)^2 (score_sde's 1 - beta_i for VP; 1 for VE). The norms are
    per example; langevin_norm='batch' (default, score_sde's code without its pmean) uses their means over
    the batch, one step size for all; 'example' gives each sample its own step size. The latter is
    biased: a step size that depends on the state through ||score(x)|| changes the chain's stationary
    law (measured: the covariance error of an 8-D mixture grows with N instead of shrinking).
    Predictors: 'reverse_diffusion' (module docstring), 'euler_maruyama' (see `euler_maruyama`), or
    'none' (annealed Langevin: the corrector then runs at s = ts[i+1], so x ends at ts[-1]).
    The predictor adds no noise on the last step unless noise_final=True (score_sde's noise removal).
    Injected noise: (N, K + 1, *x.shape) with K the corrector steps run (n_corrector_steps, or 0 for
    corrector='none'): slots k < K for the corrector steps, slot K for the predictor.
    NFE = N (1 + n_corrector_steps), less N if predictor='none' and N n_corrector_steps if corrector='none'.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; expected one of {PREDICTORS}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; expected one of {CORRECTORS}")
    if langevin_norm not in ("example", "batch"):
        raise ValueError(f"langevin_norm must be 'example' or 'batch', got {langevin_norm!r}")
    if not isinstance(n_corrector_steps, int) or n_corrector_steps < 0:
        raise ValueError(f"n_corrector_steps must be a non-negative int, got {n_corrector_steps!r}")
    n_corr = n_corrector_steps if corrector == "langevin" else 0
    if predictor == "none" and n_corr == 0:
        raise ValueError("predictor='none' needs a corrector with n_corrector_steps >= 1")
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    noise = None if noise is None else jnp.asarray(noise, dtype)
    ts = as_time(ts)
    process.check_t(ts, "sampler grid ts")
    n = ts.shape[0] - 1

    def langevin(x, i, t, alpha_i):
        def one(k, x):
            score = _score(eps_fn, process, x, t, cond, dtype)
            z = step_noise(key, noise, i, x.shape, dtype, k=k)
            z_norm, s_norm = _per_example_norm(z), _per_example_norm(score)
            if langevin_norm == "batch":
                z_norm, s_norm = jnp.mean(z_norm), jnp.mean(s_norm)
            ratio = jnp.broadcast_to(snr * z_norm / jnp.maximum(s_norm, 1e-30), (x.shape[0],))
            size = (2.0 * alpha_i * ratio ** 2).reshape((-1,) + (1,) * (x.ndim - 1))
            return (x + size * score + jnp.sqrt(2.0 * size) * z).astype(dtype)

        return jax.lax.fori_loop(0, n_corr, one, x)

    def step(carry, inp):
        x, bad = carry
        i, t, s = inp
        a, _ = _transition(process, t, s)
        if predictor == "none":
            x = langevin(x, i, s, a ** 2)
        else:
            if n_corr:
                x = langevin(x, i, t, a ** 2)
            score = _score(eps_fn, process, x, t, cond, dtype)
            z = step_noise(key, noise, i, x.shape, dtype, k=n_corr)
            scale = 1.0 if noise_final else jnp.where(i == n - 1, 0.0, 1.0)
            update = _reverse_diffusion_step if predictor == "reverse_diffusion" else _euler_maruyama_step
            x = update(process, x, score, t, s, z, scale).astype(dtype)
        return (x, track_nonfinite(bad, i, x)), None

    (x, bad), _ = jax.lax.scan(step, (x, jnp.asarray(-1, jnp.int32)), (jnp.arange(n), ts[:-1], ts[1:]))
    nfe = n * ((predictor != "none") + n_corr)
    return SamplerOutput(x, nfe, bad)
