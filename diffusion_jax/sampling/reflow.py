"""Rectified flow's reflow (Liu, Gong, Liu 2023): couple noise and data with a flow's ODE, measure how
straight the flow is, and train the next flow on the coupled pairs (`objectives.reflow_loss`).

With data at t = 0 and noise at t = 1 (`processes.Flow`), a flow is the probability-flow ODE
dx/dt = u(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t) of a denoiser `eps_fn` (the library's one
signature; a velocity network enters through `processes.as_eps_fn(net, 'flow', process)`).

  pairs        z ~ prior at t_max, x = ODE(z) at t_min: the deterministic coupling (x, z) of the flow
               (`draw_pairs`; k-rectified flow trains on the pairs of the (k-1)-th)
  straightness S = E (1/T) int_{t_min}^{t_max} ||(z - x) / T - u(x_t, t)||^2 dt,   T = t_max - t_min
               (Liu et al.'s S(Z) = int_0^1 E||(Z_1 - Z_0) - dZ_t/dt||^2 dt in the time of the path,
               their Z_0 our data end): S = 0 iff every trajectory is a straight line at constant speed,
               the case in which one Euler step is exact. By sum_i dt_i u_i = x_N - x_0 (Euler),
               S = (1/T) int ||u||^2 dt - ||(z - x)/T||^2, accumulated in one pass (`straightness`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time, schedule_dtype
from diffusion_jax.sampling.common import check_denoiser
from diffusion_jax.sampling.grids import time_grid
from diffusion_jax.sampling.ode import pf_drift, state_dtype

__all__ = ["Straightness", "draw_pairs", "straightness", "one_step"]


def draw_pairs(eps_fn: Callable, process: Process, key, shape, *, sampler: str = "heun", num_steps: int = 32,
               spacing: str | None = None, cond: Any = None, **options) -> tuple[jax.Array, jax.Array]:
    """(x, z): noise z ~ prior (shape `shape`) and the flow's ODE solution x from z at t_max to t_min with a
    deterministic sampler of `sampling.SAMPLERS` (jitted `lax.scan`, `sampling.sample`). x is the data end
    (batch['x'] of `objectives.reflow_loss`), z the noise end (batch['noise'])."""
    from diffusion_jax.sampling import get_sampler, sample  # the registry imports this package
    if get_sampler(sampler).stochastic or not get_sampler(sampler).deterministic_ode:
        raise ValueError(f"sampler: reflow pairs need a deterministic ODE sampler, got {sampler!r}")
    z = process.prior_sample(key, tuple(shape), schedule_dtype())
    out = sample(sampler, eps_fn, process, key, z.shape, num_steps=num_steps, spacing=spacing, cond=cond,
                 x_init=z, **options)
    return out.x, z


class Straightness(NamedTuple):
    """value (B,): S per example (summed over dimensions); x (B, ...): the N-step Euler endpoint at t_min;
    nfe: N."""

    value: jax.Array
    x: jax.Array
    nfe: int


def straightness(eps_fn: Callable, process: Process, z, *, num_steps: int = 100, cond: Any = None,
                 ts=None) -> Straightness:
    """S of the flow of eps_fn from the noise z at t_max (module docstring), per example, with N uniform
    Euler steps in t (a Riemann sum of ||u||^2 and the Euler endpoint x):

        S = (1/T) sum_i |t_{i+1} - t_i| ||u(x_i, t_i)||^2 - ||(z - x_N)/T||^2.

    Jittable (jit it with eps_fn and process static); `ts` replaces the uniform grid."""
    z = jnp.asarray(z, state_dtype(z))
    if ts is None:
        ts = time_grid(process, int(num_steps), "uniform")
    ts = as_time(ts)
    span = ts[0] - ts[-1]
    axes = tuple(range(1, z.ndim))

    def step(carry, i):
        x, acc = carry
        t, t_next = ts[i], ts[i + 1]
        u = pf_drift(eps_fn, process, x, t, cond)
        acc = acc + (t - t_next) * jnp.sum(u.astype(jnp.float32) ** 2, axis=axes)
        return ((x + (t_next - t) * u).astype(x.dtype), acc), None

    n = ts.shape[0] - 1
    (x, acc), _ = jax.lax.scan(step, (z, jnp.zeros(z.shape[:1], jnp.float32)), jnp.arange(n))
    mean_u = (z - x) / span
    return Straightness(acc / span - jnp.sum(mean_u ** 2, axis=axes), x, n)


def one_step(eps_fn: Callable, process: Process, z, *, cond: Any = None) -> jax.Array:
    """The one-step Euler sample x = z + (t_min - t_max) u(z, t_max) of the flow (exact iff S = 0)."""
    z = jnp.asarray(z, state_dtype(z))
    check_denoiser(eps_fn, z, process.t_max, cond)
    t0, t1 = as_time(process.t_max), as_time(process.t_min)
    return z + (t1 - t0) * pf_drift(eps_fn, process, z, t0, cond)
