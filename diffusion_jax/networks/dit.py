"""Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero conditioning.

    tokens = PatchEmbed_p(x) + pos     (p x p patches -> N = HW / p^2 tokens; fixed 2-D sin-cos pos)
    c      = MLP(emb(time_scale * t - time_offset)) [+ E[label]] [+ W_z z if 'time_add' in z_conditioning]
    block:  (s1, a1, g1, s2, a2, g2) = W_mod silu(c)           (W_mod zero-initialised)
            h = h + g1 * Attn(LN(h) (1 + a1) + s1)
            h = h + g2 * MLP(LN'(h) (1 + a2) + s2)
    final:  (s, a) = W_f silu(c);  out = unpatchify(W_o (LN(h) (1 + a) + s))   (W_f, W_o zero)

so the output is exactly zero at initialisation. LayerNorms are affine-free, eps 1e-6 (LN' before the
MLP: `mlp_norm_eps`), float32.

Conventions of published checkpoints (diffusers' `DiTTransformer2DModel`, facebookresearch/DiT), each a
field whose default keeps the library's own convention:
  time_offset = 1 with time_scale = T: a model trained on integer steps n sees n = T t - 1 on the
      `DiscreteDDPM` grid t_n = (n + 1) / T;
  time_flip_sin_cos: the frequency embedding is [cos, sin] instead of [sin, cos];
  time_freq_shift s: sinusoidal frequencies w_k = 10000^(-k / (half - s)), half = dim / 2 (1: DDPM's
      and diffusers' DiT, the default; 0: facebookresearch/DiT's own `timestep_embedding`);
  pos_embed_order 'wh': the first half of the position channels embeds the column index (MAE / DiT's
      `get_2d_sincos_pos_embed`), 'hw' the row index;
  pos_embed_base_size b: a g_h x g_w token grid uses positions (i b / g_h, j b / g_w) (diffusers'
      `PatchEmbed` on inputs of another size than it was trained on); None: integer positions.
Each block sows its output tokens (B, N, hidden_size) as 'block_{i}' (token n = row-major patch
(n // (W/p), n % (W/p))); `block_names(module, input_shape)` lists them.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.networks import partitioning as P
from diffusion_jax.networks.embeddings import sincos_2d_posemb, time_input, timestep_embedding
from diffusion_jax.networks.layers import MultiHeadAttention, dense
from diffusion_jax.networks.unet import FeatureInfo, _check_z_modes, _split_cond

DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()


def _layer_norm(name: str, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=jnp.float32, name=name)


def _sinusoidal(s, dim: int, shift: float):
    """(B,) -> (B, dim) [sin(s w), cos(s w)], w_k = 10000^(-k / (dim // 2 - shift)), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
    args = s[:, None] * freqs[None, :]
    return jnp.pad(jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1),
                   ((0, 0), (0, dim % 2)))


def _pos_embed(dim: int, gh: int, gw: int, order: str, base_size: Optional[int]) -> np.ndarray:
    """(gh * gw, dim) fixed 2-D sin-cos embedding, row-major tokens; see the module docstring."""
    if order not in ("hw", "wh"):
        raise ValueError(f"pos_embed_order must be 'hw' or 'wh', got {order!r}")
    if order == "hw" and base_size is None:
        return sincos_2d_posemb(dim, gh, gw)
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim % 4 == 0, got {dim}")
    rows, cols = np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64)
    if base_size is not None:
        rows, cols = rows * (base_size / gh), cols * (base_size / gw)
    rows, cols = np.meshgrid(rows, cols, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_d(pos):
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    first, second = (rows, cols) if order == "hw" else (cols, rows)
    return np.concatenate([one_d(first), one_d(second)], axis=1).astype(np.float32)


def _modulate(x, shift, scale):
    """x (1 + scale) + shift, broadcast over tokens, float32."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (see the module docstring)."""
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    mlp_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, c, train: bool = False):
        d = h.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = dense(6 * d, (P.EMBED, P.MLP), name="adaLN", init=_zeros, **kw)(nn.silu(c))
        s1, a1, g1, s2, a2, g2 = jnp.split(mod.astype(jnp.float32), 6, axis=-1)
        x = _modulate(_layer_norm("norm1")(h), s1, a1).astype(self.dtype)
        x = MultiHeadAttention(self.num_heads, out_init=_xavier, name="attn", **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        h = h + (g1[:, None, :] * x).astype(h.dtype)
        x = _modulate(_layer_norm("norm2", self.mlp_norm_eps)(h), s2, a2).astype(self.dtype)
        x = dense(int(d * self.mlp_ratio), (P.EMBED, P.MLP), name="fc1", init=_xavier, **kw)(x)
        x = nn.gelu(x, approximate=True)
        x = dense(d, (P.MLP, P.EMBED), name="fc2", init=_xavier, **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return h + (g2[:, None, :] * x).astype(h.dtype)


class DiT(nn.Module):
    """Diffusion Transformer; `apply(variables, x, t, cond=None, train=False)` like `UNet`.

    x: (B, H, W, C) with H, W divisible by `patch_size`; output (B, H, W, out_channels or C),
    float32.
    cond: 'label' (B,) int (needs `num_classes`; missing -> null class `num_classes`), 'z' (B, D)
    float (needs z_conditioning=('time_add',)).
    """
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: Optional[int] = None
    out_channels: Optional[int] = None
    z_conditioning: Sequence[str] = ()     # () or ('time_add',)
    dropout: float = 0.0
    time_embedding: str = "sinusoidal"
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    frequency_dim: int = 256
    time_offset: float = 0.0               # embedding input time_scale * t - time_offset
    time_input: str = "linear"             # 'linear' (t) | 'log' (log t), before scale and offset
    time_flip_sin_cos: bool = False        # [cos, sin] frequency embedding (diffusers / DiT)
    time_freq_shift: float = 1.0           # w_k = 10000^(-k / (half - time_freq_shift))
    pos_embed_order: str = "hw"            # 'hw' | 'wh' (first half of channels: row | column)
    pos_embed_base_size: Optional[int] = None
    mlp_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def feature_info(self, input_shape: Sequence[int]) -> dict[str, FeatureInfo]:
        """'block_{i}' -> FeatureInfo((N, hidden_size), patch_size), N = HW / patch_size^2."""
        n = (input_shape[-3] // self.patch_size) * (input_shape[-2] // self.patch_size)
        return {f"block_{i}": FeatureInfo((n, self.hidden_size), self.patch_size)
                for i in range(self.depth)}

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[dict] = None,
                 train: bool = False) -> jax.Array:
        _check_z_modes(self.z_conditioning, ("time_add",))
        b, height, width, c_in = x.shape
        p, d = self.patch_size, self.hidden_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} not divisible by patch size {p}")
        gh, gw = height // p, width // p
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        label, z = _split_cond(cond, b, self.num_classes, tuple(self.z_conditioning))

        # Patch embedding (a p x p stride-p conv, xavier on the flattened kernel) + fixed pos-emb.
        h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed",
                    kernel_init=nn.with_logical_partitioning(
                        _xavier, (P.CONV_H, P.CONV_W, P.CONV_IN, P.CONV_OUT)),
                    bias_init=nn.with_logical_partitioning(_zeros, (P.BIAS,)), **kw)(
                        x.astype(self.dtype))
        pos = _pos_embed(d, gh, gw, self.pos_embed_order, self.pos_embed_base_size)
        h = h.reshape(b, gh * gw, d).astype(jnp.float32) + pos[None]
        h = h.astype(self.dtype)

        # Conditioning embedding c.
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        s = time_input(t, self.time_input, self.time_scale, self.time_offset)
        if self.time_embedding == "sinusoidal" and self.time_freq_shift != 1.0:
            c = _sinusoidal(s, self.frequency_dim, self.time_freq_shift)
        else:
            c = timestep_embedding(s, self.frequency_dim, self.time_embedding, self.fourier_scale)
        if self.time_flip_sin_cos:
            half = self.frequency_dim // 2
            c = jnp.concatenate([c[:, half:2 * half], c[:, :half], c[:, 2 * half:]], axis=-1)
        std = nn.initializers.normal(0.02)
        c = dense(d, (P.EMBED, P.MLP), name="t_dense0", init=std, **kw)(c)
        c = dense(d, (P.MLP, P.EMBED), name="t_dense1", init=std, **kw)(nn.silu(c))
        if label is not None:
            c = c + nn.Embed(self.num_classes + 1, d, name="label_embed",
                             embedding_init=nn.with_logical_partitioning(std, (P.CLASSES, P.EMBED)),
                             **kw)(label)
        if z is not None:
            c = c + dense(d, (P.COND, P.EMBED), name="z_embed", **kw)(z)

        for i in range(self.depth):
            h = DiTBlock(self.num_heads, self.mlp_ratio, self.dropout, self.mlp_norm_eps,
                         name=f"dit_block_{i}", **kw)(h, c, train)
            self.sow("intermediates", f"block_{i}", h)

        # Final adaLN-Zero layer and unpatchify.
        c_out = self.out_channels or c_in
        mod = dense(2 * d, (P.EMBED, P.MLP), name="final_adaLN", init=_zeros, **kw)(nn.silu(c))
        shift, scale = jnp.split(mod.astype(jnp.float32), 2, axis=-1)
        h = _modulate(_layer_norm("final_norm")(h), shift, scale).astype(self.dtype)
        h = dense(p * p * c_out, (P.EMBED, P.MLP), name="final_linear", init=_zeros, **kw)(h)
        h = h.reshape(b, gh, gw, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, c_out).astype(jnp.float32)


def dit_config(name: str) -> dict:
    """Field dict for a named size, e.g. 'DiT-XL/2' -> depth, hidden_size, num_heads, patch_size.

    Also accepts a bare size 'S' | 'B' | 'L' | 'XL' (patch size then left to the caller).
    """
    m = re.fullmatch(r"(?:DiT-)?(S|B|L|XL)(?:/(\d+))?", name)
    if m is None:
        raise ValueError(f"unknown DiT config {name!r}; expected e.g. 'DiT-B/4' or 'XL'")
    cfg = dict(DIT_SIZES[m.group(1)])
    if m.group(2):
        cfg["patch_size"] = int(m.group(2))
    return cfg


def make_dit(name: str, **overrides) -> DiT:
    """`DiT` of a named size ('DiT-S/2', 'DiT-B/4', 'DiT-L/8', 'DiT-XL/2', ...) with overrides."""
    return DiT(**{**dit_config(name), **overrides})
