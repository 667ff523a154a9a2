"""Shared convergence harness for sampler tests: exact mixtures, sample statistics against true sets,
and the Monte-Carlo noise level of each statistic (compiled pieces cached so each compiles once)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.reference import metrics
from diffusion_jax.reference import mixtures as M

N_SAMPLES = 4000
STATS = ("sw", "weight_error", "mean_error", "cov_error")
SLACK = {"sw": 0.02, "weight_error": 0.005, "mean_error": 0.02, "cov_error": 0.03}


@functools.lru_cache(maxsize=None)
def mixture(name):
    return M.ring_mixture() if name == "ring" else M.random_mixture(0, int(name), 4)


@functools.lru_cache(maxsize=None)
def exact_eps(name, process):
    return M.eps_fn(mixture(name), process)


@jax.jit
def _stats(gm, x, ref):
    fit = metrics.mixture_fit(gm, x)
    sw = metrics.sliced_wasserstein(x, ref, jax.random.PRNGKey(5), num_projections=64)
    return {"sw": sw, **{k: fit[k] for k in STATS[1:]}}


def stats(gm, x, ref):
    return {k: float(v) for k, v in _stats(gm, x, ref).items()}


_sample = jax.jit(lambda gm, key: M.sample(gm, key, N_SAMPLES)[0])


def _truth_sets(gm):
    """A reference sample set of the mixture gm and the mean of each statistic over 4 further independent
    true sets of the same size: the Monte-Carlo noise level."""
    ref = _sample(gm, jax.random.PRNGKey(10))
    level = [stats(gm, _sample(gm, jax.random.PRNGKey(300 + r)), ref) for r in range(4)]
    return ref, {k: float(np.mean([lv[k] for lv in level])) for k in STATS}


_TRUTH = {}


def truth(name, process, t_end):
    """The true marginal at t_end, a reference set and the Monte-Carlo level of each statistic (cached by
    the marginal's (alpha, sigma), so that processes with the same marginal share them)."""
    t_end = jnp.float32(t_end)
    key = (name, round(float(process.alpha(t_end)), 6), round(float(process.sigma(t_end)), 6))
    if key not in _TRUTH:
        gm = M.marginal(mixture(name), process, t_end)
        _TRUTH[key] = (gm,) + _truth_sets(gm)
    return _TRUTH[key]
