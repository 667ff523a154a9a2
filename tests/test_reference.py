"""The closed-form reference module checked against independent computations (autodiff, scipy,
Tweedie, Monte Carlo), since every other test leans on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import processes as P
from diffusion_jax.reference import metrics, mixtures as M


@pytest.fixture(scope="module")
def gm():
    return M.random_mixture(seed=3, dim=3, num_components=3)


def test_log_prob_matches_scipy(gm):
    p = P.VE()
    x = np.random.default_rng(0).normal(size=(5, 3)) * 2
    for t in (None, 0.0, 0.2):
        if t is None:
            covs, means, got = gm.covs, gm.means, M.log_prob(gm, jnp.asarray(x, jnp.float32))
        else:
            a, s = float(p.alpha(t)), float(p.sigma(t))
            covs, means = a * a * np.asarray(gm.covs) + s * s * np.eye(3), a * np.asarray(gm.means)
            got = M.log_prob(gm, jnp.asarray(x, jnp.float32), p, jnp.full((5,), t))
        dens = sum(w * stats.multivariate_normal(m, c).pdf(x) for w, m, c in zip(np.asarray(gm.weights), means, covs))
        np.testing.assert_allclose(got, np.log(dens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vp", "edm", "cosine"])
def test_score_is_grad_log_prob_and_x0_is_tweedie(gm, name):
    p = P.get_process(name)
    x = 1.5 * jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    t = jnp.linspace(p.t_min * 5, p.t_max * 0.5, 6)
    grad = jax.vmap(jax.grad(lambda xi, ti: M.log_prob(gm, xi[None], p, ti[None])[0]))(x, t)
    sc = M.score(gm, x, p, t)
    np.testing.assert_allclose(sc, grad, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(grad))))
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    np.testing.assert_allclose(M.x0_mean(gm, x, p, t), (x + s * s * sc) / a, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(M.eps(gm, x, p, t), -s * sc, rtol=1e-5)


def test_marginal_matches_noised_samples(gm):
    p = P.VPLinear()
    t = 0.4
    x0, _ = M.sample(gm, jax.random.PRNGKey(1), 200_000)
    xt = p.add_noise(x0, jax.random.normal(jax.random.PRNGKey(2), x0.shape), jnp.full((x0.shape[0],), t))
    mt = M.marginal(gm, p, t)
    mean = jnp.sum(mt.weights[:, None] * mt.means, 0)
    cov = sum(w * (c + jnp.outer(m - mean, m - mean)) for w, m, c in zip(mt.weights, mt.means, mt.covs))
    np.testing.assert_allclose(jnp.mean(xt, 0), mean, atol=0.01)
    np.testing.assert_allclose(jnp.cov(xt.T), cov, atol=0.02)
    # Samples are drawn from the right components.
    x0s, comp = M.sample(gm, jax.random.PRNGKey(3), 20_000)
    np.testing.assert_allclose(np.bincount(np.asarray(comp), minlength=3) / 20_000, gm.weights, atol=0.015)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_gaussian_flow_solves_the_pf_ode(name):
    """dx/dt = f x + g^2/(2 sigma) eps along the closed-form flow, checked by central differences, and
    the flow pushes the marginal at s onto the marginal at t."""
    p = P.get_process(name)
    g1 = M.gaussian(np.array([0.5, -1.0]), np.array([[0.6, 0.2], [0.2, 0.3]]))
    s0 = p.t_max
    x_s = p.prior_std() * jax.random.normal(jax.random.PRNGKey(0), (4, 2))
    t = 0.3 * p.t_max
    h = 1e-3 * p.t_max
    fwd = M.gaussian_flow(g1, p, x_s, s0, t + h)
    bwd = M.gaussian_flow(g1, p, x_s, s0, t - h)
    x_t = M.gaussian_flow(g1, p, x_s, s0, t)
    vel = (fwd - bwd) / (2 * h)
    tt = jnp.full((4,), t)
    rhs = p.f(tt)[:, None] * x_t + p.g2(tt)[:, None] / (2 * p.sigma(tt)[:, None]) * M.eps(g1, x_t, p, tt)
    np.testing.assert_allclose(vel, rhs, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(rhs))))
    # Pushforward of p_s samples is p_t.
    xs, _ = M.sample(M.marginal(g1, p, 0.8 * p.t_max), jax.random.PRNGKey(5), 100_000)
    xt = M.gaussian_flow(g1, p, xs, 0.8 * p.t_max, t)
    mt = M.marginal(g1, p, t)
    # Whitened by the true p_t, the pushed-forward samples are standard normal.
    lt = np.linalg.cholesky(np.asarray(mt.covs[0], np.float64))
    w = np.linalg.solve(lt, (np.asarray(xt, np.float64) - np.asarray(mt.means[0])).T)
    np.testing.assert_allclose(np.cov(w), np.eye(2), atol=0.02)
    np.testing.assert_allclose(w.mean(1), 0.0, atol=0.02)


def test_metrics_distinguish_distributions():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (4000, 4))
    y = jax.random.normal(k[1], (4000, 4))
    z = y + jnp.array([0.5, 0, 0, 0])
    same, shifted = metrics.sliced_wasserstein(x, y, k[2]), metrics.sliced_wasserstein(x, z, k[2])
    assert same < 0.05 < shifted
    # For a shift by d along e1 the sliced W2 is |d| sqrt(E theta_1^2) = |d| / sqrt(D).
    np.testing.assert_allclose(shifted, 0.5 / 2.0, rtol=0.15)
    assert abs(metrics.energy_distance(x, y)) < 0.01 < metrics.energy_distance(x, z)
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.sliced_wasserstein(x, y[:10], k[2])


def test_mixture_fit_recovers_truth(gm):
    x, _ = M.sample(gm, jax.random.PRNGKey(7), 50_000)
    fit = metrics.mixture_fit(gm, x)
    assert fit["weight_error"] < 0.01 and fit["mean_error"] < 0.03 and fit["cov_error"] < 0.05


def test_bad_mixtures_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        M.make_mixture([0.5, 0.6], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)))
    with pytest.raises(ValueError, match="positive definite"):
        M.make_mixture([1.0], np.zeros((1, 2)), -np.eye(2)[None])
    with pytest.raises(ValueError, match="shapes must be"):
        M.make_mixture([1.0], np.zeros((1, 2)), np.eye(3)[None])
    with pytest.raises(ValueError, match="single Gaussian"):
        M.gaussian_flow(M.ring_mixture(), P.VPLinear(), jnp.zeros((1, 2)), 1.0, 0.5)
