"""The 'ddgan' family: the denoising diffusion GAN (Xiao, Kreis & Vahdat, ICLR 2022;
NVlabs/denoising-diffusion-gan train_ddgan.py). Chosen by config.model.family='ddgan'; its settings
are config.ddgan (the official argument names).

    chain      `objectives.ddgan.DDGANSchedule` (T = ddgan.num_timesteps steps, VP betas beta_min..beta_max):
               the pairs (x_t, x_{t+1}) ~ q and the DDPM posterior q(x_t | x_{t+1}, x0)
    generator  G(x_{t+1}, t, z) -> x0' = tanh(UNet(x_{t+1}, t, w(z))), z ~ N(0, I_nz): config.model's
               UNet with w(z) (PixelNorm + MLP mapping network) by AdaGN
               (`networks.ddgan_generator.DDGANGenerator`); fake x'_t ~ q(x_t | x_{t+1}, x0')
    critic     D(x_t, t, x_{t+1}) (`networks.ddgan_discriminator.TimeConditionalDiscriminator`,
               ngf channels times disc_ch_mult)
    loss       a `training.PhasedLoss`, in this order in every train step (as the official loop):
       'disc'  (groups ('discriminator',)): t ~ U{0..T-1}, (x_t, x_{t+1}) ~ q(. | x0),
               softplus(-D(x_t, t, x_{t+1})) + softplus(D(x'_t, t, x_{t+1}))
               + [step % lazy_reg == 0] r1_gamma / 2 E||grad_{x_t} D(x_t, t, x_{t+1})||^2
               (lazy R1 unscaled, as the official code; lazy_reg 0: every step; computed every
               step and masked, since a lax.cond under grad is ~10x slower on XLA:CPU)
       'gen'   (groups ('generator',)), against the discriminator the 'disc' phase just updated, on
               a fresh t, pair and z: softplus(-D(x'_t, t, x_{t+1}))
    optimiser  Adam per network (`optimizer_groups`): lr_g / lr_d, (beta1, beta2) from config.ddgan;
               config.optim's schedule, warm-up, eps, clipping and weight decay apply to both
    generate   x_T ~ N(0, I), then T generator steps (`sampling.ddgan.ddgan_sample`, NFE = T), in
               batches of config.sample.batch_size (config.sample's sampler and num_steps are unused)

Parameters {'generator', 'discriminator'}; config.ema averages both, generation uses the first EMA
copy's generator (paper: EMA 0.9999). model_state {'step'} counts the steps for the lazy R1 (the
'gen' phase advances it). No scalar eps (`scalar_eps = False`, `make_eps_fn` returns None):
config.eval.bpd and config.report.probe are refused at load, and so are SDEdit and model.init_from
(`image_denoiser = False`). Unconditional only.

Differences from the official code: the library's UNet (no FIR resampling, no progressive input;
AdaGN on the second GroupNorm of each ResBlock, not both), the discriminator's layout simplified
(see networks/ddgan_discriminator.py), optax Adam with config.optim's schedule (the official code
anneals both lrs by cosine per epoch to 1e-5).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from diffusion_jax import config as cv
from diffusion_jax.models.base import Model, ModelFamily, register_family
from diffusion_jax.models.pixel import network_fields

__all__ = ["DDGANFamily", "DDGANNet", "ddgan_schedule", "generator_posterior_sample"]

# config.ddgan fields that fix the parameter tree and shapes (a checkpoint's structure)
_SHAPING = {"nz": 100, "z_emb_dim": 256, "n_mlp": 4, "ngf": 64, "disc_ch_mult": (4, 8, 8),
            "t_emb_dim": 256}


class DDGANNet(nn.Module):
    """Generator and discriminator in one parameter tree {'generator', 'discriminator'};
    __call__ is the generator G(x_{t+1}, t, z) -> x0'."""
    generator: Any
    discriminator: Any

    @property
    def dropout(self) -> float:
        return float(getattr(self.generator.unet, "dropout", 0.0))

    def __call__(self, x, t, z, train: bool = False):
        return self.generator(x, jnp_float(t), z, train=train)

    def discriminate(self, x_t, t, x_tp1):
        """D(x_t, t, x_{t+1}): (B,) float32 logits."""
        return self.discriminator(x_t, t, x_tp1)

    def init_all(self, x, t, z):
        return self.generator(x, jnp_float(t), z), self.discriminator(x, t, x)


def jnp_float(t):
    import jax.numpy as jnp
    return jnp.asarray(t, jnp.float32)


