"""Inference with a trained diffusion autoencoder: stochastic encoding, reconstruction, interpolation.

All functions take the library's denoiser `eps_fn(x, t, cond)` (`model.decoder_eps_fn`), called with
cond = {'z': z}, and run one jitted `lax.scan` of the library's DDIM (eta = 0) on the N-step grid
`sampling.time_grid(process, N, spacing)` from t_max down to t_min:

    stochastic_encode       x_T = DDIM^{-1}(x0 | z)      deterministic inversion, x0 taken as the state
                                                         at t_min (`sampling.ddim_invert`; with
                                                         fixed_point_iters > 0 each step is solved for
                                                         the exact inverse of the sampler's step)
    reconstruct             x0' = DDIM(x_T | z)          (x0' ~= x0 for x_T = stochastic_encode(x0, z))
    reconstruct_from_noise  x0' = DDIM(x_T | z), x_T ~ N(0, prior_std^2 I): same semantics, new details
    interpolate             z_w = (1 - w) z0 + w z1, x_T,w = slerp(x_T0, x_T1, w), decoded (DiffAE)

clip_x0=True clips the data prediction to [-1, 1] in every step of both directions (DiffAE's
clip_denoised=True). The jitted functions treat eps_fn and process as static (a new eps_fn closure
compiles anew); pass the parameters as `params=` with `model.decoder_eps_fn(module)` (cond =
{'z': z, 'params': params}) so that one compilation serves every parameter set. The
round trip x0 -> x_T -> x0 is exact up to the inversion's O(step) error, which the fixed-point
iterations remove (DiffAE issue 52, "DDIM inversion not exact").
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time, bcast
from diffusion_jax.processes.predictions import x0_from_eps
from diffusion_jax.sampling.common import batch_time
from diffusion_jax.sampling.ddim import ddim, ddim_invert
from diffusion_jax.sampling.grids import time_grid


def _check(x, z, what: str):
    x, z = jnp.asarray(x, jnp.float32), jnp.asarray(z)
    if z.ndim != 2 or x.ndim < 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"{what} (B, ...) and z (B, D) must share the batch size B; got shapes "
                         f"{tuple(x.shape)} and {tuple(z.shape)}")
    return x, z


def clipped_eps_fn(eps_fn: Callable, process: Process, lo: float = -1.0, hi: float = 1.0) -> Callable:
    """eps_fn with the data prediction clipped: eps' = (x - alpha clip(x0_hat, lo, hi)) / sigma, x0_hat =
    (x - sigma eps) / alpha (DDIM / DiffAE's clip_denoised). Used by both the sampler and the inversion,
    the round trip stays exact."""
    def eps_clip(x, t, cond=None):
        a, s = bcast(process.alpha(as_time(t)), x), bcast(process.sigma(as_time(t)), x)
        x0 = jnp.clip((x - s * eps_fn(x, t, cond).astype(jnp.float32)) / a, lo, hi)
        return (x - a * x0) / s
    return eps_clip


def _cond(z, params):
    return {"z": z} if params is None else {"z": z, "params": params}


@functools.partial(jax.jit, static_argnames=("eps_fn", "process", "fixed_point_iters", "clip_x0"))
def _invert(eps_fn, process, x0, z, ts, fixed_point_iters, clip_x0, params=None):
    eps_fn = clipped_eps_fn(eps_fn, process) if clip_x0 else eps_fn
    return ddim_invert(eps_fn, process, x0, ts, cond=_cond(z, params),
                       num_fixed_point_iters=fixed_point_iters).x


@functools.partial(jax.jit, static_argnames=("eps_fn", "process", "denoise_final", "clip_x0"))
def _decode(eps_fn, process, x_T, z, ts, denoise_final, clip_x0, params=None):
    eps_fn = clipped_eps_fn(eps_fn, process) if clip_x0 else eps_fn
    cond = _cond(z, params)
    x = ddim(eps_fn, process, x_T, ts, cond=cond).x
    if denoise_final:
        t = batch_time(ts[-1], x)
        x = x0_from_eps(process, x, t, eps_fn(x, t, cond))
    return x


def stochastic_encode(eps_fn: Callable, process: Process, x0, z, *, num_steps: int, spacing: str = "uniform",
                      fixed_point_iters: int = 0, clip_x0: bool = False, params=None) -> jax.Array:
    """x_T by deterministic DDIM inversion of x0 (as the state at t_min) conditioned on z (B, D).
    clip_x0: invert the clipped sampler (`clipped_eps_fn`); pass the same value to `reconstruct`."""
    x0, z = _check(x0, z, "x0")
    ts = time_grid(process, num_steps, spacing)
    return _invert(eps_fn, process, x0, z, ts, int(fixed_point_iters), bool(clip_x0), params)


def reconstruct(eps_fn: Callable, process: Process, z, x_T, *, num_steps: int, spacing: str = "uniform",
                clip_x0: bool = False, denoise_final: bool = False, params=None) -> jax.Array:
    """DDIM (eta = 0) from x_T at t_max to t_min conditioned on z. clip_x0: x0_hat clipped to [-1, 1]
    at every step (`clipped_eps_fn`; DiffAE's clip_denoised, which keeps a few-step DDIM stable where
    alpha(t_max) is tiny). denoise_final adds the x0 prediction x0_hat = (x - sigma eps_hat) / alpha at
    t_min (one more evaluation; breaks the exact round trip)."""
    x_T, z = _check(x_T, z, "x_T")
    ts = time_grid(process, num_steps, spacing)
    return _decode(eps_fn, process, x_T, z, ts, bool(denoise_final), bool(clip_x0), params)


def reconstruct_from_noise(eps_fn: Callable, process: Process, z, key, image_shape: Sequence[int], *,
                           num_steps: int, spacing: str = "uniform", clip_x0: bool = False,
                           denoise_final: bool = False, params=None) -> jax.Array:
    """`reconstruct` from a fresh x_T ~ prior (process.prior_sample) of shape (B, *image_shape)."""
    z = jnp.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"z must have shape (B, D), got {tuple(z.shape)}")
    x_T = process.prior_sample(key, (z.shape[0], *tuple(image_shape)))
    return reconstruct(eps_fn, process, z, x_T, num_steps=num_steps, spacing=spacing, clip_x0=clip_x0,
                       denoise_final=denoise_final, params=params)


def slerp(a, b, w) -> jax.Array:
    """Spherical interpolation per example on flattened vectors (a, b: (B, ...); w scalar or (B,)):

        slerp = sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b,
        theta = 2 atan2(||a^ - b^||, ||a^ + b^||),  a^ = a / ||a||  (accurate at every angle),

    falling back to (1 - w) a + w b where theta < 1e-4 (relative error O(theta^2)). Endpoints are
    exact: w = 0 gives a, w = 1 gives b. Unit vectors stay unit vectors.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"slerp needs two arrays of the same shape (B, ...), got {a.shape} and {b.shape}")
    shape = a.shape
    a2, b2 = a.reshape(shape[0], -1), b.reshape(shape[0], -1)
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32).reshape(-1), (shape[0],))[:, None]
    tiny = jnp.finfo(jnp.float32).tiny
    ah = a2 / jnp.maximum(jnp.linalg.norm(a2, axis=-1, keepdims=True), tiny)
    bh = b2 / jnp.maximum(jnp.linalg.norm(b2, axis=-1, keepdims=True), tiny)
    theta = 2.0 * jnp.arctan2(jnp.linalg.norm(ah - bh, axis=-1, keepdims=True),
                              jnp.linalg.norm(ah + bh, axis=-1, keepdims=True))
    small = theta < 1e-4
    sin_t = jnp.where(small, 1.0, jnp.sin(theta))
    th = jnp.where(small, 0.0, theta)
    spherical = (jnp.sin((1.0 - w) * th) / sin_t) * a2 + (jnp.sin(w * th) / sin_t) * b2
    linear = (1.0 - w) * a2 + w * b2
    return jnp.where(small, linear, spherical).reshape(shape)


