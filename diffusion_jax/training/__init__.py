"""Training layer: mesh + sharding, train state, AOT train step, Orbax checkpoints, multi-process.

    from diffusion_jax import training as T
    mesh = T.make_mesh((-1, 1, 1))                         # ('data', 'fsdp', 'tensor')
    tx, schedule = T.make_optimizer(T.OptimizerConfig(learning_rate=2e-4, warmup_steps=1000))
    init_fn = T.make_init_fn(lambda k: module.init(k, x0, t0)['params'], tx, ema_decays=(0.9999,))
    init = T.init_train_state(init_fn, mesh, jax.random.PRNGKey(0))     # born sharded
    step = T.compile_train_step(T.make_train_step(loss_fn, tx, schedule), init.abstract,
                                T.batch_spec_of(first_batch), mesh)    # AOT; step.compile_seconds
    state, metrics = step(init.state, batch)

or all of it: `T.train(T.TrainConfig(...), loss_fn, init_params_fn, data_iterator, workdir)`.

Stateful losses (BatchNorm statistics, loss histories) keep non-trainable state in
`TrainState.model_state` (default `{}`): give its initial value with
`make_init_fn(..., init_model_state_fn=lambda k: {'encoder': module.init(k, x)['batch_stats']})`
(or `train(..., init_model_state_fn=...)`); the step then calls
`loss_fn(params, batch, rng, model_state)`, which returns the new state in `aux['model_state']`.
It is checkpointed, replicated (unless boxed with logical names), and skipped by optimiser and EMA.

    where            what
    mesh.py          make_mesh, logical -> NamedShardings (divisibility fallback), batch sharding
    state.py         TrainState, OptimizerConfig/make_optimizer, EMA, sharded init
    phases.py        PhasedLoss (alternating updates of parameter groups), per-group optimisers
    train_step.py    make_train_step (pure), compile_train_step (sharded, donated, AOT), validation
    distributed.py   maybe_initialize (jax.distributed), shard_batch (per-process -> global), to_host
    checkpoint.py    Checkpointer (Orbax: state + data iterator + config, keep-N/best, fallback),
                     PreemptionHandler (SIGTERM -> save and stop)
    loop.py          TrainConfig, train(...)
"""
from diffusion_jax.training.checkpoint import (CheckpointRestoreError, Checkpointer,
                                               PreemptionHandler, Restored,
                                               abstract_with_shardings)
from diffusion_jax.training.distributed import (any_process, check_process_batch_layout,
                                                is_primary, maybe_initialize, process_batch_rows,
                                                replicate, shard_batch, sync, to_host)
from diffusion_jax.training.loop import TrainConfig, TrainResult, read_metrics, train
from diffusion_jax.training.mesh import (BATCH_AXES, DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES,
                                         batch_divisor, batch_sharding, batch_shardings,
                                         check_batch_divisible, describe_shardings, fit_spec,
                                         logical_shardings, logical_to_mesh_spec, make_mesh,
                                         replicated,
                                         resolve_mesh_shape)
from diffusion_jax.training.phases import (GroupOptimizer, Phase, PhasedLoss,
                                           make_group_optimizer)
from diffusion_jax.training.state import (InitResult, OptimizerConfig, TrainState,
                                          abstract_train_state, ema_decay_at, ema_key,
                                          init_train_state, make_init_fn, make_optimizer,
                                          has_leaves, make_schedule, state_shardings,
                                          update_ema)
from diffusion_jax.training.train_step import (CompiledTrainStep, batch_spec_of,
                                               compile_train_step, ema_decays_of,
                                               make_train_step, step_rng, validate_batch)

__all__ = [
    "CheckpointRestoreError", "Checkpointer", "PreemptionHandler", "Restored",
    "abstract_with_shardings", "any_process", "check_process_batch_layout", "is_primary",
    "maybe_initialize", "process_batch_rows", "replicate", "shard_batch", "sync", "to_host",
    "TrainConfig", "TrainResult", "read_metrics", "train", "BATCH_AXES",
    "DEFAULT_LOGICAL_AXIS_RULES", "MESH_AXES", "batch_divisor", "batch_sharding",
    "batch_shardings", "check_batch_divisible", "describe_shardings", "fit_spec",
    "logical_shardings", "logical_to_mesh_spec", "make_mesh", "replicated", "resolve_mesh_shape", "InitResult",
    "OptimizerConfig", "TrainState", "abstract_train_state", "ema_decay_at", "ema_key",
    "init_train_state", "has_leaves", "make_init_fn", "make_optimizer", "make_schedule",
    "state_shardings", "update_ema", "CompiledTrainStep", "batch_spec_of", "compile_train_step", "ema_decays_of",
    "make_train_step", "step_rng", "validate_batch", "GroupOptimizer", "Phase", "PhasedLoss",
    "make_group_optimizer",
]
