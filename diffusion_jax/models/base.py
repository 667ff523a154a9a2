"""The model-family interface, the assembled `Model` and the registry.

A family turns a config into what every mode uses; callers go through these methods and the
capabilities (`has_encoder`, `image_denoiser`), never through the family's name:

    build_network(image_shape)                    the Flax module
    apply_fn(module), init_variables(...)         the library's network signature; {'params', ...}
    objective(process, apply_fn, module, train)   (loss_fn, stateful, init_model_state)
    make_eps_fn(model)                            the denoiser eps_fn(x, t, {'params', 'model_cond'})
    generate(model, eps_fn, params, n, seed)      samples (the family owns its prior)
    state_structure(saved_config_dict)            what its checkpoint holds beyond config.model
    encode, invert, decode, reconstruct, interpolate, generation_latents   (has_encoder)

The defaults below are a denoiser on images (class labels, guidance, learned variance); a family
overrides what differs. See `diffusion_jax.models` for how to add one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from diffusion_jax import config as cv

__all__ = ["Model", "ModelFamily", "register_family", "get_family", "registered_families",
           "family_name", "family_for", "sampling_params"]


# --------------------------------------------------------------------------- the built model
@dataclasses.dataclass(kw_only=True)
class Model:
    """An assembled model (no parameters: those live in the train state).

    module: the Flax network; apply_fn(params, x, t, cond): the library's network signature (an
    autoencoder's: its decoder, cond={'z': z}); loss_fn(params, batch, rng[, model_state]) (4
    arguments iff `stateful`); init_variables(key) -> Flax variables; init_model_state(variables) ->
    TrainState.model_state (None: no state); cache: per-model memo of compiled helpers."""
    config: Any
    family: "ModelFamily"
    module: Any
    apply_fn: Any
    process: Any
    prediction: str
    image_shape: tuple
    num_classes: int | None
    loss_fn: Any = None
    stateful: bool = False
    init_variables: Any = None
    init_model_state: Any = None
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def has_encoder(self) -> bool:
        return self.family.has_encoder

    @property
    def is_autoencoder(self) -> bool:          # the name older code and benches use
        return self.family.has_encoder

    @property
    def learned_variance(self) -> bool:
        return self.config.objective.name == "hybrid"

    def init_params(self, key):
        return self.init_variables(key)["params"]


def sampling_params(model: Model, state):
    """The parameters generation uses: the first EMA copy when sample.use_ema, else the raw ones."""
    from diffusion_jax.training import ema_key
    decays = tuple(model.config.ema.decays)
    if model.config.sample.use_ema and decays:
        return state.ema[ema_key(decays[0])]
    return state.params


def _no_encoder(family, what: str):
    return NotImplementedError(f"model family {family.name!r} has no encoder ({what}); "
                               f"check `family.has_encoder` first")


# ---------------------------------------------------------------------------- the interface
class ModelFamily:
    """One kind of model, built from a config (`family_for(config)`); see the module docstring.

    Capabilities: has_encoder (encode / reconstruct / interpolate / manipulate modes, latents in
    the report and the probe); image_denoiser (the network denoises the images alone, with no
    latents: model.init_from's published UNets fit it, SDEdit's guided sampling applies);
    scalar_eps (`make_eps_fn` gives an eps of a scalar alpha / sigma process: the bits/dim eval
    through the PF-ODE and the readout sweep use it; False for a phase-space family such as CLD,
    which generates through `generate` alone, so config.eval.bpd and config.report.probe are
    refused); has_first_stage (an autoencoder first stage (LDM, LSGM, DiVAE):
    `first_stage_reconstructions` in the report); grad_norm_groups (top-level parameter groups whose gradient norms the train step
    logs)."""
    name: ClassVar[str] = ""
    has_encoder: ClassVar[bool] = False
    has_first_stage: ClassVar[bool] = False
    image_denoiser: ClassVar[bool] = False
    scalar_eps: ClassVar[bool] = True
    grad_norm_groups: ClassVar[tuple] = ()

    def __init__(self, config):
        self.config = config
        self.check_config()
        self.check_capabilities()

    def check_config(self) -> None:
        """ConfigError naming the field when the config does not describe this family."""

    def check_capabilities(self) -> None:
        """ConfigError naming the field when the config asks for what the family cannot do."""
        if self.scalar_eps:
            return
        why = (f"the model family {self.name!r} has no scalar eps (a denoiser of a scalar alpha / "
               f"sigma process)")
        own_bound = getattr(type(self), "image_bits_per_dim", None) is not None
        if _get(_get(self.config, "eval"), "bpd", False) and not own_bound:
            raise cv.ConfigError(f"config.eval.bpd: {why}, which the PF-ODE bits/dim needs; set "
                                 f"config.eval.bpd=False")
        report = _get(self.config, "report")
        if _get(report, "enabled", False) and _get(report, "probe", False):
            raise cv.ConfigError(f"config.report.probe: {why}, which the readout sweep noises images "
                                 f"with; set config.report.probe=False")

    def title(self) -> str:
        return self.name

    def nfe_per_sample(self) -> float:
        """Network evaluations per generated sample: config.sample's steps times its sampler's
        evaluations per step, plus one for the final denoising step when it is on."""
        from diffusion_jax.sampling import get_sampler
        s = self.config.sample
        return float(int(s.num_steps) * get_sampler(s.sampler).nfe_per_step
                     + int(bool(s.denoise_final)))

    def optimizer_groups(self, base):
        """{top-level parameter group: training.OptimizerConfig} to give each group its own
        optimiser (groups not named are frozen; a `training.PhasedLoss` objective needs this), or
        None: one optimiser, `base` (from config.optim), for every parameter."""
        return None

    def sampler_description(self) -> str:
        """How `generate` samples, for captions: config.sample's sampler and steps."""
        s = self.config.sample
        return f"{s.sampler}, {s.num_steps} steps"

    # ---------------------------------------------------------------------- assembly
    def build_network(self, image_shape=None):
        raise NotImplementedError

    def apply_fn(self, module) -> Callable:
        from diffusion_jax.networks import make_apply_fn
        return make_apply_fn(module)

    def init_variables(self, module, key, image_shape):
        raise NotImplementedError

    def objective(self, process, apply_fn, module, *, train: bool = True):
        """(loss_fn, stateful, init_model_state(variables) -> model_state or None)."""
        raise NotImplementedError

    def build(self, image_shape, *, cls=Model, **extra) -> Model:
        """The assembled model for images of `image_shape` (H, W, C); `cls` / `extra`: a subclass of
        Model and its additional fields (the command line's Experiment)."""
        config = self.config
        module = self.build_network(image_shape)
        process = cv.build_process(config)
        apply_fn = self.apply_fn(module)
        loss_fn, stateful, init_state = self.objective(process, apply_fn, module)
        return cls(config=config, family=self, module=module, apply_fn=apply_fn, process=process,
                   prediction=cv.objective_prediction(config.objective),
                   image_shape=tuple(image_shape), num_classes=config.model.num_classes,
                   loss_fn=loss_fn, stateful=stateful,
                   init_variables=lambda key: self.init_variables(module, key, image_shape),
                   init_model_state=init_state, **extra)

    def make_loss_fn(self, model: Model, *, train: bool = True):
        """`loss_fn(params, batch, rng[, model_state])`, with label dropout for classifier-free
        guidance when configured (train only); train=False: the objective in evaluation mode."""
        import jax
        import jax.numpy as jnp
        loss_fn = (model.loss_fn if train else
                   self.objective(model.process, model.apply_fn, model.module, train=False)[0])
        p = self.config.objective.label_dropout
        if not train or not p or model.num_classes is None:
            return loss_fn
        null = model.num_classes

        def with_label_dropout(params, batch, rng, *state):
            rng, k = jax.random.split(rng)
            label = batch["cond"]["label"]
            drop = jax.random.bernoulli(k, p, label.shape)
            cond = {**batch["cond"], "label": jnp.where(drop, null, label).astype(label.dtype)}
            return loss_fn(params, {**batch, "cond": cond}, rng, *state)

        return with_label_dropout

    # ---------------------------------------------------------------------- sampling
    def make_eps_fn(self, model: Model, *, pair: bool | None = None):
        """eps_fn(x, t, cond) with the parameters inside cond ({'params', 'model_cond'}), so that one
        jitted sampler serves every parameter set (`sampling.sample` treats eps_fn as static).

        model_cond: {'label'} for class-conditional models, {'z'} for an autoencoder's decoder. A
        learned-variance network (2C outputs) gives its first C channels, or the pair (eps, v) when
        `pair` (default: iff config.sample.kwargs.variance == 'learned_range'). Classifier-free
        guidance: eps_u + s (eps_c - eps_u), the null class being num_classes."""
        import jax.numpy as jnp
        from diffusion_jax.objectives import edm_precondition
        from diffusion_jax.processes import as_eps_fn

        cfg = self.config
        net = (edm_precondition(model.apply_fn, cfg.objective.kwargs.get("sigma_data", None) or 0.5)
               if model.prediction == "edm" else model.apply_fn)
        scale = float(cfg.sample.guidance_scale)
        null = model.num_classes
        learned = model.learned_variance
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
            inner = as_eps_fn(first, model.prediction, model.process)
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

    def batch_cond(self, model: Model, lo: int, hi: int, z=None):
        """(model_cond, labels) of samples lo..hi-1: labels cycling over the classes for a
        class-conditional model; z[lo:hi] as {'z'} when latents are given."""
        import jax.numpy as jnp
        import numpy as np
        labels = model_cond = None
        if model.num_classes is not None:
            labels = (np.arange(lo, hi) % model.num_classes).astype(np.int32)
            model_cond = {"label": jnp.asarray(labels)}
        if z is not None:
            model_cond = {"z": jnp.asarray(np.asarray(z)[lo:hi], jnp.float32)}
        return model_cond, labels

    def generate(self, model: Model, eps_fn, params, n: int, seed: int, *, z=None,
                 num_steps: int | None = None, sampler: str | None = None):
        """n samples (float32 host array in [-1, 1] up to the model's error) and their labels
        (None when unconditional), in batches of config.sample.batch_size, drawn by the
        configured sampler from the process' prior. z (n, D): latents, one per sample, for
        families whose denoiser takes them. num_steps / sampler: override config.sample's."""
        import jax
        import numpy as np
        from diffusion_jax.sampling import sample
        from diffusion_jax.training import to_host

        s = self.config.sample
        kwargs = {k: s.kwargs[k] for k in s.kwargs.keys() if s.kwargs[k] is not None}
        key = jax.random.PRNGKey(seed)
        xs, labels = [], []
        done = 0
        while done < n:
            b = min(int(s.batch_size), n - done)
            model_cond, lab = self.batch_cond(model, done, done + b, z)
            if lab is not None:
                labels.append(lab)
            out = sample(sampler or s.sampler, eps_fn, model.process, jax.random.fold_in(key, done),
                         (b, *model.image_shape), num_steps=int(num_steps or s.num_steps),
                         spacing=s.spacing, cond={"params": params, "model_cond": model_cond},
                         t_end=s.t_end, denoise_final=bool(s.denoise_final), **kwargs)
            xs.append(np.asarray(to_host(out.x), np.float32))
            done += b
        return np.concatenate(xs), (np.concatenate(labels) if labels else None)

    # --------------------------------------------------------------- checkpoint, readouts
    @classmethod
    def state_structure(cls, d: dict) -> dict:
        """The parts of a (JSON) config, beyond config.model, that fix this family's train state."""
        return {}

    def readout_network(self, model: Model, params, z=None):
        """(module, params, cond) whose sown block outputs the readouts probe; z: the images'
        latents for a family with an encoder."""
        return model.module, params, None

    def eval_model_state(self, model: Model, state, params):
        """TrainState.model_state to evaluate the loss with under `params` (a stateful loss)."""
        return state.model_state

    def first_stage_reconstructions(self, model: Model, params, images):
        """(has_first_stage) decode(encode(images)) by the family's first stage (float32 host
        array shaped like `images`, in [-1, 1] up to the model's error); the report shows them."""
        raise NotImplementedError(f"model family {self.name!r} has no first stage")

    def first_stage_report(self, model: Model, params, images) -> dict | None:
        """(has_first_stage) more for the report's first-stage section, or None: {'label': what
        `first_stage_reconstructions` shows, 'reconstructions': {name: images from other decoders of
        the same latents}, 'numbers': {name: float}} (DiVAE: its deterministic decoder, code usage)."""
        return None

    # ------------------------------------------------------------------ encoder families
    @property
    def needs_train_latents(self) -> bool:
        """Whether `generation_latents` wants training latents (train_z) to draw from its prior."""
        return False

    def generation_latents(self, model: Model, state, n: int, seed: int, *, train_z=None,
                           latent_sampler=None, train_images=None):
        """(z, description) for unconditional generation; (None, None): generation needs none."""
        return None, None

    def fit_latent_sampler(self, model: Model, train_z, *, log=print):
        """A generative model of the latents trained on `train_z`, or None (none configured)."""
        return None

    def encode(self, model: Model, state, images, *, batch_size: int = 256):
        raise _no_encoder(self, "encode")

    def latent_outputs(self, model: Model, state, images) -> dict:
        raise _no_encoder(self, "latent_outputs")

    def decoder_eps_fn(self, model: Model):
        raise _no_encoder(self, "decoder_eps_fn")

    def invert(self, model: Model, state, images, z, *, steps: int, fixed_point_iters: int):
        raise _no_encoder(self, "invert")

    def decode(self, model: Model, state, z, *, x_T=None, key=None, steps: int):
        raise _no_encoder(self, "decode")

    def reconstruct(self, model: Model, state, images, z, *, steps: int, fixed_point_iters: int,
                    seed: int = 0) -> dict:
        raise _no_encoder(self, "reconstruct")

    def interpolate(self, model: Model, state, images_a, images_b, z_a, z_b, *, steps: int,
                    points: int, fixed_point_iters: int):
        raise _no_encoder(self, "interpolate")


