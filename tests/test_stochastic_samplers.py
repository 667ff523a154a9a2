"""Ancestral, Euler-Maruyama and predictor-corrector samplers, and guidance, against closed forms.

Samplers are driven by the exact eps of Gaussian mixtures (`reference.mixtures`); their samples at
ts[-1] are compared with samples of the true marginal there. The Monte-Carlo noise level of every
statistic is measured by comparing independent true sample sets of the same size, and the samplers
must get within 1.5x of it (plus a small slack) at the largest N, and be clearly off it at small N.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes as P
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import (
    ancestral, classifier_free_guidance, classifier_guidance, euler_maruyama, predictor_corrector, sample,
    time_grid,
)
from diffusion_jax.sampling.ancestral import posterior_coefs
from diffusion_jax.sampling.common import step_noise

from _mixture_harness import N_SAMPLES, SLACK, STATS, exact_eps, mixture, stats, truth  # noqa: E402,F401


@functools.lru_cache(maxsize=None)
def _converge_row(sampler, process_name, data, spacing, n, options):
    process = P.get_process(process_name)
    eps_fn = exact_eps(data, process)
    x = process.prior_sample(jax.random.PRNGKey(100), (N_SAMPLES, mixture(data).dim))
    ts = time_grid(process, n, spacing)
    out = jax.jit(lambda x, ts, key: sampler(eps_fn, process, x, ts, key=key, **dict(options)))(
        x, ts, jax.random.PRNGKey(200))
    assert int(out.nonfinite_step) == -1
    gm, ref, level = truth(data, process, float(ts[-1]))
    return stats(gm, out.x, ref), level


def run_convergence(sampler, process_name, data, spacing, steps, **options):
    """Statistics of the sampler's samples at each N in steps, and their Monte-Carlo level (cached)."""
    rows = [_converge_row(sampler, process_name, data, spacing, n, tuple(sorted(options.items()))) for n in steps]
    level = rows[0][1]
    rows = [r[0] for r in rows]
    print(f"\n{sampler.__name__} {options} {process_name} {data} {spacing}  MC level "
          + " ".join(f"{k}={v:.4f}" for k, v in level.items()))
    for n, r in zip(steps, rows):
        print(f"  N={n:4d} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()))
    return rows, level


def assert_converges(rows, level, factor=1.5):
    """Small N is clearly off the truth (so the test can fail) and the error shrinks with N, to within the
    Monte-Carlo noise at the largest N."""
    if len(rows) > 1:
        small = rows[0]
        assert small["cov_error"] > 2 * level["cov_error"], (small, level)
        assert rows[-1]["cov_error"] < 0.5 * small["cov_error"], rows
        assert rows[-1]["mean_error"] <= small["mean_error"] + SLACK["mean_error"], rows
    for k in STATS:
        assert rows[-1][k] <= factor * level[k] + SLACK[k], (k, rows[-1], level)


CONVERGENCE = [
    # sampler, process, data, spacing, steps
    (ancestral, "vp", "ring", "quadratic", (10, 200)),
    (ancestral, "vp", "8", "quadratic", (10, 200)),
    (ancestral, "ddpm", "ring", "quadratic", (10, 200)),
    (ancestral, "edm", "ring", "karras", (10, 200)),
    (euler_maruyama, "vp", "ring", "uniform", (10, 200)),
    (euler_maruyama, "vp", "8", "uniform", (10, 200)),
    (euler_maruyama, "edm", "ring", "karras", (200,)),
    (predictor_corrector, "vp", "ring", "uniform", (10, 200)),
    (predictor_corrector, "vp", "8", "uniform", (10, 200)),
    (predictor_corrector, "ve", "8", "karras", (200,)),
]


@pytest.mark.parametrize("sampler,process,data,spacing,steps", CONVERGENCE,
                         ids=[f"{c[0].__name__}-{c[1]}-{c[2]}" for c in CONVERGENCE])
def test_converges_to_true_marginal(sampler, process, data, spacing, steps):
    rows, level = run_convergence(sampler, process, data, spacing, steps)
    assert_converges(rows, level)


def test_langevin_corrector_beats_predictor_alone():
    """At equal predictor steps (N = 50), adding score_sde's Langevin corrector moves the samples closer to
    the truth; a per-example step size (langevin_norm='example') is biased instead."""
    pred, level = run_convergence(predictor_corrector, "vp", "8", "uniform", (50,), corrector="none")
    pc, _ = run_convergence(predictor_corrector, "vp", "8", "uniform", (50,))
    per_example, _ = run_convergence(predictor_corrector, "vp", "8", "uniform", (50,), langevin_norm="example")
    pred, pc, per_example = pred[0], pc[0], per_example[0]
    assert pc["cov_error"] < 0.85 * pred["cov_error"], (pc, pred)
    assert pc["mean_error"] < pred["mean_error"] and pc["sw"] < pred["sw"], (pc, pred)
    assert pc["cov_error"] < 1.5 * level["cov_error"] + SLACK["cov_error"], (pc, level)
    assert per_example["cov_error"] > 2 * pc["cov_error"], (per_example, pc)


# ---------------------------------------------------------------------------------------------
# Update equations written out directly.


def _toy_eps(x, t, cond=None):
    """A deterministic stand-in denoiser, nonlinear in x and t."""
    t = t[:, None]
    return 0.7 * jnp.tanh(x) + 0.3 * x * t / (1.0 + t)


def _toy_eps_np(x, t):
    return 0.7 * np.tanh(x) + 0.3 * x * t / (1.0 + t)


def _f64(a):
    return np.asarray(a, np.float64)


@jax.jit
def _posteriors(t_frac, s_frac):
    out = {}
    for name, cls in P.PROCESSES.items():
        p = cls()
        t, s = p.t_min + t_frac * (p.t_max - p.t_min), p.t_min + s_frac * (p.t_max - p.t_min)
        out[name] = (posterior_coefs(p, t, s), [f(u) for f in (p.alpha, p.sigma) for u in (t, s)])
    return out


def test_posterior_coefficients_every_process():
    """The log-SNR form of q(x_s | x_t, x0) (VDM) against alpha_{t|s} = alpha_t / alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 in float64, for every process and both variances."""
    for t_frac, s_frac in ((0.6, 0.3), (0.05, 0.04), (1.0, 0.0)):
        for name, (coefs, (a_t, a_s, s_t, s_s)) in _posteriors(t_frac, s_frac).items():
            a_t, a_s, s_t, s_s = (_f64(v) for v in (a_t, a_s, s_t, s_s))
            a_ts = a_t / a_s
            var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
            want = (a_ts * s_s ** 2 / s_t ** 2, a_s * var_ts / s_t ** 2, var_ts * s_s ** 2 / s_t ** 2, var_ts)
            for got, w in zip(coefs, want):
                np.testing.assert_allclose(got, w, rtol=2e-4, err_msg=f"{name} {t_frac} {s_frac}")


@pytest.mark.parametrize("name,variance", [("vp", "posterior"), ("edm", "beta")])
def test_ancestral_step_is_the_gaussian_posterior(name, variance):
    """One step of the sampler is a draw from q(x_s | x_t, x0_hat), written out in float64."""
    p = P.get_process(name)
    t, s = p.t_min + 0.6 * (p.t_max - p.t_min), p.t_min + 0.3 * (p.t_max - p.t_min)
    ts = jnp.asarray([t, s], jnp.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2)).astype(np.float32) * p.prior_std() * 0.5
    z = rng.standard_normal((1, 3, 2)).astype(np.float32)
    out = ancestral(_toy_eps, p, x, ts, noise=z, variance=variance, noise_final=True)
    a_t, a_s, s_t, s_s = (_f64(f(jnp.float32(u))) for f, u in
                          ((p.alpha, t), (p.alpha, s), (p.sigma, t), (p.sigma, s)))
    x64 = _f64(x)
    x0 = (x64 - s_t * _toy_eps_np(x64, float(ts[0]))) / a_t
    a_ts = a_t / a_s
    var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
    mean = a_ts * s_s ** 2 / s_t ** 2 * x64 + a_s * var_ts / s_t ** 2 * x0
    var = var_ts * s_s ** 2 / s_t ** 2 if variance == "posterior" else var_ts
    np.testing.assert_allclose(out.x, mean + np.sqrt(var) * z[0], rtol=2e-4, atol=2e-4 * p.prior_std())
    assert out.nfe == 1


