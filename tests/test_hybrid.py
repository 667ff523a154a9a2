"""Improved DDPM's hybrid loss, DDPM-IP and learned-variance ancestral sampling against closed forms.

For 1-D data x0 ~ N(m, d^2) every reverse conditional is exactly Gaussian: with x_t = alpha_t x0 + sigma_t eps,
Var(x0 | x_t) = V_t = d^2 sigma_t^2 / (alpha_t^2 d^2 + sigma_t^2), and for s < t

    q(x_s | x_t) = N(c_x x_t + c_x0 E[x0 | x_t],  v* = var_post + c_x0^2 V_t),

so the exact eps with the variance v* is the exact reverse step, the expected KL of the vb term at it is
E KL(q(x_s|x_t,x0) || N(mean*, v*)) = 1/2 log(v* / var_post) nats, the least eps-MSE is
alpha^2 d^2 / (alpha^2 d^2 + sigma^2), and the optimal learned-range output is
frac* = log(v*/var_post) / log(var_beta/var_post).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import objectives as O
from diffusion_jax.processes.vp import Cosine, DiscreteDDPM, VPLinear, ddpm_betas
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import ancestral, ddim, time_grid
from diffusion_jax.sampling.ancestral import posterior_coefs

PROC = DiscreteDDPM(num_steps=1000, beta_schedule="cosine")
MEAN, STD = 0.3, 0.5
GM = M.gaussian([MEAN], [[STD ** 2]])
EPS = M.eps_fn(GM, PROC)
Z_TOL = 4.5


def data(n, seed=0):
    return M.sample(GM, jax.random.PRNGKey(seed), n)[0]


def f64(a):
    return np.asarray(a, np.float64)


def gaussian_opt(sched, k):
    """(v*, var_post, var_beta, frac*, c_x0, V_t) of training timestep(s) k (float64)."""
    t = sched.t[jnp.asarray(k)]
    a, s = f64(PROC.alpha(t)), f64(PROC.sigma(t))
    v_cond = STD ** 2 * s ** 2 / (a ** 2 * STD ** 2 + s ** 2)
    vp, vb = np.exp(f64(sched.log_var_post[jnp.asarray(k)])), np.exp(f64(sched.log_var_beta[jnp.asarray(k)]))
    c0 = f64(sched.c_x0[jnp.asarray(k)])
    vstar = vp + c0 ** 2 * v_cond
    return vstar, vp, vb, np.log(vstar / vp) / np.log(vb / vp), c0, v_cond


def exact_net(v_of_t=None, theta_dir=False):
    """apply_fn returning [exact eps (+ theta x), v]: v = v_of_t(t) (B,) or the scalar params['v']."""

    def apply_fn(params, x, t, cond=None, *, train=False, rng=None):
        eps = EPS(x, t, cond)
        if theta_dir:
            eps = eps + params["theta"] * x
        v = v_of_t(t)[:, None] if v_of_t is not None else jnp.broadcast_to(params["v"], x.shape)
        return jnp.concatenate([eps, jnp.broadcast_to(v, x.shape)], -1)

    return apply_fn


def v_table(sched):
    """The closed-form optimal v = 2 frac* - 1 of every training timestep, as a lookup on t."""
    frac = gaussian_opt(sched, np.arange(sched.num_timesteps))[3]
    table = jnp.asarray(2.0 * frac - 1.0, jnp.float32)
    return lambda t: table[jnp.argmin(jnp.abs(t[:, None] - sched.t[None]), -1)]


def assert_within_se(samples, expected, what, z=Z_TOL):
    samples = f64(samples)
    mean, se = samples.mean(), samples.std(ddof=1) / math.sqrt(samples.size)
    assert abs(mean - expected) < z * se + 1e-7, f"{what}: MC {mean:.6g} +- {se:.3g} vs closed form {expected:.6g}"


# --- likelihood pieces ---------------------------------------------------------------------------------
def test_normal_kl_matches_closed_form_and_cdf_approximation():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.uniform(-4, 2, 50), rng.uniform(-4, 2, 50)
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    ref = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    got = f64(O.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2))))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    # numerical KL by quadrature on one pair
    x = np.linspace(-30, 30, 200001)
    logp, logq = stats.norm.logpdf(x, m1[0], s1[0]), stats.norm.logpdf(x, m2[0], s2[0])
    quad = np.trapezoid(np.exp(logp) * (logp - logq), x)
    assert abs(got[0] - quad) < 1e-5 * max(1.0, quad)
    z = np.linspace(-6, 6, 1001)
    assert np.max(np.abs(f64(O.approx_standard_normal_cdf(jnp.asarray(z, jnp.float32))) - stats.norm.cdf(z))) < 2e-4


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.3)), (0.93, math.log(0.004)), (-0.5, math.log(2.0)),
                                            (1.3, math.log(0.05))])
def test_discretized_gaussian_bins_sum_to_one_and_match_exact_bins(mean, log_scale):
    bins = jnp.asarray(2.0 * np.arange(256) / 255.0 - 1.0, jnp.float32)
    logp = f64(O.discretized_gaussian_log_likelihood(bins, jnp.float32(mean), jnp.float32(log_scale)))
    p = np.exp(logp)
    assert abs(p.sum() - 1.0) < 1e-4, p.sum()
    # exact 256-bin probabilities with the outer bins open, up to the tanh approximation of Phi
    edges = np.concatenate([[-np.inf], (2.0 * np.arange(1, 256) - 1.0) / 255.0 - 1.0, [np.inf]])
    exact = np.diff(stats.norm.cdf((edges - mean) / math.exp(log_scale)))
    assert np.max(np.abs(p - exact)) < 5e-4


# --- the learned-variance schedule -----------------------------------------------------------------------
def _ddpm_tables(abar_kept):
    """improved-diffusion's (Spaced)GaussianDiffusion tables from the kept alpha-bars (float64)."""
    ab = np.asarray(abar_kept, np.float64)
    abp = np.append(1.0, ab[:-1])
    b = 1.0 - ab / abp
    pv = b * (1 - abp) / (1 - ab)
    return dict(c_x0=b * np.sqrt(abp) / (1 - ab), c_x=(1 - abp) * np.sqrt(1 - b) / (1 - ab),
                log_var_post=np.log(np.append(pv[1], pv[1:])), log_var_beta=np.log(b))


