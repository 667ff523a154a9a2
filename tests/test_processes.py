"""Forward processes against their defining formulas, the SDE they claim, and each other."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax import processes as P
from diffusion_jax.sampling.grids import time_grid

ALL = sorted(P.PROCESSES)


def grid(p, n=33):
    return jnp.linspace(p.t_min, p.t_max, n)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_and_its_inverse(name):
    p = P.get_process(name)
    t = grid(p)
    a, s = np.asarray(p.alpha(t), np.float64), np.asarray(p.sigma(t), np.float64)
    np.testing.assert_allclose(p.log_snr(t), np.log(a * a / (s * s)), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(t)), t, rtol=1e-5, atol=2e-6 * p.t_max)
    assert np.all(np.diff(np.asarray(p.log_snr(t))) < 0), "log-SNR must decrease in t"
    assert np.all(np.diff(np.asarray(p.sigma(t) / p.alpha(t))) > 0)


@pytest.mark.parametrize("name", ALL)
def test_sde_reproduces_marginal(name):
    """The forward SDE's moment equations m' = f m, v' = 2 f v + g^2 have the solution
    m(t) = A(t) m0, v(t) = A(t)^2 [v0 + int g^2 / A^2], A(t) = exp(int_{t0}^t f). Integrated in float64
    from the process's own f and g, they land on alpha(t) and sigma(t)^2: f and g match the marginal."""
    p = P.get_process(name)
    s = np.linspace(p.t_min, p.t_max, 200_001)
    fg = jax.jit(lambda t: (p.f(t), p.g2(t)))(jnp.asarray(s, jnp.float32))
    f, g2 = (np.asarray(a, np.float64) for a in fg)
    log_a = integrate.cumulative_trapezoid(f, s, initial=0.0)
    a0, v0 = float(p.alpha(p.t_min)), float(p.sigma(p.t_min)) ** 2
    v = np.exp(2 * log_a) * (v0 + integrate.cumulative_trapezoid(g2 * np.exp(-2 * log_a), s, initial=0.0))
    idx = np.linspace(0, len(s) - 1, 9).astype(int)[1:]
    tt = jnp.asarray(s[idx], jnp.float32)
    np.testing.assert_allclose(a0 * np.exp(log_a[idx]), p.alpha(tt), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(v[idx], np.asarray(p.sigma(tt), np.float64) ** 2, rtol=2e-4)


@pytest.mark.parametrize("name", ALL)
def test_closed_form_derivatives_match_autodiff(name):
    p = P.get_process(name)
    t = grid(p)[1:-1]
    np.testing.assert_allclose(p.f(t), P.Process.f(p, t), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p.g2(t), P.Process.g2(p, t), rtol=1e-4, atol=1e-5)


def test_known_values():
    vp = P.VPLinear()
    np.testing.assert_allclose(vp.alpha(1.0), math.exp(-0.5 * (0.1 + 0.5 * 19.9)), rtol=1e-6)
    np.testing.assert_allclose(vp.g2(0.5), 0.1 + 0.5 * 19.9, rtol=1e-6)
    sub = P.SubVP()
    b = 0.1 * 0.3 + 0.5 * 19.9 * 0.09
    np.testing.assert_allclose(sub.sigma(0.3), 1 - math.exp(-b), rtol=1e-6)
    ve = P.VE(sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(0.5), 0.01 * (5000.0 ** 0.5), rtol=1e-6)
    assert ve.prior_std() == pytest.approx(50.0, rel=1e-6)
    edm = P.EDM()
    np.testing.assert_allclose(edm.sigma(jnp.array([0.002, 1.0, 80.0])), [0.002, 1.0, 80.0])


def test_discrete_ddpm_matches_alphas_cumprod():
    p = P.DiscreteDDPM()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    n = np.array([0, 1, 10, 499, 998, 999])
    t = jnp.asarray((n + 1) / 1000.0, jnp.float32)
    np.testing.assert_allclose(np.asarray(p.alpha(t), np.float64) ** 2, abar[n], rtol=2e-5)
    np.testing.assert_allclose(p.timestep_index(t), n, atol=1e-3)
    # Between grid points log alpha is linear in t.
    tm = jnp.float32(0.2505)
    la = 0.5 * np.log(abar)
    np.testing.assert_allclose(p.log_alpha(tm), 0.5 * (la[249] + la[250]), rtol=1e-5)


def test_cosine_matches_improved_ddpm():
    p = P.Cosine()
    s = 0.008
    t = np.array([0.01, 0.25, 0.5, 0.9])
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(np.asarray(p.alpha(jnp.asarray(t)), np.float64) ** 2, f(t) / f(0.0), rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_marginal_and_prior(name):
    p = P.get_process(name)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 2))
    t = jnp.asarray([p.t_min, 0.3 * p.t_max, 0.6 * p.t_max, p.t_max])
    mean, std = p.marginal_prob(x0, t)
    np.testing.assert_allclose(mean, p.alpha(t)[:, None, None] * x0, rtol=1e-6)
    np.testing.assert_allclose(std[:, 0, 0], p.sigma(t), rtol=1e-6)
    z = p.prior_sample(jax.random.PRNGKey(1), (4, 3, 2))
    ref = stats.norm(scale=p.prior_std()).logpdf(np.asarray(z, np.float64)).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(p.prior_logp(z), ref, rtol=1e-5)


