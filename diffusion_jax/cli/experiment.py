"""Shared pieces of the command-line modes: the experiment (the model family's assembled model,
`diffusion_jax.models`, plus optimiser, mesh and abstract state) from a config, data batches,
read-only checkpoint access."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from diffusion_jax import config as cv
from diffusion_jax.models import Model, autoencoder_choices, family_for, family_name, get_family  # noqa: F401
from diffusion_jax.models import sampling_params as _sampling_params
from diffusion_jax.models.pixel import example_cond  # noqa: F401  (re-exported)


class CLIError(RuntimeError):
    """A user-facing error (no traceback on the command line): missing workdir / checkpoint."""


def maybe_initialize_distributed(config) -> None:
    from diffusion_jax import training as T
    d = config.distributed
    T.maybe_initialize(d.coordinator_address, d.num_processes, d.process_id)


def ckpt_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def has_checkpoints(workdir: str) -> bool:
    d = ckpt_dir(workdir)
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def missing_checkpoint(workdir: str) -> CLIError:
    return CLIError(f"no checkpoint in workdir {workdir!r} (looked in {ckpt_dir(workdir)}); "
                    f"train first: python -m diffusion_jax --config=<file> --workdir={workdir}")


def saved_config(workdir: str):
    if not has_checkpoints(workdir):
        raise missing_checkpoint(workdir)
    reader = ReadOnlyCheckpoints(ckpt_dir(workdir))
    try:
        saved = reader.read_config()
    finally:
        reader.close()
    if saved is None:
        raise CLIError(f"the newest checkpoint in {ckpt_dir(workdir)} holds no config; "
                       f"pass --config")
    return cv.from_dict(saved, validate_config=False)


def say(msg: str) -> None:
    import jax
    if jax.process_index() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------- building parts
# The model itself (network, objective, eps function, generation, what a checkpoint holds) is
# assembled by its family (`diffusion_jax.models`); this module adds the optimiser, the mesh and
# the abstract train state. The functions below keep their names for the modes and benches.


@dataclasses.dataclass(kw_only=True)
class Experiment(Model):
    """A `models.Model` (module, apply_fn, process, loss_fn, family, ...) plus what training and
    the modes need: the optimiser (tx, schedule, opt_cfg), the mesh and its logical-axis rules,
    the train state's init_fn and its abstract (sharded) shape. No parameters: those come from
    the state. `exp.family` answers everything that depends on the kind of model."""
    mesh: Any
    rules: Any
    tx: Any
    schedule: Any
    opt_cfg: Any
    init_fn: Any
    abstract: Any


def build_network(config, image_shape=None):
    """The Flax module of the config's model family (`models.family_for(config).build_network`)."""
    return family_for(config).build_network(image_shape)


def _objective(config, process, apply_fn, module, *, train: bool = True):
    """(loss_fn, stateful, init_model_state(variables) -> model_state or None) of the family."""
    return family_for(config).objective(process, apply_fn, module, train=train)


def build_experiment(config, image_shape, *, repa_target=None) -> Experiment:
    """The model of `config` for images of `image_shape` with its optimiser, mesh and abstract
    state; repa_target: REPA's frozen encoder x0 -> features for training (cli.alignment)."""
    import flax.linen as nn
    from diffusion_jax import training as T

    family = family_for(config)
    if repa_target is not None:
        family.repa_target = repa_target
    model = family.build(image_shape)

    def init_model_state_fn(key):
        return model.init_model_state(nn.unbox(model.init_variables(key)))

    o = config.optim
    opt_cfg = T.OptimizerConfig(
        learning_rate=o.learning_rate, b1=o.betas[0], b2=o.betas[1], eps=o.eps,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, schedule=o.schedule,
        total_steps=(config.train.num_steps // o.grad_accum if o.schedule == "cosine" else None),
        end_lr_factor=o.end_lr_factor, grad_clip_norm=o.grad_clip or None,
        grad_accum_steps=o.grad_accum)
    groups = family.optimizer_groups(opt_cfg)
    tx, schedule = T.make_group_optimizer(groups) if groups else T.make_optimizer(opt_cfg)
    init_fn = T.make_init_fn(model.init_params, tx, tuple(config.ema.decays),
                             init_model_state_fn=init_model_state_fn if model.stateful else None)
    mesh = T.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    rules = (tuple(tuple(r) for r in config.mesh.logical_axis_rules)
             if config.mesh.logical_axis_rules else T.DEFAULT_LOGICAL_AXIS_RULES)
    abstract, _ = T.state_shardings(init_fn, mesh, rules)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(Model)}
    return Experiment(**fields, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
                      opt_cfg=opt_cfg, init_fn=init_fn, abstract=abstract)


