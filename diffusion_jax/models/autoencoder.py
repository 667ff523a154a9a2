"""The 'autoencoder' family: diffusion autoencoders, DiffAE (Preechakul et al. 2022) and DMZ
(Proszewska et al. 2025), config.autoencoder.kind 'diffae' / 'dmz'.

An encoder x0 -> z (`autoencoders.ENCODERS`: semantic half-UNet or conv; continuous, Gaussian or
binary latents) and a z-conditioned UNet decoder (config.model), trained end to end by
`autoencoders.autoencoder_loss` (any base objective + KL / bit-usage terms; the encoder's BatchNorm
statistics in TrainState.model_state['encoder']). Generation decodes latents from the prior
(Bernoulli / N(0, I)), from DiffAE's latent DDIM, or, for continuous latents without one, the
training images' own latents (conditional samples).
"""
from __future__ import annotations

from diffusion_jax import config as cv
from diffusion_jax.models.base import Model, ModelFamily, register_family, sampling_params
from diffusion_jax.models.pixel import network_fields

__all__ = ["DiffusionAutoencoderFamily", "autoencoder_choices", "train_images"]


def autoencoder_choices(config) -> dict:
    """The autoencoder's design with the kind's defaults filled in (DiffAE / DMZ papers)."""
    ae = config.autoencoder
    diffae = ae.kind == "diffae"
    m = config.model
    return {
        "encoder": ae.encoder or ("semantic" if diffae else "conv"),
        "latent": ae.latent or ("continuous" if diffae else "binary"),
        "z_dim": ae.z_dim or (512 if diffae else 16),
        "z_conditioning": tuple(ae.z_conditioning or (("adagn_scale",) if diffae
                                                      else ("cross_attn",))),
        "encoder_ch": ae.encoder_ch or (m.ch if diffae else 32),
        "encoder_ch_mult": tuple(ae.encoder_ch_mult or m.ch_mult),
        "encoder_num_res_blocks": ae.encoder_num_res_blocks or m.num_res_blocks,
        "encoder_attn_resolutions": tuple(ae.encoder_attn_resolutions
                                          if ae.encoder_attn_resolutions is not None
                                          else m.attn_resolutions),
    }


def train_images(config, limit: int = 0):
    """The first `limit` (0: all) train images, float32 (N, H, W, C) in [-1, 1]."""
    from diffusion_jax.data import get_dataset, to_model_input
    d = config.data
    source = get_dataset(d.name, "train", data_dir=d.data_dir, image_size=d.image_size)
    n = len(source) if not limit else min(limit, len(source))
    return to_model_input(source.get_batch(range(n)))["x"]


# The autoencoder fields that fix the train state's pytree and shapes (a checkpoint's structure).
_SHAPING = {"kind": "none", "encoder": None, "latent": None, "z_dim": None, "z_conditioning": None,
            "encoder_ch": None, "encoder_ch_mult": None, "encoder_num_res_blocks": None,
            "encoder_attn_resolutions": None, "norm": "batch", "pool": "mean", "tau_final": None}


