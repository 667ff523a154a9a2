"""`validate(config)`: checks a config against the schema (`schema.py`) and locks it; also
`build_process` / `build_objective`, which build what a checked config describes."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import ml_collections

from diffusion_jax.config.schema import (
    MODEL_FIELDS, OBJECTIVES, PHASE_SPACE_OBJECTIVES, SCHEMA, ConfigError, Field, _dataset_names, _describe, _type_name,
    _unknown_field, _unknown_name, _value, ema_decay_from_halflife, suggest,
)


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
    from diffusion_jax.processes import PHASE_SPACE_PROCESSES, PROCESSES  # pylint: disable=import-outside-toplevel
    cls = {**PROCESSES, **PHASE_SPACE_PROCESSES}[name]
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


def _check_phase_space(config):
    """A phase-space process (CLD) is trained by its own objective only, and that objective by it."""
    process, objective = config.process.name, config.objective.name
    wanted = PHASE_SPACE_OBJECTIVES.get(process)
    if wanted is not None and objective != wanted:
        raise ConfigError(f"config.objective.name={objective!r} cannot train the phase-space process "
                          f"config.process.name={process!r}: use objective {wanted!r}")
    owners = [p for p, o in PHASE_SPACE_OBJECTIVES.items() if o == objective]
    if owners and process not in owners:
        raise ConfigError(f"config.objective.name={objective!r} needs config.process.name="
                          f"{owners[0]!r} (a phase-space process), got {process!r}")


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
    if config.objective.name == "reflow" and config.process.name != "flow":
        raise ConfigError(f"config.objective.name='reflow' trains a rectified flow on its teacher's "
                          f"pairs: config.process.name must be 'flow', got {config.process.name!r}")
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
        latent = ae.latent or ("continuous" if ae.kind == "diffae" else "binary")
        if ae.bit_usage_weight and latent != "binary":
            raise ConfigError(f"config.autoencoder.bit_usage_weight applies to binary latents; this "
                              f"autoencoder's latent is {latent!r}")
        if ae.straight_through and latent != "binary":
            raise ConfigError(f"config.autoencoder.straight_through applies to binary latents; this "
                              f"autoencoder's latent is {latent!r}")
        if ae.tau_final is not None and (latent != "binary" or ae.tau_anneal_steps < 1):
            raise ConfigError(f"config.autoencoder.tau_final anneals a binary latent's temperature over "
                              f"autoencoder.tau_anneal_steps >= 1 steps; got latent {latent!r}, "
                              f"tau_anneal_steps={ae.tau_anneal_steps}")
        if ae.pool != "mean" and encoder != "semantic":
            raise ConfigError(f"config.autoencoder.pool={ae.pool!r} applies to the semantic encoder; "
                              f"this autoencoder's encoder is {encoder!r}")
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


def _check_times(config, process):
    """eval.bpd_t_min inside the process' time range [t_min, t_max)."""
    t = config.eval.bpd_t_min
    if t is not None and not process.t_min - 1e-12 <= t < process.t_max:
        raise ConfigError(
            f"config.eval.bpd_t_min={t!r} is outside the time range [{process.t_min:g}, "
            f"{process.t_max:g}) of the process {config.process.name!r}; the model is defined from "
            f"t_min on (lower it with config.process.kwargs.t_min, the training range)")


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
        _check_phase_space(config)            # before the kwargs: the pairing is the first error
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
        _check_times(config, process)
        try:
            build_objective(config, process, _dummy_apply)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"config.objective ({config.objective.name!r}): {e}") from None
    finally:
        if lock or was_locked:
            config.lock()
    return config
