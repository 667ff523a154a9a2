"""Improved DDPM's hybrid objective with a learned variance (Nichol & Dhariwal 2021, `learn_sigma=True`).

The network outputs 2C channels [eps, v] on the last axis; v (roughly in [-1, 1]) sets the variance of
the reverse step t -> s by interpolating, in log space, between its two classical choices:

    frac = (v + 1) / 2,     log var = frac log var_beta + (1 - frac) log var_post,
    var_beta = sigma_{t|s}^2 = (1 - r) sigma_t^2,     var_post = (1 - r) sigma_s^2,    r = exp(lambda_t - lambda_s),

so it holds for any process and any respaced pair (t, s) (`sampling.ancestral.posterior_coefs`). On K
training timesteps t_0 < ... < t_{K-1} (t = (n+1)/T on a DiscreteDDPM) step k goes from t_k to
s = t_{k-1}; at k = 0 the step is to the data (alpha_s = 1, sigma_s = 0: mean x0_hat, var_beta = sigma_{t_0}^2)
and var_post = 0 is replaced by the posterior variance of step 1 (improved-diffusion's clipping).

The loss per example, with x_t = alpha x0 + sigma (eps + gamma xi) (DDPM-IP when gamma > 0), is

    L = ||eps - eps_hat||^2 + vb_weight * K * L_k,
    L_k = KL(q(x_s | x_t, x0) || N(c_x x_t + c_x0 x0_hat, var)) / log 2     (k > 0, bits per dim)
    L_0 = -log p(x0 | x_{t_0}) / log 2     (256-bin discretized Gaussian on [-1, 1], bits per dim)

with x0_hat = (x_t - sigma_t stop_gradient(eps_hat)) / alpha_t, so the vb term trains only v. K L_k is
the one-sample estimate of L_vb = L_0 + ... + L_{K-1} for uniform k, so vb_weight = lambda = 0.001 with
K = T = 1000 is improved-diffusion's `loss = mse + vb` (RESCALED_MSE: vb * K / 1000).

time_sampling='loss_aware' draws k with probability proportional to sqrt(E[L^2]) of the last losses of
each timestep (improved DDPM's LossSecondMomentResampler, `time_sampling.LossHistory`), weighting each
example by 1 / (K p_k). That loss is STATEFUL:

    loss_fn = hybrid_loss(process, apply_fn, time_sampling='loss_aware')
    state = loss_fn.init_state()                                # a LossHistory; loss_fn.stateful is True
    loss, aux = loss_fn(params, batch, rng, state)              # aux['model_state']: the updated history

With 'uniform' it is a plain `loss_fn(params, batch, rng)` (loss_fn.stateful False, init_state() == {}).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.objectives.denoising import (REDUCTIONS, check_input_perturbation, noisy_input,
                                                reduce_per_example, split_batch)
from diffusion_jax.objectives.time_sampling import (LossHistory, check_option, discrete_range,
                                                    init_loss_history, sample_from_history, update_history)
from diffusion_jax.processes.base import Process, as_time, bcast
from diffusion_jax.processes.vp import DiscreteDDPM
from diffusion_jax.sampling.ancestral import posterior_coefs

Array = jax.Array
HYBRID_TIME_SAMPLINGS = ("uniform", "loss_aware")
LOG2 = math.log(2.0)


# --- Gaussian likelihood pieces (improved-diffusion's losses.py) -----------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats:
    1/2 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)),
    with -1 + exp(u) - u evaluated as expm1(u) - u (accurate for nearly equal variances)."""
    u = logvar1 - logvar2
    return 0.5 * (jnp.expm1(u) - u + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x) -> Array:
    """Phi(x) ~ 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (the tanh approximation)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> Array:
    """log P(x) elementwise for images x in [-1, 1] quantised to 256 bins of width 2/255:
    P = Phi((x + 1/255 - mu)/s) - Phi((x - 1/255 - mu)/s), the outer bins extended to -inf / +inf
    (x < -0.999: Phi(.) alone; x > 0.999: 1 - Phi(.)), probabilities floored at 1e-12."""
    x, means, log_scales = jnp.broadcast_arrays(x, means, log_scales)
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --- learned-variance network outputs ---------------------------------------------------------------
def split_learned_variance(out) -> tuple[Array, Array]:
    """(eps, v) = (out[..., :C], out[..., C:]) of a network output with 2C channels on the last axis."""
    out = jnp.asarray(out)
    if out.ndim < 1 or out.shape[-1] % 2:
        raise ValueError(f"a learned-variance output needs an even number 2C of channels on the last axis "
                         f"([eps, v]), got shape {tuple(out.shape)}")
    c = out.shape[-1] // 2
    return out[..., :c], out[..., c:]


def learned_variance_eps_fn(fn: Callable) -> Callable:
    """Adapts a 2C-output function (`apply_fn(params, x, t, cond, ...)` or `f(x, t, cond)`) to the plain
    library signature: the same call returning eps = the first C channels (for DDIM, DPM-Solver, ...)."""

    def eps_only(*args, **kwargs):
        return split_learned_variance(fn(*args, **kwargs))[0]

    return eps_only


def learned_variance_pair_fn(fn: Callable) -> Callable:
    """Adapts a 2C-output function to `ancestral(..., variance='learned_range')`: returns (eps, v)."""

    def eps_and_v(*args, **kwargs):
        return split_learned_variance(fn(*args, **kwargs))

    return eps_and_v


# --- the training timesteps and their reverse steps ---------------------------------------------------
class VBSchedule(NamedTuple):
    """Per-timestep tables (K,) float32 of the reverse steps t_k -> t_{k-1} (k = 0: to the data):
    t, the posterior mean coefficients c_x, c_x0, log var_post (clipped at k = 0), log var_beta and
    log_var_gap = log var_beta - log var_post (each rounded once from float64)."""

    t: Array
    c_x: Array
    c_x0: Array
    log_var_post: Array
    log_var_beta: Array
    log_var_gap: Array

    @property
    def num_timesteps(self) -> int:
        return self.t.shape[0]


def vb_timesteps(process: Process, num_timesteps: int | None = None) -> Array:
    """The K increasing training times t_0 < ... < t_{K-1}.

    DiscreteDDPM: t = (n+1)/T for the timesteps n_min..n_max in [t_min, t_max] (default K: all of them;
    a smaller K takes n_k = n_min + round(k (n_max - n_min)/(K - 1)), improved-diffusion's respacing).
    Other processes (num_timesteps required): t_k = t_min + (t_max - t_min) k / (K - 1)."""
    return as_time(_timesteps64(process, num_timesteps))


def _timesteps64(process: Process, num_timesteps: int | None) -> np.ndarray:
    if isinstance(process, DiscreteDDPM):
        lo, hi = discrete_range(process)
        k_max = hi - lo + 1
        k = k_max if num_timesteps is None else _check_k(num_timesteps)
        if k > k_max:
            raise ValueError(f"num_timesteps={k} exceeds the {k_max} timesteps of {process.describe()}")
        n = np.asarray([lo + int(round(i * (hi - lo) / (k - 1))) for i in range(k)], np.float64)
        return (n + 1.0) / process.num_steps
    if num_timesteps is None:
        raise ValueError(f"num_timesteps is required for a continuous-time process ({process.describe()}); "
                         f"it sets the K training timesteps of the vb term")
    k = _check_k(num_timesteps)
    return process.t_min + (process.t_max - process.t_min) * np.arange(k, dtype=np.float64) / (k - 1)


def _check_k(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {k!r}")
    return k


def vb_schedule(process: Process, num_timesteps: int | None = None) -> VBSchedule:
    """The reverse-step tables on `vb_timesteps`: for k >= 1 `posterior_coefs(t_k, t_{k-1})`; for k = 0
    c_x = 0, c_x0 = 1, var_beta = sigma_{t_0}^2 and var_post = the posterior variance of step 1.

    Computed once in float64 and rounded once to float32: adjacent timesteps differ little, so c_x0 and
    log_var_gap = 2 log(sigma_t / sigma_s) (k >= 1) would lose digits to float32 differences."""
    t64 = _timesteps64(process, num_timesteps)
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
        t = jnp.asarray(t64, jnp.float64)
        c_x, c_x0, var, var_beta = posterior_coefs(process, t[1:], t[:-1])
        lv_post = jnp.log(var)
        lv_beta = jnp.concatenate([2.0 * process.log_sigma(t[:1]), jnp.log(var_beta)])
        lv_post = jnp.concatenate([lv_post[:1], lv_post])
        tables = dict(c_x=jnp.concatenate([jnp.zeros((1,)), c_x]), c_x0=jnp.concatenate([jnp.ones((1,)), c_x0]),
                      log_var_post=lv_post, log_var_beta=lv_beta, log_var_gap=lv_beta - lv_post)
        tables = {k: np.asarray(v, np.float64) for k, v in tables.items()}
    with jax.ensure_compile_time_eval():
        return VBSchedule(t=as_time(t64), **{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()})


# --- the loss -------------------------------------------------------------------------------------------
def hybrid_loss_state(process: Process, num_timesteps: int | None = None,
                      history_per_bucket: int = 10) -> LossHistory:
    """The initial model_state of a loss_aware hybrid loss: an empty LossHistory with one bucket per
    training timestep."""
    k = vb_timesteps(process, num_timesteps).shape[0]
    return init_loss_history(k, history_per_bucket)


def is_stateful(loss_fn) -> bool:
    """Whether `loss_fn` takes (params, batch, rng, model_state) (attribute `stateful`, default False)."""
    return bool(getattr(loss_fn, "stateful", False))


def _as_history(state, k: int, h: int) -> LossHistory:
    if isinstance(state, Mapping) and {"history", "counts"} <= set(state):
        state = LossHistory(state["history"], state["counts"])
    if not isinstance(state, LossHistory) or tuple(state.history.shape) != (k, h) \
            or tuple(state.counts.shape) != (k,):
        got = (tuple(state.history.shape), tuple(state.counts.shape)) if isinstance(state, LossHistory) \
            else type(state).__name__
        raise ValueError(f"the loss_aware hybrid loss needs model_state = loss_fn.init_state(), a LossHistory "
                         f"with history ({k}, {h}) and counts ({k},); got {got}")
    return state


def _batch_index(batch, sched: VBSchedule, n: int):
    """Timestep indices k (B,) and weights from batch['t_index'] or batch['t'] (nearest timestep)."""
    w = jnp.broadcast_to(as_time(batch.get("t_weight", 1.0)), (n,))
    if "t_index" in batch:
        return jnp.broadcast_to(jnp.asarray(batch["t_index"], jnp.int32), (n,)), w
    t = jnp.broadcast_to(as_time(batch["t"]), (n,))
    return jnp.argmin(jnp.abs(t[:, None] - sched.t[None, :]), axis=-1).astype(jnp.int32), w


def hybrid_loss(process: Process, apply_fn: Callable, *, vb_weight: float = 0.001,
                num_timesteps: int | None = None, input_perturbation: float = 0.0,
                time_sampling: str = "uniform", history_per_bucket: int = 10, uniform_prob: float = 0.001,
                reduce: str = "mean", train: bool = True, return_per_example: bool = False) -> Callable:
    """Improved DDPM's L_hybrid = mean_b w_b [||eps - eps_hat||^2 + vb_weight K L_k] (module docstring).

    apply_fn(params, x, t, cond, train=, rng=) returns (B, ..., 2C) = [eps_hat, v] for x (B, ..., C).
    num_timesteps: K (default: every timestep of a DiscreteDDPM; required for other processes).
    input_perturbation: DDPM-IP's gamma. time_sampling: 'uniform' (plain 3-argument loss) or
    'loss_aware' (stateful, see the module docstring; history_per_bucket losses per timestep, mixed
    with uniform_prob of the uniform distribution). reduce: 'mean' (bits per dim) or 'sum' over the
    non-batch axes for both terms. A batch may fix the timesteps with 't_index' (B,) int (or 't', mapped
    to the nearest timestep) and 't_weight'.

    aux: 'loss', 'mse' (= 'eps_mse'), 'vb' (mean of L_k in bits per dim, improved-diffusion's
    terms['vb'] before rescaling), 'weight' (mean importance weight); with return_per_example
    aux['per_example'] = {'loss', 'time_loss', 'mse', 'vb', 't', 't_index'} (B,); when stateful
    aux['model_state'] (the updated LossHistory).
    """
    check_option("hybrid-loss time sampling", time_sampling, HYBRID_TIME_SAMPLINGS)
    check_option("reduce", reduce, REDUCTIONS)
    gamma = check_input_perturbation(input_perturbation)
    sched = vb_schedule(process, num_timesteps)
    k_steps = sched.num_timesteps
    stateful = time_sampling == "loss_aware"
    if not isinstance(history_per_bucket, int) or history_per_bucket < 1:
        raise ValueError(f"history_per_bucket must be a positive int, got {history_per_bucket!r}")
    if not 0.0 <= uniform_prob <= 1.0:
        raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
    vb_scale = float(vb_weight) * k_steps

    def core(params, batch, rng, history):
        x0, cond = split_batch(batch)
        k_t, k_eps, k_drop = jax.random.split(rng, 3)
        n = x0.shape[0]
        if "t_index" in batch or "t" in batch:
            idx, w = _batch_index(batch, sched, n)
        elif history is not None:
            idx, w = sample_from_history(history, k_t, n, uniform_prob)
        else:
            idx = jax.random.randint(k_t, (n,), 0, k_steps).astype(jnp.int32)
            w = jnp.ones((n,), as_time(0.0).dtype)
        t = sched.t[idx]
        xt, eps = noisy_input(process, x0, t, k_eps, gamma)
        out = apply_fn(params, xt, t, cond, train=train, rng=k_drop)
        want = x0.shape[:-1] + (2 * x0.shape[-1],)
        if tuple(out.shape) != want:
            raise ValueError(f"a learned-variance apply_fn must return [eps, v] with 2C channels, shape {want} "
                             f"for x of shape {tuple(x0.shape)}; got {tuple(out.shape)}")
        eps_hat, v = split_learned_variance(out.astype(jnp.float32))
        mse = reduce_per_example((eps_hat - eps) ** 2, reduce)

        a, s = bcast(process.alpha(t), x0), bcast(process.sigma(t), x0)
        x0_hat = (xt - s * jax.lax.stop_gradient(eps_hat)) / a
        c_x, c_x0 = bcast(sched.c_x[idx], x0), bcast(sched.c_x0[idx], x0)
        lv_post = bcast(sched.log_var_post[idx], x0)
        # log var = log var_post + u, u = frac (log var_beta - log var_post) (`learned_range_log_variance`)
        u = (v + 1.0) / 2.0 * bcast(sched.log_var_gap[idx], x0)
        # KL(q(x_s|x_t,x0) || p(x_s|x_t)) = 1/2 (expm1(-u) + u + c_x0^2 (x0 - x0_hat)^2 exp(-log var)): the
        # c_x x_t parts of the means cancel and u enters directly, so nearly equal variances stay accurate.
        kl = 0.5 * (jnp.expm1(-u) + u + (c_x0 * (x0 - x0_hat)) ** 2 * jnp.exp(-lv_post) * jnp.exp(-u))
        kl = reduce_per_example(kl, reduce)
        nll = -reduce_per_example(
            discretized_gaussian_log_likelihood(x0, c_x * xt + c_x0 * x0_hat, 0.5 * (lv_post + u)), reduce)
        vb = jnp.where(idx == 0, nll, kl) / LOG2

        time_loss = mse + vb_scale * vb
        per_example = w * time_loss
        loss = jnp.mean(per_example)
        aux = {"loss": loss, "mse": jnp.mean(mse), "eps_mse": jnp.mean(mse), "vb": jnp.mean(vb),
               "weight": jnp.mean(w)}
        if return_per_example:
            aux["per_example"] = {"loss": per_example, "time_loss": time_loss, "mse": mse, "vb": vb, "t": t,
                                  "t_index": idx}
        return loss, aux, idx, time_loss

    if not stateful:
        def loss_fn(params, batch, rng):
            loss, aux, _, _ = core(params, batch, rng, None)
            return loss, aux
    else:
        def loss_fn(params, batch, rng, model_state):
            history = _as_history(model_state, k_steps, history_per_bucket)
            loss, aux, idx, time_loss = core(params, batch, rng, history)
            new = jax.tree_util.tree_map(jax.lax.stop_gradient, update_history(history, idx, time_loss))
            aux["model_state"] = ({"history": new.history, "counts": new.counts}
                                  if isinstance(model_state, Mapping) else new)
            return loss, aux

    def init_state(key=None):
        """The initial model_state: an empty LossHistory (loss_aware) or {} (uniform); `key` is unused
        (the signature of training.make_init_fn's init_model_state_fn)."""
        return init_loss_history(k_steps, history_per_bucket) if stateful else {}

    loss_fn.stateful = stateful
    loss_fn.init_state = init_state
    loss_fn.schedule = sched
    return loss_fn