def ddgan_schedule(config):
    """The DDGANSchedule of config.ddgan."""
    from diffusion_jax.objectives.ddgan import DDGANSchedule
    d = config.ddgan
    return DDGANSchedule(num_steps=int(d.num_timesteps), beta_min=float(d.beta_min),
                         beta_max=float(d.beta_max), geometric=bool(d.use_geometric))


def generator_posterior_sample(module, schedule, params, x_tp1, t, key, *, nz: int,
                               dropout: bool = False):
    """The generator's x_t: x'_t ~ q(x_t | x_{t+1}, x0'), x0' = G(x_{t+1}, t, z), z ~ N(0, I_nz)
    (what the discriminator sees as fake; `sampling.ddgan.ddgan_sample` takes the same steps).
    dropout: the generator in train mode (its dropout key from `key`)."""
    import jax
    import jax.numpy as jnp
    kz, kn, kd = jax.random.split(key, 3)
    z = jax.random.normal(kz, (x_tp1.shape[0], nz), jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    if dropout:
        x0 = module.apply({"params": params}, x_tp1, t, z, train=True, rngs={"dropout": kd})
    else:
        x0 = module.apply({"params": params}, x_tp1, t, z)
    return schedule.sample_posterior(x0, x_tp1, t, kn)


@register_family("ddgan")
class DDGANFamily(ModelFamily):
    """Denoising diffusion GAN: a T-step chain whose reverse steps are a conditional GAN."""
    image_denoiser = False
    scalar_eps = False
    grad_norm_groups = ("generator", "discriminator")

    def check_config(self) -> None:
        c, d = self.config, self.config.ddgan
        if c.autoencoder.kind != "none":
            raise cv.ConfigError(f"config.model.family='ddgan' has no encoder; config.autoencoder.kind "
                                 f"must be 'none', got {c.autoencoder.kind!r}")
        if c.model.type != "unet":
            raise cv.ConfigError(f"config.model.family='ddgan': the generator is a UNet; "
                                 f"config.model.type must be 'unet', got {c.model.type!r}")
        if c.model.num_classes is not None:
            raise cv.ConfigError("config.model.num_classes: the 'ddgan' family is unconditional; "
                                 "leave it unset")
        if c.optim.grad_accum != 1:
            raise cv.ConfigError(f"config.optim.grad_accum={c.optim.grad_accum}: the 'ddgan' family "
                                 f"updates discriminator and generator in turn every step (use 1)")
        r = c.get("repa", None)
        if r is not None and r.weight > 0:
            raise cv.ConfigError("config.repa.weight > 0 is for the 'pixel' family")
        if not d.beta_min < d.beta_max:
            raise cv.ConfigError(f"config.ddgan.beta_max={d.beta_max} must exceed "
                                 f"config.ddgan.beta_min={d.beta_min}")
        mult = tuple(d.disc_ch_mult)
        if not mult or any(int(m) < 1 for m in mult):
            raise cv.ConfigError(f"config.ddgan.disc_ch_mult={mult} must be a non-empty tuple of "
                                 f"positive channel multipliers")
        b = int(c.data.batch_size)
        if b % min(4, b):
            raise cv.ConfigError(f"config.data.batch_size={b}: the discriminator's minibatch standard "
                                 f"deviation takes groups of 4 examples; use a multiple of 4")
        if c.data.image_size is not None:
            self.check_image_size(int(c.data.image_size), int(c.data.image_size))

    def check_image_size(self, h: int, w: int) -> None:
        """ConfigError naming config.data.image_size when the generator or the critic cannot take
        h x w images: the UNet halves them len(model.ch_mult) - 1 times, the critic
        len(ddgan.disc_ch_mult) times."""
        c = self.config
        fg = 2 ** (len(tuple(c.model.ch_mult)) - 1)
        fd = 2 ** len(tuple(c.ddgan.disc_ch_mult))
        for f, what in ((fg, f"the generator's UNet (config.model.ch_mult has "
                             f"{len(tuple(c.model.ch_mult))} levels)"),
                        (fd, f"the discriminator (config.ddgan.disc_ch_mult has "
                             f"{len(tuple(c.ddgan.disc_ch_mult))} down blocks)")):
            if h % f or w % f:
                raise cv.ConfigError(f"images of {h}x{w} do not fit {what}: the image side must be a "
                                     f"multiple of {f} (config.data.image_size)")

    def title(self) -> str:
        return "Denoising diffusion GAN (DDGAN)"

    def sampler_description(self) -> str:
        return f"DDGAN, T = {int(self.config.ddgan.num_timesteps)} generator steps"

    def nfe_per_sample(self) -> float:
        """One generator evaluation per step of the T-step chain (config.ddgan.num_timesteps);
        config.sample's sampler and steps do not apply."""
        return float(int(self.config.ddgan.num_timesteps))

    def schedule(self):
        return ddgan_schedule(self.config)

    def posterior_sample(self, model: Model, params, x_tp1, t, key):
        """x'_t ~ q(x_t | x_{t+1}, G(x_{t+1}, t, z)): one generator step (`generator_posterior_sample`)."""
        return generator_posterior_sample(model.module, self.schedule(), params, x_tp1, t, key,
                                          nz=int(self.config.ddgan.nz))

    def optimizer_groups(self, base):
        """Adam per network: lr_g / lr_d and (beta1, beta2) of config.ddgan on top of `base`."""
        import dataclasses
        d = self.config.ddgan
        betas = dict(b1=float(d.beta1), b2=float(d.beta2))
        return {"discriminator": dataclasses.replace(base, learning_rate=float(d.lr_d), **betas),
                "generator": dataclasses.replace(base, learning_rate=float(d.lr_g), **betas)}

    # ---------------------------------------------------------------------- assembly
    def build_network(self, image_shape=None):
        from diffusion_jax.networks import UNet
        from diffusion_jax.networks.ddgan_discriminator import TimeConditionalDiscriminator
        from diffusion_jax.networks.ddgan_generator import DDGANGenerator
        if image_shape is None:
            raise ValueError("the ddgan family needs image_shape (its output has the images' channels)")
        self.check_image_size(int(image_shape[0]), int(image_shape[1]))
        d = self.config.ddgan
        fields, dtype = network_fields(self.config, None)
        fields.update(out_channels=int(image_shape[-1]), z_conditioning=("adagn_scale_shift",))
        gen = DDGANGenerator(unet=UNet(**fields, dtype=dtype), nz=int(d.nz),
                             z_emb_dim=int(d.z_emb_dim), n_mlp=int(d.n_mlp), use_tanh=bool(d.use_tanh))
        disc = TimeConditionalDiscriminator(ch=int(d.ngf), ch_mult=tuple(int(m) for m in d.disc_ch_mult),
                                            t_dim=int(d.t_emb_dim))
        return DDGANNet(generator=gen, discriminator=disc)

    def apply_fn(self, module):
        """G as the library's network signature: apply_fn(params, x_{t+1}, t, {'z': z}) -> x0'."""
        def apply(params, x, t, cond=None, **kw):
            return module.apply({"params": params}, x, t, (cond or {})["z"])
        return apply

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        return module.init(key, jnp.zeros((1, h, w, c), jnp.float32), jnp.zeros((1,), jnp.int32),
                           jnp.zeros((1, int(self.config.ddgan.nz)), jnp.float32), method="init_all")

    def objective(self, process, apply_fn, module, *, train: bool = True):
        """(PhasedLoss('disc' then 'gen'), stateful, init_model_state): see the module docstring.
        Metrics: disc/{loss, d_real, d_fake, r1}, gen/{loss, d_fake} (mean logits)."""
        import jax
        import jax.numpy as jnp
        from diffusion_jax.objectives.ddgan import discriminator_loss, generator_loss, r1_penalty
        from diffusion_jax.training import Phase, PhasedLoss

        d = self.config.ddgan
        sched = self.schedule()
        T, nz = sched.num_steps, int(d.nz)
        gamma, lazy = float(d.r1_gamma), int(d.lazy_reg)
        drop = train and module.dropout > 0
        sg = jax.lax.stop_gradient

        def D(params, x_t, t, x_tp1):
            return module.apply({"params": params}, x_t, t, x_tp1, method="discriminate")

        def real_pairs(batch, key):
            x0 = jnp.asarray(batch["x"], jnp.float32)
            kt, kq = jax.random.split(key)
            t = jax.random.randint(kt, (x0.shape[0],), 0, T, jnp.int32)
            x_t, x_tp1 = sched.q_sample_pairs(x0, t, kq)
            return t, x_t, x_tp1

        def fake(params, x_tp1, t, key):
            return generator_posterior_sample(module, sched, params, x_tp1, t, key, nz=nz,
                                              dropout=drop)

        def d_loss(params, batch, rng, model_state):
            k_pair, k_fake = jax.random.split(rng)
            t, x_t, x_tp1 = real_pairs(batch, k_pair)
            d_real = D(params, x_t, t, x_tp1)
            x_fake = sg(fake(params, x_tp1, t, k_fake))
            d_fake = D(params, x_fake, t, x_tp1)

            def r1():
                return r1_penalty(lambda x: D(params, x, t, x_tp1), x_t, gamma=gamma)

            zero = jnp.zeros((), jnp.float32)
            if gamma == 0:
                reg = zero
            elif lazy <= 1:
                reg = r1()
            else:
                step = jnp.asarray(model_state["step"], jnp.int32)
                # jnp.where, not lax.cond: XLA:CPU ran R1's conv gradients inside a cond under grad
                # ~10x slower (12.7 s vs 1.35 s a digits step); R1 is computed and masked every step
                reg = jnp.where(step % lazy == 0, r1(), zero)
            loss = discriminator_loss(d_real, d_fake) + reg
            return loss, {"d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake), "r1": reg,
                          "model_state": model_state}

        def g_loss(params, batch, rng, model_state):
            k_pair, k_fake = jax.random.split(rng)
            t, _, x_tp1 = real_pairs(batch, k_pair)
            d_fake = D(params, fake(params, x_tp1, t, k_fake), t, x_tp1)
            step = jnp.asarray(model_state["step"], jnp.int32)
            return generator_loss(d_fake), {"d_fake": jnp.mean(d_fake),
                                            "model_state": {"step": step + 1}}

        loss_fn = PhasedLoss((Phase("disc", ("discriminator",), d_loss),
                              Phase("gen", ("generator",), g_loss)), report="gen")

        def init_state(variables):
            return {"step": jnp.zeros((), jnp.int32)}

        return loss_fn, True, init_state

    def make_loss_fn(self, model: Model, *, train: bool = True):
        """The PhasedLoss (no label dropout: unconditional)."""
        return model.loss_fn if train else self.objective(model.process, model.apply_fn,
                                                          model.module, train=False)[0]

    @classmethod
    def state_structure(cls, d: dict) -> dict:
        g = d.get("ddgan", {}) or {}
        out = {k: g.get(k, v) for k, v in _SHAPING.items()}
        out["disc_ch_mult"] = [int(m) for m in out["disc_ch_mult"]]
        return {"ddgan": out}

    def readout_network(self, model: Model, params, z=None):
        raise cv.ConfigError("the 'ddgan' family has no readout network: its generator predicts x0 "
                             "from the T-step chain, the readout sweep noises images with a scalar "
                             "process (config.report.probe=False)")

    # ---------------------------------------------------------------------- sampling
    def make_eps_fn(self, model: Model, *, pair: bool | None = None):
        """None: DDGAN has no eps; `generate` runs the generator chain."""
        return None

    def _sampler(self, model: Model, batch: int):
        """jit(params, key) -> (x, nonfinite_step): x_T ~ N(0, I) then `ddgan_sample` (cached)."""
        import jax
        import jax.numpy as jnp
        from diffusion_jax.sampling.ddgan import ddgan_sample

        cache_key = ("ddgan_sample", batch)
        if cache_key not in model.cache:
            sched, nz = self.schedule(), int(self.config.ddgan.nz)
            module, shape = model.module, (batch, *model.image_shape)

            def run(params, key):
                k_x, k_s = jax.random.split(key)
                x_T = jax.random.normal(k_x, shape, jnp.float32)
                out = ddgan_sample(lambda x, t, z, c: module.apply({"params": params}, x, t, z),
                                   sched, x_T, k_s, latent_dim=nz)
                return out.x, out.nonfinite_step

            model.cache[cache_key] = jax.jit(run)
        return model.cache[cache_key]

    def generate(self, model: Model, eps_fn, params, n: int, seed: int, *, z=None,
                 num_steps: int | None = None, sampler: str | None = None):
        """n images from x_T ~ N(0, I) by T generator steps (NFE = T), in batches of
        config.sample.batch_size; eps_fn is ignored (None). Returns (x, None)."""
        import jax
        import numpy as np
        from diffusion_jax.training import to_host

        T = int(self.config.ddgan.num_timesteps)
        if z is not None:
            raise ValueError("the ddgan family draws its own latents; generate takes no z")
        if num_steps is not None and int(num_steps) != T:
            raise ValueError(f"the ddgan generator is trained for T = {T} steps "
                             f"(config.ddgan.num_timesteps); got num_steps={num_steps}")
        if sampler not in (None, "ddgan"):
            raise ValueError(f"the ddgan family samples by its generator chain; got sampler={sampler!r}")
        bs = int(self.config.sample.batch_size)
        key = jax.random.PRNGKey(seed)
        xs, done = [], 0
        while done < n:
            b = min(bs, n - done)
            x, _ = self._sampler(model, b)(params, jax.random.fold_in(key, done))
            xs.append(np.asarray(to_host(x), np.float32))
            done += b
        return np.concatenate(xs), None
