"""Shared pieces of the command-line modes: building the experiment (network, process, optimiser,
mesh, abstract state) from a config, data batches, the sampling denoiser, read-only checkpoint
access."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from diffusion_jax import config as cv


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
@dataclasses.dataclass
class Experiment:
    """Everything a mode needs, built from the config (no parameters: those come from the state).

    module: the network (a UNet / DiT, or a `DiffusionAutoencoder` when config.autoencoder.kind is
    'diffae' / 'dmz'); apply_fn: the library's network signature (for an autoencoder: its decoder,
    cond={'z': z}); loss_fn: the objective (a stateful 4-argument loss when stateful);
    init_model_state_fn: TrainState.model_state's initialiser (None: no state).
    """
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
    loss_fn: Any = None
    stateful: bool = False
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def is_autoencoder(self) -> bool:
        return self.config.autoencoder.kind != "none"

    @property
    def learned_variance(self) -> bool:
        return self.config.objective.name == "hybrid"


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def autoencoder_choices(config) -> dict:
    """The autoencoder's design with the kind's defaults filled in (DiffAE / DMZ papers)."""
    ae = config.autoencoder
    diffae = ae.kind == "diffae"
    m = config.model
    return {
        "encoder": ae.encoder or ("semantic" if diffae else "conv"),
        "latent": ae.latent or ("continuous" if diffae else "binary"),
        "z_dim": ae.z_dim or (512 if diffae else 16),
        "z_conditioning": tuple(ae.z_conditioning or (("adagn_scale",) if diffae
                                                      else ("cross_attn",))),
        "encoder_ch": ae.encoder_ch or (m.ch if diffae else 32),
        "encoder_ch_mult": tuple(ae.encoder_ch_mult or m.ch_mult),
        "encoder_num_res_blocks": ae.encoder_num_res_blocks or m.num_res_blocks,
        "encoder_attn_resolutions": tuple(ae.encoder_attn_resolutions
                                          if ae.encoder_attn_resolutions is not None
                                          else m.attn_resolutions),
    }


def build_network(config, image_shape=None):
    """The Flax module of `config.model` (+ `config.autoencoder`). A 'hybrid' objective (learned
    variance) doubles the output channels, which needs `image_shape`."""
    import jax.numpy as jnp
    from diffusion_jax.networks import DiT, UNet
    m = config.model
    fields = _tuples({k: m[k] for k in cv.MODEL_FIELDS[m.type]})
    dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
    if config.objective.name == "hybrid":
        if m.type != "unet":
            raise CLIError("the 'hybrid' objective (learned variance) needs a UNet")
        if image_shape is None:
            raise ValueError("build_network: a learned-variance network needs image_shape")
        fields["out_channels"] = 2 * int(image_shape[-1])
    if config.autoencoder.kind == "none":
        cls = UNet if m.type == "unet" else DiT
        return cls(**fields, dtype=dtype)
    from diffusion_jax.autoencoders import ENCODERS, DiffusionAutoencoder
    ch = autoencoder_choices(config)
    ae = config.autoencoder
    if ch["encoder"] == "semantic":
        enc_opts = dict(ch=ch["encoder_ch"], ch_mult=ch["encoder_ch_mult"],
                        num_res_blocks=ch["encoder_num_res_blocks"],
                        attn_resolutions=ch["encoder_attn_resolutions"], dropout=m.dropout, pool=ae.pool)
    else:
        enc_opts = dict(ch=ch["encoder_ch"], norm=ae.norm)
    encoder = ENCODERS[ch["encoder"]](latent=ch["latent"], z_dim=ch["z_dim"], tau=ae.tau,
                                      straight_through=ae.straight_through, dtype=dtype, **enc_opts)
    decoder = UNet(**fields, z_conditioning=ch["z_conditioning"], dtype=dtype)
    return DiffusionAutoencoder(encoder=encoder, decoder=decoder)


def example_cond(num_classes):
    import jax.numpy as jnp
    return None if num_classes is None else {"label": jnp.zeros((1,), jnp.int32)}


def _objective(config, process, apply_fn, module, *, train: bool = True):
    """(loss_fn, stateful, init_model_state(variables) -> model_state or None)."""
    if config.autoencoder.kind == "none":
        loss = cv.build_objective(config, process, apply_fn, train=train)
        stateful = bool(getattr(loss, "stateful", False))
        init = (lambda variables: loss.init_state()) if stateful else None
        return loss, stateful, init
    from diffusion_jax.autoencoders import autoencoder_loss, init_model_state
    spec = cv.OBJECTIVES[config.objective.name]
    if not spec.takes_process:
        raise CLIError(f"objective {config.objective.name!r} cannot train an autoencoder")
    kwargs = {k: v for k, v in cv.kwargs_dict(config.objective.kwargs).items()}
    loss = autoencoder_loss(module, process, spec.get_factory(),
                            kl_weight=config.autoencoder.kl_weight,
                            bit_usage_weight=config.autoencoder.bit_usage_weight,
                            tau_schedule=(None if config.autoencoder.tau_final is None else
                                          (config.autoencoder.tau, config.autoencoder.tau_final,
                                           config.autoencoder.tau_anneal_steps)),
                            train=train, **kwargs)
    return loss, True, (lambda variables: init_model_state(module, variables, loss))


def build_experiment(config, image_shape) -> Experiment:
    import jax.numpy as jnp
    from diffusion_jax import training as T
    from diffusion_jax.networks import make_apply_fn

    module = build_network(config, image_shape)
    process = cv.build_process(config)
    num_classes = config.model.num_classes
    h, w, c = image_shape
    cond0 = example_cond(num_classes)
    if config.autoencoder.kind != "none":
        from diffusion_jax.autoencoders import decoder_apply_fn
        apply_fn = decoder_apply_fn(module)

        def init_variables(key):
            x0 = jnp.zeros((1, h, w, c), jnp.float32)
            return module.init({"params": key}, x0, jnp.zeros((1,), jnp.float32), x0, train=False)
    else:
        apply_fn = make_apply_fn(module)

        def init_variables(key):
            x0 = jnp.zeros((1, h, w, c), jnp.float32)
            return module.init(key, x0, jnp.zeros((1,), jnp.float32), cond0)

    loss_fn, stateful, init_state = _objective(config, process, apply_fn, module)

    def init_params_fn(key):
        return init_variables(key)["params"]

    def init_model_state_fn(key):
        import flax.linen as nn
        return init_state(nn.unbox(init_variables(key)))

    o = config.optim
    opt_cfg = T.OptimizerConfig(
        learning_rate=o.learning_rate, b1=o.betas[0], b2=o.betas[1], eps=o.eps,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, schedule=o.schedule,
        total_steps=(config.train.num_steps // o.grad_accum if o.schedule == "cosine" else None),
        end_lr_factor=o.end_lr_factor, grad_clip_norm=o.grad_clip or None,
        grad_accum_steps=o.grad_accum)
    tx, schedule = T.make_optimizer(opt_cfg)
    init_fn = T.make_init_fn(init_params_fn, tx, tuple(config.ema.decays),
                             init_model_state_fn=init_model_state_fn if stateful else None)
    mesh = T.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    rules = (tuple(tuple(r) for r in config.mesh.logical_axis_rules)
             if config.mesh.logical_axis_rules else T.DEFAULT_LOGICAL_AXIS_RULES)
    abstract, _ = T.state_shardings(init_fn, mesh, rules)
    return Experiment(config, module, apply_fn, process, cv.objective_prediction(config.objective),
                      tuple(image_shape), num_classes, mesh, rules, tx, schedule, opt_cfg,
                      init_fn, abstract, loss_fn, stateful)


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
    import jax
    import jax.numpy as jnp
    if train:
        loss_fn = exp.loss_fn
    else:
        loss_fn = _objective(exp.config, exp.process, exp.apply_fn, exp.module, train=False)[0]
    p = exp.config.objective.label_dropout
    if not train or not p or exp.num_classes is None:
        return loss_fn
    null = exp.num_classes

    def with_label_dropout(params, batch, rng, *state):
        rng, k = jax.random.split(rng)
        label = batch["cond"]["label"]
        drop = jax.random.bernoulli(k, p, label.shape)
        cond = {**batch["cond"], "label": jnp.where(drop, null, label).astype(label.dtype)}
        return loss_fn(params, {**batch, "cond": cond}, rng, *state)

    return with_label_dropout


def make_eps_fn(exp: Experiment, *, pair: bool | None = None):
    """eps_fn(x, t, cond) with the parameters inside cond ({'params', 'model_cond'}), so that one
    jitted sampler serves every parameter set (`sampling.sample` treats eps_fn as static).

    model_cond: {'label'} for class-conditional models, {'z'} for an autoencoder's decoder. A
    learned-variance network (2C outputs) gives its first C channels, or the pair (eps, v) when
    `pair` (default: iff config.sample.kwargs.variance == 'learned_range')."""
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
    learned = exp.learned_variance
    if pair is None:
        pair = learned and cfg.sample.kwargs.get("variance", None) == "learned_range"

    def eps_fn(x, t, cond):
        params, c = cond["params"], cond.get("model_cond")
        if learned:
            def first(x_, t_, c_):
                return net(params, x_, t_, c_)[..., :x_.shape[-1]]
            if pair:
                out = net(params, x, t, c).astype(jnp.float32)
                return out[..., :x.shape[-1]], out[..., x.shape[-1]:]
        else:
            def first(x_, t_, c_):
                return net(params, x_, t_, c_)
        inner = as_eps_fn(first, exp.prediction, exp.process)
        if scale == 1.0 or c is None or "label" not in c:
            return inner(x, t, c)
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        label = c["label"]
        both = {**c, "label": jnp.concatenate([label, jnp.full_like(label, null)])}
        eps = inner(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        eps_c, eps_u = eps[:b], eps[b:]
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn


def sampling_params(exp: Experiment, state):
    from diffusion_jax.training import ema_key
    decays = tuple(exp.config.ema.decays)
    if exp.config.sample.use_ema and decays:
        return state.ema[ema_key(decays[0])]
    return state.params


def generate(exp: Experiment, eps_fn, params, n: int, seed: int, *, z=None,
             num_steps: int | None = None, sampler: str | None = None):
    """n samples (float32 host array in [-1, 1] up to the model's error) and their labels.

    z (n, D): an autoencoder's latents, one per sample (required for autoencoders).
    num_steps / sampler: override config.sample's."""
    import jax
    import numpy as np
    from diffusion_jax.sampling import sample
    from diffusion_jax.training import to_host

    s = exp.config.sample
    kwargs = {k: s.kwargs[k] for k in s.kwargs.keys() if s.kwargs[k] is not None}
    if exp.is_autoencoder and z is None:
        raise ValueError("generate: an autoencoder's decoder needs z (n, D)")
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
        if z is not None:
            model_cond = {"z": jax.numpy.asarray(np.asarray(z)[done:done + b], jax.numpy.float32)}
        out = sample(sampler or s.sampler, eps_fn, exp.process, jax.random.fold_in(key, done),
                     (b, *exp.image_shape), num_steps=int(num_steps or s.num_steps),
                     spacing=s.spacing, cond={"params": params, "model_cond": model_cond},
                     t_end=s.t_end, denoise_final=bool(s.denoise_final), **kwargs)
        xs.append(np.asarray(to_host(out.x), np.float32))
        done += b
    return np.concatenate(xs), (np.concatenate(labels) if labels else None)


def state_structure(d: dict) -> dict:
    """The parts of a (JSON) config that fix the train state's pytree and shapes."""
    optim, data, ema = d.get("optim", {}), d.get("data", {}), d.get("ema", {})
    ae = d.get("autoencoder", {}) or {}
    shaping = {"kind": "none", "encoder": None, "latent": None, "z_dim": None, "z_conditioning": None,
               "encoder_ch": None, "encoder_ch_mult": None, "encoder_num_res_blocks": None,
               "encoder_attn_resolutions": None, "norm": "batch", "pool": "mean", "tau_final": None}
    return {"model": {k: v for k, v in (d.get("model", {}) or {}).items() if k != "init_from"},
            "autoencoder": {k: ae.get(k, v) for k, v in shaping.items()} if ae.get("kind", "none") != "none"
            else "none",
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


