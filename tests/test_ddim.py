"""DDIM (eta = 0 and eta > 0) and DDIM inversion against closed forms.

The exact eps of Gaussian mixtures (`reference.mixtures`) drives the sampler; the exact PF-ODE flow map of
a single Gaussian (`gaussian_flow`) gives the deterministic sampler's and the inversion's target.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes as P
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import ancestral, ddim, ddim_invert, sample, time_grid
from diffusion_jax.sampling.common import step_noise

from _mixture_harness import N_SAMPLES, SLACK, STATS, exact_eps, mixture, stats, truth  # noqa: E402,F401


@pytest.mark.parametrize("data,eta,steps", [
    ("ring", 0.0, (10, 200)),
    ("8", 0.0, (10, 200)),
    ("ring", 1.0, (10, 200)),
    ("8", 1.0, (200,)),
])
def test_ddim_converges_to_true_marginal(data, eta, steps):
    """VP, quadratic grid: mixture-fit errors and sliced W2 against true samples of p_{t_min}; clearly off
    at N = 10, within 1.5x the Monte-Carlo level (+ slack) at N = 200."""
    p = P.VPLinear()
    eps_fn = exact_eps(data, p)
    x = p.prior_sample(jax.random.PRNGKey(100), (N_SAMPLES, mixture(data).dim))
    gm, ref, level = truth(data, p, p.t_min)
    rows = []
    for n in steps:
        ts = time_grid(p, n, "quadratic")
        out = jax.jit(lambda x, ts, key: ddim(eps_fn, p, x, ts, key=key, eta=eta))(x, ts, jax.random.PRNGKey(200))
        assert out.nfe == n and int(out.nonfinite_step) == -1
        rows.append(stats(gm, out.x, ref))
    print(f"\nddim eta={eta} vp {data} quadratic  MC level " + " ".join(f"{k}={v:.4f}" for k, v in level.items()))
    for n, r in zip(steps, rows):
        print(f"  N={n:4d} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()))
    if len(rows) > 1:
        assert rows[0]["cov_error"] > 2 * level["cov_error"], rows
        assert rows[-1]["cov_error"] < 0.5 * rows[0]["cov_error"], rows
        assert rows[-1]["mean_error"] <= rows[0]["mean_error"] + SLACK["mean_error"], rows
    for k in STATS:
        assert rows[-1][k] <= 1.5 * level[k] + SLACK[k], (k, rows[-1], level)


def test_eta_one_is_ancestral():
    """eta = 1: sqrt(sigma_s^2 - c^2) eps + c z with c^2 the posterior variance is DDPM's posterior draw."""
    p = P.VPLinear()
    eps_fn = exact_eps("ring", p)
    ts = time_grid(p, 20, "quadratic")
    x = p.prior_sample(jax.random.PRNGKey(0), (64, 2))
    key = jax.random.PRNGKey(1)
    a, b = jax.jit(lambda x: (ddim(eps_fn, p, x, ts, key=key, eta=1.0).x, ancestral(eps_fn, p, x, ts, key=key).x))(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _gaussian_case():
    p = P.VPLinear()
    g = M.gaussian([0.5, -1.0], [[0.3, 0.1], [0.1, 0.2]])
    x0, _ = M.sample(M.marginal(g, p, p.t_min), jax.random.PRNGKey(1), 256)
    return p, g, x0, M.gaussian_flow(g, p, x0, p.t_min, p.t_max)


def test_ddim_and_inversion_are_first_order_pf_ode_solvers():
    """For one Gaussian the PF-ODE flow map is closed-form: DDIM from the exact x_T lands on x0 and the
    inversion from x0 on x_T, each with error O(1/N) (x10 the steps, /10 the error)."""
    p, g, x0, x_t = _gaussian_case()
    eps_fn = M.eps_fn(g, p)
    errs = []
    for n in (20, 200):
        ts = time_grid(p, n, "quadratic")
        fwd, inv = jax.jit(lambda a, b: (ddim(eps_fn, p, a, ts).x, ddim_invert(eps_fn, p, b, ts).x))(x_t, x0)
        errs.append((float(jnp.max(jnp.abs(fwd - x0))), float(jnp.max(jnp.abs(inv - x_t)))))
    print(f"\nGaussian PF-ODE max errors (ddim, invert): N=20 {errs[0]}, N=200 {errs[1]}")
    for coarse, fine in zip(*errs):
        assert 6.0 < coarse / fine < 14.0, errs
    assert max(errs[1]) < 0.05


def test_inversion_round_trip_and_fixed_point_refinement():
    """x0 -> ddim_invert -> ddim -> x0 on the 2-D ring under VP from t_min = 1e-3, N = 100. Plain inversion
    is off by O(1/N) (a few 1e-2 where the flow is steep, between modes); each fixed-point iteration
    re-evaluates eps at the new point and the round trip converges to float32 round-off."""
    p = P.VPLinear()
    eps_fn = exact_eps("ring", p)
    x0, _ = M.sample(M.marginal(mixture("ring"), p, p.t_min), jax.random.PRNGKey(0), 256)
    ts = time_grid(p, 100, "quadratic")
    back = jax.jit(lambda x: ddim(eps_fn, p, x, ts).x)
    errs = {}
    for k in (0, 2, 8):
        x_t = jax.jit(lambda x: ddim_invert(eps_fn, p, x, ts, num_fixed_point_iters=k).x)(x0)
        err = jnp.abs(back(x_t) - x0)
        errs[k] = (float(err.max()), float(err.mean()))
    print("\nround-trip (max, mean) error by fixed-point iterations:", errs)
    assert errs[0][0] < 0.15 and errs[0][1] < 0.02
    assert errs[2][0] < 0.1 * errs[0][0] and errs[2][1] < 0.1 * errs[0][1]
    assert errs[8][0] < 1e-4 and errs[8][1] < 2e-6


def test_inversion_round_trip_edm():
    """The same round trip under EDM (alpha = 1, sigma = t) on the Karras grid."""
    p = P.EDM()
    eps_fn = exact_eps("ring", p)
    x0, _ = M.sample(M.marginal(mixture("ring"), p, p.t_min), jax.random.PRNGKey(0), 256)
    ts = time_grid(p, 100, "karras")
    x_t, back = jax.jit(lambda x: (lambda y: (y, ddim(eps_fn, p, y, ts).x))(
        ddim_invert(eps_fn, p, x, ts, num_fixed_point_iters=8).x))(x0)
    assert float(jnp.std(x_t)) > 40  # x_T is at the prior's scale, sigma_max = 80
    assert float(jnp.max(jnp.abs(back - x0))) < 1e-3


@pytest.mark.parametrize("iters", [0, 2])
def test_inversion_nfe_and_nonfinite_step(iters):
    """nfe = N (1 + iters), counted at run time. eps is NaN above t = 0.55; the 10-step uniform grid is walked
    upwards, step k from s = ts[10 - k] to t = ts[9 - k], and ts[4] = 0.6004 is the first time above 0.55:
    plain inversion evaluates eps at s, so step k = 6 is the first non-finite one; fixed-point iterations
    also evaluate at t, so k = 5."""
    p = P.VPLinear()
    calls = []

    def bad(x, t, cond=None):
        jax.debug.callback(lambda: calls.append(1))
        eps = 0.7 * jnp.tanh(x)
        return jnp.where((t > 0.55)[:, None], jnp.nan, eps).astype(jnp.bfloat16)

    ts = time_grid(p, 10, "uniform")
    out = jax.jit(lambda x: ddim_invert(bad, p, x, ts, num_fixed_point_iters=iters))(jnp.ones((4, 2), jnp.bfloat16))
    jax.effects_barrier()
    assert out.nfe == 10 * (1 + iters) == len(calls)
    assert int(out.nonfinite_step) == (5 if iters else 6)
    assert out.x.dtype == jnp.float32


def test_ddim_nfe_and_nonfinite_step():
    p = P.VPLinear()
    calls = []

    def bad(x, t, cond=None):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.where((t < 0.45)[:, None], jnp.nan, 0.7 * jnp.tanh(x))

    ts = time_grid(p, 10, "uniform")
    out = jax.jit(lambda x: ddim(bad, p, x, ts))(jnp.ones((4, 2)))
    jax.effects_barrier()
    assert out.nfe == 10 == len(calls)
    assert int(out.nonfinite_step) == 6  # ts[6] = 0.4006 is the first time below 0.45


def test_keys_and_injected_noise():
    """eta = 0 ignores key and noise; eta > 0: same key, same samples; another key, other samples; noise
    pre-drawn with step_noise reproduces the key-driven run."""
    p = P.VPLinear()
    eps_fn = exact_eps("ring", p)
    ts = time_grid(p, 6, "uniform")
    x = p.prior_sample(jax.random.PRNGKey(0), (16, 2))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    det = jax.jit(lambda x, key: ddim(eps_fn, p, x, ts, key=key).x)
    np.testing.assert_array_equal(det(x, k1), det(x, k2))
    np.testing.assert_array_equal(det(x, k1), ddim(eps_fn, p, x, ts).x)
    run = jax.jit(lambda x, key, noise: ddim(eps_fn, p, x, ts, key=key, noise=noise, eta=0.5).x)
    a, b, c = run(x, k1, None), run(x, k1, None), run(x, k2, None)
    np.testing.assert_array_equal(a, b)
    assert np.min(np.abs(np.asarray(a - c))) > 0
    noise = jnp.stack([step_noise(k1, None, i, x.shape) for i in range(6)])
    # two programs (key vs injected noise): equal to float32 rounding of values up to |x| ~ 2
    np.testing.assert_allclose(run(x, None, noise), a, rtol=1e-5, atol=1e-5)


def test_registry_ddim_is_deterministic():
    p = P.VPLinear()
    eps_fn = exact_eps("ring", p)
    x_init = p.prior_sample(jax.random.PRNGKey(0), (32, 2))
    a = sample("ddim", eps_fn, p, jax.random.PRNGKey(1), (32, 2), num_steps=8, x_init=x_init)
    b = sample("ddim", eps_fn, p, jax.random.PRNGKey(2), (32, 2), num_steps=8, x_init=x_init)
    assert a.nfe == 8
    np.testing.assert_array_equal(a.x, b.x)
