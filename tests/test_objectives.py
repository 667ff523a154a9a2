"""Objectives against closed forms: Gaussian data, the exact denoiser, and the analytic loss minimum.

For x0 ~ N(mu, S) (eigenvalues e_i) and x_t = alpha x0 + sigma eps, Cov(eps | x_t) = I - sigma^2 C^{-1},
C = alpha^2 S + sigma^2 I, so the least eps-space squared error at time t (mean over D dims) is

    m(t) = (1/D) sum_i alpha^2 e_i / (alpha^2 e_i + sigma^2) = (1/D) sum_i e_i / (e_i + exp(-lambda(t))),

and every objective's minimum is E_t[lambda(t) c(t) m(t)] with c the error factor of its
parameterisation (x0: 1/SNR, v: (alpha^2+sigma^2)^2/alpha^2, score: 1/sigma^2). Monte-Carlo losses at the
exact denoiser are compared with that number within a few standard errors of the per-example losses.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives as O
from diffusion_jax import processes as P
from diffusion_jax.processes import predictions as pred
from diffusion_jax.reference import mixtures as M

D = 4
N_MC = 4096
Z_TOL = 4.5  # standard errors
GM = M.random_mixture(seed=3, dim=D, num_components=1, mean_scale=1.0, eig_range=(0.05, 1.0))
E = np.asarray(GM.evals[0], np.float64)
X0 = M.sample(GM, jax.random.PRNGKey(0), N_MC)[0]
BATCH = {"x": X0}
ALL = sorted(P.PROCESSES)


# --- closed-form references ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _coef_fn(process):
    return jax.jit(lambda t: (process.alpha(t), process.sigma(t), process.g2(t)))


def _coefs64(process, t):
    """alpha, sigma, g^2 at t as float64 numpy (evaluated in float32, jitted once per process)."""
    return tuple(np.asarray(v, np.float64) for v in _coef_fn(process)(jnp.asarray(t, jnp.float32)))


def min_eps_mse(a, s):
    """m = (1/D) tr(I - sigma^2 C^{-1}) = mean_i alpha^2 e_i / (alpha^2 e_i + sigma^2)."""
    a2, s2 = (a ** 2)[..., None], (s ** 2)[..., None]
    return np.mean(a2 * E / (a2 * E + s2), -1)


_LEGGAUSS = np.polynomial.legendre.leggauss(1000)


def expected_min(process, eps_weight, discrete=False):
    """E_t[eps_weight(alpha, sigma, g2) m(t)] for t uniform on [t_min, t_max] (uniform timesteps on a
    discrete process), by 1000-node Gauss-Legendre quadrature in log t."""
    if discrete:
        t = (np.arange(process.num_steps) + 1.0) / process.num_steps
        qw = np.full(t.shape, 1.0 / t.size)
    else:
        u, w = _LEGGAUSS
        lo, hi = math.log(process.t_min), math.log(process.t_max)
        t = np.exp(0.5 * (hi - lo) * u + 0.5 * (hi + lo))
        qw = 0.5 * (hi - lo) * w * t / (process.t_max - process.t_min)
    a, s, g2 = _coefs64(process, t.astype(np.float32))
    return float(np.sum(qw * eps_weight(a, s, g2) * min_eps_mse(a, s)))


def assert_within_se(samples, expected, what, z=Z_TOL):
    samples = np.asarray(samples, np.float64)
    mean, se = samples.mean(), samples.std(ddof=1) / math.sqrt(samples.size)
    assert abs(mean - expected) < z * se, f"{what}: MC {mean:.6g} +- {se:.3g} vs closed form {expected:.6g}"
    return mean, se


# --- networks -----------------------------------------------------------------------------------------
def exact_net(process, kind, direction=None):
    """apply_fn returning the exact optimal prediction of `kind` plus theta * direction(x)."""

    def fn(params, x, t, cond=None, *, train=False, rng=None):
        eps = M.eps(GM, x, process, t)
        if kind == "eps":
            out = eps
        elif kind == "x0":
            out = M.x0_mean(GM, x, process, t)
        elif kind == "v":
            out = pred.v_from_eps(process, x, t, eps)
        elif kind == "score":
            out = M.score(GM, x, process, t)
        elif kind == "flow":
            out = pred.flow_from_eps(process, x, t, eps)
        else:
            raise AssertionError(kind)
        if direction is not None:
            out = out + params["theta"] * direction(x)
        return out

    return fn


def exact_edm_raw(sigma_data=0.5, direction=None):
    """The raw EDM network whose preconditioned denoiser is exactly E[x0 | x] under x = x0 + sigma n."""
    edm = P.EDM()

    def fn(params, x_in, c_noise, cond=None, *, train=False, rng=None):
        sigma = jnp.exp(4.0 * c_noise)
        c = O.edm_scalings(sigma, sigma_data)
        x = x_in / c.c_in[:, None]
        out = (M.x0_mean(GM, x, edm, sigma) - c.c_skip[:, None] * x) / c.c_out[:, None]
        if direction is not None:
            out = out + params["theta"] * direction(x)
        return out

    return fn


def mlp_init(key, d=D, hidden=16):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (d, hidden)) / math.sqrt(d), "wt": jax.random.normal(k2, (hidden,)),
            "b1": jnp.zeros(hidden), "w2": jax.random.normal(k3, (hidden, d)) / math.sqrt(hidden),
            "b2": jnp.zeros(d)}


def mlp_apply(params, x, t, cond=None, *, train=False, rng=None):
    flat = x.reshape(x.shape[0], -1)
    h = jnp.tanh(flat @ params["w1"] + jnp.asarray(t, jnp.float32)[:, None] * params["wt"] + params["b1"])
    return (h @ params["w2"] + params["b2"]).reshape(x.shape)


MLP = mlp_init(jax.random.PRNGKey(7))


def per_example(loss_fn, params, batch=BATCH, key=1):
    loss, aux = jax.jit(loss_fn)(params, batch, jax.random.PRNGKey(key))
    pe = aux["per_example"]
    np.testing.assert_allclose(float(loss), float(jnp.mean(pe["loss"])), rtol=1e-5)
    return np.asarray(pe["loss"], np.float64), np.asarray(pe["t"]), aux


# --- analytic minima -----------------------------------------------------------------------------------
ONE = lambda a, s, g2: np.ones_like(a)  # noqa: E731
GAMMA = 5.0


def _min_snr(a, s):
    return np.minimum(a ** 2 / s ** 2, GAMMA) / (a ** 2 / s ** 2)


# (factory, options, exact prediction, eps-space weight lambda(t) c(t))
CASES = {
    "eps": (O.epsilon_loss, {}, "eps", ONE),
    "eps_min_snr": (O.epsilon_loss, {"weighting": "min_snr"}, "eps", lambda a, s, g2: _min_snr(a, s)),
    "eps_stratified": (O.epsilon_loss, {"time_sampling": "stratified"}, "eps", ONE),
    "x0": (O.x0_loss, {}, "x0", lambda a, s, g2: s ** 2 / a ** 2),
    "x0_snr": (O.x0_loss, {"weighting": "snr"}, "x0", ONE),
    "x0_min_snr": (O.x0_loss, {"weighting": "min_snr"}, "x0", lambda a, s, g2: _min_snr(a, s)),
    "v": (O.v_loss, {}, "v", lambda a, s, g2: (a ** 2 + s ** 2) ** 2 / a ** 2),
    "v_min_snr": (O.v_loss, {"weighting": "min_snr"}, "v", lambda a, s, g2: _min_snr(a, s)),
    "flow": (O.flow_matching_loss, {}, "flow", lambda a, s, g2: (0.5 * g2 / s) ** 2),   # (D/alpha)^2
    "score_sigma2": (O.score_matching_loss, {}, "score", ONE),
    "score_likelihood": (O.score_matching_loss, {"weighting": "likelihood"}, "score", lambda a, s, g2: g2 / s ** 2),
    "score_likelihood_is": (O.score_matching_loss, {"weighting": "likelihood", "importance_sampling": True},
                            "score", lambda a, s, g2: g2 / s ** 2),
}
MIN_CASES = {
    "vp": list(CASES),
    "ve": ["eps", "eps_min_snr", "x0", "x0_snr", "v", "v_min_snr", "score_likelihood", "score_likelihood_is"],
    "subvp": ["eps", "x0", "score_likelihood"],
    "cosine": ["eps", "v", "score_likelihood_is"],
    "edm": ["eps", "x0_min_snr", "v_min_snr", "score_likelihood_is"],
    "ddpm": ["eps", "eps_stratified", "x0_snr", "v_min_snr", "score_likelihood_is"],
    "flow": ["eps", "v", "flow", "score_likelihood_is"],
}


@pytest.mark.parametrize("proc", ALL)
def test_loss_at_exact_denoiser_equals_analytic_minimum(proc):
    """Every objective's Monte-Carlo loss at the exact denoiser equals E_t[lambda c m] (all cases of a
    process in one jitted call)."""
    process = P.get_process(proc)
    names = MIN_CASES[proc]
    fns = [CASES[c][0](process, exact_net(process, CASES[c][2]), return_per_example=True, **CASES[c][1])
           for c in names]
    outs = jax.jit(lambda key: [fn({}, BATCH, jax.random.fold_in(key, i))
                                for i, fn in enumerate(fns)])(jax.random.PRNGKey(10 + ALL.index(proc)))
    for case, (loss, aux) in zip(names, outs):
        losses = np.asarray(aux["per_example"]["loss"], np.float64)
        np.testing.assert_allclose(float(loss), losses.mean(), rtol=1e-5)
        expected = expected_min(process, CASES[case][3], discrete=proc == "ddpm")
        assert_within_se(losses, expected, f"{case} on {proc}")


def test_likelihood_min_has_closed_form_in_log_snr():
    """Likelihood weighting: E_t[g^2/sigma^2 m] = (1/(t_max - t_min)) int m dlambda, and
    int e/(e + exp(-lambda)) dlambda = log(1 + e exp(lambda)) -- checks the quadrature helper and
    g^2 = -sigma^2 dlambda/dt on every continuous process."""
    for name in ("vp", "subvp", "cosine", "ve", "edm"):
        p = P.get_process(name)
        lam_hi, lam_lo = (float(p.log_snr(jnp.float32(x))) for x in (p.t_min, p.t_max))
        closed = np.mean(np.log1p(E * np.exp(lam_hi)) - np.log1p(E * np.exp(lam_lo))) / (p.t_max - p.t_min)
        quad = expected_min(p, lambda a, s, g2: g2 / s ** 2)
        np.testing.assert_allclose(quad, closed, rtol=2e-3, err_msg=name)


# --- stationarity at the exact denoiser -------------------------------------------------------------
GRAD_CASES = [("x0", "ve"), ("v", "cosine"), ("score_likelihood_is", "vp"), ("eps_min_snr", "ddpm")]


def _direction(x):
    return jnp.tanh(x) + 0.3


@pytest.mark.parametrize("case,proc", GRAD_CASES + [("edm", "edm")])
def test_exact_denoiser_is_stationary_and_minimal(case, proc):
    """apply_fn = exact + theta * h: d loss/d theta = 0 in expectation at theta = 0, and the loss is
    larger at theta = +-0.2 on the same draws."""
    if case == "edm":
        loss_fn = O.edm_loss(exact_edm_raw(direction=_direction), return_per_example=True)
    else:
        process = P.get_process(proc)
        factory, opts, kind, _ = CASES[case]
        loss_fn = factory(process, exact_net(process, kind, _direction), return_per_example=True, **opts)
    rng = jax.random.PRNGKey(5)

    def per_ex(theta):
        return loss_fn({"theta": theta}, BATCH, rng)[1]["per_example"]["loss"]

    thetas = jnp.asarray([0.0, -0.2, 0.2])
    grads, losses = jax.jit(lambda: (jax.jacfwd(per_ex)(jnp.float32(0.0)), jax.vmap(per_ex)(thetas)))()
    assert_within_se(np.asarray(grads, np.float64), 0.0, f"d loss / d theta at the exact denoiser ({case}, {proc})")
    means = np.asarray(jnp.mean(losses, -1))
    assert means[1] > means[0] and means[2] > means[0], f"{case}: loss {means} not minimal at theta = 0"


# --- EDM ---------------------------------------------------------------------------------------------
def _edm_expected_min(sigma_data, p_mean, p_std):
    """E_sigma[lambda(sigma) (1/D) sum_i e_i sigma^2 / (e_i + sigma^2)], ln sigma ~ N(p_mean, p_std^2),
    by 80-node Gauss-Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(80)
    sig = np.exp(p_mean + p_std * z)[:, None]
    lam = (sig ** 2 + sigma_data ** 2) / (sig * sigma_data) ** 2
    inner = np.mean(E * sig ** 2 / (E + sig ** 2), -1, keepdims=True)
    return float(np.sum(w[:, None] * lam * inner) / np.sqrt(2 * np.pi))


