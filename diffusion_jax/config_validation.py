"""Experiment config schema: the defaults, validation on load, and a file loader with overrides.

An experiment config is an `ml_collections.ConfigDict` with these sections (`base_config()` builds
one with every field at its default; the files in `configs/` start from it):

    data         name, image_size, batch_size, random_flip, data_dir
    model        type 'unet' | 'dit' and that network's fields (`UNET_FIELDS` / `DIT_FIELDS`)
    process      name (`diffusion_jax.processes.PROCESSES`) and kwargs (the process' fields)
    objective    name (`OBJECTIVES`: 'eps' 'x0' 'v' 'dsm' 'edm' 'hybrid') and kwargs (the
                 factory's options), label_dropout (classifier-free guidance training); 'hybrid'
                 (improved DDPM, learned variance) doubles the network's output channels
    optim        AdamW: learning_rate, betas, eps, weight_decay, warmup_steps, schedule
                 'constant' | 'cosine', end_lr_factor, grad_clip (0 = off), grad_accum
    ema          decays (tuple), warmup (bool), halflife_mimg (EDM-style: derives the decay)
    train        num_steps, log_every, sample_every, checkpoint_every, keep, seed, precision
    mesh         shape (data, fsdp, tensor), axis_names, logical_axis_rules (None = library's)
    sample       sampler (`diffusion_jax.sampling.SAMPLERS`), num_steps, spacing, t_end,
                 num_samples, batch_size, denoise_final, guidance_scale, use_ema, seed, and
                 kwargs (the sampler's options, e.g. snr for 'pc')
    eval         split, batch_size, num_batches, bpd, bpd_num_examples, bpd_repeats
    distributed  coordinator_address, num_processes, process_id (None: single process)
    autoencoder  kind 'none' | 'diffae' | 'dmz' and the design axes: encoder, latent, z_dim,
                 z_conditioning, encoder sizes, norm, kl_weight, tau, prior (None: the kind's)
    latent_sampler  DiffAE's latent DDIM (num_steps 0: off), trained after the autoencoder
    readout      timesteps and blocks of the (t, block) feature sweep, probe sizes, k of k-NN
    report       what the report after training holds (reconstructions, interpolations, probes)

`validate(config)` checks it against the schema and then LOCKS it (no new fields; values may still
be assigned with their type):

* an unknown (misspelled) field raises `ConfigError` naming it and suggesting the closest valid
  name (difflib): "config.optim.lerning_rate: unknown field; did you mean 'learning_rate'?";
* a wrong type names the field, the expected and the received type;
* an unknown process / objective / sampler / model type / dataset name lists the valid ones;
* process, objective and sampler kwargs are checked against the process' fields, the objective
  factory's options and the sampler's keyword arguments; then the process and the objective are
  built once, so bad values (an unknown weighting, say) fail at load time, not after the model
  is compiled;
* fields missing from a hand-written config are filled in with their defaults;
* derived values are filled in: `ema.decays` from `ema.halflife_mimg` when that is set.

`load_config('configs/x.py[:arg]', overrides=['train.num_steps=100'])` imports a config file,
applies `path=value` overrides (values parsed as Python literals, checked like everything else)
and validates. The command line (`diffusion_jax.cli`) uses `ml_collections.config_flags` for the
same overrides (`--config.train.num_steps=100`) and then `validate`.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

__all__ = [
    "ConfigError", "Field", "SCHEMA", "UNET_FIELDS", "DIT_FIELDS", "MODEL_FIELDS", "OBJECTIVES",
    "PRECISIONS", "base_config", "validate", "load_config", "apply_overrides", "from_dict",
    "ema_decay_from_halflife", "suggest", "check_override_paths",
]


class ConfigError(ValueError):
    """A config does not match the schema; the message names the field (config.section.field)."""


# ----------------------------------------------------------------------------------- fields
@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its type, default and constraints.

    type: int, float, bool, str, or tuple (then `item` is the element type, None = any).
    optional: None is allowed (stored as a typed `placeholder` so that overrides still work).
    choices: allowed values (a tuple, or a zero-argument callable returning one).
    check: callable(value) -> error message or None, for ranges and the like.
    """
    type: type
    default: Any = None
    optional: bool = False
    choices: Any = None
    item: Any = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    finite: bool = True              # floats: reject inf / nan

    def valid_choices(self) -> tuple | None:
        c = self.choices() if callable(self.choices) else self.choices
        return None if c is None else tuple(c)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _unit(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


PRECISIONS = ("float32", "bfloat16")
MESH_AXIS_NAMES = ("data", "fsdp", "tensor")


def _dataset_names() -> tuple[str, ...]:
    from diffusion_jax.data import known_datasets  # pylint: disable=import-outside-toplevel
    return tuple(known_datasets())


def _process_names() -> tuple[str, ...]:
    from diffusion_jax.processes import PROCESSES  # pylint: disable=import-outside-toplevel
    return tuple(sorted(PROCESSES))


def _sampler_names() -> tuple[str, ...]:
    from diffusion_jax.sampling import SAMPLERS  # pylint: disable=import-outside-toplevel
    return tuple(sorted(SAMPLERS))


def _spacings() -> tuple[str, ...]:
    from diffusion_jax.sampling import SPACINGS  # pylint: disable=import-outside-toplevel
    return tuple(SPACINGS)


# The networks' configurable fields (a subset of the Flax modules' attributes; dtype comes from
# train.precision). tests/test_configs.py checks that each is a real attribute of the module.
_TIME_EMBEDDINGS = ("sinusoidal", "fourier")
UNET_FIELDS: dict[str, Field] = {
    "ch": Field(int, 128, check=_positive, doc="base channels"),
    "ch_mult": Field(tuple, (1, 2, 2, 2), item=int, doc="channel multiplier per resolution"),
    "num_res_blocks": Field(int, 2, check=_positive),
    "attn_resolutions": Field(tuple, (16,), item=int),
    "dropout": Field(float, 0.1, check=_unit),
    "time_embedding": Field(str, "sinusoidal", choices=_TIME_EMBEDDINGS),
    "time_scale": Field(float, 1000.0, doc="the embedding sees time_scale * t"),
    "fourier_scale": Field(float, 16.0),
    "num_classes": Field(int, None, optional=True, doc="class-conditional when set"),
    "resblock_updown": Field(bool, False),
    "resample_with_conv": Field(bool, True),
    "num_heads": Field(int, 1, check=_positive),
    "head_dim": Field(int, None, optional=True),
    "scale_shift_norm": Field(bool, False),
    "skip_rescale": Field(bool, False),
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
    "fourier_scale": Field(float, 16.0),
    "frequency_dim": Field(int, 256, check=_positive),
}
MODEL_TYPES = ("unet", "dit")
MODEL_FIELDS: dict[str, dict[str, Field]] = {"unet": UNET_FIELDS, "dit": DIT_FIELDS}


# Objectives: name -> (factory path, prediction of the network, {kwarg: Field}).
@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    factory: str                       # attribute of diffusion_jax.objectives
    prediction: str                    # network output: 'eps', 'x0', 'v', 'score' or 'edm'
    kwargs: Mapping[str, Field]
    takes_process: bool = True

    def get_factory(self) -> Callable:
        from diffusion_jax import objectives  # pylint: disable=import-outside-toplevel
        return getattr(objectives, self.factory)


_REDUCE = Field(str, "mean", choices=("mean", "sum"), doc="over pixels: mean, or sum (score_sde "
                                                           "reduce_mean=False, EDM)")
_DENOISING_KW = {
    "weighting": Field(str, "none"),
    "min_snr_gamma": Field(float, 5.0, check=_positive),
    "time_sampling": Field(str, "uniform"),
    "discrete": Field(bool, None, optional=True,
                      doc="integer DDPM timesteps (default: iff the process is 'ddpm')"),
    "reduce": _REDUCE,
    "input_perturbation": Field(float, 0.0, check=_non_negative,
                                doc="DDPM-IP's gamma: x_t = alpha x0 + sigma (eps + gamma xi)"),
}
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "eps": ObjectiveSpec("epsilon_loss", "eps", _DENOISING_KW),
    "x0": ObjectiveSpec("x0_loss", "x0", _DENOISING_KW),
    "v": ObjectiveSpec("v_loss", "v", _DENOISING_KW),
    "dsm": ObjectiveSpec("score_matching_loss", "score", {
        "weighting": Field(str, "sigma2"),
        "importance_sampling": Field(bool, False),
        "prediction": Field(str, "score", choices=("score", "eps")),
        "time_sampling": Field(str, "uniform"),
        "discrete": Field(bool, None, optional=True),
        "reduce": _REDUCE,
    }),
    "hybrid": ObjectiveSpec("hybrid_loss", "eps", {
        "vb_weight": Field(float, 0.001, check=_non_negative,
                           doc="lambda of L_simple + lambda L_vb (improved DDPM)"),
        "num_timesteps": Field(int, None, optional=True, check=_positive,
                               doc="None: the DDPM process' T"),
        "input_perturbation": Field(float, 0.0, check=_non_negative, doc="DDPM-IP's gamma"),
        "time_sampling": Field(str, "uniform", choices=("uniform", "loss_aware"),
                               doc="'loss_aware': improved DDPM's loss-second-moment sampler"),
        "history_per_bucket": Field(int, 10, check=_positive),
        "uniform_prob": Field(float, 0.001, check=_unit),
        "reduce": _REDUCE,
    }),
    "edm": ObjectiveSpec("edm_loss", "edm", {
        "sigma_data": Field(float, 0.5, check=_positive),
        "p_mean": Field(float, -1.2),
        "p_std": Field(float, 1.2, check=_positive),
        "reduce": _REDUCE,
    }, takes_process=False),
}


