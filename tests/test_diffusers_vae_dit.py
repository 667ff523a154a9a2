"""diffusers AutoencoderKL / DiTTransformer2DModel -> the library's AutoencoderKL / DiT, and a latent
DiT sampled end to end, each checked against diffusers' PyTorch modules on tiny random models."""
import copy
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler, DiTTransformer2DModel

from diffusion_jax.networks.autoencoder_kl import AutoencoderKL
from diffusion_jax.weights.diffusers import WeightsError, read_folder
from diffusion_jax.weights.diffusers.autoencoder_kl import (autoencoder_kl_fields,
                                                            convert_autoencoder_kl,
                                                            load_autoencoder_kl)
from diffusion_jax.weights.diffusers.dit import convert_dit, dit_fields, load_dit
from diffusion_jax.weights.diffusers.latent_dit import (latent_eps_fn, load_latent_dit,
                                                        sample_latent_dit, scheduler_process,
                                                        timestep_grid)

NC = 10          # DiT classes; label NC is the null class
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
VAE_CFG = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2)
DIT_CFG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NC)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nhwc(t):
    return jnp.asarray(np.asarray(t).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def randomise(model, scale, seed):
    """Perturbs every parameter (diffusers zero-initialises none here, but DiT's adaLN-Zero and
    final layers would otherwise be what a checkpoint sets): each layer influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def tie_embedders(dit):
    """Every block's conditioning embedder := block 0's (as in published DiT checkpoints)."""
    with torch.no_grad():
        src = dit.transformer_blocks[0].norm1.emb
        for blk in dit.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(src.state_dict())
    return dit


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(TorchVAE(**VAE_CFG), 0.05, 1)
    path = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    torch.manual_seed(0)
    model = tie_embedders(randomise(DiTTransformer2DModel(**DIT_CFG), 0.1, 2))
    path = str(tmp_path_factory.mktemp("dit"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def vae_fns(module):
    enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"), **FAST)
    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"), **FAST)
    return enc, dec


# ---------------------------------------------------------------- AutoencoderKL

def test_vae_matches_diffusers(vae):
    tv, path = vae
    module, params = load_autoencoder_kl(path)
    assert module.block_out_channels == (32, 64) and module.scaling_factor == pytest.approx(0.18215)
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = rs.standard_normal((2, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        post = tv.encode(torch.from_numpy(x)).latent_dist
        ref_img = tv.decode(torch.from_numpy(z)).sample.numpy()
    key = jax.random.PRNGKey(0)

    @functools.partial(jax.jit, **FAST)
    def run(p, x, z):
        ap = functools.partial(module.apply, {"params": p})
        return (*ap(x, method="encode"), ap(z, method="decode"), ap(x, method="encode_latents"),
                ap(x, key, method="encode_latents"), ap(z * 0.18215, method="decode_latents"))

    mean, logvar, img, lat, noisy, back = run(params, nhwc(x), nhwc(z))
    assert rel_err(nchw(mean), post.mean.numpy()) < 1e-4
    assert rel_err(nchw(logvar), post.logvar.numpy()) < 1e-4
    assert rel_err(nchw(img), ref_img) < 1e-4
    # Scaled latents: encode_latents is scaling * mean without a key, and decode_latents undoes it.
    assert rel_err(lat, 0.18215 * np.asarray(mean)) < 1e-6
    eps = (np.asarray(noisy) / 0.18215 - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
    np.testing.assert_allclose(eps, np.asarray(jax.random.normal(key, mean.shape)), atol=1e-3)
    assert rel_err(nchw(back), ref_img) < 1e-4


def test_vae_legacy_attention_names_and_variants(vae, tmp_path):
    tv, path = vae
    config, state = read_folder(path)
    _, params = convert_autoencoder_kl(config, state)
    legacy = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    _, params_legacy = convert_autoencoder_kl(config, legacy)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_legacy)

    # No quant convs, no mid-block attention: still equal to diffusers.
    torch.manual_seed(1)
    tv2 = randomise(TorchVAE(**VAE_CFG, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False), 0.05, 3)
    tv2.save_pretrained(str(tmp_path), safe_serialization=True)
    module, params = load_autoencoder_kl(str(tmp_path))
    assert not module.use_quant_conv and not module.mid_block_attention
    x = np.random.RandomState(2).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        post = tv2.encode(torch.from_numpy(x)).latent_dist
        ref = tv2.decode(post.mean).sample.numpy()
    mean, _ = vae_fns(module)[0](params, nhwc(x))
    assert rel_err(nchw(mean), post.mean.numpy()) < 1e-4
    out = module.apply({"params": params}, nhwc(x))[0]      # __call__: decode(mean) without key
    assert rel_err(nchw(out), ref) < 1e-4


def test_vae_errors(vae):
    _, path = vae
    config, state = read_folder(path)
    with pytest.raises(WeightsError, match="unexpected tensor.*'encoder.extra.weight'"):
        convert_autoencoder_kl(config, {**state, "encoder.extra.weight": np.zeros(3, np.float32)})
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(WeightsError, match="missing tensor 'decoder.conv_out.bias'"):
        convert_autoencoder_kl(config, missing)
    bad = {**state, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(WeightsError, match="'quant_conv.weight' has shape"):
        convert_autoencoder_kl(config, bad)
    for change, key in (({"foo": 1}, "foo"),
                        ({"down_block_types": ["AttnDownEncoderBlock2D"] * 2}, "down_block_types"),
                        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
                        ({"act_fn": "gelu"}, "act_fn"),
                        ({"latents_mean": [0.0] * 4}, "latents_mean"),
                        ({"norm_num_groups": 7}, "norm_num_groups"),
                        ({"_class_name": "VQModel"}, "_class_name")):
        with pytest.raises(WeightsError, match=key):
            autoencoder_kl_fields({**config, **change})
    with pytest.raises(ValueError, match="divisible by 2"):
        AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 3)))


# ---------------------------------------------------------------- DiT

STEPS = np.array([0, 250, 999, 500])
LABELS = np.array([3, NC, 0, 9])          # NC: the null class


def dit_apply(module):
    return jax.jit(lambda p, x, t, lab: module.apply({"params": p}, x, t, {"label": lab}), **FAST)


def test_dit_matches_diffusers(dit):
    td, path = dit
    module, params = load_dit(path)
    assert (module.num_classes, module.out_channels, module.hidden_size) == (NC, 8, 32)
    assert params["label_embed"]["embedding"].shape == (NC + 1, 32)
    x = np.random.RandomState(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = td(torch.from_numpy(x), timestep=torch.from_numpy(STEPS),
                 class_labels=torch.from_numpy(LABELS)).sample.numpy()
    t = jnp.asarray((STEPS + 1) / 1000.0, jnp.float32)          # DiscreteDDPM: t_n = (n + 1) / T
    out = nchw(dit_apply(module)(params, nhwc(x), t, jnp.asarray(LABELS, jnp.int32)))
    assert rel_err(out, ref) < 1e-4
    for i in range(4):   # per example too (each timestep / label, the null class included)
        assert rel_err(out[i], ref[i]) < 1e-4, (STEPS[i], LABELS[i])
    # Each checkpoint convention matters: with another value the output is off by far more than
    # the tolerance (measured 0.14, 0.79, 0.37, 0.37). (mlp_norm_eps 1e-6 vs 1e-5 moves it ~1e-6:
    # below float32 agreement, so not checked here.)
    for field, other in (("time_offset", 0.0), ("time_flip_sin_cos", False),
                         ("pos_embed_order", "hw"), ("time_freq_shift", 0.0)):
        wrong = nchw(dit_apply(module.clone(**{field: other}))(
            params, nhwc(x), t, jnp.asarray(LABELS, jnp.int32)))
        assert rel_err(wrong, ref) > 1e-2, field


def test_dit_original_convention(dit):
    """convention='original' is facebookresearch/DiT's computation: diffusers' modules with DiT's
    timestep frequencies 10000^(-k/128) and MLP LayerNorm eps 1e-6 patched in."""
    td, path = dit
    ref_model = copy.deepcopy(td)
    for blk in ref_model.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
        blk.norm3.eps = 1e-6
    module, params = load_dit(path, convention="original")
    assert module.time_freq_shift == 0.0 and module.mlp_norm_eps == 1e-6
    x = np.random.RandomState(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), timestep=torch.from_numpy(STEPS),
                        class_labels=torch.from_numpy(LABELS)).sample.numpy()
        ref_diffusers = td(torch.from_numpy(x), timestep=torch.from_numpy(STEPS),
                           class_labels=torch.from_numpy(LABELS)).sample.numpy()
    t = jnp.asarray((STEPS + 1) / 1000.0, jnp.float32)
    out = nchw(dit_apply(module)(params, nhwc(x), t, jnp.asarray(LABELS, jnp.int32)))
    assert rel_err(out, ref) < 1e-4
    assert rel_err(ref_diffusers, ref) > 1e-3        # the two conventions do differ
    with pytest.raises(ValueError, match="convention"):
        load_dit(path, convention="paper")


def test_dit_other_input_size_interpolates_positions(dit):
    td, path = dit
    module, params = load_dit(path)
    x = np.random.RandomState(1).standard_normal((1, 4, 12, 12)).astype(np.float32)
    with torch.no_grad():
        ref = td(torch.from_numpy(x), timestep=torch.tensor([100]),
                 class_labels=torch.tensor([2])).sample.numpy()
    out = module.apply({"params": params}, nhwc(x), jnp.asarray([0.101], jnp.float32),
                       {"label": jnp.asarray([2])})
    assert rel_err(nchw(out), ref) < 1e-4


def test_dit_errors(dit):
    td, path = dit
    config, state = read_folder(path)
    with pytest.raises(WeightsError, match="unexpected tensor.*'transformer_blocks.0.norm3.weight'"):
        convert_dit(config, {**state, "transformer_blocks.0.norm3.weight": np.ones(32, np.float32)})
    missing = {k: v for k, v in state.items() if k != "proj_out_2.weight"}
    with pytest.raises(WeightsError, match="missing tensor 'proj_out_2.weight'"):
        convert_dit(config, missing)
    k = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    with pytest.raises(WeightsError, match=f"'{k}' differs from block 0"):
        convert_dit(config, {**state, k: state[k] + 1.0})
    for change, key in (({"foo": 1}, "foo"), ({"norm_type": "ada_norm"}, "norm_type"),
                        ({"activation_fn": "geglu"}, "activation_fn"),
                        ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
                        ({"attention_bias": False}, "attention_bias"),
                        ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
                        ({"_class_name": "Transformer2DModel", "cross_attention_dim": 64},
                         "cross_attention_dim"),
                        ({"_class_name": "UNet2DModel"}, "_class_name")):
        with pytest.raises(WeightsError, match=key):
            dit_fields({**config, **change})
    # The hub's legacy Transformer2DModel config of DiT-XL-2-256 (keys diffusers ignores on remap).
    legacy = {**config, "_class_name": "Transformer2DModel", "cross_attention_dim": None,
              "num_vector_embeds": None, "only_cross_attention": False,
              "use_linear_projection": False}
    assert dit_fields(legacy) == dit_fields(config)
    # Scheduler configs: DiT's schedule, or an error naming the unsupported key.
    proc = scheduler_process({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
                              "beta_schedule": "linear", "set_alpha_to_one": True})
    assert (proc.num_steps, proc.beta_start, proc.beta_end) == (1000, 1e-4, 0.02)
    for bad, key in (({"prediction_type": "v_prediction"}, "prediction_type"),
                     ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
                     ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr")):
        with pytest.raises(WeightsError, match=key):
            scheduler_process(bad)
    # An older diffusers' persistent pos_embed buffer is consumed and checked.
    pos = td.pos_embed.pos_embed.numpy()
    convert_dit(config, {**state, "pos_embed.pos_embed": pos})
    with pytest.raises(WeightsError, match="pos_embed.pos_embed"):
        convert_dit(config, {**state, "pos_embed.pos_embed": pos[:, :, ::-1].copy()})


# ---------------------------------------------------------------- end to end

def torch_latent_dit(td, tv, noise, labels, timesteps, scale):
    """diffusers' DiTPipeline loop (null class NC instead of ImageNet's 1000), DDIM, then decode."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(len(timesteps))
    assert list(sched.timesteps.numpy()) == list(timesteps)
    lat = torch.from_numpy(noise)
    b, c = lat.shape[0], lat.shape[1]
    lab = torch.cat([torch.from_numpy(labels), torch.full((b,), NC)])
    with torch.no_grad():
        for t in sched.timesteps:
            out = td(torch.cat([lat, lat]), timestep=t.expand(2 * b), class_labels=lab).sample
            eps_c, eps_u = out[:b, :c], out[b:, :c]
            lat = sched.step(eps_u + scale * (eps_c - eps_u), t, lat).prev_sample
        return tv.decode(lat / tv.config.scaling_factor).sample.numpy()


