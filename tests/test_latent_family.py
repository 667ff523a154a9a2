"""The 'latent' model family (LDM): a tiny first stage + UNet on 8x8x1 images builds, inits, gives a
finite loss in both stages (gradients only into the stage being trained, the scale factor set from
the first diffusion-stage batch) and generates decoded images of the image shape."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusion_jax import config as cv
from diffusion_jax import models as M
from diffusion_jax.objectives.vae import DiagonalGaussian, latent_scale_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, C, N, K = 8, 1, 4, 3
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def tiny_config():
    c = cv.base_config("unet", "vp", "eps")
    c.model.family = "latent"
    c.data.image_size = S
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1,), 1, (), 0.0
    fs = c.first_stage
    fs.block_out_channels, fs.layers_per_block, fs.latent_channels, fs.norm_num_groups = (8, 8), 1, 2, 4
    fs.steps = K
    c.train.num_steps = 10
    c.sample.sampler, c.sample.num_steps, c.sample.batch_size = "ddim", 2, 2
    c.report.probe = False
    return cv.validate(c)


def _max_abs(tree):
    return max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(tree))


def test_latent_family_builds_trains_both_stages_and_generates():
    config = tiny_config()
    fam = M.family_for(config)
    assert fam.name == "latent" and not fam.has_encoder and not fam.image_denoiser
    model = fam.build((S, S, C))
    assert fam.latent_shape((S, S, C)) == (S // 2, S // 2, 2)
    variables = nn.unbox(jax.jit(model.init_variables, **FAST)(jax.random.PRNGKey(0)))
    params = variables["params"]
    assert set(params) == {"first_stage", "denoiser"} and model.stateful
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, S, S, C)), jnp.float32)
    loss_fn = fam.make_loss_fn(model)
    vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), **FAST)
    ms = model.init_model_state(variables)

    # stage 1: the first-stage loss; no gradient into the denoiser
    (loss, aux), g = vg(params, {"x": x}, jax.random.PRNGKey(1), ms)
    assert np.isfinite(float(loss)) and float(aux["first_stage_loss"]) == pytest.approx(float(loss))
    assert float(aux["diffusion_loss"]) == 0.0 and int(aux["model_state"]["step"]) == 1
    assert _max_abs(g["denoiser"]) == 0.0 and _max_abs(g["first_stage"]) > 0.0

    # stage 2 (step == K): the scale is 1 / std of this batch's latents; first stage frozen
    ms2 = {"step": jnp.asarray(K, jnp.int32), "scale": jnp.asarray(1.0, jnp.float32)}
    (loss, aux), g = vg(params, {"x": x}, jax.random.PRNGKey(2), ms2)
    k_z = jax.random.split(jax.random.PRNGKey(2))[0]
    mean, logvar = model.module.apply({"params": params}, x, method="encode")
    s_ref = float(latent_scale_factor(DiagonalGaussian(mean, logvar).sample(k_z)))
    assert float(aux["scale"]) == pytest.approx(s_ref, rel=1e-4)
    assert float(aux["model_state"]["scale"]) == pytest.approx(s_ref, rel=1e-4)
    assert np.isfinite(float(loss)) and float(aux["diffusion_loss"]) == pytest.approx(float(loss))
    assert _max_abs(g["first_stage"]) == 0.0 and _max_abs(g["denoiser"]) > 0.0
    # later steps keep the scale of step K
    ms3 = {"step": jnp.asarray(K + 1, jnp.int32), "scale": jnp.asarray(0.5, jnp.float32)}
    assert float(vg(params, {"x": x}, jax.random.PRNGKey(3), ms3)[0][1]["scale"]) == 0.5

    # generation: latents by the sampler, decoded to images of the image shape
    class State:
        model_state = {"step": jnp.asarray(K + 1), "scale": jnp.asarray(0.5)}
    assert fam.generation_latents(model, State(), N, 0) == (None, None)
    out, labels = fam.generate(model, fam.make_eps_fn(model), params, N, 0)
    assert out.shape == (N, S, S, C) and np.all(np.isfinite(out)) and labels is None
    assert fam.scale_factor(model) == 0.5

    # the report's first-stage reconstructions: decode(posterior mean), batch by batch
    assert fam.has_first_stage
    rec = fam.first_stage_reconstructions(model, params, np.asarray(x))
    ref = model.module.apply({"params": params}, mean, method="decode")
    assert rec.shape == x.shape and rec.dtype == np.float32
    np.testing.assert_allclose(rec, np.asarray(ref), atol=1e-5)


def test_latent_family_refuses_bad_configs():
    c = tiny_config()
    c.unlock()
    c.first_stage.steps = 10
    with pytest.raises(cv.ConfigError, match=r"first_stage\.steps=10"):
        M.family_for(c)
    c = tiny_config()
    with pytest.raises(cv.ConfigError, match=r"multiple of 2.*data\.image_size"):
        M.family_for(c).build((9, 9, 1))
    c.unlock()
    c.first_stage.norm_num_groups = 3
    with pytest.raises(cv.ConfigError, match="norm_num_groups=3"):
        M.family_for(c)
    c = tiny_config()
    c.unlock()
    c.report.probe = True
    with pytest.raises(cv.ConfigError, match=r"report\.probe=False"):
        M.family_for(c)


def test_ldm_digits_config_resolves_to_the_latent_family():
    config = cv.load_config(os.path.join(ROOT, "configs", "ldm_digits.py"))
    fam = M.family_for(config)
    assert fam.name == "latent"
    assert fam.latent_shape((16, 16, 1)) == (8, 8, 2)


def test_ldm_from_the_command_line_writes_first_stage_reconstructions(tmp_path, compile_cache):
    """configs/ldm_digits.py shrunk: both stages train, the report shows decode(encode(x)) and its
    MSE (report.json)."""
    import json

    from diffusion_jax import cli
    workdir = str(tmp_path / "ldm")
    cfg = os.path.join(ROOT, "configs", "ldm_digits.py")
    out = cli.main(["diffusion_jax", f"--config={cfg}", f"--workdir={workdir}",
                    f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.batch_size=8",
                    "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
                    "--config.first_stage.block_out_channels=(8,8)", "--config.first_stage.norm_num_groups=4",
                    "--config.first_stage.steps=2", "--config.train.num_steps=4",
                    "--config.train.sample_every=0", "--config.train.log_every=1",
                    "--config.train.checkpoint_every=0", "--config.optim.warmup_steps=1",
                    "--config.sample.num_steps=2", "--config.sample.num_samples=8",
                    "--config.sample.batch_size=8", "--config.readout.num_train=64",
                    "--config.readout.num_test=32", "--config.report.num_reconstructions=4",
                    "--config.mesh.shape=(1,1,1)", "--noprogress"])
    assert out["step"] == 4
    assert os.path.getsize(os.path.join(workdir, "report", "first_stage_reconstructions.png")) > 0
    with open(os.path.join(workdir, "report.json")) as f:
        numbers = json.load(f)
    mse = numbers["first_stage_reconstruction_mse"]
    assert 0.0 < mse < 2.0
    with open(os.path.join(workdir, "report.md")) as f:
        assert "First-stage reconstructions" in f.read()

    # --mode=sample from the checkpoint alone: the family reads what it needs from the train state
    smp = cli.main(["diffusion_jax", f"--workdir={workdir}", "--mode=sample", "--noprogress"])
    with np.load(smp["npz"]) as z:
        assert z["x"].shape == (8, 16, 16, 1) and np.isfinite(z["x"]).all()
