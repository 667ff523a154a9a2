"""Time / noise-level embeddings (computed in float32 whatever the network's compute dtype).

* Sinusoidal (Transformer / DDPM): for s = t and half = dim // 2,

      emb(s) = [sin(s w_0), ..., sin(s w_{half-1}), cos(s w_0), ..., cos(s w_{half-1})],
      w_k = max_period ** (-k / (half - freq_shift))   (DDPM's `get_timestep_embedding`: freq_shift 1),

  or [cos, sin] with flip_sin_cos (diffusers' `flip_sin_to_cos`; its `freq_shift` is this one).

* Gaussian Fourier features (NCSN++, Tancik et al. 2020):

      emb(s) = [sin(2 pi s W), cos(2 pi s W)],     W ~ N(0, scale^2 I_{dim/2}), fixed.

  W is a constant drawn from a fixed NumPy seed, not a parameter (so no optimizer, weight decay or
  checkpoint touches it); it is the same in every model with the same (dim, scale, seed).

* Fixed 2-D sin-cos positional embedding of the DiT / MAE: half the channels embed the row index,
  half the column index, each with the 1-D sin-cos formula above (frequencies 10000^(-k/(D/4))).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *,
                         freq_shift: float = 1.0, flip_sin_cos: bool = False) -> jax.Array:
    """(B,) -> (B, dim) float32 sinusoidal embedding [sin(t w), cos(t w)] ([cos, sin] if
    flip_sin_cos; odd dim: zero-padded)."""
    t = jnp.asarray(t, jnp.float32).reshape(-1)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / max(half - freq_shift, 1))
    args = t[:, None] * freqs[None, :]
    parts = [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts[::-1] if flip_sin_cos else parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_embedding(t: jax.Array, dim: int, scale: float = 16.0, seed: int = 0) -> jax.Array:
    """(B,) -> (B, dim) float32 Gaussian Fourier features [sin(2 pi t W), cos(2 pi t W)]."""
    w = np.random.RandomState(seed).normal(size=(dim // 2,)).astype(np.float32) * scale
    t = jnp.asarray(t, jnp.float32).reshape(-1)
    args = 2.0 * np.pi * t[:, None] * jnp.asarray(w)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


TIME_INPUTS = ("linear", "log")
LOG_T_FLOOR = 1e-8


def time_input(t: jax.Array, kind: str = "linear", scale: float = 1.0,
               offset: float = 0.0) -> jax.Array:
    """The scalar an embedding sees: scale * t - offset ('linear'), or scale * log(max(t, 1e-8))
    - offset ('log': NCSN++ / CLD-SGM's Fourier features of log t; the floor keeps t = 0 finite)."""
    t = jnp.asarray(t, jnp.float32)
    if kind == "linear":
        return scale * t - offset
    if kind == "log":
        return scale * jnp.log(jnp.maximum(t, LOG_T_FLOOR)) - offset
    raise ValueError(f"unknown time input {kind!r}; expected one of {TIME_INPUTS}")


def timestep_embedding(t: jax.Array, dim: int, kind: str = "sinusoidal",
                       fourier_scale: float = 16.0, *, freq_shift: float = 1.0,
                       flip_sin_cos: bool = False) -> jax.Array:
    """Dispatches on `kind` in {'sinusoidal', 'fourier'} (freq_shift / flip_sin_cos: sinusoidal)."""
    if kind == "sinusoidal":
        return sinusoidal_embedding(t, dim, freq_shift=freq_shift, flip_sin_cos=flip_sin_cos)
    if kind == "fourier":
        return fourier_embedding(t, dim, scale=fourier_scale)
    raise ValueError(f"unknown time embedding {kind!r}; expected 'sinusoidal' or 'fourier'")


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_posemb(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, dim) float32 fixed 2-D sin-cos positional embedding (row-major tokens)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim % 4 == 0, got {dim}")
    gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                         indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, gh), _sincos_1d(dim // 2, gw)], axis=1)
    return emb.astype(np.float32)