@pytest.mark.parametrize("num_timesteps", [None, 10])
def test_vb_schedule_matches_improved_diffusion_tables(num_timesteps):
    sched = O.vb_schedule(PROC, num_timesteps)
    ab_all = np.cumprod(1.0 - ddpm_betas("cosine", 1000))
    if num_timesteps is None:
        kept = np.arange(1000)
    else:  # space_timesteps(1000, [10])
        kept = np.asarray([round(i * 999 / 9) for i in range(10)])
    np.testing.assert_allclose(f64(sched.t), (kept + 1) / 1000.0, rtol=1e-6)
    ref = _ddpm_tables(ab_all[kept])
    ref["log_var_gap"] = ref["log_var_beta"] - ref["log_var_post"]
    for name, want in ref.items():  # to float32 rounding: the tables are computed in float64
        np.testing.assert_allclose(f64(getattr(sched, name)), want, rtol=3e-7, atol=1e-12, err_msg=name)


def test_vb_schedule_any_vp_process_any_pair():
    """The log-SNR form equals the DDPM formulas written with alpha-bar = alpha^2 on a continuous VP."""
    for proc in (VPLinear(), Cosine()):
        sched = O.vb_schedule(proc, 25)
        t64 = proc.t_min + (proc.t_max - proc.t_min) * np.arange(25) / 24.0
        np.testing.assert_allclose(f64(sched.t), t64, rtol=1e-7)
        with jax.enable_x64(True):
            ab = np.asarray(proc.alpha(jnp.asarray(t64, jnp.float64)), np.float64) ** 2
        for name, want in _ddpm_tables(ab).items():
            np.testing.assert_allclose(f64(getattr(sched, name)), want, rtol=3e-7, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match="num_timesteps is required"):
        O.vb_schedule(VPLinear())
    with pytest.raises(ValueError, match="exceeds"):
        O.vb_schedule(DiscreteDDPM(num_steps=20), 21)


