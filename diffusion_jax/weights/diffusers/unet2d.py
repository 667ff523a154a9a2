"""diffusers `UNet2DModel` folders -> the library's `networks.UNet` (fields and params).

Covers the DDPM layouts the Hub stores (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256,
ddpm-bedroom-256, ddpm-cat-256): DownBlock2D / AttnDownBlock2D levels mirrored by UpBlock2D /
AttnUpBlock2D, UNetMidBlock2D, positional (sinusoidal) time embedding, additive ('default') time
conditioning, conv resampling. The two networks are the same function:

    diffusers                                  UNet field
    block_out_channels[l] = ch * ch_mult[l]    ch, ch_mult
    layers_per_block (up blocks: + 1)          num_res_blocks (up levels have num_res_blocks + 1)
    Attn*Block2D at level l                    attn_resolutions = sample_size / 2**l
    attention_head_dim (None: one head)        head_dim (None: num_heads = 1)
    norm_num_groups, norm_eps                  norm_groups, norm_eps
    downsample_padding 0 | 1                   downsample_padding 'same' (pad 0, 1) | 'symmetric'
    flip_sin_to_cos, freq_shift                time_flip_sin_cos, time_freq_shift
    add_attention                              mid_attn
    dropout                                    dropout
    timestep n in 0..T-1                       t = (n + 1) / T: time_scale = T, time_offset = 1

The last row is the `DiscreteDDPM` process' grid (`processes.DiscreteDDPM.timestep_index`): the
network fed t embeds T t - 1 = n, the integer step diffusers' scheduler gives the PyTorch model.

Tensors: conv (O, I, kh, kw) -> (kh, kw, I, O); linear and 1x1 `conv_shortcut` (O, I[, 1, 1]) ->
(I, O); GroupNorm weight -> scale. Attention projections are read under diffusers' names
`to_q, to_k, to_v, to_out.0` or the legacy `query, key, value, proj_attn` of older files. Every
tensor is consumed and checked against the shapes `UNet.init` creates, or `WeightsError` names the
key; a config the UNet cannot express raises naming the config key.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from diffusion_jax.weights.diffusers.folder import WeightsError, read_folder

__all__ = ["convert_unet2d", "unet2d_fields", "read_unet2d_config", "unet2d_folder",
           "scheduler_config", "DOWN_TYPES", "UP_TYPES"]

DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}     # name -> has attention
UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}

# config.json keys -> the only value this converter accepts (diffusers' defaults where absent).
_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
}
# diffusers' UNet2DModel defaults for keys a config.json may leave out.
_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "downsample_padding": 1,
    "dropout": 0.0, "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "add_attention": True, "time_embedding_dim": None, "sample_size": None,
    "num_train_timesteps": None,
}


def _bad(key: str, value, why: str) -> WeightsError:
    return WeightsError(f"diffusers UNet2DModel config {key}={value!r}: {why}")


def unet2d_folder(path: str) -> str:
    """The model folder of `path`: `path` itself, or its `unet/` subfolder (a pipeline folder)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(os.path.join(path, "config.json")) and \
            os.path.exists(os.path.join(path, "unet", "config.json")):
        return os.path.join(path, "unet")
    return path


