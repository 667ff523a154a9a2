"""The 'latent' family: latent diffusion (LDM, Rombach et al. 2022) with a KL autoencoder first stage.

    first stage   networks.AutoencoderKL (config.first_stage: levels, latent channels), trained with
                  LDM's loss minus LPIPS and the patch GAN (`objectives.vae.first_stage_loss`: L1 or
                  L2 reconstruction + kl_weight KL(q(z|x) || N(0, I)))
    diffusion     config.model's UNet / DiT (the pixel family's network fields) on the scaled
                  latents s z, z ~ q(z|x), with config.objective / config.process
    scale s       config.first_stage.scale_factor, or LDM's scale_by_std: 1 / std of the first
                  batch of latents of the diffusion stage (`objectives.vae.latent_scale_factor`)
    generate      the configured sampler on latents of shape (H/f, W/f, latent_channels), then
                  decode(z / s)

Two stages in one run of train.num_steps: for the first first_stage.steps loss calls the loss is the
first-stage loss (the denoiser gets no gradient); from then on the denoising loss on the scaled
latents with the first stage held by stop-gradient (its parameters get zero gradients; Adam's
momentum still moves them for a few dozen steps, weight decay applies to none of them if
optim.weight_decay is 0, as in configs/ldm_digits.py). The stage counter and s live in
TrainState.model_state {'step', 'scale'} (a stateful loss).

Parameters: {'first_stage': AutoencoderKL, 'denoiser': UNet / DiT}. `apply_fn(params, z, t, cond)` is
the denoiser on latents (the library's network signature), so `make_eps_fn` and every sampler work
on latents; `generate` decodes. s reaches `generate` from the train state through
`generation_latents(model, state, ...)` (which the command line calls first), an explicit
`scale=` argument, or config.first_stage.scale_factor.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from diffusion_jax import config as cv
from diffusion_jax.models.base import Model, ModelFamily, register_family
from diffusion_jax.models.pixel import example_cond, network_fields

__all__ = ["LatentDiffusion", "LatentDiffusionNet", "latent_shape"]

# first_stage fields that fix the parameter tree and shapes (a checkpoint's structure)
_SHAPING = {"block_out_channels": (32, 64), "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 8, "mid_attention": False}


class LatentDiffusionNet(nn.Module):
    """First stage + denoiser in one parameter tree; __call__ is the denoiser on latents."""
    first_stage: Any
    denoiser: Any

    @property
    def dropout(self) -> float:           # make_apply_fn asks for a dropout key when > 0
        return float(getattr(self.denoiser, "dropout", 0.0))

    def __call__(self, z, t, cond=None, train: bool = False):
        return self.denoiser(z, t, cond=cond, train=train)

    def encode(self, x):
        """(mean, logvar) of q(z | x), unscaled."""
        return self.first_stage.encode(x)

    def decode(self, z):
        """Images from unscaled latents z."""
        return self.first_stage.decode(z)

    def init_all(self, x, z, t, cond=None):
        mean, _ = self.first_stage.encode(x)
        return self.first_stage.decode(mean), self.denoiser(z, t, cond=cond)


def latent_shape(config, image_shape) -> tuple:
    """(H / f, W / f, latent_channels), f = 2^(levels - 1); ConfigError when H, W do not divide."""
    fs = config.first_stage
    f = 2 ** (len(tuple(fs.block_out_channels)) - 1)
    h, w = int(image_shape[0]), int(image_shape[1])
    if h % f or w % f:
        raise cv.ConfigError(f"images of {h}x{w} do not fit the first stage: config.first_stage."
                             f"block_out_channels has {len(tuple(fs.block_out_channels))} levels, so "
                             f"the image side must be a multiple of {f} (config.data.image_size)")
    return h // f, w // f, int(fs.latent_channels)


@register_family("latent")
class LatentDiffusion(ModelFamily):
    """LDM: a KL autoencoder and a diffusion model on its scaled latents (see the module docstring)."""
    grad_norm_groups = ("first_stage", "denoiser")
    has_first_stage = True

    def check_config(self) -> None:
        c = self.config
        if c.autoencoder.kind != "none":
            raise cv.ConfigError(f"config.model.family='latent' has its own first stage "
                                 f"(config.first_stage); config.autoencoder.kind must be 'none', "
                                 f"got {c.autoencoder.kind!r}")
        fs = c.first_stage
        if not 1 <= fs.steps < c.train.num_steps:
            raise cv.ConfigError(f"config.first_stage.steps={fs.steps} must lie in [1, train.num_steps="
                                 f"{c.train.num_steps}): the first stage trains for that many steps, "
                                 f"the diffusion model for the rest")
        chans = tuple(fs.block_out_channels)
        if not chans or any(ch % fs.norm_num_groups for ch in chans):
            raise cv.ConfigError(f"config.first_stage.block_out_channels {chans} must be non-empty "
                                 f"multiples of first_stage.norm_num_groups={fs.norm_num_groups}")
        if c.objective.name == "hybrid":
            raise cv.ConfigError("config.objective.name='hybrid' (learned variance) is not supported "
                                 "by the latent family")
        if not cv.OBJECTIVES[c.objective.name].takes_process:
            raise cv.ConfigError(f"objective {c.objective.name!r} cannot train a latent diffusion model "
                                 f"(config.objective.name)")
        r = c.get("repa", None)
        if r is not None and r.weight > 0:
            raise cv.ConfigError("config.repa.weight > 0 is for the 'pixel' family")
        if c.report.enabled and c.report.probe:
            raise cv.ConfigError("config.report.probe: the readout sweep noises images, but this "
                                 "denoiser reads noised latents; set config.report.probe=False")

    def title(self) -> str:
        return "Latent diffusion (LDM)"

    # ---------------------------------------------------------------------- assembly
    def latent_shape(self, image_shape) -> tuple:
        return latent_shape(self.config, image_shape)

    def build_network(self, image_shape=None):
        from diffusion_jax.networks import DiT, UNet
        from diffusion_jax.networks.autoencoder_kl import AutoencoderKL
        if image_shape is None:
            raise ValueError("the latent family needs image_shape to build its first stage")
        self.latent_shape(image_shape)                 # the images fit the first stage
        fs = self.config.first_stage
        fields, dtype = network_fields(self.config, None)
        ae = AutoencoderKL(out_channels=int(image_shape[-1]),
                           block_out_channels=tuple(fs.block_out_channels),
                           layers_per_block=int(fs.layers_per_block),
                           latent_channels=int(fs.latent_channels),
                           norm_num_groups=int(fs.norm_num_groups),
                           mid_block_attention=bool(fs.mid_attention), scaling_factor=1.0)
        cls = UNet if self.config.model.type == "unet" else DiT
        return LatentDiffusionNet(first_stage=ae, denoiser=cls(**fields, dtype=dtype))

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        z0 = jnp.zeros((1, *self.latent_shape(image_shape)), jnp.float32)
        return module.init(key, x0, z0, jnp.zeros((1,), jnp.float32),
                           example_cond(self.config.model.num_classes), method="init_all")

    def objective(self, process, apply_fn, module, *, train: bool = True):
        """The two-stage loss `loss_fn(params, batch, rng, model_state)` (see the module docstring);
        aux: first_stage_loss, rec_mse, kl (per example), scale, diffusion_loss (0 in the other stage)."""
        import jax
        import jax.numpy as jnp
        from diffusion_jax.objectives.vae import DiagonalGaussian, first_stage_loss, latent_scale_factor

        cfg, fs = self.config, self.config.first_stage
        base = cv.build_objective(cfg, process, apply_fn, train=train)
        if getattr(base, "stateful", False):
            raise cv.ConfigError(f"the latent family needs a stateless objective; "
                                 f"{cfg.objective.name!r} with its options keeps a state")
        K = int(fs.steps)
        fixed = None if fs.scale_factor is None else float(fs.scale_factor)
        kl_weight, rec_kind = float(fs.kl_weight), str(fs.reconstruction)
        sg = jax.lax.stop_gradient

        def posterior(params, x):
            mean, logvar = module.apply({"params": params}, x, method="encode")
            return DiagonalGaussian(mean, logvar)

        def loss_fn(params, batch, rng, model_state):
            x = jnp.asarray(batch["x"], jnp.float32)
            k_z, k_base = jax.random.split(rng)
            step = jnp.asarray(model_state["step"], jnp.int32)
            zero = jnp.zeros((), jnp.float32)

            def first_stage(p):
                post = posterior(p, x)
                z = post.sample(k_z)
                rec = module.apply({"params": p}, z, method="decode")
                loss, aux = first_stage_loss(x, rec, post, kl_weight=kl_weight, reconstruction=rec_kind)
                s = latent_scale_factor(sg(z)) if fixed is None else jnp.float32(fixed)
                return loss, {"first_stage_loss": loss, "rec_mse": aux["mse"], "kl": aux["kl"],
                              "scale": s, "diffusion_loss": zero}

            def diffusion(p):
                frozen = {**p, "first_stage": sg(p["first_stage"])}
                post = posterior(frozen, x)
                z = sg(post.sample(k_z))
                if fixed is None:
                    s = jnp.where(step == K, latent_scale_factor(z),
                                  jnp.asarray(model_state["scale"], jnp.float32))
                else:
                    s = jnp.float32(fixed)
                loss, _ = base(p, {**batch, "x": s * z}, k_base)
                return loss, {"first_stage_loss": zero, "rec_mse": zero, "kl": jnp.mean(post.kl()),
                              "scale": s, "diffusion_loss": loss}

            # both stages evaluated, one selected: under jax.grad a lax.cond here runs the
            # convolution gradients inside the conditional many times slower on XLA:CPU (as found
            # for DiVAE / LSGM), while both stages together cost less than twice one. The gradient
            # of the unselected stage is multiplied by 0 (finite: both losses are finite).
            in_first = step < K
            (l1, a1), (l2, a2) = first_stage(params), diffusion(params)
            loss = jnp.where(in_first, l1, l2)
            aux = jax.tree_util.tree_map(lambda a, b: jnp.where(in_first, a, b), a1, a2)
            aux = dict(aux)
            aux["model_state"] = {"step": step + 1, "scale": aux["scale"]}
            return loss, aux

        def init_state(variables):
            return {"step": jnp.zeros((), jnp.int32),
                    "scale": jnp.asarray(1.0 if fixed is None else fixed, jnp.float32)}

        return loss_fn, True, init_state

    @classmethod
    def state_structure(cls, d: dict) -> dict:
        fs = d.get("first_stage", {}) or {}
        return {"first_stage": {k: fs.get(k, v) for k, v in _SHAPING.items()}}

    def readout_network(self, model: Model, params, z=None):
        """Not available: `readouts.probe_sweep` noises the images it is given, while this
        denoiser's input is a noised latent (the sweep would need an images -> latents map)."""
        raise cv.ConfigError("the latent family has no readout network for image probes "
                             "(config.report.probe=False)")

    # ---------------------------------------------------------------------- first stage
    def _jitted(self, model: Model, name: str):
        import jax
        if name not in model.cache:
            method = {"encode": "encode", "decode": "decode"}[name]
            model.cache[name] = jax.jit(lambda p, a: model.module.apply({"params": p}, a, method=method))
        return model.cache[name]

    def encode_latents(self, model: Model, params, images, *, scale: float = 1.0, key=None):
        """scale * z for `images` (N, H, W, C): the posterior mean, or a sample when `key` is given."""
        import jax
        import jax.numpy as jnp
        mean, logvar = self._jitted(model, "encode")(params, jnp.asarray(images, jnp.float32))
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return scale * z

    def decode_latents(self, model: Model, params, z, *, scale: float = 1.0):
        """Images decoded from scaled latents: decode(z / scale), float32 host array."""
        import jax.numpy as jnp
        import numpy as np
        return np.asarray(self._jitted(model, "decode")(params, jnp.asarray(z, jnp.float32) / scale))

    def first_stage_reconstructions(self, model: Model, params, images):
        """decode(mean of q(z | x)) for `images` (N, H, W, C), in batches of config.sample.batch_size."""
        import numpy as np
        bs = int(self.config.sample.batch_size)
        out = [self.decode_latents(model, params, self.encode_latents(model, params, images[i:i + bs]))
               for i in range(0, len(images), bs)]
        return np.concatenate(out).astype(np.float32)

    def scale_factor(self, model: Model, state=None, params=None) -> float:
        """s: config.first_stage.scale_factor, else the train state's model_state['scale'] (also
        remembered from the last `generation_latents` call), else (`generate` without a state, as
        --mode=sample calls it) re-estimated by LDM's rule from `params`' first stage on the first
        1 024 training images (posterior samples, key 0), with a warning: that estimate differs
        from the trained s by the sampling error of a std (~1%)."""
        fs = self.config.first_stage
        if fs.scale_factor is not None:
            return float(fs.scale_factor)
        ms = getattr(state, "model_state", None)
        if isinstance(ms, dict) and "scale" in ms:
            model.cache["scale_factor"] = float(ms["scale"])
        if "scale_factor" in model.cache:
            return model.cache["scale_factor"]
        if params is None:
            raise ValueError("the latent scale factor is unknown: pass scale= to generate, call "
                             "generation_latents(model, state, ...) first, or set "
                             "config.first_stage.scale_factor")
        import warnings

        import jax
        from diffusion_jax.models.autoencoder import train_images
        from diffusion_jax.objectives.vae import latent_scale_factor
        x = train_images(self.config, 1024)
        z = self.encode_latents(model, params, x, key=jax.random.PRNGKey(0))
        s = float(latent_scale_factor(z))
        warnings.warn(f"latent family: the train state's scale factor was not given to generate; "
                      f"re-estimated s = {s:.4g} from {len(x)} training images", stacklevel=2)
        model.cache["scale_factor"] = s
        return s

    def generation_latents(self, model: Model, state, n: int, seed: int, *, train_z=None,
                           latent_sampler=None, train_images=None):
        """Generation draws its own latent noise: (None, None); remembers the state's scale s."""
        if state is not None:
            self.scale_factor(model, state)
        return None, None

    def generate(self, model: Model, eps_fn, params, n: int, seed: int, *, z=None,
                 num_steps: int | None = None, sampler: str | None = None, scale: float | None = None):
        """Latents (n, H/f, W/f, c) by config.sample's sampler from the process' prior, decoded:
        decode(z / s). Returns (images, labels)."""
        import dataclasses

        import numpy as np
        if z is not None:
            raise ValueError("the latent family draws its own latent noise; generate takes no z")
        s = float(scale) if scale is not None else self.scale_factor(model, params=params)
        lat_model = dataclasses.replace(model, image_shape=self.latent_shape(model.image_shape))
        lat, labels = super().generate(lat_model, eps_fn, params, n, seed, num_steps=num_steps,
                                       sampler=sampler)
        bs = int(self.config.sample.batch_size)
        imgs = [self.decode_latents(model, params, lat[i:i + bs], scale=s) for i in range(0, n, bs)]
        return np.concatenate(imgs), labels
