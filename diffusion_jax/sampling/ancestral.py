"""DDPM ancestral sampling on any grid and any linear Gaussian process (Ho et al. 2020; VDM's form).

For s < t, with alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
the forward posterior is

    q(x_s | x_t, x0) = N( (alpha_{t|s} sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x0,
                          sigma_{t|s}^2 sigma_s^2 / sigma_t^2 ),

and ancestral sampling draws x_s from it with x0 replaced by x0_hat = (x_t - sigma_t eps_hat) / alpha_t.
In terms of the log-SNR lambda, with r = exp(lambda_t - lambda_s) = alpha_{t|s}^2 sigma_s^2 / sigma_t^2 in (0, 1):

    sigma_{t|s}^2 / sigma_t^2 = 1 - r,      mean = r (alpha_s / alpha_t) x_t + (1 - r) alpha_s x0_hat,
    posterior variance = (1 - r) sigma_s^2,  'beta' variance (its upper bound) = (1 - r) sigma_t^2,

each 1 - r computed as -expm1(lambda_t - lambda_s). On the discrete DDPM grid (t_n = (n+1)/T) this is
exactly Ho et al.'s sampler: mean (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t), and
variance beta-tilde_t ('posterior') or beta_t ('beta').

Learned variance (improved DDPM, Nichol & Dhariwal 2021, `learn_sigma=True`): the network also outputs
v in roughly [-1, 1] and the step variance interpolates the two in log space,

    frac = (v + 1) / 2,    log var = frac log var_beta + (1 - frac) log var_post
                                   = log(1 - r) + frac log sigma_t^2 + (1 - frac) log sigma_s^2,

which holds for any VP or VE process and any respaced pair (t, s) (variance='learned_range').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.sampling.common import SamplerOutput, batch_time, step_noise, track_nonfinite

VARIANCES = ("posterior", "beta", "learned_range")


def state_dtype(x):
    """The solver-state dtype: float32 at least (float64 under x64 inputs), never bfloat16."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def posterior_coefs(process: Process, t, s):
    """q(x_s | x_t, x0) for s < t as (c_x, c_x0, var, var_beta): mean = c_x x_t + c_x0 x0, variance
    var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2, and var_beta = sigma_{t|s}^2 (the 'beta' choice)."""
    t, s = as_time(t), as_time(s)
    d = process.log_snr(t) - process.log_snr(s)
    r, one_minus_r = jnp.exp(d), -jnp.expm1(d)
    a_t, a_s = process.alpha(t), process.alpha(s)
    sig_t, sig_s = process.sigma(t), process.sigma(s)
    return r * a_s / a_t, one_minus_r * a_s, one_minus_r * sig_s ** 2, one_minus_r * sig_t ** 2


def learned_range_log_variance(v, log_var_beta, log_var_post):
    """log var = frac log var_beta + (1 - frac) log var_post with frac = (v + 1) / 2 (improved DDPM's
    'learned_range'); v = -1 gives var_post exactly, v = +1 var_beta."""
    frac = (v + 1.0) / 2.0
    return log_var_post + frac * (log_var_beta - log_var_post)


def denoise(eps_fn, process: Process, x, t, cond, dtype, clip_x0: bool):
    """One denoiser call at the scalar time t: returns (x0_hat, eps_hat) in the state dtype. With clip_x0,
    x0_hat is clipped to [-1, 1] and eps_hat recomputed from it (as in the DDPM/DDIM reference code)."""
    return x0_eps_from_eps(process, x, t, eps_fn(x, batch_time(t, x), cond), dtype, clip_x0)


def x0_eps_from_eps(process: Process, x, t, eps, dtype, clip_x0: bool):
    """(x0_hat, eps_hat) from a denoiser output eps at the scalar time t: x0_hat = (x - sigma_t eps) /
    alpha_t, optionally clipped to [-1, 1] with eps_hat recomputed from it."""
    eps = jnp.asarray(eps).astype(dtype)
    a_t, s_t = process.alpha(t), process.sigma(t)
    x0 = (x - s_t * eps) / a_t
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - a_t * x0) / s_t
    return x0, eps


