"""Samplers and solvers over one denoiser signature `eps_fn(x, t, cond) -> eps`.

Every sampler is a flat, pure function (k-diffusion style, the loop a `lax.scan`):

    sampler(eps_fn, process, x, ts, *, cond=None, key=None, noise=None, **options) -> SamplerOutput

with x the state at ts[0] and ts a decreasing grid from `time_grid`. `sample(name, ...)` draws the
prior, builds the grid, runs the jitted sampler and checks its output.

    where                  what
    ancestral.py           DDPM ancestral sampling
    ddim.py                DDIM with eta, deterministic DDIM inversion
    sde.py                 Euler-Maruyama on the reverse SDE, predictor-corrector (Langevin corrector)
    ode.py                 probability-flow ODE: Euler, Heun (EDM, with churn), adaptive (diffrax)
    dpm_solver.py          DPM-Solver++ 2M / 3M (multistep, data prediction) and 2M-SDE
    unipc.py               UniPC (bh2)
    guidance.py            classifier-free and classifier guidance wrappers
    grids.py               time-step spacings
    optimized_grid.py      time grids fitted to a sampler and denoiser (`optimize_time_grid`)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process
from diffusion_jax.processes.predictions import x0_from_eps
from diffusion_jax.sampling.ancestral import ancestral
from diffusion_jax.sampling.common import (
    SamplerOutput, batch_time, check_denoiser, raise_if_nonfinite,
)
from diffusion_jax.sampling.ddim import ddim, ddim_invert
from diffusion_jax.sampling.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from diffusion_jax.sampling.grids import SPACINGS, check_grid, time_grid
from diffusion_jax.sampling.optimized_grid import GridFit, optimize_time_grid
from diffusion_jax.sampling.guidance import classifier_free_guidance, classifier_guidance
from diffusion_jax.sampling.ode import adaptive, euler, heun
from diffusion_jax.sampling.sde import euler_maruyama, predictor_corrector
from diffusion_jax.sampling.unipc import unipc


class SamplerSpec(NamedTuple):
    fn: Callable
    stochastic: bool
    nfe_per_step: float  # evaluations per grid step with default options (Heun: 2; PC: 1 + 1 corrector step)
    default_spacing: str
    deterministic_ode: bool  # converges to the probability-flow ODE solution from the same x_T


SAMPLERS: dict[str, SamplerSpec] = {
    "ancestral": SamplerSpec(ancestral, True, 1, "uniform", False),
    "ddim": SamplerSpec(ddim, False, 1, "uniform", True),  # eta = 0; eta > 0 is stochastic
    "euler_maruyama": SamplerSpec(euler_maruyama, True, 1, "uniform", False),
    "pc": SamplerSpec(predictor_corrector, True, 2, "uniform", False),
    "euler": SamplerSpec(euler, False, 1, "uniform", True),
    "heun": SamplerSpec(heun, False, 2, "karras", True),
    "adaptive": SamplerSpec(adaptive, False, 0, "uniform", True),
    "dpmpp_2m": SamplerSpec(dpmpp_2m, False, 1, "logsnr", True),
    "dpmpp_3m": SamplerSpec(dpmpp_3m, False, 1, "logsnr", True),
    "dpmpp_2m_sde": SamplerSpec(dpmpp_2m_sde, True, 1, "logsnr", False),
    "unipc": SamplerSpec(unipc, False, 1, "logsnr", True),
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


@functools.partial(jax.jit, static_argnames=("name", "eps_fn", "process", "denoise_final", "options"))
def _run(name, eps_fn, process, x, ts, cond, key, denoise_final, options):
    out = SAMPLERS[name].fn(eps_fn, process, x, ts, cond=cond, key=key, **dict(options))
    if denoise_final:
        t = batch_time(ts[-1], out.x)
        x0 = x0_from_eps(process, out.x, t, eps_fn(out.x, t, cond))
        out = out._replace(x=x0, nfe=out.nfe + 1)
    return out


def sample(name: str, eps_fn: Callable, process: Process, key, shape, *, num_steps: int = 20,
           spacing: str | None = None, cond: Any = None, x_init=None, t_start: float | None = None,
           t_end: float | None = None, denoise_final: bool = False, check: bool = True,
           ts=None, **options) -> SamplerOutput:
    """Draws x_T ~ prior (or takes x_init), runs sampler `name` on an N-step grid and returns its output.

    The call is jitted once per (sampler, eps_fn, process, shapes, options); `key` seeds both the prior
    draw and the sampler's noise, so the same key gives the same samples. With check=True the
    denoiser's output shape is checked first and non-finite states raise FloatingPointError.
    `ts` (a decreasing grid, e.g. `optimize_time_grid(...).ts`) replaces num_steps/spacing/t_start/t_end.
    """
    spec = get_sampler(name)
    spacing = spec.default_spacing if spacing is None else spacing
    if name == "adaptive":
        num_steps = 1
    if ts is None:
        ts = time_grid(process, num_steps, spacing, t_start=t_start, t_end=t_end)
    else:
        ts = check_grid(process, ts)
        t_start = float(ts[0])
    k_prior, k_sampler = jax.random.split(key)
    if x_init is None:
        x = process.prior_sample(k_prior, tuple(shape))
        if t_start is not None and t_start < process.t_max:
            raise ValueError("t_start below t_max needs x_init (a state at t_start), not a prior draw")
    else:
        x = jnp.asarray(x_init, jnp.float32)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x.shape)} but shape={tuple(shape)} was requested")
    if check:
        check_denoiser(eps_fn, x, ts[0], cond, pair=options.get("variance") == "learned_range")
    options = tuple(sorted(options.items()))
    out = _run(name, eps_fn, process, x, ts, cond, k_sampler, denoise_final, options)
    if check:
        raise_if_nonfinite(out, ts, name)
    return out


def steps_for_nfe(name: str, nfe: int) -> int:
    """The number of grid steps that spends at most `nfe` denoiser evaluations with default options."""
    spec = get_sampler(name)
    return max(1, int(nfe // spec.nfe_per_step)) if spec.nfe_per_step else nfe


__all__ = [
    "GridFit", "SAMPLERS", "SPACINGS", "SamplerOutput", "SamplerSpec", "adaptive", "ancestral", "classifier_free_guidance",
    "classifier_guidance", "ddim", "ddim_invert", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "euler", "euler_maruyama",
    "check_grid", "get_sampler", "heun", "optimize_time_grid", "predictor_corrector", "sample", "steps_for_nfe", "time_grid", "unipc",
]
