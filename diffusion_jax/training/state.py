"""Train state, optimiser factory, EMA, and sharded initialisation.

`TrainState` is a plain pytree (no functions inside, so Orbax saves it as is):

    step       int32 ()        number of train_step calls so far (micro-steps under accumulation)
    params     float32 tree    the network's 'params' collection (unboxed)
    opt_state  optax state     AdamW moments (float32, sharded like params) + counters
    ema        {key: tree}     one EMA copy of params per decay, key = `ema_key(decay)`
                               ('0.9999' -> '0p9999', no dots: Orbax joins tree paths with '.')
    rng        uint32 (2,)     base PRNG key; step k uses `jax.random.fold_in(rng, k)`
    model_state  pytree        non-trainable state of a stateful loss (default `{}`: no leaves),
                               e.g. {'encoder': <BatchNorm batch_stats>, 'objective': {...}};
                               its own dtypes, never touched by the optimiser or EMA (see
                               `make_init_fn` and `train_step.make_train_step`)

Sharded initialisation (maxdiffusion / MaxText style), `init_train_state`:

    abstract = jax.eval_shape(init_fn, rng)           # boxed: logical axis names, no FLOPs
    shardings = logical_shardings(abstract, mesh)     # rules -> NamedShardings (+ fallbacks)
    state = jax.jit(unboxed init_fn, out_shardings=shardings)(rng)   # born sharded

Optimiser moments and EMA copies are derived from the boxed params (optax maps over the boxes), so
they carry the same logical names and shard exactly like the parameters. `model_state` leaves are
replicated unless they are boxed (`nn.LogicallyPartitioned`), then they follow the same rules.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.core import unfreeze
from jax.sharding import Mesh

from diffusion_jax.training import mesh as mesh_lib

__all__ = ["TrainState", "OptimizerConfig", "make_optimizer", "make_schedule", "ema_key",
           "ema_decay_at", "update_ema", "make_init_fn", "abstract_train_state", "init_train_state",
           "state_shardings", "InitResult", "has_leaves"]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: dict[str, Any]
    rng: jax.Array
    model_state: Any = struct.field(default_factory=dict)

    @property
    def is_stateful(self) -> bool:
        """True iff `model_state` has at least one leaf (the train step then calls the 4-argument
        loss `loss_fn(params, batch, rng, model_state)`)."""
        return has_leaves(self.model_state)

    def ema_params(self, decay: float | str) -> Any:
        """The EMA parameters for `decay` (a float or an `ema_key`)."""
        key = decay if isinstance(decay, str) else ema_key(decay)
        if key not in self.ema:
            raise KeyError(f"no EMA with decay {decay}; have {sorted(self.ema)}")
        return self.ema[key]


def has_leaves(tree: Any) -> bool:
    """True iff `tree` has at least one leaf (`{}`, `{'encoder': {}}`, None have none)."""
    return bool(jax.tree_util.tree_leaves(tree))


def ema_key(decay: float) -> str:
    """Dict key of an EMA decay: 0.9999 -> '0p9999'."""
    return repr(float(decay)).replace(".", "p").replace("-", "m")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + schedule + clipping (+ accumulation). All fields JSON-able.

    schedule: 'constant' (after warm-up) or 'cosine' (warm-up then cosine decay to
    `end_lr_factor * learning_rate` at `total_steps`; required). Steps count optimiser updates
    (i.e. micro-steps // grad_accum_steps). weight_decay applies to parameters with ndim >= 2 only
    (`decay_all=True`: to every parameter). grad_clip_norm: global-norm clipping (None/0: off).
    grad_accum_steps > 1 wraps the optimiser in `optax.MultiSteps`: gradients of that many
    consecutive train_step calls are averaged and applied once (params/EMA change every k steps).
    """
    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_all: bool = False
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int | None = None
    end_lr_factor: float = 0.0
    grad_clip_norm: float | None = 1.0
    grad_accum_steps: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "OptimizerConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown optimizer options {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then constant or cosine."""
    lr, warm = float(cfg.learning_rate), int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        if warm <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    if cfg.schedule == "cosine":
        if not cfg.total_steps:
            raise ValueError("schedule='cosine' needs total_steps (number of optimiser updates)")
        if cfg.total_steps <= warm:
            raise ValueError(f"total_steps={cfg.total_steps} must exceed warmup_steps={warm}")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warm, decay_steps=int(cfg.total_steps),
            end_value=lr * float(cfg.end_lr_factor))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'constant' or 'cosine'")