def ancestral(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None, variance: str = "posterior",
              noise_final: bool = False, clip_x0: bool = False) -> SamplerOutput:
    """DDPM ancestral sampling: x_{i+1} ~ q(x_{t_{i+1}} | x_{t_i}, x0_hat) on the decreasing grid ts.

        x_s = r (alpha_s / alpha_t) x_t + (1 - r) alpha_s x0_hat + std z,   r = exp(lambda_t - lambda_s),
        std^2 = (1 - r) sigma_s^2 ('posterior', beta-tilde) or (1 - r) sigma_t^2 ('beta'), or
        std^2 = exp(frac log var_beta + (1 - frac) log var_post), frac = (v + 1)/2 ('learned_range').

    With variance='learned_range', eps_fn(x, t, cond) must return the pair (eps, v), both shaped like x
    (e.g. `objectives.learned_variance_pair_fn` of a 2C-channel network); the step variance is then
    per element. The last step adds no noise unless noise_final=True. Injected noise has shape
    (N, *x.shape). NFE = N.

    Ho et al.'s sampler (p_sample_loop) adds noise at every step n -> n - 1 and returns x0_hat at n = 0
    (the posterior mean at t = 1 -> 0 is x0_hat since alpha-bar_{-1} = 1): that is this sampler with
    noise_final=True on t = (n + 1)/T followed by the x0 step, which `sample(..., denoise_final=True)`
    does (it sets noise_final=True); improved DDPM's respaced sampler the same on a respaced grid.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown ancestral variance {variance!r}; expected one of {VARIANCES}")
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    noise = None if noise is None else jnp.asarray(noise, dtype)
    ts = as_time(ts)
    process.check_t(ts, "sampler grid ts")
    n = ts.shape[0] - 1

    def step(carry, inp):
        x, bad = carry
        i, t, s = inp
        c_x, c_x0, var, var_beta = posterior_coefs(process, t, s)
        if variance == "learned_range":
            eps, v = _eps_and_v(eps_fn, x, t, cond)
            x0, _ = x0_eps_from_eps(process, x, t, eps, dtype, clip_x0)
            log_var = learned_range_log_variance(v.astype(dtype), jnp.log(var_beta), jnp.log(var))
            std = jnp.exp(0.5 * log_var)
        else:
            x0, _ = denoise(eps_fn, process, x, t, cond, dtype, clip_x0)
            std = jnp.sqrt(var if variance == "posterior" else var_beta)
        if not noise_final:
            std = jnp.where(i == n - 1, 0.0, std)
        z = step_noise(key, noise, i, x.shape, dtype)
        x = (c_x * x + c_x0 * x0 + std * z).astype(dtype)
        return (x, track_nonfinite(bad, i, x)), None

    init = (x, jnp.asarray(-1, jnp.int32))
    (x, bad), _ = jax.lax.scan(step, init, (jnp.arange(n), ts[:-1], ts[1:]))
    return SamplerOutput(x, n, bad)


def _eps_and_v(eps_fn, x, t, cond):
    out = eps_fn(x, batch_time(t, x), cond)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"variance='learned_range' needs eps_fn to return the pair (eps, v) shaped like x "
                         f"{tuple(x.shape)}, got {got}; wrap a 2C-channel network with "
                         f"objectives.learned_variance_pair_fn")
    eps, v = out
    if tuple(eps.shape) != tuple(x.shape) or tuple(v.shape) != tuple(x.shape):
        raise ValueError(f"variance='learned_range': eps and v must be shaped like x {tuple(x.shape)}, "
                         f"got {tuple(eps.shape)} and {tuple(v.shape)}")
    return eps, v