def read_unet2d_config(path: str) -> dict:
    """config.json of the UNet2DModel folder `path` (or of its `unet/` subfolder); no weights read."""
    folder = unet2d_folder(path)
    cfg_file = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_file):
        raise WeightsError(f"{folder!r} has no config.json: expected a diffusers UNet2DModel "
                           f"folder (config.json + diffusion_pytorch_model.safetensors or .bin)")
    with open(cfg_file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{cfg_file} is not valid JSON: {e}") from None


def scheduler_config(path: str) -> dict | None:
    """The noise scheduler's config stored next to the model (`scheduler_config.json` in the folder
    or `scheduler/scheduler_config.json` in a pipeline folder), or None."""
    path = os.path.abspath(os.path.expanduser(path))
    for cand in (os.path.join(path, "scheduler_config.json"),
                 os.path.join(path, "scheduler", "scheduler_config.json"),
                 os.path.join(os.path.dirname(path), "scheduler", "scheduler_config.json")):
        if os.path.exists(cand):
            with open(cand, encoding="utf-8") as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise WeightsError(f"{cand} is not valid JSON: {e}") from None
    return None


def _get(config: Mapping, key: str):
    return config[key] if key in config else _DEFAULTS[key]


def _sample_size(config: Mapping) -> int:
    s = _get(config, "sample_size")
    if isinstance(s, (list, tuple)):
        if len(s) != 2 or s[0] != s[1]:
            raise _bad("sample_size", s, "the UNet places attention by resolution and needs a "
                                         "square sample_size")
        s = s[0]
    if not isinstance(s, int) or s < 1:
        raise _bad("sample_size", s, "needed (a positive int) to place attention by resolution")
    return s


def unet2d_fields(config: Mapping[str, Any], *, num_timesteps: int | None = None) -> dict:
    """The `networks.UNet` fields (the config schema's model fields) of a UNet2DModel config.

    num_timesteps: T of the discrete process the network was trained on (the time embedding sees
    n = T t - 1); default config['num_train_timesteps'] or 1000."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise _bad("_class_name", name, "only UNet2DModel folders are converted by convert_unet2d")
    for key, want in _FIXED.items():
        got = config.get(key, want)
        if got != want:
            raise _bad(key, got, f"the library's UNet supports only {want!r}")
    in_ch, out_ch = _get(config, "in_channels"), _get(config, "out_channels")
    if out_ch != in_ch:
        raise _bad("out_channels", out_ch, f"differs from in_channels={in_ch}; only eps/x0/v "
                                           "networks with as many outputs as inputs are supported")
    boc = tuple(_get(config, "block_out_channels"))
    if not boc or any(not isinstance(c, int) or c < 1 for c in boc):
        raise _bad("block_out_channels", boc, "expected positive ints")
    ch = boc[0]
    if any(c % ch for c in boc):
        raise _bad("block_out_channels", boc, f"every level must be a multiple of the first ({ch})")
    down = tuple(_get(config, "down_block_types"))
    up = tuple(_get(config, "up_block_types"))
    if len(down) != len(boc):
        raise _bad("down_block_types", down, f"{len(down)} levels but block_out_channels has "
                                             f"{len(boc)}")
    if len(up) != len(down):
        raise _bad("up_block_types", up, f"{len(up)} levels, down_block_types has {len(down)}")
    for key, types, valid in (("down_block_types", down, DOWN_TYPES),
                              ("up_block_types", up, UP_TYPES)):
        for t in types:
            if t not in valid:
                raise _bad(key, types, f"unknown block type {t!r}; supported: {sorted(valid)}")
    attn_levels = [l for l, t in enumerate(down) if DOWN_TYPES[t]]
    up_attn_levels = sorted(len(up) - 1 - i for i, t in enumerate(up) if UP_TYPES[t])
    if up_attn_levels != attn_levels:
        raise _bad("up_block_types", up, f"attention at down levels {attn_levels} but at up "
                                         f"levels {up_attn_levels}: the UNet mirrors its attention")
    size = _sample_size(config)
    levels = len(boc)
    if size % 2 ** (levels - 1):
        raise _bad("sample_size", size, f"not divisible by 2**{levels - 1}")
    temb_dim = _get(config, "time_embedding_dim")
    if temb_dim is not None and temb_dim != 4 * ch:
        raise _bad("time_embedding_dim", temb_dim, f"the UNet's time embedding has 4 ch = {4 * ch}")
    groups = _get(config, "norm_num_groups")
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in boc):
        raise _bad("norm_num_groups", groups, f"must divide every level's channels {boc}")
    attn_groups = _get(config, "attn_norm_num_groups")
    if attn_groups is not None and attn_groups != groups:
        raise _bad("attn_norm_num_groups", attn_groups, f"differs from norm_num_groups={groups}")
    head_dim = _get(config, "attention_head_dim")
    if head_dim is not None:
        bad = [boc[l] for l in attn_levels] + ([boc[-1]] if _get(config, "add_attention") else [])
        if not isinstance(head_dim, int) or head_dim < 1 or any(c % head_dim for c in bad):
            raise _bad("attention_head_dim", head_dim, f"must divide the attention channels {bad}")
    pad = _get(config, "downsample_padding")
    if pad not in (0, 1):
        raise _bad("downsample_padding", pad, "supported: 0 (pad 0, 1) or 1 (pad 1, 1)")
    dropout = float(_get(config, "dropout"))
    if not 0.0 <= dropout <= 1.0:
        raise _bad("dropout", dropout, "must be in [0, 1]")
    T = num_timesteps or _get(config, "num_train_timesteps") or 1000
    return {
        "ch": ch,
        "ch_mult": tuple(c // ch for c in boc),
        "num_res_blocks": int(_get(config, "layers_per_block")),
        "attn_resolutions": tuple(size >> l for l in attn_levels),
        "dropout": dropout,
        "time_embedding": "sinusoidal",
        "time_scale": float(T),
        "time_offset": 1.0,
        "time_flip_sin_cos": bool(_get(config, "flip_sin_to_cos")),
        "time_freq_shift": float(_get(config, "freq_shift")),
        "num_classes": None,
        "resblock_updown": False,
        "resample_with_conv": True,
        "num_heads": 1,
        "head_dim": head_dim,
        "scale_shift_norm": False,
        "skip_rescale": False,
        "norm_groups": groups,
        "norm_eps": float(_get(config, "norm_eps")),
        "downsample_padding": "same" if pad == 0 else "symmetric",
        "mid_attn": bool(_get(config, "add_attention")),
    }


# ------------------------------------------------------------------------------ tensors
class _State:
    """The state dict, with the keys consumed so far."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = {k: np.asarray(v) for k, v in state.items()}
        self.used: set[str] = set()

    def take(self, *names: str) -> np.ndarray:
        """The tensor under the first present name (all present aliases are consumed and must be
        equal); WeightsError naming the key when none is present."""
        found = [n for n in names if n in self.state]
        if not found:
            alt = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
            raise WeightsError(f"diffusers UNet2DModel state dict has no tensor {names[0]!r}{alt}")
        a = self.state[found[0]]
        for n in found[1:]:
            if self.state[n].shape != a.shape or not np.array_equal(self.state[n], a):
                raise WeightsError(f"tensors {found[0]!r} and {n!r} name the same weight but differ")
        self.used.update(found)
        return a.astype(np.float32)

    def conv(self, prefix: str, *aliases: str) -> dict:
        w = self.take(*(f"{p}.weight" for p in (prefix, *aliases)))
        if w.ndim != 4:
            raise WeightsError(f"{prefix}.weight: expected a conv weight (O, I, kh, kw), got shape "
                               f"{w.shape}")
        b = self.take(*(f"{p}.bias" for p in (prefix, *aliases)))
        return {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b}

    def linear(self, prefix: str, *aliases: str) -> dict:
        w = self.take(*(f"{p}.weight" for p in (prefix, *aliases)))
        if w.ndim == 4 and w.shape[2:] == (1, 1):            # 1x1 conv_shortcut
            w = w[:, :, 0, 0]
        if w.ndim != 2:
            raise WeightsError(f"{prefix}.weight: expected a linear weight (out, in), got shape "
                               f"{w.shape}")
        b = self.take(*(f"{p}.bias" for p in (prefix, *aliases)))
        return {"kernel": np.ascontiguousarray(w.T), "bias": b}

    def norm(self, prefix: str) -> dict:
        return {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}

    def unused(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _resnet(s: _State, p: str) -> dict:
    out = {"norm1": s.norm(f"{p}.norm1"), "conv1": s.conv(f"{p}.conv1"),
           "temb_proj": s.linear(f"{p}.time_emb_proj"), "norm2": s.norm(f"{p}.norm2"),
           "conv2": s.conv(f"{p}.conv2")}
    if f"{p}.conv_shortcut.weight" in s.state:
        out["skip"] = s.linear(f"{p}.conv_shortcut")
    return out


def _attention(s: _State, p: str) -> dict:
    return {"norm": s.norm(f"{p}.group_norm"),
            "attn": {"q": s.linear(f"{p}.to_q", f"{p}.query"),
                     "k": s.linear(f"{p}.to_k", f"{p}.key"),
                     "v": s.linear(f"{p}.to_v", f"{p}.value"),
                     "out": s.linear(f"{p}.to_out.0", f"{p}.proj_attn")}}


def _params(s: _State, f: dict, attn_levels: set) -> dict:
    """The UNet's 'params' tree from the state dict (diffusers up block i is level L - 1 - i)."""
    levels, nrb = len(f["ch_mult"]), f["num_res_blocks"]
    params: dict[str, Any] = {
        "conv_in": s.conv("conv_in"),
        "temb_dense0": s.linear("time_embedding.linear_1"),
        "temb_dense1": s.linear("time_embedding.linear_2"),
    }
    for l in range(levels):
        for b in range(nrb):
            params[f"down_{l}_{b}_res"] = _resnet(s, f"down_blocks.{l}.resnets.{b}")
            if l in attn_levels:
                params[f"down_{l}_{b}_attn"] = _attention(s, f"down_blocks.{l}.attentions.{b}")
        if l != levels - 1:
            params[f"down_{l}_downsample"] = {"conv": s.conv(
                f"down_blocks.{l}.downsamplers.0.conv", f"down_blocks.{l}.downsamplers.0.Conv2d_0")}
    params["mid_res0"] = _resnet(s, "mid_block.resnets.0")
    if f["mid_attn"]:
        params["mid_attn"] = _attention(s, "mid_block.attentions.0")
    params["mid_res1"] = _resnet(s, "mid_block.resnets.1")
    for i in range(levels):
        l = levels - 1 - i
        for b in range(nrb + 1):
            params[f"up_{l}_{b}_res"] = _resnet(s, f"up_blocks.{i}.resnets.{b}")
            if l in attn_levels:
                params[f"up_{l}_{b}_attn"] = _attention(s, f"up_blocks.{i}.attentions.{b}")
        if l != 0:
            params[f"up_{l}_upsample"] = {"conv": s.conv(f"up_blocks.{i}.upsamplers.0.conv")}
    params["norm_out"] = s.norm("conv_norm_out")
    params["conv_out"] = s.conv("conv_out")
    return params


def _check_shapes(params: dict, fields: dict, size: int, in_ch: int) -> None:
    """Every converted tensor against the shapes `UNet.init` creates (no FLOPs: eval_shape)."""
    import flax.linen as nn
    from flax import traverse_util
    from diffusion_jax.networks import UNet, abstract_variables
    module = UNet(**fields)
    want = traverse_util.flatten_dict(
        nn.unbox(abstract_variables(module, (1, size, size, in_ch))["params"]), sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    for k in sorted(set(want) | set(got)):
        if k not in got:
            raise WeightsError(f"the converted UNet lacks parameter {k!r} (layout not understood)")
        if k not in want:
            raise WeightsError(f"converted parameter {k!r} has no place in the UNet")
        if tuple(want[k].shape) != tuple(got[k].shape):
            raise WeightsError(f"parameter {k!r}: the diffusers tensor converts to shape "
                               f"{tuple(got[k].shape)}, the UNet needs {tuple(want[k].shape)}")


def convert_unet2d(source, *, num_timesteps: int | None = None) -> tuple[dict, dict]:
    """(UNet fields, params) of a diffusers UNet2DModel.

    source: a folder path (config.json + diffusion_pytorch_model.safetensors / .bin, or a pipeline
    folder with `unet/`) or a pair (config dict, state dict of arrays). The fields are the config
    schema's model fields (`networks.UNet(**fields)`); params is the 'params' collection (nested
    dicts of float32 numpy arrays) for `module.apply({'params': params}, x, t)` with NHWC x and t
    on the DDPM grid t = (n + 1) / T. Raises WeightsError naming the config key or tensor that
    cannot be converted, or the first tensor left unused."""
    if isinstance(source, (str, os.PathLike)):
        config, state = read_folder(unet2d_folder(str(source)))
    else:
        try:
            config, state = source
        except (TypeError, ValueError):
            raise TypeError("convert_unet2d: source must be a folder path or a (config, state "
                            "dict) pair") from None
    fields = unet2d_fields(config, num_timesteps=num_timesteps)
    down = tuple(_get(config, "down_block_types"))
    s = _State(state)
    params = _params(s, fields, {l for l, t in enumerate(down) if DOWN_TYPES[t]})
    left = s.unused()
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise WeightsError(f"diffusers UNet2DModel tensor {left[0]!r}{more} has no place in the "
                           f"library's UNet (layout not supported)")
    _check_shapes(params, fields, _sample_size(config), int(_get(config, "in_channels")))
    return fields, params