# --- the vb term at the exact eps ------------------------------------------------------------------------
N_MC = 16384
X0 = data(N_MC)


@functools.lru_cache(maxsize=None)
def vb_fns(num_timesteps):
    """Jitted (v, k) -> (per-example vb at the scalar v, d/dv and d2/dv2 of its mean) at timestep k, for X0."""
    loss_fn = O.hybrid_loss(PROC, exact_net(), num_timesteps=num_timesteps, return_per_example=True)

    def vb(v, k):
        batch = {"x": X0, "t_index": jnp.full((N_MC,), k, jnp.int32)}
        return loss_fn({"v": v}, batch, jax.random.PRNGKey(1))[1]["per_example"]["vb"]

    mean_vb = lambda v, k: jnp.mean(vb(v, k))  # noqa: E731
    return jax.jit(lambda v, k: (vb(v, k), jax.grad(mean_vb)(v, k), jax.grad(jax.grad(mean_vb))(v, k)))


@pytest.mark.parametrize("num_timesteps,steps", [(None, (1, 10, 100, 500)), (10, (1, 4, 8))])
def test_vb_at_exact_variance_is_half_log_ratio(num_timesteps, steps):
    """(a) E[L_vb] at the exact eps and the exact variance = 1/2 log(v* / var_post) / log 2 bits."""
    sched = O.vb_schedule(PROC, num_timesteps)
    for k in steps:
        vstar, vp, _, frac, _, _ = gaussian_opt(sched, k)
        expected = 0.5 * math.log(vstar / vp) / math.log(2.0)
        assert expected > 1e-4
        vb = vb_fns(num_timesteps)(jnp.float32(2.0 * frac - 1.0), k)[0]
        assert_within_se(vb, expected, f"L_vb bits at k={k} (K={num_timesteps})")


@pytest.mark.parametrize("num_timesteps,k", [(None, 100), (None, 400), (10, 2), (10, 5), (10, 8)])
def test_minimising_vb_over_v_recovers_optimal_frac(num_timesteps, k):
    """(b) Newton's method on the (convex in v) vb term of a scalar v recovers frac*."""
    sched = O.vb_schedule(PROC, num_timesteps)
    vstar, vp, vb, frac, c0, v_cond = gaussian_opt(sched, k)
    v = jnp.float32(0.0)
    for _ in range(12):
        _, grad, hess = vb_fns(num_timesteps)(v, k)
        v = jnp.clip(v - grad / hess, -1.5, 1.5)
    _, grad, hess = vb_fns(num_timesteps)(v, k)
    assert abs(float(grad)) < 1e-3 * float(hess)
    frac_hat = (float(v) + 1.0) / 2.0
    # MC error of the empirical optimum log(var_post + c0^2 mean(delta^2)), delta^2 ~ V chi^2_1
    se_frac = c0 ** 2 * v_cond * math.sqrt(2.0 / N_MC) / vstar / math.log(vb / vp)
    assert 0.05 < frac < 0.98
    assert abs(frac_hat - frac) < Z_TOL * se_frac + 1e-3, (frac_hat, frac, se_frac)


