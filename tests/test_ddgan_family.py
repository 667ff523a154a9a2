"""The 'ddgan' model family (denoising diffusion GAN): the phased train step is exactly one Adam step
of the discriminator on the 'disc' loss, then one of the generator on the 'gen' loss against the
UPDATED discriminator (hand-computed optax updates), with the lazy R1 on at step 0 and off at step
1; `generate` runs the T-step chain through the DDPM posterior (closed-form moments of the samples
for a generator whose x0' is a fixed constant); bad configs are refused naming the field; a tiny
command-line run writes checkpoint, sample grid and report."""
from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from diffusion_jax import cli
from diffusion_jax import config as cv
from diffusion_jax import models as M
from diffusion_jax import training as T

sys.path.insert(0, os.path.dirname(__file__))
from test_cli import ROOT, tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags

DIGITS = os.path.join(ROOT, "configs", "ddgan_digits.py")
S, C, B = 8, 1, 4
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
LR_D, LR_G, B1, B2 = 1e-2, 1e-3, 0.5, 0.9


def tiny_config(T_steps=2):
    c = cv.base_config("unet", "vp", "eps")
    c.model.family = "ddgan"
    c.data.image_size, c.data.batch_size = S, B
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1,), 1, (), 0.0
    m.mid_attn, m.time_scale = False, 1.0
    d = c.ddgan
    d.num_timesteps, d.nz, d.z_emb_dim, d.n_mlp = T_steps, 4, 8, 1
    d.ngf, d.disc_ch_mult, d.t_emb_dim = 8, (1,), 8
    d.lr_d, d.lr_g, d.beta1, d.beta2 = LR_D, LR_G, B1, B2
    d.r1_gamma, d.lazy_reg = 0.1, 2
    c.optim.grad_clip, c.optim.schedule, c.optim.warmup_steps = 0.0, "constant", 0
    c.ema.decays = (0.9,)
    c.sample.batch_size = 2
    c.report.probe = False
    return cv.validate(c)