def objective_prediction(objective_cfg) -> str:
    """What the network predicts under this objective ('eps', 'x0', 'v', 'score' or 'edm')."""
    spec = OBJECTIVES[objective_cfg.name]
    if objective_cfg.name == "dsm":
        return objective_cfg.kwargs.get("prediction", "score")
    return spec.prediction


# ---------------------------------------------------------------------------------- schema
def _mesh_shape_check(v):
    if len(v) != 3:
        return f"needs one size per mesh axis {MESH_AXIS_NAMES}, got {len(v)}"
    if list(v).count(-1) > 1:
        return "at most one size may be -1"
    if any(s == 0 or s < -1 for s in v):
        return "sizes must be positive or -1"
    return None


def _axis_names_check(v):
    if tuple(v) != MESH_AXIS_NAMES:
        return f"the training layer's mesh axes are {MESH_AXIS_NAMES} (in this order)"
    return None


def _rules_check(v):
    for r in v:
        if not isinstance(r, (tuple, list)) or len(r) != 2 or not isinstance(r[0], str):
            return ("must be a tuple of (logical_name, mesh_axes) pairs, e.g. "
                    "(('embed', 'fsdp'), ('mlp', 'tensor'))")
    return None


def _betas_check(v):
    if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
        return "must be two floats (b1, b2) in [0, 1)"
    return None


