"""The 'pixel' family: a diffusion model on the images themselves (DDPM, score SDE, EDM, DiT ...).

The network is config.model (a UNet or a DiT, `config.MODEL_FIELDS`), class-conditional when
model.num_classes is set (classifier-free guidance through objective.label_dropout and
sample.guidance_scale); the 'hybrid' objective (learned variance, Nichol & Dhariwal) doubles the
UNet's output channels. The loss is `config.build_objective` (stateful ones, e.g. loss-aware time
sampling, keep their state in TrainState.model_state); generation integrates the process' reverse
time from its prior with config.sample's sampler (the defaults of `ModelFamily`).

REPA (config.repa, Yu et al. 2025): with repa.weight > 0 the UNet projects block repa.block to
repa.dim channels and the loss adds weight (1 - cos) with a frozen encoder's features
(`readouts.repa_loss`). The encoder is `family.repa_target` (a jittable x0 -> features), set by
whoever builds the model for training (the command line resolves config.repa.target); without it
(sampling, evaluation) the network keeps its projector and the loss is the plain objective.
"""
from __future__ import annotations

from diffusion_jax import config as cv
from diffusion_jax.models.base import ModelFamily, register_family

__all__ = ["PixelDiffusion", "network_fields", "example_cond"]


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def network_fields(config, image_shape=None) -> tuple[dict, object]:
    """(the UNet / DiT fields of config.model, dtype); a 'hybrid' objective (learned variance)
    sets out_channels = 2 C, which needs `image_shape` (H, W, C)."""
    import jax.numpy as jnp
    m = config.model
    fields = _tuples({k: m[k] for k in cv.MODEL_FIELDS[m.type]})
    dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
    if config.objective.name == "hybrid":
        if m.type != "unet":
            raise cv.ConfigError("the 'hybrid' objective (learned variance) needs a UNet "
                                 f"(config.model.type='unet'), got {m.type!r}")
        if image_shape is None:
            raise ValueError("build_network: a learned-variance network needs image_shape")
        fields["out_channels"] = 2 * int(image_shape[-1])
    return fields, dtype


def example_cond(num_classes):
    """The network's example conditioning for init: one label, or None when unconditional."""
    import jax.numpy as jnp
    return None if num_classes is None else {"label": jnp.zeros((1,), jnp.int32)}


@register_family("pixel")
class PixelDiffusion(ModelFamily):
    """A denoiser on images: eps / x0 / v / score / EDM prediction of config.model's network."""
    image_denoiser = True

    def check_config(self) -> None:
        kind = self.config.autoencoder.kind
        if kind != "none":
            raise cv.ConfigError(f"config.model.family='pixel' is a plain diffusion model; "
                                 f"config.autoencoder.kind must be 'none', got {kind!r}")
        r = self.config.get("repa", None)
        if r is not None and r.weight > 0:
            if self.config.model.type != "unet":
                raise cv.ConfigError(f"config.repa.weight={r.weight} aligns a UNet block; "
                                     f"config.model.type is {self.config.model.type!r}")
            if not r.dim and not r.target:
                raise cv.ConfigError("config.repa.weight > 0 needs config.repa.target "
                                     "('run:<workdir>' of a trained autoencoder) or config.repa.dim")

    repa_target = None     # a jittable x0 -> (B, D) or (B, h, w, D) features: REPA's frozen encoder

    def title(self) -> str:
        return "Diffusion model"

    def repa_fields(self) -> dict:
        """UNet fields of the REPA projector ({} when REPA is off)."""
        r = self.config.get("repa", None)
        if r is None or r.weight <= 0:
            return {}
        if not r.dim:
            raise cv.ConfigError("config.repa.dim is 0 and no target was resolved: set "
                                 "config.repa.dim or train with config.repa.target")
        block = r.block or ("down_1_0" if len(self.config.model.ch_mult) > 1 else "down_0_0")
        return {"repa_block": block, "repa_dim": int(r.dim), "repa_hidden": int(r.hidden)}

    def build_network(self, image_shape=None):
        from diffusion_jax.networks import DiT, UNet
        fields, dtype = network_fields(self.config, image_shape)
        cls = UNet if self.config.model.type == "unet" else DiT
        return cls(**fields, **self.repa_fields(), dtype=dtype)

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        return module.init(key, x0, jnp.zeros((1,), jnp.float32),
                           example_cond(self.config.model.num_classes))

    def objective(self, process, apply_fn, module, *, train: bool = True):
        loss = cv.build_objective(self.config, process, apply_fn, train=train)
        stateful = bool(getattr(loss, "stateful", False))
        if train and self.repa_target is not None and self.repa_fields():
            if stateful:
                raise cv.ConfigError(f"config.repa.weight > 0 with a stateful objective "
                                     f"({self.config.objective.name!r} with its time sampling) is "
                                     f"not supported: use a stateless one")
            from diffusion_jax.readouts import repa_loss
            config = self.config
            loss = repa_loss(process, module, self.repa_target, weight=float(config.repa.weight),
                             base_factory=lambda p, a: cv.build_objective(config, p, a, train=True))
        init = (lambda variables: loss.init_state()) if stateful else None
        return loss, stateful, init
