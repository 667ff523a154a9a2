"""SDEdit: guided image synthesis and editing with a diffusion model (Meng et al. 2022).

A guide y (a stroke painting, a corrupted or coarse image) is perturbed to an intermediate time t0 with
the process' own marginal and solved back to t_min with any sampler of the library:

    x(t0) = alpha(t0) y + sigma(t0) z,   z ~ N(0, I);      x = sampler(x(t0), t0 -> t_min)

t0 trades faithfulness for realism: t0 -> t_min returns y itself (up to sigma(t_min) noise), t0 = t_max
forgets y (alpha(t_max) ~ 0) and samples the model's data law. `sdedit_sweep` runs a list of t0 and
reports the faithfulness ||x - y|| (per-example L2, the paper's 'L2 to the stroke input') and, given a
`realism_fn`, a realism score of the outputs (e.g. the exact log-density of a mixture in the tests; the
paper uses KID / human study on images).

The step count scales with t0 as in the paper's 'fewer steps for smaller t0': with `num_steps=None`,
N = ceil(full_steps (t0 - t_min) / (t_max - t_min)) steps of the sampler's grid from t0 to t_min.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, schedule_dtype
from diffusion_jax.sampling.common import SamplerOutput

__all__ = ["SDEditRow", "sdedit", "sdedit_steps", "sdedit_sweep", "t0_from_fraction"]


def t0_from_fraction(process: Process, s: float) -> float:
    """t0 = t_min + s (t_max - t_min) for a fraction s in (0, 1] of the process' time range."""
    s = float(s)
    if not 0.0 < s <= 1.0:
        raise ValueError(f"t0 fraction must lie in (0, 1], got {s!r}")
    return float(process.t_min + s * (process.t_max - process.t_min))


def sdedit_steps(process: Process, t0: float, full_steps: int) -> int:
    """ceil(full_steps (t0 - t_min) / (t_max - t_min)), at least 1."""
    frac = (float(t0) - process.t_min) / (process.t_max - process.t_min)
    return max(1, int(math.ceil(full_steps * frac - 1e-9)))


def sdedit(eps_fn: Callable, process: Process, guide, key, t0: float, *, sampler: str = "euler_maruyama",
           num_steps: int | None = None, full_steps: int = 100, spacing: str | None = None, cond: Any = None,
           denoise_final: bool = False, **options) -> SamplerOutput:
    """SDEdit from the guide y (B, ...) at the start time t0 (module docstring): x(t0) from
    fold_in(key, 0), then `sampling.sample(sampler, ..., x_init=x(t0), t_start=t0)` with key
    fold_in(key, 1). t0 = t_min returns x(t0) itself (NFE 0). Options pass to the sampler."""
    from diffusion_jax.sampling import sample  # the registry imports this package
    t0 = float(t0)
    process.check_t(jnp.asarray(t0), "t0")
    guide = jnp.asarray(guide, schedule_dtype())
    z = jax.random.normal(jax.random.fold_in(key, 0), guide.shape, guide.dtype)
    x = process.add_noise(guide, z, t0)
    if t0 <= process.t_min * (1.0 + 1e-6):
        return SamplerOutput(x, 0, jnp.int32(-1))
    n = sdedit_steps(process, t0, full_steps) if num_steps is None else int(num_steps)
    return sample(sampler, eps_fn, process, jax.random.fold_in(key, 1), x.shape, num_steps=n, spacing=spacing,
                  cond=cond, x_init=x, t_start=t0, denoise_final=denoise_final, **options)


class SDEditRow(NamedTuple):
    """One t0 of a sweep: x (B, ...) the edits, faithfulness the mean over examples of ||x - y||_2,
    faithfulness_per_example (B,), realism realism_fn(x) (None without one), nfe."""

    t0: float
    x: jax.Array
    faithfulness: float
    faithfulness_per_example: jax.Array
    realism: Any
    nfe: int


def sdedit_sweep(eps_fn: Callable, process: Process, guide, key, t0s: Sequence[float], *,
                 realism_fn: Callable | None = None, **kwargs) -> list[SDEditRow]:
    """`sdedit` at each t0 (same key: the same z and sampler noise at every t0) -> one SDEditRow per t0."""
    guide = jnp.asarray(guide, schedule_dtype())
    rows = []
    for t0 in t0s:
        out = sdedit(eps_fn, process, guide, key, t0, **kwargs)
        d = jnp.sqrt(jnp.sum(jnp.reshape(out.x - guide, (guide.shape[0], -1)) ** 2, axis=-1))
        rows.append(SDEditRow(float(t0), out.x, float(jnp.mean(d)), d,
                              None if realism_fn is None else realism_fn(out.x), int(out.nfe)))
    return rows
