"""The 'lsgm' family: a score-based generative model in a VAE's latent space (LSGM; Vahdat, Kreis &
Kautz, NeurIPS 2021; NVlabs/LSGM), trained end to end.

    VAE      networks.AutoencoderKL (config.lsgm: vae_channels, latent_channels, ...): q(z|x) =
             N(mean, diag(exp(logvar))) on spatial latents (H/f, W/f, latent_channels),
             f = 2^(levels - 1); p(x|z): a discretised Gaussian on the 256 pixel levels
             (`objectives.hybrid.discretized_gaussian_log_likelihood`) with mean decode(z) and one
             learned scalar std (init lsgm.decoder_std)
    prior    config.model's UNet on the latents predicts eps'; the mixed score (Sec. 3.2)
                 eps_theta(z_t, t) = (1 - a) sigma_t z_t / (alpha_t^2 + sigma_t^2) + a eps'(z_t, t),
             a = sigmoid(mixing_logit), one learned logit per latent channel (init
             lsgm.mixing_logit_init), `objectives.mixed_score_eps`; the UNet's output layer starts
             at zero, so the untrained prior is (1 - a) times the N(0, I) prior's eps
    process  config.process (a continuous scalar process; the paper's VP SDE beta 0.1 .. 20)

One train step (`training.PhasedLoss`, as NVlabs/LSGM's `train_vada_joint`):

    'vae'    params['vae'] <- Adam step on the negative ELBO, per example (nats)
                 -log p(x|z) + kl_weight (-H[q(z|x)] + CE(q(z|x) || p(z))),   z ~ q(z|x)
             with H in closed form and CE by likelihood-weighted denoising score matching through
             the prior's mixed eps (`objectives.lsgm_cross_entropy`; t from lsgm.time_sampling_q:
             'importance' = ll_iw, 'uniform'); the prior is held (only 'vae' is differentiated)
    'prior'  params['prior'] <- Adam step on `objectives.lsgm_prior_loss` of the (updated) encoder's
             latents z ~ q(z|x), stop-gradient, weighting lsgm.prior_weighting ('eps': the paper's
             re-weighted objective, 'likelihood': the CE estimate)

Per-group optimisers (`optimizer_groups`): 'vae' lr lsgm.vae_lr, Adam eps lsgm.vae_adam_eps, cosine to
lsgm.vae_end_lr_factor; 'prior' lr lsgm.prior_lr, eps lsgm.prior_adam_eps; the rest from config.optim.
For the first lsgm.warmup_vae_steps steps the 'vae' phase uses the N(0, I) prior, -log p(x|z) +
kl_weight KL(q || N(0, I)) in closed form, and the prior's loss is 0 (the paper pre-trains the VAE
with a Normal prior); the step counter lives in TrainState.model_state {'step'}. Both terms are
computed in every step and selected (jnp.where): a lax.cond around the networks' gradients made
XLA:CPU's train step ~40x slower (23.8 s vs 0.63 s on configs/lsgm_digits.py), so warm-up steps cost
as much as the others.

Generation: latents by config.sample's sampler from the process' prior with the mixed eps
(`make_eps_fn` on latents), then the decoder's mean, clipped to [-1, 1].

Likelihood (`nll_bound`): -log P(x) <= E_q[-log P(x|z) + log q(z|x) - log p(z)] with log p(z) the
prior's probability-flow-ODE density at t_min on the latents (`likelihood.pf_ode_log_likelihood`),
one z per example; a discrete P(x|z), so no dequantisation: bits/dim = nats / (D ln 2).

What differs from NVlabs/LSGM: one scale of spatial latents from the KL autoencoder instead of NVAE's
hierarchical groups (the remaining groups' N(0, I) cross entropy, KL balancing, spectral / batch-norm
regularisation, normalising flows are absent); a discretised Gaussian decoder instead of the
discretised logistic mixture; the library's UNet instead of NCSN++; the VAE and prior draw their own
t and noise (official: 'reweight_p_samples' shares them); the 'prior' phase sees the VAE after its
update in the same step; the 'eps' prior objective samples t uniformly (official 'drop_all_iw'
importance-samples t for the same objective); AdamW (decoupled) weight decay; the EMA covers both
groups (official: the prior only).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn

from diffusion_jax import config as cv
from diffusion_jax.models.base import Model, ModelFamily, register_family
from diffusion_jax.models.pixel import network_fields

__all__ = ["LSGMFamily", "LSGMNet", "LSGMVAE", "LSGMPrior", "lsgm_latent_shape"]

# lsgm fields that fix the parameter tree and shapes (a checkpoint's structure)
_SHAPING = {"vae_channels": (32, 64), "vae_layers_per_block": 1, "latent_channels": 2,
            "vae_norm_groups": 8, "vae_mid_attention": False}


class LSGMVAE(nn.Module):
    """AutoencoderKL ('ae') + the decoder's log std ('decoder_log_scale', a learned scalar)."""
    ae: Any
    decoder_std: float = 0.1

    def setup(self):
        self.decoder_log_scale = self.param(
            "decoder_log_scale", nn.initializers.constant(math.log(self.decoder_std)), (), "float32")

    def encode(self, x):
        return self.ae.encode(x)

    def decode(self, z):
        return self.ae.decode(z)

    def log_scale(self):
        return self.decoder_log_scale


