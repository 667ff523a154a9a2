"""diffusers `DiTTransformer2DModel` (class-conditional DiT, e.g. facebook/DiT-XL-2-256's
`transformer` folder; also its legacy `Transformer2DModel` config with norm_type 'ada_norm_zero')
-> the library's `networks.dit.DiT` and its params.

    dit_fields(config, num_train_timesteps=1000, convention='diffusers') -> dict
                                                    DiT fields (+ 'in_channels')
    convert_dit(config, state, source, num_train_timesteps=1000, convention='diffusers')
                                                    -> (DiT, params)
    load_dit(path, num_train_timesteps=1000, convention='diffusers') -> (DiT, params)

diffusers' DiT, in the library's terms:
  * conditioning c = TimestepEmbedding([cos(n w), sin(n w)]) + E[label], w_k = 10000^(-k/127)
    (256 frequencies, flip_sin_to_cos, downscale_freq_shift 1), n the integer DDPM step: on the
    `DiscreteDDPM(T)` grid t = (n + 1) / T, so time_scale = T, time_offset = 1, time_flip_sin_cos;
  * E has num_embeds_ada_norm + 1 rows (the last is the null class of classifier-free guidance),
    num_classes = num_embeds_ada_norm;
  * 2-D sin-cos positions with the column index in the first half (pos_embed_order 'wh'), rescaled
    to the trained grid on other input sizes (pos_embed_base_size = sample_size / patch_size);
  * blocks: affine-free LayerNorm eps 1e-6 before attention (AdaLayerNormZero), config `norm_eps`
    before the GELU(tanh) MLP (mlp_norm_eps); final layer norm_out / proj_out_1 / proj_out_2 is the
    library's final adaLN layer;
  * out_channels = 2 in_channels for learned sigma (first half eps, second half the
    'learned_range' v).
convention 'diffusers' computes what diffusers' DiTTransformer2DModel computes. 'original' computes
what facebookresearch/DiT (models.py), which trained the published weights, computes; diffusers
departs from it in two places: its timestep frequencies are 10000^(-k/127) (downscale_freq_shift 1)
where DiT's are 10000^(-k/128) (time_freq_shift 0), and its LayerNorm before the MLP has eps
`norm_eps` (1e-5 unless set; the hub's DiT-XL-2-256 config does not set it) where DiT's is 1e-6.

diffusers gives every block its own copy of the conditioning embedders (`transformer_blocks.{i}.
norm1.emb`; published checkpoints copy one set into all); the library shares one, so the copies
must be equal, otherwise WeightsError. Every tensor is consumed, or WeightsError names it.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from diffusion_jax.networks.dit import DiT, _pos_embed
from diffusion_jax.weights.diffusers._params import (StateDict, abstract_params, fill_params,
                                                      torch_suffix)
from diffusion_jax.weights.diffusers.folder import WeightsError, read_folder

__all__ = ["dit_fields", "convert_dit", "load_dit"]

_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_KNOWN = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
          "dropout", "norm_num_groups", "attention_bias", "sample_size", "patch_size",
          "activation_fn", "num_embeds_ada_norm", "upcast_attention", "norm_type",
          "norm_elementwise_affine", "norm_eps")
# Legacy Transformer2DModel keys: accepted at the value DiT has (diffusers ignores them when it
# remaps the class to DiTTransformer2DModel).
_INERT = {"cross_attention_dim": None, "num_vector_embeds": None, "only_cross_attention": False,
          "double_self_attention": False, "use_linear_projection": None, "attention_type": "default",
          "caption_channels": None, "interpolation_scale": None, "use_additional_conditions": None}
_EMB = "norm1.emb"
_EMB_KEYS = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
             "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
             "class_embedder.embedding_table.weight")


CONVENTIONS = ("diffusers", "original")
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_FF = {"fc1": "0.proj", "fc2": "2"}


def dit_fields(config: dict, num_train_timesteps: int = 1000, source: str = "DiT config",
               convention: str = "diffusers") -> dict:
    """The `DiT` fields (and 'in_channels') of a diffusers DiT config; T = num_train_timesteps;
    convention 'diffusers' | 'original' (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    cls = config.get("_class_name", "DiTTransformer2DModel")
    if cls not in _CLASSES:
        raise WeightsError(f"{source}: config '_class_name' is {cls!r}, expected one of {_CLASSES}")
    for k, v in config.items():
        if k.startswith("_") or k in _KNOWN:
            continue
        if k not in _INERT:
            raise WeightsError(f"{source}: unsupported config key {k!r} (known: {sorted(_KNOWN)})")
        if k == "use_linear_projection" or k == "interpolation_scale" and v in (None, 1, 1.0):
            continue
        if v != _INERT[k]:
            raise WeightsError(f"{source}: config {k!r} = {v!r} is not supported for a "
                               f"class-conditional DiT (expected {_INERT[k]!r})")

    def want(key, expected, default):
        v = config.get(key, default)
        if v != expected:
            raise WeightsError(f"{source}: config {key!r} = {v!r} is not supported "
                               f"(expected {expected!r})")

    want("norm_type", "ada_norm_zero", "ada_norm_zero" if cls == _CLASSES[0] else "layer_norm")
    want("activation_fn", "gelu-approximate", "gelu-approximate" if cls == _CLASSES[0] else "geglu")
    want("norm_elementwise_affine", False, False if cls == _CLASSES[0] else True)
    want("attention_bias", True, True if cls == _CLASSES[0] else False)
    num_classes = config.get("num_embeds_ada_norm", 1000 if cls == _CLASSES[0] else None)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise WeightsError(f"{source}: config 'num_embeds_ada_norm' (the number of classes) = "
                           f"{num_classes!r}; a positive int is required")
    patch = config.get("patch_size", 2)
    size = config.get("sample_size", 32)
    for key, v in (("patch_size", patch), ("sample_size", size)):
        if not isinstance(v, int) or v < 1:
            raise WeightsError(f"{source}: config {key!r} = {v!r}; a positive int is required")
    if size % patch:
        raise WeightsError(f"{source}: config 'sample_size' = {size} not divisible by "
                           f"'patch_size' = {patch}")
    heads = int(config.get("num_attention_heads", 16))
    head_dim = int(config.get("attention_head_dim", 72))
    in_ch = int(config.get("in_channels", 4))
    out_ch = config.get("out_channels")
    return dict(
        in_channels=in_ch,
        patch_size=patch,
        hidden_size=heads * head_dim,
        depth=int(config.get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=4.0,
        num_classes=num_classes,
        out_channels=int(out_ch) if out_ch is not None else in_ch,
        dropout=float(config.get("dropout", 0.0)),
        time_embedding="sinusoidal",
        time_scale=float(num_train_timesteps),
        time_offset=1.0,
        time_flip_sin_cos=True,
        time_freq_shift=1.0 if convention == "diffusers" else 0.0,
        frequency_dim=256,
        pos_embed_order="wh",
        pos_embed_base_size=size // patch,
        mlp_norm_eps=float(config.get("norm_eps", 1e-5)) if convention == "diffusers" else 1e-6,
    )


def _torch_names(path: tuple[str, ...]) -> list[str]:
    """Flax parameter path of `DiT` -> diffusers state-dict name."""
    *mods, leaf = path
    s = torch_suffix(leaf)
    top = mods[0]
    table = {"patch_embed": "pos_embed.proj", "final_adaLN": "proj_out_1",
             "final_linear": "proj_out_2",
             "t_dense0": f"transformer_blocks.0.{_EMB}.timestep_embedder.linear_1",
             "t_dense1": f"transformer_blocks.0.{_EMB}.timestep_embedder.linear_2",
             "label_embed": f"transformer_blocks.0.{_EMB}.class_embedder.embedding_table"}
    if top in table:
        return [f"{table[top]}.{s}"]
    m = re.fullmatch(r"dit_block_(\d+)", top)
    if m is None:  # pragma: no cover - e.g. z_embed, never configured by `dit_fields`
        raise WeightsError(f"no diffusers name for Flax parameter {'/'.join(path)}")
    b = f"transformer_blocks.{m.group(1)}"
    sub = mods[1:]
    if sub == ["adaLN"]:
        return [f"{b}.norm1.linear.{s}"]
    if sub[0] == "attn":
        return [f"{b}.attn1.{_ATTN[sub[1]]}.{s}"]
    return [f"{b}.ff.net.{_FF[sub[0]]}.{s}"]


def _check_shared_embedders(sd: StateDict, depth: int) -> None:
    """Consumes blocks 1..depth-1's conditioning embedders after checking they equal block 0's."""
    for k in _EMB_KEYS:
        ref = sd.state.get(f"transformer_blocks.0.{_EMB}.{k}")
        for i in range(1, depth):
            name = f"transformer_blocks.{i}.{_EMB}.{k}"
            if ref is None or name not in sd.state:
                continue  # missing block-0 tensors are reported by fill_params
            _, a = sd.take([name])
            if a.shape != ref.shape or not np.array_equal(a, ref):
                raise WeightsError(
                    f"{sd.source}: tensor {name!r} differs from block 0's; the library's DiT "
                    "shares one timestep / class embedding across blocks (as the DiT paper and "
                    "every published DiT checkpoint), so per-block embedders cannot be converted")


def convert_dit(config: dict, state: dict, source: str = "DiT", num_train_timesteps: int = 1000,
                convention: str = "diffusers") -> tuple[DiT, dict]:
    """(DiT, params) from a diffusers DiT config and state dict {name: array}."""
    fields = dit_fields(config, num_train_timesteps, f"{source} config", convention)
    in_ch = fields.pop("in_channels")
    module = DiT(**fields)
    p = module.patch_size
    abstract = abstract_params(module, jnp.zeros((1, p, p, in_ch), jnp.float32),
                               jnp.zeros((1,), jnp.float32))
    sd = StateDict(state, source)
    _check_shared_embedders(sd, module.depth)
    pos = sd.take_optional("pos_embed.pos_embed")   # a buffer of older diffusers versions
    if pos is not None:
        g = fields["pos_embed_base_size"]
        want = _pos_embed(module.hidden_size, g, g, "wh", g)
        if pos.reshape(-1).shape != want.reshape(-1).shape or not np.allclose(
                pos.reshape(want.shape), want, atol=1e-5):
            raise WeightsError(f"{source}: tensor 'pos_embed.pos_embed' is not the 2-D sin-cos "
                               "embedding of the configured grid")
    params = fill_params(abstract, _torch_names, sd)
    sd.finish()
    return module, params


def load_dit(path: str, num_train_timesteps: int = 1000, convention: str = "diffusers"
             ) -> tuple[DiT, dict]:
    """(DiT, params) of a diffusers DiT model folder (e.g. the `transformer` subfolder)."""
    config, state = read_folder(path)
    return convert_dit(config, state, source=path, num_train_timesteps=num_train_timesteps,
                       convention=convention)
