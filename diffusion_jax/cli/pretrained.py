"""`config.model.init_from`: a network initialised from published weights.

    --config.model.init_from=diffusers:<folder>     a diffusers UNet2DModel folder (config.json +
                                                    diffusion_pytorch_model.safetensors / .bin, or
                                                    a pipeline folder holding unet/)

The folder fixes the network: `resolve_init_from` fills config.model's UNet fields from its
config.json (`weights.diffusers.unet2d_fields`); a field the config sets to another value than the
folder's (and than the schema default) is a ConfigError naming it. config.model.dropout stays the
config's (a training choice; inference ignores it). The process must be the discrete DDPM one the
network was trained on (time_scale = T, time_offset = 1: the network embeds n = T t - 1), and it and
the objective's prediction are checked against the scheduler_config.json stored with the model when
there is one.

Where the run has no checkpoint, the train state starts from the converted weights
(`initial_state`: params and every EMA copy; the optimiser's moments at zero), so training fine-tunes
them and sample / eval / probe / report use them directly; a checkpoint, once written, wins.
`pretrained_params` is the one place that calls a converter (one branch per kind of weights).
"""
from __future__ import annotations

import os

from diffusion_jax import config as cv
from diffusion_jax.cli.experiment import CLIError, has_checkpoints, say

__all__ = ["INIT_FROM_KINDS", "parse_init_from", "resolve_init_from", "pretrained_params",
           "initial_state", "has_weights"]

INIT_FROM_KINDS = ("diffusers",)
# diffusers scheduler_config.json -> config.process.kwargs of 'ddpm' / the objective's prediction.
_BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_NOT_FROM_FOLDER = ("dropout",)


def parse_init_from(spec: str) -> tuple[str, str]:
    """'diffusers:<folder>' -> ('diffusers', absolute folder)."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in INIT_FROM_KINDS or not path:
        raise cv.ConfigError(f"config.model.init_from={spec!r}: expected '<kind>:<path>' with kind "
                             f"in {INIT_FROM_KINDS}, e.g. 'diffusers:/models/ddpm-cifar10-32'")
    return kind, os.path.abspath(os.path.expanduser(path))


def has_weights(config, workdir: str) -> bool:
    """Whether sample / eval / probe have parameters: a checkpoint, or model.init_from."""
    return has_checkpoints(workdir) or bool(config.model.init_from)


def load_run(config, workdir: str, step=None, image_shape=None):
    """(Experiment, checkpoint step, state) of a run for the modes that read one: the checkpoint
    at `step` (None: the newest), else model.init_from's converted weights; CLIError when there
    are neither. image_shape None: the dataset's, from its metadata (no data is read)."""
    from diffusion_jax.cli.experiment import build_experiment, missing_checkpoint, restore_checkpoint
    if not has_weights(config, workdir):
        raise missing_checkpoint(workdir)
    if image_shape is None:
        from diffusion_jax.data import dataset_info
        image_shape = dataset_info(config.data.name, data_dir=config.data.data_dir,
                                   image_size=config.data.image_size).image_shape
    exp = build_experiment(config, tuple(image_shape))
    ckpt_step, state = restore_checkpoint(exp, workdir, step)
    return exp, ckpt_step, state


def _num_timesteps(config) -> int:
    from diffusion_jax.processes import DiscreteDDPM
    return int(config.process.kwargs.get("num_steps", None) or DiscreteDDPM.num_steps)


def _check_run(config, path: str) -> None:
    """The parts of the config outside config.model that must agree with a DDPM UNet2DModel."""
    from diffusion_jax.weights.diffusers.unet2d import scheduler_config
    spec = f"config.model.init_from={config.model.init_from!r}"
    if config.model.type != "unet":
        raise cv.ConfigError(f"{spec} is a UNet; config.model.type is {config.model.type!r}")
    from diffusion_jax.models import family_for
    family = family_for(config)
    if not family.image_denoiser:
        raise cv.ConfigError(f"{spec}: a diffusers UNet2DModel is a plain denoiser; the model "
                             f"family {family.name!r} (config.model.family, config.autoencoder.kind="
                             f"{config.autoencoder.kind!r}) cannot start from it")
    if config.objective.name == "hybrid":
        raise cv.ConfigError(f"{spec}: the network has no learned-variance outputs; "
                             f"config.objective.name='hybrid' needs them")
    if config.process.name != "ddpm":
        raise cv.ConfigError(f"{spec} was trained on integer DDPM timesteps 0..T-1: "
                             f"config.process.name must be 'ddpm', got {config.process.name!r}")
    sched = scheduler_config(path)
    if sched is None:
        return
    kw = cv.build_process(config)
    checks = [("num_train_timesteps", "process.kwargs.num_steps", kw.num_steps),
              ("beta_start", "process.kwargs.beta_start", kw.beta_start),
              ("beta_end", "process.kwargs.beta_end", kw.beta_end)]
    for key, field, have in checks:
        if key in sched and sched[key] is not None and abs(float(sched[key]) - float(have)) > 1e-12:
            raise cv.ConfigError(f"config.{field}={have!r} disagrees with the model's scheduler "
                                 f"config ({key}={sched[key]!r}) in {path}")
    bs = sched.get("beta_schedule")
    if bs is not None and _BETA_SCHEDULES.get(bs) != kw.beta_schedule:
        raise cv.ConfigError(f"config.process.kwargs.beta_schedule={kw.beta_schedule!r} disagrees "
                             f"with the model's scheduler config (beta_schedule={bs!r}) in {path}")
    pred = sched.get("prediction_type", "epsilon")
    want = cv.objective_prediction(config.objective)
    if _PREDICTIONS.get(pred) != want:
        raise cv.ConfigError(f"config.objective.name={config.objective.name!r} reads the network "
                             f"as a {want!r} prediction; the model's scheduler config says "
                             f"prediction_type={pred!r} ({path})")