def _decays_check(v):
    bad = [d for d in v if not (isinstance(d, (int, float)) and 0.0 <= d < 1.0)]
    return None if not bad else f"EMA decays must be in [0, 1), got {bad}"


AUTOENCODER_KINDS = ("none", "diffae", "dmz")
ENCODER_TYPES = ("semantic", "conv")
LATENT_TYPES = ("continuous", "gaussian", "binary")


def _z_modes_check(v):
    from diffusion_jax.networks.unet import Z_MODES  # pylint: disable=import-outside-toplevel
    bad = [m for m in v if m not in Z_MODES]
    if bad:
        return f"unknown z-conditioning modes {bad}; valid: {Z_MODES}"
    if not v:
        return "needs at least one mode"
    return None


SCHEMA: dict[str, dict[str, Field]] = {
    "data": {
        "name": Field(str, "digits/16",
                      doc="diffusion_jax.data.known_datasets(); also folder:<path>, tfds:<name>"),
        "image_size": Field(int, None, optional=True, check=_positive,
                            doc="centre-crop + resize to this size; None: the stored size"),
        "batch_size": Field(int, 128, check=_positive, doc="global batch per train_step call"),
        "random_flip": Field(bool, False),
        "data_dir": Field(str, None, optional=True, doc="tfds data dir; None: $TFDS_DATA_DIR or "
                                                        "~/tensorflow_datasets"),
    },
    "model": {"type": Field(str, "unet", choices=MODEL_TYPES)},   # + MODEL_FIELDS[type]
    "process": {"name": Field(str, "vp", choices=_process_names)},  # + kwargs
    "objective": {
        "name": Field(str, "eps", choices=tuple(OBJECTIVES)),         # + kwargs
        "label_dropout": Field(float, 0.0, check=_unit,
                               doc="probability of replacing the label by the null class"),
    },
    "optim": {
        "learning_rate": Field(float, 2e-4, check=_positive),
        "betas": Field(tuple, (0.9, 0.999), item=float, check=_betas_check,
                       doc="Adam's (b1, b2)"),
        "eps": Field(float, 1e-8, check=_positive),
        "weight_decay": Field(float, 0.0, check=_non_negative),
        "warmup_steps": Field(int, 0, check=_non_negative),
        "schedule": Field(str, "constant", choices=("constant", "cosine")),
        "end_lr_factor": Field(float, 0.0, check=_non_negative),
        "grad_clip": Field(float, 1.0, check=_non_negative, doc="global-norm clip; 0 = off"),
        "grad_accum": Field(int, 1, check=_positive),
    },
    "ema": {
        "decays": Field(tuple, (0.9999,), item=float, check=_decays_check),
        "warmup": Field(bool, False, doc="decay min(d, (1 + n) / (10 + n)) at update n"),
        "halflife_mimg": Field(float, None, optional=True, check=_positive,
                               doc="EDM: EMA half-life in millions of images; sets decays"),
    },
    "train": {
        "num_steps": Field(int, 1000, check=_positive),
        "log_every": Field(int, 100, check=_positive),
        "sample_every": Field(int, 0, check=_non_negative, doc="0: never during training"),
        "checkpoint_every": Field(int, 1000, check=_non_negative, doc="0: only at the end"),
        "keep": Field(int, 3, check=_positive, doc="checkpoints kept"),
        "seed": Field(int, 0),
        "precision": Field(str, "float32", choices=PRECISIONS, doc="network compute dtype"),
    },
    "mesh": {
        "shape": Field(tuple, (-1, 1, 1), item=int, check=_mesh_shape_check),
        "axis_names": Field(tuple, MESH_AXIS_NAMES, item=str, check=_axis_names_check),
        "logical_axis_rules": Field(tuple, None, optional=True, check=_rules_check),
    },
    "sample": {
        "sampler": Field(str, "dpmpp_2m", choices=_sampler_names),
        "num_steps": Field(int, 50, check=_positive),
        "spacing": Field(str, None, optional=True, choices=_spacings,
                         doc="None: the sampler's default spacing"),
        "num_samples": Field(int, 64, check=_positive),
        "batch_size": Field(int, 256, check=_positive, doc="samples per sampler call"),
        "t_end": Field(float, None, optional=True, check=_positive,
                       doc="last time of the grid; None: the process' t_min"),
        "denoise_final": Field(bool, False),
        "guidance_scale": Field(float, 1.0, doc="classifier-free guidance; 1 = plain conditional"),
        "use_ema": Field(bool, True),
        "seed": Field(int, 0),
    },
    "eval": {
        "split": Field(str, "test"),
        "batch_size": Field(int, None, optional=True, check=_positive,
                            doc="None: data.batch_size"),
        "num_batches": Field(int, 0, check=_non_negative, doc="0: the whole split"),
        "bpd": Field(bool, False,
                     doc="also bits/dim through the PF-ODE (diffusion_jax.likelihood)"),
        "bpd_num_examples": Field(int, 64, check=_positive),
        "bpd_repeats": Field(int, 1, check=_positive),
    },
    "autoencoder": {
        "kind": Field(str, "none", choices=AUTOENCODER_KINDS,
                      doc="'none': a plain diffusion model; 'diffae' / 'dmz': a diffusion "
                          "autoencoder whose decoder is config.model (a UNet)"),
        "encoder": Field(str, None, optional=True, choices=ENCODER_TYPES,
                         doc="'semantic' (half-UNet + pooling) | 'conv' (DMZ); None: the kind's"),
        "latent": Field(str, None, optional=True, choices=LATENT_TYPES,
                        doc="'continuous' | 'gaussian' | 'binary'; None: the kind's"),
        "z_dim": Field(int, None, optional=True, check=_positive,
                       doc="latent size (binary: number of bits); None: 512 diffae, 16 dmz"),
        "z_conditioning": Field(tuple, None, optional=True, item=str, check=_z_modes_check,
                                doc="subset of networks.Z_MODES; None: the kind's"),
        "encoder_ch": Field(int, None, optional=True, check=_positive, doc="None: model.ch"),
        "encoder_ch_mult": Field(tuple, None, optional=True, item=int,
                                 doc="semantic encoder levels; None: model.ch_mult"),
        "encoder_num_res_blocks": Field(int, None, optional=True, check=_positive,
                                        doc="None: model.num_res_blocks"),
        "encoder_attn_resolutions": Field(tuple, None, optional=True, item=int,
                                          doc="None: model.attn_resolutions"),
        "norm": Field(str, "batch", choices=("batch", "group"), doc="conv encoder's norm"),
        "kl_weight": Field(float, 0.0, check=_non_negative, doc="gaussian latents' KL weight"),
        "tau": Field(float, 1.0, check=_positive, doc="Gumbel-softmax temperature"),
        "prior": Field(str, "bernoulli", choices=("bernoulli", "empirical"),
                       doc="binary latents for generation: Bernoulli(0.5) or per-bit frequencies"),
    },
    "latent_sampler": {
        "num_steps": Field(int, 0, check=_non_negative,
                           doc="train steps of DiffAE's latent DDIM after the autoencoder; 0: off"),
        "num_layers": Field(int, 10, check=_positive),
        "hidden": Field(int, 2048, check=_positive),
        "batch_size": Field(int, 512, check=_positive),
        "learning_rate": Field(float, 1e-4, check=_positive),
        "loss": Field(str, "l1", choices=("l1", "l2")),
        "sample_steps": Field(int, 50, check=_positive),
    },
    "readout": {
        "timesteps": Field(tuple, (0.02, 0.1, 0.3), item=float,
                           doc="noise levels t of the (t, block) feature sweep"),
        "blocks": Field(tuple, (), item=str, doc="sown block names; (): every block"),
        "num_train": Field(int, 0, check=_non_negative, doc="probe train examples; 0: all"),
        "num_test": Field(int, 0, check=_non_negative, doc="probe test examples; 0: all"),
        "knn_k": Field(int, 20, check=_positive),
    },
    "report": {
        "enabled": Field(bool, True, doc="write report.md/html (samples, reconstructions, "
                                         "interpolations, loss, probes) after training"),
        "num_reconstructions": Field(int, 16, check=_positive),
        "num_interpolations": Field(int, 4, check=_positive),
        "interpolation_points": Field(int, 8, check=_positive),
        "inversion_steps": Field(int, 50, check=_positive, doc="DDIM steps of x0 -> x_T"),
        "fixed_point_iters": Field(int, 2, check=_non_negative,
                                   doc="refinements per DDIM-inversion step"),
        "probe": Field(bool, True, doc="the probe table (raw pixels, PCA, readouts, latents)"),
        "manipulate_target": Field(int, 1, check=_non_negative,
                                   doc="--mode=manipulate: the label to move images towards"),
        "manipulate_scales": Field(tuple, (0.0, 0.3, 0.6, 0.9), item=float,
                                   doc="s of z + s sqrt(D) w / ||w|| (DiffAE: 0.3)"),
    },
    "distributed": {
        "coordinator_address": Field(str, None, optional=True),
        "num_processes": Field(int, None, optional=True, check=_positive),
        "process_id": Field(int, None, optional=True, check=_non_negative),
    },
}
_KWARGS_SECTIONS = ("process", "objective", "sample")


