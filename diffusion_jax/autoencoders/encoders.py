"""Image encoders of diffusion autoencoders (Flax linen, NHWC) and their latent heads.

    SemanticEncoder (DiffAE, Preechakul et al. 2022; phizaz/diffae's BeatGANsEncoderModel):
        h = conv_in(x); the UNet's down path without time conditioning (ResBlocks [+ attention at
        attn_resolutions], Downsample between levels); [mid: ResBlock, Attn, ResBlock];
        h = mean_{H, W} SiLU(GN(h))  (pool='mean', DiffAE)  or  flatten(SiLU(GN(h)))  (pool='flatten');
        latent head on h. Global average pooling keeps only what the local features of the last level
        say, not where they are: with a shallow encoder on small images (the embedded digits) it loses
        the layout that decides the class, and z carries little (issue 12); 'flatten' keeps it.
    ConvEncoder (DMZ, Proszewska et al. 2025; exlab-research/dmz's BernoulliEncoder):
        (3x3 conv, stride 2, padding 1 -> BatchNorm | GroupNorm -> LeakyReLU(0.01)) until 2x2,
        h = flatten (2 * 2 * C_last, in (H, W, C) order);  latent head on h.

Latent heads (`LatentHead`, field `latent` of both encoders; d = z_dim):
    'continuous'  z = W h + b                                   (d,)
    'gaussian'    [mean, logvar] = W h + b;  z = mean + exp(logvar / 2) n, n ~ N(0, I) in training,
                  z = mean in evaluation; kl = KL(N(mean, exp(logvar)) || N(0, I))
    'binary'      logits = (W h + b) reshaped (d, 2); z = Gumbel-softmax per bit, tau, soft in
                  training, hard one-hot in evaluation, flattened to 2d values; kl to Bernoulli(1/2)^d;
                  straight_through=True: hard one-hot samples in training too, with the soft sample's
                  gradient (the decoder never sees soft codes, so train and test inputs agree)

Randomness: the noise of a stochastic latent in training comes from the rng stream 'latent'
(`rngs={'latent': key}`); dropout (SemanticEncoder) from 'dropout'. In evaluation a binary code is
the mode one_hot(argmax logits) (deterministic), unless `eval_sample=True`, which draws a hard Gumbel
sample as DMZ's code does (`F.gumbel_softmax(h, hard=not self.training)`), also from 'latent'.
BatchNorm keeps running statistics in the 'batch_stats' collection (momentum 0.9, i.e. PyTorch's
0.1; eps 1e-5) and normalises with them when train=False.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.autoencoders.latents import (LatentOutput, binary_kl, check_latent_type, gaussian_kl,
                                                gumbel_softmax)
from diffusion_jax.networks import partitioning as P
from diffusion_jax.networks.layers import AttnBlock, Downsample, ResBlock, conv, dense, group_norm

NORMS = ("batch", "group")
POOLS = ("mean", "flatten")


def _check_image(x, who: str):
    if x.ndim != 4:
        raise ValueError(f"{who} takes images of shape (B, H, W, C) (NHWC), got shape {tuple(x.shape)}")


class LatentHead(nn.Module):
    """Features h (B, F) -> LatentOutput for `latent` in LATENT_TYPES with z_dim = d (see module doc)."""
    latent: str = "continuous"
    z_dim: int = 512
    tau: float = 1.0
    eval_sample: bool = False
    straight_through: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False, tau=None) -> LatentOutput:
        """tau: the Gumbel-softmax temperature for this call (e.g. a schedule's); None: self.tau."""
        check_latent_type(self.latent)
        h = h.astype(jnp.float32)
        b, d = h.shape[0], self.z_dim
        width = {"continuous": d, "gaussian": 2 * d, "binary": 2 * d}[self.latent]
        out = dense(width, (P.EMBED, P.COND), name="proj")(h)
        if self.latent == "continuous":
            return LatentOutput(out, kl=jnp.zeros((b,), jnp.float32))
        if self.latent == "gaussian":
            mean, logvar = jnp.split(out, 2, axis=-1)
            z = mean
            if train:
                z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self._latent_key(), mean.shape)
            return LatentOutput(z, mean=mean, logvar=logvar, kl=gaussian_kl(mean, logvar))
        logits = out.reshape(b, d, 2)
        key = self._latent_key() if (train or self.eval_sample) else None
        z = gumbel_softmax(key, logits, self.tau if tau is None else tau,
                           hard=self.straight_through or not train)
        return LatentOutput(z.reshape(b, 2 * d), logits=logits, kl=binary_kl(logits))

    def _latent_key(self):
        if not self.has_rng("latent"):
            raise ValueError(f"a {self.latent!r} latent draws noise here (train=True, or eval_sample=True): "
                             "pass rngs={'latent': key} (encode_fn(...)(..., rng=key))")
        return self.make_rng("latent")


