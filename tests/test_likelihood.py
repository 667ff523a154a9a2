"""Probability-flow ODE likelihoods and bits/dim against the closed forms of Gaussian mixtures.

Every log-density is checked against `mixtures.log_prob` (exact for any process and t); the divergence
and the flow map against their single-Gaussian closed forms:

    p_t = N(alpha mu, C(t)),  C = alpha^2 S + sigma^2 I,  v = f x + g^2/2 C^{-1} (x - alpha mu),
    div v = D f + g^2/2 tr C^{-1} = D f + g^2/2 sum_k 1 / (alpha^2 e_k + sigma^2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes as P
from diffusion_jax.likelihood import (
    bits_per_dim, dequantize, draw_probes, exact_divergence, hutchinson_divergence, image_bpd,
    pf_ode_log_likelihood, pf_ode_velocity,
)
from diffusion_jax.likelihood.bpd import as_levels
from diffusion_jax.reference import mixtures

GAUSS = mixtures.gaussian([0.5, -1.0, 0.3], [[0.30, 0.10, 0.0], [0.10, 0.20, 0.05], [0.0, 0.05, 0.40]])


def exact_prior(gm, process):
    return lambda z: mixtures.log_prob(gm, z.reshape(z.shape[0], -1), process, process.t_max)


# --- the vector field and its divergence (no ODE) ------------------------------------------------
def test_velocity_and_divergence_match_gaussian_closed_form():
    """For every process, at 7 times: v and its exact divergence equal the closed forms, and the mean of
    4096 Gaussian-probe Hutchinson estimates lies within 4 standard errors of the exact divergence."""
    x = 1.5 * np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    procs = [P.get_process(name) for name in sorted(P.PROCESSES)]
    times = [np.linspace(p.t_min, p.t_max, 7).astype(np.float32) for p in procs]
    probes = draw_probes(jax.random.PRNGKey(1), x.shape, 4096, "gaussian")

    def fields(proc, t):
        vel = lambda y: pf_ode_velocity(mixtures.eps_fn(GAUSS, proc), proc, y, t)  # noqa: E731
        v, div = exact_divergence(vel, x)
        _, div_h = hutchinson_divergence(vel, x, probes)
        coefs = jnp.stack([proc.alpha(t), proc.sigma(t), proc.f(t), proc.g2(t)])
        return v, div, jnp.mean(div_h, 0), jnp.std(div_h, 0) / 64.0, coefs

    results = jax.jit(lambda times: [jax.vmap(lambda t, p=p: fields(p, t))(ts) for p, ts in zip(procs, times)])(times)
    mu, e, u = (np.asarray(a, np.float64) for a in (GAUSS.means[0], GAUSS.evals[0], GAUSS.evecs[0]))
    xd = np.asarray(x, np.float64)
    for proc, res in zip(procs, results):
        for i in range(7):
            v, div, div_h, se, coefs = (np.asarray(r[i], np.float64) for r in res)
            a, s, f, g2 = coefs
            lam = a * a * e + s * s
            v_ref = f * xd + 0.5 * g2 * ((xd - a * mu) @ u / lam) @ u.T
            div_ref = 3 * f + 0.5 * g2 * np.sum(1.0 / lam)
            scale = abs(f) + g2 / lam.min()
            msg = f"{proc.name} at step {i}"
            np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-5 * scale, err_msg=msg)
            np.testing.assert_allclose(div, np.full(5, div_ref), rtol=1e-4, atol=1e-5 * scale, err_msg=msg)
            assert np.all(np.abs(div_h - div_ref) <= 4 * se + 1e-4 * scale), msg


# --- a single Gaussian: the flow map and the integral are closed forms ----------------------------
def _count_calls(eps_fn):
    calls = [0]

    def counted(x, t, cond=None):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return eps_fn(x, t, cond)

    return counted, calls


@pytest.mark.parametrize("name,time_variable", [("ddpm", "log_snr"), ("edm", "t")])
def test_gaussian_flow_map_and_log_likelihood(name, time_variable):
    """z = x_T equals the exact PF-ODE flow map; log p_0(x) equals the exact log-density; nfe counts the
    denoiser calls exactly. The discrete DDPM schedule (f jumps at every knot) is smooth in log-SNR."""
    proc = P.get_process(name)
    eps_fn, calls = _count_calls(mixtures.eps_fn(GAUSS, proc))

    @jax.jit
    def run(key):
        x, _ = mixtures.sample(GAUSS, key, 16)
        out = pf_ode_log_likelihood(eps_fn, proc, x, divergence="exact", time_variable=time_variable,
                                    prior_logp=exact_prior(GAUSS, proc))
        z_ref = mixtures.gaussian_flow(GAUSS, proc, x, proc.t_min, proc.t_max)
        logp_ref = mixtures.log_prob(GAUSS, x, proc, proc.t_min)
        return out, z_ref, logp_ref, logp_ref - mixtures.log_prob(GAUSS, z_ref, proc, proc.t_max)

    out, z_ref, logp_ref, delta_ref = run(jax.random.PRNGKey(2))
    jax.block_until_ready(out)
    jax.effects_barrier()
    np.testing.assert_allclose(out.z, z_ref, atol=2e-4 * proc.prior_std())
    assert np.max(np.abs(np.asarray(out.logp) - np.asarray(logp_ref))) / 3 < 2e-4
    # delta alone against the exact difference of log-densities at the ends of the exact flow
    np.testing.assert_allclose(out.delta_logp, delta_ref, atol=2e-3)
    assert int(out.nfe) == calls[0], (int(out.nfe), calls[0])
    assert np.all(np.asarray(out.logp_stderr) == 0.0)


# --- mixtures: exact divergence ------------------------------------------------------------------
CASES = {
    "ring-vp": (lambda: mixtures.ring_mixture(), "vp"),
    "random6-ve": (lambda: mixtures.random_mixture(seed=1, dim=6, num_components=4), "ve"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixture_log_likelihood_exact_divergence(case):
    make, name = CASES[case]
    gm, proc = make(), P.get_process(name)

    @jax.jit
    def run(key):
        x, _ = mixtures.sample(gm, key, 32)
        out = pf_ode_log_likelihood(mixtures.eps_fn(gm, proc), proc, x, divergence="exact",
                                    prior_logp=exact_prior(gm, proc))
        return out, mixtures.log_prob(gm, x, proc, proc.t_min), proc.prior_logp(out.z)

    out, ref, prior_default = run(jax.random.PRNGKey(3))
    ref = np.asarray(ref, np.float64)
    err = np.abs(np.asarray(out.logp, np.float64) - ref) / gm.dim
    assert err.max() < 2e-3, f"exact prior: max error {err.max():.2e} nats/dim"
    # The default prior N(0, prior_std^2 I) instead of the exact p_T (same solve, only log p_T(z) changes)
    # scatters each example by about alpha_T z.mu / s^2 (VP) or z.mu / sigma_max^2 (VE), up to ~1e-2
    # nats/dim here, but its mean is -KL(p_T || prior) / D, about 1e-5 nats/dim.
    err_default = (np.asarray(prior_default, np.float64) + np.asarray(out.delta_logp, np.float64) - ref) / gm.dim
    assert np.abs(err_default).max() < 3e-2, f"default prior: max error {np.abs(err_default).max():.2e} nats/dim"
    assert abs(err_default.mean()) < 1e-3, f"default prior: mean error {err_default.mean():.2e} nats/dim"


# --- mixtures: Hutchinson -------------------------------------------------------------------------
def test_hutchinson_estimates_are_unbiased():
    """64 Rademacher probe sets along one trajectory: each example's mean lands within a few standard
    errors of the exact log-density, the batch-mean error within 3 standard errors of zero."""
    gm, proc = mixtures.random_mixture(seed=3, dim=6, num_components=4), P.get_process("vp")

    @jax.jit
    def run(key):
        kx, kp = jax.random.split(key)
        x, _ = mixtures.sample(gm, kx, 32)
        out = pf_ode_log_likelihood(mixtures.eps_fn(gm, proc), proc, x, key=kp, num_probes=64,
                                    prior_logp=exact_prior(gm, proc))
        return out, mixtures.log_prob(gm, x, proc, proc.t_min)

    out, ref = run(jax.random.PRNGKey(4))
    logp, ref, probes = (np.asarray(a, np.float64) for a in (out.logp, ref, out.delta_logp_probes))
    assert probes.shape == (64, 32)
    np.testing.assert_allclose(logp, np.asarray(out.prior_logp) + probes.mean(0), rtol=1e-6, atol=1e-4)
    se = np.asarray(out.logp_stderr, np.float64)
    np.testing.assert_allclose(se, probes.std(0, ddof=1) / 8.0, rtol=1e-3)
    assert np.all(se > 0.01)  # per-probe estimates really scatter: the check has teeth
    zscore = (logp - ref) / se
    assert np.max(np.abs(zscore)) < 4.5, zscore
    assert 0.5 < np.sqrt(np.mean(zscore ** 2)) < 1.6, zscore  # the standard errors are honest
    batch_err, batch_se = np.mean(logp - ref), np.sqrt(np.sum(se ** 2)) / se.size
    assert abs(batch_err) < 3 * batch_se, (batch_err, batch_se)


def test_fixed_step_rk4_counts_and_converges():
    gm, proc = mixtures.ring_mixture(), P.get_process("vp")
    eps_fn, calls = _count_calls(mixtures.eps_fn(gm, proc))

    @jax.jit
    def run(key):
        x, _ = mixtures.sample(gm, key, 16)
        out = pf_ode_log_likelihood(eps_fn, proc, x, divergence="exact", solver="rk4", num_steps=60,
                                    prior_logp=exact_prior(gm, proc))
        return out, mixtures.log_prob(gm, x, proc, proc.t_min)

    out, ref = run(jax.random.PRNGKey(6))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert out.nfe == 240 and calls[0] == 240
    err = np.max(np.abs(np.asarray(out.logp) - np.asarray(ref))) / 2
    assert err < 2e-3, err


def test_input_validation():
    proc = P.get_process("vp")
    eps_fn = mixtures.eps_fn(GAUSS, proc)
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="key"):
        pf_ode_log_likelihood(eps_fn, proc, x)
    with pytest.raises(ValueError, match="divergence"):
        pf_ode_log_likelihood(eps_fn, proc, x, divergence="trace")
    with pytest.raises(ValueError, match="time range"):
        pf_ode_log_likelihood(eps_fn, proc, x, divergence="exact", t_max=2.0)
    # a bfloat16 denoiser: the state and the outputs stay float32
    bf16 = lambda x, t, c=None: eps_fn(x, t, c).astype(jnp.bfloat16)  # noqa: E731
    out = jax.eval_shape(lambda x, k: pf_ode_log_likelihood(bf16, proc, x, key=k, num_probes=2), x, jax.random.key(0))
    assert out.z.dtype == out.logp.dtype == out.delta_logp_probes.dtype == jnp.float32
    assert out.delta_logp_probes.shape == (2, 2) and out.z.shape == (2, 3)


# --- bits per dim ---------------------------------------------------------------------------------
def test_bits_per_dim_offset_by_hand():
    # Uniform density on [-1, 1]^D: p_y = 2^-D, so every 8-bit image has probability exactly 256^-D: 8 bits.
    for d in (1, 3, 12):
        np.testing.assert_allclose(bits_per_dim(-d * math.log(2.0), d), 8.0, rtol=1e-6)
    # One pixel, log p_y = 0 (density 1 at y): P(k) ~ 1 * (2/256) -> -log2(2/256) = 7 bits.
    np.testing.assert_allclose(bits_per_dim(0.0, 1), 7.0, rtol=1e-6)
    # D = 2, log p_y = -3 nats: (3 + 2 log 128) / (2 ln 2) = 3 / (2 ln 2) + 7.
    np.testing.assert_allclose(bits_per_dim(-3.0, 2), 3.0 / (2 * math.log(2)) + 7.0, rtol=1e-6)


def test_dequantize_maps_levels_to_their_cells():
    k = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    y, levels = jax.jit(lambda key, k, kf: (dequantize(key, k), as_levels(kf)))(
        jax.random.PRNGKey(0), k, k.astype(np.float32) / 127.5 - 1.0)
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.min() >= -1.0 and y.max() < 1.0
    np.testing.assert_array_equal(np.floor((y.astype(np.float64) + 1.0) * 128.0), k.astype(np.float64))
    # the data pipeline's floats x = k / 127.5 - 1 are read back as levels
    np.testing.assert_array_equal(levels, k.astype(np.float32))


def test_image_bpd_matches_closed_form():
    """A Gaussian density on 2x2x3 images: image_bpd equals -(log p_y(y) + D log(2/256)) / (D ln 2) for the
    same dequantised y (repeat r: fold_in(key, r) split into dequantisation and probe keys)."""
    d = 12
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    gm = mixtures.gaussian(0.1 * rng.standard_normal(d), q @ np.diag(rng.uniform(0.05, 0.4, d)) @ q.T)
    proc = P.get_process("vp")
    images = rng.integers(0, 256, (4, 2, 2, 3)).astype(np.uint8)

    @jax.jit
    def run(key):
        out = image_bpd(mixtures.eps_fn(gm, proc), proc, images, key, num_repeats=2, divergence="exact",
                        prior_logp=exact_prior(gm, proc))
        refs = []
        for r in range(2):
            kq, _ = jax.random.split(jax.random.fold_in(key, r))
            refs.append(mixtures.log_prob(gm, dequantize(kq, images).reshape(4, d), proc, proc.t_min))
        return out, jnp.stack(refs)

    out, logp_ref = run(jax.random.PRNGKey(7))
    assert out.bpd_repeats.shape == (2, 4)
    for r in range(2):
        logp = np.asarray(logp_ref[r], np.float64)
        bpd_ref = -(logp + d * math.log(2 / 256)) / (d * math.log(2))
        np.testing.assert_allclose(out.bpd_repeats[r], bpd_ref, atol=3e-4)
        np.testing.assert_allclose(out.bpd_repeats[r], -logp / (d * math.log(2)) + 7.0, atol=3e-4)
    np.testing.assert_allclose(out.bpd, jnp.mean(out.bpd_repeats, 0), rtol=1e-6)
