"""LSGM (Vahdat, Kreis, Kautz 2021): a score-based prior on a VAE's latents, as pure functions.

Mixed score (Sec. 3.2). With the Normal prior p(z0) = N(0, I), z_t ~ N(0, (alpha_t^2 + sigma_t^2) I),
whose eps is sigma_t z_t / (alpha_t^2 + sigma_t^2) (= sigma_t z_t on a VP process). The prior network
predicts only the residual:

    eps_theta(z_t, t) = sigma_t (1 - a) z_t / (alpha_t^2 + sigma_t^2) + a eps'_theta(z_t, t),
    a = sigmoid(mixing_logit)  (one learnable logit per latent dimension);

on a VP process this is the paper's eps_theta = sigma_t (1 - a) z_t + a eps'_theta.

Cross entropy (Theorem 1 / eq. 6 with the eps parameterisation). For z0 ~ q(z0|x),
z_t = alpha_t z0 + sigma_t eps, and a prior p whose time-t marginals have score -eps_theta/sigma_t:

    CE(q(z_eps|x) || p(z_eps)) = int_eps^T g^2/(2 sigma^2) E ||eps - eps_theta(z_t, t)||^2 dt
                                 + D/2 log(2 pi e sigma_eps^2)                      (*)
                               = E_{t~r} [ Z/2 ||eps - eps_theta||^2 ] + D/2 log(2 pi e sigma_eps^2),

with r(t) = (g^2/sigma^2)/Z the likelihood importance distribution, Z = lambda(eps) - lambda(T)
(`objectives.time_sampling.likelihood_importance_time`; its weight w makes the uniform-t estimator
(T - eps) w g^2/(2 sigma^2) ||.||^2). (*) is exact up to the terminal gap
CE(q_T || p_T) - D/2 log(2 pi e sigma_T^2), which vanishes when q_T = p_T = N(0, sigma_T^2 I)
(derivation: d/dt CE(q_t || p_t) = -g^2/2 E||s_q(z_t|z0) - s_p||^2 + (D/2) d log sigma_t^2/dt for
any linear process; integrate from eps to T).

    mixed_score_eps(eps_prime, z_t, t, mixing_logit, process)
    cross_entropy_constant(process, dim)         D/2 log(2 pi e sigma^2(t_min))
    lsgm_cross_entropy(eps_fn, process, z0, key)  per-example estimate of (*) (B,), for the VAE update
    lsgm_prior_loss(eps_fn, process, z0, key, weighting)   the prior update (z0 held fixed):
        'likelihood' the same estimate;  'eps' ||eps - eps_theta||^2 with t ~ U (the paper's
        re-weighted objective for the prior, better samples)

eps_fn(z_t, t) -> eps_theta (z_t shape), t (B,). Maths layer: jax only.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.time_sampling import likelihood_importance_time, uniform_time
from diffusion_jax.processes.base import Process, as_time, bcast

Array = jax.Array

LSGM_TIME_SAMPLINGS = ("importance", "uniform")
LSGM_PRIOR_WEIGHTINGS = ("likelihood", "eps")


def mixing_coefficient(mixing_logit) -> Array:
    """a = sigmoid(mixing_logit), per latent dimension, in (0, 1)."""
    return jax.nn.sigmoid(jnp.asarray(mixing_logit, jnp.float32))


def normal_prior_eps(z_t, t, process: Process) -> Array:
    """eps of the Normal prior's diffused marginal N(0, (alpha_t^2 + sigma_t^2) I):
    sigma_t z_t / (alpha_t^2 + sigma_t^2)."""
    t = as_time(t)
    a, s = process.alpha(t), process.sigma(t)
    return (bcast(s / (a * a + s * s), z_t) * z_t).astype(jnp.float32)


def mixed_score_eps(eps_prime, z_t, t, mixing_logit, process: Process) -> Array:
    """eps_theta = (1 - a) normal_prior_eps(z_t, t) + a eps'_theta, a = sigmoid(mixing_logit)
    (broadcast over the batch: one logit per latent dimension)."""
    eps_prime = jnp.asarray(eps_prime, jnp.float32)
    if eps_prime.shape != jnp.shape(z_t):
        raise ValueError(f"eps_prime shape {eps_prime.shape} does not match z_t {jnp.shape(z_t)}")
    a = mixing_coefficient(mixing_logit)
    if a.ndim and a.shape != tuple(jnp.shape(z_t)[-a.ndim:]):
        raise ValueError(f"mixing_logit shape {a.shape} must match the latent dimensions "
                         f"{tuple(jnp.shape(z_t)[1:])} (or their trailing axes)")
    return (1.0 - a) * normal_prior_eps(z_t, t, process) + a * eps_prime


def cross_entropy_constant(process: Process, dim: int) -> Array:
    """D/2 log(2 pi e sigma^2(t_min)): the CE of the Normal marginal at the lowest time."""
    s2 = process.sigma(as_time(process.t_min)) ** 2
    return 0.5 * dim * (math.log(2.0 * math.pi) + 1.0 + jnp.log(s2))


def _time(process, key, batch, time_sampling):
    if time_sampling not in LSGM_TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; expected one of {LSGM_TIME_SAMPLINGS}")
    if time_sampling == "importance":
        return likelihood_importance_time(process, key, batch, discrete=False)
    return uniform_time(process, key, batch, discrete=False)


def _denoising_sq(eps_fn, process, z0, key, time_sampling):
    """(t, weight, ||eps - eps_fn(z_t, t)||^2 per example, z_t, eps)."""
    z0 = jnp.asarray(z0, jnp.float32)
    if z0.ndim < 2:
        raise ValueError(f"z0 must be (batch, ...latent dims), got shape {z0.shape}")
    kt, ke = jax.random.split(key)
    ts = _time(process, kt, z0.shape[0], time_sampling)
    eps = jax.random.normal(ke, z0.shape, jnp.float32)
    z_t = process.add_noise(z0, eps, ts.t).astype(jnp.float32)
    pred = jnp.asarray(eps_fn(z_t, ts.t), jnp.float32)
    if pred.shape != z0.shape:
        raise ValueError(f"eps_fn returned shape {pred.shape}, expected the latent shape {z0.shape}")
    sq = jnp.sum(jnp.square(eps - pred).reshape(z0.shape[0], -1), axis=-1)
    return ts, sq


def lsgm_cross_entropy(eps_fn, process: Process, z0, key, *, time_sampling: str = "importance"
                       ) -> tuple[Array, dict]:
    """Per-example estimate (B,) of CE(q(z|x) || p(z)) by (*): (T - eps) w g^2/(2 sigma^2) ||eps -
    eps_theta||^2 + D/2 log(2 pi e sigma_eps^2), t from `time_sampling` ('importance': r(t) as above,
    the weighted term is Z/2 ||.||^2; 'uniform'). Gradients reach z0 (the encoder) and eps_fn."""
    ts, sq = _denoising_sq(eps_fn, process, z0, key, time_sampling)
    t = ts.t
    lam_rate = process.g2(t) / process.sigma(t) ** 2
    w = (process.t_max - process.t_min) * ts.weight * lam_rate * 0.5
    dim = int(math.prod(jnp.shape(z0)[1:]))
    ce = w.astype(jnp.float32) * sq + cross_entropy_constant(process, dim).astype(jnp.float32)
    return ce, {"t": t, "sq_err": sq}


def lsgm_prior_loss(eps_fn, process: Process, z0, key, *, weighting: str = "likelihood"
                    ) -> tuple[Array, dict]:
    """The prior's update on latents z0 held fixed (stop-gradient): 'likelihood' the mean of
    `lsgm_cross_entropy` (importance-sampled t); 'eps' the mean of ||eps - eps_theta||^2, t ~ U."""
    if weighting not in LSGM_PRIOR_WEIGHTINGS:
        raise ValueError(f"unknown prior weighting {weighting!r}; expected one of {LSGM_PRIOR_WEIGHTINGS}")
    z0 = jax.lax.stop_gradient(jnp.asarray(z0, jnp.float32))
    if weighting == "likelihood":
        ce, aux = lsgm_cross_entropy(eps_fn, process, z0, key)
        return jnp.mean(ce), aux
    ts, sq = _denoising_sq(eps_fn, process, z0, key, "uniform")
    return jnp.mean(sq), {"t": ts.t, "sq_err": sq}