def _rel(a, b):
    a, b = (jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(t)]) for t in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_phased_step_is_disc_adam_then_gen_adam_against_the_updated_discriminator():
    config = tiny_config()
    fam = M.family_for(config)
    assert fam.name == "ddgan" and not fam.scalar_eps and not fam.image_denoiser
    model = fam.build((S, S, C))
    loss_fn = model.loss_fn
    assert isinstance(loss_fn, T.PhasedLoss) and model.stateful
    assert [(p.name, p.groups) for p in loss_fn.phases] == [("disc", ("discriminator",)),
                                                             ("gen", ("generator",))]
    base = T.OptimizerConfig(learning_rate=1.0, grad_clip_norm=None)
    groups = fam.optimizer_groups(base)
    assert (groups["discriminator"].learning_rate, groups["generator"].learning_rate) == (LR_D, LR_G)
    assert (groups["generator"].b1, groups["generator"].b2) == (B1, B2)
    tx, schedule = T.make_group_optimizer(groups)
    init = T.make_init_fn(model.init_params, tx, (0.9,),
                          init_model_state_fn=lambda k: model.init_model_state(None))
    state0 = jax.jit(init, **FAST)(jax.random.PRNGKey(0))
    state0 = state0.replace(model_state={"step": jnp.ones((), jnp.int32)})     # R1 off at step 1
    step = jax.jit(T.make_train_step(loss_fn, tx, schedule, return_grads=True), **FAST)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (B, S, S, C)), jnp.float32)
    batch, rng = {"x": x}, jax.random.PRNGKey(7)
    state1, m = step(state0, batch, rng)

    p0, ms0 = nn.unbox(state0.params), state0.model_state
    p1 = nn.unbox(state1.params)
    # the reference losses: the same family without R1 (R1 is off at step 1 of lazy_reg = 2, so the
    # 'disc' loss there is the same), which keeps the second-order R1 graph out of this compilation
    ref = tiny_config()
    ref.unlock()
    ref.ddgan.r1_gamma = 0.0
    ref_fam = M.family_for(cv.validate(ref))
    d_loss, g_loss = (ph.loss_fn for ph in ref_fam.build((S, S, C)).loss_fn.phases)

    @jax.jit
    def grads(p, ms):
        gd = jax.grad(lambda d: d_loss({**p, "discriminator": d}, batch, jax.random.fold_in(rng, 0),
                                       ms)[0])(p["discriminator"])
        gg = jax.grad(lambda g: g_loss({**p, "generator": g}, batch, jax.random.fold_in(rng, 1),
                                       ms)[0])(p["generator"])
        return gd, gg

    def adam_step(lr, g, p):
        opt = optax.adam(lr, b1=B1, b2=B2, eps=1e-8)
        return optax.apply_updates(p, opt.update(g, opt.init(p), p)[0])

    # the discriminator moved by exactly one Adam step of the 'disc' gradient at the old params
    g_d, g_g_old = grads(p0, ms0)
    d_ref = adam_step(LR_D, g_d, p0["discriminator"])
    assert _rel(m["grads"]["discriminator"], g_d) < 1e-5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           p1["discriminator"], d_ref)
    # the generator's gradient is the 'gen' gradient against the UPDATED discriminator ...
    _, g_g = grads({**p0, "discriminator": p1["discriminator"]}, ms0)
    assert _rel(m["grads"]["generator"], g_g) < 1e-5
    assert _rel(g_g_old, g_g) > 1e-3            # ... which the old discriminator would not give
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           p1["generator"], adam_step(LR_G, g_g, p0["generator"]))
    assert float(m["loss"]) == float(m["gen/loss"]) and math.isfinite(float(m["disc/loss"]))
    assert float(m["grad_norm/discriminator"]) == pytest.approx(float(optax.tree.norm(g_d)), rel=1e-5)

    # the lazy R1 (lazy_reg = 2): off at step 1, on at step 2; the 'gen' phase counts the steps
    assert int(state1.model_state["step"]) == 2 and float(m["disc/r1"]) == 0.0
    state2, m2 = step(state1, batch, jax.random.PRNGKey(8))
    assert int(state2.model_state["step"]) == 3 and float(m2["disc/r1"]) > 0


def test_generator_step_is_the_ddpm_posterior_of_its_x0_and_generate_ends_at_x0():
    """x0' = tanh(b) (the UNet's zero-initialised output conv plus bias b): the family's generator
    step draws x_t ~ N(c1_t x0' + c2_t x_{t+1}, v_t) (the discriminator's fake and the sampler's
    step; v_0 = 0), and `generate` (T steps from N(0, I)) ends at x0' itself (c1_0 = 1, c2_0 = 0)."""
    T_steps, b, n = 3, 0.8, 384
    config = tiny_config(T_steps)
    fam = M.family_for(config)
    model = fam.build((S, S, C))
    params = nn.unbox(jax.jit(model.init_variables, **FAST)(jax.random.PRNGKey(0)))["params"]
    unet = params["generator"]["unet"]
    assert float(jnp.max(jnp.abs(unet["conv_out"]["kernel"]))) == 0.0
    params = {**params, "generator": {**params["generator"], "unet": {
        **unet, "conv_out": {**unet["conv_out"], "bias": jnp.full_like(unet["conv_out"]["bias"], b)}}}}
    x0 = math.tanh(b)

    sched = fam.schedule()
    c1, c2, v = (np.asarray(sched.table(k), np.float64) for k in ("post_c1", "post_c2", "post_var"))
    t = np.arange(n) % T_steps
    x_tp1 = np.random.RandomState(1).normal(size=(n, S, S, C))
    x_t = np.asarray(jax.jit(lambda p, x, tt, k: fam.posterior_sample(model, p, x, tt, k), **FAST)(
        params, jnp.asarray(x_tp1, jnp.float32), jnp.asarray(t, jnp.int32), jax.random.PRNGKey(3)),
        np.float64)
    mean = c1[t][:, None, None, None] * x0 + c2[t][:, None, None, None] * x_tp1
    np.testing.assert_allclose(x_t[t == 0], mean[t == 0], atol=1e-5)          # v_0 = 0: no noise
    k = t > 0
    r = ((x_t[k] - mean[k]) / np.sqrt(v[t[k]])[:, None, None, None]).ravel()  # standardised residuals
    assert abs(r.mean()) < 5 / math.sqrt(r.size) and abs(r.var() - 1) < 5 * math.sqrt(2 / r.size)
    # the residual is uncorrelated with x_{t+1}: c2 is right (a wrong c2 leaves (c2 - c2') x_{t+1})
    assert abs(np.corrcoef(r, x_tp1[k].ravel())[0, 1]) < 5 / math.sqrt(r.size)

    x, labels = fam.generate(model, fam.make_eps_fn(model), params, 4, 0)     # 2 batches of 2
    assert x.shape == (4, S, S, C) and labels is None and fam.make_eps_fn(model) is None
    np.testing.assert_allclose(x, x0, atol=1e-5)
    assert fam.sampler_description() == f"DDGAN, T = {T_steps} generator steps"
    with pytest.raises(ValueError, match="num_steps=5"):
        fam.generate(model, None, params, 2, 0, num_steps=5)