def resolve_init_from(config, workdir: str | None = None):
    """Fills (in place) config.model's fields from model.init_from's folder and checks the rest of
    the config against it (see the module docstring); re-validates and returns the config. No-op
    without init_from. A folder that has gone missing is tolerated when the workdir has
    checkpoints (their saved config holds the fields)."""
    spec = config.model.init_from
    if not spec:
        return config
    kind, path = parse_init_from(spec)
    from diffusion_jax.weights.diffusers import WeightsError
    from diffusion_jax.weights.diffusers.unet2d import read_unet2d_config, unet2d_fields
    if not os.path.isdir(path):
        if workdir and has_checkpoints(workdir):
            say(f"note: model.init_from folder {path} is gone; using the checkpoints in {workdir}")
            return config
        raise cv.ConfigError(f"config.model.init_from: folder {path!r} does not exist")
    _check_run(config, path)
    try:
        fields = unet2d_fields(read_unet2d_config(path), num_timesteps=_num_timesteps(config))
    except WeightsError as e:
        raise cv.ConfigError(f"config.model.init_from={spec!r}: {e}") from None
    m = config.model
    updates = {}
    for name, value in fields.items():
        if name in _NOT_FROM_FOLDER:
            continue
        have = m[name]
        default = cv.UNET_FIELDS[name].default
        norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
        if norm(have) == norm(value):
            continue
        if norm(have) != norm(default):
            raise cv.ConfigError(
                f"config.model.{name}={have!r} disagrees with the {kind} folder {path} "
                f"({name}={value!r} from its config.json); leave config.model.{name} unset")
        updates[name] = value
    if updates:
        was_locked = config.is_locked
        config.unlock()
        for name, value in updates.items():
            del m[name]                     # ConfigDict keeps a field's type; e.g. None -> int
            m[name] = value
        if was_locked:
            config.lock()
        cv.validate(config)
    return config


def pretrained_params(config, image_shape) -> dict:
    """The converted 'params' of model.init_from (host float32 arrays), for images `image_shape`
    (H, W, C), which must be the size the network was made for (its attention placement)."""
    kind, path = parse_init_from(config.model.init_from)
    from diffusion_jax.weights.diffusers import WeightsError, convert_unet2d
    from diffusion_jax.weights.diffusers.unet2d import read_unet2d_config
    try:
        raw = read_unet2d_config(path)
        size, c = raw.get("sample_size"), raw.get("in_channels", 3)
        size = size[0] if isinstance(size, (list, tuple)) else size
        h, w, ch = image_shape
        if (h, w, ch) != (size, size, c):
            raise CLIError(f"model.init_from {path} is a {size}x{size}x{c} network; the data "
                           f"(config.data.name={config.data.name!r}, image_size="
                           f"{config.data.image_size}) is {h}x{w}x{ch}")
        _, params = convert_unet2d(path, num_timesteps=_num_timesteps(config))
    except WeightsError as e:
        raise CLIError(f"model.init_from={config.model.init_from!r}: {e}") from None
    return params


def initial_state(exp, seed: int, *, params=None):
    """A fresh TrainState in `exp`'s sharded layout; with model.init_from (or `params`, host
    arrays of the network's structure, e.g. a teacher run's EMA weights) its params and every EMA
    copy are those weights (each its own device buffers)."""
    import jax
    import numpy as np
    from diffusion_jax import training as T
    state = T.init_train_state(exp.init_fn, exp.mesh, np.asarray(jax.random.PRNGKey(seed)),
                               exp.rules).state
    if params is None and not exp.config.model.init_from:
        return state
    what = "the given parameters" if params is not None else "model.init_from"
    host = params if params is not None else pretrained_params(exp.config, exp.image_shape)
    want = jax.tree_util.tree_structure(state.params)
    if jax.tree_util.tree_structure(host) != want:
        raise CLIError(f"{what}: the parameters do not have the network's "
                       f"structure ({jax.tree_util.tree_structure(host)} vs {want})")
    bad = [f"{jax.tree_util.keystr(p)}: {np.shape(a)} vs {l.shape}" for (p, a), l in
           zip(jax.tree_util.tree_flatten_with_path(host)[0], jax.tree_util.tree_leaves(state.params))
           if tuple(np.shape(a)) != tuple(l.shape)]
    if bad:
        raise CLIError(f"{what}: parameter shapes differ from the network's ({'; '.join(bad[:3])})")

    def place(tree):
        return jax.tree_util.tree_map(
            lambda a, like: jax.make_array_from_callback(
                like.shape, like.sharding, lambda idx, a=a: np.asarray(a, like.dtype)[idx]),
            host, tree)

    say(f"initialised the network from {exp.config.model.init_from or what}")
    return state.replace(params=place(state.params),
                         ema={k: place(v) for k, v in state.ema.items()})
