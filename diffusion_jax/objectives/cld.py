"""Score matching for critically-damped Langevin diffusion (Dockhorn et al. 2022; nv-tlabs/CLD-SGM `losses.py`).

Only v is noised, so only the velocity score s = grad_v log p_t(x, v) is learned. Hybrid score matching
(HSM) conditions on x0 alone and marginalises v0 ~ N(0, gamma M): with the kernel N(mu_t(x0), Sigma_t)
(`CLD.marginal_prob`, var0x = 0, var0v = gamma M) and its Cholesky factor L_t, u_t = mu_t + L_t eps, and
the target is

    grad_v log q(u_t | x0) = -(L_t^{-T} eps)_v = -eps_v / ell_vv,      ell_vv = (L_t)_vv.

Plain DSM in phase space ('dsm') instead draws v0 and uses the kernel given (x0, v0) (var0v = 0): the same
formulas with its own ell_vv, which vanishes like t^{1/2} at t -> 0 (HSM's stays above sqrt(gamma M)-ish:
the paper's reason for HSM).

Mixed score (the paper's Sec. 3.3; official `models/utils.get_score_fn`): the network output alpha (shaped
like x) is added, scaled, to the v-score of a Gaussian,

    s_theta(u, t) = -v / Sigma_vv(t) - alpha_theta(u, t) / ell_vv(t),

with Sigma_vv of the HSM kernel at var0x = 0 (as the official code; mixed_score=False drops the first term).
The network sees concat(x, v) along the last (channel) axis and t (B,). Weightings (per coordinate, the mean
over coordinates with reduce='mean'):

    'eps'         || ell_vv s_theta + eps_v ||^2            (official 'reweightedv2', the CIFAR-10 setting)
    'eps_beta'    Gamma beta(t) || ell_vv s_theta + eps_v ||^2                     ('reweightedv1')
    'likelihood'  Gamma beta(t) || s_theta + eps_v / ell_vv ||^2   (g^2/2 = Gamma beta: maximum likelihood;
                  the score-matching term of the phase-space ELBO)

t ~ U(loss_eps, 1) (official loss_eps = 1e-5), or batch['t'] when given.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.denoising import reduce_per_example, split_batch
from diffusion_jax.objectives.time_sampling import check_option
from diffusion_jax.processes.base import as_time, bcast
from diffusion_jax.processes.cld import CLD, concat_phase

CLD_OBJECTIVES = ("hsm", "dsm")
CLD_WEIGHTINGS = ("eps", "eps_beta", "likelihood")
REDUCTIONS = ("mean", "sum")


def cld_scales(process: CLD, t, objective: str = "hsm") -> tuple[jax.Array, jax.Array]:
    """(ell_vv(t), Sigma_vv(t)): ell_vv of the objective's kernel ('hsm': v0 marginalised, 'dsm': v0 given)
    and Sigma_vv of the HSM kernel (the mixed score's Gaussian)."""
    hsm = process.kernel_cov(t, 0.0)
    if objective == "hsm":
        return hsm.lvv, hsm.vv
    return process.kernel_cov(t, 0.0, 0.0).lvv, hsm.vv


def mixed_score_v(process: CLD, out, v, t, *, objective: str = "hsm", mixed_score: bool = True):
    """s = -v / Sigma_vv(t) - out / ell_vv(t) (mixed) or -out / ell_vv(t): the network output as a velocity score."""
    ell, svv = cld_scales(process, t, objective)
    s = -out / bcast(ell, out)
    return s - v / bcast(svv, v) if mixed_score else s


def network_output_from_score(process: CLD, score_v, v, t, *, objective: str = "hsm", mixed_score: bool = True):
    """Inverse of `mixed_score_v`: the output alpha = -ell_vv (s + v / Sigma_vv) that gives the score s."""
    ell, svv = cld_scales(process, t, objective)
    base = v / bcast(svv, v) if mixed_score else 0.0
    return -bcast(ell, v) * (score_v + base)


def cld_score_fn(process: CLD, apply_fn: Callable, params, *, cond=None, objective: str = "hsm",
                 mixed_score: bool = True):
    """The trained network as a sampler's `score_v_fn(x, v, t)` (apply_fn(params, concat(x, v), t, cond))."""

    def fn(x, v, t):
        t = jnp.broadcast_to(as_time(t), (x.shape[0],))
        out = apply_fn(params, concat_phase(x, v), t, cond).astype(x.dtype)
        return mixed_score_v(process, out, v, t, objective=objective, mixed_score=mixed_score)

    return fn


def cld_hsm_loss(process: CLD, apply_fn: Callable, *, objective: str = "hsm", weighting: str = "eps",
                 mixed_score: bool = True, loss_eps: float = 1e-5, reduce: str = "mean", train: bool = True,
                 return_per_example: bool = False) -> Callable[[Any, Mapping, Any], tuple[jax.Array, dict]]:
    """Hybrid (or plain, objective='dsm') score matching in phase space; `loss_fn(params, batch, rng)`.

    apply_fn(params, u, t, cond, train=, rng=) takes u = concat(x_t, v_t) (B, ..., 2C) and returns alpha
    shaped like x (B, ..., C). aux: 'loss', 'mse' (||ell_vv s_theta + eps_v||^2, the eps-space error),
    'weight' (mean weight); with return_per_example, aux['per_example'] = {'loss', 't'}.
    """
    if not isinstance(process, CLD):
        raise ValueError(f"cld_hsm_loss needs a CLD process, got {type(process).__name__}")
    check_option("CLD objective", objective, CLD_OBJECTIVES)
    check_option("CLD weighting", weighting, CLD_WEIGHTINGS)
    check_option("reduce", reduce, REDUCTIONS)
    loss_eps = float(loss_eps)
    if not 0.0 < loss_eps < 1.0:
        raise ValueError(f"loss_eps must lie in (0, 1), got {loss_eps!r}")

    def loss_fn(params, batch, rng):
        x0, cond = split_batch(batch)
        k_t, k_x, k_v, k_v0, k_drop = jax.random.split(rng, 5)
        n = x0.shape[0]
        if "t" in batch:
            t = jnp.broadcast_to(as_time(batch["t"]), (n,))
        else:
            t = loss_eps + (1.0 - loss_eps) * jax.random.uniform(k_t, (n,), as_time(0.0).dtype)
        eps_x = jax.random.normal(k_x, x0.shape, jnp.float32)
        eps_v = jax.random.normal(k_v, x0.shape, jnp.float32)
        if objective == "hsm":
            xt, vt = process.perturb(x0, t, eps_x, eps_v)
        else:
            v0 = jnp.sqrt(process.var0v) * jax.random.normal(k_v0, x0.shape, jnp.float32)
            xt, vt = process.perturb(x0, t, eps_x, eps_v, v0=v0, var0v=0.0)
        out = apply_fn(params, concat_phase(xt, vt), t, cond, train=train, rng=k_drop)
        if out.shape != x0.shape:
            raise ValueError(f"apply_fn must return an array shaped like x {tuple(x0.shape)} (the velocity "
                             f"part of its input concat(x, v)), got {tuple(out.shape)}")
        out = out.astype(jnp.float32)
        score = mixed_score_v(process, out, vt, t, objective=objective, mixed_score=mixed_score)
        ell, _ = cld_scales(process, t, objective)
        err = bcast(ell, x0) * score + eps_v                  # ell_vv (s_theta - s_target)
        mse = reduce_per_example(err ** 2, reduce)
        gb = process.big_gamma * process.beta(t)
        lam = {"eps": jnp.ones_like(gb), "eps_beta": gb, "likelihood": gb / ell ** 2}[weighting]
        per_example = lam * mse
        loss = jnp.mean(per_example)
        aux = {"loss": loss, "mse": jnp.mean(mse), "weight": jnp.mean(lam)}
        if return_per_example:
            aux["per_example"] = {"loss": per_example, "t": t}
        return loss, aux

    return loss_fn


__all__ = ["CLD_OBJECTIVES", "CLD_WEIGHTINGS", "cld_scales", "mixed_score_v", "network_output_from_score",
           "cld_score_fn", "cld_hsm_loss"]
