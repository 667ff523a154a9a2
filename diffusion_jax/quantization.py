"""Vector quantisation (VQ-VAE, van den Oord et al. 2017; EMA codebook, Razavi et al. 2019) as pure
functions of a codebook e (K, D) and encoder outputs z (..., D).

    nearest_code(z, e)        k(z) = argmin_k ||z - e_k||^2  (via ||z||^2 - 2 z.e_k + ||e_k||^2)
    quantize(z, e, beta)      z_q = e_{k(z)};  straight-through z_st = z + sg(z_q - z) (forward z_q,
                              d z_st / d z = I);  codebook loss ||sg(z) - z_q||^2, commitment loss
                              beta ||z - sg(z_q)||^2 (means over elements); VQ-VAE's loss is
                              rec + codebook + commitment (with EMA updates only the commitment term)
    code_counts / code_usage / perplexity
                              n_k = #{z : k(z) = k};  usage = fraction of codes with n_k > 0;
                              perplexity = exp(-sum_k p_k log p_k), p_k = n_k / sum n
    EMA codebook (Sonnet's VectorQuantizerEMA; initial N_k = 1, m_k = e_k):
        N_k <- gamma N_k + (1 - gamma) n_k
        m_k <- gamma m_k + (1 - gamma) sum_{z : k(z) = k} z
        N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j          (Laplace smoothing)
        e_k = m_k / N~_k
    dead-code restarts (Dhariwal et al. 2020, Jukebox): a code unused (n_k = 0) for `dead_after`
        consecutive updates is re-initialised to a random encoder output of the batch (its EMA
        statistics to N_k = 1, m_k = that output) and its counter reset.

Errors name the argument: a codebook that is not (K, D), or whose D differs from the encoder
output's last axis. Maths layer: jax only.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["VQOutput", "VQEMAState", "check_codebook", "nearest_code", "quantize", "straight_through",
           "vq_losses", "code_counts", "code_usage", "perplexity", "init_ema_state", "ema_update",
           "count_unused", "restart_dead_codes", "ema_step"]


def check_codebook(codebook, z=None, *, num_codes: int | None = None) -> None:
    """ValueError naming what does not fit: codebook (K, D); z (..., D); K == num_codes if given."""
    shape = tuple(jnp.shape(codebook))
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"codebook must have shape (codebook_size, embedding_dim), got {shape}")
    if num_codes is not None and shape[0] != num_codes:
        raise ValueError(f"codebook size {shape[0]} does not match num_codes={num_codes}")
    if z is not None and jnp.shape(z)[-1] != shape[1]:
        raise ValueError(f"codebook embedding_dim {shape[1]} does not match the encoder output's last "
                         f"axis {jnp.shape(z)[-1]} (z shape {tuple(jnp.shape(z))})")


def nearest_code(z, codebook) -> Array:
    """Indices (...,) int32 of the nearest codes in squared Euclidean distance."""
    check_codebook(codebook, z)
    z = jnp.asarray(z, jnp.float32)
    e = jnp.asarray(codebook, jnp.float32)
    d = (jnp.sum(z * z, axis=-1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", z, e)
         + jnp.sum(e * e, axis=-1))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def straight_through(z, z_q) -> Array:
    """z + sg(z_q - z): forward value z_q, gradient the identity w.r.t. z (none w.r.t. z_q)."""
    return z + jax.lax.stop_gradient(z_q - z)


def vq_losses(z, z_q, beta: float = 0.25) -> tuple[Array, Array]:
    """(codebook ||sg(z) - z_q||^2, commitment beta ||z - sg(z_q)||^2), means over all elements."""
    sg = jax.lax.stop_gradient
    codebook = jnp.mean(jnp.square(sg(z) - z_q))
    commitment = beta * jnp.mean(jnp.square(z - sg(z_q)))
    return codebook, commitment


class VQOutput(NamedTuple):
    """z_st: straight-through quantised latents (forward z_q); indices (...,) int32; z_q: the codes;
    codebook_loss, commitment_loss: scalars (see `vq_losses`); perplexity, usage: scalars."""

    z_st: Array
    indices: Array
    z_q: Array
    codebook_loss: Array
    commitment_loss: Array
    perplexity: Array
    usage: Array


def quantize(z, codebook, *, beta: float = 0.25) -> VQOutput:
    """Nearest-code quantisation with the straight-through estimator and the VQ-VAE losses."""
    if not beta >= 0:
        raise ValueError(f"commitment beta must be >= 0, got {beta!r}")
    z = jnp.asarray(z, jnp.float32)
    idx = nearest_code(z, codebook)
    z_q = jnp.take(jnp.asarray(codebook, jnp.float32), idx, axis=0)
    cb, commit = vq_losses(z, z_q, beta)
    k = jnp.shape(codebook)[0]
    return VQOutput(straight_through(z, z_q), idx, z_q, cb, commit, perplexity(idx, k), code_usage(idx, k))


def code_counts(indices, num_codes: int) -> Array:
    """n_k (K,) float32: how many of the indices select code k."""
    return jnp.zeros((num_codes,), jnp.float32).at[jnp.asarray(indices).reshape(-1)].add(1.0)


def code_usage(indices, num_codes: int) -> Array:
    """Fraction of the K codes selected at least once."""
    return jnp.mean((code_counts(indices, num_codes) > 0).astype(jnp.float32))


def perplexity(indices, num_codes: int) -> Array:
    """exp(-sum_k p_k log p_k) with p_k the code frequencies (1 .. K; K for uniform usage)."""
    n = code_counts(indices, num_codes)
    p = n / jnp.maximum(jnp.sum(n), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


# ------------------------------------------------------------------------------- EMA codebook
class VQEMAState(NamedTuple):
    """cluster_size N (K,), embed_sum m (K, D), codebook e (K, D), unused (K,) int32: consecutive
    updates without any assignment."""

    cluster_size: Array
    embed_sum: Array
    codebook: Array
    unused: Array


def init_ema_state(codebook) -> VQEMAState:
    """N = 1, m = e (each code its own first member, so that m / N~ ~ e until the code is used; with
    N = 0 an unused code's e = m / N~ would blow up, N~ being ~eps), unused = 0."""
    check_codebook(codebook)
    e = jnp.asarray(codebook, jnp.float32)
    k = e.shape[0]
    return VQEMAState(jnp.ones((k,), jnp.float32), e, e, jnp.zeros((k,), jnp.int32))


def ema_update(state: VQEMAState, z, indices, *, decay: float = 0.99, eps: float = 1e-5) -> VQEMAState:
    """One EMA codebook update from encoder outputs z (..., D) and their codes (see the docstring);
    an unused code's N and m decay together, so its e = m / N~ stays ~ put until N ~ eps."""
    check_codebook(state.codebook, z)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1), got {decay!r}")
    k, d = state.codebook.shape
    z = jnp.asarray(z, jnp.float32).reshape(-1, d)
    onehot = jax.nn.one_hot(jnp.asarray(indices).reshape(-1), k, dtype=jnp.float32)
    n = jnp.sum(onehot, axis=0)
    s = onehot.T @ z
    N = decay * state.cluster_size + (1.0 - decay) * n
    m = decay * state.embed_sum + (1.0 - decay) * s
    total = jnp.sum(N)
    N_smooth = (N + eps) / (total + k * eps) * total
    e = m / N_smooth[:, None]
    return VQEMAState(N, m, e, count_unused(state.unused, n))