def test_vb_trains_only_the_variance_and_first_step_is_decoder_nll():
    loss_fn = O.hybrid_loss(PROC, exact_net(theta_dir=True), return_per_example=True)
    params = {"theta": jnp.float32(0.1), "v": jnp.float32(0.3)}
    batch = {"x": X0[:512], "t_index": jnp.arange(512, dtype=jnp.int32) % 1000}
    key = jax.random.PRNGKey(4)
    both = jax.jit(lambda p, b: (loss_fn(p, b, key)[1], jax.grad(lambda q: loss_fn(q, b, key)[0])(p),
                                 jax.grad(lambda q: loss_fn(q, b, key)[1]["mse"])(p)))
    _, g, g_mse = both(params, batch)
    np.testing.assert_allclose(float(g["theta"]), float(g_mse["theta"]), rtol=1e-5)  # stop_gradient on eps
    assert abs(float(g["v"])) > 0 and float(g_mse["v"]) == 0.0
    # k = 0: -log2 p(x0 | x_{t_0}) under the discretized Gaussian with mean x0_hat and var_beta^frac var_post^(1-frac)
    x0 = jnp.clip(jnp.round((X0[:512] + 1.0) * 127.5) / 127.5 - 1.0, -1.0, 1.0)
    b0 = {"x": x0, "t_index": jnp.zeros((512,), jnp.int32)}
    aux = both(params, b0)[0]
    sched = O.vb_schedule(PROC)
    t0 = jnp.full((512,), sched.t[0])
    xt, eps = O.denoising.noisy_input(PROC, x0, t0, jax.random.split(key, 3)[1])
    eps_hat = EPS(xt, t0) + 0.1 * xt
    x0_hat = (xt - PROC.sigma(sched.t[0]) * eps_hat) / PROC.alpha(sched.t[0])
    lv = sched.log_var_post[0] + 0.65 * sched.log_var_gap[0]
    nll = -O.discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * lv)[:, 0] / math.log(2.0)
    np.testing.assert_allclose(f64(aux["per_example"]["vb"]), f64(nll), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(aux["per_example"]["time_loss"]),
                               f64(aux["per_example"]["mse"] + 0.001 * 1000 * aux["per_example"]["vb"]), rtol=1e-6)


def test_l_simple_at_exact_eps_is_closed_form_minimum():
    sched = O.vb_schedule(PROC)
    loss_fn = O.hybrid_loss(PROC, exact_net(v_table(sched)), return_per_example=True)
    aux = jax.jit(loss_fn)({}, {"x": X0}, jax.random.PRNGKey(5))[1]
    a, s = f64(PROC.alpha(sched.t)), f64(PROC.sigma(sched.t))
    expected = np.mean(a ** 2 * STD ** 2 / (a ** 2 * STD ** 2 + s ** 2))  # uniform over the 1000 timesteps
    assert_within_se(aux["per_example"]["mse"], expected, "L_simple at the exact eps")
    # the same draws as the plain eps loss (uniform timesteps, noise), through the eps-only adapter
    plain = jax.jit(O.epsilon_loss(PROC, O.learned_variance_eps_fn(exact_net(v_table(sched)))))
    np.testing.assert_allclose(float(plain({}, {"x": X0}, jax.random.PRNGKey(5))[0]), float(aux["mse"]), rtol=1e-6)


# --- DDPM-IP ----------------------------------------------------------------------------------------------
def test_input_perturbation_zero_is_bit_identical_to_the_plain_loss():
    def net(params, x, t, cond=None, *, train=False, rng=None):
        return params["w"] * x + jnp.sin(t)[:, None]

    params, batch, key = {"w": jnp.float32(0.7)}, {"x": X0[:64]}, jax.random.PRNGKey(6)
    got = O.epsilon_loss(PROC, net, input_perturbation=0.0)(params, batch, key)[0]
    # the loss as it was: split(rng, 3) -> (t, eps, dropout) keys, x_t = alpha x0 + sigma eps
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = O.sample_time(PROC, k_t, 64).t
    eps = jax.random.normal(k_eps, (64, 1), jnp.float32)
    xt = PROC.alpha(t)[:, None] * batch["x"] + PROC.sigma(t)[:, None] * eps
    want = jnp.mean(jnp.mean((net(params, xt, t) - eps) ** 2, -1))
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    assert float(O.epsilon_loss(PROC, net, input_perturbation=0.1)(params, batch, key)[0]) != float(got)
    with pytest.raises(ValueError, match="input_perturbation"):
        O.epsilon_loss(PROC, net, input_perturbation=-0.1)