@pytest.mark.parametrize("override, named", [
    ("ddgan.num_timesteps=0", r"config\.ddgan\.num_timesteps"),
    ("ddgan.nz=0", r"config\.ddgan\.nz"),
    ("data.image_size=9", r"config\.data\.image_size=9"),
    ("data.image_size=10", r"discriminator.*multiple of 4 \(config\.data\.image_size\)"),
    ("ddgan.disc_ch_mult=(2,4,4,4,4)", r"discriminator.*multiple of 32 \(config\.data\.image_size\)"),
    ("data.batch_size=6", r"config\.data\.batch_size=6"),
    ("ddgan.beta_min=30.0", r"config\.ddgan\.beta_max"),
    ("eval.bpd=True", r"config\.eval\.bpd"),
    ("report.probe=True", r"config\.report\.probe"),
])
def test_bad_config_is_refused_naming_the_field(override, named):
    with pytest.raises(cv.ConfigError, match=named):
        M.family_for(cv.load_config(DIGITS, overrides=[override]))


def test_configs_load_and_resolve_to_the_family():
    for name in ("ddgan_digits.py", "ddgan_cifar10.py"):
        c = cv.load_config(os.path.join(ROOT, "configs", name))
        fam = M.family_for(c)
        assert fam.name == "ddgan" and c.ddgan.num_timesteps == 4
        assert fam.nfe_per_sample() == 4.0        # one generator call per step, not config.sample's


def test_tiny_cli_run_writes_checkpoint_samples_and_report(tmp_path, compile_cache):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    argv = [f"--config={DIGITS}" if a.startswith("--config=") else a for a in tiny(workdir, data_dir, one_device=True)]
    argv = [a for a in argv if not a.startswith("--config.report.enabled")]
    argv += ["--config.model.mid_attn=False", "--config.ddgan.nz=4", "--config.ddgan.z_emb_dim=8",
             "--config.ddgan.n_mlp=1", "--config.ddgan.ngf=8", "--config.ddgan.disc_ch_mult=(1,)",
             "--config.ddgan.t_emb_dim=8", "--config.ddgan.r1_gamma=0.0", "--config.train.num_steps=3",
             "--config.train.sample_every=0", "--config.train.checkpoint_every=0",
             "--config.readout.num_train=64", "--config.readout.num_test=32",
             "--config.report.classifier_steps=20",
             "--config.report.enabled=True"]
    out = cli.main(argv)
    assert out["step"] == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "disc/loss", "gen/loss",
                                                 "grad_norm/generator", "grad_norm/discriminator")), r
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    assert "DDGAN, T = 4 generator steps" in md and "Denoising diffusion GAN" in md
    assert os.path.getsize(os.path.join(workdir, "report", "samples.png")) > 0
