"""Conversions between what a denoiser predicts, and the library's one denoiser signature.

The signature of every sampler, objective wrapper and likelihood in the library is

    eps_fn(x, t, cond) -> eps          x: (B, ...), t: (B,) float32, cond: a pytree or None

With x = alpha x0 + sigma eps (alpha, sigma at t):
    score = -eps / sigma
    x0    = (x - sigma eps) / alpha
    v     = alpha eps - sigma x0                       (Salimans & Ho 2022)
    eps   = (sigma x + alpha v) / (alpha^2 + sigma^2)
    EDM   D(x / alpha, sigma / alpha) = x0             (Karras et al. 2022 denoiser on the scaled input)
    flow  u = dx_t/dt = alpha' x0 + sigma' eps          (flow matching velocity, Lipman et al. 2023)
          = f x + g^2/(2 sigma) eps                     (the probability-flow ODE drift)
    eps   = (alpha u - alpha' x) / D,   x0 = (sigma' x - sigma u) / D,   D = alpha sigma' - sigma alpha'

with alpha' = d alpha/dt, sigma' = d sigma/dt from the process' closed forms `d_alpha`/`d_sigma` when
it has them (`Flow`), else alpha' = f alpha and sigma' = g^2/(2 sigma) + f sigma from its f and g^2
(closed forms, or `jax.jvp` of log alpha and sigma^2 by default). On the linear path
x = (1 - t) x0 + t eps: u = eps - x0, D = 1, eps = x + (1 - t) u, x0 = x - t u.

Time convention: here data sit at t = 0 and noise at t = 1 (as in diffusers' SD3
FlowMatchEulerDiscreteScheduler, x = (1 - sigma) x0 + sigma noise, target noise - x0). The common
PyTorch flow-matching code (facebookresearch/flow_matching, torchcfm, Lipman et al.'s notation) puts
noise at t = 0 and data at t = 1: x_s = s x1 + (1 - s) x0 with x1 data; there s = 1 - t and its
velocity target x1 - x0 (data - noise) is -u.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time, bcast

EpsFn = Callable[[Any, Any, Any], Any]
PREDICTIONS = ("eps", "score", "x0", "v", "edm", "flow")


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


def flow_rates(process: Process, t, x):
    """(alpha, sigma, alpha', sigma', D = alpha sigma' - sigma alpha') at t, each broadcast against x."""
    t = as_time(t)
    a, s = process.alpha(t), process.sigma(t)
    if hasattr(process, "d_alpha") and hasattr(process, "d_sigma"):
        da, ds = process.d_alpha(t), process.d_sigma(t)
        det = a * ds - s * da
    else:
        f, g2 = process.f(t), process.g2(t)
        da, ds = f * a, 0.5 * g2 / s + f * s
        det = 0.5 * a * g2 / s
    return tuple(bcast(c, x) for c in (a, s, da, ds, det))


def flow_from_eps(process: Process, x, t, eps):
    """u = alpha' x0 + sigma' eps with x0 = (x - sigma eps)/alpha, i.e. (alpha' x + D eps) / alpha."""
    a, _, da, _, det = flow_rates(process, t, x)
    return (da * x + det * eps) / a


def eps_from_flow(process: Process, x, t, u):
    """eps = (alpha u - alpha' x) / D."""
    a, _, da, _, det = flow_rates(process, t, x)
    return (a * u - da * x) / det


def flow_from_x0(process: Process, x, t, x0):
    """u = alpha' x0 + sigma' (x - alpha x0)/sigma."""
    a, s, da, ds, _ = flow_rates(process, t, x)
    return da * x0 + ds * (x - a * x0) / s


def x0_from_flow(process: Process, x, t, u):
    """x0 = (sigma' x - sigma u) / D."""
    _, s, _, ds, det = flow_rates(process, t, x)
    return (ds * x - s * u) / det


def as_eps_fn(fn: Callable, prediction: str, process: Process) -> EpsFn:
    """Wraps a denoiser predicting `prediction` ('eps', 'score', 'x0', 'v', 'edm' or 'flow') as an eps_fn.

    For 'edm', `fn(x_hat, sigma_hat, cond)` is EDM's D on x_hat = x / alpha with sigma_hat = sigma / alpha.
    The wrapper computes in float32 whatever the network's dtype.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    convert = {"score": eps_from_score, "x0": eps_from_x0, "v": eps_from_v, "flow": eps_from_flow}

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
