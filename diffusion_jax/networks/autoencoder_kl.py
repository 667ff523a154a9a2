"""KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), the layout of
diffusers' `AutoencoderKL` (e.g. stabilityai/sd-vae-ft-mse), NHWC.

    encoder:  conv_in -> [ResBlock x layers_per_block (+ Downsample except last)] per level
              -> mid (ResBlock, Attn, ResBlock) -> GN, silu, conv_out (2 latent_channels)
              -> quant_conv (1x1)                                     = [mean, logvar]
    decoder:  post_quant_conv (1x1) -> conv_in -> mid -> [ResBlock x (layers_per_block + 1)
              (+ Upsample except last)] per level, channels reversed -> GN, silu, conv_out
    ResBlock: h = conv2(silu(GN2(conv1(silu(GN1(x))))));  out = skip(x) + h
              (skip: a 1x1 conv if the channels change, else the identity)
    Attn:     x + W_o softmax(Q K^T / sqrt(C)) V  over the H W positions of GN(x), one head
    Downsample: zero-pad right/bottom by 1, 3x3 conv stride 2 (no padding)
    Upsample:   nearest x2, 3x3 conv

GroupNorms have `norm_num_groups` groups, eps 1e-6, float32. The posterior is the diagonal Gaussian
N(mean, exp(logvar)) with logvar clipped to [-30, 20] (diffusers' `DiagonalGaussianDistribution`).
The diffusion model works on z = scaling_factor (sample - shift_factor) (`encode_latents`), which
`decode_latents` undoes; SD's VAE has scaling_factor 0.18215, shift 0.

    apply(variables, x, method='encode')       -> (mean, logvar), each (B, h, w, latent_channels)
    apply(variables, z, method='decode')       -> (B, H, W, out_channels) float32
    apply(variables, x, key, method='encode_latents') -> scaling (mean + std eps - shift)
                                                  (key None: the posterior mean)
    apply(variables, z, method='decode_latents') -> decode(z / scaling + shift)
    apply(variables, x, key=None)              -> (decode(sample), mean, logvar)  (init, training)

Parameters carry logical axis names (see `partitioning`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.networks import partitioning as P
from diffusion_jax.networks.layers import MultiHeadAttention, conv, upsample_nearest

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _group_norm(groups: int, name: str, param_dtype) -> nn.GroupNorm:
    """float32 GroupNorm, eps 1e-6, exact (two-pass) variance."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype, name=name,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (P.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (P.NORM,)))


class VAEResBlock(nn.Module):
    """out = skip(x) + conv2(silu(GN2(conv1(silu(GN1(x)))))), skip a 1x1 conv when channels change."""
    out_ch: int
    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_group_norm(self.groups, "norm1", self.param_dtype)(x)).astype(self.dtype)
        h = conv(self.out_ch, 3, name="conv1", **kw)(h)
        h = nn.silu(_group_norm(self.groups, "norm2", self.param_dtype)(h)).astype(self.dtype)
        h = conv(self.out_ch, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, 1, name="conv_shortcut", **kw)(x.astype(self.dtype))
        return x + h


class VAEAttention(nn.Module):
    """x + W_o Attn(GN(x)) over all H W positions, one head of width C (scale 1 / sqrt(C))."""
    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _group_norm(self.groups, "norm", self.param_dtype)(x).astype(self.dtype)
        h = MultiHeadAttention(1, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
            h.reshape(b, hh * ww, c))
        return x + h.reshape(b, hh, ww, c).astype(x.dtype)


class _Mid(nn.Module):
    groups: int
    attention: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = VAEResBlock(c, self.groups, name="res_0", **kw)(x)
        if self.attention:
            x = VAEAttention(self.groups, name="attn", **kw)(x)
        return VAEResBlock(c, self.groups, name="res_1", **kw)(x)


class _VAEStack(nn.Module):
    """The fields the encoder and the decoder share."""
    out_ch: int
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class VAEEncoder(_VAEStack):
    """x (B, H, W, C_in) -> (B, H / 2^(L-1), W / 2^(L-1), out_ch), L = len(block_out_channels)."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = self.norm_num_groups
        h = conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = VAEResBlock(ch, g, name=f"down_{i}_res_{j}", **kw)(h)
            if i != last:
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = conv(ch, 3, 2, padding="VALID", name=f"down_{i}_downsample", **kw)(h)
        h = _Mid(g, self.mid_attention, name="mid", **kw)(h)
        h = nn.silu(_group_norm(g, "norm_out", self.param_dtype)(h)).astype(self.dtype)
        return conv(self.out_ch, 3, name="conv_out", **kw)(h)


class VAEDecoder(_VAEStack):
    """z (B, h, w, C_z) -> (B, h 2^(L-1), w 2^(L-1), out_ch)."""

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = self.norm_num_groups
        chans = list(reversed(self.block_out_channels))
        h = conv(chans[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        h = _Mid(g, self.mid_attention, name="mid", **kw)(h)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                h = VAEResBlock(ch, g, name=f"up_{i}_res_{j}", **kw)(h)
            if i != len(chans) - 1:
                h = conv(ch, 3, name=f"up_{i}_upsample", **kw)(upsample_nearest(h))
        h = nn.silu(_group_norm(g, "norm_out", self.param_dtype)(h)).astype(self.dtype)
        return conv(self.out_ch, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """Latent-diffusion first stage; see the module docstring. Outputs are float32."""
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side: 2^(len(block_out_channels) - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        chans = tuple(self.block_out_channels)
        if not chans or any(c % self.norm_num_groups for c in chans):
            raise ValueError(f"block_out_channels {chans} must be non-empty multiples of "
                             f"norm_num_groups={self.norm_num_groups}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(block_out_channels=chans, layers_per_block=self.layers_per_block,
                    norm_num_groups=self.norm_num_groups, mid_attention=self.mid_block_attention)
        z2 = 2 * self.latent_channels
        self.encoder = VAEEncoder(z2, **arch, **kw)
        self.decoder = VAEDecoder(self.out_channels, **arch, **kw)
        self.quant_conv = conv(z2, 1, **kw) if self.use_quant_conv else None
        self.post_quant_conv = (conv(self.latent_channels, 1, **kw) if self.use_post_quant_conv
                                else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, H, W, C) in [-1, 1] -> posterior (mean, logvar), logvar clipped to [-30, 20]."""
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"AutoencoderKL.encode needs (B, H, W, C) with H, W divisible by {f}, "
                             f"got shape {tuple(x.shape)}")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, latent_channels) (unscaled) -> image (B, h f, w f, out_channels) float32."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode needs (B, h, w, {self.latent_channels}), got "
                             f"shape {tuple(z.shape)}")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def encode_latents(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """scaling_factor (mean + exp(logvar / 2) eps - shift_factor), eps ~ N(0, I) from `key`;
        key None gives the posterior mean (mode)."""
        mean, logvar = self.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return self.scaling_factor * (z - self.shift_factor)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """decode(z / scaling_factor + shift_factor): inverse of `encode_latents`' scaling."""
        return self.decode(jnp.asarray(z, jnp.float32) / self.scaling_factor + self.shift_factor)

    def __call__(self, x: jax.Array, key: Optional[jax.Array] = None):
        """(decode(sample or mean), mean, logvar): reconstruction and posterior in one call."""
        mean, logvar = self.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return self.decode(z), mean, logvar
