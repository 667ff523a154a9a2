"""`train(...)`: mesh -> (restore | sharded init) -> AOT step -> loop with logging, checkpoints and
SIGTERM handling. Small on purpose; a CLI/config layer calls it.

    result = train(TrainConfig(num_steps=10_000, optimizer={'learning_rate': 2e-4}),
                   loss_fn, init_params_fn, data_iterator, workdir)

* `loss_fn(params, batch, rng) -> (loss, aux)`: any objective.
* `init_params_fn(key) -> params`: boxed (logical names) or plain; e.g.
  `lambda k: module.init(k, x0, t0)['params']`.
* `init_model_state_fn(key) -> model_state` (keyword, optional): the initial state of a stateful
  loss `loss_fn(params, batch, rng, model_state)` (see `state.make_init_fn`); it is checkpointed
  and restored with the rest of the state.
* `data_iterator`: yields this process' share of each global batch (a dict of arrays) and has
  `get_state()` / `set_state()` (a `diffusion_jax.data.make_loader` iterator).
* `workdir`: checkpoints in `workdir/checkpoints/<step>/`, metrics in `workdir/metrics.jsonl` (one
  JSON object per logged step, written by process 0; on resume, records after the restored step
  are dropped so the file reads as one run).

Resumption is exact: the state (incl. optimiser, EMA, rng), the data position and the step are
restored, and step k's noise is `fold_in(rng, k)`, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from diffusion_jax.training import distributed as dist
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training.checkpoint import Checkpointer, PreemptionHandler
from diffusion_jax.training.state import (OptimizerConfig, TrainState, init_train_state,
                                          make_init_fn, make_optimizer, state_shardings)
from diffusion_jax.training.train_step import (batch_spec_of, compile_train_step,
                                               make_train_step, validate_batch)

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train", "read_metrics"]


@dataclasses.dataclass
class TrainConfig:
    """Training-layer options (JSON-able; saved with every checkpoint)."""
    num_steps: int = 1000
    seed: int = 0
    mesh_shape: Sequence[int] = (-1, 1, 1)            # ('data', 'fsdp', 'tensor'), one -1 allowed
    optimizer: Any = dataclasses.field(default_factory=OptimizerConfig)   # or a dict of its fields
    ema_decays: Sequence[float] = (0.9999,)
    ema_warmup: bool = False
    log_every: int = 100
    checkpoint_every: int = 1000                      # 0: only at the end / on SIGTERM
    max_to_keep: int | None = 3
    keep_best: int | None = None                      # also keep the n best by best_metric
    best_metric: str = "loss"
    best_mode: str = "min"
    async_checkpointing: bool = True
    data_state: str = "shared"                        # 'shared' | 'per_process' (see checkpoint.py)
    preemption_check_every: int = 1                   # steps between (collective) SIGTERM checks
    logical_axis_rules: Sequence | None = None        # None: DEFAULT_LOGICAL_AXIS_RULES

    @classmethod
    def from_any(cls, config: "TrainConfig | Mapping[str, Any]") -> "TrainConfig":
        if isinstance(config, cls):
            return config
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig options {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def optimizer_config(self) -> OptimizerConfig:
        opt = self.optimizer
        if isinstance(opt, OptimizerConfig):
            return opt
        return OptimizerConfig.from_dict(opt.to_dict() if hasattr(opt, "to_dict") else opt)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizer"] = dataclasses.asdict(self.optimizer_config())
        d["mesh_shape"] = list(self.mesh_shape)
        d["ema_decays"] = list(self.ema_decays)
        if self.logical_axis_rules is not None:
            d["logical_axis_rules"] = [list(r) for r in self.logical_axis_rules]
        return d


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    history: list[dict]              # logged metrics of this call
    mesh: Mesh
    restored_step: int | None        # checkpoint step resumed from (None: fresh start)
    preempted: bool                  # stopped by SIGTERM (after saving)
    compile_seconds: float           # AOT compile of the train step
    init_seconds: float              # sharded init (or restore) wall time
    saved_steps: list[int]
    checkpointer: Checkpointer | None = None   # closed


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl`."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops the JSONL records after `last_step` (so a resumed run's metrics read as one run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def config_diff(saved: Mapping, current: Mapping, prefix="") -> list[str]:
    """'a.b: old -> new' for every leaf that differs between two nested config dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def train(config: TrainConfig | Mapping[str, Any], loss_fn: Callable, init_params_fn: Callable,
          data_iterator: Any, workdir: str | os.PathLike, num_steps: int | None = None, *,
          mesh: Mesh | None = None, batch_spec: Any = None,
          config_to_save: Mapping[str, Any] | None = None,
          on_metrics: Callable[[int, dict], None] | None = None,
          handle_sigterm: bool = True,
          init_model_state_fn: Callable[[jax.Array], Any] | None = None) -> TrainResult:
    """Trains until `num_steps` (default `config.num_steps`) total steps, resuming from
    `workdir/checkpoints` when it holds a checkpoint. Collective: every process calls it alike.

    mesh: default `make_mesh(config.mesh_shape)`. batch_spec: expected global batch
    (ShapeDtypeStructs); default: taken from the first batch (every later batch must match).
    config_to_save: JSON-able dict stored with each checkpoint (default `config.to_dict()`; pass
    the full experiment config). on_metrics(step, metrics): called with each logged record.
    Metrics are fetched to the host every `log_every` steps (and at checkpoints / the end).
    init_model_state_fn(key): initial `model_state` of a stateful loss (`make_init_fn`); with it,
    `loss_fn(params, batch, rng, model_state)` returns the new state in `aux['model_state']`.
    """
    cfg = TrainConfig.from_any(config)
    num_steps = int(cfg.num_steps if num_steps is None else num_steps)
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    mesh = mesh_lib.make_mesh(cfg.mesh_shape) if mesh is None else mesh
    rules = tuple(map(tuple, cfg.logical_axis_rules)) if cfg.logical_axis_rules else \
        mesh_lib.DEFAULT_LOGICAL_AXIS_RULES
    saved_config = dict(config_to_save) if config_to_save is not None else cfg.to_dict()

    opt_cfg = cfg.optimizer_config()
    tx, schedule = make_optimizer(opt_cfg)
    init_fn = make_init_fn(init_params_fn, tx, cfg.ema_decays,
                           init_model_state_fn=init_model_state_fn)
    abstract, _ = state_shardings(init_fn, mesh, rules)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                        keep_best=cfg.keep_best, best_metric=cfg.best_metric,
                        best_mode=cfg.best_mode, async_save=cfg.async_checkpointing,
                        data_state=cfg.data_state)

    handler = PreemptionHandler().install() if handle_sigterm else None
    try:
        return _run(cfg, num_steps, tx, schedule, opt_cfg, init_fn, abstract, rules, ckpt, mesh,
                    data_iterator, batch_spec, saved_config, metrics_path, loss_fn, on_metrics,
                    handler)
    finally:
        if handler is not None:
            handler.uninstall()
        ckpt.close()


