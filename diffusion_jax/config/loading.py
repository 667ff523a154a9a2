"""Configs from files (`configs/x.py[:arg]`), plain dicts (JSON) and `path=value` overrides."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from diffusion_jax.config.schema import (
    _KWARGS_SECTIONS, MODEL_FIELDS, SCHEMA, ConfigError, _describe, _unknown_field, base_config, suggest,
)
from diffusion_jax.config.validate import _set, validate


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
