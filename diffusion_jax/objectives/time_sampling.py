"""Training-time distributions: which t (or noise level) each example of a batch is noised to.

Every sampler returns a `TimeSample(t, weight, index)`: per-example times t (B,) float32 in
[t_min, t_max], the importance weight relative to the objective's reference distribution (uniform t
on [t_min, t_max]; uniform timesteps on a discrete process), so that E_p[weight * l(t)] = E_ref[l(t)],
and the integer DDPM timestep on a discrete process (else None).

  uniform     t ~ U[t_min, t_max]                                                      weight 1
  stratified  t_i = t_min + (t_max - t_min) mod(u + i/B, 1), one u per batch (VDM's low-discrepancy
              sampler): one t in each of the B strata                                   weight 1
  importance  p(t) proportional to g(t)^2 / sigma(t)^2 (Song et al. 2021, likelihood weighting).
              For ANY linear Gaussian process g^2 = d sigma^2/dt - 2 f sigma^2 and
              d lambda/dt = 2 f - d log sigma^2/dt, so  g^2 / sigma^2 = -d lambda/dt:  p(t) is the
              density of t = t_from_log_snr(lambda) with lambda ~ U[lambda(t_max), lambda(t_min)].
              weight = Z / ((t_max - t_min) g^2/sigma^2),  Z = lambda(t_min) - lambda(t_max)
  lognormal   EDM's ln(sigma) ~ N(P_mean, P_std^2) with sigma = sigma/alpha (edm_sigma), mapped to
              t = t_from_edm_sigma(sigma) and clipped to [t_min, t_max]               weight 1
  logit_normal  SD3's u = sigmoid(m + s n), n ~ N(0, 1) (Esser et al. 2024; m = logit_mean,
              s = logit_std), t = t_min + (t_max - t_min) u                           weight 1
  mode        SD3's mode sampling u = 1 - v - c (cos^2(pi v/2) - 1 + v), v ~ U[0, 1], c = mode_scale
              in [-1, 2/(pi - 2)] (monotone; c = 0 is uniform), t = t_min + (t_max - t_min) u  weight 1

On a discrete process (`DiscreteDDPM`) every sampler draws integer timesteps n with t = (n+1)/T:
uniform n, stratified n_i = floor(K mod(u + i/B, 1)), importance p(n) proportional to g^2/sigma^2
at t_n, lognormal rounded to the nearest timestep, and logit_normal / mode n = round(n_min + u
(n_max - n_min)).

The loss-aware sampler of improved DDPM (Nichol & Dhariwal 2021, `LossSecondMomentResampler`) keeps,
per time bucket, the last `history_per_bucket` losses and samples buckets with probability
proportional to sqrt(E[L^2]) (uniform until every bucket is full), mixed with `uniform_prob` of the
uniform distribution. Its state is a pytree, so it runs under jit:

    state = init_loss_history(num_buckets)
    idx, w = sample_from_history(state, key, batch)          # buckets and weights 1 / (K p(idx))
    t = bucket_time(process, key, idx, num_buckets)          # t inside each bucket
    loss, aux = loss_fn(params, {'x': x, 't': t, 't_weight': w}, rng)   # aux: return_per_example=True
    state = update_history(state, idx, aux['per_example']['time_loss'])
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.processes.vp import DiscreteDDPM

Array = jax.Array

TIME_SAMPLINGS = ("uniform", "stratified", "importance", "lognormal", "logit_normal", "mode")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


class TimeSample(NamedTuple):
    """t (B,) float32; weight (B,) float32 importance weight w.r.t. the reference distribution;
    index (B,) int32 DDPM timestep n with t = (n+1)/T on a discrete process, else None."""

    t: Array
    weight: Array
    index: Optional[Array] = None


def check_option(what: str, value, valid) -> None:
    """Raises ValueError naming the option and listing its valid values."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(valid)}")


# --- discrete timesteps ------------------------------------------------------------------------
def is_discrete(process: Process, discrete: bool | None = None) -> bool:
    """Whether to draw integer timesteps: `discrete` if given, else True for a `DiscreteDDPM`."""
    if discrete is None:
        return isinstance(process, DiscreteDDPM)
    if discrete and not isinstance(process, DiscreteDDPM):
        raise ValueError(f"discrete=True needs a DiscreteDDPM process, got {process.describe()}")
    return bool(discrete)