def count_unused(unused, counts) -> Array:
    """unused_k + 1 where n_k = 0, else 0."""
    return jnp.where(jnp.asarray(counts) > 0, 0, jnp.asarray(unused) + 1).astype(jnp.int32)


def restart_dead_codes(state: VQEMAState, z, key, *, dead_after: int) -> tuple[VQEMAState, Array]:
    """Codes with unused >= dead_after re-initialised to random rows of z (..., D) (drawn uniformly
    with replacement); their N = 1, m = e = that row, unused = 0. Returns (state, dead mask (K,))."""
    if int(dead_after) < 1:
        raise ValueError(f"dead_after must be >= 1 update, got {dead_after!r}")
    check_codebook(state.codebook, z)
    k, d = state.codebook.shape
    z = jnp.asarray(z, jnp.float32).reshape(-1, d)
    rows = z[jax.random.randint(key, (k,), 0, z.shape[0])]
    dead = state.unused >= dead_after
    e = jnp.where(dead[:, None], rows, state.codebook)
    return VQEMAState(jnp.where(dead, 1.0, state.cluster_size), jnp.where(dead[:, None], rows, state.embed_sum),
                      e, jnp.where(dead, 0, state.unused).astype(jnp.int32)), dead


def ema_step(state: VQEMAState, z, key, *, decay: float = 0.99, eps: float = 1e-5,
             dead_after: int | None = None) -> tuple[VQEMAState, Array]:
    """Assign z to the current codes, EMA-update the codebook, then restart dead codes (when
    dead_after is set). Returns (state, indices)."""
    idx = nearest_code(z, state.codebook)
    state = ema_update(state, z, idx, decay=decay, eps=eps)
    if dead_after is not None:
        state, _ = restart_dead_codes(state, z, key, dead_after=dead_after)
    return state, idx
