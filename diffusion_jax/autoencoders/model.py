"""The diffusion autoencoder: an encoder x0 -> z and a z-conditioned denoiser eps(x_t, t, z).

    module = make_diffae(ch=64, z_dim=512)            # or make_dmz(bits=16), or DiffusionAutoencoder(...)
    variables = init_autoencoder(module, key, (32, 32, 3))     # {'params'[, 'batch_stats']}
    lat, _ = encode_fn(module)(variables, x0)                  # LatentOutput; lat.z (B, D)
    eps_fn = decoder_eps_fn(module)            # eps_fn(x, t, {'z': z, 'params': params}) for the samplers
    stats = recompute_batch_stats(module, ema_variables, images)  # BatchNorm statistics for EMA weights

Parameters: {'encoder': ..., 'decoder': ...}; BatchNorm statistics of the encoder (ConvEncoder with
norm='batch') in the 'batch_stats' collection under 'encoder'. The decoder is a `networks.UNet`
whose `z_conditioning` (any non-empty subset of networks.Z_MODES) says where z enters:

    'adagn_scale'        h = (GN(h)(1 + t_s) + t_b)(1 + W z)      in every ResBlock (DiffAE)
    'adagn_scale_shift'  h = (GN(h)(1 + t_s) + t_b)(1 + z_s) + z_b
    'cross_attn'         z as one extra key/value token W z in every attention block (DMZ)
    'time_add'           temb += W z

Note (DiffAE issues 63 / 77, "zero gradient to z_sem"): the decoder's residual branches and output
convolution are zero-initialised (score_sde / ADM), so at initialisation the output does not depend
on z and the encoder's gradient is exactly zero; it becomes non-zero after the first two updates
(conv_out first, then the residual convs), with every conditioning path.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.autoencoders.encoders import ENCODERS
from diffusion_jax.autoencoders.latents import LatentOutput, check_latent_type
from diffusion_jax.networks.unet import Z_MODES, UNet
from diffusion_jax.processes.predictions import as_eps_fn


def check_z_conditioning(z_conditioning: Sequence[str]) -> tuple[str, ...]:
    """A non-empty tuple of distinct modes from networks.Z_MODES, else a ValueError naming the problem."""
    if isinstance(z_conditioning, str):
        z_conditioning = (z_conditioning,)
    modes = tuple(z_conditioning)
    bad = [m for m in modes if m not in Z_MODES]
    if bad:
        raise ValueError(f"unknown z_conditioning mode(s) {bad}; expected a subset of {Z_MODES}")
    if not modes:
        raise ValueError(f"a diffusion autoencoder's decoder needs z_conditioning (a non-empty subset of "
                         f"{Z_MODES}); without it the decoder ignores z and the encoder gets no gradient")
    if len(set(modes)) != len(modes):
        raise ValueError(f"z_conditioning has repeated modes: {modes}")
    return modes


def _is_stochastic(encoder) -> bool:
    return getattr(encoder, "latent", "continuous") in ("gaussian", "binary")


class DiffusionAutoencoder(nn.Module):
    """encoder: x0 (B, H, W, C) -> LatentOutput; decoder: UNet(x_t, t, cond={'z': z}).

    `encode(x0, train)` (rng 'latent' when train and the latent is stochastic), `decode(x_t, t, z,
    train)` -> the decoder's output (eps, or [eps, v] with 2C channels for learned variance), and
    `__call__(x_t, t, x0, train)` = decode(x_t, t, encode(x0, train).z, train) (used by init).
    """
    encoder: nn.Module
    decoder: UNet

    def setup(self):
        check_z_conditioning(self.decoder.z_conditioning)

    def encode(self, x0: jax.Array, train: bool = False, tau=None) -> LatentOutput:
        if tau is None:
            return self.encoder(x0, train=train)
        return self.encoder(x0, train=train, tau=tau)

    def decode(self, x_t: jax.Array, t: jax.Array, z: jax.Array, train: bool = False) -> jax.Array:
        z = jnp.asarray(z)
        if z.ndim != 2 or z.shape[0] != x_t.shape[0]:
            raise ValueError(f"z must have shape (B, D) with B = {x_t.shape[0]} (the batch of x_t), "
                             f"got shape {tuple(z.shape)}")
        return self.decoder(x_t, t, cond={"z": z}, train=train)

    def __call__(self, x_t: jax.Array, t: jax.Array, x0: jax.Array, train: bool = False) -> jax.Array:
        return self.decode(x_t, t, self.encode(x0, train).z, train)


# --- factories --------------------------------------------------------------------------------------

def _make_encoder(encoder, latent: str, z_dim: int, defaults: dict, options: Optional[dict]):
    if isinstance(encoder, nn.Module):
        if options:
            raise ValueError("encoder_options apply to a named encoder ('semantic' | 'conv'), not to a module")
        return encoder
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODERS)} or a flax module")
    cls = ENCODERS[encoder]
    kwargs = dict(defaults if encoder == "semantic" else
                  {k: defaults[k] for k in ("dtype", "param_dtype") if k in defaults})
    kwargs.update(options or {})
    clash = sorted({"latent", "z_dim"} & set(kwargs))
    if clash:
        raise ValueError(f"set {clash} through the factory's own arguments, not encoder_options")
    unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} options {unknown}")
    return cls(latent=latent, z_dim=z_dim, **kwargs)


def _make_decoder(z_conditioning, defaults: dict, options: dict) -> UNet:
    kwargs = {**defaults, **options}
    unknown = sorted(set(kwargs) - set(UNet.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown UNet (decoder) options {unknown}")
    return UNet(z_conditioning=check_z_conditioning(z_conditioning), **kwargs)


def make_diffae(*, z_dim: int = 512, latent: str = "continuous",
                z_conditioning: Sequence[str] = ("adagn_scale",), encoder: Any = "semantic",
                encoder_options: Optional[dict] = None, **decoder_options) -> DiffusionAutoencoder:
    """DiffAE (Preechakul et al. 2022): SemanticEncoder -> z_sem (512, continuous) -> UNet with
    AdaGN time conditioning (scale_shift_norm=True) and z_conditioning=('adagn_scale',).

    decoder_options go to `networks.UNet` (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
    ...); the encoder copies ch, ch_mult, num_res_blocks, attn_resolutions, dropout and dtype from
    them (as DiffAE's enc_* options default to the net's) unless `encoder_options` overrides.
    Every axis is overridable: latent in LATENT_TYPES, z_conditioning any subset of Z_MODES,
    encoder 'semantic' | 'conv' | a module.
    """
    check_latent_type(latent)
    dec = _make_decoder(z_conditioning, {"scale_shift_norm": True}, decoder_options)
    shared = {k: getattr(dec, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                                          "dtype", "param_dtype")}
    enc = _make_encoder(encoder, latent, z_dim, shared, encoder_options)
    return DiffusionAutoencoder(encoder=enc, decoder=dec)


def make_dmz(*, bits: int = 16, latent: str = "binary", z_conditioning: Sequence[str] = ("cross_attn",),
             time_add: bool = False, learned_variance: bool = True, in_channels: int = 3,
             encoder: Any = "conv", encoder_options: Optional[dict] = None,
             **decoder_options) -> DiffusionAutoencoder:
    """DMZ (Proszewska, Malkin & Siddharth 2025; exlab-research/dmz): ConvEncoder + BatchNorm -> `bits`
    binary latents (Gumbel-softmax, tau 1) -> UNet with z as one cross-attention token in every
    attention block (+ added to the time embedding if time_add), learned variance (out_channels =
    2 in_channels), scale-shift time conditioning; CIFAR-10 decoder defaults: ch 128, ch_mult
    (1, 2, 2, 2), 3 blocks per level, attention at 16 and 8, dropout 0.3.

    `bits` is the latent size d (z has 2d values for 'binary', d otherwise); decoder_options go to
    `networks.UNet`, encoder_options to the encoder ('conv': ch, channels, norm, ...).
    """
    check_latent_type(latent)
    modes = tuple([z_conditioning] if isinstance(z_conditioning, str) else z_conditioning)
    if time_add and "time_add" not in modes:
        modes = modes + ("time_add",)
    defaults = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.3,
                    scale_shift_norm=True, out_channels=2 * in_channels if learned_variance else in_channels)
    dec = _make_decoder(modes, defaults, decoder_options)
    shared = {k: getattr(dec, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                                          "dtype", "param_dtype")}
    enc = _make_encoder(encoder, latent, bits, shared, encoder_options)
    return DiffusionAutoencoder(encoder=enc, decoder=dec)


# --- functional helpers (pure, jittable) ------------------------------------------------------------

def _image_shape(image_shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"image_shape must be (H, W, C) or (B, H, W, C), got {image_shape}")
    return shape


def init_autoencoder(module: DiffusionAutoencoder, key, image_shape, *, unbox: bool = True) -> dict:
    """Initialises the autoencoder on zeros of `image_shape` ((H, W, C) or (B, H, W, C)) in eval mode.

    Returns {'params': {'encoder', 'decoder'}} plus 'batch_stats' when the encoder keeps BatchNorm
    statistics; unboxed (plain arrays) unless unbox=False (then the params keep their logical axis
    names for `networks.logical_param_specs`). Runs under `jax.jit`.
    """
    shape = _image_shape(image_shape)

    def init(k):
        x = jnp.zeros(shape, jnp.float32)
        return module.init({"params": k}, x, jnp.zeros((shape[0],), jnp.float32), x, train=False)

    variables = dict(jax.jit(init)(key))
    return nn.unbox(variables) if unbox else variables


def _split_rng(rng):
    if rng is None:
        return {}
    k_lat, k_drop = jax.random.split(rng)
    return {"latent": k_lat, "dropout": k_drop}


def encode_fn(module: DiffusionAutoencoder) -> Callable:
    """Pure `encode(variables, x0, *, train=False, rng=None, tau=None) -> (LatentOutput, batch_stats)`.

    `variables` = {'params', ['batch_stats']}; the returned batch_stats are the updated running
    statistics when train=True (BatchNorm uses batch statistics and updates them), else the input's
    unchanged ({} if none). `rng` seeds the latent noise ('latent') and dropout; it is required when
    train=True and the latent is stochastic ('gaussian' / 'binary'). `tau` (float or traced) overrides
    the Gumbel-softmax temperature of a binary latent for this call (a temperature schedule).
    """
    stochastic = _is_stochastic(module.encoder)

    def encode(variables, x0, *, train: bool = False, rng=None, tau=None):
        if train and stochastic and rng is None:
            raise ValueError(f"encode(train=True) with a {module.encoder.latent!r} latent samples z: pass rng=")
        variables = dict(variables)
        stats = variables.get("batch_stats", {})
        rngs = _split_rng(rng)
        extra = {} if tau is None else {"tau": tau}
        if train and jax.tree_util.tree_leaves(stats):
            out, updates = module.apply(variables, x0, train=True, rngs=rngs, method="encode",
                                        mutable=["batch_stats"], **extra)
            return out, updates["batch_stats"]
        out = module.apply(variables, x0, train=train, rngs=rngs, method="encode", **extra)
        return out, stats

    return encode


def decoder_apply_fn(module: DiffusionAutoencoder) -> Callable:
    """The library's network signature for the decoder: `apply_fn(params, x_t, t, cond, *, train=False,
    rng=None)` with cond = {'z': (B, D)} and params the FULL autoencoder params (gradients reach the
    encoder through whatever computed z). `rng` is the dropout key."""
    needs_rng = getattr(module.decoder, "dropout", 0.0) > 0.0

    def apply_fn(params, x_t, t, cond=None, *, train: bool = False, rng=None):
        if not cond or "z" not in cond:
            got = sorted(cond) if isinstance(cond, dict) else cond
            raise ValueError(f"the autoencoder's decoder needs cond={{'z': (B, D)}}, got cond={got}")
        if train and needs_rng and rng is None:
            raise ValueError("apply_fn(train=True) with dropout > 0 needs rng=<dropout key>")
        rngs = {"dropout": rng} if rng is not None else {}
        return module.apply({"params": params}, x_t, t, cond["z"], train=train, rngs=rngs, method="decode")

    return apply_fn


@functools.lru_cache(maxsize=64)
def _params_eps_fn(module: DiffusionAutoencoder, prediction: str, process) -> Callable:
    apply_fn = decoder_apply_fn(module)

    def net(x, t, cond):
        out = apply_fn(cond["params"], x, t, cond)
        c = x.shape[-1]
        return out[..., :c] if out.shape[-1] == 2 * c else out

    if prediction == "eps":
        return lambda x, t, cond: net(x, t, cond).astype(jnp.float32)
    return as_eps_fn(net, prediction, process)


def decoder_eps_fn(module: DiffusionAutoencoder, variables=None, prediction: str = "eps", *,
                   process=None) -> Callable:
    """`eps_fn(x, t, cond) -> eps` (float32) for the library's samplers: the decoder in eval mode, its
    first C channels when it has 2C outputs (learned variance), converted from `prediction`
    ('eps' | 'x0' | 'v' | 'score'; the last three need `process`).

    variables=None (the default, and what hot loops should use): the parameters travel in the traced
    cond, `cond = {'z': z, 'params': params}` (the inference functions take `params=`), and the
    function returned is cached per (module, prediction, process), so every jitted sampler compiles
    once and serves every parameter set. With `variables` given they are closed over (cond = {'z': z}):
    convenient, but each such closure is a new static function and compiles anew.
    """
    if prediction != "eps" and process is None:
        raise ValueError(f"decoder_eps_fn(prediction={prediction!r}) needs process= to convert to eps")
    fn = _params_eps_fn(module, prediction, process if prediction != "eps" else None)
    if variables is None:
        return fn
    params = variables["params"] if "params" in variables else variables
    return lambda x, t, cond=None: fn(x, t, {**(cond or {}), "params": params})


def _population_stats(module: DiffusionAutoencoder):
    momentum = float(getattr(module.encoder, "bn_momentum", 0.9))

    @jax.jit
    def batch_stats(params, stats, x0):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, stats)
        _, upd = module.apply({"params": params, "batch_stats": zeros}, x0, train=True, method="encode",
                              mutable=["batch_stats"], rngs={"latent": jax.random.PRNGKey(0),
                                                             "dropout": jax.random.PRNGKey(0)})
        return jax.tree_util.tree_map(lambda a: a / (1.0 - momentum), upd["batch_stats"])

    return batch_stats


_POPULATION = functools.lru_cache(maxsize=16)(_population_stats)


def recompute_batch_stats(module: DiffusionAutoencoder, variables, images, *, batch_size: int = 256) -> dict:
    """BatchNorm statistics of the encoder recomputed for `variables['params']` ("precise BN", Wu &
    Johnson 2021): the per-batch means and (biased) variances of every BatchNorm layer with the encoder
    in training mode, averaged over the full batches of `images` (N, H, W, C).

    Use it for parameters the running statistics were not gathered with, e.g. the EMA parameters: the
    running statistics follow the online weights, and with a slow EMA the two drift apart until binary
    codes go constant (issue 12). Returns the new 'batch_stats' collection ({} if there is none).
    """
    stats = dict(variables).get("batch_stats", {})
    if not jax.tree_util.tree_leaves(stats):
        return stats
    images = jnp.asarray(images, jnp.float32)
    n = (images.shape[0] // batch_size) * batch_size or images.shape[0]
    bs = min(batch_size, n)
    fn = _POPULATION(module)
    total, count = None, 0
    for i in range(0, n - bs + 1, bs):
        s = fn(variables["params"], stats, images[i:i + bs])
        total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
        count += 1
    return jax.tree_util.tree_map(lambda a: a / count, total)


def has_batch_stats(module: DiffusionAutoencoder, image_shape) -> bool:
    """Whether the autoencoder keeps BatchNorm statistics for images of `image_shape` (no FLOPs)."""
    shape = _image_shape(image_shape)
    abstract = jax.eval_shape(
        lambda: module.init({"params": jax.random.PRNGKey(0)}, jnp.zeros(shape), jnp.zeros(shape[:1]),
                            jnp.zeros(shape), train=False))
    return bool(jax.tree_util.tree_leaves(abstract.get("batch_stats", {})))


__all__ = ["DiffusionAutoencoder", "check_z_conditioning", "decoder_apply_fn",
           "decoder_eps_fn", "encode_fn", "has_batch_stats", "init_autoencoder", "make_diffae", "make_dmz",
           "recompute_batch_stats"]