@pytest.mark.parametrize("sigma_data,p_mean,p_std", [(0.5, -1.2, 1.2), (1.0, 0.0, 1.0)])
def test_edm_loss_at_exact_denoiser_equals_analytic_minimum(sigma_data, p_mean, p_std):
    loss_fn = O.edm_loss(exact_edm_raw(sigma_data), sigma_data=sigma_data, p_mean=p_mean, p_std=p_std,
                         return_per_example=True)
    loss, aux = jax.jit(loss_fn)({}, BATCH, jax.random.PRNGKey(2))
    assert_within_se(aux["per_example"]["loss"], _edm_expected_min(sigma_data, p_mean, p_std), "EDM loss")


def test_edm_scalings_identities_and_unit_variance():
    sd = 0.5
    sig = jnp.asarray([0.002, 0.1, 0.5, 2.0, 80.0])
    c = O.edm_scalings(sig, sd)
    np.testing.assert_allclose(c.c_in ** 2 * (sig ** 2 + sd ** 2), 1.0, rtol=1e-6)
    np.testing.assert_allclose((1 - c.c_skip) ** 2 * sd ** 2 + c.c_skip ** 2 * sig ** 2, c.c_out ** 2, rtol=1e-5)
    np.testing.assert_allclose(O.edm_loss_weight(sig, sd), 1 / c.c_out ** 2, rtol=1e-5)
    np.testing.assert_allclose(c.c_noise, np.log(np.asarray(sig)) / 4, rtol=1e-6)
    # Data of std sigma_data: network input c_in x and target F have unit variance at every sigma.
    data = M.gaussian(np.zeros(D), sd ** 2 * np.eye(D))
    x0 = M.sample(data, jax.random.PRNGKey(3), N_MC)[0]
    n = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
    se = math.sqrt(2.0 / (N_MC * D))  # SE of a unit-variance estimate from N*D Gaussian values
    for s in np.asarray(sig):
        x = x0 + s * n
        cs = O.edm_scalings(jnp.full((N_MC,), s), sd)
        f = O.edm_target(x0, x, jnp.full((N_MC,), s), sd)
        for what, arr in (("F target", f), ("c_in x", cs.c_in[:, None] * x)):
            var = float(jnp.mean(arr ** 2))
            assert abs(var - 1.0) < 5 * se, f"{what} variance {var:.4f} at sigma {s}"


