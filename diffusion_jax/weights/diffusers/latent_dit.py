"""A published latent DiT end to end: diffusers DiT + AutoencoderKL folders -> the library's DiT, VAE
and discrete DDPM process, sampled with the library's samplers and decoded by the VAE.

    model = load_latent_dit('DiT-XL-2-256/transformer', 'sd-vae-ft-ema')
    images = sample_latent_dit(model, labels, key, num_steps=50, guidance_scale=4.0)

The DiT was trained on integer steps n = 0..T-1 of a DDPM schedule (T = 1000, linear betas
1e-4..0.02); in the library that is `DiscreteDDPM`, whose continuous time t_n = (n + 1) / T the
converted DiT maps back to n. diffusers' DDIMScheduler steps [n_1 > ... > n_K] (its final step to
alpha = 1 included) are the library's DDIM on ts = (n_k + 1) / T followed by the x0 prediction at
ts[-1] (`denoise_final`); pass them as `timesteps`. Guidance is classifier-free on eps,

    eps = eps(x, t, null) + w (eps(x, t, label) - eps(x, t, null)),     null = num_classes,

on all C channels, or, with `guided_channels` k, on the first k only (the other channels keep the
conditional eps: facebookresearch/DiT guides 3 of the 4 latent channels "for exact
reproducibility" of the paper's results, so convention='original' sets k = 3); a learned-sigma
DiT (2C outputs) gives eps from its first C channels (with `pair`: (eps, v), v
its last C channels for ancestral sampling with variance='learned_range'). Images are
vae.decode(z / scaling_factor + shift_factor), float32 in about [-1, 1].
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.networks.autoencoder_kl import AutoencoderKL
from diffusion_jax.networks.dit import DiT
from diffusion_jax.processes.predictions import x0_from_eps
from diffusion_jax.processes.vp import DiscreteDDPM
from diffusion_jax.sampling import classifier_free_guidance, get_sampler, sample, time_grid
from diffusion_jax.sampling.common import raise_if_nonfinite
from diffusion_jax.weights.diffusers.autoencoder_kl import load_autoencoder_kl
from diffusion_jax.weights.diffusers.dit import load_dit
from diffusion_jax.weights.diffusers.folder import WeightsError

__all__ = ["LatentDiT", "load_latent_dit", "scheduler_process", "latent_eps_fn",
           "timestep_grid", "sample_latent_dit", "decode_latents"]

_BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}


class LatentDiT(NamedTuple):
    """The pieces of a latent DiT. params = {'dit': ..., 'vae': ...}; latent_shape (h, w, C);
    guided_channels: channels classifier-free guidance acts on (None: all)."""
    dit: DiT
    vae: AutoencoderKL
    params: dict
    process: DiscreteDDPM
    latent_shape: tuple[int, int, int]
    guided_channels: Optional[int] = None


def scheduler_process(config: Optional[dict] = None, source: str = "scheduler config"
                      ) -> DiscreteDDPM:
    """`DiscreteDDPM` of a diffusers DDPM/DDIM scheduler config (None: DiT's, T = 1000, linear
    betas 1e-4..0.02). Only the training schedule is read; eps prediction is required."""
    config = dict(config or {})
    schedule = config.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise WeightsError(f"{source}: 'beta_schedule' = {schedule!r} is not supported "
                           f"(known: {sorted(_BETA_SCHEDULES)})")
    if config.get("trained_betas") is not None:
        raise WeightsError(f"{source}: 'trained_betas' is not supported")
    if config.get("rescale_betas_zero_snr"):
        raise WeightsError(f"{source}: 'rescale_betas_zero_snr' is not supported")
    pred = config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise WeightsError(f"{source}: 'prediction_type' = {pred!r}; only 'epsilon' is supported")
    return DiscreteDDPM(num_steps=int(config.get("num_train_timesteps", 1000)),
                        beta_start=float(config.get("beta_start", 1e-4)),
                        beta_end=float(config.get("beta_end", 0.02)),
                        beta_schedule=_BETA_SCHEDULES[schedule])


def _read_scheduler(dit_path: str, scheduler_path: Optional[str]) -> tuple[Optional[dict], str]:
    if scheduler_path is None:
        sibling = os.path.join(os.path.dirname(os.path.abspath(dit_path)), "scheduler")
        if not os.path.isdir(sibling):
            return None, "default DiT schedule"
        scheduler_path = sibling
    f = scheduler_path
    if os.path.isdir(f):
        f = os.path.join(f, "scheduler_config.json")
    if not os.path.exists(f):
        raise WeightsError(f"scheduler config {f!r} does not exist")
    with open(f, encoding="utf-8") as fh:
        try:
            return json.load(fh), f
        except json.JSONDecodeError as e:
            raise WeightsError(f"{f} is not valid JSON: {e}") from None


def load_latent_dit(dit_path: str, vae_path: str, *, scheduler_path: Optional[str] = None,
                    latent_size: Optional[int] = None, convention: str = "original"
                    ) -> LatentDiT:
    """DiT (`transformer` folder) + AutoencoderKL (`vae` folder) + process.

    The schedule comes from `scheduler_path` (a folder or scheduler_config.json), else from a
    `scheduler` folder next to dit_path, else DiT's default. latent_size defaults to the DiT
    config's sample_size. convention: 'original' (the default: what facebookresearch/DiT, the code
    the published weights were trained and evaluated with, computes; see `weights.diffusers.dit`;
    guidance on 3 channels) or 'diffusers' (what diffusers' DiTTransformer2DModel computes)."""
    sched, src = _read_scheduler(dit_path, scheduler_path)
    process = scheduler_process(sched, src)
    dit, dit_params = load_dit(dit_path, num_train_timesteps=process.num_steps,
                               convention=convention)
    vae, vae_params = load_autoencoder_kl(vae_path)
    c = dit.out_channels
    if c not in (vae.latent_channels, 2 * vae.latent_channels):
        raise WeightsError(f"{dit_path}: DiT out_channels {c} is neither the VAE's latent_channels "
                           f"{vae.latent_channels} nor twice it (learned sigma)")
    in_ch = dit_params["patch_embed"]["kernel"].shape[2]
    if in_ch != vae.latent_channels:
        raise WeightsError(f"{dit_path}: DiT in_channels {in_ch} != {vae_path}: latent_channels "
                           f"{vae.latent_channels}")
    with open(os.path.join(dit_path, "config.json"), encoding="utf-8") as fh:
        size = latent_size or int(json.load(fh).get("sample_size", 32))
    return LatentDiT(dit, vae, {"dit": dit_params, "vae": vae_params}, process,
                     (size, size, vae.latent_channels),
                     3 if convention == "original" and vae.latent_channels > 3 else None)


@functools.lru_cache(maxsize=32)
def latent_eps_fn(dit: DiT, guidance_scale: float = 1.0, pair: bool = False,
                  guided_channels: Optional[int] = None):
    """eps_fn(x, t, cond) for the library's samplers, cond = {'params': DiT params, 'label': (B,)
    int}; classifier-free guided (on the first `guided_channels`, None: all) unless
    guidance_scale == 1; see the module docstring.

    Cached: the same arguments give the same function, so `sampling.sample` compiles once."""
    if dit.num_classes is None:
        raise ValueError("latent_eps_fn needs a class-conditional DiT (num_classes set)")
    null = dit.num_classes
    scale = float(guidance_scale)

    def net(params, x, t, label):
        return dit.apply({"params": params}, x, t, {"label": label}).astype(jnp.float32)

    def eps_fn(x, t, cond):
        params, label = cond["params"], cond.get("label")
        c = x.shape[-1]
        b = x.shape[0]
        if label is None:
            label = jnp.full((b,), null, jnp.int32)
        if not pair and guided_channels is None:
            first = lambda x_, t_, c_: net(params, x_, t_, c_["label"])[..., :c]  # noqa: E731
            if scale == 1.0:
                return first(x, t, {"label": label})
            return classifier_free_guidance(first, scale, {"label": jnp.int32(null)})(
                x, t, {"label": label})
        if scale == 1.0:
            out = net(params, x, t, label)
            return (out[..., :c], out[..., c:]) if pair else out[..., :c]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        out = net(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([label, jnp.full((b,), null, label.dtype)]))
        eps_c, eps_u = out[:b, ..., :c], out[b:, ..., :c]
        eps = eps_u + scale * (eps_c - eps_u)
        if guided_channels is not None:
            eps = jnp.concatenate([eps[..., :guided_channels], eps_c[..., guided_channels:]], -1)
        return (eps, out[:b, ..., c:]) if pair else eps

    return eps_fn


def timestep_grid(process: DiscreteDDPM, timesteps: Sequence[int]) -> np.ndarray:
    """Decreasing integer DDPM steps n_k -> the library's times t = (n_k + 1) / T."""
    n = np.asarray(timesteps, np.float64)
    if n.ndim != 1 or n.size < 1 or np.any(np.diff(n) >= 0) or n.min() < 0 \
            or n.max() > process.num_steps - 1:
        raise ValueError(f"timesteps must be a decreasing sequence of integers in [0, "
                         f"{process.num_steps - 1}], got {np.asarray(timesteps).tolist()}")
    return ((n + 1.0) / process.num_steps).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vae: AutoencoderKL, params, z):
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode_latents)