# ------------------------------------------------------------------------------- defaults
def _value(field: Field):
    if field.default is None:
        return config_dict.placeholder(field.type)
    return field.default


def base_config(model_type: str = "unet", process: str = "vp", objective: str = "eps"
                ) -> ml_collections.ConfigDict:
    """A complete config with every field at its default (unlocked; edit, then `validate`)."""
    if model_type not in MODEL_FIELDS:
        raise ConfigError(_unknown_name("model type", model_type, MODEL_TYPES))
    c = ml_collections.ConfigDict()
    for section, fields in SCHEMA.items():
        sec = ml_collections.ConfigDict()
        for name, field in fields.items():
            setattr(sec, name, _value(field))
        setattr(c, section, sec)
    c.model.type = model_type
    for name, field in MODEL_FIELDS[model_type].items():
        setattr(c.model, name, _value(field))
    c.process.name = process
    c.process.kwargs = ml_collections.ConfigDict()
    c.objective.name = objective
    c.objective.kwargs = ml_collections.ConfigDict()
    c.sample.kwargs = ml_collections.ConfigDict()
    return c


def ema_decay_from_halflife(halflife_mimg: float, batch_size: int) -> float:
    """EDM's per-step EMA decay: beta = 0.5 ** (batch_size / (halflife_mimg * 1e6)), i.e. the
    weight of a parameter snapshot halves every `halflife_mimg` million training images."""
    return float(0.5 ** (batch_size / (halflife_mimg * 1e6)))