def test_latent_dit_end_to_end(dit, vae, tmp_path):
    td, dit_path = dit
    tv, vae_path = vae
    root = tmp_path / "DiT-tiny"
    os.makedirs(root)
    os.symlink(dit_path, root / "transformer")
    os.symlink(vae_path, root / "vae")
    DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  clip_sample=False, set_alpha_to_one=True).save_pretrained(str(root / "scheduler"))
    model = load_latent_dit(str(root / "transformer"), str(root / "vae"), convention="diffusers")
    assert model.latent_shape == (8, 8, 4) and model.process.num_steps == 1000
    labels = np.array([1, NC, 7])
    noise = np.random.RandomState(3).standard_normal((3, 4, 8, 8)).astype(np.float32)
    timesteps = [500, 0]
    np.testing.assert_allclose(timestep_grid(model.process, timesteps), [0.501, 0.001], rtol=1e-6)
    ref = torch_latent_dit(td, tv, noise, labels, timesteps, 4.0)
    images = sample_latent_dit(model, labels, jax.random.PRNGKey(0), timesteps=timesteps,
                               noise=nhwc(noise), guidance_scale=4.0)
    assert images.shape == (3, 16, 16, 3) and images.dtype == jnp.float32
    assert rel_err(nchw(images), ref) < 1e-3
    # Unguided differs (the guidance is live), and the library grid path runs.
    assert rel_err(nchw(sample_latent_dit(model, labels, jax.random.PRNGKey(0), timesteps=timesteps,
                                          noise=nhwc(noise), guidance_scale=1.0)), ref) > 1e-2
    with open(root / "scheduler" / "scheduler_config.json") as f:
        assert json.load(f)["beta_schedule"] == "linear"
    # pair=True (ancestral 'learned_range'): the same guided eps, and v = the conditional half's
    # last C channels (as DiT's forward_with_cfg).
    x, t = nhwc(noise), jnp.full((3,), 0.3, jnp.float32)
    cond = {"params": model.params["dit"], "label": jnp.asarray(labels, jnp.int32)}

    @functools.partial(jax.jit, **FAST)
    def both(x, t, cond):
        raw = model.dit.apply({"params": cond["params"]}, x, t, {"label": cond["label"]})
        return (latent_eps_fn(model.dit, 4.0)(x, t, cond),
                *latent_eps_fn(model.dit, 4.0, pair=True)(x, t, cond), raw)

    eps, eps2, v, raw = both(x, t, cond)
    assert latent_eps_fn(model.dit, 4.0) is latent_eps_fn(model.dit, 4.0)    # one compile
    assert rel_err(eps2, eps) < 1e-5 and rel_err(v, raw[..., 4:]) < 1e-5
    eps3 = jax.jit(latent_eps_fn(model.dit, 4.0, False, 3), **FAST)(x, t, cond)
    assert rel_err(eps3[..., :3], eps[..., :3]) < 1e-5 and rel_err(eps3[..., 3], raw[..., 3]) < 1e-5