def test_input_perturbation_adds_sigma2_gamma2_to_xt_variance():
    seen = []

    def spy(params, x, t, cond=None, *, train=False, rng=None):
        seen.append(f64(x[:, 0]))
        return jnp.zeros_like(x)

    n, t = 16384, 0.6
    batch, key = {"x": data(n, seed=7), "t": jnp.full((n,), t)}, jax.random.PRNGKey(8)
    a, s = float(PROC.alpha(jnp.float32(t))), float(PROC.sigma(jnp.float32(t)))
    O.epsilon_loss(PROC, spy)({}, batch, key)
    xt0 = seen[-1]
    want0 = a ** 2 * STD ** 2 + s ** 2
    assert abs(xt0.var() - want0) < Z_TOL * want0 * math.sqrt(2.0 / n), (xt0.var(), want0)
    for gamma in (0.15, 0.5):
        O.epsilon_loss(PROC, spy, input_perturbation=gamma)({}, batch, key)
        xt = seen[-1]
        # same eps (same keys), so x_t(gamma) - x_t(0) = sigma gamma xi with xi ~ N(0, 1) independent of x_t(0):
        # Var x_t(gamma) = alpha^2 d^2 + sigma^2 (1 + gamma^2)
        xi = (xt - xt0) / (s * gamma)
        assert abs(xi.var() - 1.0) < Z_TOL * math.sqrt(2.0 / n) and abs(xi.mean()) < Z_TOL / math.sqrt(n)
        assert abs(np.corrcoef(xi, xt0)[0, 1]) < Z_TOL / math.sqrt(n)
        want = want0 + s ** 2 * gamma ** 2
        assert abs(xt.var() - want) < Z_TOL * want * math.sqrt(2.0 / n), (xt.var(), want)
    # the hybrid loss perturbs its x_t the same way (same draws)
    O.hybrid_loss(PROC, lambda p, x, *a, **k: (seen.append(f64(x[:, 0])), jnp.zeros(x.shape[:-1] + (2,)))[1],
                  input_perturbation=0.5)({}, batch, key)
    np.testing.assert_allclose(seen[-1], xt, rtol=1e-6, atol=1e-7)


# --- the stateful loss-aware hybrid loss ------------------------------------------------------------------
def test_loss_aware_is_stateful_fills_history_and_reweights_unbiasedly():
    proc = DiscreteDDPM(num_steps=20, beta_schedule="cosine")
    traces = []

    def net(params, x, t, cond=None, *, train=False, rng=None):
        traces.append(1)
        return jnp.concatenate([M.eps_fn(GM, proc)(x, t), jnp.zeros_like(x)], -1)

    loss_fn = O.hybrid_loss(proc, net, time_sampling="loss_aware", history_per_bucket=4, return_per_example=True)
    uniform = O.hybrid_loss(proc, net, return_per_example=True)
    assert O.is_stateful(loss_fn) and not O.is_stateful(uniform) and uniform.init_state() == {}
    state = loss_fn.init_state(jax.random.PRNGKey(0))
    assert isinstance(state, O.LossHistory) and state.history.shape == (20, 4)
    step = jax.jit(loss_fn)
    n = 4096
    for i in range(3):
        x = data(n, seed=9 + i)
        aux = step({}, {"x": x}, jax.random.PRNGKey(100 + i), state)[1]
        new = aux.pop("model_state")
        # each bucket keeps the unweighted per-example losses of its last examples, in batch order
        idx, tl = np.asarray(aux["per_example"]["t_index"]), f64(aux["per_example"]["time_loss"])
        for k in (0, 7, 19):
            mine = tl[idx == k][-4:]
            np.testing.assert_allclose(f64(new.history[k])[4 - len(mine):], mine, rtol=1e-6)
        state = new
    assert bool(jnp.all(state.counts == 4)), "the history did not fill"
    assert len(traces) == 1, "the stateful loss retraced"
    p = f64(O.history_probs(state, 0.001))
    p = p / p.sum()
    assert p.max() / p.min() > 3.0  # large t (eps MSE ~ 1) vs small t
    # sampled timesteps follow p (not uniform) and the importance weights average to 1
    aux = step({}, {"x": x}, jax.random.PRNGKey(7), state)[1]
    counts = np.bincount(np.asarray(aux["per_example"]["t_index"]), minlength=20)
    chi_p = stats.chisquare(counts, n * p).pvalue
    chi_u = stats.chisquare(counts).pvalue
    assert chi_p > 1e-4 and chi_u < 1e-10, (chi_p, chi_u)
    w = f64(aux["per_example"]["loss"]) / f64(aux["per_example"]["time_loss"])
    assert_within_se(w, 1.0, "mean importance weight")
    # unbiased: E_p[w L] = the uniform-t loss
    ref = f64(jax.jit(uniform)({}, {"x": x}, jax.random.PRNGKey(8))[1]["per_example"]["loss"])
    est = f64(aux["per_example"]["loss"])
    se = math.sqrt(est.var() / est.size + ref.var() / ref.size)
    assert abs(est.mean() - ref.mean()) < Z_TOL * se, (est.mean(), ref.mean(), se)
    # a model_state restored as a plain dict keeps its structure
    as_dict = {"history": state.history, "counts": state.counts}
    out = loss_fn({}, {"x": x[:64]}, jax.random.PRNGKey(9), as_dict)[1]["model_state"]
    assert isinstance(out, dict) and sorted(out) == ["counts", "history"] and out["history"].shape == (20, 4)
    with pytest.raises(ValueError, match="LossHistory"):
        loss_fn({}, {"x": x}, jax.random.PRNGKey(0), O.init_loss_history(19, 4))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="hybrid-loss time sampling"):
        O.hybrid_loss(PROC, exact_net(), time_sampling="importance")
    loss_fn = O.hybrid_loss(PROC, lambda p, x, *a, **k: x)
    with pytest.raises(ValueError, match="2C channels"):
        loss_fn({}, {"x": X0[:8]}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="even number"):
        O.split_learned_variance(jnp.zeros((4, 3)))