def interpolate(eps_fn: Callable, process: Process, start, end, weights, *, num_steps: int,
                spacing: str = "uniform", clip_x0: bool = False, denoise_final: bool = False,
                params=None) -> jax.Array:
    """DiffAE interpolation between (z0, x_T0) = start and (z1, x_T1) = end: for each w in `weights`
    (K,), z_w = (1 - w) z0 + w z1 (linear), x_T,w = slerp(x_T0, x_T1, w), decoded by `reconstruct`
    in one batch of K B. Returns (K, B, H, W, C); w = 0 / 1 reproduce reconstruct(z0, x_T0) / (z1, x_T1)."""
    (z0, x0T), (z1, x1T) = start, end
    x0T, z0 = _check(x0T, z0, "x_T0")
    x1T, z1 = _check(x1T, z1, "x_T1")
    if x0T.shape != x1T.shape or z0.shape != z1.shape:
        raise ValueError(f"start and end must have the same shapes, got x_T {x0T.shape} vs {x1T.shape}, "
                         f"z {z0.shape} vs {z1.shape}")
    w = jnp.asarray(weights, jnp.float32).reshape(-1)
    k, b = w.shape[0], z0.shape[0]
    zs = (1.0 - w)[:, None, None] * z0[None] + w[:, None, None] * z1[None]
    xs = jax.vmap(lambda wi: slerp(x0T, x1T, wi))(w)
    out = reconstruct(eps_fn, process, zs.reshape(k * b, -1), xs.reshape(k * b, *x0T.shape[1:]),
                      num_steps=num_steps, spacing=spacing, clip_x0=clip_x0, denoise_final=denoise_final,
                      params=params)
    return out.reshape(k, b, *x0T.shape[1:])


__all__ = ["clipped_eps_fn", "interpolate", "reconstruct", "reconstruct_from_noise", "slerp", "stochastic_encode"]
