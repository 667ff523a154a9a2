"""Building blocks of the denoisers (Flax linen, NHWC).

Conventions: parameters are created in `param_dtype` (float32) with logical axis names (see
`partitioning.py`); matmuls / convolutions run in `dtype` (e.g. bfloat16); GroupNorm, LayerNorm,
softmax and the (1 + scale) / shift modulations run in float32. Initialisers follow score_sde's
DDPM: `variance_scaling(scale, 'fan_avg', 'uniform')`, with scale 0 meaning exactly zero (the last
conv of every residual branch, the attention output projection and the network's output conv).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.networks import partitioning as P

Dtype = Any


def default_init(scale: float = 1.0):
    """score_sde's `default_init`: fan-avg uniform variance scaling; scale 0 -> zeros."""
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def dense(features: int, axes: tuple[str, str], *, name: Optional[str] = None,
          init=None, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """`nn.Dense` whose kernel carries logical names `axes` and whose bias is replicated."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(init or default_init(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (P.BIAS,)))


def conv(features: int, kernel: int = 3, stride: int = 1, *, name: Optional[str] = None,
         init=None, padding="SAME", dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
    """`nn.Conv` (kernel x kernel, NHWC) with kernel axes (conv_h, conv_w, conv_in, conv_out)."""
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
        param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(
            init or default_init(), (P.CONV_H, P.CONV_W, P.CONV_IN, P.CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (P.BIAS,)))


def group_norm(channels: int, *, name: Optional[str] = None, param_dtype: Dtype = jnp.float32,
               groups: Optional[int] = None, eps: float = 1e-6) -> nn.GroupNorm:
    """float32 GroupNorm with `groups` groups (None: min(C // 4, 32), score_sde), eps 1e-6."""
    if groups is not None and (groups < 1 or channels % groups):
        raise ValueError(f"GroupNorm: {channels} channels cannot be split into {groups} groups")
    return nn.GroupNorm(
        num_groups=groups or max(min(channels // 4, 32), 1), epsilon=eps, dtype=jnp.float32,
        param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (P.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (P.NORM,)))


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C) nearest-neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, C) 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def resolve_heads(channels: int, num_heads: int, head_dim: Optional[int]) -> int:
    """Number of heads: channels // head_dim if head_dim is given, else num_heads."""
    heads = channels // head_dim if head_dim else num_heads
    if heads < 1 or channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} heads")
    return heads


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V over tokens, with optional extra key/value tokens.

    x: (B, T, C) queries and keys/values; `extra`: (B, S, C) further tokens that are appended to the
    keys/values only (projected by the same W_k, W_v). Output W_o [heads] (B, T, C). The softmax is
    in float32 (`jax.nn.dot_product_attention`).
    """
    num_heads: int
    out_init: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, extra: Optional[jax.Array] = None) -> jax.Array:
        b, t, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_proj = dense(c, (P.EMBED, P.HEADS), name="q", **kw)
        k_proj = dense(c, (P.EMBED, P.HEADS), name="k", **kw)
        v_proj = dense(c, (P.EMBED, P.HEADS), name="v", **kw)
        q, k, v = q_proj(x), k_proj(x), v_proj(x)
        if extra is not None:
            k = jnp.concatenate([k, k_proj(extra)], axis=1)
            v = jnp.concatenate([v, v_proj(extra)], axis=1)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.num_heads, c // self.num_heads)
        o = jax.nn.dot_product_attention(split(q), split(k), split(v))
        out = dense(c, (P.HEADS, P.EMBED), name="out", init=self.out_init, **kw)
        return out(o.reshape(b, t, c))


class AttnBlock(nn.Module):
    """DDPM self-attention block: h = x + W_o Attn(GN(x)) (W_o zero-initialised).

    With `z_token=True` the latent z is projected to ONE token u = W_u z (B, 1, C) and appended to
    the keys/values, so every position attends jointly over {GN(x) positions} u {u} (the
    cross-attention of the DMZ design, folded into the self-attention softmax; a separate
    cross-attention over a single token would be a softmax over one key, i.e. a constant).
    """
    num_heads: int = 1
    head_dim: Optional[int] = None
    z_token: bool = False
    norm_groups: Optional[int] = None      # GroupNorm groups (None: min(C // 4, 32)) and eps
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, z: Optional[jax.Array] = None) -> jax.Array:
        b, hh, ww, c = x.shape
        h = group_norm(c, name="norm", param_dtype=self.param_dtype, groups=self.norm_groups,
                       eps=self.norm_eps)(x).astype(self.dtype)
        extra = None
        if self.z_token:
            extra = dense(c, (P.COND, P.EMBED), name="z_token", dtype=self.dtype,
                          param_dtype=self.param_dtype)(z)[:, None, :]
        h = MultiHeadAttention(resolve_heads(c, self.num_heads, self.head_dim),
                               out_init=default_init(0.0), dtype=self.dtype,
                               param_dtype=self.param_dtype, name="attn")(
                                   h.reshape(b, hh * ww, c), extra)
        return x + h.reshape(b, hh, ww, c)


class ResBlock(nn.Module):
    """DDPM / BigGAN residual block with time (and optional latent) conditioning.

        h = conv1(act(GN1(x)))                           [up/down-sampled first if up/down]
        additive (DDPM):     h = GN2(h + W_t act(temb))
        scale-shift (AdaGN): h = GN2(h) (1 + t_s) + t_b,          [t_s, t_b] = W_t act(temb)
        z, 'adagn_scale':       h = h (1 + W_z z)                  (DiffAE)
        z, 'adagn_scale_shift': h = h (1 + z_s) + z_b,  [z_s, z_b] = W_z z
        out = (skip(x) + conv2(dropout(act(h)))) [/ sqrt 2 if skip_rescale]

    conv2 is zero-initialised; skip is the identity or a 1x1 projection (NIN) when channels change.
    """
    out_ch: Optional[int] = None
    dropout: float = 0.0
    scale_shift_norm: bool = False
    z_modes: Sequence[str] = ()
    up: bool = False
    down: bool = False
    skip_rescale: bool = False
    norm_groups: Optional[int] = None      # GroupNorm groups (None: min(C // 4, 32)) and eps
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, z=None, train: bool = False):
        c_in = x.shape[-1]
        c_out = self.out_ch or c_in
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gn = dict(param_dtype=self.param_dtype, groups=self.norm_groups, eps=self.norm_eps)
        h = nn.silu(group_norm(c_in, name="norm1", **gn)(x))
        h = h.astype(self.dtype)
        x = x.astype(self.dtype)
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        if self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv(c_out, name="conv1", **kw)(h)
        if temb is not None:
            n = 2 * c_out if self.scale_shift_norm else c_out
            t_out = dense(n, (P.EMBED, P.MLP), name="temb_proj", **kw)(nn.silu(temb))
            t_out = t_out.astype(jnp.float32)[:, None, None, :]
        if temb is not None and not self.scale_shift_norm:
            h = h + t_out
        h = group_norm(c_out, name="norm2", **gn)(h)
        if temb is not None and self.scale_shift_norm:
            t_s, t_b = jnp.split(t_out, 2, axis=-1)
            h = h * (1.0 + t_s) + t_b
        if "adagn_scale" in self.z_modes:
            z_s = dense(c_out, (P.COND, P.MLP), name="z_scale", **kw)(z)
            h = h * (1.0 + z_s.astype(jnp.float32)[:, None, None, :])
        if "adagn_scale_shift" in self.z_modes:
            zz = dense(2 * c_out, (P.COND, P.MLP), name="z_scale_shift", **kw)(z)
            z_s, z_b = jnp.split(zz.astype(jnp.float32)[:, None, None, :], 2, axis=-1)
            h = h * (1.0 + z_s) + z_b
        h = nn.silu(h).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(c_out, name="conv2", init=default_init(0.0), **kw)(h)
        if c_in != c_out:
            x = dense(c_out, (P.EMBED, P.MLP), name="skip", **kw)(x)
        out = x + h
        return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


DOWNSAMPLE_PADDINGS = ("same", "symmetric")


class Downsample(nn.Module):
    """H -> H/2: 3x3 stride-2 conv or 2x2 average pooling. The conv's padding: 'same' (DDPM's TF
    'SAME': 0 before, 1 after each spatial axis = diffusers' downsample_padding=0) or 'symmetric'
    (1 on each side = diffusers' downsample_padding=1, PyTorch's padding=1)."""
    with_conv: bool = True
    padding: str = "same"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"Downsample padding {self.padding!r}; expected one of "
                             f"{DOWNSAMPLE_PADDINGS}")
        if self.with_conv:
            pad = "SAME" if self.padding == "same" else ((1, 1), (1, 1))
            return conv(x.shape[-1], stride=2, name="conv", padding=pad, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
        return downsample_avg(x)


class Upsample(nn.Module):
    """H -> 2H: nearest-neighbour, then a 3x3 conv if `with_conv`."""
    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = upsample_nearest(x)
        if self.with_conv:
            x = conv(x.shape[-1], name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x