def test_edm_loss_equals_target_regression_on_same_draw():
    """lambda ||D - x0||^2 = ||F - (x0 - c_skip x)/c_out||^2 for an arbitrary network."""
    sd = 0.5
    den = O.edm_precondition(mlp_apply, sd)
    sig = jnp.exp(-1.2 + 1.2 * jax.random.normal(jax.random.PRNGKey(1), (256,)))
    x0 = X0[:256]
    x = x0 + sig[:, None] * jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    lhs = O.edm_loss_weight(sig, sd) * jnp.mean((den(MLP, x, sig) - x0) ** 2, -1)
    c = O.edm_scalings(sig, sd)
    f = mlp_apply(MLP, c.c_in[:, None] * x, c.c_noise)
    rhs = jnp.mean((f - O.edm_target(x0, x, sig, sd)) ** 2, -1)
    np.testing.assert_allclose(lhs, rhs, rtol=2e-4, atol=1e-6)
    # batch['sigma'] replaces the sampled noise levels
    _, aux = O.edm_loss(mlp_apply)(MLP, {"x": x0, "sigma": sig}, jax.random.PRNGKey(0))
    np.testing.assert_allclose(aux["weight"], jnp.mean(O.edm_loss_weight(sig, sd)), rtol=1e-5)


@pytest.mark.parametrize("proc", ["edm", "vp", "cosine"])
def test_edm_preconditioned_exact_network_is_the_exact_denoiser(proc):
    """At the exact F, D = E[x0 | x], and the eps_fn adapter reproduces the exact eps of any process."""
    process = P.get_process(proc)
    raw = exact_edm_raw()
    t = jnp.linspace(process.t_min, process.t_max, 9)[1:-1]
    t = jnp.repeat(t, 64)
    x0 = M.sample(GM, jax.random.PRNGKey(8), t.shape[0])[0]
    x = process.add_noise(x0, jax.random.normal(jax.random.PRNGKey(9), x0.shape), t)

    @jax.jit
    def run(x, t):
        sig, a = process.edm_sigma(t), process.alpha(t)[:, None]
        d = O.edm_precondition(raw)({}, x / a, sig)
        return (d, M.x0_mean(GM, x / a, P.EDM(), sig), M.x0_mean(GM, x, process, t),
                O.edm_eps_fn(raw, {}, process)(x, t, None), M.eps(GM, x, process, t))

    d, x0_edm, x0_proc, eps, eps_true = run(x, t)
    np.testing.assert_allclose(d, x0_edm, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(d, x0_proc, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(eps, eps_true, rtol=2e-3, atol=2e-3)


# --- weighting relations on the same draws ----------------------------------------------------------
def _nets(process):
    """The same (imperfect) eps network, expressed as each parameterisation."""
    eps = mlp_apply
    return {
        "eps": eps,
        "x0": lambda p, x, t, c=None, **k: pred.x0_from_eps(process, x, t, eps(p, x, t)),
        "v": lambda p, x, t, c=None, **k: pred.v_from_eps(process, x, t, eps(p, x, t)),
        "score": lambda p, x, t, c=None, **k: pred.score_from_eps(process, x, t, eps(p, x, t)),
    }


@pytest.mark.parametrize("proc", ["vp", "subvp", "edm", "ddpm"])
def test_parameterisations_relate_by_their_error_factors(proc):
    """The same eps network as eps / score / x0 / v predictor, same rng: per-example losses are the
    stated multiples of each other (all losses of a process in one jitted call)."""
    process = P.get_process(proc)
    nets = _nets(process)
    kw = dict(return_per_example=True)
    fns = {
        "eps": O.epsilon_loss(process, nets["eps"], **kw),
        "score": O.score_matching_loss(process, nets["score"], **kw),
        "score_eps": O.score_matching_loss(process, nets["eps"], prediction="eps", **kw),
        "x0_snr": O.x0_loss(process, nets["x0"], weighting="snr", **kw),
        "v": O.v_loss(process, nets["v"], **kw),
        "eps_min_snr": O.epsilon_loss(process, nets["eps"], weighting="min_snr", **kw),
        "x0_min_snr": O.x0_loss(process, nets["x0"], weighting="min_snr", **kw),
        "v_min_snr": O.v_loss(process, nets["v"], weighting="min_snr", **kw),
    }
    batch, key = {"x": X0[:512]}, jax.random.PRNGKey(3)
    out = jax.jit(lambda p: {k: fn(p, batch, key)[1]["per_example"] for k, fn in fns.items()})(MLP)
    t = np.asarray(out["eps"]["t"])
    l = {k: np.asarray(v["loss"], np.float64) for k, v in out.items()}
    for k in out:
        np.testing.assert_array_equal(out[k]["t"], t)
    a, s, _ = _coefs64(process, t)
    np.testing.assert_allclose(l["score"], l["eps"], rtol=5e-4, err_msg="sigma^2 ||s - s*||^2 = ||eps - eps*||^2")
    np.testing.assert_allclose(l["score_eps"], l["eps"], rtol=5e-4)
    np.testing.assert_allclose(l["x0_snr"], l["eps"], rtol=5e-4, err_msg="SNR ||x0 - x0*||^2 = ||eps - eps*||^2")
    np.testing.assert_allclose(l["v"], (a ** 2 + s ** 2) ** 2 / a ** 2 * l["eps"], rtol=5e-4,
                               err_msg="||v - v*||^2 = (alpha^2+sigma^2)^2/alpha^2 ||eps - eps*||^2")
    # Min-SNR: the same eps-space weight min(SNR, gamma)/SNR in every parameterisation.
    w = np.minimum(a ** 2 / s ** 2, GAMMA) / (a ** 2 / s ** 2)
    for kind in ("eps", "x0", "v"):
        np.testing.assert_allclose(l[f"{kind}_min_snr"], w * l["eps"], rtol=5e-4, err_msg=f"min-SNR {kind}")
    if proc != "edm":  # (EDM's t = sigma is uniform on [0.002, 80]: SNR > gamma on 0.5% of it)
        assert 0.05 < np.mean(w < 1) < 0.95  # gamma clips some of the drawn t


def test_min_snr_weights_match_the_paper_formulas():
    vp = P.VPLinear()
    t = jnp.linspace(vp.t_min, vp.t_max, 101)
    a, s, _ = _coefs64(vp, t)
    snr = a ** 2 / s ** 2
    assert snr.min() < GAMMA < snr.max()
    for kind, want in (("eps", np.minimum(snr, GAMMA) / snr), ("x0", np.minimum(snr, GAMMA)),
                       ("v", np.minimum(snr, GAMMA) / (snr + 1))):
        np.testing.assert_allclose(O.min_snr_weight(vp, t, GAMMA, kind), want, rtol=1e-4, err_msg=kind)
        np.testing.assert_allclose(O.loss_weight(vp, t, "min_snr", kind, min_snr_gamma=GAMMA), want, rtol=1e-4)


def test_likelihood_importance_sampling_is_unbiased_and_lower_variance():
    vp = P.VPLinear()
    net = exact_net(vp, "score")
    kw = dict(weighting="likelihood", return_per_example=True)
    plain, _, _ = per_example(O.score_matching_loss(vp, net, **kw), {}, key=11)
    imp, t_is, _ = per_example(O.score_matching_loss(vp, net, importance_sampling=True, **kw), {}, key=12)
    se = math.sqrt(plain.var(ddof=1) / plain.size + imp.var(ddof=1) / imp.size)
    assert abs(plain.mean() - imp.mean()) < Z_TOL * se
    assert imp.var() < 0.25 * plain.var(), (imp.var(), plain.var())
    # the median importance-sampled t is where lambda is halfway between its end values
    lam_mid = 0.5 * (vp.log_snr(jnp.float32(vp.t_min)) + vp.log_snr(jnp.float32(vp.t_max)))
    np.testing.assert_allclose(np.median(t_is), float(vp.t_from_log_snr(lam_mid)), atol=0.02)


# --- gradients, jit, dtypes, shapes ----------------------------------------------------------------------
FACTORIES = {
    "eps_min_snr_stratified": lambda p, f: O.epsilon_loss(p, f, weighting="min_snr", time_sampling="stratified"),
    "x0_snr": lambda p, f: O.x0_loss(p, f, weighting="snr"),
    "v_min_snr": lambda p, f: O.v_loss(p, f, weighting="min_snr"),
    "score_likelihood_is": lambda p, f: O.score_matching_loss(p, f, weighting="likelihood",
                                                              importance_sampling=True),
    "score_eps": lambda p, f: O.score_matching_loss(p, f, prediction="eps"),
    "eps_lognormal": lambda p, f: O.epsilon_loss(p, f, time_sampling="lognormal"),
}


@pytest.mark.parametrize("proc", ["vp", "ddpm"])
def test_every_loss_has_finite_gradients_under_jit(proc):
    process = P.get_process(proc)
    batch = {"x": X0[:8]}
    fns = {name: make(process, mlp_apply) for name, make in FACTORIES.items()}
    out = jax.jit(lambda p: {name: jax.value_and_grad(lambda q: fn(q, batch, jax.random.PRNGKey(0))[0])(p)
                             for name, fn in fns.items()})(MLP)
    for name, (loss, g) in out.items():
        assert np.isfinite(float(loss)) and float(loss) > 0, name
        leaves = jax.tree_util.tree_leaves(g)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves), name
        assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in leaves), name