def test_processes_are_hashable_and_jittable():
    p = P.get_process("vp")
    assert hash(p) == hash(P.VPLinear())
    f = jax.jit(lambda proc, t: proc.log_snr(t), static_argnums=0)
    np.testing.assert_allclose(f(p, jnp.float32(0.5)), p.log_snr(0.5))


def test_schedule_stays_float32_for_bfloat16_inputs():
    p = P.get_process("vp")
    assert p.alpha(jnp.asarray(0.5, jnp.bfloat16)).dtype == jnp.float32
    x0 = jnp.ones((2, 3), jnp.bfloat16)
    mean, std = p.marginal_prob(x0, jnp.asarray([0.1, 0.2], jnp.bfloat16))
    assert std.dtype == jnp.float32


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown process 'vpp'.*known processes"):
        P.get_process("vpp")
    with pytest.raises(ValueError, match="bad arguments for process 've'"):
        P.get_process("ve", beta_min=0.1)
    with pytest.raises(ValueError, match=r"outside the time range of VPLinear"):
        P.VPLinear().check_t(jnp.asarray([0.5, 1.5]))
    with pytest.raises(ValueError, match="outside the time range"):
        time_grid(P.EDM(), 10, t_start=100.0)
    with pytest.raises(ValueError, match="unknown time-step spacing 'cosine'"):
        time_grid(P.VPLinear(), 10, "cosine")
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        time_grid(P.VPLinear(), 0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "logsnr", "karras"])
def test_time_grids(name, spacing):
    p = P.get_process(name)
    ts = np.asarray(time_grid(p, 12, spacing))
    assert ts.shape == (13,)
    np.testing.assert_allclose([ts[0], ts[-1]], [p.t_max, p.t_min], rtol=1e-6)
    assert np.all(np.diff(ts) < 0)
    if spacing == "logsnr":
        lam = np.asarray(p.log_snr(jnp.asarray(ts)), np.float64)
        np.testing.assert_allclose(np.diff(lam), np.full(12, (lam[-1] - lam[0]) / 12), rtol=2e-3, atol=2e-4)


def test_karras_grid_on_edm_is_the_edm_formula():
    ts = np.asarray(time_grid(P.EDM(), 18, "karras"), np.float64)
    i = np.arange(19)
    ref = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(ts, ref, rtol=1e-5)


@pytest.mark.parametrize("name", ["vp", "ve", "cosine"])
def test_prediction_conversions_round_trip(name):
    p = P.get_process(name)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k1, (6, 5))
    eps = jax.random.normal(k2, (6, 5))
    t = jnp.linspace(p.t_min + 0.01 * p.t_max, 0.9 * p.t_max, 6)
    x = p.add_noise(x0, eps, t)
    np.testing.assert_allclose(P.x0_from_eps(p, x, t, eps), x0, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(P.eps_from_x0(p, x, t, x0), eps, rtol=1e-3, atol=2e-3)
    v = P.v_from_eps(p, x, t, eps)
    np.testing.assert_allclose(P.eps_from_v(p, x, t, v), eps, rtol=1e-4, atol=1e-4)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    np.testing.assert_allclose(v, a * eps - s * x0, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(P.eps_from_score(p, x, t, P.score_from_eps(p, x, t, eps)), eps, rtol=1e-5)


@pytest.mark.parametrize("kind", ["score", "x0", "v", "edm"])
def test_as_eps_fn_adapters_agree_with_exact_eps(kind):
    from diffusion_jax.reference import mixtures as M

    gm = M.random_mixture(seed=1, dim=3, num_components=2)
    p = P.VPLinear()
    x = jax.random.normal(jax.random.PRNGKey(3), (7, 3))
    t = jnp.linspace(0.05, 0.95, 7)
    ref = M.eps(gm, x, p, t)
    native = {
        "score": lambda x, t, c: M.score(gm, x, p, t),
        "x0": lambda x, t, c: M.x0_mean(gm, x, p, t),
        "v": lambda x, t, c: P.v_from_eps(p, x, t, M.eps(gm, x, p, t)),
        # EDM's D(x_hat, sigma_hat): x_hat = x/alpha has noise sigma_hat; recover t and evaluate.
        "edm": lambda xh, sh, c: M.x0_mean(gm, xh * p.alpha(p.t_from_edm_sigma(sh))[:, None], p,
                                           p.t_from_edm_sigma(sh)),
    }[kind]
    np.testing.assert_allclose(P.as_eps_fn(native, kind, p)(x, t, None), ref, rtol=2e-3, atol=2e-4)
    with pytest.raises(ValueError, match="unknown prediction type"):
        P.as_eps_fn(native, "noise", p)