def discrete_range(process: DiscreteDDPM) -> tuple[int, int]:
    """The timesteps n_min..n_max (inclusive) whose t = (n+1)/T lies in [t_min, t_max]."""
    T = process.num_steps
    n_min = max(0, math.ceil(process.t_min * T - 1 - 1e-6))
    n_max = min(T - 1, math.floor(process.t_max * T - 1 + 1e-6))
    if n_max < n_min:
        raise ValueError(f"no DDPM timestep lies in [t_min, t_max] of {process.describe()}")
    return n_min, n_max


def time_from_index(process: DiscreteDDPM, n) -> Array:
    """t = (n + 1) / T for DDPM timesteps n."""
    return (jnp.asarray(n).astype(as_time(0.0).dtype) + 1.0) / process.num_steps


def _discrete(process, n) -> TimeSample:
    n = n.astype(jnp.int32)
    return TimeSample(time_from_index(process, n), jnp.ones(n.shape, as_time(0.0).dtype), n)


def _from_unit(process: Process, u) -> Array:
    return jnp.clip(process.t_min + u * (process.t_max - process.t_min), process.t_min, process.t_max)


# --- samplers ------------------------------------------------------------------------------------
def uniform_time(process: Process, key, batch: int, *, discrete: bool | None = None) -> TimeSample:
    """t ~ U[t_min, t_max]; on a discrete process n ~ U{n_min..n_max}."""
    if is_discrete(process, discrete):
        lo, hi = discrete_range(process)
        return _discrete(process, jax.random.randint(key, (batch,), lo, hi + 1))
    u = jax.random.uniform(key, (batch,), as_time(0.0).dtype)
    return TimeSample(_from_unit(process, u), jnp.ones_like(u))


def stratified_time(process: Process, key, batch: int, *, discrete: bool | None = None) -> TimeSample:
    """VDM's low-discrepancy t: u_i = mod(u + i/B, 1) with one u ~ U[0, 1) for the whole batch."""
    dt = as_time(0.0).dtype
    u = jnp.mod(jax.random.uniform(key, (), dt) + jnp.arange(batch, dtype=dt) / batch, 1.0)
    if is_discrete(process, discrete):
        lo, hi = discrete_range(process)
        k = hi - lo + 1
        return _discrete(process, lo + jnp.minimum(jnp.floor(u * k), k - 1))
    return TimeSample(_from_unit(process, u), jnp.ones_like(u))


def likelihood_importance_density(process: Process, t) -> Array:
    """p(t) = (g^2/sigma^2) / Z on [t_min, t_max], Z = lambda(t_min) - lambda(t_max)."""
    t = as_time(t)
    z = process.log_snr(as_time(process.t_min)) - process.log_snr(as_time(process.t_max))
    return process.g2(t) / process.sigma(t) ** 2 / z


def likelihood_importance_time(process: Process, key, batch: int, *,
                               discrete: bool | None = None) -> TimeSample:
    """t with density proportional to g^2/sigma^2 = -d lambda/dt: lambda ~ U[lambda(t_max),
    lambda(t_min)], t = t_from_log_snr(lambda); weight = 1 / ((t_max - t_min) p(t)).

    On a discrete process: p(n) proportional to g^2/sigma^2 at t_n, weight = 1 / (K p(n))."""
    dt = as_time(0.0).dtype
    if is_discrete(process, discrete):
        lo, hi = discrete_range(process)
        t_all = time_from_index(process, jnp.arange(lo, hi + 1))
        logits = jnp.log(process.g2(t_all)) - 2.0 * process.log_sigma(t_all)
        n = jax.random.categorical(key, logits, shape=(batch,))
        p = jax.nn.softmax(logits)[n]
        return TimeSample(t_all[n], 1.0 / (p * (hi - lo + 1)), (lo + n).astype(jnp.int32))
    lam_hi = process.log_snr(as_time(process.t_min))
    lam_lo = process.log_snr(as_time(process.t_max))
    u = jax.random.uniform(key, (batch,), dt)
    t = jnp.clip(process.t_from_log_snr(lam_lo + u * (lam_hi - lam_lo)), process.t_min, process.t_max)
    weight = 1.0 / ((process.t_max - process.t_min) * likelihood_importance_density(process, t))
    return TimeSample(t, weight)


