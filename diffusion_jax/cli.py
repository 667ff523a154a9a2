"""The command line: train, sample from and evaluate a diffusion model described by a config file.

    python -m diffusion_jax --config=configs/default.py --workdir=runs/digits            # train
    python -m diffusion_jax --config=configs/default.py --workdir=runs/digits \\
        --config.train.num_steps=6000 --config.optim.learning_rate=5e-4              # overrides
    python -m diffusion_jax --workdir=runs/digits --mode=sample                       # samples
    python -m diffusion_jax --workdir=runs/digits --mode=eval                         # test loss
    diffusion-jax ...                                          # the same, as a console script

`--config` is an ml-collections config file (`configs/*.py`, `path.py:variant` passes a variant
to `get_config`); every field can be overridden with `--config.<section>.<field>=<value>`
(tuples as strings: `--config.model.ch_mult='(1, 2)'`). The config is validated on load
(`diffusion_jax.config_validation`): a misspelled field is named with the closest valid name.
In sample / eval mode `--config` may be left out: the config saved with the checkpoint is used.

workdir layout:

    checkpoints/<step>/   Orbax checkpoints (state, EMA, optimiser, data position, config)
    metrics.jsonl         one JSON object per logged train step (loss, grad_norm, lr, ...)
    eval_metrics.jsonl    one JSON object per --mode=eval run
    tb/                   TensorBoard event files (train/*, eval/*)
    samples/              step_<N>.png grids written during training; samples_step<N>.png/.npz

Training resumes from the newest complete checkpoint in workdir (and says "resuming from step
N"); it is exact (state, data position and the per-step noise). SIGTERM saves and stops. A config
whose model / EMA / optimiser structure differs from the checkpoint's is refused before any
restore. Sample and eval only read the checkpoints (Orbax read-only), so they can run while a
training job writes to the same workdir.

The train loop is composed from `diffusion_jax.training`'s public pieces (mesh, sharded state
init, AOT-compiled train step, Checkpointer, PreemptionHandler) rather than `training.train`,
because it samples from the EMA parameters every `train.sample_every` steps, which needs the
state mid-run (`train`'s `on_metrics` callback receives only the metrics).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config_validation as cv

MODES = ("train", "sample", "eval")

__all__ = ["main", "run", "define_flags", "execute", "CLIError", "MODES"]


class CLIError(RuntimeError):
    """A user-facing error (no traceback on the command line): missing workdir / checkpoint."""


# ---------------------------------------------------------------------------------- flags
def define_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """Defines --config (+ its --config.* overrides), --workdir, --mode, --step, --progress.
    `argv`: the arguments the overrides are read from (config_flags' `sys_argv`; None: sys.argv)."""
    config_flags.DEFINE_config_file(
        "config", None, "experiment config file (configs/*.py, or path.py:variant); fields "
        "are overridden with --config.<section>.<field>=<value>", flag_values=flag_values,
        lock_config=False, sys_argv=None if argv is None else list(argv))
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples",
                        flag_values=flag_values)
    flags.DEFINE_enum("mode", "train", MODES, "train | sample | eval", flag_values=flag_values)
    flags.DEFINE_integer("step", None, "sample / eval: checkpoint step (default: the newest)",
                         flag_values=flag_values)
    flags.DEFINE_boolean("progress", True, "show a progress bar while training",
                         flag_values=flag_values)


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_paths(argv: Sequence[str]) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("--config.") or a.startswith("--noconfig."):
            name = a.split("=", 1)[0]
            out.append(name[len("--config."):] if name.startswith("--config.")
                       else name[len("--noconfig."):])
    return out


def precheck_argv(argv: Sequence[str]) -> None:
    """Loads the config file once before flag parsing so that a bad file or an unknown override
    field fails with a ConfigError naming it (config_flags would raise a bare AttributeError)."""
    spec = _config_arg(argv)
    paths = _override_paths(argv)
    if spec is None:
        if paths:
            raise cv.ConfigError(f"--config.{paths[0]} overrides a field, but no --config file "
                                 f"was given")
        return
    config = cv.load_file(spec)
    cv.check_override_paths(config, paths)