# ------------------------------------------------------------------------------ messages
def suggest(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid name (difflib), or None."""
    m = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return m[0] if m else None


def _unknown_field(path: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    s = suggest(name, valid)
    hint = f"did you mean {s!r}? " if s else ""
    return f"config.{path}: unknown field; {hint}valid fields here: {', '.join(valid)}"


def _unknown_name(what: str, name, valid: Sequence[str], path: str | None = None) -> str:
    s = suggest(str(name), valid)
    hint = f" (did you mean {s!r}?)" if s else ""
    where = f"config.{path}: " if path else ""
    return f"{where}unknown {what} {name!r}{hint}; valid: {', '.join(map(str, valid))}"


def _describe(v) -> str:
    return f"{type(v).__name__} ({v!r})"


# ------------------------------------------------------------------------------ checking
def _get(cd, name):
    # Reading a placeholder returns its value (None) – which is what we check.
    return cd[name]


def _set(cd, name, value):
    """Assigns even where ConfigDict's type safety refuses a type change (e.g. int -> float)."""
    try:
        cd[name] = value
    except TypeError:
        was = cd.is_locked
        cd.unlock()
        del cd[name]
        cd[name] = value
        if was:
            cd.lock()


def _coerce(path: str, field: Field, value):
    """Type-checks one value; returns it normalised (int -> float, list -> tuple)."""
    if value is None:
        if field.optional:
            return None
        raise ConfigError(f"config.{path}: expected {_type_name(field.type)}, got None "
                          f"(this field is required)")
    t = field.type
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.{path}: expected float, got {_describe(value)}")
        value = float(value)
        if field.finite and not math.isfinite(value):
            raise ConfigError(f"config.{path}: expected a finite float, got {value!r}")
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.{path}: expected int, got {_describe(value)}")
    elif t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config.{path}: expected bool, got {_describe(value)}")
    elif t is str:
        if not isinstance(value, str):
            raise ConfigError(f"config.{path}: expected str, got {_describe(value)}")
    elif t is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config.{path}: expected tuple, got {_describe(value)}")
        if field.item is not None:
            item = Field(field.item)
            value = tuple(_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value))
        else:
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    choices = field.valid_choices()
    if choices is not None and value not in choices:
        what = path.rsplit(".", 1)[-1]
        raise ConfigError(_unknown_name(f"{what}", value, choices, path))
    if field.check is not None:
        msg = field.check(value)
        if msg:
            raise ConfigError(f"config.{path}: {msg}, got {value!r}")
    return value