# ------------------------------------------------------------------------------- registry
_FAMILIES: dict[str, type[ModelFamily]] = {}


def register_family(name: str):
    """Class decorator: registers a ModelFamily subclass under `name` (config.model.family)."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
            raise TypeError(f"register_family({name!r}): {cls!r} is not a ModelFamily subclass")
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"model family {name!r} is already registered "
                             f"({_FAMILIES[name].__module__}.{_FAMILIES[name].__name__})")
        cls.name = name
        _FAMILIES[name] = cls
        return cls
    return deco


def registered_families() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def get_family(name: str) -> type[ModelFamily]:
    """The family class registered as `name`; a ConfigError listing the registered ones else."""
    if name not in _FAMILIES:
        hint = cv.suggest(str(name), _FAMILIES)
        raise cv.ConfigError(f"unknown model family {name!r} (config.model.family); registered: "
                             f"{', '.join(registered_families())}"
                             + (f" (did you mean {hint!r}?)" if hint else ""))
    return _FAMILIES[name]


def _get(section, key, default=None):
    if section is None:
        return default
    try:
        v = section.get(key, default)
    except AttributeError:
        return default
    return default if v is None else v


def family_name(config) -> str:
    """config.model.family, or, when unset (every config and checkpoint written before the field),
    the phase-space process' own family ('cld' for process 'cld'), 'autoencoder' if
    config.autoencoder.kind is not 'none', else 'pixel'. Takes a ConfigDict or a JSON dict (a
    checkpoint's saved config)."""
    from diffusion_jax.processes import PHASE_SPACE_PROCESSES
    name = _get(_get(config, "model"), "family")
    if name:
        return str(name)
    process = _get(_get(config, "process"), "name")
    if process in PHASE_SPACE_PROCESSES:
        return str(process)
    return "autoencoder" if _get(_get(config, "autoencoder"), "kind", "none") != "none" else "pixel"


def family_for(config) -> ModelFamily:
    """The family instance of `config` (checks the config against it)."""
    return get_family(family_name(config))(config)