def _decay_mask(params):
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimizerConfig | Mapping[str, Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) from an `OptimizerConfig` (or a dict of its fields)."""
    if not isinstance(cfg, OptimizerConfig):
        cfg = OptimizerConfig.from_dict(cfg)
    if cfg.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {cfg.grad_accum_steps}")
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=None if cfg.decay_all else _decay_mask))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.grad_accum_steps))
    return tx, schedule


def ema_decay_at(decay: float, step, warmup: bool) -> jax.Array:
    """Effective decay at optimiser update `step` (0-based): `decay`, or with warm-up
    min(decay, (1 + step) / (10 + step))."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: dict[str, Any], params: Any, decays: Mapping[str, float], step,
               warmup: bool = False) -> dict[str, Any]:
    """ema <- d * ema + (1 - d) * params for each decay (float32)."""
    out = {}
    for key, old in ema.items():
        d = ema_decay_at(decays[key], step, warmup)
        out[key] = jax.tree_util.tree_map(
            lambda e, p: (d * e + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype), old, params)
    return out


def _no_model_state(key):
    del key
    return {}


def make_init_fn(init_params_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 ema_decays: Sequence[float] = (), *,
                 init_model_state_fn: Callable[[jax.Array], Any] | None = None
                 ) -> Callable[[jax.Array], TrainState]:
    """`init_fn(rng) -> TrainState` (boxed leaves kept, for `jax.eval_shape`).

    `init_params_fn(key)` returns the 'params' collection, boxed (`module.init(...)['params']`
    with logical partitioning) or not (then everything is replicated). It must be traceable.

    `init_model_state_fn(key)` (default `lambda key: {}`) returns the initial `model_state` of a
    stateful loss (e.g. `{'encoder': variables['batch_stats'], 'objective': {}}`). It gets the
    SAME key as `init_params_fn`, so both may call one `module.init(key, ...)` and keep different
    collections (under jit/eval_shape the duplicate init is cheap and bit-identical). FrozenDicts
    are thawed to dicts (the train step compares tree structures). Leaves keep their dtypes.
    """
    decays = tuple(float(d) for d in ema_decays)
    if len({ema_key(d) for d in decays}) != len(decays):
        raise ValueError(f"duplicate EMA decays {decays}")
    for d in decays:
        if not 0.0 <= d < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {d}")
    init_model_state_fn = init_model_state_fn or _no_model_state

    def init_fn(rng):
        rng = jnp.asarray(rng, jnp.uint32)
        k_params, k_base = jax.random.split(rng)
        params = init_params_fn(k_params)
        if isinstance(params, Mapping) and "params" in params:
            if len(params) == 1:
                params = params["params"]
            elif "batch_stats" in params:
                raise ValueError(
                    f"init_params_fn returned a flax variables dict with collections "
                    f"{sorted(params)}; return only variables['params'] and pass the other "
                    f"collections through init_model_state_fn (e.g. lambda k: "
                    f"{{'encoder': module.init(k, ...)['batch_stats']}})")
        opt_state = tx.init(params)
        ema = {ema_key(d): jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
               for d in decays}
        model_state = unfreeze(init_model_state_fn(k_params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          ema=ema, rng=k_base, model_state=model_state)

    return init_fn


def abstract_train_state(init_fn: Callable[[jax.Array], TrainState]) -> TrainState:
    """`jax.eval_shape(init_fn, key)`: boxed ShapeDtypeStructs (logical names kept), no FLOPs."""
    return jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))


def state_shardings(init_fn: Callable[[jax.Array], TrainState], mesh: Mesh,
                    rules=mesh_lib.DEFAULT_LOGICAL_AXIS_RULES) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state with `.sharding` set, NamedSharding tree) for `init_fn` on `mesh`."""
    boxed = abstract_train_state(init_fn)
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
    return abstract, shardings


@dataclasses.dataclass
class InitResult:
    state: TrainState
    shardings: TrainState          # NamedSharding per leaf
    abstract: TrainState           # ShapeDtypeStructs with .sharding (restore target)
    compile_seconds: float
    run_seconds: float


def init_train_state(init_fn: Callable[[jax.Array], TrainState], mesh: Mesh, rng,
                     rules=mesh_lib.DEFAULT_LOGICAL_AXIS_RULES) -> InitResult:
    """Creates the state directly in its sharded layout (jit with out_shardings; AOT compiled)."""
    abstract, shardings = state_shardings(init_fn, mesh, rules)
    rng = jnp.asarray(rng, jnp.uint32)
    if rng.shape != (2,):
        raise ValueError(f"rng must be a raw uint32 PRNG key of shape (2,) "
                         f"(jax.random.PRNGKey(seed)), got shape {rng.shape}")
    t0 = time.perf_counter()
    compiled = jax.jit(lambda r: nn.unbox(init_fn(r)), in_shardings=mesh_lib.replicated(mesh),
                       out_shardings=shardings).lower(
                           jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
    t1 = time.perf_counter()
    host_rng = np.asarray(jax.device_get(rng))
    rng = jax.make_array_from_callback((2,), mesh_lib.replicated(mesh), lambda idx: host_rng[idx])
    state = compiled(rng)
    jax.block_until_ready(state)
    return InitResult(state, shardings, abstract, t1 - t0, time.perf_counter() - t1)
