"""The network sections of the config: `model.type` and the fields of each network type (a subset of
the Flax modules' attributes; tests/test_configs.py checks that each is a real attribute)."""
from __future__ import annotations

from diffusion_jax.config.fields import Field, _positive, _unit

_TIME_EMBEDDINGS = ("sinusoidal", "fourier")
_TIME_INPUTS = ("linear", "log")
UNET_FIELDS: dict[str, Field] = {
    "ch": Field(int, 128, check=_positive, doc="base channels"),
    "ch_mult": Field(tuple, (1, 2, 2, 2), item=int, doc="channel multiplier per resolution"),
    "num_res_blocks": Field(int, 2, check=_positive),
    "attn_resolutions": Field(tuple, (16,), item=int),
    "dropout": Field(float, 0.1, check=_unit),
    "time_embedding": Field(str, "sinusoidal", choices=_TIME_EMBEDDINGS),
    "time_scale": Field(float, 1000.0, doc="the embedding sees time_scale * t"),
    "time_input": Field(str, "linear", choices=_TIME_INPUTS,
                        doc="'log': the embedding sees time_scale * log t (NCSN++ / CLD-SGM)"),
    "fourier_scale": Field(float, 16.0),
    "num_classes": Field(int, None, optional=True, doc="class-conditional when set"),
    "resblock_updown": Field(bool, False),
    "resample_with_conv": Field(bool, True),
    "num_heads": Field(int, 1, check=_positive),
    "head_dim": Field(int, None, optional=True),
    "scale_shift_norm": Field(bool, False),
    "skip_rescale": Field(bool, False),
    # Conventions of published checkpoints (weights.diffusers.unet2d); defaults: the library's own.
    "time_offset": Field(float, 0.0, doc="the embedding sees time_scale * t - time_offset "
                                         "(1 with time_scale T: integer DDPM steps n = T t - 1)"),
    "time_flip_sin_cos": Field(bool, False, doc="sinusoidal embedding [cos, sin]"),
    "time_freq_shift": Field(float, 1.0, doc="sinusoidal frequencies 10000^(-k / (ch/2 - shift))"),
    "norm_groups": Field(int, None, optional=True, check=_positive,
                         doc="GroupNorm groups; None: min(C // 4, 32)"),
    "norm_eps": Field(float, 1e-6, check=_positive),
    "downsample_padding": Field(str, "same", choices=("same", "symmetric"),
                                doc="stride-2 conv: 'same' pads (0, 1) (DDPM), 'symmetric' (1, 1)"),
    "mid_attn": Field(bool, True, doc="attention in the middle block"),
}
DIT_FIELDS: dict[str, Field] = {
    "patch_size": Field(int, 2, check=_positive),
    "hidden_size": Field(int, 384, check=_positive),
    "depth": Field(int, 12, check=_positive),
    "num_heads": Field(int, 6, check=_positive),
    "mlp_ratio": Field(float, 4.0, check=_positive),
    "num_classes": Field(int, None, optional=True),
    "dropout": Field(float, 0.0, check=_unit),
    "time_embedding": Field(str, "sinusoidal", choices=_TIME_EMBEDDINGS),
    "time_scale": Field(float, 1000.0),
    "time_input": Field(str, "linear", choices=_TIME_INPUTS),
    "fourier_scale": Field(float, 16.0),
    "frequency_dim": Field(int, 256, check=_positive),
}
MODEL_TYPES = ("unet", "dit")
MODEL_FIELDS: dict[str, dict[str, Field]] = {"unet": UNET_FIELDS, "dit": DIT_FIELDS}