class LSGMPrior(nn.Module):
    """The prior's network ('denoiser', eps' on latents) + one mixing logit per latent channel."""
    denoiser: Any
    latent_channels: int
    mixing_logit_init: float = -3.0

    def setup(self):
        self.mixing_logit = self.param("mixing_logit", nn.initializers.constant(self.mixing_logit_init),
                                       (self.latent_channels,), "float32")

    def __call__(self, z, t, cond=None, train: bool = False):
        return self.denoiser(z, t, cond=cond, train=train)

    def logit(self):
        return self.mixing_logit


class LSGMNet(nn.Module):
    """{'vae', 'prior'} in one parameter tree; __call__ is the prior's eps' on latents."""
    vae: Any
    prior: Any

    @property
    def dropout(self) -> float:           # make_apply_fn asks for a dropout key when > 0
        return float(getattr(self.prior.denoiser, "dropout", 0.0))

    def __call__(self, z, t, cond=None, train: bool = False):
        return self.prior(z, t, cond=cond, train=train)

    def encode(self, x):
        """(mean, logvar) of q(z | x)."""
        return self.vae.encode(x)

    def decode(self, z):
        """The decoder's mean, unclipped."""
        return self.vae.decode(z)

    def decoder_log_scale(self):
        return self.vae.log_scale()

    def init_all(self, x, z, t):
        mean, _ = self.vae.encode(x)
        return self.vae.decode(mean), self.vae.log_scale(), self.prior(z, t), self.prior.logit()


def lsgm_latent_shape(config, image_shape) -> tuple:
    """(H / f, W / f, lsgm.latent_channels), f = 2^(len(lsgm.vae_channels) - 1); ConfigError naming
    the fields when the images do not fit the VAE or the latents do not fit the prior's UNet."""
    ls, m = config.lsgm, config.model
    f = 2 ** (len(tuple(ls.vae_channels)) - 1)
    h, w = int(image_shape[0]), int(image_shape[1])
    if h % f or w % f:
        raise cv.ConfigError(f"images of {h}x{w} do not fit the LSGM VAE: config.lsgm.vae_channels has "
                             f"{len(tuple(ls.vae_channels))} levels, so the image side "
                             f"(config.data.image_size) must be a multiple of {f}")
    lh, lw = h // f, w // f
    u = 2 ** (len(tuple(m.ch_mult)) - 1)
    if lh % u or lw % u:
        raise cv.ConfigError(f"the latents ({lh}x{lw}, config.lsgm.vae_channels) do not fit the prior's "
                             f"UNet: config.model.ch_mult has {len(tuple(m.ch_mult))} levels, so the "
                             f"latent side must be a multiple of {u}")
    return lh, lw, int(ls.latent_channels)


def _per_example(a):
    import jax.numpy as jnp
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


