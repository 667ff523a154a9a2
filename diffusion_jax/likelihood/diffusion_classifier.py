"""Zero-shot classification with a class-conditional diffusion model (Li et al. 2023, "Your diffusion
model is secretly a zero-shot classifier"; Clark & Jaini 2023).

The model's conditional ELBO ranks the classes: with x_t = alpha_t x + sigma_t eps,

    E_c(x) = E_{t, eps} w(t) ||eps - eps_hat(x_t, t, c)||^2,      c_hat(x) = argmin_c E_c(x),

    w(t) = 1                       weighting='none' (the paper's choice: uniform t, plain eps error)
    w(t) = -1/2 d log SNR / dt     weighting='elbo' (then E_c(x) = -ELBO_c(x) + const, nats; the
                                   argmin is the Bayes classifier under a uniform class prior when
                                   eps_hat is exact)

normalised as an average over t ~ U[t_min, t_max] (so 'elbo' gives (t_max - t_min) E_c = -ELBO_c +
const), estimated with `num_samples` draws of (t, eps) per image, SHARED by all classes (the paper's
variance reduction: the classes are compared on the same noise), stratified: over t for 'none', over
log SNR for 'elbo' (importance sampling that removes the 1/t spike of the weight). One jitted
`lax.scan` over the draws; each step evaluates the denoiser once on the batch tiled over the K classes.

    pred, errors = diffusion_classify(eps_fn, process, x, key, num_classes=10, num_samples=64)
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, bcast

WEIGHTINGS = ("none", "elbo")

__all__ = ["WEIGHTINGS", "class_errors", "diffusion_classify", "label_cond"]


def label_cond(labels, cond):
    """The default cond_fn: {**cond, 'label': labels}."""
    return {**(cond or {}), "label": labels}


@functools.partial(jax.jit, static_argnames=("eps_fn", "process", "num_classes", "num_samples",
                                             "weighting", "cond_fn"))
def _errors(eps_fn, process, x, key, cond, t_lo, t_hi, num_classes, num_samples, weighting, cond_fn):
    b = x.shape[0]
    k = num_classes
    labels = jnp.repeat(jnp.arange(k, dtype=jnp.int32), b)                  # (K B,) class-major
    dim = x[0].size

    lam_hi, lam_lo = process.log_snr(jnp.float32(t_lo)), process.log_snr(jnp.float32(t_hi))

    def step(acc, i):
        kt, ke = jax.random.split(jax.random.fold_in(key, i))
        u = (i + jax.random.uniform(kt, (b,))) / num_samples                 # stratified per image
        if weighting == "none":
            t, w = t_lo + (t_hi - t_lo) * u, jnp.ones((b,), jnp.float32)
        else:     # uniform in log-SNR: -1/2 lambda'(t) dt = 1/2 d lambda, no 1/t spike near t = 0
            t = jnp.clip(process.t_from_log_snr(lam_hi + (lam_lo - lam_hi) * u), t_lo, t_hi)
            w = jnp.full((b,), 0.5 * (lam_hi - lam_lo) / (t_hi - t_lo), jnp.float32)
        eps = jax.random.normal(ke, x.shape, jnp.float32)
        x_t = bcast(process.alpha(t), x) * x + bcast(process.sigma(t), x) * eps
        tile = lambda a: jnp.tile(a, (k,) + (1,) * (a.ndim - 1))
        out = eps_fn(tile(x_t), tile(t), cond_fn(labels, cond)).astype(jnp.float32)
        err = jnp.sum(jnp.square(out - tile(eps)).reshape(k, b, -1), axis=-1) / dim   # (K, B)
        return acc + w[None] * err, None

    total, _ = jax.lax.scan(step, jnp.zeros((k, b), jnp.float32), jnp.arange(num_samples))
    return (total / num_samples).T                                          # (B, K)


def class_errors(eps_fn: Callable, process: Process, x, key, *, num_classes: int, num_samples: int = 64,
                 weighting: str = "none", t_min: Optional[float] = None, t_max: Optional[float] = None,
                 cond=None, cond_fn: Callable = None) -> jax.Array:
    """E_c(x) (B, K) of the module docstring (per dimension, i.e. divided by the size of one x).

    eps_fn(x, t, c) is the class-conditional denoiser, called on the batch tiled over the classes
    (K B examples, class-major) with c = cond_fn(labels (K B,), cond): by default
    {**cond, 'label': labels}. `cond` is traced (e.g. {'params': params}: one compilation for every
    parameter set); cond_fn is static (define it once, at module level).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if int(num_classes) < 2 or int(num_samples) < 1:
        raise ValueError(f"need num_classes >= 2 and num_samples >= 1, got {num_classes} and {num_samples}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    lo = float(process.t_min if t_min is None else t_min)
    hi = float(process.t_max if t_max is None else t_max)
    if not process.t_min <= lo < hi <= process.t_max:
        raise ValueError(f"need {process.t_min} <= t_min < t_max <= {process.t_max}, got [{lo}, {hi}]")
    return _errors(eps_fn, process, x, key, cond, lo, hi, int(num_classes), int(num_samples),
                   weighting, cond_fn or label_cond)


def diffusion_classify(eps_fn: Callable, process: Process, x, key, *, num_classes: int,
                       num_samples: int = 64, **kwargs):
    """(predicted classes (B,) int32, errors (B, K)): c_hat = argmin_c E_c(x) (`class_errors`)."""
    errors = class_errors(eps_fn, process, x, key, num_classes=num_classes, num_samples=num_samples, **kwargs)
    return jnp.argmin(errors, axis=-1).astype(jnp.int32), errors