def test_clip_x0():
    """clip_x0 clips x0_hat to [-1, 1] before the posterior mean (image models)."""
    p = P.VPLinear()
    ts = jnp.asarray([0.5, 0.3], jnp.float32)
    x = jnp.asarray([[3.0, -0.2], [-4.0, 0.5]])
    big = lambda x, t, cond=None: -2.0 * x  # noqa: E731  (x0_hat = 3 x / alpha: out of range)
    c_x, c_x0, _, _ = posterior_coefs(p, ts[0], ts[1])
    x0 = jnp.clip((x - p.sigma(ts[0]) * big(x, None)) / p.alpha(ts[0]), -1.0, 1.0)
    out = ancestral(big, p, x, ts, key=jax.random.PRNGKey(0), clip_x0=True)  # last step: no noise
    np.testing.assert_allclose(out.x, c_x * x + c_x0 * x0, rtol=1e-6)


def _ho_chain(x, z, betas, variance, tau_start, tau_stop):
    """Ho et al. (2020), Algorithm 2 in float64, from timestep tau_start down to tau_stop (1-based)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    T = betas.shape[0]
    x = _f64(x)
    for i, tau in enumerate(range(tau_start, tau_stop, -1)):
        n = tau - 1
        eps = _toy_eps_np(x, tau / T)
        mean = (x - betas[n] / np.sqrt(1.0 - abar[n]) * eps) / np.sqrt(alphas[n])
        var = (1.0 - abar[n - 1]) / (1.0 - abar[n]) * betas[n] if variance == "posterior" else betas[n]
        x = mean + np.sqrt(var) * z[i]
    return x


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ancestral_on_discrete_ddpm_is_ho_et_al(variance):
    """On DiscreteDDPM's full 1000-level grid (t = tau / T, tau = 1000..1: 999 steps) ancestral
    sampling with injected noise is Ho et al.'s sampler: mean (x - beta/sqrt(1 - abar) eps)/sqrt(alpha),
    variance beta-tilde or beta. Checked for one step and for the whole chain."""
    p = P.DiscreteDDPM()
    betas = p.betas()
    ts = time_grid(p, 999, "uniform")
    np.testing.assert_allclose(ts, np.arange(1000, 0, -1) / 1000, rtol=0, atol=1e-7)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    z = rng.standard_normal((999, 4, 3)).astype(np.float32)
    run = jax.jit(functools.partial(ancestral, _toy_eps, p, variance=variance, noise_final=True))
    for tau in (1000, 500, 2) if variance == "posterior" else ():  # one step tau -> tau - 1
        one = run(x, jnp.asarray([tau, tau - 1], jnp.float32) / 1000, noise=z[:1])
        want = _ho_chain(x, z[:1], betas, variance, tau, tau - 1)
        np.testing.assert_allclose(one.x, want, rtol=1e-5, atol=1e-5)
    full = run(x, ts, noise=z)
    np.testing.assert_allclose(full.x, _ho_chain(x, z, betas, variance, 1000, 1), rtol=2e-4, atol=2e-4)
    assert full.nfe == 999


def test_sde_steps_written_out():
    """Euler-Maruyama, the reverse-diffusion predictor (score_sde's VP form with beta_i = 1 - a^2) and
    one Langevin corrector step, each for one step with injected noise, against float64 formulas."""
    p = P.VPLinear()
    t, s = 0.6, 0.5
    ts = jnp.asarray([t, s], jnp.float32)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    z = rng.standard_normal((1, 2, 5, 3)).astype(np.float32)
    x64 = _f64(x)
    a_t, a_s, s_t = (_f64(f(jnp.float32(u))) for f, u in ((p.alpha, t), (p.alpha, s), (p.sigma, t)))
    beta_t = 0.1 + t * (20.0 - 0.1)

    def score(y):
        return -_toy_eps_np(y, t) / s_t

    em = euler_maruyama(_toy_eps, p, x, ts, noise=z[:, 0], noise_final=True)
    want = x64 + (-0.5 * beta_t * x64 - beta_t * score(x64)) * (s - t) + np.sqrt(beta_t * (t - s)) * z[0, 0]
    np.testing.assert_allclose(em.x, want, rtol=1e-5, atol=1e-5)

    beta_i = 1.0 - (a_t / a_s) ** 2
    rd = predictor_corrector(_toy_eps, p, x, ts, noise=z[:, :1], corrector="none", noise_final=True)
    want = (2.0 - np.sqrt(1.0 - beta_i)) * x64 + beta_i * score(x64) + np.sqrt(beta_i) * z[0, 0]
    np.testing.assert_allclose(rd.x, want, rtol=1e-5, atol=1e-5)

    snr = 0.16
    pc = predictor_corrector(_toy_eps, p, x, ts, noise=z, snr=snr, noise_final=True)
    g = score(x64)
    size = 2 * (1.0 - beta_i) * (snr * np.linalg.norm(z[0, 0], axis=-1).mean()
                                 / np.linalg.norm(g, axis=-1).mean()) ** 2
    xc = x64 + size * g + np.sqrt(2 * size) * z[0, 0]
    want = (2.0 - np.sqrt(1.0 - beta_i)) * xc + beta_i * score(xc) + np.sqrt(beta_i) * z[0, 1]
    np.testing.assert_allclose(pc.x, want, rtol=1e-5, atol=1e-5)
    assert (em.nfe, rd.nfe, pc.nfe) == (1, 1, 2)


# ---------------------------------------------------------------------------------------------
# Randomness, NFE, non-finite tracking.

STOCHASTIC = {
    "ancestral": (ancestral, {}, lambda n, shape: (n,) + shape),
    "euler_maruyama": (euler_maruyama, {}, lambda n, shape: (n,) + shape),
    "pc": (predictor_corrector, {"n_corrector_steps": 2}, lambda n, shape: (n, 3) + shape),
}


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_keys_and_injected_noise(name):
    fn, opts, noise_shape = STOCHASTIC[name]
    p = P.VPLinear()
    ts = time_grid(p, 6, "uniform")
    x = p.prior_sample(jax.random.PRNGKey(0), (16, 2))
    run = jax.jit(lambda x, key, noise: fn(_toy_eps, p, x, ts, key=key, noise=noise, **opts))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a, b, c = run(x, k1, None).x, run(x, k1, None).x, run(x, k2, None).x
    np.testing.assert_array_equal(a, b)
    assert np.min(np.abs(np.asarray(a - c))) > 0
    # Pre-drawing each step's noise with step_noise reproduces the key-driven run (to float32 rounding:
    # the two programs are compiled separately, and x reaches |x| ~ 60 here).
    shape = noise_shape(6, x.shape)
    if len(shape) == x.ndim + 1:
        noise = jnp.stack([step_noise(k1, None, i, x.shape) for i in range(6)])
    else:
        noise = jnp.stack([jnp.stack([step_noise(k1, None, i, x.shape, k=k) for k in range(shape[1])])
                           for i in range(6)])
    np.testing.assert_allclose(run(x, None, noise).x, a, rtol=1e-5, atol=1e-5)


def test_registry_runs_stochastic_samplers():
    """`sample` runs each of them (its nfe bookkeeping included: 'pc' spends 2 per step)."""
    p = P.VPLinear()
    eps_fn = exact_eps("ring", p)
    for name, nfe in (("pc", 10),):
        out = sample(name, eps_fn, p, jax.random.PRNGKey(0), (32, 2), num_steps=5)
        assert out.nfe == nfe and out.x.shape == (32, 2) and bool(jnp.all(jnp.isfinite(out.x)))


@pytest.mark.parametrize("fn,opts,nfe,bad_step", [
    (ancestral, {}, 10, 6),
    (euler_maruyama, {}, 10, 6),
    (predictor_corrector, {}, 20, 6),
    (predictor_corrector, {"predictor": "euler_maruyama", "n_corrector_steps": 3}, 40, 6),
    (predictor_corrector, {"corrector": "none"}, 10, 6),
    (predictor_corrector, {"predictor": "none", "n_corrector_steps": 2}, 20, 5),  # Langevin at ts[i + 1]
])
def test_nfe_nonfinite_step_and_bfloat16_denoiser(fn, opts, nfe, bad_step):
    """A bfloat16 denoiser whose eps is NaN below t = 0.45, on the 10-step uniform grid (ts[6] = 0.4006 is
    the first time below): nfe equals the evaluations counted at run time, the first non-finite step is
    reported, and the state stays float32 whatever the denoiser's and x's dtype."""
    p = P.VPLinear()
    calls = []

    def bad(x, t, cond=None):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.where((t < 0.45)[:, None], jnp.nan, _toy_eps(x, t)).astype(jnp.bfloat16)

    ts = time_grid(p, 10, "uniform")
    out = jax.jit(lambda x, key: fn(bad, p, x, ts, key=key, **opts))(
        jnp.ones((4, 2), jnp.bfloat16), jax.random.PRNGKey(0))
    jax.effects_barrier()
    assert out.nfe == nfe == len(calls)
    assert int(out.nonfinite_step) == bad_step
    assert out.x.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Guidance.


def _toy_cond_eps(calls):
    def eps_fn(x, t, cond):
        calls.append(x.shape[0])
        y = cond["y"].astype(jnp.float32)[:, None]
        return jnp.sin(x) * (1.0 + y) + jnp.sum(cond["v"], -1, keepdims=True) + t[:, None] * y

    return eps_fn


def test_cfg_limits_and_single_batched_call():
    calls = []
    eps_fn = _toy_cond_eps(calls)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    t = jnp.full((5,), 0.4)
    cond = {"y": jnp.arange(5), "v": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
    null = {"y": jnp.asarray(-1), "v": jnp.zeros((3,))}  # unbatched null condition, broadcast
    null_b = {"y": jnp.full((5,), -1), "v": jnp.zeros((5, 3))}
    e_c, e_u = eps_fn(x, t, cond), eps_fn(x, t, null_b)
    calls.clear()
    for w in (0.0, 1.0, 3.5):
        got = classifier_free_guidance(eps_fn, w, null)(x, t, cond)
        np.testing.assert_allclose(got, e_u + w * (e_c - e_u), rtol=1e-6, atol=1e-6)
    assert calls == [10, 10, 10]  # one call per guided evaluation, on the doubled batch
    np.testing.assert_array_equal(classifier_free_guidance(eps_fn, 0.0, null)(x, t, cond), e_u)
    np.testing.assert_allclose(classifier_free_guidance(eps_fn, 1.0, null_b)(x, t, cond), e_c, rtol=1e-6, atol=1e-6)


def _component(gm, k):
    """Component k of gm as a one-component mixture (k may be traced)."""
    return M.GaussianMixture(jnp.ones((1,)), gm.means[k][None], gm.covs[k][None], gm.evals[k][None],
                             gm.evecs[k][None])


def _component_eps(gm, process):
    """eps(x, t, k): the exact eps of component k alone for each example, of the whole mixture for k = -1."""

    def one(x, t, k):
        return M.eps(_component(gm, jnp.maximum(k, 0)), x[None], process, t)[0]

    def eps_fn(x, t, cond):
        return jnp.where((cond < 0)[:, None], M.eps(gm, x, process, t), jax.vmap(one)(x, t, cond))

    return eps_fn


def test_cfg_with_exact_conditional_samples_the_component():
    """Condition = component index: CFG at w = 1 is the exact conditional eps, so DDPM sampling with it
    draws from component k (assignment by true responsibility, and its mean/covariance)."""
    p = P.VPLinear()
    gm = mixture("ring")
    guided = classifier_free_guidance(_component_eps(gm, p), 1.0, jnp.asarray(-1))
    n = 1600
    labels = jax.random.randint(jax.random.PRNGKey(7), (n,), 0, gm.num_components)
    ts = time_grid(p, 50, "quadratic")
    x = p.prior_sample(jax.random.PRNGKey(8), (n, 2))
    out = jax.jit(lambda x, c: ancestral(guided, p, x, ts, cond=c, key=jax.random.PRNGKey(9)))(x, labels)
    mg = M.marginal(gm, p, ts[-1])
    assigned = jnp.argmax(M.responsibilities(mg, out.x), -1)
    assert float(jnp.mean(assigned == labels)) > 0.995
    x_np, labels, means, covs = (np.asarray(a) for a in (out.x, labels, mg.means, mg.covs))
    for k in range(gm.num_components):
        xs = x_np[labels == k]
        se = np.sqrt(np.max(np.diag(covs[k])) / len(xs))
        assert np.linalg.norm(xs.mean(0) - means[k]) < 5 * se
        np.testing.assert_allclose(np.cov(xs.T), covs[k], atol=0.02)


def test_classifier_guidance_with_bayes_classifier_is_the_conditional_eps():
    """log p(y | x_t) = log r_y(x_t) of the mixture; with scale 1, eps - sigma grad log p(y|x_t) is the
    exact eps of component y (Bayes), at every t; scale 0 leaves eps unchanged."""
    for name in ("vp",):
        p = P.get_process(name)
        gm = mixture("8")
        uncond = exact_eps("8", p)
        comp = _component_eps(gm, p)

        def log_prob_fn(x, t, y):
            """log r_y(x_t) = log w_y + log N(x; alpha mu_y, C_y) - log p_t(x), computed in log space."""
            log_n = jax.vmap(lambda xi, ti, k: M.log_prob(_component(gm, k), xi[None], p, ti[None])[0])(x, t, y)
            return jnp.log(gm.weights[y]) + log_n - M.log_prob(gm, x, p, t)

        n = 12
        rng = np.random.default_rng(4)
        t = jnp.asarray(np.linspace(0.05, 0.8, n) * (p.t_max - p.t_min) + p.t_min, jnp.float32)
        y = jnp.asarray(rng.integers(0, gm.num_components, n))
        a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
        near = jnp.asarray(rng.integers(0, gm.num_components, n))  # x_t near a random component
        x = a * gm.means[near] + s * jnp.asarray(rng.standard_normal((n, 8)), jnp.float32)
        guided = classifier_guidance(uncond, log_prob_fn, p, 1.0)
        got, want = jax.jit(lambda x, t, y: (guided(x, t, y), comp(x, t, y)))(x, t, y)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        assert np.max(np.abs(np.asarray(want - uncond(x, t, y)))) > 0.1  # guidance does change eps
