"""Guidance as denoiser wrappers: each takes an eps_fn and returns a new eps_fn(x, t, cond), so every
sampler runs guided without knowing it.

  classifier-free  eps = eps_u + w (eps_c - eps_u)                    (Ho & Salimans 2022)
  classifier       eps = eps - s sigma(t) grad_x log p(y | x_t, t)    (Dhariwal & Nichol 2021)

With eps = -sigma score, the classifier form is score(x | y) = score(x) + s grad log p(y | x): at s = 1
and the exact classifier it is Bayes' rule, i.e. the exact conditional eps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time, bcast


def _out_dtype(x):
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def classifier_free_guidance(eps_fn, scale, null_cond):
    """eps_fn(x, t, cond) -> eps_u + scale (eps_c - eps_u), in ONE batched call of the wrapped eps_fn on
    [x, x] with [cond, null_cond] concatenated along the batch axis.

    cond may be any pytree of arrays with leading batch axis B; null_cond has the same structure, each
    leaf either batched (B, ...) or one unbatched value broadcast to (B, ...). scale (a scalar or per-example
    (B,)) 0 gives the unconditional eps, 1 the conditional one. Output in float32 (at least).
    """

    def guided(x, t, cond):
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition: got cond=None")
        b = x.shape[0]
        t = jnp.broadcast_to(as_time(t), (b,))

        def pair(c, u):
            c = jnp.asarray(c)
            u = jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape)
            return jnp.concatenate([c, u], axis=0)

        both = jax.tree_util.tree_map(pair, cond, null_cond)
        eps = eps_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        eps = eps.astype(_out_dtype(x))
        eps_c, eps_u = eps[:b], eps[b:]
        return eps_u + bcast(jnp.asarray(scale, eps.dtype), eps_u) * (eps_c - eps_u)

    return guided


def classifier_guidance(eps_fn, log_prob_fn, process: Process, scale):
    """eps_fn(x, t, cond) -> eps - scale sigma(t) grad_x log p(y | x_t, t), with
    log_prob_fn(x, t, cond) -> (B,) the classifier's log p(cond | x_t) per example and the gradient
    taken with jax.grad of its sum (examples are independent). scale: a scalar or per-example (B,).
    Output in float32 (at least)."""

    def guided(x, t, cond):
        dtype = _out_dtype(x)
        eps = eps_fn(x, t, cond).astype(dtype)
        grad = jax.grad(lambda y: jnp.sum(log_prob_fn(y, t, cond)))(x).astype(dtype)
        sigma = bcast(process.sigma(as_time(t)), x)
        return eps - bcast(jnp.asarray(scale, dtype), x) * sigma * grad

    return guided
