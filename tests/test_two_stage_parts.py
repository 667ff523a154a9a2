"""Building blocks of the two-stage models of issue 15 against closed forms: the Gaussian VAE posterior
(KL vs torch and Monte Carlo, LDM's first-stage loss, the latent scale factor), vector quantisation
(straight-through identity, commitment loss, EMA update by hand, usage / perplexity, dead-code
restarts), LSGM (mixed score, the likelihood-weighted cross entropy on a Gaussian latent) and DDGAN
(the official schedule, the posterior's mean / variance, an oracle-generator chain, GAN losses, R1).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import quantization as Q
from diffusion_jax.objectives import ddgan as G
from diffusion_jax.objectives import lsgm as L
from diffusion_jax.objectives.vae import DiagonalGaussian, first_stage_loss, latent_scale_factor
from diffusion_jax.processes.vp import VPLinear
from diffusion_jax.sampling.ddgan import ddgan_sample

Z_TOL = 4.5


def f64(a):
    return np.asarray(a, np.float64)


# ---------------------------------------------------------------------------------- Gaussian VAE
def _posteriors():
    r = np.random.default_rng(0)
    q = DiagonalGaussian.from_moments(r.normal(size=(3, 2, 2, 2)), r.normal(scale=0.7, size=(3, 2, 2, 2)))
    p = DiagonalGaussian.from_moments(r.normal(size=(3, 2, 2, 2)), r.normal(scale=0.7, size=(3, 2, 2, 2)))
    return q, p


def test_gaussian_kl_matches_torch_and_monte_carlo():
    torch = pytest.importorskip("torch")
    td = torch.distributions
    q, p = _posteriors()

    def tn(g):
        return td.Normal(torch.tensor(f64(g.mean)), torch.tensor(f64(np.exp(0.5 * f64(g.logvar)))))

    ref_pq = td.kl_divergence(tn(q), tn(p)).reshape(3, -1).sum(-1).numpy()
    std = td.Normal(torch.zeros(q.mean.shape, dtype=torch.float64), torch.ones(q.mean.shape, dtype=torch.float64))
    ref_q0 = td.kl_divergence(tn(q), std).reshape(3, -1).sum(-1).numpy()
    np.testing.assert_allclose(f64(q.kl_to(p)), ref_pq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(q.kl()), ref_q0, rtol=1e-5, atol=1e-5)

    # Monte Carlo: KL = E_q[log q(z) - log p(z)] = E_q[nll_p(z) - nll_q(z)], with its standard error.
    n = 20000

    @jax.jit
    def mc_terms(key):
        z = jax.vmap(q.sample)(jax.random.split(key, n))                                   # (n, 3, 2, 2, 2)
        std_normal = DiagonalGaussian(jnp.zeros_like(q.mean), jnp.zeros_like(q.mean))
        return z, jax.vmap(lambda zz: jnp.stack([p.nll(zz) - q.nll(zz),
                                                 std_normal.nll(zz) - q.nll(zz)]))(z)     # (n, 2, 3)

    z, nll = mc_terms(jax.random.PRNGKey(1))
    mc, se = f64(nll).mean(0), f64(nll).std(0) / math.sqrt(n)
    assert np.all(np.abs(mc[0] - ref_pq) < Z_TOL * se + 1e-3), (mc[0], ref_pq, se[0])
    assert np.all(np.abs(mc[1] - ref_q0) < Z_TOL * se + 1e-3), (mc[1], ref_q0, se[1])
    # the sample has the posterior's moments
    np.testing.assert_allclose(f64(z).mean(0), f64(q.mean), atol=5 * f64(q.std).max() / math.sqrt(n))
    np.testing.assert_allclose(f64(z).var(0), f64(q.var), rtol=0.06)
    with pytest.raises(ValueError, match="logvar"):
        DiagonalGaussian.from_moments(np.zeros((2, 3)), np.zeros((2, 4)))


def test_first_stage_loss_numbers():
    r = np.random.default_rng(1)
    x, xr = r.uniform(-1, 1, (2, 4, 4, 3)), r.uniform(-1, 1, (2, 4, 4, 3))
    mean, logvar = r.normal(size=(2, 2, 2, 4)), r.normal(scale=0.5, size=(2, 2, 2, 4))
    post = DiagonalGaussian.from_moments(mean, logvar)
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).reshape(2, -1).sum(-1)
    for kind, rec in (("l1", np.abs(x - xr)), ("l2", (x - xr) ** 2)):
        for lv in (0.0, 0.3):
            loss, aux = first_stage_loss(x, xr, post, kl_weight=1e-3, reconstruction=kind, logvar=lv)
            nll = (rec / math.exp(lv) + lv).reshape(2, -1).sum(-1).mean()
            np.testing.assert_allclose(float(loss), nll + 1e-3 * kl.mean(), rtol=1e-5)
            np.testing.assert_allclose(float(aux["kl"]), kl.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="reconstruction loss"):
        first_stage_loss(x, xr, post, reconstruction="lpips")
    with pytest.raises(ValueError, match="does not match"):
        first_stage_loss(x, xr[:, :2], post)


def test_latent_scale_factor_normalises_to_unit_variance():
    torch = pytest.importorskip("torch")
    z = 3.7 * np.random.default_rng(2).normal(size=(8, 4, 4, 4)) + 0.4
    s = float(latent_scale_factor(z))
    np.testing.assert_allclose(s, 1.0 / float(torch.tensor(z).flatten().std()), rtol=1e-5)
    np.testing.assert_allclose(np.std(s * z, ddof=1), 1.0, rtol=1e-5)
    assert abs(s - 1 / 3.7) < 0.02


# ------------------------------------------------------------------------------- quantisation
CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
Z = np.array([[0.1, -0.1], [0.9, 0.2], [1.2, -0.3], [0.2, 1.6], [-0.2, 0.1]], np.float32)
IDX = np.array([0, 1, 1, 2, 0])


def test_quantize_nearest_straight_through_and_losses():
    out = Q.quantize(Z, CODEBOOK, beta=0.25)
    d = ((Z[:, None] - CODEBOOK[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.indices), d.argmin(1))
    np.testing.assert_array_equal(np.asarray(out.indices), IDX)
    np.testing.assert_allclose(np.asarray(out.z_st), CODEBOOK[IDX], atol=1e-7)     # forward: the codes
    # straight-through: d z_st / d z is the identity (and nothing flows into the codebook)
    @jax.jit
    def derivatives(z, e):
        return (jax.jacobian(lambda z_: Q.quantize(z_, e).z_st)(z),
                jax.jacobian(lambda e_: Q.quantize(z, e_).z_st)(e),
                jax.grad(lambda z_: Q.quantize(z_, e, beta=0.25).commitment_loss)(z),
                jax.grad(lambda e_: Q.quantize(z, e_).codebook_loss)(e))

    jac, jc, gz, ge = derivatives(jnp.asarray(Z), jnp.asarray(CODEBOOK))
    np.testing.assert_allclose(np.asarray(jac).reshape(10, 10), np.eye(10), atol=0)
    assert float(jnp.max(jnp.abs(jc))) == 0.0
    # losses: codebook ||sg(z) - e||^2 and beta ||z - sg(e)||^2 (means), and their gradients
    mse = ((Z - CODEBOOK[IDX]) ** 2).mean()
    np.testing.assert_allclose(float(out.codebook_loss), mse, rtol=1e-6)
    np.testing.assert_allclose(float(out.commitment_loss), 0.25 * mse, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gz), 2 * 0.25 * (Z - CODEBOOK[IDX]) / Z.size, rtol=1e-5)
    ref = np.zeros_like(CODEBOOK)
    np.add.at(ref, IDX, 2 * (CODEBOOK[IDX] - Z) / Z.size)
    np.testing.assert_allclose(np.asarray(ge), ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="embedding_dim 2 does not match"):
        Q.quantize(np.zeros((4, 3)), CODEBOOK)
    with pytest.raises(ValueError, match="codebook must have shape"):
        Q.quantize(Z, CODEBOOK[0])
    with pytest.raises(ValueError, match="codebook size 3 does not match num_codes=8"):
        Q.check_codebook(CODEBOOK, num_codes=8)


def test_usage_and_perplexity():
    idx = np.array([0, 0, 1, 2])
    assert float(Q.code_usage(idx, 4)) == 0.75
    np.testing.assert_allclose(float(Q.perplexity(idx, 4)), math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))),
                               rtol=1e-6)
    np.testing.assert_allclose(float(Q.perplexity(np.arange(8), 8)), 8.0, rtol=1e-6)
    assert float(Q.perplexity(np.zeros(5, int), 8)) == pytest.approx(1.0)


def test_ema_update_equals_formula_by_hand():
    gamma, eps = 0.9, 1e-5
    N0 = np.array([2.0, 1.0, 0.5])
    m0 = np.array([[0.2, 0.1], [1.5, 0.0], [0.0, 0.8]])
    state = Q.VQEMAState(jnp.asarray(N0, jnp.float32), jnp.asarray(m0, jnp.float32),
                         jnp.asarray(CODEBOOK), jnp.zeros(3, jnp.int32))
    # one code unused in this batch: drop the z of code 2
    keep = IDX != 2
    new = Q.ema_update(state, Z[keep], IDX[keep], decay=gamma, eps=eps)
    # by hand
    n = np.array([2.0, 2.0, 0.0])
    s = np.array([Z[0] + Z[4], Z[1] + Z[2], [0.0, 0.0]], np.float64)
    N = gamma * N0 + (1 - gamma) * n
    m = gamma * m0 + (1 - gamma) * s
    Ns = (N + eps) / (N.sum() + 3 * eps) * N.sum()
    np.testing.assert_allclose(np.asarray(new.cluster_size), N, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.embed_sum), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.codebook), m / Ns[:, None], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(new.unused), [0, 0, 1])
    with pytest.raises(ValueError, match="decay"):
        Q.ema_update(state, Z, IDX, decay=1.0)


def test_dead_code_restart():
    z = jnp.asarray(Z)
    book = np.concatenate([CODEBOOK, [[50.0, 50.0], [-50.0, 40.0]]]).astype(np.float32)   # 2 far codes
    state = Q.init_ema_state(book)
    key = jax.random.PRNGKey(0)
    step = jax.jit(lambda st, k: Q.ema_step(st, z, k, decay=0.5, dead_after=3))
    for i in range(2):
        state, idx = step(state, jax.random.fold_in(key, i))
        np.testing.assert_array_equal(np.asarray(state.unused), [0, 0, 0, i + 1, i + 1])
        np.testing.assert_allclose(np.asarray(state.codebook[3:]), book[3:], rtol=1e-3)  # not yet dead
    state, _ = step(state, jax.random.fold_in(key, 2))
    restarted = np.asarray(state.codebook[3:])
    for row in restarted:                                    # each re-initialised to an encoder output
        assert np.min(np.abs(Z - row).sum(-1)) < 1e-6, row
    np.testing.assert_array_equal(np.asarray(state.unused), 0)
    np.testing.assert_allclose(np.asarray(state.cluster_size[3:]), 1.0)
    np.testing.assert_allclose(np.asarray(state.embed_sum[3:]), restarted)
    # the live codes followed the EMA formula only (the restart left them alone)
    ref = Q.init_ema_state(book)
    update = jax.jit(lambda st: Q.ema_update(st, z, IDX, decay=0.5))
    for i in range(3):
        ref = update(ref)
    np.testing.assert_allclose(np.asarray(state.codebook[:3]), np.asarray(ref.codebook[:3]), rtol=1e-6)


def test_vector_quantizer_layer():
    from diffusion_jax.networks.vq import VectorQuantizer
    z = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 3, 4)), jnp.float32)
    vq = VectorQuantizer(num_codes=8, dim=4, beta=0.5)
    var = jax.jit(vq.init)(jax.random.PRNGKey(0), z)
    (z_st, aux) = jax.jit(vq.apply)(var, z)
    ref = Q.quantize(z, var["params"]["codebook"], beta=0.5)
    np.testing.assert_allclose(np.asarray(z_st), np.asarray(ref.z_q), atol=1e-7)
    np.testing.assert_allclose(float(aux["loss"]), float(ref.codebook_loss + ref.commitment_loss), rtol=1e-6)
    ema = VectorQuantizer(num_codes=8, dim=4, ema_decay=0.9, dead_after=1)
    var = jax.jit(ema.init)(jax.random.PRNGKey(0), z)
    st = Q.VQEMAState(**var["vq_stats"])
    (_, aux), upd = ema.apply(var, z, train=True, mutable=["vq_stats"], rngs={"vq": jax.random.PRNGKey(1)})
    want, _ = Q.ema_step(st, z, jax.random.PRNGKey(1), decay=0.9, dead_after=1)
    for n in Q.VQEMAState._fields:
        np.testing.assert_allclose(np.asarray(upd["vq_stats"][n]), np.asarray(getattr(want, n)), rtol=1e-6)
    assert float(aux["loss"]) == pytest.approx(float(aux["commitment_loss"]))
    _, same = ema.apply(var, z, mutable=["vq_stats"])                   # eval call: no update
    np.testing.assert_array_equal(np.asarray(same["vq_stats"]["codebook"]), np.asarray(st.codebook))
    with pytest.raises(ValueError, match="embedding dim 4 does not match"):
        vq.init(jax.random.PRNGKey(0), jnp.zeros((2, 5)))


# -------------------------------------------------------------------------------------- LSGM
def test_mixed_score_parameterisation():
    proc = VPLinear()
    r = np.random.default_rng(3)
    z = jnp.asarray(r.normal(size=(4, 3)), jnp.float32)
    t = jnp.asarray([0.1, 0.3, 0.6, 0.9])
    sig = np.sqrt(-np.expm1(-f64(proc.int_beta(t))))
    logit = jnp.asarray([-2.0, 0.0, 1.5])
    a = 1 / (1 + np.exp(-f64(logit)))
    ep = r.normal(size=(4, 3))
    out = L.mixed_score_eps(jnp.asarray(ep, jnp.float32), z, t, logit, proc)
    # the paper's VP form: sigma_t (1 - a) z_t + a eps'
    np.testing.assert_allclose(f64(out), sig[:, None] * (1 - a) * f64(z) + a * ep, rtol=1e-5, atol=1e-6)
    # with eps' the Normal prior's own eps, the mixture is that eps for every a
    same = L.mixed_score_eps(L.normal_prior_eps(z, t, proc), z, t, logit, proc)
    np.testing.assert_allclose(f64(same), sig[:, None] * f64(z), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mixing_logit shape"):
        L.mixed_score_eps(jnp.asarray(ep, jnp.float32), z, t, jnp.zeros(5), proc)


def _gauss_ce(a, A, b, B):
    """CE(N(a, A) || N(b, B)) summed over dimensions."""
    return float(np.sum(0.5 * np.log(2 * np.pi * B) + (A + (a - b) ** 2) / (2 * B)))


@pytest.mark.parametrize("prior_mean,prior_var", [([0.1, 0.2, -0.3], [1.5, 0.7, 1.0]),
                                                  ([1.0, -0.5, 0.0], [0.4, 2.0, 0.9])])
def test_lsgm_cross_entropy_equals_closed_form(prior_mean, prior_var):
    """q(z0) = N(mu, s^2), prior N(m, v) with its exact diffused eps: the importance-sampled estimate
    of CE(q || p) has mean CE(q_eps || p_eps) - terminal gap (exactly), ~ CE(q0 || p0) at eps = 1e-5."""
    proc = VPLinear(t_min=1e-5)
    mu, s2 = np.array([0.5, -1.0, 0.2]), np.array([0.3, 0.8, 1.2]) ** 2
    m, v = np.array(prior_mean), np.array(prior_var)
    n = 1 << 19

    def eps_fn(z_t, t):
        a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
        return s * (z_t - a * m) / (a * a * v + s * s)

    @jax.jit
    def estimate(key):
        k0, k1 = jax.random.split(key)
        z0 = jnp.asarray(mu) + jnp.sqrt(jnp.asarray(s2)) * jax.random.normal(k0, (n, 3))
        return L.lsgm_cross_entropy(eps_fn, proc, z0.astype(jnp.float32), k1)[0]

    ce = f64(estimate(jax.random.PRNGKey(4)))
    mean, se = ce.mean(), ce.std() / math.sqrt(n)

    def marg(t):
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        return a * mu, a * a * s2 + s * s, a * m, a * a * v + s * s

    qe, Qe, pe, Pe = marg(proc.t_min)
    q1, Q1, p1, P1 = marg(proc.t_max)
    gap = _gauss_ce(q1, Q1, p1, P1) - 1.5 * math.log(2 * math.pi * math.e * float(proc.sigma(1.0)) ** 2)
    exact = _gauss_ce(qe, Qe, pe, Pe) - gap
    assert se < 0.06, se
    assert abs(mean - exact) < Z_TOL * se, (mean, exact, se)
    ce0 = _gauss_ce(mu, s2, m, v)                    # the target of the approximation
    assert abs(exact - ce0) < 2e-3, (exact, ce0)
    assert abs(mean - ce0) < Z_TOL * se + 2e-3, (mean, ce0, se)


def test_lsgm_prior_loss_holds_latents_fixed():
    proc = VPLinear()
    z0 = jnp.ones((4, 2))

    @jax.jit
    def grads(z):
        k = jax.random.PRNGKey(0)
        return [jax.grad(lambda z_: L.lsgm_prior_loss(lambda x, t: 0.5 * x, proc, z_, k, weighting=w)[0])(z)
                for w in ("likelihood", "eps")] + [
                jax.grad(lambda z_: jnp.mean(L.lsgm_cross_entropy(lambda x, t: 0.5 * x, proc, z_, k)[0]))(z)]

    g_like, g_eps, g_vae = grads(z0)
    assert float(jnp.max(jnp.abs(g_like))) == 0.0 and float(jnp.max(jnp.abs(g_eps))) == 0.0
    assert float(jnp.max(jnp.abs(g_vae))) > 0.0     # the VAE update reaches the encoder
    with pytest.raises(ValueError, match="prior weighting"):
        L.lsgm_prior_loss(lambda x, t: x, proc, z0, jax.random.PRNGKey(0), weighting="sigma2")


# ------------------------------------------------------------------------------------- DDGAN
@pytest.mark.parametrize("T", [2, 4, 8])
def test_ddgan_schedule_is_the_vp_sde_on_its_grid(T):
    """The official get_sigma_schedule: abar_k = (1 - 1e-8) alpha_VP(s_k)^2 / alpha_VP(s_0)^2 on
    s_k = 1e-3 + (1 - 1e-3) k / T (beta_min 0.1, beta_max 20)."""
    sch = G.DDGANSchedule(num_steps=T)
    vp = VPLinear(beta_min=0.1, beta_max=20.0)
    s = 1e-3 + (1 - 1e-3) * np.arange(T + 1) / T
    abar_vp = np.exp(-f64([vp.int_beta(x) for x in s]))
    np.testing.assert_allclose(f64(sch.table("a_cum")) ** 2, (1 - 1e-8) * abar_vp / abar_vp[0], rtol=1e-5)
    b = G.ddgan_betas(T)
    assert b[0] == 1e-8 and np.all((b[1:] > 0) & (b[1:] < 1))
    ab = np.exp(-(0.1 * s + 0.5 * 19.9 * s * s))      # float64, by hand
    np.testing.assert_allclose(b[1:], 1 - ab[1:] / ab[:-1], rtol=1e-12)


def test_ddgan_posterior_sample_has_posterior_moments():
    T = 4
    sch = G.DDGANSchedule(num_steps=T)
    b = G.ddgan_betas(T)[1:]
    abar = np.cumprod(1 - b)
    n = 200_000
    x0, x1 = 0.7, -0.4
    for t in range(T):
        # Bayes, independently: x_t | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) (abar_{-1} = 1),
        # x_{t+1} | x_t ~ N(sqrt(1 - b_{t+1}) x_t, b_{t+1})
        ab_prev = abar[t - 1] if t > 0 else 1.0
        a, beta = math.sqrt(1 - b[t]), b[t]
        if t == 0:
            m_ref, v_ref = x0, 0.0
        else:
            prec = 1 / (1 - ab_prev) + a * a / beta
            m_ref, v_ref = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + a * x1 / beta) / prec, 1 / prec
        mean, var = sch.posterior_mean_variance(jnp.full((1,), x0), jnp.full((1,), x1), jnp.asarray([t]))
        np.testing.assert_allclose(float(mean[0]), m_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(var[0]), v_ref, rtol=1e-5, atol=1e-7)
        xs = f64(sch.sample_posterior(jnp.full((n,), x0), jnp.full((n,), x1), jnp.full((n,), t),
                                      jax.random.PRNGKey(t)))
        assert abs(xs.mean() - m_ref) < Z_TOL * math.sqrt(v_ref / n) + 1e-6, (t, xs.mean(), m_ref)
        if t == 0:
            assert np.all(xs == xs[0])
        else:
            assert abs(xs.var() / v_ref - 1) < Z_TOL * math.sqrt(2 / n), (t, xs.var(), v_ref)
    with pytest.raises(ValueError, match=r"t must lie in 0\.\.3"):
        sch.posterior_mean_variance(jnp.zeros(1), jnp.zeros(1), jnp.asarray([4]))


def test_ddgan_pairs_and_oracle_generator_chain():
    """Pairs (x_t, x_{t+1}) have the chain's moments; a generator drawing x0 from the exact
    q(x0 | x_{t+1}) of Gaussian data N(mu, d^2) makes T = 4 posterior steps sample that data."""
    T, mu, d2, n = 4, 0.3, 0.25, 200_000
    sch = G.DDGANSchedule(num_steps=T)
    acum = f64(sch.table("a_cum"))
    t = jnp.full((n,), 2)
    xt, xtp1 = sch.q_sample_pairs(jnp.full((n,), 0.5), t, jax.random.PRNGKey(0))
    for x, k in ((xt, 2), (xtp1, 3)):
        x = f64(x)
        assert abs(x.mean() - acum[k] * 0.5) < Z_TOL * math.sqrt((1 - acum[k] ** 2) / n)
        assert abs(x.var() / (1 - acum[k] ** 2) - 1) < Z_TOL * math.sqrt(2 / n)

    def oracle(x, tt, z, cond):
        A = jnp.asarray(acum)[tt + 1][:, None]
        S2 = 1 - A * A
        prec = 1 / d2 + A * A / S2
        return (mu / d2 + A * x / S2) / prec + z / jnp.sqrt(prec)

    x_T = jax.random.normal(jax.random.PRNGKey(1), (n, 1))
    out = jax.jit(lambda k: ddgan_sample(oracle, sch, x_T, k, latent_dim=1))(jax.random.PRNGKey(2))
    x = f64(out.x)
    assert out.nfe == T and int(out.nonfinite_step) == -1
    # x_T ~ N(0, 1) is not exactly q(x_T) (abar_T ~ 4e-5): allow that tiny mismatch
    assert abs(x.mean() - mu) < Z_TOL * math.sqrt(d2 / n) + 1e-3, x.mean()
    assert abs(x.var() / d2 - 1) < Z_TOL * math.sqrt(2 / n) + 1e-3, x.var()


def test_gan_losses_and_r1_closed_form():
    dr, df = np.array([1.5, -0.3, 0.2]), np.array([-2.0, 0.4, 0.0])
    sp = lambda a: np.log1p(np.exp(a))                                     # noqa: E731
    np.testing.assert_allclose(float(G.discriminator_loss(dr, df)), sp(-dr).mean() + sp(df).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(G.generator_loss(df)), sp(-df).mean(), rtol=1e-6)
    r = np.random.default_rng(5)
    w, u = r.normal(size=(4, 4, 2)), r.normal(size=(4, 4, 2))
    x, xn = jnp.asarray(r.normal(size=(3, 4, 4, 2))), jnp.asarray(r.normal(size=(3, 4, 4, 2)))

    def lin(x_t, x_tp1, t):          # D(x_t, x_{t+1}, t) = <w, x_t> + <u, x_{t+1}> + c_t
        return jnp.sum(x_t * w, axis=(1, 2, 3)) + jnp.sum(x_tp1 * u, axis=(1, 2, 3)) + 0.1 * t

    t = jnp.asarray([0.0, 1.0, 2.0])
    np.testing.assert_allclose(float(G.r1_penalty(lin, x, xn, t, gamma=0.05)), 0.025 * np.sum(w ** 2), rtol=1e-5)
    A = r.normal(size=(32, 32))
    A = A @ A.T / 32

    def quad(x_t):                   # D = 1/2 x^T A x: grad A x
        f = x_t.reshape(x_t.shape[0], -1)
        return 0.5 * jnp.einsum("bi,ij,bj->b", f, A, f)

    ref = np.mean(np.sum((f64(x).reshape(3, -1) @ A) ** 2, axis=1))
    np.testing.assert_allclose(float(G.r1_penalty(quad, x, gamma=2.0)), ref, rtol=1e-4)

