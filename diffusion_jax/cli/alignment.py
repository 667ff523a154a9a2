"""`config.repa.target`: REPA's frozen encoder for training (Yu et al. 2025).

    --config.repa.weight=0.5 --config.repa.target=run:<workdir of a trained DiffAE / DMZ>

The target run's encoder, with its sampling (EMA) parameters and BatchNorm statistics recomputed
for them, maps a batch of clean images x0 to z (B, D) in evaluation mode; the denoiser's block
`repa.block` is projected to D channels and aligned with z at every position. The run must have
been trained on images of the same shape. `resolve_repa_target` fills config.repa.dim (saved with
the config, so sampling and evaluation rebuild the same network without the target).
"""
from __future__ import annotations

import os

from diffusion_jax import config as cv
from diffusion_jax.cli.experiment import CLIError, has_checkpoints, saved_config

__all__ = ["resolve_repa_target"]


def resolve_repa_target(config, image_shape):
    """(x0 -> features, D) of config.repa.target, or None when REPA is off; sets config.repa.dim."""
    r = config.get("repa", None)
    if r is None or r.weight <= 0:
        return None
    kind, sep, path = str(r.target).partition(":")
    if kind != "run" or not sep or not path:
        raise cv.ConfigError(f"config.repa.target={r.target!r}: expected 'run:<workdir>', the "
                             f"workdir of a trained autoencoder run (DiffAE / DMZ)")
    path = os.path.abspath(os.path.expanduser(path))
    if not has_checkpoints(path):
        raise CLIError(f"config.repa.target: no checkpoint in {path} (train the encoder's run first)")
    import jax
    from diffusion_jax.autoencoders import encode_fn
    from diffusion_jax.cli.pretrained import load_run
    tcfg = saved_config(path)
    exp, step, state = load_run(tcfg, path)
    if not exp.has_encoder:
        raise cv.ConfigError(f"config.repa.target={r.target!r} is a {exp.family.name!r} run "
                             f"without an encoder; REPA needs an autoencoder run")
    if tuple(exp.image_shape) != tuple(image_shape):
        raise cv.ConfigError(f"config.repa.target's run was trained on images of shape "
                             f"{tuple(exp.image_shape)}, this model's are {tuple(image_shape)}")
    variables = jax.device_get(exp.family.encoder_variables(exp, state))
    encode = encode_fn(exp.module)

    def target(x0):
        z = encode(variables, x0)[0].z
        return z.reshape(z.shape[0], -1).astype("float32")

    dim = int(jax.eval_shape(target, jax.ShapeDtypeStruct((1,) + tuple(image_shape), "float32"))
              .shape[-1])
    if r.dim and r.dim != dim:
        raise cv.ConfigError(f"config.repa.dim={r.dim} but the target's features have {dim} "
                             f"values (set 0 to take them from the target)")
    r.dim = dim
    return target, dim
