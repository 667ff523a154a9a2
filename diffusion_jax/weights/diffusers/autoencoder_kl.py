"""diffusers `AutoencoderKL` (config.json + weights, e.g. stabilityai/sd-vae-ft-mse) -> the library's
`networks.autoencoder_kl.AutoencoderKL` and its params.

    autoencoder_kl_fields(config) -> dict          module fields (+ 'in_channels'); unsupported
                                                   config -> WeightsError naming the config key
    convert_autoencoder_kl(config, state, source) -> (module, params)
    load_autoencoder_kl(path) -> (module, params)  `read_folder` + convert

The mid-block attention is read from the current names (`to_q`, `to_k`, `to_v`, `to_out.0`) or the
legacy ones (`query`, `key`, `value`, `proj_attn`) that diffusers renames on load. Every tensor is
consumed, or WeightsError names it.
"""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from diffusion_jax.networks.autoencoder_kl import AutoencoderKL
from diffusion_jax.weights.diffusers._params import (StateDict, abstract_params, fill_params,
                                                      torch_suffix)
from diffusion_jax.weights.diffusers.folder import WeightsError, read_folder

__all__ = ["autoencoder_kl_fields", "convert_autoencoder_kl", "load_autoencoder_kl"]

# Config keys that do not change the computation of encode / decode.
_IGNORED = ("sample_size", "force_upcast")
_KNOWN = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
          "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "scaling_factor",
          "shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv",
          "mid_block_add_attention") + _IGNORED
_ATTN = {"q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
         "out": ("to_out.0", "proj_attn")}


def _get(config: dict, key: str, default: Any, source: str, kind=None):
    v = config.get(key, default)
    if v is None and default is not None:
        v = default
    if kind is not None and not isinstance(v, kind):
        raise WeightsError(f"{source}: config {key!r} = {v!r} must be {kind.__name__}")
    return v


def autoencoder_kl_fields(config: dict, source: str = "AutoencoderKL config") -> dict:
    """The `AutoencoderKL` module fields (and 'in_channels') of a diffusers AutoencoderKL config."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise WeightsError(f"{source}: config '_class_name' is {cls!r}, expected 'AutoencoderKL'")
    unknown = [k for k in config if not k.startswith("_") and k not in _KNOWN]
    if unknown:
        raise WeightsError(f"{source}: unsupported config key{'s' if len(unknown) > 1 else ''} "
                           f"{unknown} (known: {sorted(_KNOWN)})")
    chans = tuple(int(c) for c in _get(config, "block_out_channels", [64], source, (list, tuple)))
    n = len(chans)
    for key, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
        types = list(_get(config, key, [want], source, (list, tuple)))
        if len(types) != n:
            raise WeightsError(f"{source}: config {key!r} has {len(types)} entries but "
                               f"'block_out_channels' has {n}")
        bad = sorted({t for t in types if t != want})
        if bad:
            raise WeightsError(f"{source}: config {key!r} holds {bad}; only {want!r} is supported")
    act = _get(config, "act_fn", "silu", source, str)
    if act not in ("silu", "swish"):
        raise WeightsError(f"{source}: config 'act_fn' = {act!r}; only 'silu' is supported")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise WeightsError(f"{source}: config {key!r} is set; per-channel latent statistics "
                               "are not supported (only scaling_factor / shift_factor)")
    groups = int(_get(config, "norm_num_groups", 32, source, int))
    bad = [c for c in chans if c % groups]
    if bad:
        raise WeightsError(f"{source}: config 'block_out_channels' {list(chans)} not divisible by "
                           f"'norm_num_groups' = {groups}")
    return dict(
        in_channels=int(_get(config, "in_channels", 3, source, int)),
        out_channels=int(_get(config, "out_channels", 3, source, int)),
        block_out_channels=chans,
        layers_per_block=int(_get(config, "layers_per_block", 1, source, int)),
        latent_channels=int(_get(config, "latent_channels", 4, source, int)),
        norm_num_groups=groups,
        use_quant_conv=bool(_get(config, "use_quant_conv", True, source, bool)),
        use_post_quant_conv=bool(_get(config, "use_post_quant_conv", True, source, bool)),
        mid_block_attention=bool(_get(config, "mid_block_add_attention", True, source, bool)),
        scaling_factor=float(_get(config, "scaling_factor", 0.18215, source, (int, float))),
        shift_factor=float(_get(config, "shift_factor", 0.0, source, (int, float))),
    )


def _torch_names(path: tuple[str, ...]) -> list[str]:
    """Flax parameter path of `AutoencoderKL` -> diffusers state-dict names (current, legacy)."""
    *mods, leaf = path
    suffix = torch_suffix(leaf)
    top = mods[0]
    if top in ("quant_conv", "post_quant_conv"):
        return [f"{top}.{suffix}"]
    sub, rest = mods[1], mods[2:]
    if sub in ("conv_in", "conv_out"):
        base = [f"{top}.{sub}"]
    elif sub == "norm_out":
        base = [f"{top}.conv_norm_out"]
    elif m := re.fullmatch(r"(down|up)_(\d+)_res_(\d+)", sub):
        block = "down_blocks" if m.group(1) == "down" else "up_blocks"
        base = [f"{top}.{block}.{m.group(2)}.resnets.{m.group(3)}.{rest[0]}"]
    elif m := re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", sub):
        block, op = ("down_blocks", "downsamplers") if m.group(1) == "down" else ("up_blocks",
                                                                                "upsamplers")
        base = [f"{top}.{block}.{m.group(2)}.{op}.0.conv"]
    elif sub == "mid" and rest[0].startswith("res_"):
        base = [f"{top}.mid_block.resnets.{rest[0][4:]}.{rest[1]}"]
    elif sub == "mid" and rest == ["attn", "norm"]:
        base = [f"{top}.mid_block.attentions.0.group_norm"]
    elif sub == "mid" and rest[:2] == ["attn", "attn"]:
        base = [f"{top}.mid_block.attentions.0.{n}" for n in _ATTN[rest[2]]]
    else:  # pragma: no cover - the module and this table are written together
        raise WeightsError(f"no diffusers name for Flax parameter {'/'.join(path)}")
    return [f"{b}.{suffix}" for b in base]


def convert_autoencoder_kl(config: dict, state: dict, source: str = "AutoencoderKL"
                           ) -> tuple[AutoencoderKL, dict]:
    """(module, params) from a diffusers AutoencoderKL config and state dict {name: array}."""
    fields = autoencoder_kl_fields(config, f"{source} config")
    in_ch = fields.pop("in_channels")
    module = AutoencoderKL(**fields)
    f = module.downsampling_factor
    abstract = abstract_params(module, jnp.zeros((1, f, f, in_ch), jnp.float32))
    sd = StateDict(state, source)
    params = fill_params(abstract, _torch_names, sd)
    sd.finish()
    return module, params


def load_autoencoder_kl(path: str) -> tuple[AutoencoderKL, dict]:
    """(module, params) of a diffusers AutoencoderKL folder (e.g. the `vae` subfolder)."""
    config, state = read_folder(path)
    return convert_autoencoder_kl(config, state, source=path)