def test_edm_loss_finite_gradients_images_and_bfloat16_network():
    """Image-shaped batches (B, H, W, C), a bfloat16 network, cond passed through, dropout rng given."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
    seen = {}

    def net(params, x_in, t, cond=None, *, train=False, rng=None):
        seen.update(cond=cond, train=train, rng=rng is not None, t_dtype=t.dtype)
        flat = x_in.reshape(x_in.shape[0], -1)
        return mlp_apply(params, flat, t).reshape(x_in.shape).astype(jnp.bfloat16)

    batch = {"x": x, "cond": {"label": jnp.arange(4)}}
    for loss_fn in (O.edm_loss(net), O.epsilon_loss(P.VE(), net), O.v_loss(P.EDM(), net, weighting="min_snr")):
        (loss, aux), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(MLP, batch, jax.random.PRNGKey(1))
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
        assert set(aux) >= {"loss", "mse", "weight"} and all(v.shape == () for v in aux.values())
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(g))
        assert seen["train"] and seen["rng"] and seen["cond"] is not None and seen["t_dtype"] == jnp.float32


def test_discrete_ddpm_loss_uses_integer_timesteps():
    ddpm = P.DiscreteDDPM()
    samplings = O.TIME_SAMPLINGS
    fns = [O.epsilon_loss(ddpm, mlp_apply, time_sampling=m, return_per_example=True) for m in samplings]
    ts = jax.jit(lambda: [fn(MLP, {"x": X0[:256]}, jax.random.PRNGKey(4))[1]["per_example"]["t"] for fn in fns])()
    for m, t in zip(samplings, ts):
        n = np.asarray(t, np.float64) * ddpm.num_steps - 1
        np.testing.assert_allclose(n, np.round(n), atol=1e-3, err_msg=m)
        assert n.min() >= -1e-3 and n.max() <= ddpm.num_steps - 1 + 1e-3, m
        assert len(np.unique(np.round(n))) > 20, m


# --- time samplers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc", ["vp", "edm", "ddpm"])
def test_stratified_sampler_puts_one_point_in_each_stratum(proc):
    process = P.get_process(proc)
    b = 8  # divides the 1000 DDPM timesteps, so timestep strata are unit-interval strata
    for seed in range(3):
        ts = O.stratified_time(process, jax.random.PRNGKey(seed), b)
        t = np.asarray(ts.t, np.float64)
        assert t.min() >= process.t_min - 1e-7 and t.max() <= process.t_max + 1e-6
        if proc == "ddpm":
            np.testing.assert_array_equal(np.sort(np.asarray(ts.index) // (process.num_steps // b)), np.arange(b))
        else:
            u = (t - process.t_min) / (process.t_max - process.t_min)
            np.testing.assert_array_equal(np.sort(np.floor(u * b)), np.arange(b))


def _ks(samples, cdf_grid, t_grid):
    x = np.sort(samples)
    f = np.interp(x, t_grid, cdf_grid)
    n = x.size
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


@pytest.mark.parametrize("proc", ["vp", "subvp", "cosine", "ve", "edm"])
def test_importance_sampler_matches_g2_over_sigma2(proc):
    """KS test of the importance-sampled t against the CDF of g^2/sigma^2 integrated numerically from
    the process's own g2 and sigma (not from log_snr, which the sampler uses)."""
    process = P.get_process(proc)
    n = 4000
    ts = O.likelihood_importance_time(process, jax.random.PRNGKey(21), n)
    grid = np.exp(np.linspace(math.log(process.t_min), math.log(process.t_max), 20001))
    g = jnp.asarray(grid, jnp.float32)
    dens = np.asarray(process.g2(g), np.float64) / np.asarray(process.sigma(g), np.float64) ** 2
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
    np.testing.assert_allclose(cdf[-1], float(process.log_snr(jnp.float32(process.t_min))
                                               - process.log_snr(jnp.float32(process.t_max))), rtol=1e-3)
    cdf /= cdf[-1]
    crit = 1.95 / math.sqrt(n)  # 0.1% level
    assert _ks(np.asarray(ts.t, np.float64), cdf, grid) < crit
    if proc != "ve":  # (VE: g^2/sigma^2 = 2 log(sigma_max/sigma_min) is constant, p(t) uniform)
        uniform = (grid - process.t_min) / (process.t_max - process.t_min)
        assert _ks(np.asarray(ts.t, np.float64), uniform, grid) > 5 * crit  # the test tells densities apart
    # importance weights are q_uniform / p: their mean is 1, and density * weight is constant
    w = np.asarray(ts.weight, np.float64)
    assert_within_se(w, 1.0, "E_p[weight]")
    p_t = np.asarray(O.likelihood_importance_density(process, ts.t), np.float64)
    np.testing.assert_allclose(w * p_t, 1.0 / (process.t_max - process.t_min), rtol=1e-4)


