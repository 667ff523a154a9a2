"""Config building blocks: `Field` (type, default, choices, check), the common checks, the choice lists
read from the library's registries (imported lazily, so the config layer imports no maths), and the
error messages that name a field and suggest the closest valid name."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterable, Sequence


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


def _dataset_names() -> tuple[str, ...]:
    from diffusion_jax.data import known_datasets  # pylint: disable=import-outside-toplevel
    return tuple(known_datasets())


def _process_names() -> tuple[str, ...]:
    """The scalar processes (`processes.PROCESSES`) and the phase-space ones (`PHASE_SPACE_PROCESSES`:
    'cld', trained only by their own objective, see `PHASE_SPACE_OBJECTIVES`)."""
    from diffusion_jax.processes import PHASE_SPACE_PROCESSES, PROCESSES  # pylint: disable=import-outside-toplevel
    return tuple(sorted({**PROCESSES, **PHASE_SPACE_PROCESSES}))


def _cld_choices(name: str) -> Callable[[], tuple]:
    def choices():
        from diffusion_jax.objectives import cld  # pylint: disable=import-outside-toplevel
        return getattr(cld, name)
    return choices


def _cld_samplers() -> tuple[str, ...]:
    from diffusion_jax.sampling.cld import CLD_SAMPLERS  # pylint: disable=import-outside-toplevel
    return tuple(CLD_SAMPLERS)


def _cld_option(name: str) -> Callable[[], tuple]:
    def choices():
        from diffusion_jax.sampling import cld  # pylint: disable=import-outside-toplevel
        return getattr(cld, name)
    return choices


def _open_unit(v):
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


def _sampler_names() -> tuple[str, ...]:
    from diffusion_jax.sampling import SAMPLERS  # pylint: disable=import-outside-toplevel
    return tuple(sorted(SAMPLERS))


def _spacings() -> tuple[str, ...]:
    from diffusion_jax.sampling import SPACINGS  # pylint: disable=import-outside-toplevel
    return tuple(SPACINGS)


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