@register_family("lsgm")
class LSGMFamily(ModelFamily):
    """LSGM: a Gaussian VAE whose prior is a score-based model on its latents (module docstring)."""
    has_first_stage = True
    grad_norm_groups = ("vae", "prior")

    # ---------------------------------------------------------------------- config
    def check_config(self) -> None:
        from diffusion_jax.processes import PROCESSES
        c, ls = self.config, self.config.lsgm
        if c.autoencoder.kind != "none":
            raise cv.ConfigError(f"config.model.family='lsgm' has its own VAE (config.lsgm); "
                                 f"config.autoencoder.kind must be 'none', got {c.autoencoder.kind!r}")
        if c.model.type != "unet":
            raise cv.ConfigError(f"config.model.type: the LSGM prior is the library's UNet on latents, "
                                 f"got {c.model.type!r}")
        if c.model.num_classes is not None:
            raise cv.ConfigError("config.model.num_classes: the 'lsgm' family is unconditional; "
                                 "leave it unset")
        if c.objective.name != "eps":
            raise cv.ConfigError(f"config.objective.name: the LSGM prior predicts eps' of the mixed "
                                 f"score (its losses are objectives.lsgm's); set 'eps', got "
                                 f"{c.objective.name!r}")
        if c.process.name not in PROCESSES or c.process.name == "ddpm":
            raise cv.ConfigError(f"config.process.name: LSGM needs a continuous scalar process (e.g. "
                                 f"'vp', the paper's VP SDE), got {c.process.name!r}")
        chans = tuple(ls.vae_channels)
        if not chans or any(ch % ls.vae_norm_groups for ch in chans):
            raise cv.ConfigError(f"config.lsgm.vae_channels {chans} must be non-empty multiples of "
                                 f"lsgm.vae_norm_groups={ls.vae_norm_groups}")
        if not 0 <= ls.warmup_vae_steps < c.train.num_steps:
            raise cv.ConfigError(f"config.lsgm.warmup_vae_steps={ls.warmup_vae_steps} must lie in "
                                 f"[0, train.num_steps={c.train.num_steps})")
        if c.data.image_size is not None:
            lsgm_latent_shape(c, (c.data.image_size, c.data.image_size, 1))
        r = c.get("repa", None)
        if r is not None and r.weight > 0:
            raise cv.ConfigError("config.repa.weight > 0 is for the 'pixel' family")
        if c.report.enabled and c.report.probe:
            raise cv.ConfigError("config.report.probe: the readout sweep noises images, but the LSGM "
                                 "prior reads noised latents; set config.report.probe=False")

    def title(self) -> str:
        return "Latent score-based generative model (LSGM)"

    def optimizer_groups(self, base):
        """'vae' and 'prior' with the paper's learning rates and Adam eps (config.lsgm)."""
        import dataclasses
        ls = self.config.lsgm
        return {"vae": dataclasses.replace(base, learning_rate=float(ls.vae_lr), eps=float(ls.vae_adam_eps),
                                           end_lr_factor=float(ls.vae_end_lr_factor)),
                "prior": dataclasses.replace(base, learning_rate=float(ls.prior_lr),
                                             eps=float(ls.prior_adam_eps))}

    # ---------------------------------------------------------------------- assembly
    def latent_shape(self, image_shape) -> tuple:
        return lsgm_latent_shape(self.config, image_shape)

    def build_network(self, image_shape=None):
        from diffusion_jax.networks import UNet
        from diffusion_jax.networks.autoencoder_kl import AutoencoderKL
        if image_shape is None:
            raise ValueError("the lsgm family needs image_shape to build its VAE")
        lat = self.latent_shape(image_shape)
        ls = self.config.lsgm
        fields, dtype = network_fields(self.config, None)
        fields["out_channels"] = lat[-1]
        ae = AutoencoderKL(out_channels=int(image_shape[-1]), block_out_channels=tuple(ls.vae_channels),
                           layers_per_block=int(ls.vae_layers_per_block),
                           latent_channels=int(ls.latent_channels), norm_num_groups=int(ls.vae_norm_groups),
                           mid_block_attention=bool(ls.vae_mid_attention), scaling_factor=1.0)
        return LSGMNet(vae=LSGMVAE(ae=ae, decoder_std=float(ls.decoder_std)),
                       prior=LSGMPrior(denoiser=UNet(**fields, dtype=dtype), latent_channels=lat[-1],
                                       mixing_logit_init=float(ls.mixing_logit_init)))

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        z0 = jnp.zeros((1, *self.latent_shape(image_shape)), jnp.float32)
        return module.init(key, x0, z0, jnp.zeros((1,), jnp.float32), method="init_all")

    @classmethod
    def state_structure(cls, d: dict) -> dict:
        ls = d.get("lsgm", {}) or {}
        return {"lsgm": {k: ls.get(k, v) for k, v in _SHAPING.items()}}

    # ---------------------------------------------------------------------- the model's maths
    def mixed_eps(self, model: Model, params, z_t, t, *, train: bool = False, rng=None):
        """eps_theta(z_t, t) of the prior: `objectives.mixed_score_eps` of the UNet's eps' and
        params['prior']['mixing_logit'] (params: the full tree)."""
        import jax.numpy as jnp
        from diffusion_jax.objectives.lsgm import mixed_score_eps
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],))
        eps_prime = model.apply_fn(params, z_t, t, None, train=train, rng=rng)
        return mixed_score_eps(eps_prime, z_t, t, params["prior"]["mixing_logit"], model.process)

    def make_eps_fn(self, model: Model, *, pair: bool | None = None):
        """eps_fn(z, t, {'params': params}) on latents: the prior's mixed eps."""
        def eps_fn(z, t, cond):
            return self.mixed_eps(model, cond["params"], z, t)
        return eps_fn

    def _posterior(self, model: Model, params, x):
        from diffusion_jax.objectives.vae import DiagonalGaussian
        mean, logvar = model.module.apply({"params": params}, x, method="encode")
        return DiagonalGaussian(mean, logvar)

    def reconstruction_nll(self, model: Model, params, x, z):
        """-log P(x | z) per example (B,), nats: the discretised Gaussian of mean decode(z) and the
        learned scalar std."""
        import jax
        import jax.numpy as jnp
        from diffusion_jax.objectives.hybrid import discretized_gaussian_log_likelihood
        mean = model.module.apply({"params": params}, z, method="decode")
        log_scale = model.module.apply({"params": params}, method="decoder_log_scale")
        if not self.config.lsgm.learn_decoder_std:
            log_scale = jax.lax.stop_gradient(log_scale)
        ll = discretized_gaussian_log_likelihood(jnp.asarray(x, jnp.float32), mean, log_scale)
        return -_per_example(ll), mean

    def vae_terms(self, model: Model, params, x, key, *, train: bool = False, normal_prior=False):
        """Per-example (B,) terms of the negative ELBO, nats: {'rec_nll': -log P(x|z),
        'neg_entropy': -H[q(z|x)] (closed form), 'ce': CE(q(z|x) || p(z)) (the mixed-eps estimate
        of `objectives.lsgm_cross_entropy`, or the closed form against N(0, I) when `normal_prior`),
        'kl': neg_entropy + ce}, z ~ q(z|x) reparameterised (gradients reach the encoder)."""
        import jax
        import jax.numpy as jnp
        from diffusion_jax.objectives.lsgm import lsgm_cross_entropy
        k_z, k_ce, k_drop = jax.random.split(key, 3)
        post = self._posterior(model, params, x)
        z = post.sample(k_z)
        rec, _ = self.reconstruction_nll(model, params, x, z)
        neg_ent = -post.entropy()
        if normal_prior:
            ce = _per_example(0.5 * (math.log(2.0 * math.pi) + jnp.square(post.mean) + post.var))
        else:
            def eps_fn(z_t, t):
                return self.mixed_eps(model, params, z_t, t, train=train,
                                      rng=k_drop if train and model.module.dropout > 0 else None)
            ce, _ = lsgm_cross_entropy(eps_fn, model.process, z, k_ce,
                                       time_sampling=str(self.config.lsgm.time_sampling_q))
        return {"rec_nll": rec, "neg_entropy": neg_ent, "ce": ce, "kl": neg_ent + ce}

    def objective(self, process, apply_fn, module, *, train: bool = True):
        """(PhasedLoss('vae', 'prior'), stateful=True, init_state): see the module docstring.
        Metrics: vae/{loss, nelbo, rec_nll, kl, ce, neg_entropy, nelbo_bpd, decoder_std, mixing},
        prior/{loss}; 'loss' is the VAE phase's (the kl_weight-weighted negative ELBO, nats)."""
        import jax
        import jax.numpy as jnp
        from diffusion_jax.objectives.lsgm import lsgm_prior_loss
        from diffusion_jax.training import Phase, PhasedLoss

        cfg, ls = self.config, self.config.lsgm
        model = Model(config=cfg, family=self, module=module, apply_fn=apply_fn, process=process,
                      prediction="eps", image_shape=(), num_classes=None)
        W = int(ls.warmup_vae_steps)
        kl_weight = float(ls.kl_weight)
        weighting = str(ls.prior_weighting)
        sg = jax.lax.stop_gradient

        def vae_loss(params, batch, rng, model_state):
            x = jnp.asarray(batch["x"], jnp.float32)
            step = jnp.asarray(model_state["step"], jnp.int32)
            frozen = {**params, "prior": sg(params["prior"])}

            out = self.vae_terms(model, frozen, x, rng, train=train)
            if W > 0:   # a select, not lax.cond: XLA:CPU ran the conv gradients in a cond ~40x slower
                post = self._posterior(model, frozen, x)
                ce0 = _per_example(0.5 * (math.log(2.0 * math.pi) + jnp.square(post.mean) + post.var))
                ce = jnp.where(step < W, ce0, out["ce"])
                out = {**out, "ce": ce, "kl": out["neg_entropy"] + ce}
            nelbo = out["rec_nll"] + out["kl"]
            loss = jnp.mean(out["rec_nll"] + kl_weight * out["kl"])
            d = float(math.prod(x.shape[1:]))
            log_scale = module.apply({"params": params}, method="decoder_log_scale")
            aux = {k: jnp.mean(v) for k, v in out.items()}
            aux.update(nelbo=jnp.mean(nelbo), nelbo_bpd=jnp.mean(nelbo) / (d * math.log(2.0)),
                       decoder_std=jnp.exp(log_scale),
                       mixing=jnp.mean(jax.nn.sigmoid(params["prior"]["mixing_logit"])),
                       model_state={"step": step})
            return loss, aux

        def prior_loss(params, batch, rng, model_state):
            x = jnp.asarray(batch["x"], jnp.float32)
            step = jnp.asarray(model_state["step"], jnp.int32)
            k_z, k_loss, k_drop = jax.random.split(rng, 3)

            def trained(p):
                post = self._posterior(model, {**p, "vae": sg(p["vae"])}, x)
                z = sg(post.sample(k_z))

                def eps_fn(z_t, t):
                    return self.mixed_eps(model, p, z_t, t, train=train,
                                          rng=k_drop if train and module.dropout > 0 else None)
                return lsgm_prior_loss(eps_fn, process, z, k_loss, weighting=weighting)[0]

            loss = trained(params)
            if W > 0:
                loss = jnp.where(step < W, 0.0, loss)
            return loss, {"model_state": {"step": step + 1}}

        loss_fn = PhasedLoss((Phase("vae", ("vae",), vae_loss), Phase("prior", ("prior",), prior_loss)),
                             report="vae")

        def init_state(variables):
            return {"step": jnp.zeros((), jnp.int32)}

        return loss_fn, True, init_state

    def readout_network(self, model: Model, params, z=None):
        raise cv.ConfigError("the lsgm family has no readout network for image probes "
                             "(config.report.probe=False)")

    # ---------------------------------------------------------------------- VAE in and out
    def _jitted(self, model: Model, name: str):
        import jax
        if name not in model.cache:
            model.cache[name] = jax.jit(lambda p, a: model.module.apply({"params": p}, a, method=name))
        return model.cache[name]

    def encode_latents(self, model: Model, params, images, *, key=None):
        """z for `images` (N, H, W, C): the posterior mean, or a sample when `key` is given."""
        import jax
        import jax.numpy as jnp
        mean, logvar = self._jitted(model, "encode")(params, jnp.asarray(images, jnp.float32))
        return mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)

    def decode_latents(self, model: Model, params, z):
        """The decoder's mean for latents z, clipped to [-1, 1] (float32 host array)."""
        import jax.numpy as jnp
        import numpy as np
        out = self._jitted(model, "decode")(params, jnp.asarray(z, jnp.float32))
        return np.clip(np.asarray(out, np.float32), -1.0, 1.0)

    def first_stage_reconstructions(self, model: Model, params, images):
        """decode(mean of q(z | x)), in batches of config.sample.batch_size."""
        import numpy as np
        bs = int(self.config.sample.batch_size)
        out = [self.decode_latents(model, params, self.encode_latents(model, params, images[i:i + bs]))
               for i in range(0, len(images), bs)]
        return np.concatenate(out).astype(np.float32)

    def generate(self, model: Model, eps_fn, params, n: int, seed: int, *, z=None,
                 num_steps: int | None = None, sampler: str | None = None):
        """Latents (n, H/f, W/f, c) by config.sample's sampler with the prior's mixed eps (eps_fn:
        `make_eps_fn(model)`; None: made here), decoded to the decoder's mean. (images, None)."""
        import dataclasses

        import numpy as np
        if z is not None:
            raise ValueError("the lsgm family draws its own latent noise; generate takes no z")
        eps_fn = eps_fn or self.make_eps_fn(model)
        lat_model = dataclasses.replace(model, image_shape=self.latent_shape(model.image_shape))
        lat, labels = super().generate(lat_model, eps_fn, params, n, seed, num_steps=num_steps,
                                       sampler=sampler)
        bs = int(self.config.sample.batch_size)
        imgs = [self.decode_latents(model, params, lat[i:i + bs]) for i in range(0, n, bs)]
        return np.concatenate(imgs), labels

    # ---------------------------------------------------------------------- likelihood
    def nll_bound(self, model: Model, params, images, key, *, t_min: float | None = None,
                  **ode_kwargs) -> dict:
        """Per-example upper bound on -log P(x) of 8-bit images (module docstring), one z ~ q(z|x):
        {'bpd', 'nelbo' (nats), 'rec_nll', 'log_q', 'prior_nll' (-log p_ODE(z) at t_min), 'nfe'}
        (host arrays). t_min: the ODE's lowest time (None: the process' t_min); ode_kwargs go to
        `likelihood.pf_ode_log_likelihood` (solver, rtol, atol, divergence, ...)."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from diffusion_jax.likelihood.pf_ode import pf_ode_log_likelihood

        t_min = float(model.process.t_min if t_min is None else t_min)
        cache_key = ("nll_bound", t_min, tuple(sorted(ode_kwargs.items())))
        if cache_key not in model.cache:
            eps_fn = self.make_eps_fn(model)

            @jax.jit
            def run(params, x, key):
                k_z, k_ode = jax.random.split(key)
                post = self._posterior(model, params, x)
                z = post.sample(k_z)
                rec, _ = self.reconstruction_nll(model, params, x, z)
                log_q = -post.nll(z)
                out = pf_ode_log_likelihood(lambda z_, t, c: eps_fn(z_, t, {"params": params}),
                                            model.process, z, key=k_ode, t_min=t_min, **ode_kwargs)
                return rec, log_q, -out.logp, jnp.asarray(out.nfe)

            model.cache[cache_key] = run
        x = jnp.asarray(images, jnp.float32)
        rec, log_q, prior_nll, nfe = (np.asarray(a) for a in model.cache[cache_key](params, x, key))
        nelbo = rec + log_q + prior_nll
        d = float(np.prod(x.shape[1:]))
        return {"bpd": nelbo / (d * math.log(2.0)), "nelbo": nelbo, "rec_nll": rec, "log_q": log_q,
                "prior_nll": prior_nll, "nfe": nfe, "t_min": t_min}

    def image_bits_per_dim(self, model: Model, params, images, key, *, t_min: float | None = None,
                           repeats: int = 1) -> dict:
        """--mode=eval's bits/dim (config.eval.bpd): the mean over `repeats` posterior samples of
        `nll_bound` (each an upper bound on -log2 P(x) / D; no dequantisation: P(x|z) is discrete),
        with its terms in bits/dim: bpd_rec (-log P(x|z)), bpd_log_q, bpd_prior (-log p_ODE(z))."""
        import jax
        import numpy as np
        outs = [self.nll_bound(model, params, images, jax.random.fold_in(key, r), t_min=t_min)
                for r in range(int(repeats))]
        d = float(np.prod(np.shape(images)[1:])) * math.log(2.0)

        def mean(k):
            return float(np.mean([np.mean(o[k]) for o in outs]))

        t = outs[0]["t_min"]
        return {"bpd": mean("bpd"), "bpd_num_examples": int(np.shape(images)[0]), "bpd_t_min": t,
                "bpd_sigma": float(model.process.sigma(np.float32(t))),
                "bpd_rec": mean("rec_nll") / d, "bpd_log_q": mean("log_q") / d,
                "bpd_prior": mean("prior_nll") / d, "bpd_nfe": mean("nfe")}
