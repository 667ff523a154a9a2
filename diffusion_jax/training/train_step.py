"""The train step: pure function, then sharded, donated and compiled ahead of time.

    step = make_train_step(loss_fn, tx, schedule)        # pure (state, batch, rng) -> (state, metrics)
    compiled = compile_train_step(step, init.abstract, batch_spec, mesh)   # AOT, once
    state, metrics = compiled(state, batch)              # rng = fold_in(state.rng, state.step)

`loss_fn(params, batch, rng) -> (loss, aux)` is any objective (`diffusion_jax.objectives`). Mixed
precision: the network's compute dtype (e.g. bf16) is its own `dtype`; parameters, gradients,
optimiser state and EMA stay float32 and the loss is cast to float32 before differentiation.

Metrics (float32 scalars, replicated): 'loss', 'grad_norm' (global norm before clipping),
'learning_rate' (of the update this step contributes to), 'grad_norm/<group>' for each of
`grad_norm_groups`, and every scalar of `aux` (nested dicts
flattened with '/'; non-scalar aux entries are dropped). With `return_grads=True` also 'grads' (a
params-shaped tree, sharded like the params; for tests and debugging).

The per-step key `fold_in(state.rng, state.step)` depends only on the seed and the step, so a
resumed run draws exactly the noise an uninterrupted one would.

Stateful losses (BatchNorm running statistics, a loss history for importance sampling of t): when
`state.model_state` has at least one leaf the step calls

    loss, aux = loss_fn(params, batch, rng, state.model_state)

and the new state is `stop_gradient(aux.pop('model_state'))` (same tree structure and shapes; each
leaf is cast to its stored dtype). It is replaced on EVERY call, i.e. every micro-step under
gradient accumulation (k batches of an `optax.MultiSteps` update give k state updates, like k
forward passes of a PyTorch module in train mode), and it is neither optimised nor averaged by the
EMA. With no leaves in `state.model_state` the step calls the plain 3-argument loss, as before.

A `phases.PhasedLoss` (GANs, LSGM) with a `phases.make_group_optimizer` optimiser: the step runs
its phases in order, each updating its own parameter groups (see phases.py); metrics
'<phase>/loss', '<phase>/<aux>', 'grad_norm/<group>', 'loss' (the report phase's).
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import unfreeze
from jax.sharding import Mesh

from diffusion_jax.training import distributed as dist
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training.phases import GroupOptimizer, PhasedLoss
from diffusion_jax.training.state import TrainState, has_leaves, update_ema

LossFn = Callable[..., tuple[jax.Array, Any]]   # (params, batch, rng[, model_state]) -> (loss, aux)

__all__ = ["make_train_step", "compile_train_step", "CompiledTrainStep", "batch_spec_of",
           "validate_batch", "step_rng", "ema_decays_of"]


def ema_decays_of(ema: Mapping[str, Any]) -> dict[str, float]:
    """{ema_key: decay} from the keys of `state.ema` ('0p9999' -> 0.9999)."""
    return {k: float(k.replace("p", ".").replace("m", "-")) for k in ema}


def _scalar_metrics(aux: Any, prefix: str = "") -> dict[str, jax.Array]:
    out = {}
    if isinstance(aux, Mapping):
        for k, v in aux.items():
            out.update(_scalar_metrics(v, f"{prefix}{k}/"))
    elif aux is not None and hasattr(aux, "shape") and np.ndim(aux) == 0:
        out[prefix[:-1] or "aux"] = jnp.asarray(aux, jnp.float32)
    return out


def step_rng(state: TrainState) -> jax.Array:
    """The loss key of the step `state.step`: fold_in(state.rng, state.step)."""
    return jax.random.fold_in(state.rng, state.step)


def _check_arity(loss_fn: Callable, stateful: bool) -> None:
    """Clear error when `loss_fn` cannot take the arguments the step will pass."""
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):      # builtins, some C callables: let the call speak
        return
    args = (None,) * (4 if stateful else 3)
    try:
        sig.bind(*args)
    except TypeError as e:
        if stateful:
            raise ValueError(
                f"state.model_state has leaves, so the train step calls "
                f"loss_fn(params, batch, rng, model_state), but loss_fn{sig} does not take a "
                f"model_state argument ({e}); use a stateful loss or init_model_state_fn=None"
            ) from None
        raise ValueError(
            f"state.model_state has no leaves, so the train step calls loss_fn(params, batch, "
            f"rng), but loss_fn{sig} cannot be called that way ({e}); pass "
            f"init_model_state_fn to make_init_fn / train (a stateful loss needs a model_state "
            f"with leaves), or give model_state a default") from None


def _new_model_state(old: Any, aux: Any) -> tuple[Any, Any]:
    """(new model_state, aux without it): `aux['model_state']` checked against `old` (tree
    structure and shapes), cast to `old`'s dtypes, stop_gradient."""
    if not isinstance(aux, Mapping) or "model_state" not in aux:
        got = sorted(aux) if isinstance(aux, Mapping) else type(aux).__name__
        raise ValueError(
            f"state.model_state has leaves (a stateful loss), but loss_fn did not return "
            f"aux['model_state'] (aux: {got}); a stateful loss must return its updated state in "
            f"aux['model_state'] with the structure of the state it was given")
    aux = dict(aux)
    new = unfreeze(nn.unbox(aux.pop("model_state")))
    old_def, new_def = jax.tree_util.tree_structure(old), jax.tree_util.tree_structure(new)
    if old_def != new_def:
        raise ValueError(f"loss_fn returned aux['model_state'] with tree structure {new_def}, "
                         f"but state.model_state has {old_def}")
    flat_old = jax.tree_util.tree_flatten_with_path(old)[0]

    def cast(path_old, n):
        path, o = path_old
        name = f"aux['model_state']{jax.tree_util.keystr(path)}"
        if jnp.shape(n) != jnp.shape(o):
            raise ValueError(f"{name} has shape {jnp.shape(n)}, the state has {jnp.shape(o)}")
        o_dtype, n_dtype = jnp.result_type(o), jnp.result_type(n)
        if np.dtype(o_dtype).kind != np.dtype(n_dtype).kind and not (
                jnp.issubdtype(o_dtype, jnp.floating) and jnp.issubdtype(n_dtype, jnp.floating)):
            raise ValueError(f"{name} has dtype {n_dtype}, the state has {o_dtype}")
        return jax.lax.stop_gradient(jnp.asarray(n).astype(o_dtype))

    leaves = [cast(po, n) for po, n in zip(flat_old, jax.tree_util.tree_leaves(new))]
    return jax.tree_util.tree_unflatten(old_def, leaves), aux


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, *, grad_accum_steps: int = 1,
                    ema_warmup: bool = False, return_grads: bool = False,
                    grad_norm_groups: tuple[str, ...] = ()
                    ) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
    """Pure `train_step(state, batch, rng) -> (new_state, metrics)`.

    grad_accum_steps must match the optimiser's `optax.MultiSteps` k (1 = no accumulation): EMA
    and the learning-rate metric follow the optimiser updates, i.e. state.step // k. EMA decays
    are read from `state.ema`'s keys; with `ema_warmup` the decay at update n is
    min(decay, (1 + n) / (10 + n)).

    Stateful losses (`state.model_state` has leaves): `loss_fn(params, batch, rng, model_state)`
    must return the new state in `aux['model_state']` (ValueError otherwise, or if its tree
    structure / shapes differ); it replaces `state.model_state` every call (every micro-step).

    grad_norm_groups: top-level parameter groups (e.g. ('encoder', 'decoder') of an autoencoder)
    whose gradient norms are reported as 'grad_norm/<group>'.
    """
    k = int(grad_accum_steps)
    groups = tuple(grad_norm_groups)
    if isinstance(loss_fn, PhasedLoss):
        return _make_phased_step(loss_fn, tx, schedule, grad_accum_steps=k, ema_warmup=ema_warmup,
                                 return_grads=return_grads, grad_norm_groups=groups)

    def train_step(state: TrainState, batch, rng):
        stateful = has_leaves(state.model_state)
        _check_arity(loss_fn, stateful)

        def objective(params):
            if stateful:
                loss, aux = loss_fn(params, batch, rng, state.model_state)
            else:
                loss, aux = loss_fn(params, batch, rng)
            return jnp.asarray(loss, jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        model_state = state.model_state
        if stateful:
            model_state, aux = _new_model_state(state.model_state, aux)
        elif isinstance(aux, Mapping) and "model_state" in aux:
            aux = dict(aux)
            returned = aux.pop("model_state")
            if has_leaves(returned):
                raise ValueError(
                    "loss_fn returned aux['model_state'] with leaves, but state.model_state has "
                    "none, so the new state would be dropped; pass init_model_state_fn to "
                    "make_init_fn / train to give the state its initial model_state")
        grad_norm = optax.tree.norm(grads)
        missing = [g for g in groups if not isinstance(grads, Mapping) or g not in grads]
        if missing:
            raise ValueError(f"grad_norm_groups {missing} are not top-level parameter groups "
                             f"(have {sorted(grads) if isinstance(grads, Mapping) else type(grads)})")
        group_norms = {f"grad_norm/{g}": optax.tree.norm(grads[g]).astype(jnp.float32) for g in groups}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        update_index = state.step // k          # optimiser update this step contributes to
        ema = state.ema
        if ema:
            new_ema = update_ema(ema, params, ema_decays_of(ema), update_index, ema_warmup)
            if k > 1:
                applied = (state.step + 1) % k == 0
                new_ema = jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new_ema, ema)
            ema = new_ema
        metrics = _scalar_metrics(aux)
        metrics.update(loss=loss, grad_norm=grad_norm.astype(jnp.float32), **group_norms)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(update_index), jnp.float32)
        if return_grads:
            metrics["grads"] = grads
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                                  model_state=model_state)
        return new_state, metrics

    return train_step