# --- learned-variance ancestral sampling ------------------------------------------------------------------
def _pair(v_of_t):
    return lambda x, t, cond=None: (EPS(x, t, cond), jnp.broadcast_to(v_of_t(t)[:, None], x.shape))


def _pair_from_cond(x, t, cond):
    return EPS(x, t), jnp.broadcast_to(cond, x.shape)


def test_learned_range_endpoints_reproduce_posterior_and_beta():
    ts = time_grid(PROC, 10)
    x = jax.random.normal(jax.random.PRNGKey(11), (512, 1))
    key = jax.random.PRNGKey(12)

    @jax.jit
    def runs(x):
        out = {v: ancestral(EPS, PROC, x, ts, key=key, variance=v, noise_final=True) for v in ("posterior", "beta")}
        out["v=+1"] = ancestral(_pair_from_cond, PROC, x, ts, cond=jnp.float32(1.0), key=key,
                                variance="learned_range", noise_final=True)
        # a 2C-channel network [eps, v = -1] through the (eps, v) adapter
        two_c = lambda x, t, cond=None: jnp.concatenate([EPS(x, t, cond), -jnp.ones_like(x)], -1)  # noqa: E731
        out["v=-1"] = ancestral(O.learned_variance_pair_fn(two_c), PROC, x, ts, key=key, variance="learned_range",
                                noise_final=True)
        out["ddim"], out["ddim_2c"] = ddim(EPS, PROC, x, ts), ddim(O.learned_variance_eps_fn(two_c), PROC, x, ts)
        return out

    out = runs(x)
    for v, ref_var in (("v=-1", "posterior"), ("v=+1", "beta")):
        want, got = out[ref_var].x, out[v]
        assert got.nfe == 10
        np.testing.assert_allclose(f64(got.x), f64(want), rtol=2e-5, atol=2e-6)
        if ref_var == "posterior":  # the default is unchanged: Ho et al.'s update written with alpha-bar
            ab, y = f64(PROC.alpha(ts)) ** 2, f64(x)
            for i in range(10):
                b = 1.0 - ab[i] / ab[i + 1]
                e = f64(EPS(jnp.asarray(y, jnp.float32), jnp.full((512,), ts[i])))
                z = f64(jax.random.normal(jax.random.fold_in(key, i), (512, 1)))
                y = (y - b / math.sqrt(1.0 - ab[i]) * e) / math.sqrt(1.0 - b) + math.sqrt(
                    b * (1.0 - ab[i + 1]) / (1.0 - ab[i])) * z
            np.testing.assert_allclose(f64(want), y, rtol=1e-4, atol=1e-4)
    # the eps-only adapter runs DDIM on the same 2C-channel model
    np.testing.assert_array_equal(out["ddim_2c"].x, out["ddim"].x)
    with pytest.raises(ValueError, match="pair"):
        ancestral(EPS, PROC, x, ts, key=key, variance="learned_range")