def open_split(config, split: str):
    from diffusion_jax.data import get_dataset
    return get_dataset(config.data.name, split, data_dir=config.data.data_dir,
                       image_size=config.data.image_size)


def image_shape_of(source) -> tuple:
    import numpy as np
    return tuple(np.asarray(source[0]["image"]).shape)


class Batches:
    """The data loader's batches as the objectives want them ({'x', 'cond': {'label'}}), with the
    loader's get_state / set_state (checkpointed by the Checkpointer)."""

    def __init__(self, loader, conditional: bool):
        self._it = loader
        self.conditional = conditional

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self._it)
        out = {"x": b["x"]}
        if "noise" in b:                  # --mode=reflow: each image's paired noise
            out["noise"] = b["noise"]
        if self.conditional:
            out["cond"] = {"label": b["label"]}
        return out

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def make_loss_fn(exp: Experiment, *, train: bool = True):
    """The objective: `loss_fn(params, batch, rng[, model_state])` (4 arguments iff
    `exp.stateful`), with label dropout for classifier-free guidance when configured."""
    return exp.family.make_loss_fn(exp, train=train)


def make_eps_fn(exp: Experiment, *, pair: bool | None = None):
    """The family's denoiser: eps_fn(x, t, cond) with cond = {'params', 'model_cond'}
    (`models.ModelFamily.make_eps_fn`)."""
    return exp.family.make_eps_fn(exp, pair=pair)


def sampling_params(exp: Experiment, state):
    return _sampling_params(exp, state)


def generate(exp: Experiment, eps_fn, params, n: int, seed: int, *, z=None,
             num_steps: int | None = None, sampler: str | None = None):
    """n samples (float32 host array in [-1, 1] up to the model's error) and their labels
    (`models.ModelFamily.generate`). z (n, D): latents, one per sample (families whose denoiser
    takes them). num_steps / sampler: override config.sample's."""
    return exp.family.generate(exp, eps_fn, params, n, seed, z=z, num_steps=num_steps,
                               sampler=sampler)


def state_structure(d: dict) -> dict:
    """The parts of a (JSON) config that fix the train state's pytree and shapes: config.model,
    the family and its own parts (`ModelFamily.state_structure`), EMA and optimiser."""
    optim, data, ema = d.get("optim", {}), d.get("data", {}), d.get("ema", {})
    name = family_name(d)
    return {"model": {k: v for k, v in (d.get("model", {}) or {}).items()
                      if k not in ("init_from", "family")},
            "family": name, **get_family(name).state_structure(d),
            "objective learned variance": (d.get("objective", {}) or {}).get("name") == "hybrid",
            "data.name": data.get("name"), "data.image_size": data.get("image_size"),
            "ema.decays": [float(x) for x in ema.get("decays") or ()],
            "optim.grad_clip (on)": bool(optim.get("grad_clip")),
            "optim.grad_accum": optim.get("grad_accum")}