def _check_dataset(path: str, name: str):
    if name.startswith(("folder:", "tfds:")):
        return
    valid = [n for n in _dataset_names() if "<" not in n]
    if name not in valid:
        raise ConfigError(_unknown_name("dataset", name, valid + ["folder:<path>", "tfds:<name>"],
                                        path))


def _check_section(config, section: str, fields: Mapping[str, Field], extra: Iterable[str] = ()):
    """Unknown fields -> ConfigError with a suggestion; missing -> default; values checked."""
    sec = config[section]
    if not isinstance(sec, ml_collections.ConfigDict):
        raise ConfigError(f"config.{section}: expected a ConfigDict section, got "
                          f"{_describe(sec)}")
    valid = set(fields) | set(extra)
    for name in list(sec.keys()):
        if name not in valid:
            raise ConfigError(_unknown_field(f"{section}.{name}", name, valid))
    for name, field in fields.items():
        path = f"{section}.{name}"
        if name not in sec:
            setattr(sec, name, _value(field))
            continue
        value = _coerce(path, field, _get(sec, name))
        if name == "name" and section == "data":
            _check_dataset(path, value)
        if value is not None and (type(value) is not type(_get(sec, name))
                                  or value != _get(sec, name)):
            _set(sec, name, value)     # normalised (int -> float, list -> tuple)


def _kwargs_fields_for_process(name: str) -> dict[str, Field]:
    from diffusion_jax.processes import PROCESSES  # pylint: disable=import-outside-toplevel
    cls = PROCESSES[name]
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = Field(type(default) if default is not None else float, default,
                            optional=default is None)
    return out


_SAMPLER_ARGS = ("eps_fn", "process", "x", "ts", "cond", "key", "noise")


def _kwargs_fields_for_sampler(name: str) -> dict[str, Field]:
    import inspect  # pylint: disable=import-outside-toplevel
    from diffusion_jax.sampling import SAMPLERS  # pylint: disable=import-outside-toplevel
    out = {}
    for p in inspect.signature(SAMPLERS[name].fn).parameters.values():
        if p.name in _SAMPLER_ARGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        t = type(default) if default is not None else float
        out[p.name] = Field(t, default, optional=True, finite=False)   # e.g. s_tmax = inf
    return out


def _check_kwargs(config, section: str, fields: Mapping[str, Field], owner: str):
    sec = config[section]
    if "kwargs" not in sec:
        sec.kwargs = ml_collections.ConfigDict()
    kw = sec.kwargs
    if isinstance(kw, Mapping) and not isinstance(kw, ml_collections.ConfigDict):
        sec.kwargs = kw = ml_collections.ConfigDict(dict(kw))
    if not isinstance(kw, ml_collections.ConfigDict):
        raise ConfigError(f"config.{section}.kwargs: expected a ConfigDict of keyword arguments, "
                          f"got {_describe(kw)}")
    for name in list(kw.keys()):
        path = f"{section}.kwargs.{name}"
        if name not in fields:
            valid = sorted(fields)
            s = suggest(name, valid)
            hint = f"did you mean {s!r}? " if s else ""
            raise ConfigError(f"config.{path}: {owner} has no option {name!r}; {hint}"
                              f"valid: {', '.join(valid) or '(none)'}")
        field = fields[name]
        value = _coerce(path, dataclasses.replace(field, optional=True), kw[name])
        if value is not None and (type(value) is not type(kw[name]) or value != kw[name]):
            _set(kw, name, value)


def kwargs_dict(kw) -> dict:
    return {k: kw[k] for k in kw.keys() if kw[k] is not None}


def build_process(config):
    """The process of `config.process` (after validation)."""
    from diffusion_jax.processes import get_process  # pylint: disable=import-outside-toplevel
    return get_process(config.process.name, **kwargs_dict(config.process.kwargs))


def build_objective(config, process, apply_fn, *, train: bool = True):
    """`loss_fn(params, batch, rng)` of `config.objective` for the network `apply_fn`."""
    spec = OBJECTIVES[config.objective.name]
    kwargs = kwargs_dict(config.objective.kwargs)
    if spec.takes_process:
        return spec.get_factory()(process, apply_fn, train=train, **kwargs)
    return spec.get_factory()(apply_fn, train=train, **kwargs)