def edm_sigma_sample(key, batch: int, p_mean: float = -1.2, p_std: float = 1.2) -> Array:
    """EDM's training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,), as_time(0.0).dtype))


def lognormal_time(process: Process, key, batch: int, *, p_mean: float = -1.2, p_std: float = 1.2,
                   discrete: bool | None = None) -> TimeSample:
    """EDM's log-normal noise levels as times: t = t_from_edm_sigma(sigma), clipped to the range
    (rounded to the nearest timestep on a discrete process); weight 1 (the distribution defines the
    objective)."""
    t = process.t_from_edm_sigma(edm_sigma_sample(key, batch, p_mean, p_std))
    if is_discrete(process, discrete):
        lo, hi = discrete_range(process)
        return _discrete(process, jnp.clip(jnp.round(t * process.num_steps - 1.0), lo, hi))
    t = jnp.clip(t, process.t_min, process.t_max)
    return TimeSample(t, jnp.ones_like(t))


def _from_unit_or_index(process: Process, u, discrete) -> TimeSample:
    """t = t_min + (t_max - t_min) u, or the timestep n = round(n_min + u (n_max - n_min))."""
    if is_discrete(process, discrete):
        lo, hi = discrete_range(process)
        return _discrete(process, jnp.clip(jnp.round(lo + u * (hi - lo)), lo, hi))
    return TimeSample(_from_unit(process, u), jnp.ones_like(u))


def check_time_options(method: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29) -> dict:
    """Validates the options of time sampler `method`; returns those it takes, as floats."""
    check_option("time sampling", method, TIME_SAMPLINGS)
    def num(name, v):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a float, got {v!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
        return v
    if method == "logit_normal":
        m, s = num("logit_mean", logit_mean), num("logit_std", logit_std)
        if not s > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
        return {"logit_mean": m, "logit_std": s}
    if method == "mode":
        c = num("mode_scale", mode_scale)
        lo, hi = MODE_SCALE_RANGE
        if not lo <= c <= hi:
            raise ValueError(f"mode_scale must lie in [{lo:g}, {hi:.4g}] (outside, SD3's mode map is not "
                             f"monotone), got {mode_scale!r}")
        return {"mode_scale": c}
    return {}


def logit_normal_time(process: Process, key, batch: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                      discrete: bool | None = None) -> TimeSample:
    """SD3's logit-normal times: u = sigmoid(m + s n), n ~ N(0, 1), t = t_min + (t_max - t_min) u
    (density p(u) = exp(-(logit u - m)^2/(2 s^2)) / (s sqrt(2 pi) u (1 - u))); weight 1."""
    check_time_options("logit_normal", logit_mean=logit_mean, logit_std=logit_std)
    n = jax.random.normal(key, (batch,), as_time(0.0).dtype)
    return _from_unit_or_index(process, jax.nn.sigmoid(logit_mean + logit_std * n), discrete)


def mode_map(v, mode_scale: float = 1.29):
    """SD3's f_mode(v) = 1 - v - c (cos^2(pi v/2) - 1 + v), decreasing from 1 to 0 for c in MODE_SCALE_RANGE."""
    v = as_time(v)
    return 1.0 - v - mode_scale * (jnp.cos(0.5 * math.pi * v) ** 2 - 1.0 + v)


def mode_time(process: Process, key, batch: int, *, mode_scale: float = 1.29,
              discrete: bool | None = None) -> TimeSample:
    """SD3's mode sampling: u = mode_map(v), v ~ U[0, 1], t = t_min + (t_max - t_min) u; weight 1.
    c > 0 concentrates t at the middle of the range, c < 0 at its ends."""
    check_time_options("mode", mode_scale=mode_scale)
    v = jax.random.uniform(key, (batch,), as_time(0.0).dtype)
    return _from_unit_or_index(process, jnp.clip(mode_map(v, mode_scale), 0.0, 1.0), discrete)


