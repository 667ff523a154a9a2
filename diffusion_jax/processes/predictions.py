"""Conversions between what a denoiser predicts, and the library's one denoiser signature.

The signature of every sampler, objective wrapper and likelihood in the library is

    eps_fn(x, t, cond) -> eps          x: (B, ...), t: (B,) float32, cond: a pytree or None

With x = alpha x0 + sigma eps (alpha, sigma at t):
    score = -eps / sigma
    x0    = (x - sigma eps) / alpha
    v     = alpha eps - sigma x0                       (Salimans & Ho 2022)
    eps   = (sigma x + alpha v) / (alpha^2 + sigma^2)
    EDM   D(x / alpha, sigma / alpha) = x0             (Karras et al. 2022 denoiser on the scaled input)
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time, bcast

EpsFn = Callable[[Any, Any, Any], Any]
PREDICTIONS = ("eps", "score", "x0", "v", "edm")


def _coefs(process: Process, t, x):
    t = as_time(t)
    return bcast(process.alpha(t), x), bcast(process.sigma(t), x)


def x0_from_eps(process: Process, x, t, eps):
    a, s = _coefs(process, t, x)
    return (x - s * eps) / a


def eps_from_x0(process: Process, x, t, x0):
    a, s = _coefs(process, t, x)
    return (x - a * x0) / s


def score_from_eps(process: Process, x, t, eps):
    _, s = _coefs(process, t, x)
    return -eps / s


def eps_from_score(process: Process, x, t, score):
    _, s = _coefs(process, t, x)
    return -s * score


def v_from_eps(process: Process, x, t, eps):
    a, s = _coefs(process, t, x)
    return a * eps - s * x0_from_eps(process, x, t, eps)


def eps_from_v(process: Process, x, t, v):
    a, s = _coefs(process, t, x)
    return (s * x + a * v) / (a * a + s * s)


def as_eps_fn(fn: Callable, prediction: str, process: Process) -> EpsFn:
    """Wraps a denoiser predicting `prediction` ('eps', 'score', 'x0', 'v' or 'edm') as an eps_fn.

    For 'edm', `fn(x_hat, sigma_hat, cond)` is EDM's D on x_hat = x / alpha with sigma_hat = sigma / alpha.
    The wrapper computes in float32 whatever the network's dtype.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    convert = {"score": eps_from_score, "x0": eps_from_x0, "v": eps_from_v}

    def eps_fn(x, t, cond=None):
        if prediction == "eps":
            return fn(x, t, cond).astype(jnp.float32)
        if prediction == "edm":
            a, s = _coefs(process, t, x)
            x0 = fn(x / a, process.edm_sigma(as_time(t)), cond).astype(jnp.float32)
            return (x - a * x0) / s
        return convert[prediction](process, x, t, fn(x, t, cond).astype(jnp.float32))

    return eps_fn


def x0_fn(eps_fn: EpsFn, process: Process) -> EpsFn:
    """The data prediction x0(x, t, cond) = (x - sigma eps_fn(x, t, cond)) / alpha."""
    return lambda x, t, cond=None: x0_from_eps(process, x, t, eps_fn(x, t, cond))
