"""The 'pixel' family: a diffusion model on the images themselves (DDPM, score SDE, EDM, DiT ...).

The network is config.model (a UNet or a DiT, `config.MODEL_FIELDS`), class-conditional when
model.num_classes is set (classifier-free guidance through objective.label_dropout and
sample.guidance_scale); the 'hybrid' objective (learned variance, Nichol & Dhariwal) doubles the
UNet's output channels. The loss is `config.build_objective` (stateful ones, e.g. loss-aware time
sampling, keep their state in TrainState.model_state); generation integrates the process' reverse
time from its prior with config.sample's sampler (the defaults of `ModelFamily`).
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

    def title(self) -> str:
        return "Diffusion model"

    def build_network(self, image_shape=None):
        from diffusion_jax.networks import DiT, UNet
        fields, dtype = network_fields(self.config, image_shape)
        cls = UNet if self.config.model.type == "unet" else DiT
        return cls(**fields, dtype=dtype)

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        return module.init(key, x0, jnp.zeros((1,), jnp.float32),
                           example_cond(self.config.model.num_classes))

    def objective(self, process, apply_fn, module, *, train: bool = True):
        loss = cv.build_objective(self.config, process, apply_fn, train=train)
        stateful = bool(getattr(loss, "stateful", False))
        init = (lambda variables: loss.init_state()) if stateful else None
        return loss, stateful, init
