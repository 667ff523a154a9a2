"""Flow matching against closed forms: the `Flow` process' marginal and SDE coefficients, the flow
velocity of Gaussian-mixture data (E[u | x_t] from the exact posterior mean), deterministic samplers
against the exact Gaussian flow map with their convergence order, SD3's time samplers and the
flow-matching loss at the exact velocity.

For x0 ~ N(mu, S) (eigenvalues e_i) on the linear path x_t = (1 - t) x0 + t eps the velocity
u = eps - x0 = x/t - x0/t has Cov(u | x_t) = Cov(x0 | x_t)/t^2 with eigenvalues e_i / (a^2 e_i + s^2)
(a = 1 - t, s = t), so the flow-matching loss at the exact velocity (mean over D) at time t is
m_u(t) = (1/D) sum_i e_i / (a^2 e_i + s^2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives as O
from diffusion_jax import processes as P
from diffusion_jax import config as cv
from diffusion_jax.likelihood import pf_ode_log_likelihood
from diffusion_jax.objectives.denoising import noisy_input
from diffusion_jax.processes.base import Process
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import sample

LINEAR, COSINE = P.Flow(), P.Flow(path="cosine")
Z_TOL = 4.5  # standard errors


# --- the process --------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_marginal_and_sde_coefficients(proc):
    """alpha, sigma against the path's formula; log-SNR round trip; f, g^2, alpha', sigma' (closed forms)
    against forward-mode derivatives of log alpha and sigma^2 (the base class' jvp defaults)."""
    t = jnp.linspace(proc.t_min, proc.t_max, 101, dtype=jnp.float32)
    t64 = np.asarray(t, np.float64)
    a_ref, s_ref = ((1 - t64, t64) if proc.path == "linear"
                    else (np.cos(np.pi / 2 * t64), np.sin(np.pi / 2 * t64)))
    np.testing.assert_allclose(proc.alpha(t), a_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(proc.sigma(t), s_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(proc.log_snr(t), 2 * np.log(a_ref / s_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(proc.t_from_log_snr(proc.log_snr(t)), t64, rtol=2e-6, atol=1e-7)
    lam = jnp.linspace(-12.0, 12.0, 49)
    np.testing.assert_allclose(proc.log_snr(proc.t_from_log_snr(lam)), lam, atol=2e-4)
    np.testing.assert_allclose(proc.f(t), Process.f(proc, t), rtol=1e-5)
    np.testing.assert_allclose(proc.g2(t), Process.g2(proc, t), rtol=2e-4, atol=1e-5)
    if proc.path == "linear":   # g^2 = d sigma^2/dt - 2 f sigma^2 = 2t + 2t^2/(1 - t)
        np.testing.assert_allclose(proc.g2(t), 2 * t64 + 2 * t64 ** 2 / (1 - t64), rtol=1e-5)
    one = jnp.ones_like(t)
    np.testing.assert_allclose(proc.d_alpha(t), jax.jvp(proc.alpha, (t,), (one,))[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proc.d_sigma(t), jax.jvp(proc.sigma, (t,), (one,))[1], rtol=1e-5, atol=1e-6)
    # The prior is N(0, sigma(t_max)^2 I), as for the VE family.
    assert proc.prior_std() == pytest.approx(float(proc.sigma(jnp.float32(proc.t_max))))
    x = jnp.asarray([[0.3, -1.0]])
    s2 = proc.prior_std() ** 2
    np.testing.assert_allclose(proc.prior_logp(x), -math.log(2 * math.pi * s2) - 1.09 / (2 * s2), rtol=1e-6)


def test_registered_with_validated_kwargs():
    assert isinstance(P.get_process("flow", path="cosine", t_min=1e-4), P.Flow)
    with pytest.raises(ValueError, match=r"path.*'bezier'.*\('linear', 'cosine'\)"):
        P.get_process("flow", path="bezier")
    with pytest.raises(ValueError, match=r"t_max of a flow process must lie in \(0, 1\)"):
        P.get_process("flow", t_max=1.0)
    with pytest.raises(ValueError, match=r"t_min of a flow process"):
        P.get_process("flow", t_min=0.0)
    with pytest.raises(ValueError, match=r"t_min must be below t_max"):
        P.get_process("flow", t_min=0.5, t_max=0.4)
    with pytest.raises(ValueError, match=r"bad arguments for process 'flow'.*beta_min"):
        P.get_process("flow", beta_min=0.1)


def test_config_names_the_bad_field():
    c = cv.base_config(process="flow", objective="flow")
    c.objective.kwargs.time_sampling = "logit_normal"
    cv.validate(c, lock=False)
    c = cv.base_config(process="flow", objective="flow")
    c.process.kwargs.path = "bezier"
    with pytest.raises(cv.ConfigError, match=r"config\.process.*path.*'bezier'"):
        cv.validate(c, lock=False)
    c = cv.base_config(process="flow", objective="flow")
    c.objective.kwargs.time_sampling, c.objective.kwargs.mode_scale = "mode", 3.0
    with pytest.raises(cv.ConfigError, match=r"config\.objective \('flow'\).*mode_scale must lie in"):
        cv.validate(c, lock=False)
    c = cv.base_config(process="flow", objective="flow")
    c.objective.kwargs.logit_std = -1.0
    with pytest.raises(cv.ConfigError, match=r"logit_std"):
        cv.validate(c, lock=False)


# --- velocity ------------------------------------------------------------------------------------------
GM = M.random_mixture(seed=1, dim=3, num_components=3, mean_scale=1.0, eig_range=(0.05, 0.5))


@pytest.mark.parametrize("name", ["flow", "flow_cosine", "vp", "edm"])
def test_mixture_velocity_equals_conversion_of_exact_eps(name):
    """E[u | x_t] = alpha' E[x0 | x_t] + sigma' E[eps | x_t] with the mixture's exact posterior mean and
    alpha', sigma' by jax.jvp, equals flow_from_eps(exact eps); on the linear path it is
    E[eps - x0 | x_t]. The conversions back to eps and x0 and `as_eps_fn(.., 'flow')` invert it."""
    proc = COSINE if name == "flow_cosine" else P.get_process(name)
    n = 64
    t = proc.t_min + (proc.t_max - proc.t_min) * jnp.linspace(0.02, 0.95, n)
    x0, _ = M.sample(GM, jax.random.PRNGKey(0), n)
    x = proc.add_noise(x0, jax.random.normal(jax.random.PRNGKey(1), x0.shape), t)
    eps = M.eps(GM, x, proc, t)
    x0_mean = M.x0_mean(GM, x, proc, t)
    one = jnp.ones_like(t)
    da, ds = jax.jvp(proc.alpha, (t,), (one,))[1], jax.jvp(proc.sigma, (t,), (one,))[1]
    u_ref = da[:, None] * x0_mean + ds[:, None] * eps
    if name == "flow":
        np.testing.assert_allclose(u_ref, eps - x0_mean, atol=1e-6)
    u = P.flow_from_eps(proc, x, t, eps)
    scale = float(jnp.max(jnp.abs(u_ref)))
    np.testing.assert_allclose(u, u_ref, atol=1e-5 * scale)
    np.testing.assert_allclose(P.flow_from_x0(proc, x, t, x0_mean), u_ref, atol=1e-5 * scale)
    np.testing.assert_allclose(P.eps_from_flow(proc, x, t, u), eps, atol=1e-5)
    np.testing.assert_allclose(P.x0_from_flow(proc, x, t, u), x0_mean, atol=1e-5 * max(1.0, scale))
    wrapped = P.as_eps_fn(lambda y, s, c: P.flow_from_eps(proc, y, s, M.eps(GM, y, proc, s)), "flow", proc)
    np.testing.assert_allclose(wrapped(x, t, None), eps, atol=1e-5)
    # The velocity is the probability-flow ODE drift f x - g^2/2 score.
    drift = proc.f(t)[:, None] * x - 0.5 * proc.g2(t)[:, None] * M.score(GM, x, proc, t)
    np.testing.assert_allclose(u, drift, atol=1e-5 * scale)


# --- samplers against the exact Gaussian flow map -------------------------------------------------------
G1 = M.gaussian([0.5, -0.3], [[0.3, 0.1], [0.1, 0.2]])
# sampler: (order, grid). Heun steps in EDM's sigma/alpha = t/(1 - t) (999 at t_max): on its Karras grid.
ORDERS = {"ddim": (1, "uniform"), "euler": (1, "uniform"), "heun": (2, "karras"), "dpmpp_2m": (2, "uniform")}


def test_samplers_converge_to_exact_flow_map_with_their_order():
    """From x at t_max, each deterministic sampler approaches the exact flow map x(t_min) of a Gaussian;
    the error ratio of N = 16 to 32 steps is ~2^order (measured: ddim, euler 1.96; heun 4.42; dpmpp_2m
    4.08; RMS errors at N = 32: 0.025, 0.025, 0.021, 0.018). On the linear path
    Euler's step x + (t' - t)(eps - x)/(1 - t) is DDIM's step exactly."""
    proc = LINEAR
    eps_fn = M.eps_fn(G1, proc)
    x = proc.prior_sample(jax.random.PRNGKey(3), (256, 2))
    exact = M.gaussian_flow(G1, proc, x, proc.t_max, proc.t_min)
    errs = {}
    for name, (_, grid) in ORDERS.items():
        for n in (16, 32):
            out = sample(name, eps_fn, proc, jax.random.PRNGKey(0), x.shape, num_steps=n, spacing=grid,
                         x_init=x).x
            errs[name, n] = float(jnp.sqrt(jnp.mean((out - exact) ** 2)))
            if name == "euler":
                ddim = sample("ddim", eps_fn, proc, jax.random.PRNGKey(0), x.shape, num_steps=n,
                              spacing="uniform", x_init=x).x
                # float32 rounding of f = -1/(1 - t) ~ -1000 at t_max: 1e-4, ~1e-3 of the error.
                np.testing.assert_allclose(out, ddim, atol=1e-4)
    for name, (order, _) in ORDERS.items():
        ratio = errs[name, 16] / errs[name, 32]
        assert 2 ** order * 0.8 < ratio < 2 ** order * 1.3, (name, ratio, errs)
        assert errs[name, 32] < 3e-2, (name, errs)


def test_pf_ode_likelihood_on_the_linear_path():
    """log p_{t_min}(x) by the probability-flow ODE in t (straight-path velocity, exact divergence) with
    the exact p_{t_max} equals the ring mixture's closed form (measured max error 1.2e-4 nats/dim); the
    default prior N(0, t_max^2 I) moves it by 1e-5 nats/dim on average."""
    gm, proc = M.ring_mixture(), LINEAR

    @jax.jit
    def run(key):
        x, _ = M.sample(gm, key, 32)
        out = pf_ode_log_likelihood(M.eps_fn(gm, proc), proc, x, divergence="exact", time_variable="t",
                                    prior_logp=lambda z: M.log_prob(gm, z, proc, proc.t_max))
        return out, M.log_prob(gm, x, proc, proc.t_min), proc.prior_logp(out.z)

    out, ref, prior_default = run(jax.random.PRNGKey(3))
    ref = np.asarray(ref, np.float64)
    assert np.abs(np.asarray(out.logp, np.float64) - ref).max() / gm.dim < 5e-4
    err_default = (np.asarray(prior_default, np.float64) + np.asarray(out.delta_logp, np.float64) - ref) / gm.dim
    assert np.abs(err_default).max() < 1e-3 and abs(err_default.mean()) < 1e-4


# --- time sampling --------------------------------------------------------------------------------------
def _unit(proc, t):
    return (np.asarray(t, np.float64) - proc.t_min) / (proc.t_max - proc.t_min)


def test_logit_normal_and_mode_time_samplers():
    """logit(u) of SD3's logit-normal times has mean m and std s; mode times have the quantiles
    P(u <= f_mode(v)) = 1 - v (f_mode decreasing); both thread through the loss' time draw."""
    proc, n = LINEAR, 20000
    ts = O.logit_normal_time(proc, jax.random.PRNGKey(0), n, logit_mean=0.5, logit_std=0.7)
    z = np.log(_unit(proc, ts.t)) - np.log1p(-_unit(proc, ts.t))
    assert abs(z.mean() - 0.5) < Z_TOL * 0.7 / math.sqrt(n)
    assert abs(z.std() - 0.7) < Z_TOL * 0.7 / math.sqrt(2 * n)
    np.testing.assert_array_equal(ts.weight, 1.0)
    ts = O.mode_time(proc, jax.random.PRNGKey(1), n, mode_scale=1.29)
    u = _unit(proc, ts.t)
    for v in (0.1, 0.3, 0.5, 0.7, 0.9):
        p = float(np.mean(u <= float(O.mode_map(v, 1.29)) + 1e-7))
        assert abs(p - (1 - v)) < Z_TOL * math.sqrt(v * (1 - v) / n), (v, p)
    assert np.mean(np.abs(u - 0.5) < 0.25) > 0.6   # c = 1.29 concentrates the middle (uniform: 0.5)
    np.testing.assert_allclose(O.mode_map(jnp.linspace(0, 1, 5), 0.0), np.linspace(1, 0, 5), atol=1e-7)
    # On a discrete process: integer timesteps.
    ddpm = P.DiscreteDDPM()
    for m in ("logit_normal", "mode"):
        td = O.sample_time(ddpm, jax.random.PRNGKey(2), 512, m)
        assert td.index is not None and len(np.unique(np.asarray(td.index))) > 20, m
        np.testing.assert_allclose(td.t, (np.asarray(td.index) + 1) / ddpm.num_steps, rtol=1e-6)
    # The loss draws its times with the same sampler and options (its rng's first split).
    net = lambda params, x, t, cond=None, train=False, rng=None: x  # noqa: E731
    loss_fn = O.flow_matching_loss(proc, net, time_sampling="logit_normal", logit_mean=-0.3, logit_std=1.5,
                                   return_per_example=True)
    rng = jax.random.PRNGKey(5)
    t_loss = loss_fn(None, {"x": jnp.zeros((64, 2))}, rng)[1]["per_example"]["t"]
    t_ref = O.logit_normal_time(proc, jax.random.split(rng, 3)[0], 64, logit_mean=-0.3, logit_std=1.5).t
    np.testing.assert_array_equal(t_loss, t_ref)
    for kw, msg in (({"logit_std": 0.0}, "logit_std must be > 0"), ({"logit_mean": float("nan")}, "logit_mean"),
                    ({"mode_scale": -1.5}, "mode_scale must lie in")):
        method = "mode" if "mode_scale" in kw else "logit_normal"
        with pytest.raises(ValueError, match=msg):
            O.flow_matching_loss(proc, net, time_sampling=method, **kw)
    with pytest.raises(ValueError, match=r"unknown time sampling 'sd3'"):
        O.flow_matching_loss(proc, net, time_sampling="sd3")
    with pytest.raises(ValueError, match=r"unknown weighting for 'flow' prediction 'snr'"):
        O.flow_matching_loss(proc, net, weighting="snr")


# --- the loss ---------------------------------------------------------------------------------------------
D = 4
GD = M.random_mixture(seed=3, dim=D, num_components=1, mean_scale=1.0, eig_range=(0.05, 1.0))
E = np.asarray(GD.evals[0], np.float64)


def test_flow_loss_at_exact_velocity():
    """At a fixed t: the loss of the exact velocity (+ theta) equals m_u(t) within standard errors, its
    gradient in theta is zero within standard errors (and 2 theta D-mean off it), and every example's
    velocity error is (D/alpha)^2 = 1/(1 - t)^2 times its eps error."""
    proc, n = LINEAR, 4096
    x0 = M.sample(GD, jax.random.PRNGKey(0), n)[0]

    def net(theta, x, t, cond=None, train=False, rng=None):
        return P.flow_from_eps(proc, x, t, M.eps(GD, x, proc, t)) + theta

    loss_fn = O.flow_matching_loss(proc, net, return_per_example=True)
    value_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    for t in (0.1, 0.5, 0.9):
        batch = {"x": x0, "t": jnp.full((n,), t)}
        (loss, aux), grad = value_grad(jnp.float32(0.0), batch, jax.random.PRNGKey(7))
        a, s = 1.0 - t, t
        post = E / (a * a * E + s * s)   # eigenvalues of Cov(u | x_t)
        losses = np.asarray(aux["per_example"]["loss"], np.float64)
        assert abs(losses.mean() - post.mean()) < Z_TOL * losses.std() / math.sqrt(n), (t, losses.mean(), post.mean())
        assert abs(float(grad)) < Z_TOL * 2 * math.sqrt(post.max() / D / n), (t, float(grad))
        (_, _), grad_off = value_grad(jnp.float32(0.1), batch, jax.random.PRNGKey(7))
        np.testing.assert_allclose(float(grad_off) - float(grad), 0.2, rtol=1e-4)
        np.testing.assert_allclose(aux["mse"], aux["eps_mse"] / (1 - t) ** 2, rtol=1e-4)
        np.testing.assert_allclose(O.eps_factor(proc, jnp.float32(t), "flow"), 1 / (1 - t) ** 2, rtol=1e-5)
    # The residual is the one of the loss' own eps draw: its mean over the batch is the gradient / 2.
    _, eps = noisy_input(proc, x0, jnp.full((n,), 0.5), jax.random.split(jax.random.PRNGKey(7), 3)[1])
    u = eps - x0
    xt = 0.5 * x0 + 0.5 * eps
    u_star = net(0.0, xt, jnp.full((n,), 0.5))
    (_, _), g = value_grad(jnp.float32(0.0), {"x": x0, "t": jnp.full((n,), 0.5)}, jax.random.PRNGKey(7))
    np.testing.assert_allclose(float(g), 2 * float(jnp.mean(u_star - u)), atol=1e-5)
