"""DDGAN's time-conditional discriminator D(x_t, t, x_{t+1}) -> logit (Xiao et al. 2022, the layout of
the official `Discriminator_small`, simplified; NHWC):

    t_emb = MLP(sinusoidal(t)),  t the integer step 0..T-1
    h = conv3x3([x_t, x_{t+1}])                                   (2C input channels)
    per level: DownBlock  h1 = lrelu(conv(h)) + Dense(t_emb);  h1 = conv(lrelu(h1)), avg-pool 2;
               out = (h1 + avg_pool(conv1x1(h))) / sqrt(2)
    minibatch stddev: one channel with the mean over features of the std over groups of
    `stddev_group` examples (StyleGAN2), conv3x3, lrelu, sum over positions, Dense(1)

LeakyReLU slope 0.2. Returns (B,) float32 logits for the non-saturating losses and R1 of
`objectives.ddgan`.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.networks.embeddings import sinusoidal_embedding
from diffusion_jax.networks.layers import conv


def _lrelu(x):
    return nn.leaky_relu(x, 0.2)


def _avg_pool2(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class _DownBlock(nn.Module):
    out_ch: int

    @nn.compact
    def __call__(self, h, t_emb):
        h1 = _lrelu(conv(self.out_ch, 3, name="conv1")(h))
        h1 = h1 + nn.Dense(self.out_ch, name="t_proj")(t_emb)[:, None, None, :]
        h1 = _avg_pool2(conv(self.out_ch, 3, name="conv2")(_lrelu(h1)))
        skip = _avg_pool2(conv(self.out_ch, 1, name="skip")(h))
        return (h1 + skip) / math.sqrt(2.0)


def minibatch_stddev(h, group: int = 4):
    """Appends one channel: mean over (H, W, C) of the std over each group of `group` examples
    (StyleGAN2's minibatch standard deviation; group = min(group, B), B divisible by it)."""
    b, hh, ww, c = h.shape
    g = min(group, b)
    if b % g:
        raise ValueError(f"minibatch_stddev: batch {b} is not divisible by the group size {g}")
    y = h.reshape(g, b // g, hh, ww, c)
    std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)                   # (B/g, H, W, C)
    s = jnp.mean(std, axis=(1, 2, 3))                           # (B/g,)
    s = jnp.tile(s, (g,))[:, None, None, None]                  # example i -> group i mod B/g
    return jnp.concatenate([h, jnp.broadcast_to(s, (b, hh, ww, 1))], axis=-1)


class TimeConditionalDiscriminator(nn.Module):
    """D(x_t, t, x_{t+1}): see the module docstring. ch_mult: channel multipliers of the down blocks."""
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 4)
    t_dim: int = 128
    stddev_group: int = 4

    @nn.compact
    def __call__(self, x_t, t, x_tp1):
        if x_t.shape != x_tp1.shape or x_t.ndim != 4:
            raise ValueError(f"discriminator inputs x_t {x_t.shape} and x_tp1 {x_tp1.shape} must be the "
                             f"same (B, H, W, C) shape")
        f = 2 ** len(self.ch_mult)
        if x_t.shape[1] % f or x_t.shape[2] % f:
            raise ValueError(f"discriminator: image side must be a multiple of {f} "
                             f"(len(ch_mult) = {len(self.ch_mult)} down blocks), got {x_t.shape[1:3]}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        e = sinusoidal_embedding(t, self.t_dim)
        e = nn.Dense(self.t_dim, name="t_mlp_0")(e)
        e = nn.Dense(self.t_dim, name="t_mlp_1")(_lrelu(e))
        h = conv(self.ch, 3, name="conv_in")(jnp.concatenate([x_t, x_tp1], -1).astype(jnp.float32))
        for i, m in enumerate(self.ch_mult):
            h = _DownBlock(self.ch * m, name=f"down_{i}")(h, _lrelu(e))
        h = minibatch_stddev(h, self.stddev_group)
        h = _lrelu(conv(self.ch * self.ch_mult[-1], 3, name="conv_out")(h))
        return nn.Dense(1, name="logit")(jnp.sum(h, axis=(1, 2)))[:, 0].astype(jnp.float32)