def _dummy_apply(params, x, t, cond=None, *, train=False, rng=None):  # noqa: ARG001
    return x


def _check_cross(config):
    o, t = config.optim, config.train
    if o.schedule == "cosine":
        updates = t.num_steps // o.grad_accum
        if updates <= o.warmup_steps:
            raise ConfigError(
                f"config.optim.schedule='cosine' decays over train.num_steps // optim.grad_accum "
                f"= {updates} optimiser updates, which must exceed optim.warmup_steps="
                f"{o.warmup_steps}")
    mt = config.model.type
    if mt == "unet":
        levels = len(config.model.ch_mult)
        if levels < 1:
            raise ConfigError("config.model.ch_mult: needs at least one level")
        size = config.data.image_size
        if size is not None and size % 2 ** (levels - 1):
            raise ConfigError(f"config.data.image_size={size} is not divisible by 2**(len("
                              f"model.ch_mult) - 1) = {2 ** (levels - 1)}")
    else:
        size = config.data.image_size
        if size is not None and size % config.model.patch_size:
            raise ConfigError(f"config.data.image_size={size} is not divisible by "
                              f"model.patch_size={config.model.patch_size}")
        if config.model.hidden_size % config.model.num_heads:
            raise ConfigError(f"config.model.hidden_size={config.model.hidden_size} is not "
                              f"divisible by model.num_heads={config.model.num_heads}")
    if config.objective.label_dropout > 0 and config.model.num_classes is None:
        raise ConfigError("config.objective.label_dropout > 0 needs a class-conditional model "
                          "(config.model.num_classes)")
    if config.sample.guidance_scale != 1.0 and config.model.num_classes is None:
        raise ConfigError("config.sample.guidance_scale != 1 needs a class-conditional model "
                          "(config.model.num_classes)")
    ae = config.autoencoder
    if ae.kind != "none":
        if mt != "unet":
            raise ConfigError(f"config.autoencoder.kind={ae.kind!r} needs a UNet decoder "
                              f"(config.model.type='unet'), got {mt!r}")
        if config.model.num_classes is not None:
            raise ConfigError("config.autoencoder: class-conditional decoders are not supported; "
                              "leave config.model.num_classes unset")
        size = config.data.image_size
        encoder = ae.encoder or ("semantic" if ae.kind == "diffae" else "conv")
        if encoder == "conv" and size is not None and (size < 4 or size & (size - 1)):
            raise ConfigError(f"config.autoencoder.encoder='conv' halves the image down to 2x2: "
                              f"data.image_size must be a power of two >= 4, got {size}")
    elif config.latent_sampler.num_steps:
        raise ConfigError("config.latent_sampler.num_steps > 0 needs a diffusion autoencoder "
                          "(config.autoencoder.kind 'diffae' or 'dmz')")
    d = config.distributed
    if d.num_processes is not None and d.num_processes > 1 and d.coordinator_address is None:
        raise ConfigError("config.distributed.num_processes > 1 needs "
                          "config.distributed.coordinator_address ('host:port' of process 0)")
    if d.process_id is not None and d.num_processes is not None and \
            d.process_id >= d.num_processes:
        raise ConfigError(f"config.distributed.process_id={d.process_id} must be < "
                          f"num_processes={d.num_processes}")
    e = config.ema
    if e.halflife_mimg is not None:
        decay = ema_decay_from_halflife(e.halflife_mimg, config.data.batch_size * o.grad_accum)
        if len(e.decays) and not any(abs(d - decay) < 1e-9 for d in e.decays):
            raise ConfigError(
                f"config.ema.halflife_mimg={e.halflife_mimg} sets the decay to {decay!r} at batch "
                f"{config.data.batch_size * o.grad_accum}; config.ema.decays={tuple(e.decays)} "
                f"disagrees: leave ema.decays empty (it is derived) or drop halflife_mimg")
        if not len(e.decays):
            e.decays = (decay,)


