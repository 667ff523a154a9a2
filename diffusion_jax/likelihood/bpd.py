"""Bits per dimension of 8-bit images under a continuous density, with uniform dequantisation.

Scaling (score_sde's, for data centred in [-1, 1]): an image k in {0, ..., 255}^D is dequantised to

    v = k + u,  u ~ U[0, 1)^D          (v in the cube [0, 256)^D, each k owning a unit cell)
    y = 2 v / 256 - 1 = (k + u) / 128 - 1   in [-1, 1)^D,

and the model's density p_y lives on y. The density of v is p_v(v) = p_y(y) |dy/dv| = p_y(y) (2/256)^D,
and P(k) = int_{cell k} p_v(v) dv  >=  exp E_u[log p_v(k + u)]  (Jensen, the cell has unit volume), so

    log P(k)  >=  E_u[ log p_y(y) ] + D log(2/256)  =  E_u[ log p_y(y) ] - D log 128,
    bpd = -log P(k) / (D ln 2)  <=  E_u[ -log p_y(y) / (D ln 2) ] + log2(128)   (= ... + 7 bits).

`bits_per_dim` applies exactly this offset (data in [0, 1) instead of [-1, 1) would give + 8). The bound
is the one score_sde reports; they average it over the test set repeated 5 times with fresh u
(`num_repeats`).

Where the density is taken. p_y above is the model's density at a small time eps = `t_min`, p_eps, the
data law convolved with N(0, sigma(eps)^2) (times alpha(eps)): the bound holds for any eps, but its
value depends on it. score_sde integrates from eps = 1e-5 (`get_likelihood_fn(..., eps=1e-5)`), where
sigma = 0.001 for VP is well inside a dequantisation cell (width 2/256 = 0.0078); at a VP process' default
t_min = 1e-3, sigma = 0.0105 is wider than the cell and the number is not comparable with the papers'.
`image_bpd` takes eps as `t_min` (default: the process' t_min) and returns it with the bpd.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.likelihood.pf_ode import pf_ode_log_likelihood
from diffusion_jax.processes.base import Process

Array = jax.Array

NUM_LEVELS = 256
# log |dy/dv| per dimension for y = 2 v / 256 - 1.
LOG_JACOBIAN_PER_DIM = math.log(2.0 / NUM_LEVELS)


def as_levels(images) -> Array:
    """Integer pixel levels k in {0..255} as float32: uint8/int images as they are, float images taken
    as the data pipeline's x = k / 127.5 - 1 in [-1, 1] and rounded back to k."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32)
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0)


def dequantize(key, x_uint8) -> Array:
    """y = (k + u) / 128 - 1 with u ~ U[0, 1): uniform dequantisation of 8-bit images into [-1, 1)."""
    k = as_levels(x_uint8)
    u = jax.random.uniform(key, k.shape, jnp.float32)
    return 2.0 * (k + u) / NUM_LEVELS - 1.0


def bits_per_dim(logp_y, num_dims: int) -> Array:
    """bpd = -(log p_y(y) + D log(2/256)) / (D ln 2) = -log p_y(y) / (D ln 2) + 7, for y in [-1, 1)."""
    d = float(num_dims)
    return -(jnp.asarray(logp_y) + d * LOG_JACOBIAN_PER_DIM) / (d * math.log(2.0))


class BPDOutput(NamedTuple):
    """bpd (B,): the mean over repeats; bpd_repeats (R, B) and logp_y (R, B) per fresh dequantisation;
    logp_stderr (R, B): the Hutchinson standard error of logp_y (0 for exact divergence); nfe (R,);
    t_min: the time eps (a Python float) at which the density p_eps(y) was evaluated."""

    bpd: Array
    bpd_repeats: Array
    logp_y: Array
    logp_stderr: Array
    nfe: Any
    t_min: float


def image_bpd(eps_fn: Callable, process: Process, images_uint8, key, *, num_repeats: int = 1,
              cond=None, t_min: float | None = None, **ode_kwargs) -> BPDOutput:
    """Bits/dim of 8-bit images (B, H, W, C) under the probability-flow ODE density of eps_fn at time t_min.

    Repeat r uses k_r = fold_in(key, r), split into (k_dequant, k_probes): y_r = dequantize(k_dequant, x)
    and log p_{t_min}(y_r) = pf_ode_log_likelihood(eps_fn, process, y_r, key=k_probes, t_min=t_min,
    **ode_kwargs).logp. t_min (score_sde's likelihood eps, 1e-5 in its configs) defaults to the process'
    t_min and is returned in `BPDOutput.t_min`. The repeats run in a `lax.map` (one compiled solve).
    Jittable (t_min is a Python float).
    """
    t_min = float(process.t_min if t_min is None else t_min)
    images = jnp.asarray(images_uint8)
    num_dims = int(np.prod(images.shape[1:]))

    def one(r):
        kq, ko = jax.random.split(jax.random.fold_in(key, r))
        y = dequantize(kq, images)
        out = pf_ode_log_likelihood(eps_fn, process, y, key=ko, cond=cond, t_min=t_min, **ode_kwargs)
        return out.logp, out.logp_stderr, jnp.asarray(out.nfe)

    logp, stderr, nfe = jax.lax.map(one, jnp.arange(int(num_repeats)))
    bpd = bits_per_dim(logp, num_dims)
    return BPDOutput(jnp.mean(bpd, axis=0), bpd, logp, stderr, nfe, t_min)


__all__ = ["BPDOutput", "LOG_JACOBIAN_PER_DIM", "NUM_LEVELS", "as_levels", "bits_per_dim", "dequantize",
           "image_bpd"]
