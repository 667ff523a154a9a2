"""Noisy-input feature readouts of a denoiser (DDAE, Xiang et al. 2023).

For a grid of times t_1..t_T and clean inputs x (B, H, W, C):

    x_{t_j} = alpha(t_j) x + sigma(t_j) eps_j                      (the process' marginal)
    h_j     = sown block output of module(x_{t_j}, t_j, cond)     ('intermediates' collection)
    f_j     = pool(h_j) over every axis but batch and channel:
              'gap'     mean                 (global average pooling; DDAE's readout)
              'gmp'     max                  (global max pooling: a small object on a large
                                              background is not averaged away)
              'gap_gmp' [mean, max]          (2C features)
              'none'    the map itself       (B, H, W, C) / (B, N, D)

The network runs once per t, every requested block read from that one pass, and the t axis is a
`jax.vmap`: a whole grid is one compiled call. XLA drops whatever the requested blocks do not need
(reading 'down_0_0' never computes the decoder).

Noise: `draw_noise(key, x.shape, T)` gives eps (T, B, ...) with example n's noise drawn from
`fold_in(key, n)`, so the noise of an example does not depend on the batch it sits in
(`extract_features` over a data set matches `features` on the same examples at any batch size).
A fixed `noise` of shape x.shape is shared by every t; one of shape (T, B, ...) is used as given.

Time is the process' continuous t in [t_min, t_max]. A model trained on discrete DDPM steps
n = 0..N-1 with `processes.DiscreteDDPM` uses t = (n + 1) / N (DDAE's best CIFAR-10 DDPM readout,
n = 11 of 1000, is t = 0.012); the network sees t and embeds time_scale * t as in training.

Diffusion-autoencoder decoders: the decoder is a UNet with `z_conditioning`, so pass the decoder
module, the decoder's own 'params' sub-tree (not the whole autoencoder's) and cond={'z': z} with the
latents the encoder gave for the same images.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.networks import block_names
from diffusion_jax.processes.base import Process

POOLS = ("gap", "gmp", "gap_gmp", "none")


# ------------------------------------------------------------------------------------- checks
def _as_blocks(blocks) -> tuple[str, ...]:
    if isinstance(blocks, str):
        blocks = (blocks,)
    blocks = tuple(blocks)
    if not blocks:
        raise ValueError("blocks is empty: name at least one sown block")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"duplicate block names in {blocks}")
    return blocks


def check_blocks(module, input_shape: Sequence[int], blocks) -> tuple[str, ...]:
    """Returns `blocks` as a tuple; ValueError naming the valid blocks if one is not sown."""
    blocks = _as_blocks(blocks)
    valid = list(block_names(module, input_shape))
    bad = [b for b in blocks if b not in valid]
    if bad:
        raise ValueError(f"unknown block name(s) {bad} for {type(module).__name__} on input "
                         f"{tuple(input_shape)}; valid blocks: {valid}")
    return blocks


def check_timesteps(process: Process, timesteps) -> np.ndarray:
    """Returns timesteps as a 1-D float array; ValueError if outside [t_min, t_max]."""
    ts = np.atleast_1d(np.asarray(timesteps, np.float64))
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"timesteps must be a scalar or a non-empty 1-D grid, got shape {ts.shape}")
    process.check_t(ts, "timesteps")
    return ts


def _check_module(module):
    try:
        hash(module)
    except TypeError:
        raise ValueError(f"{type(module).__name__} is not hashable (a list-valued field? use tuples): "
                         "readouts jit with the module as a static argument") from None


# -------------------------------------------------------------------------------------- noise
def draw_noise(key, shape: Sequence[int], num_timesteps: int, *, share: bool = False,
               offset: int = 0) -> jax.Array:
    """eps (T, B, ...) float32: example n (global index offset + n) draws from fold_in(key, n).

    share=True uses one eps per example for every t (each row of the T axis equal).
    """
    return _draw_noise(key, tuple(int(s) for s in shape), int(num_timesteps), bool(share), offset)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_noise(key, shape, num_timesteps, share, offset):
    idx = offset + jnp.arange(shape[0])
    t = 1 if share else num_timesteps

    def one(i):
        return jax.random.normal(jax.random.fold_in(key, i), (t,) + shape[1:], jnp.float32)

    eps = jnp.moveaxis(jax.vmap(one)(idx), 0, 1)            # (t, B, ...)
    return jnp.broadcast_to(eps, (num_timesteps,) + shape)


# ------------------------------------------------------------------------------------ readout
def _pool(h: jax.Array, pool: str) -> jax.Array:
    h = h.astype(jnp.float32)
    axes = tuple(range(1, h.ndim - 1))
    if pool == "gap":
        return jnp.mean(h, axis=axes)
    if pool == "gmp":
        return jnp.max(h, axis=axes)
    if pool == "gap_gmp":
        return jnp.concatenate([jnp.mean(h, axis=axes), jnp.max(h, axis=axes)], axis=-1)
    return h


def _readout(module, blocks, process, pool, variables, x, ts, eps, cond):
    """vmap over t of one network pass: dict block -> (T, B, ...) float32."""

    def one(t, e):
        xt = process.add_noise(x, e, t)
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        _, state = module.apply(variables, xt, tb, cond=cond, train=False, mutable=["intermediates"])
        sown = state["intermediates"]
        return {b: _pool(sown[b][-1], pool) for b in blocks}

    return jax.vmap(one)(ts, eps)


_readout_jit = jax.jit(_readout, static_argnums=(0, 1, 2, 3))


def _variables(params, batch_stats):
    v = {"params": params}
    if batch_stats is not None:
        v["batch_stats"] = batch_stats
    return v


def _prepare(module, x_shape, timesteps, blocks, process, pool):
    if len(x_shape) < 2:
        raise ValueError(f"x must be batched (B, ...), got shape {tuple(x_shape)}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; known: {POOLS}")
    _check_module(module)
    blocks = check_blocks(module, x_shape, blocks)
    ts = check_timesteps(process, timesteps)
    return blocks, ts


def features(module, params, x, timesteps, blocks, *, process: Process, key=None, noise=None,
             cond: Optional[Mapping[str, Any]] = None, pool: str = "gap",
             batch_stats=None) -> dict[str, jax.Array]:
    """Readouts of `blocks` at every t of `timesteps` (T,): dict block -> (T, B, C) float32.

    x_t = alpha(t) x + sigma(t) eps with eps from `key` (fresh per t, `draw_noise`) or the given
    `noise` (x.shape: shared across t; (T, *x.shape): per t). pool='gap' / 'gmp' / 'gap_gmp' pool the
    sown map over its spatial / token axes (mean / max / both, see the module docstring);
    pool='none' returns the raw map (T, B, H, W, C) or (T, B, N, D).
    `params` is the module's 'params' collection (`batch_stats` added if the module has BatchNorm).
    """
    x = jnp.asarray(x, jnp.float32)
    blocks, ts = _prepare(module, x.shape, timesteps, blocks, process, pool)
    num_t = ts.shape[0]
    if noise is None:
        if key is None:
            raise ValueError("features needs key= (fresh noise) or noise= (fixed noise)")
        eps = draw_noise(key, x.shape, num_t)
    else:
        eps = jnp.asarray(noise, jnp.float32)
        if eps.shape == x.shape:
            eps = jnp.broadcast_to(eps, (num_t,) + x.shape)
        elif eps.shape != (num_t,) + x.shape:
            raise ValueError(f"noise has shape {eps.shape}; expected x.shape {x.shape} or "
                             f"(T, *x.shape) = {(num_t,) + x.shape}")
    return _readout_jit(module, blocks, process, pool, _variables(params, batch_stats), x,
                        jnp.asarray(ts, jnp.float32), eps, cond)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _batch_readout(module, blocks, process, pool, share, variables, x, ts, key, offset, cond):
    eps = _draw_noise(key, x.shape, ts.shape[0], share, offset)
    return _readout(module, blocks, process, pool, variables, x, ts, eps, cond)


def extract_features(module, params, images, timesteps, blocks, *, process: Process,
                     batch_size: int, key, cond: Optional[Mapping[str, Any]] = None,
                     pool: str = "gap", batch_stats=None,
                     share_noise: bool = False) -> dict[str, np.ndarray]:
    """`features` over a whole data set: images (N, H, W, C) numpy in the model's input range ->
    dict block -> numpy (T, N, C) float32.

    One compiled function serves every batch (the last one padded by repeating its last example);
    example n's noise comes from fold_in(key, n), so the result does not depend on `batch_size`.
    `cond` holds per-example arrays with leading axis N (e.g. {'z': latents}); share_noise=True
    uses one eps per example for all t.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        raise ValueError("images are uint8; convert them to the model's input range first "
                         "(e.g. x / 127.5 - 1)")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, ...), got shape {images.shape}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = images.shape[0]
    bs = min(batch_size, n)
    blocks, ts = _prepare(module, (bs,) + images.shape[1:], timesteps, blocks, process, pool)
    cond = {} if cond is None else {k: np.asarray(v) for k, v in cond.items()}
    for k, v in cond.items():
        if v.shape[:1] != (n,):
            raise ValueError(f"cond[{k!r}] has leading size {v.shape[:1]}, expected N = {n}")
    variables = _variables(params, batch_stats)
    ts_dev = jnp.asarray(ts, jnp.float32)

    def batch(start):
        sl = np.arange(start, start + bs).clip(max=n - 1)      # pads with the last example
        xb = jnp.asarray(images[sl], jnp.float32)
        cb = {k: jnp.asarray(v[sl]) for k, v in cond.items()} or None
        return _batch_readout(module, blocks, process, pool, share_noise, variables, xb, ts_dev,
                              key, jnp.int32(start), cb)

    out = {b: [] for b in blocks}
    pending = None
    for start in range(0, n, bs):
        nxt = (start, batch(start))                              # dispatch before syncing
        if pending is not None:
            s, res = pending
            for b in blocks:
                out[b].append(np.asarray(res[b])[:, : n - s])
        pending = nxt
    s, res = pending
    for b in blocks:
        out[b].append(np.asarray(res[b])[:, : n - s])
    return {b: np.concatenate(v, axis=1) for b, v in out.items()}