def validate(config: ml_collections.ConfigDict, *, lock: bool = True) -> ml_collections.ConfigDict:
    """Checks `config` against the schema (raises `ConfigError`), fills defaults and derived
    values, builds the process and the objective once to check their options, and locks it.
    Returns the same ConfigDict."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"a config must be an ml_collections.ConfigDict, got "
                          f"{type(config).__name__}")
    was_locked = config.is_locked
    if was_locked:
        config.unlock()
    try:
        for name in list(config.keys()):
            if name not in SCHEMA:
                raise ConfigError(_unknown_field(name, name, SCHEMA))
        for section in SCHEMA:
            if section not in config:
                setattr(config, section, ml_collections.ConfigDict())
        # Model: the type picks the field set.
        if "type" not in config.model:
            config.model.type = "unet"
        config.model.type = _coerce("model.type", SCHEMA["model"]["type"], config.model.type)
        _check_section(config, "model", {**SCHEMA["model"], **MODEL_FIELDS[config.model.type]})
        # Process and objective: name, then kwargs against what they accept.
        _check_section(config, "process", SCHEMA["process"], extra=("kwargs",))
        _check_kwargs(config, "process", _kwargs_fields_for_process(config.process.name),
                      f"process {config.process.name!r}")
        _check_section(config, "objective", SCHEMA["objective"], extra=("kwargs",))
        spec = OBJECTIVES[config.objective.name]
        _check_kwargs(config, "objective", spec.kwargs, f"objective {config.objective.name!r}")
        _check_section(config, "sample", SCHEMA["sample"], extra=("kwargs",))
        _check_kwargs(config, "sample", _kwargs_fields_for_sampler(config.sample.sampler),
                      f"sampler {config.sample.sampler!r}")
        for section in SCHEMA:
            if section not in ("model", "process", "objective", "sample"):
                _check_section(config, section, SCHEMA[section])
        _check_cross(config)
        # Build the cheap objects once: bad option values fail here, naming the section.
        try:
            process = build_process(config)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.process: {e}") from None
        try:
            build_objective(config, process, _dummy_apply)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"config.objective ({config.objective.name!r}): {e}") from None
    finally:
        if lock or was_locked:
            config.lock()
    return config


# ------------------------------------------------------------------------ loading / overrides
def _to_tuples(x):
    if isinstance(x, Mapping):
        return {k: _to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_to_tuples(v) for v in x)
    return x


def from_dict(d: Mapping[str, Any], *, validate_config: bool = True) -> ml_collections.ConfigDict:
    """A config from a plain (e.g. JSON-loaded) dict: lists become tuples, missing fields get
    their defaults (typed placeholders), then `validate`."""
    d = _to_tuples(dict(d))
    mt = (d.get("model") or {}).get("type", "unet")
    config = base_config(mt if mt in MODEL_FIELDS else "unet")
    for section, values in d.items():
        if section not in config:
            if validate_config:
                raise ConfigError(_unknown_field(section, section, SCHEMA))
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config.{section}: expected a section (dict), got "
                              f"{_describe(values)}")
        sec = config[section]
        for k, v in values.items():
            if k == "kwargs" and section in _KWARGS_SECTIONS:
                sec.kwargs = ml_collections.ConfigDict(dict(v or {}))
            elif k in sec and v is None:
                continue                       # keep the typed placeholder
            elif k in sec and isinstance(v, (int, float)) and isinstance(sec[k], float) \
                    and not isinstance(v, bool):
                sec[k] = float(v)
            else:
                _set(sec, k, v)
    return validate(config) if validate_config else config


def _load_module(path: str):
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(
        "diffusion_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module


def load_file(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of 'path.py' (or `get_config(arg)` for 'path.py:arg'), unvalidated."""
    path, _, arg = spec.partition(":")
    try:
        module = _load_module(path)
        return module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the config file's own error, with the file named
        raise ConfigError(f"loading config {spec!r} failed: {type(e).__name__}: {e}") from e


def _walk(config, dotted: str, where: str = "config"):
    """(parent ConfigDict, last key) of a dotted path; ConfigError with a suggestion if absent."""
    parts = dotted.split(".")
    node, done = config, []
    for i, p in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"{where}.{'.'.join(done)} is a value, not a section "
                              f"(cannot set {dotted!r})")
        if p not in node:
            keys = list(node.keys())
            if not done and not keys:
                keys = list(SCHEMA)
            s = suggest(p, keys)
            hint = f"did you mean {s!r}? " if s else ""
            prefix = ".".join(done + [p])
            raise ConfigError(f"{where}.{prefix}: unknown field; {hint}valid fields here: "
                              f"{', '.join(sorted(keys))}")
        if i < len(parts) - 1:
            node = node[p]
        done.append(p)
    return node, parts[-1]


def check_override_paths(config, paths: Iterable[str]) -> None:
    """ConfigError (with a suggestion) for the first dotted path that `config` does not hold."""
    for p in paths:
        _walk(config, p)


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies 'section.field=value' strings (values parsed as Python literals)."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like section.field=value")
        key, _, text = o.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        parent, last = _walk(config, key)
        value = _parse_value(text)
        current = parent[last]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        _set(parent, last, value)   # another type: `validate` reports it with the field's name
    return config


def load_config(spec: str, overrides: Sequence[str] = (), *, validate_config: bool = True
                ) -> ml_collections.ConfigDict:
    """`load_file(spec)` + `apply_overrides` + `validate` (locked on return)."""
    config = load_file(spec)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{spec}: get_config() must return an ml_collections.ConfigDict, got "
                          f"{type(config).__name__}")
    apply_overrides(config, overrides)
    return validate(config) if validate_config else config
