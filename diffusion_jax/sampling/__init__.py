"""Samplers and solvers over one denoiser signature `eps_fn(x, t, cond) -> eps`.

Every sampler is a flat, pure function (k-diffusion style, the loop a `lax.scan`):

    sampler(eps_fn, process, x, ts, *, cond=None, key=None, noise=None, **options) -> SamplerOutput

with x the state at ts[0] and ts a decreasing grid from `time_grid`. `sample(name, ...)` draws the
prior, builds the grid, runs the jitted sampler and checks its output.

    where                  what
    ancestral.py           DDPM ancestral sampling
    ddim.py                DDIM with eta, deterministic DDIM inversion
    sde.py                 Euler-Maruyama on the reverse SDE, predictor-corrector (Langevin corrector)
    ode.py                 probability-flow ODE: Euler, midpoint, Heun (EDM, with churn), adaptive (diffrax)
    dpm_solver.py          DPM-Solver++ 2M / 3M (multistep, data prediction) and 2M-SDE
    unipc.py               UniPC (bh2)
    sdedit.py              SDEdit: perturb a guide to t0, solve back with any sampler; the t0 sweep
    reflow.py              rectified flow's reflow: ODE (data, noise) pairs, straightness, one-step sample
    ddgan.py               the denoising diffusion GAN's T-step generation (generator x0 + DDPM posterior;
                           its own signature, not in SAMPLERS)
    guidance.py            classifier-free and classifier guidance wrappers
    grids.py               time-step spacings
    optimized_grid.py      time grids fitted to a sampler and denoiser (`optimize_time_grid`)
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time, schedule_dtype
from diffusion_jax.sampling.ancestral import ancestral, x0_eps_from_eps
from diffusion_jax.sampling.common import (
    SamplerOutput, batch_time, check_denoiser, raise_if_nonfinite,
)
from diffusion_jax.sampling.ddim import ddim, ddim_invert
from diffusion_jax.sampling.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from diffusion_jax.sampling.grids import SPACINGS, check_grid, time_grid
from diffusion_jax.sampling.optimized_grid import GridFit, optimize_time_grid
from diffusion_jax.sampling.guidance import classifier_free_guidance, classifier_guidance
from diffusion_jax.sampling.ode import adaptive, euler, heun, midpoint
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
    "midpoint": SamplerSpec(midpoint, False, 2, "uniform", True),
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


def _takes(name: str, option: str) -> bool:
    """Whether sampler `name` has the keyword argument `option`."""
    return option in inspect.signature(SAMPLERS[name].fn).parameters


def final_x0(eps_fn: Callable, process: Process, x, t, cond=None, *, clip_x0: bool = False) -> jax.Array:
    """The denoising last step: x0_hat = (x - sigma_t eps(x, t)) / alpha_t at the scalar time t, clipped to
    [-1, 1] with clip_x0, in x's dtype. A pair (eps, v) (learned variance) uses its eps. This is the
    last model call of Ho et al.'s p_sample loop (the posterior mean at t = 1 -> 0 is x0_hat), DDIM's
    step to t = 0, EDM's Euler step to sigma = 0 and score_sde's `noise_removal`."""
    out = eps_fn(x, batch_time(t, x), cond)
    eps = out[0] if isinstance(out, (tuple, list)) else out
    return x0_eps_from_eps(process, x, as_time(t), eps, x.dtype, clip_x0)[0].astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("name", "eps_fn", "process", "denoise_final", "options"))
def _run(name, eps_fn, process, x, ts, cond, key, denoise_final, options):
    options = dict(options)
    out = SAMPLERS[name].fn(eps_fn, process, x, ts, cond=cond, key=key, **options)
    if denoise_final:
        x0 = final_x0(eps_fn, process, out.x, ts[-1], cond, clip_x0=bool(options.get("clip_x0", False)))
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

    denoise_final=True ends with one more denoiser call, x = `final_x0`(x, ts[-1]) (clipped when the
    sampler's clip_x0 is set): the papers' last step (Ho et al.'s p_sample at t = 1, DDIM's step to
    t = 0, EDM's Euler step to sigma = 0, score_sde's noise removal); NFE + 1. The sampler's own last
    step is then not the last one, so a stochastic sampler with `noise_final` (ancestral, ddim with
    eta > 0, euler_maruyama, pc) keeps its noise there (noise_final=True unless passed explicitly):
    ancestral sampling on the DDPM grid t_n = (n + 1)/T with N = T - 1 steps and denoise_final is
    exactly Ho et al.'s sampler, noise added at every step n -> n - 1 and x0_hat returned at n = 0.

    The state (prior draw or x_init) is in the schedule dtype, `processes.schedule_dtype()`: float32,
    or float64 under `jax_enable_x64` (the network may compute in bfloat16; its output is cast).
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
    dtype = schedule_dtype()
    k_prior, k_sampler = jax.random.split(key)
    if x_init is None:
        x = process.prior_sample(k_prior, tuple(shape), dtype)
        if t_start is not None and t_start < process.t_max:
            raise ValueError("t_start below t_max needs x_init (a state at t_start), not a prior draw")
    else:
        x = jnp.asarray(x_init).astype(dtype)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x.shape)} but shape={tuple(shape)} was requested")
    if check:
        check_denoiser(eps_fn, x, ts[0], cond, pair=options.get("variance") == "learned_range")
    if denoise_final and _takes(name, "noise_final"):
        options.setdefault("noise_final", True)
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
    "check_grid", "final_x0", "get_sampler", "heun", "midpoint", "optimize_time_grid", "predictor_corrector", "sample", "steps_for_nfe", "time_grid", "unipc",
]
