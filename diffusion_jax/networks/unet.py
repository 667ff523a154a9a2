"""DDPM++ / NCSN++-family UNet (Ho et al. 2020; Song et al. 2021; Dhariwal & Nichol 2021).

With the defaults (ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
dropout=0.1, additive time conditioning, conv resampling) this is the DDPM CIFAR-10 network of the
original DDPM TF code (35,746,307 parameters on 32x32x3, the paper's 35.7M): score_sde's `ddpm.py`
blocks, with attention after *every* up-path ResBlock at an attention resolution (score_sde
attends once per up level: 35.2M).

    temb = W2 silu(W1 emb(time_scale * T(t) - time_offset))  [+ E[label]]  [+ W_z z  if 'time_add']
           (T = identity, or log for time_input='log': NCSN++ / CLD-SGM's Fourier features of log t)
    h = conv_in(x); skips = [h]
    down, level l = 0..L-1:  num_res_blocks x (ResBlock [+ AttnBlock if H in attn_resolutions]),
                             each output pushed to skips; then Downsample (not on the last level)
    mid:                     ResBlock, AttnBlock (unless mid_attn=False), ResBlock
    up,   level l = L-1..0:  (num_res_blocks + 1) x (ResBlock(concat(h, skips.pop())) [+ Attn]);
                             then Upsample (not on level 0)
    out = conv_out(silu(GN(h)))   (zero-initialised, cast to float32)

Conventions of published checkpoints (diffusers' `UNet2DModel`, `weights.diffusers.unet2d`), each
a field whose default is the library's own: time_offset = 1 with time_scale = T embeds the integer
step n = T t - 1 of the `DiscreteDDPM` grid t_n = (n + 1) / T; time_flip_sin_cos / time_freq_shift
(diffusers' flip_sin_to_cos / freq_shift, see `embeddings.sinusoidal_embedding`); norm_groups /
norm_eps of every GroupNorm; downsample_padding 'same' (TF's SAME: pad 0 before, 1 after, as DDPM
and diffusers' downsample_padding=0) or 'symmetric' (1 and 1); mid_attn (diffusers' add_attention).

Conditioning (`cond` dict, all optional): 'label' int (B,) needs `num_classes`; a missing label
means the null class `num_classes` (classifier-free guidance); 'z' float (B, D) enters as selected
by `z_conditioning` (see `ResBlock` / `AttnBlock`). Keys the configuration does not use are ignored.

Feature readouts (`mutable=['intermediates']`; each value is a 1-tuple holding (B, H, W, C) in the
compute dtype), names in execution order:
    'down_{l}_{b}'  output of down block b (ResBlock [+ attn]) at level l, b < num_res_blocks
    'mid'           output of the middle block
    'up_{l}_{b}'    output of up block b (ResBlock [+ attn]) at level l, b <= num_res_blocks
Level l has resolution H / 2**l and ch * ch_mult[l] channels (mid: the last level's).
With `repa_block` set, 'repa' holds that block's output through a 3-layer MLP projector (per
position, repa_dim channels, float32) for representation alignment (`objectives.repa_loss`); the
projector runs only when the intermediates are collected, so sampling pays nothing for it.
`block_names(module, input_shape)` lists them with their shapes in execution order (the
'intermediates' dict returned by flax may be key-sorted instead).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.networks import partitioning as P
from diffusion_jax.networks.embeddings import time_input, timestep_embedding
from diffusion_jax.networks.layers import (AttnBlock, Downsample, ResBlock, Upsample, conv, dense,
                                           default_init, group_norm)

Z_MODES = ("adagn_scale", "adagn_scale_shift", "cross_attn", "time_add")


class FeatureInfo(NamedTuple):
    """Per-example shape of a sown feature and its stride (downsampling factor) w.r.t. the input."""
    shape: tuple[int, ...]
    stride: int


def _split_cond(cond, batch: int, num_classes: Optional[int], z_modes: Sequence[str]):
    cond = cond or {}
    label = z = None
    if num_classes is not None:
        label = cond.get("label")
        if label is None:
            label = jnp.full((batch,), num_classes, jnp.int32)
    if z_modes:
        z = cond.get("z")
        if z is None:
            raise ValueError(f"z_conditioning={tuple(z_modes)} needs cond['z']")
    return label, z


def _check_z_modes(z_modes: Sequence[str], allowed: Sequence[str]):
    bad = [m for m in z_modes if m not in allowed]
    if bad:
        raise ValueError(f"unknown z_conditioning modes {bad}; allowed: {tuple(allowed)}")


class UNet(nn.Module):
    """DDPM++/NCSN++-family UNet; `apply(variables, x, t, cond=None, train=False)`.

    x: (B, H, W, C) NHWC; t: (B,) or scalar float (embedded as time_scale * t); output
    (B, H, W, out_channels or C) float32. See the module docstring for the architecture.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    time_embedding: str = "sinusoidal"     # 'sinusoidal' | 'fourier'
    time_scale: float = 1000.0             # embedding input is time_scale * t - time_offset
    time_offset: float = 0.0
    time_input: str = "linear"             # 'linear' (t) | 'log' (log t), before scale and offset
    time_flip_sin_cos: bool = False        # sinusoidal: [cos, sin] instead of [sin, cos]
    time_freq_shift: float = 1.0           # sinusoidal: w_k = 10000 ** (-k / (ch/2 - shift))
    fourier_scale: float = 16.0            # std of the Fourier frequencies
    num_classes: Optional[int] = None      # label embedding has num_classes + 1 rows (null class)
    out_channels: Optional[int] = None     # None: input channels; 2C for learned variance
    resblock_updown: bool = False          # BigGAN up/down ResBlocks instead of (Up|Down)sample
    resample_with_conv: bool = True
    num_heads: int = 1
    head_dim: Optional[int] = None         # if set, heads = channels // head_dim
    scale_shift_norm: bool = False         # AdaGN time conditioning (iDDPM/ADM) vs additive (DDPM)
    skip_rescale: bool = False             # residual sums scaled by 1/sqrt(2) (NCSN++)
    norm_groups: Optional[int] = None      # GroupNorm groups (None: min(C // 4, 32)) ...
    norm_eps: float = 1e-6                 # ... and epsilon, in every block
    downsample_padding: str = "same"       # stride-2 conv padding: 'same' | 'symmetric'
    mid_attn: bool = True                  # the middle block's attention
    z_conditioning: Sequence[str] = ()     # subset of Z_MODES
    repa_block: Optional[str] = None       # REPA: project this sown block's output ...
    repa_dim: int = 0                      # ... to repa_dim channels per position (sown as 'repa')
    repa_hidden: int = 0                   # the projector MLP's width (0: 4 ch)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def feature_info(self, input_shape: Sequence[int]) -> dict[str, FeatureInfo]:
        """Sown names -> FeatureInfo((H, W, C), stride), in execution order (no tracing)."""
        h, w = input_shape[-3], input_shape[-2]
        info = {}
        for l, m in enumerate(self.ch_mult):
            for b in range(self.num_res_blocks):
                info[f"down_{l}_{b}"] = FeatureInfo((h >> l, w >> l, self.ch * m), 2 ** l)
        last = len(self.ch_mult) - 1
        info["mid"] = FeatureInfo((h >> last, w >> last, self.ch * self.ch_mult[-1]), 2 ** last)
        for l in reversed(range(len(self.ch_mult))):
            for b in range(self.num_res_blocks + 1):
                info[f"up_{l}_{b}"] = FeatureInfo(
                    (h >> l, w >> l, self.ch * self.ch_mult[l]), 2 ** l)
        return info

    def _check_repa(self, input_shape) -> None:
        if self.repa_block is None:
            return
        names = self.feature_info(input_shape)
        if self.repa_block not in names:
            raise ValueError(f"repa_block {self.repa_block!r} is not a block of this UNet; blocks: "
                             f"{list(names)}")
        if self.repa_dim < 1:
            raise ValueError(f"repa_block={self.repa_block!r} needs repa_dim >= 1 (the target "
                             f"features' width), got {self.repa_dim}")

    def _sow(self, name: str, h: jax.Array) -> None:
        """Sows a block's output; the REPA block also gets its projection (Yu et al. 2025), computed
        only when the intermediates are collected (or at init, to create the projector)."""
        self.sow("intermediates", name, h)
        if name != self.repa_block or not (self.is_initializing()
                                           or self.is_mutable_collection("intermediates")):
            return
        width = self.repa_hidden or 4 * self.ch
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.silu(dense(width, (P.EMBED, P.MLP), name="repa_proj0", **kw)(h))
        y = nn.silu(dense(width, (P.MLP, P.MLP), name="repa_proj1", **kw)(y))
        y = dense(self.repa_dim, (P.MLP, P.EMBED), name="repa_proj2", **kw)(y)
        self.sow("intermediates", "repa", y.astype(jnp.float32))

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[dict] = None,
                 train: bool = False) -> jax.Array:
        _check_z_modes(self.z_conditioning, Z_MODES)
        batch, height, width, c_in = x.shape
        if height % 2 ** (len(self.ch_mult) - 1) or width % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"input {height}x{width} not divisible by 2**{len(self.ch_mult) - 1}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self._check_repa(x.shape)
        zm = tuple(self.z_conditioning)
        label, z = _split_cond(cond, batch, self.num_classes, zm)
        res_z = tuple(m for m in zm if m.startswith("adagn"))
        attn_z = "cross_attn" in zm

        # Time (+ label, + z) embedding.
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))
        temb = timestep_embedding(time_input(t, self.time_input, self.time_scale, self.time_offset),
                                  self.ch,
                                  self.time_embedding, self.fourier_scale,
                                  freq_shift=self.time_freq_shift,
                                  flip_sin_cos=self.time_flip_sin_cos)
        temb = dense(4 * self.ch, (P.EMBED, P.MLP), name="temb_dense0", **kw)(temb)
        temb = dense(4 * self.ch, (P.MLP, P.EMBED), name="temb_dense1", **kw)(nn.silu(temb))
        if label is not None:
            temb = temb + nn.Embed(
                self.num_classes + 1, 4 * self.ch, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(1.0), (P.CLASSES, P.EMBED)),
                name="label_embed")(label)
        if "time_add" in zm:
            temb = temb + dense(4 * self.ch, (P.COND, P.EMBED), name="z_temb", **kw)(z)

        gn = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps)

        def res(name, out_ch=None, up=False, down=False):
            return ResBlock(out_ch=out_ch, dropout=self.dropout,
                            scale_shift_norm=self.scale_shift_norm, z_modes=res_z, up=up,
                            down=down, skip_rescale=self.skip_rescale, name=name, **gn, **kw)

        def attn(name):
            return AttnBlock(num_heads=self.num_heads, head_dim=self.head_dim, z_token=attn_z,
                             name=name, **gn, **kw)

        # Down path.
        h = conv(self.ch, name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        num_levels = len(self.ch_mult)
        for l, mult in enumerate(self.ch_mult):
            for b in range(self.num_res_blocks):
                h = res(f"down_{l}_{b}_res", self.ch * mult)(h, temb, z, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{l}_{b}_attn")(h, z)
                self._sow(f"down_{l}_{b}", h)
                skips.append(h)
            if l != num_levels - 1:
                if self.resblock_updown:
                    h = res(f"down_{l}_downsample", down=True)(h, temb, z, train)
                else:
                    h = Downsample(self.resample_with_conv, self.downsample_padding,
                                   name=f"down_{l}_downsample", **kw)(h)
                skips.append(h)

        # Middle.
        h = res("mid_res0")(h, temb, z, train)
        if self.mid_attn:
            h = attn("mid_attn")(h, z)
        h = res("mid_res1")(h, temb, z, train)
        self._sow("mid", h)

        # Up path.
        for l in reversed(range(num_levels)):
            for b in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                h = res(f"up_{l}_{b}_res", self.ch * self.ch_mult[l])(h, temb, z, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{l}_{b}_attn")(h, z)
                self._sow(f"up_{l}_{b}", h)
            if l != 0:
                if self.resblock_updown:
                    h = res(f"up_{l}_upsample", up=True)(h, temb, z, train)
                else:
                    h = Upsample(self.resample_with_conv, name=f"up_{l}_upsample", **kw)(h)
        assert not skips

        h = nn.silu(group_norm(h.shape[-1], name="norm_out", param_dtype=self.param_dtype,
                               groups=self.norm_groups, eps=self.norm_eps)(h))
        out = conv(self.out_channels or c_in, name="conv_out", init=default_init(0.0), **kw)(
            h.astype(self.dtype))
        return out.astype(jnp.float32)
