"""Latent codes of diffusion autoencoders: Gumbel-softmax bits, Gaussian KL, z normalisation (jax only).

    continuous   z in R^d                        (DiffAE's z_sem)
    gaussian     z = mean + exp(logvar / 2) n    (a VAE-style posterior; KL to N(0, I))
    binary       d bits, each a 2-way one-hot;   (DMZ)  z = flatten((d, 2) codes) in {0, 1}^2d

A binary code stores bit b_i as the pair (1 - b_i, b_i), so z[..., 2i + 1] = b_i.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

LATENT_TYPES = ("continuous", "gaussian", "binary")


def check_latent_type(latent: str) -> str:
    """Returns `latent` if it is one of LATENT_TYPES, else raises a ValueError naming the choices."""
    if latent not in LATENT_TYPES:
        raise ValueError(f"unknown latent type {latent!r}; expected one of {LATENT_TYPES}")
    return latent


def latent_width(latent: str, d: int) -> int:
    """Width D of the vector z the decoder sees: 2d for 'binary' (d one-hot pairs), else d."""
    return 2 * d if check_latent_type(latent) == "binary" else d


class LatentOutput(NamedTuple):
    """What an encoder returns.

    z       (B, D) float32, the code the decoder is conditioned on (D = latent_width(latent, d))
    logits  (B, d, 2) for 'binary', else None
    mean, logvar  (B, d) for 'gaussian', else None
    kl      (B,) KL of the posterior to the prior: N(0, I) for 'gaussian', i.i.d. Bernoulli(1/2)
            for 'binary' (`binary_kl`); zeros for 'continuous'
    """
    z: jax.Array
    logits: Optional[jax.Array] = None
    mean: Optional[jax.Array] = None
    logvar: Optional[jax.Array] = None
    kl: Optional[jax.Array] = None


# --- Gumbel-softmax ---------------------------------------------------------------------------------

def gumbel_softmax(key, logits, tau: float = 1.0, hard: bool = False, axis: int = -1) -> jax.Array:
    """y = softmax((logits + g) / tau) along `axis`, g ~ Gumbel(0, 1) i.i.d. (Jang et al. 2017).

    hard=True returns the straight-through estimator one_hot(argmax y) + (y - stop_gradient(y)):
    its values are exactly one-hot and its gradient is the gradient of the soft sample y.
    key=None draws no noise (g = 0): the deterministic soft / hard code of `logits`.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if isinstance(tau, (int, float)) and not tau > 0:        # a traced tau (a schedule) is not checked
        raise ValueError(f"gumbel_softmax needs a temperature tau > 0, got {tau}")
    g = 0.0 if key is None else jax.random.gumbel(key, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits + g) / tau, axis=axis)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=axis), logits.shape[axis], axis=axis, dtype=soft.dtype)
    return one_hot + (soft - jax.lax.stop_gradient(soft))


def binary_code(bits) -> jax.Array:
    """Bits (..., d) in {0, 1} -> the flattened one-hot code (..., 2d) with pairs (1 - b_i, b_i)."""
    bits = jnp.asarray(bits)
    if bits.ndim < 1:
        raise ValueError("binary_code needs bits of shape (..., d), got a scalar")
    oh = jax.nn.one_hot(bits.astype(jnp.int32), 2, dtype=jnp.float32)
    return oh.reshape(*bits.shape[:-1], 2 * bits.shape[-1])


def _pairs(z) -> jax.Array:
    z = jnp.asarray(z, jnp.float32)
    if z.ndim < 1 or z.shape[-1] % 2:
        raise ValueError(f"a binary code has an even last axis 2d (pairs (1 - b, b)), got shape {z.shape}")
    return z.reshape(*z.shape[:-1], z.shape[-1] // 2, 2)


def bits_from_code(z) -> jax.Array:
    """The flattened code (..., 2d) -> bits (..., d) int32, b_i = argmax of pair i (ties -> 0)."""
    return jnp.argmax(_pairs(z), axis=-1).astype(jnp.int32)


def sample_binary_prior(key, n: int, d: int, probs=None) -> jax.Array:
    """n codes (n, 2d) of i.i.d. bits b_i ~ Bernoulli(p_i): p_i = 1/2 (DMZ) or per-bit `probs` (d,)."""
    p = jnp.full((d,), 0.5, jnp.float32) if probs is None else jnp.asarray(probs, jnp.float32)
    if p.shape != (d,):
        raise ValueError(f"probs must have shape (d,) = ({d},), got {p.shape}")
    return binary_code(jax.random.bernoulli(key, p, (n, d)))


def bit_frequencies(z) -> jax.Array:
    """Per-bit frequency of b_i = 1 over the batch: mean_b z[b, 2i + 1] (d,); for soft codes the mean
    probability of bit i."""
    return jnp.mean(_pairs(z)[..., 1].reshape(-1, jnp.shape(z)[-1] // 2), axis=0)


def bit_entropy(p) -> jax.Array:
    """Binary entropy H(p) = -p log2 p - (1 - p) log2 (1 - p) in bits (0 log 0 = 0), elementwise."""
    p = jnp.asarray(p, jnp.float32)
    return -(jax.scipy.special.xlogy(p, p) + jax.scipy.special.xlogy(1 - p, 1 - p)) / math.log(2.0)


def binary_kl(logits) -> jax.Array:
    """KL(q || Bernoulli(1/2)^d) = sum_i (log 2 + sum_k q_ik log q_ik), q_i = softmax(logits_i) (B,)."""
    logq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return jnp.sum(math.log(2.0) + jnp.sum(jnp.exp(logq) * logq, axis=-1), axis=-1)


def gaussian_kl(mean, logvar) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum_i (mean_i^2 + exp(logvar_i) - 1 - logvar_i), per
    example (B,)."""
    mean, logvar = jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape, got {mean.shape} and {logvar.shape}")
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


# --- z normalisation (DiffAE: the latent DDIM and manipulation work on normalised z_sem) ------------

class LatentStats(NamedTuple):
    """Per-dimension mean and std of inferred latents (DiffAE's conds_mean / conds_std)."""
    mean: jax.Array
    std: jax.Array


def fit_latent_stats(z, min_std: float = 1e-8) -> LatentStats:
    """mean_j = E_b z_bj and std_j = sqrt(sum_b (z_bj - mean_j)^2 / (B - 1)) (unbiased, as torch.std),
    clamped below at min_std so that constant dimensions normalise to 0 instead of NaN."""
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"fit_latent_stats needs latents of shape (N, D) with N >= 2, got {z.shape}")
    return LatentStats(jnp.mean(z, axis=0), jnp.maximum(jnp.std(z, axis=0, ddof=1), min_std))


def normalize(z, stats: LatentStats) -> jax.Array:
    """(z - mean) / std."""
    return (jnp.asarray(z, jnp.float32) - stats.mean) / stats.std


def denormalize(z, stats: LatentStats) -> jax.Array:
    """z std + mean (the inverse of `normalize`)."""
    return jnp.asarray(z, jnp.float32) * stats.std + stats.mean


__all__ = [
    "LATENT_TYPES", "LatentOutput", "LatentStats", "binary_code", "binary_kl", "bit_entropy",
    "bit_frequencies", "bits_from_code", "check_latent_type", "denormalize", "fit_latent_stats",
    "gaussian_kl", "gumbel_softmax", "latent_width", "normalize", "sample_binary_prior",
]
