"""The 'lsgm' model family (LSGM, Vahdat et al. 2021) on 8x8x1 images with a tiny VAE (4x4x1 latents)
and UNet prior: the VAE phase's cross entropy through the family's mixed eps equals the closed form
when the prior is exactly N(0, I); the mixed eps of a zero network is (1 - a) times the N(0, I) prior's
eps (exactly that eps as a -> 0); each phase of one train step moves only its own parameter group;
the NLL bound's terms; bad configs refused naming the field; a tiny command-line run writes the
checkpoint, samples, first-stage reconstructions and the report."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusion_jax import config as cv
from diffusion_jax import models as M
from diffusion_jax import training as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 8
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def tiny_config(**lsgm):
    c = cv.base_config("unet", "vp", "eps")
    c.model.family = "lsgm"
    c.data.image_size = S
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1,), 1, (), 0.0
    ls = c.lsgm
    ls.vae_channels, ls.vae_norm_groups, ls.latent_channels = (8, 8), 4, 1
    for k, v in lsgm.items():
        setattr(ls, k, v)
    c.train.num_steps = 10
    c.sample.sampler, c.sample.num_steps, c.sample.batch_size = "ddim", 2, 2
    c.report.probe = False
    return cv.validate(c)


@pytest.fixture(scope="module")
def built():
    fam = M.family_for(tiny_config())
    model = fam.build((S, S, 1))
    variables = nn.unbox(jax.jit(model.init_variables, **FAST)(jax.random.PRNGKey(0)))
    return fam, model, variables


def _images(n, seed=0):
    return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (n, S, S, 1)), jnp.float32)


def _normal_prior(params, logit=-30.0):
    """params whose prior is N(0, I) up to sigmoid(-30) ~ 1e-13: mixing logit -30."""
    return {**params, "prior": {**params["prior"],
                                "mixing_logit": jnp.full_like(params["prior"]["mixing_logit"], logit)}}


def test_vae_phase_cross_entropy_with_a_normal_prior_equals_its_closed_form(built):
    """The 'vae' phase's CE(q(z|x) || p) through the family's mixed eps (logit -30: the prior's eps is
    the N(0, I) prior's) against the closed form CE(q_eps || N(0, I)), q_eps = N(alpha mu, alpha^2 s^2 +
    sigma^2) at eps = t_min (the terminal gap at t_max = 1 is included, ~1e-5 nats), over 4 096
    replicas of one image (the estimator's sd is ~80 nats: se ~1.3); with the same keys it is
    `lsgm_cross_entropy` of the posterior sample and the exact N(0, I) eps; and the phase's metrics are
    the means of `vae_terms`."""
    from diffusion_jax.objectives.lsgm import lsgm_cross_entropy, normal_prior_eps
    fam, model, variables = built
    params = _normal_prior(variables["params"])
    x = _images(1)
    reps = 4096
    xb = jnp.repeat(x, reps, axis=0)
    key = jax.random.PRNGKey(7)
    terms = jax.jit(lambda p, xx, k: fam.vae_terms(model, p, xx, k), **FAST)(params, xb, key)
    ce = np.asarray(terms["ce"], np.float64)

    mean, logvar = model.module.apply({"params": params}, x, method="encode")
    mu, v = np.asarray(mean, np.float64).reshape(1, -1), np.exp(np.asarray(logvar, np.float64)).reshape(1, -1)
    proc = model.process

    def ce_normal(t):                                  # CE(q_t || N(0, I))
        a2 = math.exp(-float(proc.int_beta(t)))
        return float(0.5 * np.sum(np.log(2 * np.pi) + a2 * mu ** 2 + a2 * v + (1 - a2))), a2

    exact, _ = ce_normal(proc.t_min)
    ce_T, a2_T = ce_normal(proc.t_max)
    exact -= ce_T - 0.5 * mu.shape[1] * np.log(2 * np.pi * np.e * (1 - a2_T))
    se = ce.std() / math.sqrt(reps)
    assert se < 1.6, se
    assert abs(ce.mean() - exact) < 4.5 * se, (ce.mean(), exact, se)

    # same keys: the estimate of the posterior sample under the exact N(0, I) eps
    k_z, k_ce, _ = jax.random.split(key, 3)
    mean64 = jnp.repeat(mean, 64, axis=0)
    z = mean64 + jnp.exp(0.5 * jnp.repeat(logvar, 64, axis=0)) * jax.random.normal(k_z, mean64.shape)
    ref, _ = lsgm_cross_entropy(lambda z_, t: normal_prior_eps(z_, t, proc), proc, z, k_ce)
    t64 = jax.jit(lambda p, xx, k: fam.vae_terms(model, p, xx, k), **FAST)(params, xb[:64], key)
    np.testing.assert_allclose(np.asarray(t64["ce"]), np.asarray(ref), rtol=1e-4, atol=1e-3)

    # the closed-form entropy, and kl = -H + CE
    ent = 0.5 * np.sum(1 + np.log(2 * np.pi) + np.log(v), axis=1)
    np.testing.assert_allclose(np.asarray(terms["neg_entropy"])[:1], -ent, rtol=1e-4)
    np.testing.assert_allclose(terms["kl"], terms["neg_entropy"] + terms["ce"], rtol=1e-5, atol=1e-3)

    # the 'vae' phase reports the means of exactly these terms (same key); warm-up: the closed form
    phase = model.loss_fn.phases[0]
    ms = {"step": jnp.asarray(5, jnp.int32)}
    _, aux = jax.jit(phase.loss_fn, **FAST)(params, {"x": xb[:64]}, key, ms)
    for k in ("ce", "rec_nll", "neg_entropy"):
        assert float(aux[k]) == pytest.approx(float(jnp.mean(t64[k])), rel=1e-3, abs=1e-2)
    assert float(aux["nelbo"]) == pytest.approx(float(jnp.mean(t64["rec_nll"] + t64["kl"])), rel=1e-3)
    assert int(aux["model_state"]["step"]) == 5           # the prior phase counts the steps


def test_warm_up_uses_the_closed_form_normal_prior(built):
    fam, model, variables = built
    params = variables["params"]
    x = _images(4, seed=1)
    warm = M.family_for(tiny_config(warmup_vae_steps=3))
    loss_fn = warm.objective(model.process, model.apply_fn, model.module)[0]
    key = jax.random.PRNGKey(3)
    mean, logvar = model.module.apply({"params": params}, x, method="encode")
    ce0 = 0.5 * jnp.sum((jnp.log(2 * jnp.pi) + mean ** 2 + jnp.exp(logvar)).reshape(4, -1), axis=1)
    vae, prior = (jax.jit(ph.loss_fn, **FAST) for ph in loss_fn.phases)
    _, aux = vae(params, {"x": x}, key, {"step": jnp.asarray(2, jnp.int32)})
    assert float(aux["ce"]) == pytest.approx(float(jnp.mean(ce0)), rel=1e-5)
    loss, aux = prior(params, {"x": x}, key, {"step": jnp.asarray(2, jnp.int32)})
    assert float(loss) == 0.0 and int(aux["model_state"]["step"]) == 3
    loss, _ = prior(params, {"x": x}, key, {"step": jnp.asarray(3, jnp.int32)})
    assert float(loss) > 0.0


def test_mixed_eps_of_a_zero_network_is_the_normal_prior_eps(built):
    """eps' = 0: eps_theta = (1 - sigmoid(l)) sigma_t z_t (VP: alpha^2 + sigma^2 = 1), i.e. the N(0, I)
    prior's eps sigma_t z_t (score -z_t) as l -> -inf; from the family's eps_fn on latents."""
    fam, model, variables = built
    params = variables["params"]
    zero = {**params, "prior": {**params["prior"],
                                "denoiser": jax.tree_util.tree_map(jnp.zeros_like, params["prior"]["denoiser"])}}
    eps_fn = jax.jit(fam.make_eps_fn(model))
    z = jnp.asarray(np.random.RandomState(2).normal(size=(3, 4, 4, 1)), jnp.float32)
    t = jnp.asarray([0.05, 0.4, 0.9], jnp.float32)
    sig = np.sqrt(-np.expm1(-np.asarray(model.process.int_beta(t), np.float64)))[:, None, None, None]
    for logit in (-3.0, 0.7):
        p = _normal_prior(zero, logit)
        out = np.asarray(eps_fn(z, t, {"params": p}), np.float64)
        a = 1 / (1 + math.exp(-logit))
        np.testing.assert_allclose(out, (1 - a) * sig * np.asarray(z), rtol=1e-5, atol=1e-6)
    out = np.asarray(eps_fn(z, t, {"params": _normal_prior(zero)}), np.float64)
    np.testing.assert_allclose(out, sig * np.asarray(z), rtol=1e-5, atol=1e-6)
    # at initialisation the UNet's output layer is zero: the same prior
    init = np.asarray(eps_fn(z, t, {"params": params}), np.float64)
    a = 1 / (1 + math.exp(-float(tiny_config().lsgm.mixing_logit_init)))
    np.testing.assert_allclose(init, (1 - a) * sig * np.asarray(z), rtol=1e-5, atol=1e-6)


def _max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_each_phase_updates_only_its_group(built):
    """One train step with the 'vae' phase alone leaves params['prior'] bit-identical (and moves the
    VAE); the 'prior' phase alone leaves params['vae'] identical (the full step: the CLI test)."""
    fam, model, variables = built
    groups = fam.optimizer_groups(T.OptimizerConfig(learning_rate=1e-3))
    assert groups["vae"].eps == pytest.approx(1e-3) and groups["prior"].eps == pytest.approx(1e-4)
    tx, schedule = T.make_group_optimizer(groups)
    init = T.make_init_fn(model.init_params, tx,
                          init_model_state_fn=lambda k: model.init_model_state(variables))
    state = jax.jit(init, **FAST)(jax.random.PRNGKey(0))
    state = nn.unbox(state)
    batch = {"x": _images(4, seed=3)}
    vae_phase, prior_phase = model.loss_fn.phases
    out = {}
    for name, loss in (("vae", T.PhasedLoss((vae_phase,))), ("prior", T.PhasedLoss((prior_phase,)))):
        step = jax.jit(T.make_train_step(loss, tx, schedule), **FAST)
        out[name] = step(state, batch, jax.random.PRNGKey(1))[0]
    p0 = state.params
    assert _max_abs_diff(out["vae"].params["prior"], p0["prior"]) == 0.0
    assert _max_abs_diff(out["vae"].params["vae"], p0["vae"]) > 0.0
    assert _max_abs_diff(out["prior"].params["vae"], p0["vae"]) == 0.0
    assert _max_abs_diff(out["prior"].params["prior"], p0["prior"]) > 0.0
    assert int(out["prior"].model_state["step"]) == 1 and int(out["vae"].model_state["step"]) == 0


def test_nll_bound_terms(built):
    """With the N(0, I) prior the PF-ODE is the identity on VP (v = -beta z/2 + beta z/2 = 0): the
    prior term is -log N(z; 0, I) of the posterior sample; the bound is rec + log q + that, in bits."""
    fam, model, variables = built
    params = _normal_prior(variables["params"])
    x = _images(3, seed=4)
    key = jax.random.PRNGKey(5)
    r = fam.nll_bound(model, params, x, key, solver="heun", num_steps=2)
    mean, logvar = model.module.apply({"params": params}, x, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.split(key)[0], mean.shape)
    zz = np.asarray(z, np.float64).reshape(3, -1)
    np.testing.assert_allclose(r["prior_nll"], 0.5 * np.sum(zz ** 2 + np.log(2 * np.pi), axis=1), rtol=1e-4)
    rec, _ = fam.reconstruction_nll(model, params, x, z)
    np.testing.assert_allclose(r["rec_nll"], np.asarray(rec), rtol=1e-3)   # jit vs eager
    np.testing.assert_allclose(r["bpd"], (r["rec_nll"] + r["log_q"] + r["prior_nll"]) / (S * S * math.log(2)),
                               rtol=1e-5)
    assert r["t_min"] == model.process.t_min


@pytest.mark.parametrize("override, named", [
    (dict(image_size=9), r"images of 9x9 do not fit.*config\.lsgm\.vae_channels.*\(config\.data\.image_size\) must be a multiple of 2"),
    (dict(ch_mult=(1, 2, 2, 2)), r"latents \(4x4, config\.lsgm\.vae_channels\).*config\.model\.ch_mult"),
    (dict(objective="v"), r"config\.objective\.name"),
    (dict(warmup_vae_steps=10), r"config\.lsgm\.warmup_vae_steps=10"),
    (dict(norm_groups=3), r"lsgm\.vae_norm_groups=3"),
])
def test_bad_configs_are_refused_naming_the_field(override, named):
    c = tiny_config()
    c.unlock()
    if "image_size" in override:
        c.data.image_size = override["image_size"]
    if "ch_mult" in override:
        c.model.ch_mult = override["ch_mult"]
    if "objective" in override:
        c.objective.name = override["objective"]
    if "warmup_vae_steps" in override:
        c.lsgm.warmup_vae_steps = override["warmup_vae_steps"]
    if "norm_groups" in override:
        c.lsgm.vae_norm_groups = override["norm_groups"]
    with pytest.raises(cv.ConfigError, match=named):
        M.family_for(c)


def test_decoder_refuses_latents_of_the_wrong_shape(built):
    fam, model, variables = built
    with pytest.raises(ValueError, match=r"decode needs \(B, h, w, 1\)"):
        fam.decode_latents(model, variables["params"], np.zeros((2, 4, 4, 3), np.float32))


def test_lsgm_digits_config_resolves():
    config = cv.load_config(os.path.join(ROOT, "configs", "lsgm_digits.py"))
    fam = M.family_for(config)
    assert fam.name == "lsgm" and fam.latent_shape((16, 16, 1)) == (8, 8, 2)


def test_lsgm_cifar10_config_is_the_papers_balanced_model():
    c = cv.load_config(os.path.join(ROOT, "configs", "lsgm_cifar10.py"))
    fam = M.family_for(c)
    assert fam.latent_shape((32, 32, 3)) == (16, 16, 180)          # NVAE's 20 x 9 top-scale latents
    assert c.train.num_steps == 117_188 + 366_211 and c.lsgm.warmup_vae_steps == 117_188
    assert (c.lsgm.vae_lr, c.lsgm.prior_lr, c.lsgm.mixing_logit_init) == (1e-4, 1e-4, -3.0)
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, c.model.dropout) == (512, (1, 1, 1), 8, 0.2)
    assert c.process.kwargs.t_min == 0.01 and c.lsgm.prior_weighting == "eps"


def test_lsgm_from_the_command_line(tmp_path, compile_cache):
    """configs/lsgm_digits.py shrunk to 4 steps (2 of VAE warm-up): checkpoint, sample grid, the
    report with first-stage reconstructions and their MSE; --mode=eval reports the family's bound
    (eval.bpd), its terms summing to it."""
    from diffusion_jax import cli
    workdir = str(tmp_path / "lsgm")
    cfg = os.path.join(ROOT, "configs", "lsgm_digits.py")
    argv = ["diffusion_jax", f"--config={cfg}", f"--workdir={workdir}",
            f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.batch_size=8",
            "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
            "--config.lsgm.vae_channels=(8,8)", "--config.lsgm.vae_norm_groups=4",
            "--config.lsgm.warmup_vae_steps=2", "--config.train.num_steps=4",
            "--config.train.sample_every=4", "--config.train.log_every=1",
            "--config.train.checkpoint_every=4", "--config.optim.warmup_steps=1",
            "--config.sample.num_steps=2", "--config.sample.num_samples=8",
            "--config.sample.batch_size=8", "--config.report.num_reconstructions=4",
            "--config.report.feature_distance=False", "--config.eval.num_batches=1",
            "--config.eval.bpd_num_examples=4", "--config.mesh.shape=(1,1,1)", "--noprogress"]
    out = cli.main(argv)
    assert out["step"] == 4
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["prior/loss"] == 0.0 and recs[-1]["prior/loss"] > 0.0   # warm-up, then the prior
    assert all(math.isfinite(r["vae/nelbo"]) for r in recs)
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    assert os.path.getsize(os.path.join(workdir, "samples", "step_00000004.png")) > 0
    assert os.path.getsize(os.path.join(workdir, "report", "first_stage_reconstructions.png")) > 0
    with open(os.path.join(workdir, "report.json")) as f:
        assert 0.0 < json.load(f)["first_stage_reconstruction_mse"] < 4.0

    out = cli.main(argv + ["--mode=eval", "--config.eval.bpd=True"])
    assert out["step"] == 4 and out["bpd_num_examples"] == 4 and out["bpd"] > 0
    assert out["bpd"] == pytest.approx(out["bpd_rec"] + out["bpd_log_q"] + out["bpd_prior"], rel=1e-4)
    assert out["bpd_t_min"] == pytest.approx(0.01)