def test_latent_dit_learned_range_ancestral(dit, vae, monkeypatch):
    """DiT's own sampler (improved-DDPM ancestral steps with the learned variance, respaced steps;
    guidance on eps channels 0..2 only, the conditional v, as facebookresearch/DiT's
    forward_with_cfg) = diffusers' DDPMScheduler(variance_type='learned_range') on the same
    injected noise, decoded by the VAE."""
    import diffusers.schedulers.scheduling_ddpm as ddpm
    from diffusers import DDPMScheduler
    td, dit_path = dit
    tv, vae_path = vae
    model = load_latent_dit(dit_path, vae_path, convention="diffusers")
    assert model.guided_channels is None
    assert load_latent_dit(dit_path, vae_path).guided_channels == 3     # the paper's code
    labels = np.array([4, 8])
    rs = np.random.RandomState(5)
    x_init = rs.standard_normal((2, 4, 8, 8)).astype(np.float32)
    step_noise = rs.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)   # (steps, B, C, h, w)
    timesteps, scale = [500, 250, 0], 2.0

    draws = iter(step_noise)
    monkeypatch.setattr(ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(next(draws)))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(timesteps=timesteps)
    lat, lab = torch.from_numpy(x_init), torch.from_numpy(labels)
    with torch.no_grad():
        for t in sched.timesteps:
            out = td(torch.cat([lat, lat]), timestep=t.expand(4),
                     class_labels=torch.cat([lab, torch.full((2,), NC)])).sample
            eps = out[2:, :3] + scale * (out[:2, :3] - out[2:, :3])
            eps = torch.cat([eps, out[:2, 3:4]], 1)            # channel 3: conditional eps
            lat = sched.step(torch.cat([eps, out[:2, 4:]], 1), t, lat).prev_sample
        ref = tv.decode(lat / tv.config.scaling_factor).sample.numpy()

    images = sample_latent_dit(model, labels, jax.random.PRNGKey(0), sampler="ancestral",
                               timesteps=timesteps, guidance_scale=scale, noise=nhwc(x_init),
                               variance="learned_range", noise_final=True, guided_channels=3,
                               step_noise=jnp.asarray(step_noise.transpose(0, 1, 3, 4, 2)))
    assert rel_err(nchw(images), ref) < 1e-3


def test_autoencoder_kl_logical_axes():
    """Every AutoencoderKL parameter carries logical axis names (for `param_shardings`)."""
    m = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    boxed = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    specs = jax.tree_util.tree_leaves(nn.get_partition_spec(boxed["params"]),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = jax.tree_util.tree_leaves(nn.unbox(boxed["params"]))
    assert len(specs) == len(leaves) and all(len(s) > 0 and None not in s for s in specs)