def _parse(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
    precheck_argv(argv)
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise cv.ConfigError(str(e)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise cv.ConfigError(f"bad --config override: {e}") from None


def main(argv: Sequence[str]) -> dict:
    """In-process entry point: `main(['prog', '--config=...', '--workdir=...', ...])`.

    Parses `argv` into a fresh flag set (so it can be called repeatedly), runs the mode and
    returns a summary dict; errors raise (ConfigError, CLIError, DatasetNotPreparedError, ...).
    """
    fv = flags.FlagValues()
    define_flags(fv, argv)
    rest = _parse(argv, fv)
    if len(rest) > 1:
        raise CLIError(f"unexpected arguments {rest[1:]}")
    return execute(fv.config, fv.workdir, fv.mode, step=fv.step, progress=fv.progress)


def _user_errors() -> tuple[type, ...]:
    from diffusion_jax.data import DatasetNotPreparedError, UnknownDatasetError
    from diffusion_jax.training import CheckpointRestoreError
    return (cv.ConfigError, CLIError, DatasetNotPreparedError, UnknownDatasetError,
            CheckpointRestoreError)


def _parse_global(argv):
    try:
        return _parse(argv, flags.FLAGS)
    except cv.ConfigError as e:
        sys.stderr.write(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(2)


def _app_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if "verbosity" in f and not f["verbosity"].present:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)   # Orbax is chatty at INFO
    try:
        execute(f.config, f.workdir, f.mode, step=f.step, progress=f.progress)
    except _user_errors() as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script / `python -m diffusion_jax` entry point (absl `app.run`): user errors are
    printed without a traceback and exit with status 1 (2 for flag errors). --help lists the
    flags; --verbosity=0 shows INFO logs (Orbax's included; default WARNING)."""
    if "config" not in flags.FLAGS:
        define_flags(flags.FLAGS, argv)
        main_module = (argv or sys.argv)[0]         # --help / --helpshort list the main module's
        for name in ("config", "workdir", "mode", "step", "progress"):
            flags.FLAGS.register_key_flag_for_module(main_module, flags.FLAGS[name])
    app.run(_app_main, argv=list(argv) if argv is not None else None,
            flags_parser=_parse_global)


# ----------------------------------------------------------------------------- execution
def execute(config, workdir: str | None, mode: str = "train", *, step: int | None = None,
            progress: bool = True) -> dict:
    """Runs `mode` for `config` (a ConfigDict, validated here; None in sample/eval mode: the
    checkpoint's config) in `workdir`."""
    if mode not in MODES:
        raise CLIError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")
    if not workdir:
        raise CLIError("--workdir is required")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if config is None:
        if mode == "train":
            raise CLIError("--config is required for training (e.g. --config=configs/default.py)")
        config = _saved_config(workdir)
    cv.validate(config)
    _maybe_initialize_distributed(config)
    if mode == "train":
        return _train(config, workdir, progress=progress)
    if mode == "sample":
        return _sample(config, workdir, step)
    return _eval(config, workdir, step)


def _maybe_initialize_distributed(config) -> None:
    from diffusion_jax import training as T
    d = config.distributed
    T.maybe_initialize(d.coordinator_address, d.num_processes, d.process_id)


def _ckpt_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def _has_checkpoints(workdir: str) -> bool:
    d = _ckpt_dir(workdir)
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _missing_checkpoint(workdir: str) -> CLIError:
    return CLIError(f"no checkpoint in workdir {workdir!r} (looked in {_ckpt_dir(workdir)}); "
                    f"train first: python -m diffusion_jax --config=<file> --workdir={workdir}")


def _saved_config(workdir: str):
    if not _has_checkpoints(workdir):
        raise _missing_checkpoint(workdir)
    reader = _ReadOnlyCheckpoints(_ckpt_dir(workdir))
    try:
        saved = reader.read_config()
    finally:
        reader.close()
    if saved is None:
        raise CLIError(f"the newest checkpoint in {_ckpt_dir(workdir)} holds no config; "
                       f"pass --config")
    return cv.from_dict(saved, validate_config=False)


def _say(msg: str) -> None:
    import jax
    if jax.process_index() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------- building parts
@dataclasses.dataclass
class _Experiment:
    config: Any
    module: Any
    apply_fn: Any
    process: Any
    prediction: str
    image_shape: tuple
    num_classes: int | None
    mesh: Any
    rules: Any
    tx: Any
    schedule: Any
    opt_cfg: Any
    init_fn: Any
    abstract: Any


def _network(config):
    import jax.numpy as jnp
    from diffusion_jax.networks import DiT, UNet
    m = config.model
    fields = {k: m[k] for k in cv.MODEL_FIELDS[m.type]}
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
    cls = UNet if m.type == "unet" else DiT
    return cls(**fields, dtype=dtype)


def _example_cond(num_classes):
    import jax.numpy as jnp
    return None if num_classes is None else {"label": jnp.zeros((1,), jnp.int32)}


def _build(config, image_shape) -> _Experiment:
    import jax.numpy as jnp
    from diffusion_jax import training as T
    from diffusion_jax.networks import make_apply_fn

    module = _network(config)
    apply_fn = make_apply_fn(module)
    process = cv.build_process(config)
    num_classes = config.model.num_classes
    h, w, c = image_shape
    cond0 = _example_cond(num_classes)

    def init_params_fn(key):
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        return module.init(key, x0, jnp.zeros((1,), jnp.float32), cond0)["params"]

    o = config.optim
    opt_cfg = T.OptimizerConfig(
        learning_rate=o.learning_rate, b1=o.betas[0], b2=o.betas[1], eps=o.eps,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, schedule=o.schedule,
        total_steps=(config.train.num_steps // o.grad_accum if o.schedule == "cosine" else None),
        end_lr_factor=o.end_lr_factor, grad_clip_norm=o.grad_clip or None,
        grad_accum_steps=o.grad_accum)
    tx, schedule = T.make_optimizer(opt_cfg)
    init_fn = T.make_init_fn(init_params_fn, tx, tuple(config.ema.decays))
    mesh = T.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    rules = (tuple(tuple(r) for r in config.mesh.logical_axis_rules)
             if config.mesh.logical_axis_rules else T.DEFAULT_LOGICAL_AXIS_RULES)
    abstract, _ = T.state_shardings(init_fn, mesh, rules)
    return _Experiment(config, module, apply_fn, process, cv.objective_prediction(config.objective),
                       tuple(image_shape), num_classes, mesh, rules, tx, schedule, opt_cfg,
                       init_fn, abstract)


def _source(config, split: str):
    from diffusion_jax.data import get_dataset
    return get_dataset(config.data.name, split, data_dir=config.data.data_dir,
                       image_size=config.data.image_size)


def _image_shape(source) -> tuple:
    import numpy as np
    return tuple(np.asarray(source[0]["image"]).shape)


class _Batches:
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
        if self.conditional:
            out["cond"] = {"label": b["label"]}
        return out

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def _loss_fn(exp: _Experiment, *, train: bool = True):
    import jax
    import jax.numpy as jnp
    loss_fn = cv.build_objective(exp.config, exp.process, exp.apply_fn, train=train)
    p = exp.config.objective.label_dropout
    if not train or not p or exp.num_classes is None:
        return loss_fn
    null = exp.num_classes

    def with_label_dropout(params, batch, rng):
        rng, k = jax.random.split(rng)
        label = batch["cond"]["label"]
        drop = jax.random.bernoulli(k, p, label.shape)
        cond = {**batch["cond"], "label": jnp.where(drop, null, label).astype(label.dtype)}
        return loss_fn(params, {**batch, "cond": cond}, rng)

    return with_label_dropout


def _eps_fn(exp: _Experiment):
    """eps_fn(x, t, cond) with the parameters inside cond ({'params', 'model_cond'}), so that one
    jitted sampler serves every parameter set (`sampling.sample` treats eps_fn as static)."""
    import jax.numpy as jnp
    from diffusion_jax.objectives import edm_precondition
    from diffusion_jax.processes import as_eps_fn

    cfg = exp.config
    if exp.prediction == "edm":
        denoiser = edm_precondition(exp.apply_fn,
                                    cfg.objective.kwargs.get("sigma_data", None) or 0.5)
        net = denoiser
    else:
        net = exp.apply_fn
    scale = float(cfg.sample.guidance_scale)
    null = exp.num_classes

    def eps_fn(x, t, cond):
        params, c = cond["params"], cond.get("model_cond")
        inner = as_eps_fn(lambda x_, t_, c_: net(params, x_, t_, c_), exp.prediction, exp.process)
        if scale == 1.0 or c is None:
            return inner(x, t, c)
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        label = c["label"]
        both = {**c, "label": jnp.concatenate([label, jnp.full_like(label, null)])}
        eps = inner(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        eps_c, eps_u = eps[:b], eps[b:]
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn


def _sampling_params(exp: _Experiment, state):
    from diffusion_jax.training import ema_key
    decays = tuple(exp.config.ema.decays)
    if exp.config.sample.use_ema and decays:
        return state.ema[ema_key(decays[0])]
    return state.params


def _generate(exp: _Experiment, eps_fn, params, n: int, seed: int):
    """n samples (float32 host array in [-1, 1] up to the model's error) and their labels."""
    import jax
    import numpy as np
    from diffusion_jax.sampling import sample
    from diffusion_jax.training import to_host

    s = exp.config.sample
    kwargs = {k: s.kwargs[k] for k in s.kwargs.keys() if s.kwargs[k] is not None}
    key = jax.random.PRNGKey(seed)
    xs, labels = [], []
    done = 0
    while done < n:
        b = min(int(s.batch_size), n - done)
        model_cond = None
        if exp.num_classes is not None:
            lab = (np.arange(done, done + b) % exp.num_classes).astype(np.int32)
            labels.append(lab)
            model_cond = {"label": jax.numpy.asarray(lab)}
        out = sample(s.sampler, eps_fn, exp.process, jax.random.fold_in(key, done),
                     (b, *exp.image_shape), num_steps=int(s.num_steps), spacing=s.spacing,
                     cond={"params": params, "model_cond": model_cond}, t_end=s.t_end,
                     denoise_final=bool(s.denoise_final), **kwargs)
        xs.append(np.asarray(to_host(out.x), np.float32))
        done += b
    return np.concatenate(xs), (np.concatenate(labels) if labels else None)


def _structure(d: dict) -> dict:
    """The parts of a (JSON) config that fix the train state's pytree and shapes."""
    optim, data, ema = d.get("optim", {}), d.get("data", {}), d.get("ema", {})
    return {"model": d.get("model", {}),
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
    a, b = _structure(saved), _structure(_json_config(config))
    from diffusion_jax.training.loop import config_diff
    diffs = config_diff(a, b)
    if diffs:
        raise CLIError(
            f"the checkpoint in {_ckpt_dir(workdir)} was written with a different model or "
            f"optimiser state than this config describes ({'; '.join(diffs)}). Use the run's "
            f"own config (sample / eval without --config use it), or another --workdir.")


class _ReadOnlyCheckpoints:
    """Reads `workdir/checkpoints` without ever writing to it.

    `training.Checkpointer` is a writer: its manager removes unfinished `*.orbax-checkpoint-tmp*`
    directories when it starts (and may move unreadable steps aside), which would break a training
    job saving into the same workdir while a user samples or evaluates from it. This reader uses
    Orbax's read-only manager on the same layout (`<step>/state`, `<step>/config`)."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = directory
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


def _restore(exp: _Experiment, workdir: str, step: int | None):
    """(step, TrainState) of `step` (default: the newest) in `exp`'s sharded layout, read-only."""
    from diffusion_jax.training import CheckpointRestoreError
    if not _has_checkpoints(workdir):
        raise _missing_checkpoint(workdir)
    reader = _ReadOnlyCheckpoints(_ckpt_dir(workdir))
    try:
        steps = reader.all_steps()
        if not steps:
            raise _missing_checkpoint(workdir)
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CLIError(f"no checkpoint for --step={step} in {_ckpt_dir(workdir)}; "
                           f"have {steps}")
        check_checkpoint_compatible(reader, exp.config, workdir, step)
        try:
            state = reader.restore_state(exp.abstract, step)
        except Exception as e:  # noqa: BLE001 - named with the directory and the step
            raise CheckpointRestoreError(
                f"checkpoint step {step} in {_ckpt_dir(workdir)} could not be read: "
                f"{type(e).__name__}: {e}") from e
    finally:
        reader.close()
    return step, state


def _mesh_batch(exp: _Experiment, requested: int, available: int) -> int:
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


# --------------------------------------------------------------------------------- train
class _Progress:
    """tqdm bar on a terminal; one plain line per logged step otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            desc="train")

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, record: dict):
        if not self.enabled:
            return
        loss, sps = record.get("loss", float("nan")), record.get("steps_per_sec", float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{sps:.2f}", refresh=False)
        else:
            print(f"step {step}/{self.total}  loss {loss:.5f}  {sps:.2f} steps/s", flush=True)

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _json_config(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def _train(config, workdir: str, *, progress: bool = True) -> dict:
    import jax
    from diffusion_jax.training.loop import config_diff, truncate_metrics
    import numpy as np
    from diffusion_jax import training as T
    from diffusion_jax.data import make_loader
    from diffusion_jax.reports import image_grid
    from diffusion_jax.reports.metrics_writer import MetricsWriter

    t_start = time.perf_counter()
    source = _source(config, "train")          # fails fast if the dataset is not prepared
    exp = _build(config, _image_shape(source))
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    loader = make_loader(source, batch_size=config.data.batch_size, seed=config.train.seed,
                         random_flip=config.data.random_flip)
    batches = _Batches(loader, exp.num_classes is not None)
    tc = config.train
    ckpt = T.Checkpointer(_ckpt_dir(workdir), max_to_keep=tc.keep)
    handler = T.PreemptionHandler().install()
    writer = None
    bar = None
    try:
        try:
            T.check_batch_divisible(config.data.batch_size, exp.mesh, "config.data.batch_size")
        except ValueError as e:
            raise CLIError(str(e)) from None
        check_checkpoint_compatible(ckpt, config, workdir)
        restored = ckpt.restore(exp.abstract, data_iterator=batches)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if restored is not None:
            state = restored.state
            _say(f"resuming from step {restored.step} "
                 f"(checkpoint {os.path.join(_ckpt_dir(workdir), str(restored.step))})")
            if restored.config is not None:
                changes = config_diff(restored.config, _json_config(config))
                if changes:
                    _say("config differs from the checkpoint's: " + "; ".join(changes))
            if primary:
                truncate_metrics(metrics_path, restored.step)
        else:
            _say(f"starting a new run in {workdir}")
            state = T.init_train_state(exp.init_fn, exp.mesh,
                                       np.asarray(jax.random.PRNGKey(tc.seed)), exp.rules).state
        step = int(jax.device_get(state.step))
        writer = MetricsWriter(workdir, jsonl="metrics.jsonl", primary=primary)
        if restored is not None:
            writer.restart(step)          # TensorBoard drops the old run's points after `step`
        result = {"mode": "train", "workdir": workdir, "start_step": step,
                  "restored_step": None if restored is None else restored.step, "samples": []}
        if step >= tc.num_steps:
            _say(f"already at step {step} >= train.num_steps={tc.num_steps}; nothing to train")
            result.update(step=step, preempted=False)
            return result

        first = next(batches)
        spec = T.batch_spec_of(first)
        train_step = T.make_train_step(_loss_fn(exp), exp.tx, exp.schedule,
                                       grad_accum_steps=exp.opt_cfg.grad_accum_steps,
                                       ema_warmup=bool(config.ema.warmup))
        compiled = T.compile_train_step(train_step, exp.abstract, spec, exp.mesh)
        _say(f"train step compiled in {compiled.compile_seconds:.1f}s; training steps "
             f"{step + 1}..{tc.num_steps} on {jax.device_count()} device(s), mesh "
             f"{dict(exp.mesh.shape)}")
        eps_fn = _eps_fn(exp) if tc.sample_every else None
        saved: list[int] = []
        bar = _Progress(tc.num_steps, step, progress and primary)
        config_json = _json_config(config)

        def save(at):
            if ckpt.save(at, state, data_iterator=batches, config=config_json):
                saved.append(at)

        preempted = False
        pending = first
        last_t, last_step = time.perf_counter(), step
        while step < tc.num_steps:
            batch, pending = (pending, None) if pending is not None else (next(batches), None)
            state, metrics = compiled(state, batch)
            step += 1
            bar.step()
            if step % tc.log_every == 0 or step == tc.num_steps:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                host["steps_per_sec"] = (step - last_step) / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                writer.write(step, host, prefix="train/")     # metrics.jsonl + tb/
                bar.log(step, host)
                if not math.isfinite(host["loss"]):
                    bar.write(f"warning: non-finite loss {host['loss']} at step {step}")
            if tc.sample_every and step % tc.sample_every == 0:
                t_sample = time.perf_counter()
                path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
                try:
                    x, _ = _generate(exp, eps_fn, _sampling_params(exp, state),
                                     int(config.sample.num_samples), int(config.sample.seed))
                except FloatingPointError as e:       # an early model may diverge: keep training
                    bar.write(f"step {step}: sampling failed ({e}); training goes on")
                else:
                    if primary:
                        image_grid(x, path)
                        bar.write(f"step {step}: wrote sample grid {path}")
                    result["samples"].append(path)
                last_t += time.perf_counter() - t_sample      # steps/s counts training only
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save(step)
            if handler.should_stop():
                if step not in saved:
                    save(step)
                preempted = True
                bar.write(f"stopping at step {step} on signal (checkpoint saved)")
                break
        if not preempted and step not in saved:
            save(step)
        ckpt.wait()
        bar.close()
        if primary and os.path.exists(metrics_path):
            from diffusion_jax.reports.plots import loss_curve
            result["loss_curve"] = loss_curve(metrics_path, os.path.join(workdir, "loss_curve.png"))
        _say(f"done: step {step}, checkpoints {saved}, {time.perf_counter() - t_start:.1f}s; "
             f"metrics in {metrics_path}")
        result.update(step=step, preempted=preempted, saved_steps=saved,
                      compile_seconds=compiled.compile_seconds, metrics=metrics_path)
        return result
    finally:
        if bar is not None:
            bar.close()
        handler.uninstall()
        ckpt.close()
        if writer is not None:
            writer.close()


# -------------------------------------------------------------------------------- sample
def _sample(config, workdir: str, step: int | None) -> dict:
    import jax
    import numpy as np
    from diffusion_jax.data import dataset_info
    from diffusion_jax.reports import image_grid

    if not _has_checkpoints(workdir):
        raise _missing_checkpoint(workdir)
    info = dataset_info(config.data.name, data_dir=config.data.data_dir,
                        image_size=config.data.image_size)
    exp = _build(config, tuple(info.image_shape))
    ckpt_step, state = _restore(exp, workdir, step)
    s = config.sample
    _say(f"sampling {s.num_samples} images with {s.sampler!r} ({s.num_steps} steps) from "
         f"checkpoint step {ckpt_step} ({'EMA' if s.use_ema and config.ema.decays else 'raw'}"
         f" parameters)")
    t0 = time.perf_counter()
    try:
        x, labels = _generate(exp, _eps_fn(exp), _sampling_params(exp, state),
                              int(s.num_samples), int(s.seed))
    except FloatingPointError as e:
        raise CLIError(f"sampling from checkpoint step {ckpt_step} failed: {e}") from None
    seconds = time.perf_counter() - t0
    out_dir = os.path.join(workdir, "samples")
    png = os.path.join(out_dir, f"samples_step{ckpt_step}.png")
    npz = os.path.join(out_dir, f"samples_step{ckpt_step}.npz")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        image_grid(x[:256], png)
        uint8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        arrays = {"x": x, "images": uint8, "step": np.int64(ckpt_step)}
        if labels is not None:
            arrays["labels"] = labels
        np.savez_compressed(npz, **arrays)
        _say(f"wrote {png} and {npz} ({seconds:.1f}s)")
    return {"mode": "sample", "step": ckpt_step, "png": png, "npz": npz,
            "num_samples": int(x.shape[0]), "seconds": seconds}


# ---------------------------------------------------------------------------------- eval
def _eval(config, workdir: str, step: int | None) -> dict:
    import jax
    import numpy as np
    from diffusion_jax import training as T
    from diffusion_jax.data import make_loader
    from diffusion_jax.reports.metrics_writer import MetricsWriter

    if not _has_checkpoints(workdir):
        raise _missing_checkpoint(workdir)
    e = config.eval
    source = _source(config, e.split)
    exp = _build(config, _image_shape(source))
    ckpt_step, state = _restore(exp, workdir, step)
    bs = _mesh_batch(exp, int(e.batch_size or config.data.batch_size), len(source))
    loader = make_loader(source, batch_size=bs, seed=0, shuffle=False, num_epochs=1)
    batches = _Batches(loader, exp.num_classes is not None)
    loss_fn = jax.jit(_loss_fn(exp, train=False))
    key = jax.random.PRNGKey(config.train.seed + 1)
    param_sets = {"loss": state.params}
    if config.ema.decays:
        param_sets["loss_ema"] = state.ema[T.ema_key(config.ema.decays[0])]
    totals = {k: 0.0 for k in param_sets}
    n_batches = n_examples = 0
    t0 = time.perf_counter()
    bpd_images = []
    for i, batch in enumerate(batches):
        if e.num_batches and i >= e.num_batches:
            break
        gbatch = T.shard_batch(batch, exp.mesh)
        k = jax.random.fold_in(key, i)
        for name, params in param_sets.items():
            loss, _ = loss_fn(params, gbatch, k)
            totals[name] += float(loss)
        n_batches += 1
        n_examples += bs
        if e.bpd and sum(len(b["x"]) for b in bpd_images) < e.bpd_num_examples:
            bpd_images.append(jax.tree_util.tree_map(np.asarray, batch))
    if not n_batches:
        raise CLIError(f"no evaluation batch: split {e.split!r} is too small for batch {bs}")
    record = {k: v / n_batches for k, v in totals.items()}
    record["num_examples"] = n_examples
    if e.bpd:
        sel = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:e.bpd_num_examples],
                                     *bpd_images)
        record.update(_bits_per_dim(exp, state, sel))
    record["seconds"] = time.perf_counter() - t0
    writer = MetricsWriter(workdir, jsonl="eval_metrics.jsonl", primary=jax.process_index() == 0)
    writer.write(ckpt_step, record, prefix="eval/", extra={"split": e.split})
    writer.close()
    _say(f"eval on {e.split!r} ({n_examples} examples, checkpoint step {ckpt_step}): " +
         ", ".join(f"{k} {v:.5g}" for k, v in record.items() if k != "num_examples"))
    return {"mode": "eval", "step": ckpt_step, **record}


def _bits_per_dim(exp: _Experiment, state, batch) -> dict:
    """Bits/dim of the (dequantised) test images under the PF-ODE density of the sampling
    parameters (`diffusion_jax.likelihood.image_bpd`, score_sde's estimate)."""
    import jax
    import numpy as np
    try:
        from diffusion_jax.likelihood import image_bpd
    except ImportError:                                   # pragma: no cover
        _say("eval.bpd: diffusion_jax.likelihood is not available; skipped")
        return {}
    cfg = exp.config
    eps_fn = _eps_fn(exp)

    @jax.jit
    def run(params, batch, key):
        cond = {"params": params, "model_cond": batch.get("cond")}
        return image_bpd(lambda x, t, c: eps_fn(x, t, cond), exp.process, batch["x"], key,
                         num_repeats=int(cfg.eval.bpd_repeats)).bpd

    bpd = np.asarray(run(_sampling_params(exp, state), batch,
                         jax.random.PRNGKey(cfg.train.seed + 2)))
    return {"bpd": float(np.mean(bpd)), "bpd_num_examples": int(bpd.shape[0])}