def sample_time(process: Process, key, batch: int, method: str = "uniform", *,
                discrete: bool | None = None, p_mean: float = -1.2, p_std: float = 1.2,
                logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> TimeSample:
    """Dispatches to the sampler named `method` (one of TIME_SAMPLINGS)."""
    check_option("time sampling", method, TIME_SAMPLINGS)
    if method == "logit_normal":
        return logit_normal_time(process, key, batch, logit_mean=logit_mean, logit_std=logit_std,
                                 discrete=discrete)
    if method == "mode":
        return mode_time(process, key, batch, mode_scale=mode_scale, discrete=discrete)
    if method == "uniform":
        return uniform_time(process, key, batch, discrete=discrete)
    if method == "stratified":
        return stratified_time(process, key, batch, discrete=discrete)
    if method == "importance":
        return likelihood_importance_time(process, key, batch, discrete=discrete)
    return lognormal_time(process, key, batch, p_mean=p_mean, p_std=p_std, discrete=discrete)


# --- improved DDPM's loss-second-moment sampler ---------------------------------------------------
class LossHistory(NamedTuple):
    """history (K, H): the last H losses of each of K buckets (oldest first); counts (K,) int32."""

    history: Array
    counts: Array


def init_loss_history(num_buckets: int, history_per_bucket: int = 10) -> LossHistory:
    return LossHistory(jnp.zeros((num_buckets, history_per_bucket), jnp.float32),
                       jnp.zeros((num_buckets,), jnp.int32))


def history_probs(state: LossHistory, uniform_prob: float = 1e-3) -> Array:
    """p_k proportional to sqrt(mean of the bucket's squared losses), mixed with uniform_prob of
    the uniform distribution; exactly uniform until every bucket holds a full history."""
    k, h = state.history.shape
    w = jnp.sqrt(jnp.mean(state.history ** 2, axis=-1))
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    p = (1.0 - uniform_prob) * w + uniform_prob / k
    warm = jnp.all(state.counts == h)
    return jnp.where(warm, p, jnp.full((k,), 1.0 / k, jnp.float32))


def sample_from_history(state: LossHistory, key, batch: int, uniform_prob: float = 1e-3
                        ) -> tuple[Array, Array]:
    """Buckets idx (B,) int32 drawn from `history_probs` and weights 1 / (K p_idx)."""
    p = history_probs(state, uniform_prob)
    idx = jax.random.categorical(key, jnp.log(p), shape=(batch,)).astype(jnp.int32)
    return idx, 1.0 / (p.shape[0] * p[idx])


def update_history(state: LossHistory, t_idx, losses) -> LossHistory:
    """Appends each loss to its bucket's history in batch order, dropping the oldest once full."""
    h = state.history.shape[1]

    def push(st, item):
        i, loss = item
        row, c = st.history[i], st.counts[i]
        shifted = jnp.concatenate([row[1:], loss[None]])
        row = jnp.where(c == h, shifted, row.at[jnp.minimum(c, h - 1)].set(loss))
        return LossHistory(st.history.at[i].set(row), st.counts.at[i].set(jnp.minimum(c + 1, h))), None

    items = (jnp.asarray(t_idx, jnp.int32), jax.lax.stop_gradient(jnp.asarray(losses, jnp.float32)))
    return jax.lax.scan(push, state, items)[0]


def bucket_time(process: Process, key, idx, num_buckets: int, *, discrete: bool | None = None) -> Array:
    """Times for history buckets: on a discrete process bucket k is timestep n_min + k (needs
    num_buckets = n_max - n_min + 1); otherwise t uniform inside the k-th of num_buckets equal
    sub-intervals of [t_min, t_max]."""
    idx = jnp.asarray(idx)
    if is_discrete(process, discrete):
        lo, hi = discrete_range(process)
        if num_buckets != hi - lo + 1:
            raise ValueError(f"a discrete process needs num_buckets = {hi - lo + 1} (one per timestep), "
                             f"got {num_buckets}")
        return time_from_index(process, lo + idx)
    u = (idx.astype(as_time(0.0).dtype) + jax.random.uniform(key, idx.shape, as_time(0.0).dtype)) / num_buckets
    return _from_unit(process, u)


def time_bucket(process: Process, t, num_buckets: int, *, discrete: bool | None = None) -> Array:
    """The bucket (int32) of times t: the inverse of `bucket_time`."""
    t = as_time(t)
    if is_discrete(process, discrete):
        lo, _ = discrete_range(process)
        return (jnp.round(t * process.num_steps - 1.0) - lo).astype(jnp.int32)
    u = (t - process.t_min) / (process.t_max - process.t_min)
    return jnp.clip(jnp.floor(u * num_buckets), 0, num_buckets - 1).astype(jnp.int32)
