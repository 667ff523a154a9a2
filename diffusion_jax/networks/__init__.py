"""Denoiser networks (Flax linen): a DDPM++/NCSN++ UNet and a DiT, with one calling convention.

    module.apply(variables, x, t, cond=None, train=False, rngs={'dropout': key})
        x (B, H, W, C) NHWC, t (B,) float (embedded as module.time_scale * t), cond dict or None
        ({'label': (B,) int, 'z': (B, D) float}); returns (B, H, W, out_channels) float32.

    apply_fn = make_apply_fn(module)
    apply_fn(params, x, t, cond=None, *, train=False, rng=None)   # params = the 'params' collection

Feature readouts: `module.apply(..., mutable=['intermediates'])` returns (out, {'intermediates':
{name: (feature,)}}) with the names of `block_names(module, input_shape)`.
Sharding: parameters carry logical axis names; see `partitioning`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.networks.dit import DIT_SIZES, DiT, DiTBlock, dit_config, make_dit
from diffusion_jax.networks.embeddings import (fourier_embedding, sincos_2d_posemb,
                                               sinusoidal_embedding, timestep_embedding)
from diffusion_jax.networks.layers import AttnBlock, Downsample, ResBlock, Upsample
from diffusion_jax.networks.mlp import TIME_CONDITIONINGS, MLPSkipNet
from diffusion_jax.networks.partitioning import (DEFAULT_LOGICAL_AXIS_RULES, LOGICAL_AXIS_NAMES,
                                                 logical_param_specs, param_shardings)
from diffusion_jax.networks.unet import Z_MODES, FeatureInfo, UNet
from diffusion_jax.networks.vq import VectorQuantizer
from diffusion_jax.networks.ddgan_discriminator import TimeConditionalDiscriminator

__all__ = [
    "UNet", "DiT", "DiTBlock", "ResBlock", "AttnBlock", "Downsample", "Upsample", "FeatureInfo",
    "Z_MODES", "DIT_SIZES", "dit_config", "make_dit", "sinusoidal_embedding", "fourier_embedding",
    "timestep_embedding", "sincos_2d_posemb", "DEFAULT_LOGICAL_AXIS_RULES", "LOGICAL_AXIS_NAMES",
    "logical_param_specs", "param_shardings", "make_apply_fn", "init_params", "abstract_variables",
    "block_names", "MLPSkipNet", "TIME_CONDITIONINGS", "VectorQuantizer",
    "TimeConditionalDiscriminator",
]


def make_apply_fn(module: nn.Module) -> Callable:
    """Pure `apply_fn(params, x, t, cond=None, *, train=False, rng=None) -> (B, H, W, C') float32`.

    `params` is the 'params' collection (boxed or unboxed); `rng` is the dropout key, required only
    when `train` and the module's dropout > 0.
    """
    needs_rng = getattr(module, "dropout", 0.0) > 0.0

    def apply_fn(params, x, t, cond=None, *, train: bool = False, rng=None):
        if train and needs_rng and rng is None:
            raise ValueError("apply_fn(train=True) with dropout > 0 needs rng=<dropout key>")
        rngs = {"dropout": rng} if rng is not None else {}
        return module.apply({"params": params}, x, t, cond=cond, train=train, rngs=rngs)

    return apply_fn


def _example_inputs(x_shape: Sequence[int], cond_example: Optional[dict]):
    x = jnp.zeros(tuple(x_shape), jnp.float32)
    t = jnp.zeros((x_shape[0],), jnp.float32)
    return x, t, cond_example


def abstract_variables(module: nn.Module, x_shape: Sequence[int],
                       cond_example: Optional[dict] = None):
    """`jax.eval_shape` of `module.init`: boxed (LogicallyPartitioned) ShapeDtypeStructs, no FLOPs.

    Feed it to `logical_param_specs` / `param_shardings`, e.g. for a sharded jitted init.
    """
    x, t, cond = _example_inputs(x_shape, cond_example)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t, cond))


def init_params(module: nn.Module, rng: jax.Array, x_shape: Sequence[int],
                cond_example: Optional[dict] = None, *, unbox: bool = True) -> Any:
    """Initialises and returns the 'params' collection (float32; unboxed unless unbox=False).

    `cond_example` must hold every conditioning input the configuration uses (e.g. {'z': zeros((B,
    D))} for z conditioning, since D fixes parameter shapes). Runs under `jax.jit`.
    """
    x, t, cond = _example_inputs(x_shape, cond_example)
    params = jax.jit(lambda r, c: module.init(r, x, t, c)["params"])(rng, cond)
    return nn.unbox(params) if unbox else params


def block_names(module: nn.Module, input_shape: Sequence[int]) -> dict[str, FeatureInfo]:
    """Names sown to 'intermediates' -> FeatureInfo(per-example shape, stride), execution order.

    UNet: 'down_{l}_{b}', 'mid', 'up_{l}_{b}' with shape (H / 2**l, W / 2**l, ch * ch_mult[l]);
    DiT: 'block_{i}' with shape (H W / p**2, hidden_size).
    `input_shape` is (H, W, C) or (B, H, W, C).
    """
    return module.feature_info(input_shape)