def _make_phased_step(loss_fn: PhasedLoss, tx, schedule, *, grad_accum_steps: int,
                      ema_warmup: bool, return_grads: bool, grad_norm_groups: tuple):
    """The train step of a `PhasedLoss` (phases.py): the phases' updates in order, then EMA."""
    if grad_accum_steps != 1:
        raise ValueError(f"a PhasedLoss updates its groups in turn every step; gradient "
                         f"accumulation (grad_accum_steps={grad_accum_steps}) is not supported")
    if not isinstance(tx, GroupOptimizer):
        raise ValueError("a PhasedLoss needs a per-group optimiser (training.make_group_optimizer "
                         "/ the family's optimizer_groups), got a single optax transformation")
    unknown = [g for g in loss_fn.groups if g not in tx.txs]
    if unknown:
        raise ValueError(f"phases update parameter groups {unknown} that have no optimiser "
                         f"(optimiser groups: {sorted(tx.txs)})")

    def train_step(state: TrainState, batch, rng):
        loss_fn.check_params(state.params)
        stateful = has_leaves(state.model_state)
        params, opt_state = dict(state.params), dict(state.opt_state)
        model_state = state.model_state
        metrics, all_grads = {}, {}
        for i, phase in enumerate(loss_fn.phases):
            _check_arity(phase.loss_fn, stateful)
            key = jax.random.fold_in(rng, i)

            def objective(sub, params=params, phase=phase, key=key, model_state=model_state):
                p = {**params, **sub}
                if stateful:
                    loss, aux = phase.loss_fn(p, batch, key, model_state)
                else:
                    loss, aux = phase.loss_fn(p, batch, key)
                return jnp.asarray(loss, jnp.float32), aux

            sub = {g: params[g] for g in phase.groups}
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(sub)
            if stateful:
                model_state, aux = _new_model_state(model_state, aux)
            elif isinstance(aux, Mapping) and "model_state" in aux:
                aux = {k: v for k, v in aux.items() if k != "model_state"}
            for g in phase.groups:
                updates, opt_state[g] = tx.update_group(g, grads[g], opt_state, params[g])
                params[g] = optax.apply_updates(params[g], updates)
                all_grads[g] = grads[g]
                metrics[f"grad_norm/{g}"] = optax.tree.norm(grads[g]).astype(jnp.float32)
            metrics.update({f"{phase.name}/{k}": v for k, v in _scalar_metrics(aux).items()})
            metrics[f"{phase.name}/loss"] = loss
            if phase.name == loss_fn.report:
                metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(all_grads).astype(jnp.float32)
        missing = [g for g in grad_norm_groups if f"grad_norm/{g}" not in metrics]
        if missing:
            raise ValueError(f"grad_norm_groups {missing} are updated by no phase")
        ema = state.ema
        if ema:
            ema = update_ema(ema, params, ema_decays_of(ema), state.step, ema_warmup)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        if return_grads:
            metrics["grads"] = {g: all_grads.get(g, jax.tree_util.tree_map(jnp.zeros_like, v))
                                for g, v in state.params.items()}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                                  model_state=model_state)
        return new_state, metrics

    return train_step


