"""Representation alignment (REPA; Yu et al. 2025, "Representation alignment for generation: training
diffusion transformers is easier than you think"): a denoising loss plus the negative cosine
similarity between a projection of one intermediate block of the denoiser, on the noisy input, and the
features of a frozen encoder on the clean image.

    loss_fn = repa_loss(process, unet, target_fn, base_factory=objectives.v_loss, weight=0.5)
    loss, aux = loss_fn(params, batch, rng)

    L = L_base + weight * (1 - mean_{b, n} cos(h_phi(f_n(x_t)), y_n(x0)))

f(x_t) is the output of the UNet block `repa_block` (B, h, w, C), h_phi its 3-layer MLP projector
(inside the UNet: `UNet(repa_block=..., repa_dim=D)`, sown as 'repa'), y = stop_gradient(target_fn(x0))
either per position (B, h', w', D) or global (B, D). When the grids differ, the finer of the two is
average-pooled to the coarser (h a multiple of h', or the reverse); a global target is compared with
every position. REPA's 'weight' is lambda (0.5 in the paper); the constant 1 makes the term >= 0.

The network runs once: the base loss is built around an apply_fn that also collects the
intermediates of that same forward pass (at trace time), so L_base is exactly `base_factory`'s loss.
aux adds 'repa_cos' (the mean cosine similarity) and 'diffusion_loss' (L_base). It lives with the
readouts (above the networks) because it reads a Flax module's intermediates.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.denoising import epsilon_loss, split_batch

__all__ = ["repa_loss", "repa_similarity"]


def _pool_to(a, h: int, w: int):
    """Average-pools (B, H, W, C) to (B, h, w, C); H, W multiples of h, w."""
    b, hh, ww, c = a.shape
    if hh % h or ww % w:
        raise ValueError(f"REPA cannot match a {hh}x{ww} feature grid with a {h}x{w} one: one must "
                         f"divide the other")
    return a.reshape(b, h, hh // h, w, ww // w, c).mean(axis=(2, 4))


def repa_similarity(proj, target) -> jax.Array:
    """mean_{b, n} cos(proj_n, target_n): proj (B, h, w, D); target (B, h', w', D) or (B, D)."""
    proj = jnp.asarray(proj, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if target.shape[-1] != proj.shape[-1] or target.shape[0] != proj.shape[0]:
        raise ValueError(f"REPA target features {tuple(target.shape)} do not match the projection "
                         f"{tuple(proj.shape)} (batch and last axis must agree: set repa_dim)")
    if target.ndim == 2:
        target = target[:, None, None, :]
    elif target.ndim == 4 and target.shape[1:3] != proj.shape[1:3]:
        if target.shape[1] < proj.shape[1]:
            proj = _pool_to(proj, target.shape[1], target.shape[2])
        else:
            target = _pool_to(target, proj.shape[1], proj.shape[2])
    elif target.ndim != 4:
        raise ValueError(f"REPA targets are (B, D) or (B, h, w, D), got {tuple(target.shape)}")
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    return jnp.mean(jnp.sum(unit(proj) * unit(target), axis=-1))


def repa_loss(process, module, target_fn: Callable, *, base_factory: Callable = epsilon_loss,
              weight: float = 0.5, **base_options) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, aux)` (module docstring). `module` is a UNet with
    repa_block and repa_dim set; target_fn(x0) -> features of the frozen encoder (any jittable
    function: a trained Flax encoder's apply with its variables closed over)."""
    if getattr(module, "repa_block", None) is None:
        raise ValueError("repa_loss needs a UNet with repa_block (the block to align) and repa_dim set")
    if weight < 0:
        raise ValueError(f"REPA weight must be >= 0, got {weight}")

    def loss_fn(params, batch, rng):
        x0, _ = split_batch(batch)
        seen = {}

        def apply_fn(p, x, t, cond=None, *, train=False, rng=None):
            rngs = {"dropout": rng} if rng is not None else {}
            out, inter = module.apply({"params": p}, x, t, cond, train=train, rngs=rngs,
                                      mutable=["intermediates"])
            seen["proj"] = inter["intermediates"]["repa"][0]
            return out

        base_loss, aux = base_factory(process, apply_fn, **base_options)(params, batch, rng)
        cos = repa_similarity(seen["proj"], jax.lax.stop_gradient(target_fn(x0)))
        loss = base_loss + weight * (1.0 - cos)
        return loss, {**aux, "loss": loss, "diffusion_loss": base_loss, "repa_cos": cos}

    return loss_fn
