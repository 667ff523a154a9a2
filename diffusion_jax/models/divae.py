"""The 'divae' family: DiVAE (Shi et al. 2022, arXiv 2206.00386), a VQ-VAE whose decoder is a
denoising diffusion model conditioned on the quantised latents.

    encoder       networks.autoencoder_kl.VAEEncoder (config.vq: levels, res blocks), x (H, W, C) ->
                  z_e (H/f, W/f, code_dim), f = 2^(levels - 1)
    quantiser     networks.vq.VectorQuantizer: z_q = e_{k(z_e)}, k(z) = argmin_k ||z - e_k||^2,
                  straight-through z_st = z_e + sg(z_q - z_e); codebook (K, D) by EMA (vq.ema_decay,
                  Razavi et al. 2019) with dead-code restarts (vq.dead_after), or learned by the
                  codebook loss (ema_decay None); code usage and perplexity in the train metrics
    deterministic networks.autoencoder_kl.VAEDecoder, z_q -> x: the VQ-VAE's decoder, trained with the
    decoder       encoder, and the baseline the diffusion decoder is measured against (same codes)
    diffusion     config.model's UNet on concat(x_t, up(z_q)) (`CodeConditionedUNet`): z_q nearest-
    decoder       upsampled by f to the image size and concatenated to the noisy image as extra input
                  channels; vq.conditioning='concat+time' also adds W mean_hw(z_q) to the time
                  embedding (the UNet's 'time_add' z conditioning). config.objective / config.process.

DiVAE's paper (no public code) builds the diffusion decoder from the ADM / DDPM UNet and inserts the
image embedding by "a simple modification" of the UNet, of which it compares several; the variant
implemented here is the input concatenation of the upsampled codes (as SR3 / Palette condition on an
image), optionally with the pooled codes in the time embedding. We could not check the paper's
exact choice (its text beyond the abstract was not available to us): treat this as our reading.

Two stages in one run of train.num_steps (as models/latent.py):

    steps < vq.steps   VQ-VAE:  ||D_det(z_st) - x||^2 (mean) + beta ||z_e - sg(z_q)||^2 (mean)
                       [+ ||sg(z_e) - z_q||^2 without EMA]; the EMA codebook updates in
                       model_state['vq_stats'] (cluster size, embedding sums, codebook, unused
                       counters); the diffusion decoder gets no gradient
    afterwards         diffusion decoder: config.objective on (x0, z_q(x0)) with the VQ frozen: the
                       VQ parameters as they were after vq.steps updates are kept in
                       model_state['vq'] (every later encoding uses that copy and the frozen
                       codebook; params['vq'] gets zero gradients through stop-gradient)

TrainState.model_state = {'step', 'vq' (the VQ parameters, frozen after vq.steps), 'vq_stats' (the
EMA codebook; {} without EMA)}. Encoding after training therefore needs the train state: the
family remembers the frozen VQ from `generation_latents(model, state, ...)` (which training and the
report call first) or `use_train_state(model, state)`.

`generate`: DiVAE has no prior over codes in our scope (the paper pairs it with an autoregressive
transformer); generation decodes the code maps of random training images (the 'empirical' choice
DiffAE's latent prior also offers) with the diffusion decoder (config.sample's sampler).
`first_stage_reconstructions`: the diffusion decoder's reconstructions from the codes of the images;
`first_stage_report` adds the deterministic decoder's from the same codes and the codes' usage /
perplexity.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from diffusion_jax import config as cv
from diffusion_jax.models.base import Model, ModelFamily, register_family
from diffusion_jax.models.pixel import network_fields

__all__ = ["DiVAE", "DiVAENet", "VQAutoencoder", "CodeConditionedUNet", "code_shape"]

# vq fields that fix the parameter tree, the model state and shapes (a checkpoint's structure)
_SHAPING = {"num_codes": 64, "code_dim": 4, "ema_decay": 0.99, "block_out_channels": (32, 64),
            "layers_per_block": 1, "norm_num_groups": 8, "mid_attention": False,
            "decoder_channels": None, "conditioning": "concat"}


def upsample_codes(zq, factor: int):
    """Nearest-neighbour upsampling (B, h, w, D) -> (B, h f, w f, D)."""
    import jax.numpy as jnp
    return jnp.repeat(jnp.repeat(zq, factor, axis=1), factor, axis=2)


class VQAutoencoder(nn.Module):
    """Encoder -> VectorQuantizer -> deterministic decoder (the VQ-VAE, all outputs float32)."""
    out_channels: int
    num_codes: int
    code_dim: int
    beta: float = 0.25
    ema_decay: Any = 0.99
    dead_after: Any = None
    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_attention: bool = False
    decoder_channels: Any = None           # None: block_out_channels

    def setup(self):
        from diffusion_jax.networks.autoencoder_kl import VAEDecoder, VAEEncoder
        from diffusion_jax.networks.vq import VectorQuantizer
        arch = dict(block_out_channels=tuple(self.block_out_channels),
                    layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                    mid_attention=self.mid_attention)
        self.encoder = VAEEncoder(self.code_dim, **arch)
        self.quantizer = VectorQuantizer(num_codes=self.num_codes, dim=self.code_dim, beta=self.beta,
                                         ema_decay=self.ema_decay, dead_after=self.dead_after)
        dec = {**arch, "block_out_channels": tuple(self.decoder_channels or self.block_out_channels)}
        self.decoder = VAEDecoder(self.out_channels, **dec)

    def encode(self, x):
        """z_e (B, h, w, code_dim) float32, before quantisation."""
        import jax.numpy as jnp
        return self.encoder(x).astype(jnp.float32)

    def quantize(self, z, train: bool = False):
        """(z_st, aux) of networks.vq.VectorQuantizer (EMA update when train and 'vq_stats' mutable)."""
        return self.quantizer(z, train=train)

    def decode(self, zq):
        import jax.numpy as jnp
        return self.decoder(zq).astype(jnp.float32)

    def codes(self, x):
        """(z_q = e_k exactly (rows of the codebook), indices) of images x, no state change."""
        import jax.numpy as jnp
        _, aux = self.quantizer(self.encode(x), train=False)
        v = self.quantizer.variables
        e = v["vq_stats"]["codebook"] if "vq_stats" in v else v["params"]["codebook"]
        return jnp.take(jnp.asarray(e, jnp.float32), aux["indices"], axis=0), aux["indices"]

    def __call__(self, x, train: bool = False):
        """(D_det(z_st), z_e, z_st, aux): the VQ-VAE forward pass."""
        z = self.encode(x)
        z_st, aux = self.quantizer(z, train=train)
        return self.decode(z_st), z, z_st, aux


class CodeConditionedUNet(nn.Module):
    """eps(x_t, t | z_q) = UNet(concat(x_t, up_f(z_q)), t [, W mean_hw(z_q)]): cond['zq']
    (B, h, w, D) with H = f h; other cond keys go to the UNet."""
    unet: Any
    pooled: bool = False

    @property
    def dropout(self) -> float:           # make_apply_fn asks for a dropout key when > 0
        return float(getattr(self.unet, "dropout", 0.0))

    def __call__(self, x, t, cond=None, train: bool = False):
        import jax.numpy as jnp
        cond = dict(cond or {})
        zq = cond.pop("zq", None)
        if zq is None:
            raise ValueError("the DiVAE decoder needs the quantised latents as cond['zq'] "
                             "(B, h, w, code_dim)")
        if zq.ndim != 4 or x.shape[1] % zq.shape[1] or x.shape[2] % zq.shape[2] or (
                x.shape[1] // zq.shape[1] != x.shape[2] // zq.shape[2]) or zq.shape[0] != x.shape[0]:
            raise ValueError(f"cond['zq'] of shape {tuple(zq.shape)} does not fit images of shape "
                             f"{tuple(x.shape)}: a code map (B, H/f, W/f, code_dim) is needed")
        f = x.shape[1] // zq.shape[1]
        h = jnp.concatenate([x, upsample_codes(zq.astype(x.dtype), f)], axis=-1)
        if self.pooled:
            cond["z"] = jnp.mean(zq.astype(jnp.float32), axis=(1, 2))
        return self.unet(h, t, cond=cond or None, train=train)


class DiVAENet(nn.Module):
    """VQ-VAE + diffusion decoder in one parameter tree {'vq', 'decoder'}; __call__ is the
    diffusion decoder (the library's network signature, cond {'zq'})."""
    vq: Any
    decoder: Any

    @property
    def dropout(self) -> float:
        return float(getattr(self.decoder, "dropout", 0.0))

    def __call__(self, x, t, cond=None, train: bool = False):
        return self.decoder(x, t, cond=cond, train=train)

    def vq_forward(self, x, train: bool = False):
        return self.vq(x, train=train)

    def codes(self, x):
        return self.vq.codes(x)

    def encode(self, x):
        return self.vq.encode(x)

    def decode_det(self, zq):
        return self.vq.decode(zq)

    def init_all(self, x, t):
        rec, _, z_st, _ = self.vq(x)
        return rec, self.decoder(x, t, cond={"zq": z_st})


def code_shape(config, image_shape) -> tuple:
    """(H / f, W / f, code_dim), f = 2^(levels - 1); ConfigError when H, W do not divide."""
    v = config.vq
    levels = len(tuple(v.block_out_channels))
    f = 2 ** (levels - 1)
    h, w = int(image_shape[0]), int(image_shape[1])
    if h % f or w % f:
        raise cv.ConfigError(f"images of {h}x{w} do not fit the VQ encoder: config.vq."
                             f"block_out_channels has {levels} levels, so the image side must be a "
                             f"multiple of {f} (config.data.image_size)")
    return h // f, w // f, int(v.code_dim)


@register_family("divae")
class DiVAE(ModelFamily):
    """DiVAE: VQ-VAE with a diffusion decoder (see the module docstring)."""
    grad_norm_groups = ("vq", "decoder")
    has_first_stage = True

    def check_config(self) -> None:
        c = self.config
        v = c.vq
        if c.autoencoder.kind != "none":
            raise cv.ConfigError(f"config.model.family='divae' has its own encoder (config.vq); "
                                 f"config.autoencoder.kind must be 'none', got {c.autoencoder.kind!r}")
        if not 1 <= v.steps < c.train.num_steps:
            raise cv.ConfigError(f"config.vq.steps={v.steps} must lie in [1, train.num_steps="
                                 f"{c.train.num_steps}): the VQ-VAE trains for that many steps, the "
                                 f"diffusion decoder for the rest")
        if v.num_codes < 2:
            raise cv.ConfigError(f"config.vq.num_codes={v.num_codes}: a codebook of fewer than 2 codes "
                                 f"gives the decoder no information")
        if v.ema_decay is not None and not 0.0 <= v.ema_decay < 1.0:
            raise cv.ConfigError(f"config.vq.ema_decay={v.ema_decay} must lie in [0, 1) (None: "
                                 f"codebook learned by the codebook loss)")
        if v.ema_decay is None and v.dead_after is not None:
            raise cv.ConfigError("config.vq.dead_after restarts codes of the EMA codebook; set "
                                 "config.vq.dead_after=None when config.vq.ema_decay is None")
        chans = tuple(v.block_out_channels)
        if not chans or any(ch % v.norm_num_groups for ch in chans):
            raise cv.ConfigError(f"config.vq.block_out_channels {chans} must be non-empty multiples "
                                 f"of config.vq.norm_num_groups={v.norm_num_groups}")
        dch = None if v.decoder_channels is None else tuple(v.decoder_channels)
        if dch is not None and (len(dch) != len(chans) or any(ch % v.norm_num_groups for ch in dch)):
            raise cv.ConfigError(f"config.vq.decoder_channels {dch} must have as many levels as "
                                 f"config.vq.block_out_channels {chans} (the same code map side) "
                                 f"and be multiples of config.vq.norm_num_groups={v.norm_num_groups}")
        side = int(c.data.image_size)
        h, _, _ = code_shape(c, (side, side, 1))
        if c.model.type != "unet":
            raise cv.ConfigError(f"the DiVAE decoder concatenates the upsampled codes to a UNet's "
                                 f"input; config.model.type must be 'unet', got {c.model.type!r}")
        down = 2 ** (len(tuple(c.model.ch_mult)) - 1)
        if side % down:
            raise cv.ConfigError(f"config.model.ch_mult {tuple(c.model.ch_mult)} halves the "
                                 f"{side}x{side} images {len(tuple(c.model.ch_mult)) - 1} times; "
                                 f"config.data.image_size must be a multiple of {down}")
        if c.model.num_classes is not None:
            raise cv.ConfigError("config.model.num_classes: the DiVAE decoder is conditioned on the "
                                 "codes alone; set it to None")
        if c.objective.name == "hybrid":
            raise cv.ConfigError("config.objective.name='hybrid' (learned variance) is not supported "
                                 "by the divae family")
        if not cv.OBJECTIVES[c.objective.name].takes_process:
            raise cv.ConfigError(f"objective {c.objective.name!r} cannot train the DiVAE decoder "
                                 f"(config.objective.name)")
        r = c.get("repa", None)
        if r is not None and r.weight > 0:
            raise cv.ConfigError("config.repa.weight > 0 is for the 'pixel' family")
        if c.report.enabled and c.report.probe:
            raise cv.ConfigError("config.report.probe: the readout sweep runs the denoiser without "
                                 "codes; set config.report.probe=False")

    def title(self) -> str:
        return "DiVAE (VQ-VAE with a diffusion decoder)"

    def sampler_description(self) -> str:
        s = self.config.sample
        return (f"diffusion decoder, {s.sampler}, {s.num_steps} steps, from the code maps of random "
                f"training images (empirical codes; DiVAE has no code prior here)")

    # ---------------------------------------------------------------------- assembly
    def code_shape(self, image_shape) -> tuple:
        return code_shape(self.config, image_shape)

    def build_network(self, image_shape=None):
        from diffusion_jax.networks import UNet
        if image_shape is None:
            raise ValueError("the divae family needs image_shape to build its VQ-VAE")
        self.code_shape(image_shape)
        v = self.config.vq
        vq = VQAutoencoder(out_channels=int(image_shape[-1]), num_codes=int(v.num_codes),
                           code_dim=int(v.code_dim), beta=float(v.beta),
                           ema_decay=None if v.ema_decay is None else float(v.ema_decay),
                           dead_after=None if v.dead_after is None else int(v.dead_after),
                           block_out_channels=tuple(v.block_out_channels),
                           layers_per_block=int(v.layers_per_block),
                           norm_num_groups=int(v.norm_num_groups), mid_attention=bool(v.mid_attention),
                           decoder_channels=None if v.decoder_channels is None
                           else tuple(v.decoder_channels))
        fields, dtype = network_fields(self.config, image_shape)
        pooled = v.conditioning == "concat+time"
        fields = {**fields, "out_channels": int(image_shape[-1]),
                  "z_conditioning": ("time_add",) if pooled else ()}
        unet = UNet(**fields, dtype=dtype)
        return DiVAENet(vq=vq, decoder=CodeConditionedUNet(unet=unet, pooled=pooled))

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        return module.init(key, x0, jnp.zeros((1,), jnp.float32), method="init_all")

    def objective(self, process, apply_fn, module, *, train: bool = True):
        """The two-stage loss `loss_fn(params, batch, rng, model_state)` (module docstring); aux:
        vq_loss, rec_mse, commitment, codebook_loss, perplexity, usage, restarted (codes restarted
        this step), diffusion_loss (0 in the other stage)."""
        import jax
        import jax.numpy as jnp
        from flax.core import unfreeze
        from diffusion_jax import quantization as Q

        cfg, v = self.config, self.config.vq
        base = cv.build_objective(cfg, process, apply_fn, train=train)
        if getattr(base, "stateful", False):
            raise cv.ConfigError(f"the divae family needs a stateless objective; "
                                 f"{cfg.objective.name!r} with its options keeps a state")
        K = int(v.steps)
        num_codes = int(v.num_codes)
        dead_after = None if v.dead_after is None or v.ema_decay is None else int(v.dead_after)
        sg = jax.lax.stop_gradient
        tmap = jax.tree_util.tree_map
        f32 = jnp.float32

        def loss_fn(params, batch, rng, model_state):
            x = jnp.asarray(batch["x"], f32)
            k_vq, k_base = jax.random.split(rng)
            step = jnp.asarray(model_state["step"], jnp.int32)
            stats = unfreeze(model_state["vq_stats"])
            zero = jnp.zeros((), f32)
            # the VQ as the diffusion stage uses it: the live parameters up to step K, then frozen
            frozen = tmap(lambda a, b: jnp.where(step <= K, sg(a), b), params["vq"], model_state["vq"])

            def vq_stage(p):
                variables = {"params": p}
                if stats:
                    variables["vq_stats"] = stats
                (rec, _, _, aux), upd = module.apply(
                    variables, x, train=True, method="vq_forward", mutable=["vq_stats"],
                    rngs={"vq": k_vq})
                rec_mse = jnp.mean(jnp.square(rec - x))
                loss = rec_mse + aux["loss"]
                new_stats = unfreeze(upd.get("vq_stats", stats)) if stats else stats
                restarted = zero
                if dead_after is not None:
                    old = stats["vq"]["quantizer"]["unused"]
                    unused = Q.count_unused(old, Q.code_counts(aux["indices"], num_codes))
                    restarted = jnp.sum(unused >= dead_after).astype(f32)
                return loss, ({"vq_loss": loss, "rec_mse": rec_mse,
                               "commitment": aux["commitment_loss"],
                               "codebook_loss": aux["codebook_loss"],
                               "perplexity": aux["perplexity"], "usage": aux["usage"],
                               "restarted": restarted, "diffusion_loss": zero}, new_stats)

            def diffusion_stage(p):
                variables = {"params": {"vq": frozen}}
                if stats:
                    variables["vq_stats"] = stats
                zq, idx = module.apply(variables, x, method="codes")
                cond = dict(batch.get("cond") or {})
                cond["zq"] = sg(zq)
                loss, _ = base({**p, "vq": sg(p["vq"])}, {**batch, "cond": cond}, k_base)
                return loss, ({"vq_loss": zero, "rec_mse": zero, "commitment": zero,
                               "codebook_loss": zero,
                               "perplexity": Q.perplexity(idx, num_codes),
                               "usage": Q.code_usage(idx, num_codes), "restarted": zero,
                               "diffusion_loss": loss}, stats)

            # both stages evaluated, one selected: under jax.grad a lax.cond here ran the VQ branch
            # ~25x slower than outside it on CPU (XLA), while both stages together cost ~1.7x one
            in_vq = step < K
            l_vq, (a_vq, s_vq) = vq_stage(params)
            l_df, (a_df, s_df) = diffusion_stage(params)
            pick = lambda a, b: jnp.where(in_vq, a, b)
            loss = pick(l_vq, l_df)
            aux = {k: pick(a_vq[k], a_df[k]) for k in a_vq}
            new_stats = tmap(pick, s_vq, s_df)
            aux = {k: jnp.asarray(a, f32) for k, a in aux.items()}
            aux["model_state"] = {"step": step + 1, "vq": frozen, "vq_stats": new_stats}
            return loss, aux

        def init_state(variables):
            variables = nn.unbox(variables)
            return {"step": jnp.zeros((), jnp.int32), "vq": variables["params"]["vq"],
                    "vq_stats": dict(variables.get("vq_stats", {}))}

        return loss_fn, True, init_state

    @classmethod
    def state_structure(cls, d: dict) -> dict:
        v = d.get("vq", {}) or {}
        return {"vq": {k: v.get(k, default) for k, default in _SHAPING.items()}}

    def readout_network(self, model: Model, params, z=None):
        raise cv.ConfigError("the divae family has no readout network for image probes "
                             "(config.report.probe=False)")

    # ---------------------------------------------------------------------- the frozen VQ
    def use_train_state(self, model: Model, state) -> None:
        """Remembers the frozen VQ (parameters and EMA codebook) of a train state's model_state."""
        ms = getattr(state, "model_state", state)
        if not isinstance(ms, dict) or "vq" not in ms:
            raise ValueError("use_train_state: the state has no model_state['vq'] (not a divae "
                             "train state)")
        model.cache["vq_frozen"] = (ms["vq"], ms.get("vq_stats", {}) or {})

    def _frozen(self, model: Model):
        if "vq_frozen" not in model.cache:
            raise ValueError("the divae family encodes with the frozen VQ-VAE of the train state's "
                             "model_state: call family.generation_latents(model, state, ...) or "
                             "family.use_train_state(model, state) first")
        return model.cache["vq_frozen"]

    def _jitted(self, model: Model, name: str):
        import jax
        if name not in model.cache:
            method = {"codes": "codes", "decode_det": "decode_det"}[name]

            def run(vq_params, stats, a):
                variables = {"params": {"vq": vq_params}}
                if stats:
                    variables["vq_stats"] = stats
                return model.module.apply(variables, a, method=method)
            model.cache[name] = jax.jit(run)
        return model.cache[name]

    def encode_codes(self, model: Model, images, *, batch_size: int | None = None):
        """(z_q (N, h, w, D), indices (N, h, w)) of `images` by the frozen VQ, host arrays."""
        import jax.numpy as jnp
        import numpy as np
        vq, stats = self._frozen(model)
        bs = int(batch_size or self.config.sample.batch_size)
        zs, ids = [], []
        for i in range(0, len(images), bs):
            z, k = self._jitted(model, "codes")(vq, stats, jnp.asarray(images[i:i + bs], jnp.float32))
            zs.append(np.asarray(z, np.float32))
            ids.append(np.asarray(k))
        return np.concatenate(zs), np.concatenate(ids)

    def codebook(self, model: Model):
        """The frozen codebook (K, D) as a host array."""
        import numpy as np
        vq, stats = self._frozen(model)
        if stats:
            return np.asarray(stats["vq"]["quantizer"]["codebook"], np.float32)
        return np.asarray(vq["quantizer"]["codebook"], np.float32)

    def _check_codes(self, model: Model, z, what: str = "z"):
        import numpy as np
        want = self.code_shape(model.image_shape)
        z = np.asarray(z, np.float32)
        if z.ndim != 4 or tuple(z.shape[1:]) != want:
            raise ValueError(f"{what} of shape {tuple(z.shape)} is not a batch of code maps "
                             f"(N, {want[0]}, {want[1]}, {want[2]}) (config.vq.code_dim={want[2]}, "
                             f"the image side / 2^(levels - 1) of config.vq.block_out_channels)")
        return z

    def codes_from_indices(self, model: Model, indices):
        """z_q = e_k for code indices (N, h, w); a ValueError naming config.vq.num_codes when an
        index is not a row of the codebook."""
        import numpy as np
        e = self.codebook(model)
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= e.shape[0]):
            raise ValueError(f"code indices in [{idx.min()}, {idx.max()}] do not fit the codebook of "
                             f"config.vq.num_codes={e.shape[0]} codes")
        return e[idx]

    def decode_deterministic(self, model: Model, z):
        """The deterministic VQ-VAE decoder's images from code maps z (N, h, w, D)."""
        import jax.numpy as jnp
        import numpy as np
        z = self._check_codes(model, z)
        vq, stats = self._frozen(model)
        bs = int(self.config.sample.batch_size)
        out = [np.asarray(self._jitted(model, "decode_det")(vq, stats, jnp.asarray(z[i:i + bs])))
               for i in range(0, len(z), bs)]
        return np.concatenate(out).astype(np.float32)

    def _eps_fn(self, model: Model):
        if "eps_fn" not in model.cache:
            model.cache["eps_fn"] = self.make_eps_fn(model)
        return model.cache["eps_fn"]

    # ---------------------------------------------------------------------- first stage
    def first_stage_reconstructions(self, model: Model, params, images, *, seed: int | None = None):
        """The diffusion decoder's reconstructions from the codes of `images` (config.sample's
        sampler; the frozen VQ of the remembered train state)."""
        z, _ = self.encode_codes(model, images)
        s = self.config.sample
        x, _ = self.generate(model, self._eps_fn(model), params, len(z),
                             int(s.seed if seed is None else seed), z=z)
        return x

    def first_stage_report(self, model: Model, params, images) -> dict:
        """The deterministic decoder's reconstructions from the same codes, and the codes' usage
        (fraction of the K codes used by these images) and perplexity."""
        from diffusion_jax import quantization as Q
        z, idx = self.encode_codes(model, images)
        k = int(self.config.vq.num_codes)
        s = self.config.sample
        return {"label": f"the diffusion decoder from the codes ({s.sampler}, {s.num_steps} steps)",
                "reconstructions": {"the deterministic VQ-VAE decoder from the same codes":
                                    self.decode_deterministic(model, z)},
                "numbers": {"code_usage": float(Q.code_usage(idx, k)),
                            "code_perplexity": float(Q.perplexity(idx, k)), "num_codes": k}}

    # ---------------------------------------------------------------------- generation
    def generation_latents(self, model: Model, state, n: int, seed: int, *, train_z=None,
                           latent_sampler=None, train_images=None):
        """(z_q of n random training images among the first 1 024, description); remembers the
        state's frozen VQ. train_images: an array or a callable k -> the first k images."""
        import numpy as np
        if state is not None:
            self.use_train_state(model, state)
        pool = 1024
        if train_images is None:
            from diffusion_jax.models.autoencoder import train_images as load
            x = load(self.config, pool)
        elif callable(train_images):
            x = train_images(pool)
        else:
            x = np.asarray(train_images)[:pool]
        pick = np.random.RandomState(seed).choice(len(x), n, replace=n > len(x))
        z, _ = self.encode_codes(model, np.asarray(x)[pick])
        return z, f"codes of {n} random training images (empirical)"

    def batch_cond(self, model: Model, lo: int, hi: int, z=None):
        import jax.numpy as jnp
        return {"zq": jnp.asarray(z[lo:hi], jnp.float32)}, None

    def generate(self, model: Model, eps_fn, params, n: int, seed: int, *, z=None,
                 num_steps: int | None = None, sampler: str | None = None):
        """n images by the diffusion decoder (config.sample's sampler) from code maps z (n, h, w, D),
        by default those of n random training images (`generation_latents`)."""
        if z is None:
            z, _ = self.generation_latents(model, None, n, seed)
        z = self._check_codes(model, z)
        if len(z) != n:
            raise ValueError(f"z holds {len(z)} code maps for n={n} samples")
        if eps_fn is None:
            eps_fn = self._eps_fn(model)
        return super().generate(model, eps_fn, params, n, seed, z=z, num_steps=num_steps,
                                sampler=sampler)
