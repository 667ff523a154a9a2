"""The 'divae' model family (DiVAE: VQ-VAE + diffusion decoder) on tiny 8x8x1 images: the quantised
latents are codebook rows; in the VQ stage the encoder's gradient is the straight-through identity
of the deterministic decoder's input gradient (+ the commitment term's closed form) and the
diffusion decoder gets none; after the VQ stage the codebook and the VQ parameters the loss uses do
not move, the VQ gets no gradient and the loss is the configured objective on (x0, z_q(x0)); bad
configs and code maps are refused naming the field; a tiny command-line run writes checkpoint,
samples, both reconstructions and the report."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusion_jax import config as cv
from diffusion_jax import models as M
from diffusion_jax import quantization as Q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, C, K, BETA = 8, 1, 2, 0.25
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def tiny_config(**vq):
    c = cv.base_config("unet", "vp", "eps")
    c.model.family = "divae"
    c.data.image_size = S
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1,), 1, (), 0.0
    v = c.vq
    v.block_out_channels, v.layers_per_block, v.norm_num_groups = (8, 8), 1, 4
    v.num_codes, v.code_dim, v.beta, v.ema_decay, v.dead_after, v.steps = 8, 3, BETA, 0.9, 1, K
    for k, val in vq.items():
        setattr(v, k, val)
    c.train.num_steps = 10
    c.sample.sampler, c.sample.num_steps, c.sample.batch_size = "ddim", 2, 4
    c.report.probe = False
    return cv.validate(c)


def _max_abs(tree):
    return max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def built():
    config = tiny_config()
    fam = M.family_for(config)
    model = fam.build((S, S, C))
    variables = nn.unbox(jax.jit(model.init_variables, **FAST)(jax.random.PRNGKey(0)))
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, S, S, C)), jnp.float32)
    vg = jax.jit(jax.value_and_grad(fam.make_loss_fn(model), has_aux=True), **FAST)
    return fam, model, variables, x, vg


def test_vq_stage_codes_are_codebook_rows_and_the_encoder_gets_the_straight_through_gradient(built):
    fam, model, variables, x, vg = built
    params = variables["params"]
    assert set(params) == {"vq", "decoder"} and model.stateful and fam.has_first_stage
    ms = model.init_model_state(variables)
    stats = ms["vq_stats"]
    codebook = stats["vq"]["quantizer"]["codebook"]
    (loss, aux), g = vg(params, {"x": x}, jax.random.PRNGKey(1), ms)
    assert float(aux["diffusion_loss"]) == 0.0 and _max_abs(g["decoder"]) == 0.0
    assert int(aux["model_state"]["step"]) == 1

    mod = model.module

    def reference(params, stats, x):
        z_e = mod.apply({"params": params}, x, method="encode")
        zq, idx = mod.apply({"params": params, "vq_stats": stats}, x, method="codes")
        # loss = mean (D(z_q) - x)^2 + beta mean (z_e - z_q)^2, d/dz_e = d/dz_q of the first term
        rec = lambda z: jnp.mean(jnp.square(mod.apply({"params": params}, z, method="decode_det") - x))
        rec_mse, g_in = jax.value_and_grad(rec)(zq)
        g_z = g_in + 2.0 * BETA * (z_e - zq) / z_e.size
        enc = lambda pe: mod.apply({"params": {**params, "vq": {**params["vq"], "encoder": pe}}}, x,
                                   method="encode")
        _, vjp = jax.vjp(enc, params["vq"]["encoder"])
        return z_e, zq, idx, rec_mse, vjp(g_z)[0]

    z_e, zq, idx, rec_mse, want = jax.jit(reference, **FAST)(params, stats, x)
    # the quantised latents are rows of the codebook: the nearest ones
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(Q.nearest_code(z_e, codebook)))
    np.testing.assert_array_equal(np.asarray(zq), np.asarray(codebook)[np.asarray(idx)])
    assert float(aux["rec_mse"]) == pytest.approx(float(rec_mse), rel=1e-5)
    commit = BETA * float(jnp.mean(jnp.square(z_e - zq)))
    assert float(loss) == pytest.approx(float(rec_mse) + commit, rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g["vq"]["encoder"]), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(jnp.max(jnp.abs(b))))

    # the EMA codebook moved by one update of quantization.ema_step (no dead code yet)
    new = aux["model_state"]["vq_stats"]["vq"]["quantizer"]
    ref = Q.ema_update(Q.VQEMAState(**stats["vq"]["quantizer"]), z_e, idx, decay=0.9)
    k = tiny_config().vq.num_codes
    used = np.asarray(Q.code_counts(idx, k)) > 0
    np.testing.assert_allclose(np.asarray(new["codebook"])[used], np.asarray(ref.codebook)[used],
                               rtol=1e-5, atol=1e-6)
    # dead_after=1: the codes unused in this batch restart from encoder outputs of the batch
    rows = np.asarray(z_e).reshape(-1, 3)
    for e in np.asarray(new["codebook"])[~used]:
        assert np.min(np.max(np.abs(rows - e), axis=1)) < 1e-5
    assert float(aux["usage"]) == pytest.approx(float(Q.code_usage(idx, k)))
    assert float(aux["perplexity"]) == pytest.approx(float(Q.perplexity(idx, k)), rel=1e-5)
    assert float(aux["restarted"]) == k - int(np.unique(np.asarray(idx)).size)


def test_after_the_vq_stage_the_codebook_does_not_move(built):
    fam, model, variables, x, vg = built
    params = variables["params"]
    ms = model.init_model_state(variables)
    ms = {**ms, "step": jnp.asarray(K, jnp.int32)}
    (loss, aux), g = vg(params, {"x": x}, jax.random.PRNGKey(2), ms)
    assert _max_abs(g["vq"]) == 0.0 and _max_abs(g["decoder"]) > 0.0
    assert float(aux["vq_loss"]) == 0.0 and float(aux["diffusion_loss"]) == pytest.approx(float(loss))
    # the loss is the configured objective on (x0, z_q(x0))
    base = cv.build_objective(fam.config, model.process, model.apply_fn)

    def reference(params, stats, x, key):
        zq, _ = model.module.apply({"params": params, "vq_stats": stats}, x, method="codes")
        return base(params, {"x": x, "cond": {"zq": zq}}, jax.random.split(key)[1])[0]

    want = jax.jit(reference, **FAST)(params, ms["vq_stats"], x, jax.random.PRNGKey(2))
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    ms1 = aux["model_state"]
    # a later step with other (e.g. momentum-drifted) VQ parameters: the frozen copy stays
    drifted = {**params, "vq": jax.tree_util.tree_map(lambda a: a + 0.1, params["vq"])}
    (_, aux2), g2 = vg(drifted, {"x": x}, jax.random.PRNGKey(3), ms1)
    ms2 = aux2["model_state"]
    for a, b in zip(jax.tree_util.tree_leaves((ms["vq_stats"], params["vq"])),
                    jax.tree_util.tree_leaves((ms2["vq_stats"], ms2["vq"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(ms2["step"]) == K + 2 and _max_abs(g2["vq"]) == 0.0


def test_generation_and_reconstructions_decode_codes_of_the_frozen_vq(built):
    fam, model, variables, x, _ = built
    params = variables["params"]
    ms = model.init_model_state(variables)
    fam.use_train_state(model, ms)
    imgs = np.asarray(x)
    z, what = fam.generation_latents(model, None, 3, 0, train_images=imgs)
    assert z.shape == (3, S // 2, S // 2, 3) and "training images" in what
    out, labels = fam.generate(model, None, params, 3, 0, z=z)
    assert out.shape == (3, S, S, C) and labels is None and np.all(np.isfinite(out))
    rep = fam.first_stage_report(model, params, imgs)
    (det,) = rep["reconstructions"].values()
    zq, idx = fam.encode_codes(model, imgs)
    np.testing.assert_allclose(det, fam.decode_deterministic(model, fam.codes_from_indices(model, idx)),
                               atol=1e-6)
    assert rep["numbers"]["code_usage"] == pytest.approx(float(Q.code_usage(idx, 8)))
    with pytest.raises(ValueError, match=r"config\.vq\.code_dim=3"):
        fam.generate(model, None, params, 3, 0, z=np.zeros((3, S // 2, S // 2, 5)))
    with pytest.raises(ValueError, match=r"config\.vq\.num_codes=8"):
        fam.codes_from_indices(model, np.full((1, 4, 4), 8))


def test_divae_refuses_bad_configs():
    with pytest.raises(cv.ConfigError, match=r"vq\.num_codes=1"):
        M.family_for(tiny_config(num_codes=1))
    with pytest.raises(cv.ConfigError, match=r"vq\.steps=10"):
        M.family_for(tiny_config(steps=10))
    with pytest.raises(cv.ConfigError, match=r"vq\.norm_num_groups=3"):
        M.family_for(tiny_config(norm_num_groups=3))
    with pytest.raises(cv.ConfigError, match=r"multiple of 16 \(config\.data\.image_size\)"):
        M.family_for(tiny_config(block_out_channels=(4,) * 5))
    with pytest.raises(cv.ConfigError, match=r"vq\.ema_decay=1\.0"):
        M.family_for(tiny_config(ema_decay=1.0))
    c = tiny_config()
    c.unlock()
    c.report.probe = True
    with pytest.raises(cv.ConfigError, match=r"report\.probe=False"):
        M.family_for(c)


def test_divae_digits_config_resolves_to_the_family():
    config = cv.load_config(os.path.join(ROOT, "configs", "divae_digits.py"))
    fam = M.family_for(config)
    assert fam.name == "divae" and fam.code_shape((16, 16, 1)) == (8, 8, 4)


def test_divae_from_the_command_line(tmp_path, compile_cache):
    """configs/divae_digits.py shrunk: both stages train; checkpoint, in-training samples, the report
    with both decoders' reconstructions from the same codes, code usage / perplexity."""
    from diffusion_jax import cli
    workdir = str(tmp_path / "divae")
    cfg = os.path.join(ROOT, "configs", "divae_digits.py")
    out = cli.main(["diffusion_jax", f"--config={cfg}", f"--workdir={workdir}",
                    f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.batch_size=8",
                    "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
                    "--config.vq.block_out_channels=(8,8)", "--config.vq.norm_num_groups=4",
                    "--config.vq.steps=2", "--config.train.num_steps=4",
                    "--config.train.sample_every=4", "--config.train.log_every=1",
                    "--config.train.checkpoint_every=0", "--config.optim.warmup_steps=1",
                    "--config.sample.num_steps=2", "--config.sample.num_samples=8",
                    "--config.sample.batch_size=8", "--config.readout.num_train=64",
                    "--config.readout.num_test=32", "--config.report.num_reconstructions=4",
                    "--config.report.classifier_steps=20", "--config.mesh.shape=(1,1,1)", "--noprogress"])
    assert out["step"] == 4
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    assert os.path.getsize(os.path.join(workdir, "samples", "step_00000004.png")) > 0
    assert os.path.getsize(os.path.join(workdir, "report", "first_stage_reconstructions.png")) > 0
    assert os.path.getsize(os.path.join(workdir, "report", "samples.png")) > 0
    with open(os.path.join(workdir, "report.json")) as f:
        numbers = json.load(f)
    diff_row, det_row = numbers["first_stage_compared"]
    assert "diffusion decoder" in diff_row["reconstruction"] and "deterministic" in det_row["reconstruction"]
    assert diff_row["MSE"] == pytest.approx(numbers["first_stage_reconstruction_mse"])
    assert 0.0 < det_row["MSE"] < 4.0 and 0.0 <= det_row["classifier agreement"] <= 1.0
    assert 0.0 < numbers["first_stage_code_usage"] <= 1.0 and numbers["first_stage_code_perplexity"] >= 1.0
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any("perplexity" in r for r in recs) and any("usage" in r for r in recs)
    with open(os.path.join(workdir, "report.md")) as f:
        assert "First-stage reconstructions compared" in f.read()

    # --mode=sample from the checkpoint alone: the family reads what it needs from the train state
    smp = cli.main(["diffusion_jax", f"--workdir={workdir}", "--mode=sample", "--noprogress"])
    with np.load(smp["npz"]) as z:
        assert z["x"].shape == (8, 16, 16, 1) and np.isfinite(z["x"]).all()
