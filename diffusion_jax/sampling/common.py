"""What every sampler shares: its output, non-finite tracking, noise injection and input checks."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[Any, Any, Any], Any]


class SamplerOutput(NamedTuple):
    """x: the final state at ts[-1]; nfe: denoiser evaluations used (int, or an int array for adaptive
    solvers); nonfinite_step: index of the first step whose state was NaN/inf, -1 if none."""

    x: jax.Array
    nfe: Any
    nonfinite_step: jax.Array


def batch_time(t, x) -> jax.Array:
    """A scalar time broadcast to the per-example vector (B,) the denoiser signature takes."""
    return jnp.full((x.shape[0],), t, dtype=jnp.result_type(t))


def track_nonfinite(bad: jax.Array, i, x: jax.Array) -> jax.Array:
    """Keeps the first step index i at which x stopped being finite (bad = -1 until then)."""
    ok = jnp.all(jnp.isfinite(x))
    return jnp.where((bad < 0) & ~ok, jnp.asarray(i, jnp.int32), bad)


def step_noise(key, noise, i, shape, dtype=jnp.float32, k: int | None = None) -> jax.Array:
    """The Gaussian noise of step i: noise[i] if pre-drawn noise (num_steps, ...) is injected, else
    drawn from fold_in(key, i). With k, the k-th of several draws of the same step."""
    if noise is not None:
        noise = jnp.asarray(noise)
        return noise[i] if k is None else noise[i, k]
    if key is None:
        raise ValueError("this sampler is stochastic: pass key= (or pre-drawn noise=)")
    sub = jax.random.fold_in(key, i)
    if k is not None:
        sub = jax.random.fold_in(sub, k)
    return jax.random.normal(sub, shape, dtype)


def check_denoiser(eps_fn: EpsFn, x, t, cond, *, pair: bool = False) -> None:
    """Abstractly evaluates eps_fn once and checks that it returns an array shaped like x (with
    pair=True: a pair of them, e.g. (eps, v) for ancestral sampling with variance='learned_range')."""
    try:
        out = jax.eval_shape(eps_fn, x, batch_time(jnp.asarray(t, jnp.float32), x), cond)
    except Exception as e:  # noqa: BLE001 - re-raised with the shapes that caused it
        raise ValueError(f"the denoiser failed on x of shape {tuple(x.shape)}: {type(e).__name__}: {e}") from e
    outs = out if pair and isinstance(out, (tuple, list)) and len(out) == 2 else (out,)
    want = "a pair (eps, v) of arrays" if pair else "eps"
    if (pair and len(outs) != 2) or any(not hasattr(o, "shape") or tuple(o.shape) != tuple(x.shape)
                                        for o in outs):
        got = [getattr(o, "shape", type(o).__name__) for o in outs] if pair else \
            getattr(out, "shape", type(out).__name__)
        raise ValueError(f"the denoiser must return {want} shaped like x {tuple(x.shape)}, got {got}")


def raise_if_nonfinite(out: SamplerOutput, ts, name: str) -> None:
    """Raises FloatingPointError naming the step and time if the sampler hit NaN/inf (host-side)."""
    step = int(out.nonfinite_step)
    if step >= 0:
        ts = np.asarray(ts)
        t = ts[min(step, len(ts) - 1)]
        raise FloatingPointError(
            f"sampler {name!r}: the state became non-finite (NaN/inf) at step {step} (t = {t:.6g}); "
            "the denoiser returned non-finite values there or the step size is unstable"
        )
