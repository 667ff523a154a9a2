"""VDM's continuous-time ELBO against closed forms.

For data x ~ N(0, s^2 I) (D dims) and z_t = alpha x + sigma eps with alpha^2 = sigmoid(-gamma),
sigma^2 = sigmoid(gamma), the optimal eps-prediction is E[eps | z] = sigma z / (alpha^2 s^2 + sigma^2)
with error E||eps - E[eps|z]||^2 = D s^2 / (s^2 + e^gamma), so for ANY monotone schedule

    E[L_diff] = D/2 int_0^1 gamma'(t) s^2 / (s^2 + e^gamma(t)) dt
              = D/2 [gamma - log(s^2 + e^gamma)]_{gamma_0}^{gamma_1},
    E[L_prior] = D/2 [ sigmoid(-gamma_1) s^2 + sigmoid(gamma_1) - log sigmoid(gamma_1) - 1 ],
    E[L_recon] = D/2 [ 1 + log(2 pi) + gamma_0 ]                  (continuous Gaussian decoder).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.objectives.vdm import (
    NoiseSchedule, decoder_logprobs, elbo_bpd, encode_levels, prior_loss, reconstruction_loss, vdm_elbo_loss,
)

D, S = 4, 0.7
KEY = jax.random.PRNGKey(0)


def exact_gaussian_eps(model_params, z, gamma, cond=None, train=False, rng=None):
    var = jax.nn.sigmoid(gamma).reshape((-1,) + (1,) * (z.ndim - 1))
    s2 = model_params["s"] ** 2
    return jnp.sqrt(var) * z / ((1.0 - var) * s2 + var)


def perturbed(schedule, seed=0):
    """Learned-schedule params (numpy) with a strongly non-linear, still monotone part: a sigmoid step of
    height about 5 in gamma around t = 0.3 on top of the line from gamma_min to gamma_max."""
    rng, n = np.random.default_rng(seed), schedule.n_features
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"l1": {"kernel": f32([[schedule.gamma_max - schedule.gamma_min]]), "bias": f32([schedule.gamma_min])},
            "l2": {"kernel": f32(10.0 + rng.standard_normal((1, n))), "bias": f32(4.0 + rng.standard_normal(n))},
            "l3": {"kernel": f32(2.5 + 0.1 * rng.standard_normal((n, 1)))}}


def analytic_terms(g0, g1, s2=S * S, d=D):
    g0, g1 = float(g0), float(g1)
    diff = 0.5 * d * ((g1 - np.logaddexp(np.log(s2), g1)) - (g0 - np.logaddexp(np.log(s2), g0)))
    v1 = 1.0 / (1.0 + math.exp(-g1))
    prior = 0.5 * d * ((1.0 - v1) * s2 + v1 - math.log(v1) - 1.0)
    recon = 0.5 * d * (1.0 + math.log(2 * math.pi) + g0)
    return diff, prior, recon


# --- (ii) the schedule ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["learned", "fixed_linear"])
def test_schedule_endpoints_at_init_and_monotone(kind):
    t = np.concatenate([[0.0], np.linspace(0.0, 1.0, 2001), [1.0]]).astype(np.float32)
    for gmin, gmax in [(-13.3, 5.0), (-10.0, 7.5)]:
        sched = NoiseSchedule(kind, gmin, gmax)
        g, dg = map(np.asarray, jax.jit(lambda k, t: sched.value_and_grad(sched.init(k), t))(KEY, t))
        np.testing.assert_allclose(g[0], gmin, atol=2e-6)
        np.testing.assert_allclose(g[-1], gmax, atol=5e-6)
        assert np.all(np.diff(g[1:-1]) > 0) and np.all(dg > 0)
    if kind == "learned":
        # whatever the parameters (signs included), gamma stays monotone: |W| throughout
        p = perturbed(sched)
        p["l1"] = {"kernel": -p["l1"]["kernel"], "bias": p["l1"]["bias"]}
        g, dg = map(np.asarray, jax.jit(sched.value_and_grad)(p, t))
        assert np.all(np.diff(g) >= 0) and np.all(dg >= 0)
        nonlinearity = g - (g[0] + (g[-1] - g[0]) * t)
        assert np.max(np.abs(nonlinearity)) > 0.5  # the perturbation bites


# --- (iv) jvp derivative ------------------------------------------------------------------------------
def test_jvp_derivative_matches_finite_differences():
    sched = NoiseSchedule("learned")
    p32 = perturbed(sched)
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p32)
        t = np.linspace(0.01, 0.99, 41)
        h = 1e-6
        lin = NoiseSchedule("fixed_linear", -13.3, 5.0)

        @jax.jit
        def derivatives(p, t):
            g, dg = sched.value_and_grad(p, t)
            return g, dg, (sched(p, t + h) - sched(p, t - h)) / (2 * h), lin.value_and_grad({}, t)[1]

        g, dg, fd, dlin = derivatives(p, t)
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(dg, fd, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dlin, 18.3, rtol=1e-12)


# --- (i) the diffusion loss against its analytic value ---------------------------------------------
@pytest.mark.parametrize("kind", ["learned", "fixed_linear"])
def test_elbo_terms_match_closed_form_for_gaussian_data(kind):
    sched = NoiseSchedule(kind)
    sp = perturbed(sched) if kind == "learned" else {}
    params = {"model": {"s": np.float32(S)}, "schedule": sp}
    # VDM's antithetic times for the learned schedule, i.i.d. times for the fixed one
    loss_fn = vdm_elbo_loss(exact_gaussian_eps, sched, data="continuous", antithetic=kind == "learned")
    nodes, weights = np.polynomial.legendre.leggauss(400)

    # Monte Carlo: 64 independent batches of 256 fresh Gaussian examples
    def one(key):
        kx, kl = jax.random.split(key)
        x = S * jax.random.normal(kx, (256, D))
        _, aux = loss_fn(params, {"x": x}, kl)
        return jnp.stack([aux["bpd_diff"], aux["bpd_prior"], aux["bpd_recon"], aux["bpd"]]) * (D * math.log(2.0))

    @jax.jit
    def run(keys, tq):
        ends = sched(sp, jnp.array([0.0, 1.0]))
        return jax.vmap(one)(keys), ends, sched.value_and_grad(sp, tq)

    est, ends, (g, dg) = run(jax.random.split(KEY, 64), (0.5 * (nodes + 1.0)).astype(np.float32))
    est, (g0, g1) = np.asarray(est, np.float64), np.asarray(ends, np.float64)
    diff_ref, prior_ref, recon_ref = analytic_terms(g0, g1)

    # quadrature of D/2 gamma'(t) mse(gamma(t)) with the jvp derivative equals the endpoint formula
    integrand = 0.5 * D * np.asarray(dg, np.float64) * S ** 2 / (S ** 2 + np.exp(np.asarray(g, np.float64)))
    np.testing.assert_allclose(0.5 * np.sum(weights * integrand), diff_ref, rtol=2e-4)

    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(est.shape[0])
    for i, ref in enumerate([diff_ref, prior_ref, recon_ref, diff_ref + prior_ref + recon_ref]):
        assert abs(mean[i] - ref) < 3.5 * se[i] + 1e-5 * abs(ref), (i, mean[i], ref, se[i])
    # the bound is nearly tight for these endpoints: -ELBO exceeds the entropy by little
    entropy = 0.5 * D * math.log(2 * math.pi * math.e * S ** 2)
    assert 0 < diff_ref + prior_ref + recon_ref - entropy < 1e-2 * D


def test_time_input_t_is_the_same_model():
    """time_input='t' feeds t; a model mapping t -> gamma(t) itself gives the identical loss."""
    sched = NoiseSchedule("learned")
    sp = perturbed(sched)
    params = {"model": {"s": np.float32(S)}, "schedule": sp}
    x = S * np.random.default_rng(0).standard_normal((32, D)).astype(np.float32)
    by_t = lambda mp, z, t, c, train, rng: exact_gaussian_eps(mp, z, sched(sp, t))  # noqa: E731
    loss_gamma = vdm_elbo_loss(exact_gaussian_eps, sched, data="continuous")
    loss_t = vdm_elbo_loss(by_t, sched, data="continuous", time_input="t")
    a, b = jax.jit(lambda p, k: (loss_gamma(p, {"x": x}, k)[0], loss_t(p, {"x": x}, k)[0]))(params, KEY)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# --- (v) prior and reconstruction by hand -----------------------------------------------------------
def test_prior_and_reconstruction_by_hand():
    g0, g1 = -5.0, 3.0
    sched = NoiseSchedule("fixed_linear", g0, g1)
    levels = np.array([[0, 128, 255], [17, 200, 64]], np.uint8).reshape(2, 1, 1, 3)
    k = levels.reshape(2, 3).astype(np.float64)
    f = 2 * (k + 0.5) / 256 - 1

    def model(mp, z, gamma, cond=None, train=False, rng=None):
        return jnp.zeros_like(z)

    loss_fn = vdm_elbo_loss(model, sched, data="uint8")
    empty = {"model": {}, "schedule": {}}

    @jax.jit
    def run(x_uint8, x_float, rng):
        _, aux = loss_fn(empty, {"x": x_uint8}, rng)
        _, aux_f = loss_fn(empty, {"x": x_float}, rng)
        eps0 = jax.random.normal(jax.random.split(rng, 4)[0], x_uint8.shape)  # vdm_terms' first key
        z0 = encode_levels(x_uint8) + jnp.exp(0.5 * g0) * eps0
        helpers = (prior_loss(encode_levels(x_uint8), g1), jnp.sum(jnp.exp(decoder_logprobs(z0, g0)), -1),
                   encode_levels(jnp.array([0, 255])),
                   reconstruction_loss(encode_levels(x_uint8), z0, g0, "continuous"))
        return aux, aux_f, eps0, helpers

    aux, aux_f, eps0, (prior_h, total_prob, ends, recon_c) = run(levels, levels.astype(np.float32) / 127.5 - 1.0, KEY)
    nats = {name: np.asarray(v, np.float64) * 3 * math.log(2.0) for name, v in aux["per_example"].items()}

    sig = lambda a: 1.0 / (1.0 + math.exp(-a))  # noqa: E731
    prior = 0.5 * np.sum(sig(-g1) * f ** 2 + sig(g1) - math.log(sig(g1)) - 1.0, axis=1)
    np.testing.assert_allclose(nats["prior"], prior, rtol=1e-5)
    np.testing.assert_allclose(prior_h, prior, rtol=1e-5)

    eps0 = np.asarray(eps0, np.float64).reshape(2, 3)
    z0 = f + math.exp(0.5 * g0) * eps0  # z_0 / alpha_0
    grid = 2 * (np.arange(256) + 0.5) / 256 - 1
    logits = -0.5 * ((z0[..., None] - grid) / math.exp(0.5 * g0)) ** 2
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    logp = np.take_along_axis(logits, k.astype(int)[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(nats["recon"], -logp.sum(1), rtol=1e-4, atol=1e-4)
    assert np.all(-logp.sum(1) > 0.5)  # a non-trivial softmax: the decoder spreads over several levels

    np.testing.assert_allclose(total_prob, 1.0, rtol=1e-5)
    np.testing.assert_allclose(ends, [-1 + 1 / 256, 1 - 1 / 256], rtol=1e-6)
    # the data pipeline's floats k / 127.5 - 1 are read as the same levels
    np.testing.assert_allclose(aux_f["bpd_recon"], aux["bpd_recon"], rtol=1e-6)
    # continuous data: -log N(x; z_0/alpha_0, e^gamma_0) = 1/2 sum(eps_0^2 + log 2 pi + gamma_0)
    np.testing.assert_allclose(recon_c, 0.5 * np.sum(eps0 ** 2 + math.log(2 * math.pi) + g0, 1), rtol=1e-5)


# --- (iii) gradients -------------------------------------------------------------------------------
def _mlp_init(key, d, hidden=32):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (d + 1, hidden)) / math.sqrt(d + 1), "b1": jnp.zeros(hidden),
            "w2": 0.1 * jax.random.normal(k2, (hidden, d)) / math.sqrt(hidden), "b2": jnp.zeros(d)}


def _mlp_apply(mp, z, gamma, cond=None, train=False, rng=None):
    b = z.shape[0]
    h = jnp.concatenate([z.reshape(b, -1), ((gamma + 13.3) / 18.3)[:, None]], -1)
    h = jax.nn.silu(h @ mp["w1"] + mp["b1"])
    return (h @ mp["w2"] + mp["b2"]).reshape(z.shape) + z


def test_gradients_are_finite_for_model_and_schedule():
    sched = NoiseSchedule("learned", n_features=64)
    loss_fn = vdm_elbo_loss(_mlp_apply, sched)
    images = np.random.default_rng(1).integers(0, 256, (4, 2, 2, 3)).astype(np.uint8)

    @jax.jit
    def run(key):
        km, ks, kl = jax.random.split(key, 3)
        params = {"model": _mlp_init(km, 12), "schedule": sched.init(ks)}
        return jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": images}, kl)

    (loss, aux), grads = run(KEY)
    assert np.isfinite(float(loss)) and float(loss) > 0
    np.testing.assert_allclose(loss, aux["bpd_diff"] + aux["bpd_prior"] + aux["bpd_recon"], rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), path
    for part in ("model", "schedule"):
        assert sum(float(np.sum(np.asarray(g) ** 2)) for g in jax.tree_util.tree_leaves(grads[part])) > 0, part
    # gamma_0 and gamma_1 move the prior and reconstruction terms: the endpoint parameters get gradient
    assert abs(float(grads["schedule"]["l1"]["bias"][0])) > 0


def conditional_elbo_nats(x, g0, g1, s2=S * S):
    """E[-ELBO | x] per example for the exact Gaussian denoiser: with c = sigma / (alpha^2 s^2 + sigma^2),
    E||eps - c z||^2 = D s^4/(s^2 + e^g)^2 + |x|^2 e^g/(s^2 + e^g)^2, whose integral in gamma is
    D [g - log(s^2 + e^g) + s^2/(s^2 + e^g)] - |x|^2 / (s^2 + e^g)."""
    x2 = np.sum(np.asarray(x, np.float64) ** 2, axis=-1)
    d = x.shape[-1]

    def antiderivative(g):
        return d * (g - np.logaddexp(np.log(s2), g) + s2 / (s2 + math.exp(g))) - x2 / (s2 + math.exp(g))

    diff = 0.5 * (antiderivative(g1) - antiderivative(g0))
    v1 = 1.0 / (1.0 + math.exp(-g1))
    prior = 0.5 * ((1.0 - v1) * x2 + d * (v1 - math.log(v1) - 1.0))
    recon = 0.5 * d * (1.0 + math.log(2 * math.pi) + g0)
    return diff + prior + recon


def test_elbo_bpd_per_example_matches_conditional_closed_form():
    sched = NoiseSchedule("fixed_linear")
    params = {"model": {"s": np.float32(S)}, "schedule": {}}
    x = (S * np.random.default_rng(2).standard_normal((8, D)) * np.linspace(0.3, 2.0, 8)[:, None]).astype(np.float32)
    loss_fn = vdm_elbo_loss(exact_gaussian_eps, sched, data="continuous")
    elbo = lambda k, n: elbo_bpd(exact_gaussian_eps, params, {"x": x}, k, schedule=sched,  # noqa: E731
                                 data="continuous", num_samples=n).bpd

    @jax.jit
    def run(key):
        # num_samples = 1 is one draw of the training loss with fold_in(key, 0) and train=False
        one = elbo(key, 1)
        per = loss_fn(params, {"x": x}, jax.random.fold_in(key, 0), train=False)[1]["per_example"]
        # 16 independent runs of 256 draws each
        many = jax.vmap(lambda k: elbo(k, 256))(jax.random.split(key, 16))
        return one, per["diff"] + per["prior"] + per["recon"], many

    one, one_ref, many = run(KEY)
    np.testing.assert_allclose(one, one_ref, rtol=1e-5)
    est = np.asarray(many, np.float64) * D * math.log(2.0)
    mean, se = est.mean(0), est.std(0, ddof=1) / 4.0
    ref = conditional_elbo_nats(x, -13.3, 5.0)
    zscore = (mean - ref) / se
    assert np.all(np.abs(zscore) < 4.0), zscore  # per example, within 4 standard errors of E[-ELBO | x]
    assert np.ptp(ref) > 10 * se.max()  # the examples really differ: the check is per example