class SemanticEncoder(nn.Module):
    """DiffAE's semantic encoder: a half UNet, pooling ('mean': DiffAE's global average; 'flatten')
    and a latent head.

    x (B, H, W, C) with H, W divisible by 2**(len(ch_mult) - 1) -> LatentOutput with z (B, z_dim)
    (2 z_dim for 'binary'). Level l has ch * ch_mult[l] channels; `use_mid` adds the UNet's middle
    block (ResBlock, AttnBlock, ResBlock), as DiffAE's encoder has.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    z_dim: int = 512
    latent: str = "continuous"
    use_mid: bool = True
    resample_with_conv: bool = True
    num_heads: int = 1
    pool: str = "mean"
    tau: float = 1.0
    eval_sample: bool = False
    straight_through: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, tau=None) -> LatentOutput:
        check_latent_type(self.latent)
        if self.pool not in POOLS:
            raise ValueError(f"unknown SemanticEncoder pool {self.pool!r}; expected one of {POOLS}")
        _check_image(x, "SemanticEncoder")
        f = 2 ** (len(self.ch_mult) - 1)
        _, height, width, _ = x.shape
        if height % f or width % f:
            raise ValueError(
                f"SemanticEncoder with {len(self.ch_mult)} levels (ch_mult={tuple(self.ch_mult)}) needs H and W "
                f"divisible by {f}; got images of shape {tuple(x.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def res(name, out_ch=None):
            return ResBlock(out_ch=out_ch, dropout=self.dropout, name=name, **kw)

        def attn(name):
            return AttnBlock(num_heads=self.num_heads, name=name, **kw)

        h = conv(self.ch, name="conv_in", **kw)(x.astype(self.dtype))
        for l, mult in enumerate(self.ch_mult):
            for b in range(self.num_res_blocks):
                h = res(f"down_{l}_{b}_res", self.ch * mult)(h, None, None, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{l}_{b}_attn")(h)
            if l != len(self.ch_mult) - 1:
                h = Downsample(self.resample_with_conv, name=f"down_{l}_downsample", **kw)(h)
        if self.use_mid:
            h = res("mid_res0")(h, None, None, train)
            h = attn("mid_attn")(h)
            h = res("mid_res1")(h, None, None, train)
        h = nn.silu(group_norm(h.shape[-1], name="norm_out", param_dtype=self.param_dtype)(h))
        h = h.astype(jnp.float32)
        h = jnp.mean(h, axis=(1, 2)) if self.pool == "mean" else h.reshape(h.shape[0], -1)
        return LatentHead(self.latent, self.z_dim, self.tau, self.eval_sample, self.straight_through,
                          name="head")(h, train, tau)


class ConvEncoder(nn.Module):
    """DMZ's encoder: stride-2 3x3 convs + norm + LeakyReLU down to 2x2, flatten, latent head.

    x (B, H, W, C) with H = W = 2**k, k >= 2 -> LatentOutput; k - 1 conv layers, layer i with
    channels[i] (default ch * 2**i: 32, 64, 128, 256 on 32x32, as DMZ). norm: 'batch' (running
    statistics in 'batch_stats') or 'group'.
    """
    ch: int = 32
    channels: Optional[Sequence[int]] = None
    norm: str = "batch"
    negative_slope: float = 0.01
    bn_momentum: float = 0.9
    z_dim: int = 16
    latent: str = "binary"
    tau: float = 1.0
    eval_sample: bool = False
    straight_through: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def num_layers(self, size: int) -> int:
        """k - 1 for images of size 2**k (the stride-2 convs that reach 2x2)."""
        return max(int(size).bit_length() - 2, 0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, tau=None) -> LatentOutput:
        check_latent_type(self.latent)
        if self.norm not in NORMS:
            raise ValueError(f"unknown ConvEncoder norm {self.norm!r}; expected one of {NORMS}")
        _check_image(x, "ConvEncoder")
        _, height, width, _ = x.shape
        if height != width or height < 4 or height & (height - 1):
            raise ValueError(f"ConvEncoder needs square images with H = W = 2**k >= 4, i.e. shape (B, 2**k, 2**k, C); "
                             f"got shape {tuple(x.shape)}")
        n = self.num_layers(height)
        channels = (tuple(self.ch * 2 ** i for i in range(n)) if self.channels is None
                    else tuple(self.channels))
        if len(channels) != n:
            raise ValueError(f"ConvEncoder on {height}x{width} images has {n} stride-2 layers (down to 2x2), "
                             f"but channels={channels} names {len(channels)}")
        h = x.astype(self.dtype)
        for i, c in enumerate(channels):
            h = conv(c, 3, 2, padding=((1, 1), (1, 1)), name=f"conv_{i}", dtype=self.dtype,
                     param_dtype=self.param_dtype)(h)
            if self.norm == "batch":
                h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                                 dtype=jnp.float32, param_dtype=self.param_dtype, name=f"norm_{i}",
                                 scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (P.NORM,)),
                                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                        (P.NORM,)))(h)
            else:
                h = group_norm(c, name=f"norm_{i}", param_dtype=self.param_dtype)(h)
            h = nn.leaky_relu(h, self.negative_slope).astype(self.dtype)
        h = h.reshape(h.shape[0], -1)
        return LatentHead(self.latent, self.z_dim, self.tau, self.eval_sample, self.straight_through,
                          name="head")(h, train, tau)


ENCODERS = {"semantic": SemanticEncoder, "conv": ConvEncoder}

__all__ = ["ENCODERS", "NORMS", "POOLS", "ConvEncoder", "LatentHead", "SemanticEncoder"]