def _key_str(path) -> str:
    return "".join(f"[{getattr(p, 'key', getattr(p, 'idx', p))!r}]" for p in path)


def _dtype(x) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def batch_spec_of(batch: Any, *, local: bool = True) -> Any:
    """Global `jax.ShapeDtypeStruct` tree of a batch; `local=True`: `batch` is this process' share
    (leading axis times process_count)."""
    n = jax.process_count() if local else 1

    def one(x):
        shape = tuple(np.shape(x))
        if not shape:
            raise ValueError("every batch array needs a leading batch axis, got a scalar")
        return jax.ShapeDtypeStruct((shape[0] * n, *shape[1:]), _dtype(x))

    return jax.tree_util.tree_map(one, batch)


def validate_batch(batch: Any, spec: Any) -> None:
    """Clear ValueError unless `batch` matches `spec` (global ShapeDtypeStructs) in keys, shapes and
    dtypes. Global jax.Arrays are compared with the global shape, host arrays with this process'
    share (leading axis / process_count)."""
    spec_leaves, spec_def = jax.tree_util.tree_flatten_with_path(spec)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(batch)
    if spec_def != got_def:
        want = sorted(_key_str(p) for p, _ in spec_leaves)
        got = sorted(_key_str(p) for p, _ in got_leaves)
        raise ValueError(f"batch structure does not match the compiled step: got keys {got}, "
                         f"expected {want}")
    n = jax.process_count()
    for (path, s), (_, x) in zip(spec_leaves, got_leaves):
        name = f"batch{_key_str(path)}"
        shape = tuple(np.shape(x))
        want = tuple(s.shape)
        is_global = isinstance(x, jax.Array) and (n == 1 or not x.is_fully_addressable)
        if not is_global and n > 1:
            want = (want[0] // n, *want[1:])
            name += f" (process {jax.process_index()}'s share of {n})"
        if shape != want:
            raise ValueError(f"{name} has shape {shape}, expected {want}")
        dtype = _dtype(x)
        if dtype != np.dtype(s.dtype):
            raise ValueError(f"{name} has dtype {dtype}, expected {np.dtype(s.dtype)}")


class CompiledTrainStep:
    """An AOT-compiled, sharded, state-donating train step: `(state, batch) -> (state, metrics)`.

    Attributes: `compile_seconds` (lower + compile), `lower_seconds`, `batch_spec` (global),
    `state_shardings`, `batch_shardings`, `mesh`, `compiled` (the `jax.stages.Compiled`).
    Calling validates the batch (keys, shapes, dtypes) and assembles host batches into global
    arrays (`distributed.shard_batch`). The donated input state must not be used afterwards.
    """

    def __init__(self, train_step, abstract_state: TrainState, batch_spec: Any, mesh: Mesh, *,
                 donate: bool = True):
        self.mesh = mesh
        self.batch_spec = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype), batch_spec)
        self.state_shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
        self.batch_shardings = mesh_lib.batch_shardings(self.batch_spec, mesh)
        rep = mesh_lib.replicated(mesh)

        def step_fn(state, batch):
            return train_step(state, batch, step_rng(state))

        abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
            self.state_shardings)
        abstract_batch = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.batch_spec,
            self.batch_shardings)
        _, metrics_shape = jax.eval_shape(step_fn, abstract_state, abstract_batch)
        metric_shardings = {k: (self.state_shardings.params if k == "grads" else
                                jax.tree_util.tree_map(lambda _: rep, v))
                            for k, v in metrics_shape.items()}
        t0 = time.perf_counter()
        lowered = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_shardings),
                          out_shardings=(self.state_shardings, metric_shardings),
                          donate_argnums=(0,) if donate else ()).lower(abstract_state,
                                                                       abstract_batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        self.lower_seconds = t1 - t0
        self.compile_seconds = time.perf_counter() - t0

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        validate_batch(batch, self.batch_spec)
        batch = dist.shard_batch(batch, self.mesh)
        return self.compiled(state, batch)


def compile_train_step(train_step, abstract_state: TrainState, batch_spec: Any, mesh: Mesh, *,
                       donate: bool = True) -> CompiledTrainStep:
    """AOT-compiles `train_step` for `abstract_state` (ShapeDtypeStructs with `.sharding`, e.g.
    `init_train_state(...).abstract`) and `batch_spec` (global batch ShapeDtypeStructs, e.g.
    `batch_spec_of(first_batch)`). Raises a clear ValueError if the batch does not divide over
    the mesh's ('data', 'fsdp') axes. `state.model_state` keeps the shardings of
    `abstract_state` (replicated unless boxed with logical names at init); batch statistics a
    stateful loss computes inside the step are over the GLOBAL batch (SPMD)."""
    return CompiledTrainStep(train_step, abstract_state, batch_spec, mesh, donate=donate)
