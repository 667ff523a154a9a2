"""DDGAN generation (Xiao et al. 2022, the official `sample_from_model`): from x_T ~ N(0, I), for
t = T-1, ..., 0: x0 = G(x_{t+1}, t, z), z ~ N(0, I_nz), x_t ~ q(x_t | x_{t+1}, x0) (the DDPM posterior
of `objectives.ddgan.DDGANSchedule`; no noise at t = 0). T generator evaluations (NFE = T).

    out = ddgan_sample(generator_fn, schedule, x_T, key, latent_dim=nz, cond=None)
    generator_fn(x, t (B,) int32, z (B, nz), cond) -> x0 prediction (x's shape)

The loop is a `lax.scan`; noise injectable as noise=(T, ...) and latents=(T, B, nz) pre-drawn.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.ddgan import DDGANSchedule
from diffusion_jax.sampling.common import SamplerOutput, track_nonfinite


def ddgan_sample(generator_fn, schedule: DDGANSchedule, x_T, key=None, *, latent_dim: int, cond=None,
                 noise=None, latents=None) -> SamplerOutput:
    """T posterior steps with the generator's x0 (see the module docstring); SamplerOutput(x, nfe=T)."""
    T = schedule.num_steps
    x_T = jnp.asarray(x_T, jnp.float32)
    b = x_T.shape[0]
    if (noise is None or latents is None) and key is None:
        raise ValueError("ddgan_sample is stochastic: pass key= (or pre-drawn noise= and latents=)")

    def step(carry, i):
        x, bad = carry
        t = T - 1 - i
        kz, kn = jax.random.split(jax.random.fold_in(key, i)) if key is not None else (None, None)
        z = latents[i] if latents is not None else jax.random.normal(kz, (b, latent_dim), jnp.float32)
        n = noise[i] if noise is not None else jax.random.normal(kn, x.shape, jnp.float32)
        tt = jnp.full((b,), t, jnp.int32)
        x0 = jnp.asarray(generator_fn(x, tt, z, cond), jnp.float32)
        x = schedule.sample_posterior(x0, x, tt, noise=n)
        return (x, track_nonfinite(bad, i, x)), None

    (x, bad), _ = jax.lax.scan(step, (x_T, jnp.asarray(-1, jnp.int32)), jnp.arange(T))
    return SamplerOutput(x, T, bad)