def decode_latents(model: LatentDiT, z) -> jax.Array:
    """Diffusion latents (B, h, w, C) -> images (B, H, W, 3) float32 (jitted once per shape)."""
    return _decode(model.vae, model.params["vae"], jnp.asarray(z, jnp.float32))


def sample_latent_dit(model: LatentDiT, labels, key, *, sampler: str = "ddim",
                      num_steps: int = 50, guidance_scale: float = 4.0,
                      timesteps: Optional[Sequence[int]] = None, noise=None, step_noise=None,
                      denoise_final: Optional[bool] = None, return_latents: bool = False,
                      guided_channels: Any = "model", **options: Any):
    """Images (B, H, W, 3) float32 (about [-1, 1]) of classes `labels` (B,) (num_classes = the null
    class: unconditional).

    timesteps: diffusers-style integer steps (e.g. DDIMScheduler.timesteps), else a `num_steps`
    grid of the sampler's default spacing. noise: the initial latent (B, h, w, C) (default drawn
    from key); step_noise: a stochastic sampler's noise (steps, B, h, w, C) (default from key).
    denoise_final (default True): end with the x0 prediction at the last time (diffusers' DDIM
    final step to alpha = 1; improved DDPM's last ancestral step). guided_channels: the model's
    (3 for convention='original', else all) unless given (None: all). options go to the sampler
    (e.g. eta; variance='learned_range' for 'ancestral'). With return_latents, (images, latents)."""
    labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    shape = (labels.shape[0], *model.latent_shape)
    pair = options.get("variance") == "learned_range"
    if pair and model.dit.out_channels != 2 * model.latent_shape[-1]:
        raise ValueError("variance='learned_range' needs a learned-sigma DiT (2C outputs)")
    if denoise_final is None:
        denoise_final = True
    k = model.guided_channels if guided_channels == "model" else guided_channels
    eps_fn = latent_eps_fn(model.dit, float(guidance_scale), pair, k)
    ts = None if timesteps is None else timestep_grid(model.process, timesteps)
    if ts is not None and len(ts) < 2:
        raise ValueError("timesteps needs at least 2 entries (denoise_final adds the last x0 step)")
    k_noise, k_sample = jax.random.split(key)
    if noise is None and ts is not None and ts[0] < model.process.t_max:
        noise = jax.random.normal(k_noise, shape, jnp.float32)
    kw = dict(ts=ts) if ts is not None else dict(num_steps=num_steps)
    cond = {"params": model.params["dit"], "label": labels}
    if step_noise is None:
        x = sample(sampler, eps_fn, model.process, k_sample, shape, x_init=noise, cond=cond,
                   denoise_final=denoise_final and not pair, **kw, **options).x
    else:   # injected noise: the sampler itself (`sample` takes its options as static)
        if ts is None:
            ts = time_grid(model.process, num_steps, get_sampler(sampler).default_spacing)
        x0 = model.process.prior_sample(k_noise, shape) if noise is None else noise
        out = _run_with_noise(sampler, eps_fn, model.process, jnp.asarray(x0, jnp.float32),
                              jnp.asarray(ts), cond, jnp.asarray(step_noise, jnp.float32),
                              tuple(sorted(options.items())))
        raise_if_nonfinite(out, ts, sampler)
        x = out.x
    if denoise_final and (pair or step_noise is not None):   # x0 step with an eps-only denoiser
        t_end = float(ts[-1]) if ts is not None else float(options.get("t_end") or
                                                           model.process.t_min)
        x = _final_x0(latent_eps_fn(model.dit, float(guidance_scale), False, k), model.process,
                      x, jnp.float32(t_end), cond)
    images = decode_latents(model, x)
    return (images, x) if return_latents else images


@functools.partial(jax.jit, static_argnames=("name", "eps_fn", "process", "options"))
def _run_with_noise(name, eps_fn, process, x, ts, cond, noise, options):
    return get_sampler(name).fn(eps_fn, process, x, ts, cond=cond, noise=noise, **dict(options))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _final_x0(eps_fn, process, x, t, cond):
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    return x0_from_eps(process, x, tb, eps_fn(x, tb, cond))
