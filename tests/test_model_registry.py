"""Model families (diffusion_jax.models): the registry, each family built from a tiny config (init,
a finite loss, a denoiser of the right shape, generation of the right shape), the family every
config file resolves to, and checkpoints whose saved config predates config.model.family."""
from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusion_jax import config as cv
from diffusion_jax import models as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, C, N = 8, 1, 4                     # 8x8x1 images, 4 samples (two sampler batches of 2)
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
AUTOENCODER_CONFIGS = {"default.py", "diffae_celeba64.py", "diffae_ffhq64.py", "dmz_celeba64.py",
                       "dmz_cifar10.py"}
PIXEL_CONFIGS = {"ddae_cifar10.py", "ddpm_256_diffusers.py", "ddpm_cifar10.py",
                 "ddpm_cifar10_diffusers.py", "dit_s2.py", "edm_cifar10.py",
                 "score_sde_subvp_cifar10.py", "score_sde_ve_cifar10.py", "score_sde_vp_cifar10.py"}


def tiny_config(family: str):
    """A tiny UNet (one level, no attention) on 8x8x1 images; 'pixel' is class-conditional."""
    c = cv.base_config("unet", "vp", "eps")
    c.data.image_size = S
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1,), 1, (), 0.0
    c.sample.sampler, c.sample.num_steps, c.sample.batch_size = "ddim", 2, 2
    if family == "pixel":
        m.num_classes = 3
    else:
        ae = c.autoencoder
        ae.kind, ae.encoder, ae.latent, ae.z_dim, ae.encoder_ch = "dmz", "conv", "binary", 4, 8
    return cv.validate(c)


@pytest.mark.parametrize("family", ["pixel", "autoencoder"])
def test_family_builds_inits_loss_and_generates(family):
    config = tiny_config(family)
    fam = M.family_for(config)
    assert fam.name == family and isinstance(fam, M.get_family(family))
    model = fam.build((S, S, C))
    assert model.family is fam and model.has_encoder == fam.has_encoder == (family == "autoencoder")
    variables = nn.unbox(jax.jit(model.init_variables, **FAST)(jax.random.PRNGKey(0)))
    params = variables["params"]
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.uniform(-1, 1, (4, S, S, C)), jnp.float32)
    batch = {"x": x}
    if model.num_classes is not None:
        batch["cond"] = {"label": jnp.arange(4, dtype=jnp.int32) % model.num_classes}
    state = (model.init_model_state(variables),) if model.stateful else ()
    loss, _ = jax.jit(fam.make_loss_fn(model), **FAST)(params, batch, jax.random.PRNGKey(1), *state)
    assert np.isfinite(float(loss)) and float(loss) > 0

    z, what = fam.generation_latents(model, None, N, 0)     # the family's prior (None: none)
    assert (z is None) == (not fam.has_encoder) and (what is None) == (z is None)
    out, labels = fam.generate(model, fam.make_eps_fn(model), params, N, 0, z=z)
    assert out.shape == (N, S, S, C) and np.all(np.isfinite(out))
    if family == "pixel":
        np.testing.assert_array_equal(labels, [0, 1, 2, 0])   # cycling over the classes
    else:
        assert labels is None and z.shape[0] == N
        assert fam.readout_network(model, params, z)[0] is model.module.decoder


def test_registry_lookup_and_errors():
    assert {"pixel", "autoencoder"} <= set(M.registered_families())
    assert M.get_family("pixel") is M.PixelDiffusion
    assert M.get_family("autoencoder") is M.DiffusionAutoencoderFamily
    with pytest.raises(cv.ConfigError, match=r"unknown model family 'pixle'.*autoencoder, (\w+, )*pixel"):
        M.get_family("pixle")
    with pytest.raises(ValueError, match="already registered"):
        M.register_family("pixel")(type("Other", (M.ModelFamily,), {}))
    with pytest.raises(TypeError, match="not a ModelFamily"):
        M.register_family("bad")(object)
    # a config naming an unknown family is refused with the registered names
    c = tiny_config("pixel")
    c.model.family = "no_such_family"
    with pytest.raises(cv.ConfigError, match=r"config\.model\.family.*registered"):
        M.family_for(c)


def test_new_family_is_chosen_by_config_field():
    """One new module + a config: a registered family is picked by model.family."""
    @M.register_family("test_toy")
    class Toy(M.PixelDiffusion):
        def title(self):
            return "toy"
    try:
        c = tiny_config("pixel")
        c.model.family = "test_toy"
        fam = M.family_for(c)
        assert isinstance(fam, Toy) and fam.name == "test_toy" and fam.title() == "toy"
        assert "test_toy" in M.registered_families()
    finally:
        from diffusion_jax.models import base
        base._FAMILIES.pop("test_toy", None)


def test_family_must_agree_with_the_config():
    c = tiny_config("autoencoder")
    c.model.family = "pixel"
    with pytest.raises(cv.ConfigError, match=r"autoencoder\.kind must be 'none'"):
        M.family_for(c)
    c = tiny_config("pixel")
    c.model.family = "autoencoder"
    with pytest.raises(cv.ConfigError, match=r"needs config\.autoencoder\.kind"):
        M.family_for(c)
    with pytest.raises(NotImplementedError, match="has no encoder"):
        M.family_for(tiny_config("pixel")).encode(None, None, None)


def test_every_config_file_resolves_to_its_family():
    names = {os.path.basename(p): p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert AUTOENCODER_CONFIGS | PIXEL_CONFIGS <= set(names)
    for name, path in sorted(names.items()):
        config = cv.load_config(path)
        fam = M.family_for(config)
        want = ("autoencoder" if name in AUTOENCODER_CONFIGS else
                "pixel" if name in PIXEL_CONFIGS else None)
        if want is None:                   # a config added later: a registered family
            assert fam.name in M.registered_families(), name
        else:
            assert config.model.family is None and fam.name == want, name


@pytest.mark.parametrize("family", ["pixel", "autoencoder"])
def test_saved_config_without_the_field(family):
    """A checkpoint's JSON config written before model.family existed resolves to the family it
    was trained as, and is compatible with today's config, with the field unset or explicit."""
    from diffusion_jax.cli import CLIError
    from diffusion_jax.cli.experiment import check_checkpoint_compatible, json_config
    config = tiny_config(family)
    saved = json_config(config)
    saved["model"].pop("family")
    assert M.family_name(saved) == family
    assert M.family_name(cv.from_dict(saved, validate_config=False)) == family

    class Saved:
        def read_config(self, step=None):
            return saved

    check_checkpoint_compatible(Saved(), config, "w")
    config.model.family = family
    check_checkpoint_compatible(Saved(), config, "w")
    other = tiny_config("autoencoder" if family == "pixel" else "pixel")
    with pytest.raises(CLIError, match="family"):
        check_checkpoint_compatible(Saved(), other, "w")
