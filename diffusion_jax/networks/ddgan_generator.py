"""DDGAN's generator G(x_{t+1}, t, z) -> x0' (Xiao et al. 2022, the official `NCSNpp` of
ncsnpp_generator_adagn.py, as the library's UNet expresses it; NHWC):

    w = mapping(z):  PixelNorm(z) = z / sqrt(mean(z^2) + 1e-8),  Dense(z_emb_dim), SiLU,
                     n_mlp x (Dense(z_emb_dim), SiLU)
    x0' = tanh(UNet(x_{t+1}, t, {'z': w}))      (tanh unless use_tanh=False: official not_use_tanh)

The UNet takes w by its 'adagn_scale_shift' z-conditioning (`layers.ResBlock`):
h = GN(h) (1 + W_s w) + W_b w in every ResBlock, the official AdaptiveGroupNorm gamma GN(h) + beta
with gamma's bias initialised to 1 (the official block modulates both of its GroupNorms, the library's
ResBlock its second). t is the integer step 0..T-1; the UNet embeds time_scale * t (configs set
time_scale = 1: the official positional embedding of the integer step).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.networks import partitioning as P
from diffusion_jax.networks.layers import dense

__all__ = ["DDGANGenerator", "pixel_norm"]


def pixel_norm(z, eps: float = 1e-8):
    """z / sqrt(mean_k z_k^2 + eps) (StyleGAN's PixelNorm over the last axis)."""
    z = jnp.asarray(z, jnp.float32)
    return z * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + eps))


class DDGANGenerator(nn.Module):
    """G(x, t, z): `unet` (a networks.UNet with z_conditioning=('adagn_scale_shift',)) conditioned
    on the mapping network's w(z); see the module docstring. z: (B, nz)."""
    unet: Any
    nz: int = 100
    z_emb_dim: int = 256
    n_mlp: int = 4
    use_tanh: bool = True

    @nn.compact
    def __call__(self, x, t, z, train: bool = False):
        if z.ndim != 2 or z.shape[-1] != self.nz or z.shape[0] != x.shape[0]:
            raise ValueError(f"DDGAN generator: latent z must be (B, nz) = ({x.shape[0]}, {self.nz}), "
                             f"got {tuple(z.shape)}")
        w = dense(self.z_emb_dim, (P.COND, P.EMBED), name="mapping_0")(pixel_norm(z))
        w = nn.silu(w)
        for i in range(self.n_mlp):
            w = nn.silu(dense(self.z_emb_dim, (P.EMBED, P.EMBED), name=f"mapping_{i + 1}")(w))
        out = self.unet(x, t, cond={"z": w}, train=train)
        return jnp.tanh(out) if self.use_tanh else out