def test_lognormal_sigma_sampler_matches_p_mean_p_std():
    n = 4000
    for p_mean, p_std in ((-1.2, 1.2), (0.4, 0.6)):
        ls = np.log(np.asarray(O.edm_sigma_sample(jax.random.PRNGKey(0), n, p_mean, p_std), np.float64))
        assert_within_se(ls, p_mean, "mean of ln sigma")
        assert abs(ls.std(ddof=1) - p_std) < 5 * p_std / math.sqrt(2 * n)
    # through a VP process: the sampled t carry EDM's noise levels sigma/alpha
    vp = P.VPLinear()
    ts = O.lognormal_time(vp, jax.random.PRNGKey(0), n, p_mean=-1.2, p_std=1.2)
    ls = np.log(np.asarray(vp.edm_sigma(ts.t), np.float64))
    inside = (ls > math.log(float(vp.edm_sigma(jnp.float32(vp.t_min)))) + 1e-3) & (ls < 4.0)
    assert inside.mean() > 0.97
    np.testing.assert_allclose(np.median(ls), -1.2, atol=0.1)


def test_loss_history_sampler_favours_high_loss_buckets():
    k, h = 8, 10
    state = O.init_loss_history(k, h)
    np.testing.assert_allclose(O.history_probs(state), 1.0 / k)  # uniform before warm-up
    # bucket j sees losses of scale (j + 1), alternating sign of noise around it
    rng = np.random.default_rng(0)
    for _ in range(h + 2):
        idx = np.arange(k)
        state = jax.jit(O.update_history)(state, idx, (idx + 1) * (1.0 + 0.1 * rng.standard_normal(k)))
    assert np.all(np.asarray(state.counts) == h)
    rms = np.sqrt(np.mean(np.asarray(state.history, np.float64) ** 2, -1))
    want = 0.999 * rms / rms.sum() + 0.001 / k
    p = np.asarray(O.history_probs(state), np.float64)
    np.testing.assert_allclose(p, want, rtol=1e-5)
    assert np.all(np.diff(p) > 0)
    n = 20000
    idx, w = jax.jit(O.sample_from_history, static_argnums=2)(state, jax.random.PRNGKey(3), n)
    freq = np.bincount(np.asarray(idx), minlength=k) / n
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))
    np.testing.assert_allclose(np.asarray(w), 1.0 / (k * p[np.asarray(idx)]), rtol=1e-5)
    # unbiased: E[w f(idx)] under the history sampler = the uniform average of f
    f = np.arange(k, dtype=np.float64) ** 2
    assert_within_se(np.asarray(w, np.float64) * f[np.asarray(idx)], f.mean(), "history IS")


