"""Does the decoder use z, and does z carry information about x? Diagnostics of diffusion autoencoders.

    dep = z_dependence(eps_fn, process, x0, z, key, ts=(0.1, 0.3, 0.5, 0.7, 0.9), params=params)
    use = code_usage(z)                       # binary codes: per-bit frequencies, entropies, dead bits
    mi = mutual_information(lat, key)         # stochastic latents: I(x; z) in bits (minibatch estimator)

z_dependence (per t, with x_t = alpha_t x0 + sigma_t eps and a permutation pi of the batch):

    mse_z        = E ||eps_hat(x_t, t, z) - eps||^2 / n          the denoising loss with the right z
    mse_shuffled = E ||eps_hat(x_t, t, z_pi) - eps||^2 / n       ... with another image's z
    share        = E ||eps_hat(x_t, t, z) - eps_hat(x_t, t, z_pi)||^2 / E ||eps_hat(x_t, t, z) - m_t||^2
                   (m_t the batch mean of eps_hat): the part of the output's variation that z moves.
    A decoder that ignores z has mse_shuffled = mse_z and share = 0 exactly.

code_usage of hard binary codes (B, 2d) (pairs (1 - b_i, b_i), `latents.binary_code`):

    p_i = mean_b b_i,  H_i = H(p_i) bits,  dead bits: p_i in {0, 1},  code entropy H(codes) (plug-in,
    bits, <= log2 B) and the number of distinct codes.

mutual_information of a stochastic encoder q(z | x) (factorised Bernoulli bits or diagonal Gaussian),
the minibatch aggregate-posterior estimator (Chen et al. 2018, "Isolating sources of
disentanglement"; Alemi et al. 2018):

    I(x; z) = E_x KL(q(z | x) || q(z)),  q(z) = E_x q(z | x)
            ~ 1/B sum_i [log q(z_i | x_i) - log 1/B sum_j q(z_i | x_j)],   z_i ~ q(. | x_i),

in bits; it is at most log2 B (a batch cannot show more), so use B >> 2^(bits the code may carry)
or read it as a lower bound. Per bit (binary): I(x; b_i) = H(mean_x q_i(x)) - mean_x H(q_i(x)).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.autoencoders.latents import LatentOutput, bit_entropy, bits_from_code
from diffusion_jax.processes.base import Process, bcast

__all__ = ["z_dependence", "code_usage", "mutual_information", "bitwise_mutual_information"]


@functools.partial(jax.jit, static_argnames=("eps_fn", "process"))
def _dependence(eps_fn, process, x0, z, perm, noise, ts, params):
    def at(t):
        tt = jnp.full((x0.shape[0],), t, jnp.float32)
        a, s = bcast(process.alpha(tt), x0), bcast(process.sigma(tt), x0)
        x_t = a * x0 + s * noise
        cond = (lambda zz: {"z": zz} if params is None else {"z": zz, "params": params})
        e1 = eps_fn(x_t, tt, cond(z)).astype(jnp.float32)
        e2 = eps_fn(x_t, tt, cond(z[perm])).astype(jnp.float32)
        mse_z = jnp.mean(jnp.square(e1 - noise))
        mse_s = jnp.mean(jnp.square(e2 - noise))
        spread = jnp.mean(jnp.square(e1 - jnp.mean(e1, axis=0, keepdims=True)))
        share = jnp.mean(jnp.square(e1 - e2)) / jnp.maximum(spread, 1e-30)
        return mse_z, mse_s, share
    return jax.lax.map(at, ts)


def z_dependence(eps_fn: Callable, process: Process, x0, z, key, *,
                 ts: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), params=None) -> dict:
    """How much the denoiser's output depends on z, per noise level t (module docstring).

    eps_fn(x, t, cond): the decoder, called with cond = {'z': z} (plus 'params': params when given,
    so that one compiled function serves every parameter set); x0 (B, ...) images, z (B, D) their
    latents, B >= 2. One jitted call over all t. Returns {'t', 'mse_z', 'mse_shuffled', 'share'}
    (lists of floats) and 'gain' = mse_shuffled / mse_z per t.
    """
    x0 = jnp.asarray(x0, jnp.float32)
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or x0.ndim < 2 or z.shape[0] != x0.shape[0] or z.shape[0] < 2:
        raise ValueError(f"z_dependence needs x0 (B, ...) and z (B, D) with the same B >= 2; got shapes "
                         f"{tuple(x0.shape)} and {tuple(z.shape)}")
    k_perm, k_noise = jax.random.split(key)
    b = z.shape[0]
    # a derangement: every example gets another example's z (a random cyclic shift of a permutation)
    order = jax.random.permutation(k_perm, b)
    perm = jnp.zeros((b,), jnp.int32).at[order].set(jnp.roll(order, 1))
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    ts_arr = jnp.asarray(ts, jnp.float32).reshape(-1)
    mse_z, mse_s, share = _dependence(eps_fn, process, x0, z, perm, noise, ts_arr, params)
    mse_z, mse_s, share = (np.asarray(a, np.float64) for a in (mse_z, mse_s, share))
    return {"t": [float(t) for t in np.asarray(ts_arr)], "mse_z": mse_z.tolist(),
            "mse_shuffled": mse_s.tolist(), "share": share.tolist(),
            "gain": (mse_s / np.maximum(mse_z, 1e-30)).tolist()}


def code_usage(z) -> dict:
    """Usage of hard binary codes z (B, 2d): per-bit frequency of 1 and entropy (bits), the number of
    dead (constant) bits and of bits with entropy < 0.1, the plug-in entropy of whole codes (bits) and
    the number of distinct codes."""
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] % 2:
        raise ValueError(f"code_usage needs binary codes of shape (B, 2d), got {z.shape}")
    bits = np.asarray(bits_from_code(z))
    p = bits.mean(0)
    h = np.asarray(bit_entropy(p), np.float64)
    _, counts = np.unique(bits, axis=0, return_counts=True)
    q = counts / counts.sum()
    return {"bits": int(bits.shape[1]), "frequency": p.tolist(), "entropy": h.tolist(),
            "mean_entropy": float(h.mean()), "dead_bits": int(np.sum((p == 0) | (p == 1))),
            "low_entropy_bits": int(np.sum(h < 0.1)), "distinct_codes": int(len(counts)),
            "code_entropy": float(-(q * np.log2(q)).sum()), "max_code_entropy": float(np.log2(len(bits)))}


def _log_q_binary(logits, bits):
    """log q(b | x_j) for every pair: logits (B, d, 2), bits (B, d) -> (B_z, B_x)."""
    logq = jax.nn.log_softmax(logits, axis=-1)            # (B, d, 2)
    onehot = jax.nn.one_hot(bits, 2)                      # (B, d, 2)
    return jnp.einsum("ikc,jkc->ij", onehot, logq)


def _log_q_gaussian(mean, logvar, z):
    """log N(z_i; mean_j, exp(logvar_j)) for every pair (B_z, B_x)."""
    diff = z[:, None, :] - mean[None]
    lp = -0.5 * (jnp.square(diff) * jnp.exp(-logvar)[None] + logvar[None] + math.log(2 * math.pi))
    return jnp.sum(lp, axis=-1)


@jax.jit
def _mi_binary(logits, key):
    bits = jax.random.categorical(key, logits, axis=-1)   # b_i ~ q(. | x_i)
    lq = _log_q_binary(logits, bits)
    b = lq.shape[0]
    return jnp.mean(jnp.diag(lq) - (jax.nn.logsumexp(lq, axis=1) - math.log(b))) / math.log(2.0)


@jax.jit
def _mi_gaussian(mean, logvar, key):
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    lq = _log_q_gaussian(mean, logvar, z)
    b = lq.shape[0]
    return jnp.mean(jnp.diag(lq) - (jax.nn.logsumexp(lq, axis=1) - math.log(b))) / math.log(2.0)


def mutual_information(lat: LatentOutput, key, *, num_samples: int = 8) -> Optional[float]:
    """I(x; z) in bits of a stochastic encoder from one batch of its outputs (module docstring),
    averaged over `num_samples` draws of z; None for a deterministic ('continuous') latent, whose
    I(x; z) is not finite."""
    keys = jax.random.split(key, int(num_samples))
    if lat.logits is not None:
        return float(np.mean([_mi_binary(jnp.asarray(lat.logits, jnp.float32), k) for k in keys]))
    if lat.mean is not None and lat.logvar is not None:
        m, lv = jnp.asarray(lat.mean, jnp.float32), jnp.asarray(lat.logvar, jnp.float32)
        return float(np.mean([_mi_gaussian(m, lv, k) for k in keys]))
    return None


def bitwise_mutual_information(logits) -> np.ndarray:
    """I(x; b_i) = H(mean_x q_i(x)) - mean_x H(q_i(x)) in bits, per bit (d,), for logits (B, d, 2)."""
    q1 = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., 1]
    return np.asarray(bit_entropy(jnp.mean(q1, axis=0)) - jnp.mean(bit_entropy(q1), axis=0), np.float64)