@register_family("autoencoder")
class DiffusionAutoencoderFamily(ModelFamily):
    """Encoder + z-conditioned decoder; the latent prior (or latent DDIM) generates."""
    has_encoder = True
    grad_norm_groups = ("encoder", "decoder")

    def check_config(self) -> None:
        if self.config.autoencoder.kind == "none":
            raise cv.ConfigError("config.model.family='autoencoder' needs config.autoencoder.kind "
                                 "'diffae' or 'dmz', got 'none'")
        r = self.config.get("repa", None)
        if r is not None and r.weight > 0:
            raise cv.ConfigError("config.repa.weight > 0 aligns a plain diffusion UNet with a frozen "
                                 "encoder ('pixel' family); this config is an autoencoder")

    def title(self) -> str:
        return {"diffae": "DiffAE", "dmz": "DMZ"}.get(self.config.autoencoder.kind, "Autoencoder")

    @property
    def choices(self) -> dict:
        return autoencoder_choices(self.config)

    # ---------------------------------------------------------------------- assembly
    def build_network(self, image_shape=None):
        from diffusion_jax.autoencoders import ENCODERS, DiffusionAutoencoder
        from diffusion_jax.networks import UNet
        fields, dtype = network_fields(self.config, image_shape)
        ch, ae, m = self.choices, self.config.autoencoder, self.config.model
        if ch["encoder"] == "semantic":
            enc_opts = dict(ch=ch["encoder_ch"], ch_mult=ch["encoder_ch_mult"],
                            num_res_blocks=ch["encoder_num_res_blocks"],
                            attn_resolutions=ch["encoder_attn_resolutions"], dropout=m.dropout,
                            pool=ae.pool)
        else:
            enc_opts = dict(ch=ch["encoder_ch"], norm=ae.norm)
        encoder = ENCODERS[ch["encoder"]](latent=ch["latent"], z_dim=ch["z_dim"], tau=ae.tau,
                                          straight_through=ae.straight_through, dtype=dtype,
                                          **enc_opts)
        decoder = UNet(**fields, z_conditioning=ch["z_conditioning"], dtype=dtype)
        return DiffusionAutoencoder(encoder=encoder, decoder=decoder)

    def apply_fn(self, module):
        from diffusion_jax.autoencoders import decoder_apply_fn
        return decoder_apply_fn(module)

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        return module.init({"params": key}, x0, jnp.zeros((1,), jnp.float32), x0, train=False)

    def objective(self, process, apply_fn, module, *, train: bool = True):
        from diffusion_jax.autoencoders import autoencoder_loss, init_model_state
        cfg, ae = self.config, self.config.autoencoder
        spec = cv.OBJECTIVES[cfg.objective.name]
        if not spec.takes_process:
            raise cv.ConfigError(f"objective {cfg.objective.name!r} cannot train an autoencoder "
                                 f"(config.objective.name)")
        kwargs = dict(cv.kwargs_dict(cfg.objective.kwargs))
        loss = autoencoder_loss(module, process, spec.get_factory(), kl_weight=ae.kl_weight,
                                bit_usage_weight=ae.bit_usage_weight,
                                tau_schedule=(None if ae.tau_final is None else
                                              (ae.tau, ae.tau_final, ae.tau_anneal_steps)),
                                train=train, **kwargs)
        return loss, True, (lambda variables: init_model_state(module, variables, loss))

    @classmethod
    def state_structure(cls, d: dict) -> dict:
        ae = d.get("autoencoder", {}) or {}
        return {"autoencoder": {k: ae.get(k, v) for k, v in _SHAPING.items()}}

    def batch_cond(self, model: Model, lo: int, hi: int, z=None):
        if z is None:
            raise ValueError("generate: an autoencoder's decoder needs z (n, D)")
        return super().batch_cond(model, lo, hi, z)

    # -------------------------------------------------------------------- the encoder
    def encoder_variables(self, model: Model, state, params=None) -> dict:
        """{'params', ['batch_stats']} of the encoder under `params` (default: the sampling (EMA)
        parameters): BatchNorm statistics recomputed for parameters other than the online ones on
        (up to 2 048) train images (`autoencoders.recompute_batch_stats`), since the state's
        running statistics were gathered under the online weights. Cached per state."""
        from diffusion_jax.autoencoders import recompute_batch_stats
        from diffusion_jax.training.state import has_leaves
        params = sampling_params(model, state) if params is None else params
        key = ("encoder_variables", id(state), int(state.step), id(params))
        if key in model.cache:
            return model.cache[key]
        variables = {"params": params}
        stats = state.model_state.get("encoder", {}) if isinstance(state.model_state, dict) else {}
        if has_leaves(stats):
            variables["batch_stats"] = stats
            if params is not state.params:
                variables["batch_stats"] = recompute_batch_stats(
                    model.module, variables, train_images(model.config, 2048))
        model.cache = {k: v for k, v in model.cache.items()
                       if not (isinstance(k, tuple) and k[0] == "encoder_variables")}
        model.cache[key] = variables
        return variables

    def _check_images(self, model: Model, images) -> None:
        shape = tuple(images.shape[1:])
        if shape != tuple(model.image_shape):
            raise cv.ConfigError(f"images of shape {shape} do not fit this autoencoder, which was "
                             f"built for {tuple(model.image_shape)} (config.data.image_size)")

    def encode(self, model: Model, state, images, *, batch_size: int = 256):
        """z (N, D) numpy of `images` (N, H, W, C) with the EMA encoder in evaluation mode (hard
        binary codes, Gaussian means). One compiled function per model and batch shape."""
        import jax
        import numpy as np
        from diffusion_jax.autoencoders import encode_fn
        self._check_images(model, images)
        variables = self.encoder_variables(model, state)
        if "encode" not in model.cache:
            enc = encode_fn(model.module)
            model.cache["encode"] = jax.jit(lambda v, x: enc(v, x, train=False)[0].z)
        fn = model.cache["encode"]
        out = []
        for i in range(0, len(images), batch_size):
            xb = np.asarray(images[i:i + batch_size], np.float32)
            n = len(xb)
            if n < batch_size and len(images) > batch_size:          # one compiled shape
                xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, 0)])
            out.append(np.asarray(fn(variables, xb))[:n])
        return np.concatenate(out)

    def latent_outputs(self, model: Model, state, images) -> dict:
        """The encoder's evaluation output on `images` (one batch): 'z' and, where the latent has
        them, 'logits' (binary) or 'mean' / 'logvar' (Gaussian), as numpy arrays."""
        import jax
        import numpy as np
        from diffusion_jax.autoencoders import encode_fn
        self._check_images(model, images)
        if "encode_full" not in model.cache:
            enc = encode_fn(model.module)
            model.cache["encode_full"] = jax.jit(lambda v, x: {
                k: v_ for k, v_ in enc(v, x, train=False)[0]._asdict().items() if v_ is not None})
        out = model.cache["encode_full"](self.encoder_variables(model, state),
                                         np.asarray(images, np.float32))
        return {k: np.asarray(v) for k, v in out.items()}

    def eval_model_state(self, model: Model, state, params):
        """The encoder's BatchNorm statistics that belong to `params` (recomputed for EMA)."""
        from diffusion_jax.training.state import has_leaves
        ms = state.model_state
        if params is state.params or not (isinstance(ms, dict) and has_leaves(ms.get("encoder", {}))):
            return ms
        return {**ms, "encoder": self.encoder_variables(model, state, params)["batch_stats"]}

    def readout_network(self, model: Model, params, z=None):
        return model.module.decoder, params["decoder"], (None if z is None else {"z": z})

    # ---------------------------------------------------------------------- decoding
    def decoder_eps_fn(self, model: Model):
        """eps_fn(x, t, cond={'z': z, 'params': params}) of the decoder (first C channels), for
        the inference functions of `diffusion_jax.autoencoders`. One per model (compiles once)."""
        if "decoder_eps" not in model.cache:
            base = self.make_eps_fn(model, pair=False)
            model.cache["decoder_eps"] = lambda x, t, cond: base(
                x, t, {"params": cond["params"], "model_cond": {"z": cond["z"]}})
        return model.cache["decoder_eps"]

    def _clip(self) -> bool:
        """config.sample.kwargs.clip_x0: DDIM with x0_hat clipped to [-1, 1] (inverted alike)."""
        return bool(self.config.sample.kwargs.get("clip_x0", False))

    def invert(self, model: Model, state, images, z, *, steps: int, fixed_point_iters: int):
        """x_T = DDIM^{-1}(x0 | z) (`autoencoders.stochastic_encode`), sampling parameters."""
        from diffusion_jax.autoencoders import stochastic_encode
        return stochastic_encode(self.decoder_eps_fn(model), model.process, images, z,
                                 num_steps=steps, fixed_point_iters=fixed_point_iters,
                                 clip_x0=self._clip(), params=sampling_params(model, state))

    def decode(self, model: Model, state, z, *, x_T=None, key=None, steps: int):
        """DDIM decodes of z from x_T, or from fresh noise drawn with `key` when x_T is None."""
        import jax
        import numpy as np
        from diffusion_jax.autoencoders import reconstruct, reconstruct_from_noise
        eps_fn, params, clip = self.decoder_eps_fn(model), sampling_params(model, state), self._clip()
        if x_T is not None:
            return np.asarray(reconstruct(eps_fn, model.process, z, x_T, num_steps=steps,
                                          clip_x0=clip, params=params))
        key = jax.random.PRNGKey(0) if key is None else key
        return np.asarray(reconstruct_from_noise(eps_fn, model.process, z, key, model.image_shape,
                                                 num_steps=steps, clip_x0=clip, params=params))

    def reconstruct(self, model: Model, state, images, z, *, steps: int, fixed_point_iters: int,
                    seed: int = 0) -> dict:
        """Reconstructions of `images` from (z, x_T = DDIM^{-1}(x0 | z)) and from (z, fresh noise),
        with their mean squared errors (per pixel, images in [-1, 1])."""
        import jax
        import numpy as np
        x_t = self.invert(model, state, images, z, steps=steps, fixed_point_iters=fixed_point_iters)
        rec = self.decode(model, state, z, x_T=x_t, steps=steps)
        rec_noise = self.decode(model, state, z, key=jax.random.PRNGKey(seed), steps=steps)
        mse = lambda a: float(np.mean((np.clip(a, -1, 1) - images) ** 2))
        return {"x_T": np.asarray(x_t), "inverted": rec, "noise": rec_noise,
                "mse_inverted": mse(rec), "mse_noise": mse(rec_noise)}

    def interpolate(self, model: Model, state, images_a, images_b, z_a, z_b, *, steps: int,
                    points: int, fixed_point_iters: int):
        """((K, B, H, W, C) decodes along linear-in-z, spherical-in-x_T paths, the K weights)."""
        import numpy as np
        from diffusion_jax.autoencoders import interpolate
        xa = self.invert(model, state, images_a, z_a, steps=steps,
                         fixed_point_iters=fixed_point_iters)
        xb = self.invert(model, state, images_b, z_b, steps=steps,
                         fixed_point_iters=fixed_point_iters)
        w = np.linspace(0.0, 1.0, points)
        return np.asarray(interpolate(self.decoder_eps_fn(model), model.process, (z_a, xa),
                                      (z_b, xb), w, num_steps=steps, clip_x0=self._clip(),
                                      params=sampling_params(model, state))), w

    # -------------------------------------------------------------------- the prior
    @property
    def needs_train_latents(self) -> bool:
        """Continuous latents (conditional samples without a latent DDIM) and the empirical bit
        prior draw on training latents."""
        return (self.choices["latent"] == "continuous"
                or self.config.autoencoder.prior == "empirical")

    def fit_latent_sampler(self, model: Model, train_z, *, log=print):
        """DiffAE's latent DDIM on `train_z` (continuous latents, latent_sampler.num_steps > 0)."""
        ls = self.config.latent_sampler
        if self.choices["latent"] != "continuous" or not ls.num_steps:
            return None
        from diffusion_jax.autoencoders.latent_sampler import train_latent_sampler
        log(f"training the latent DDIM ({ls.num_steps} steps) on {len(train_z)} normalised latents")
        return train_latent_sampler(train_z, {
            "num_layers": ls.num_layers, "hidden": ls.hidden, "batch_size": ls.batch_size,
            "learning_rate": ls.learning_rate, "num_steps": ls.num_steps, "loss": ls.loss,
            "sample_steps": ls.sample_steps, "seed": self.config.train.seed,
            "chunk_steps": min(1000, ls.num_steps)})

    def nfe_per_sample(self) -> float:
        """The decoder's evaluations (config.sample) plus, for continuous latents drawn by DiffAE's
        latent DDIM, its latent_sampler.sample_steps evaluations of the (much smaller) latent MLP."""
        nfe = super().nfe_per_sample()
        ls = self.config.latent_sampler
        if self.config.autoencoder.latent == "continuous" and ls.num_steps > 0:
            nfe += int(ls.sample_steps)
        return nfe

    def generation_latents(self, model: Model, state, n: int, seed: int, *, train_z=None,
                           latent_sampler=None, train_images=None):
        """(z (n, D), description): binary latents from the prior (Bernoulli(1/2), or the per-bit
        frequencies of `train_z` with autoencoder.prior='empirical'), Gaussian ones from N(0, I),
        continuous ones from `latent_sampler` (DiffAE's latent DDIM) when given, else the latents
        of the first n training images (conditional samples; `train_images(k)` -> the first k
        train images is encoded when train_z is not given)."""
        import jax
        import numpy as np
        from diffusion_jax.autoencoders import bit_frequencies, sample_binary_prior
        choice = self.choices
        key = jax.random.PRNGKey(seed)
        if choice["latent"] == "binary":
            probs, what = None, "z ~ Bernoulli(1/2) bits"
            if self.config.autoencoder.prior == "empirical" and train_z is not None:
                probs, what = bit_frequencies(train_z), "z ~ per-bit empirical frequencies"
            return np.asarray(sample_binary_prior(key, n, choice["z_dim"], probs)), what
        if choice["latent"] == "gaussian":
            return np.asarray(jax.random.normal(key, (n, choice["z_dim"]))), "z ~ N(0, I)"
        if latent_sampler is not None:
            return np.asarray(latent_sampler.sample(key, n)), "z from the latent DDIM"
        if train_z is None and train_images is not None:
            train_z = self.encode(model, state, train_images(n))
        if train_z is None:
            raise cv.ConfigError("continuous latents need a latent sampler (config.latent_sampler."
                             "num_steps > 0) or training latents to condition on")
        idx = np.arange(n) % len(train_z)
        return np.asarray(train_z)[idx], "z of training images (conditional samples)"
