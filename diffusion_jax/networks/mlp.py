"""DiffAE's latent denoiser: an MLP with the input concatenated to every hidden layer (`MLPSkipNet`,
phizaz/diffae `model/latentnet.py`, the "latent DDIM" of Preechakul et al. 2022).

    c   = W_t2 silu(W_t1 emb(time_scale * t))                   time embedding, width time_dim
    h_0 = z
    layer i < L - 1:   u   = W_i [h_i ; z]     ([h_i ; z] = h_i for i = 0: the skip connections)
                       u   = u (1 + W_c,i silu(c))              'scale' (DiffAE, condition_bias 1)
                             u (1 + W_s,i silu(c)) + W_b,i silu(c)   'scale_shift'
                             u + W_c,i silu(c)                  'add'
                       h_{i+1} = dropout(silu(LN(u)))           (LN: LayerNorm with scale and bias)
    out = W_{L-1} [h_{L-1} ; z]                                 (no norm, no activation)

Differences from DiffAE, on purpose: the output layer W_{L-1} is zero-initialised (the untrained
network predicts eps = 0, the library's convention for every denoiser's last layer); hidden kernels
are He-normal (DiffAE's `kaiming_normal_(nonlinearity='relu')`), biases zero. DiffAE embeds the
integer timestep n; with `time_scale` = T = 1000 and a `DiscreteDDPM` (t = (n + 1) / T) the
embedding input is n + 1.

    module.apply(variables, x (B, D), t (B,), cond=None, train=False, rngs={'dropout': key})
        -> (B, D) float32;  `cond` is accepted for the common denoiser signature and ignored.

Parameter logical axes: hidden / output kernels ('embed', 'mlp') / ('mlp', 'embed'), time MLP
('embed', 'mlp'), ('mlp', 'embed'), per-layer conditioning ('embed', 'mlp'), LayerNorm 'norm',
biases 'bias' (see `partitioning`).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.networks import partitioning as P
from diffusion_jax.networks.embeddings import timestep_embedding
from diffusion_jax.networks.layers import dense

TIME_CONDITIONINGS = ("scale", "scale_shift", "add")

_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_zeros = nn.initializers.zeros_init()


class MLPSkipNet(nn.Module):
    """DiffAE's latent MLP with skip connections; `apply(variables, x, t, cond=None, train=False)`.

    x: (B, D) float; t: (B,) or scalar float (embedded as time_scale * t); output (B, D) float32.
    num_layers >= 2 Dense layers (num_layers - 1 hidden ones of width `hidden`, then the output
    layer); see the module docstring for the equations.
    """
    num_layers: int = 10
    hidden: int = 2048
    time_embed_dim: int = 64              # width of the sinusoidal embedding
    time_dim: Optional[int] = None        # width of the time MLP c; None: D (DiffAE: num_channels)
    time_conditioning: str = "scale"      # one of TIME_CONDITIONINGS
    use_norm: bool = True
    dropout: float = 0.0
    time_embedding: str = "sinusoidal"    # 'sinusoidal' | 'fourier'
    time_scale: float = 1000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[dict] = None,
                 train: bool = False) -> jax.Array:
        if self.time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(f"unknown time_conditioning {self.time_conditioning!r}; "
                             f"expected one of {TIME_CONDITIONINGS}")
        if self.num_layers < 2:
            raise ValueError(f"MLPSkipNet needs num_layers >= 2, got {self.num_layers}")
        if x.ndim != 2:
            raise ValueError(f"MLPSkipNet takes vectors x of shape (B, D), got shape {x.shape}")
        batch, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))
        c = timestep_embedding(self.time_scale * t, self.time_embed_dim, self.time_embedding)
        width = self.time_dim or d
        c = dense(width, (P.EMBED, P.MLP), name="time_dense0", init=_he_normal, **kw)(c)
        c = dense(width, (P.MLP, P.EMBED), name="time_dense1", init=_he_normal, **kw)(nn.silu(c))
        c = nn.silu(c)

        z = x.astype(self.dtype)
        h = z
        for i in range(self.num_layers - 1):
            if i > 0:
                h = jnp.concatenate([h, z], axis=-1)
            h = dense(self.hidden, (P.EMBED, P.MLP), name=f"layer_{i}", init=_he_normal, **kw)(h)
            h = h.astype(jnp.float32)
            if self.time_conditioning == "scale_shift":
                mod = dense(2 * self.hidden, (P.EMBED, P.MLP), name=f"layer_{i}_time",
                            init=_he_normal, **kw)(c).astype(jnp.float32)
                scale, shift = jnp.split(mod, 2, axis=-1)
                h = h * (1.0 + scale) + shift
            else:
                mod = dense(self.hidden, (P.EMBED, P.MLP), name=f"layer_{i}_time",
                            init=_he_normal, **kw)(c).astype(jnp.float32)
                h = h * (1.0 + mod) if self.time_conditioning == "scale" else h + mod
            if self.use_norm:
                h = nn.LayerNorm(
                    epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                    name=f"layer_{i}_norm",
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (P.NORM,)),
                    bias_init=nn.with_logical_partitioning(_zeros, (P.NORM,)))(h)
            h = nn.silu(h)
            h = nn.Dropout(self.dropout)(h, deterministic=not train).astype(self.dtype)
        h = jnp.concatenate([h, z], axis=-1)
        out = dense(d, (P.MLP, P.EMBED), name="out", init=_zeros, **kw)(h)
        return out.astype(jnp.float32)