def test_optimal_learned_variance_reproduces_data_variance_with_10_steps():
    """Exact eps + the closed-form optimal variance make every respaced step exact, so the 10-step sampler's
    output has the marginal variance alpha^2 d^2 + sigma^2 at t_min; beta-tilde ('posterior') shrinks it."""
    n_steps, n = 10, 32768
    ts = time_grid(PROC, n_steps)
    t, s = ts[:-1], ts[1:]
    c_x, c_x0, var_post, var_beta = (f64(a) for a in posterior_coefs(PROC, t, s))
    a, sg = f64(PROC.alpha(t)), f64(PROC.sigma(t))
    v_cond = STD ** 2 * sg ** 2 / (a ** 2 * STD ** 2 + sg ** 2)
    frac = np.log((var_post + c_x0 ** 2 * v_cond) / var_post) / np.log(var_beta / var_post)
    v_grid = jnp.asarray(2.0 * frac - 1.0, jnp.float32)
    v_of_t = lambda tt: v_grid[jnp.argmin(jnp.abs(tt[:, None] - t[None]), -1)]  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(13), (n, 1))
    key = jax.random.PRNGKey(14)
    both = jax.jit(lambda x: [ancestral(fn, PROC, x, ts, key=key, variance=var, noise_final=True).x[:, 0]
                              for fn, var in ((_pair(v_of_t), "learned_range"), (EPS, "posterior"))])
    learned, post = (f64(a) for a in both(x))
    a_end, s_end = float(PROC.alpha(ts[-1])), float(PROC.sigma(ts[-1]))
    target = a_end ** 2 * STD ** 2 + s_end ** 2
    se = target * math.sqrt(2.0 / n)
    err_learned, err_post = abs(learned.var() - target), abs(post.var() - target)
    assert err_learned < Z_TOL * se, (learned.var(), target, se)
    assert abs(learned.mean() - a_end * MEAN) < Z_TOL * math.sqrt(target / n)
    # beta-tilde: the exact linear-Gaussian recursion Var_s = (c_x + c_x0 k_t)^2 Var_t + var_post
    gain = c_x + c_x0 * a * STD ** 2 / (a ** 2 * STD ** 2 + sg ** 2)
    var_p = 1.0
    for i in range(n_steps):
        var_p = gain[i] ** 2 * var_p + var_post[i]
    assert abs(post.var() - var_p) < Z_TOL * var_p * math.sqrt(2.0 / n)
    assert err_post > 0.05 and err_post > 10.0 * err_learned, (err_post, err_learned)


def test_loss_aware_hybrid_in_the_train_step():
    """The stateful protocol end to end: TrainState.model_state is the LossHistory, updated every step."""
    import optax

    from diffusion_jax.training.state import make_init_fn
    from diffusion_jax.training.train_step import make_train_step

    proc = DiscreteDDPM(num_steps=50, beta_schedule="cosine")
    eps = M.eps_fn(GM, proc)

    def apply_fn(params, x, t, cond=None, *, train=False, rng=None):
        return jnp.concatenate([eps(x, t) + params["theta"] * x, jnp.broadcast_to(params["v"], x.shape)], -1)

    loss_fn = O.hybrid_loss(proc, apply_fn, time_sampling="loss_aware", history_per_bucket=2)
    tx = optax.sgd(1.0)
    init = make_init_fn(lambda k: {"theta": jnp.float32(0.0), "v": jnp.float32(0.0)}, tx,
                        init_model_state_fn=loss_fn.init_state)
    state = init(jax.random.PRNGKey(0))
    assert isinstance(state.model_state, O.LossHistory) and state.is_stateful
    step = jax.jit(make_train_step(loss_fn, tx))
    x = data(512, seed=3)
    for i in range(3):
        state, metrics = step(state, {"x": x}, jax.random.PRNGKey(20 + i))
    assert int(state.model_state.counts.min()) == 2 and np.all(np.isfinite(f64(state.model_state.history)))
    assert float(state.params["v"]) != 0.0 and {"loss", "mse", "vb", "weight"} <= set(metrics)