def test_loss_history_keeps_last_losses_in_order():
    state = O.init_loss_history(3, 4)
    state = O.update_history(state, jnp.zeros(6, jnp.int32), jnp.arange(6.0))  # six losses into bucket 0
    np.testing.assert_array_equal(state.history[0], [2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(state.counts, [4, 0, 0])
    state = O.update_history(state, jnp.array([2, 2]), jnp.array([7.0, 8.0]))
    np.testing.assert_array_equal(state.history[2], [7.0, 8.0, 0.0, 0.0])


@pytest.mark.parametrize("proc", ["vp", "ddpm"])
def test_history_buckets_roundtrip_and_drive_a_loss(proc):
    process = P.get_process(proc)
    k = process.num_steps if proc == "ddpm" else 20
    loss_fn = O.epsilon_loss(process, mlp_apply, return_per_example=True)

    @jax.jit
    def step(state, key):
        k1, k2, k3 = jax.random.split(key, 3)
        idx, w = O.sample_from_history(state, k1, 64)
        t = O.bucket_time(process, k2, idx, k)
        _, aux = loss_fn(MLP, {"x": X0[:64], "t": t, "t_weight": w}, k3)
        return O.update_history(state, idx, aux["per_example"]["time_loss"]), idx, t, aux["per_example"]["t"]

    state, idx, t, t_seen = step(O.init_loss_history(k), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(t_seen, t)
    np.testing.assert_array_equal(O.time_bucket(process, t, k), idx)
    np.testing.assert_array_equal(state.counts, np.bincount(np.asarray(idx), minlength=k).clip(max=10))


# --- bad input -------------------------------------------------------------------------------------------
def test_bad_options_raise_value_errors_listing_valid_ones():
    vp = P.VPLinear()
    cases = [
        (lambda: O.epsilon_loss(vp, mlp_apply, weighting="snr2"), "weighting", "'min_snr'"),
        (lambda: O.x0_loss(vp, mlp_apply, weighting="likelihood"), "weighting", "'snr'"),
        (lambda: O.epsilon_loss(vp, mlp_apply, time_sampling="sobol"), "time sampling", "'stratified'"),
        (lambda: O.score_matching_loss(vp, mlp_apply, prediction="v"), "prediction", "'score'"),
        (lambda: O.score_matching_loss(vp, mlp_apply, weighting="snr"), "weighting", "'likelihood'"),
        (lambda: O.denoising_loss(vp, mlp_apply, prediction="noise"), "prediction", "'x0'"),
        (lambda: O.sample_time(vp, jax.random.PRNGKey(0), 4, "beta"), "time sampling", "'importance'"),
        (lambda: O.edm_loss(mlp_apply, reduce="max"), "reduce", "'sum'"),
        (lambda: O.min_snr_weight(vp, 0.5, 5.0, "edm"), "prediction", "'v'"),
    ]
    for make, what, listed in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert what in str(err.value) and listed in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="importance_sampling"):
        O.score_matching_loss(vp, mlp_apply, importance_sampling=True, time_sampling="stratified")


def test_batch_without_x_raises_clear_error():
    for loss_fn in (O.epsilon_loss(P.VPLinear(), mlp_apply), O.edm_loss(mlp_apply)):
        with pytest.raises(KeyError, match="'x'"):
            loss_fn(MLP, {"image": X0[:4]}, jax.random.PRNGKey(0))
        with pytest.raises(KeyError, match="'x'"):
            loss_fn(MLP, X0[:4], jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="shaped like x"):
        bad_net = lambda p, x, t, c=None, **k: x[:, :2]  # noqa: E731
        O.epsilon_loss(P.VPLinear(), bad_net)(MLP, {"x": X0[:4]}, jax.random.PRNGKey(0))