def check_checkpoint_compatible(ckpt, config, workdir: str, step: int | None = None) -> None:
    """CLIError, before any restore is attempted, if the checkpoint's saved config describes a
    different model / EMA / optimiser structure than `config` (a restore would fail, and the
    Checkpointer's fallback would then set the unreadable-looking checkpoints aside)."""
    try:
        saved = ckpt.read_config(step)
    except Exception:  # noqa: BLE001 - an unreadable config: leave it to restore()
        return
    if not saved:
        return
    # fields added to the schema after the checkpoint was written take their defaults (which keep
    # the behaviour the checkpoint was trained with)
    full = json_config(cv.from_dict(saved, validate_config=False))
    saved = dict(saved)
    for section in ("model", "autoencoder"):
        if isinstance(saved.get(section), dict) and isinstance(full.get(section), dict):
            saved[section] = {**full[section], **saved[section]}
    a, b = state_structure(saved), state_structure(json_config(config))
    from diffusion_jax.training.loop import config_diff
    diffs = config_diff(a, b)
    if diffs:
        raise CLIError(
            f"the checkpoint in {ckpt_dir(workdir)} was written with a different model or "
            f"optimiser state than this config describes ({'; '.join(diffs)}). Use the run's "
            f"own config (sample / eval without --config use it), or another --workdir.")


class ReadOnlyCheckpoints:
    """Reads `workdir/checkpoints` without ever writing to it.

    `training.Checkpointer` is a writer: its manager removes unfinished `*.orbax-checkpoint-tmp*`
    directories when it starts (and may move unreadable steps aside), which would break a training
    job saving into the same workdir while a user samples or evaluates from it. This reader uses
    Orbax's read-only manager on the same layout (`<step>/state`, `<step>/config`). A relative
    directory is taken from the current directory (Orbax itself wants absolute paths)."""

    def __init__(self, directory: str | os.PathLike):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, cleanup_tmp_directories=False))

    def latest_step(self):
        return self._manager.latest_step()

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def read_config(self, step=None):
        step = self.latest_step() if step is None else step
        if step is None or not os.path.isdir(os.path.join(self.directory, str(step), "config")):
            return None
        ocp = self._ocp
        return self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def restore_state(self, abstract, step):
        ocp = self._ocp
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]

    def close(self):
        self._manager.close()


def restore_checkpoint(exp: Experiment, workdir: str, step: int | None):
    """(step, TrainState) of `step` (default: the newest) in `exp`'s sharded layout, read-only."""
    from diffusion_jax.training import CheckpointRestoreError
    if not has_checkpoints(workdir):
        if exp.config.model.init_from and step is None:    # no checkpoint yet: published weights
            from diffusion_jax.cli.pretrained import initial_state
            return 0, initial_state(exp, int(exp.config.train.seed))
        raise missing_checkpoint(workdir)
    reader = ReadOnlyCheckpoints(ckpt_dir(workdir))
    try:
        steps = reader.all_steps()
        if not steps:
            raise missing_checkpoint(workdir)
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CLIError(f"no checkpoint for --step={step} in {ckpt_dir(workdir)}; "
                           f"have {steps}")
        check_checkpoint_compatible(reader, exp.config, workdir, step)
        try:
            state = reader.restore_state(exp.abstract, step)
        except Exception as e:  # noqa: BLE001 - named with the directory and the step
            raise CheckpointRestoreError(
                f"checkpoint step {step} in {ckpt_dir(workdir)} could not be read: "
                f"{type(e).__name__}: {e}") from e
    finally:
        reader.close()
    return step, state


def mesh_batch(exp: Experiment, requested: int, available: int) -> int:
    """The eval batch: at most `requested` and the split's size, divisible over the mesh."""
    import jax
    from diffusion_jax.training import batch_divisor
    div = math.lcm(batch_divisor(exp.mesh), jax.process_count())
    b = min(requested, available)
    b -= b % div
    if b <= 0:
        raise CLIError(f"the {exp.config.eval.split!r} split has {available} examples, fewer than "
                       f"the {div} the mesh needs per batch")
    return b




def json_config(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