def _run(cfg, num_steps, tx, schedule, opt_cfg, init_fn, abstract, rules, ckpt, mesh,
         data_iterator, batch_spec, saved_config, metrics_path, loss_fn, on_metrics, handler):
    t0 = time.perf_counter()
    restored = ckpt.restore(abstract, data_iterator=data_iterator)   # also sets the data position
    restored_step = None if restored is None else restored.step
    # Look at the first batch before spending time on init: shape / divisibility errors early.
    try:
        first = next(data_iterator)
    except StopIteration:
        raise ValueError("the data iterator is empty") from None
    spec = batch_spec if batch_spec is not None else batch_spec_of(first)
    validate_batch(first, spec)
    mesh_lib.batch_shardings(spec, mesh)          # ValueError if the mesh does not divide it
    if jax.process_count() > 1:
        dist.check_process_batch_layout(mesh, jax.tree_util.tree_leaves(spec)[0].shape[0])
    if restored is not None:
        state = restored.state
        if restored.config is not None:
            diff = [d for d in config_diff(restored.config, json.loads(json.dumps(saved_config)))
                    if not d.startswith("num_steps:")]
            if diff:
                log.warning("config differs from the checkpoint's: %s", "; ".join(diff))
        if dist.is_primary():
            truncate_metrics(metrics_path, restored_step)
        log.info("resumed from %s step %d", ckpt.directory, restored_step)
    else:
        state = init_train_state(init_fn, mesh, np.asarray(jax.random.PRNGKey(cfg.seed)),
                                 rules).state
    init_seconds = time.perf_counter() - t0
    step = int(jax.device_get(state.step))
    history: list[dict] = []
    saved_steps: list[int] = []
    if step >= num_steps:
        return TrainResult(state, step, history, mesh, restored_step, False, 0.0, init_seconds,
                           saved_steps, ckpt)
    train_step = make_train_step(loss_fn, tx, schedule, grad_accum_steps=opt_cfg.grad_accum_steps,
                                 ema_warmup=cfg.ema_warmup)
    compiled = compile_train_step(train_step, abstract, spec, mesh)
    log.info("train step compiled in %.2fs", compiled.compile_seconds)

    def save(at_step, metrics_host=None):
        if ckpt.save(at_step, state, data_iterator=data_iterator, config=saved_config,
                     metrics=metrics_host):
            saved_steps.append(at_step)

    preempted = False
    host = None
    pending = first
    last_log_time, last_log_step = time.perf_counter(), step
    while step < num_steps:
        if pending is not None:
            batch, pending = pending, None
        else:
            try:
                batch = next(data_iterator)
            except StopIteration:
                log.warning("data iterator exhausted at step %d", step)
                break
        state, metrics = compiled(state, batch)
        step += 1
        do_ckpt = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        do_log = (cfg.log_every and step % cfg.log_every == 0) or step == num_steps or (
            do_ckpt and cfg.keep_best)
        host = None
        if do_log:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            host["steps_per_sec"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
            last_log_time, last_log_step = now, step
            record = {"step": step, **host}
            history.append(record)
            if dist.is_primary():
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if on_metrics is not None:
                on_metrics(step, record)
        if do_ckpt:
            save(step, host)
        if handler is not None and step % max(cfg.preemption_check_every, 1) == 0 \
                and handler.should_stop():
            if not do_ckpt:
                save(step, host)
            preempted = True
            log.warning("stopping at step %d on signal (checkpoint saved)", step)
            break
    if not preempted and step not in saved_steps:
        save(step, host)
    ckpt.wait()
    return TrainResult(state, step, history, mesh, restored_step, preempted,
                       compiled.compile_seconds, init_seconds, saved_steps, ckpt)
