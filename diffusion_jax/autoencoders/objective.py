"""The diffusion-autoencoder loss: encode x0, then any denoising objective conditioned on z.

    loss_fn = autoencoder_loss(module, process)                       # eps loss (DiffAE)
    loss_fn = autoencoder_loss(module, process, objectives.hybrid_loss, ...)   # DMZ: eps + L_vb
    model_state = init_model_state(module, variables, loss_fn)
    loss, aux = loss_fn(params, batch, rng, model_state)              # aux['model_state']: new state

With (z, kl) = encoder(x0) in training mode (latent noise and dropout from the loss rng, BatchNorm on
batch statistics with its running statistics updated),

    L = L_base(params; {'x': x0, 'cond': {'z': z}}) + kl_weight * mean_b kl_b

where L_base is `base_factory(process, decoder_apply_fn(module), **base_options)` and kl is the
latent's KL to its prior (N(0, I) for 'gaussian', Bernoulli(1/2)^d for 'binary', 0 for
'continuous'; DiffAE and DMZ use kl_weight = 0). The encoder is trained only through z (soft
Gumbel-softmax codes for 'binary', the reparameterisation for 'gaussian').

Stateful-loss protocol: the loss always accepts `loss_fn(params, batch, rng, model_state=None)`.
model_state = {'encoder': the 'batch_stats' collection or {}, 'objective': the base loss's state
or {}} (`init_model_state`); when it is given, aux['model_state'] holds the updated state with the
same structure (stop_gradient). Called with three arguments (model_state=None, as the train step
does when the state has no leaves) it returns no 'model_state', and raises if the encoder keeps
BatchNorm statistics (they would be lost). `loss_fn.stateful` is True iff the base loss is
stateful; the BatchNorm part of the state is known only from `init_model_state`.

aux: the base loss's aux (its 'loss' replaced by the total) and 'diffusion_loss', 'kl', 'z_abs_mean'
(mean |z|), 'z_std' (batch std of z, mean over dimensions); 'gaussian': 'posterior_std' (mean
exp(logvar / 2)); 'binary': 'bit_entropy' (entropy in bits of each bit's batch frequency, mean over
bits: 1 = balanced bits, 0 = a constant bit) and 'posterior_entropy' (mean entropy of q(b_i | x)).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.autoencoders.latents import bit_entropy, bit_frequencies
from diffusion_jax.autoencoders.model import (DiffusionAutoencoder, decoder_apply_fn, encode_fn,
                                              has_batch_stats)
from diffusion_jax.objectives.denoising import epsilon_loss, split_batch
from diffusion_jax.processes.base import Process


def _has_leaves(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def latent_statistics(lat, latent: str) -> dict:
    """Scalar diagnostics of a batch of LatentOutput (see the module docstring)."""
    z = lat.z
    stats = {"z_abs_mean": jnp.mean(jnp.abs(z)), "z_std": jnp.mean(jnp.std(z, axis=0))}
    if latent == "gaussian":
        stats["posterior_std"] = jnp.mean(jnp.exp(0.5 * lat.logvar))
    elif latent == "binary":
        stats["bit_entropy"] = jnp.mean(bit_entropy(bit_frequencies(z)))
        q1 = jax.nn.softmax(lat.logits, axis=-1)[..., 1]
        stats["posterior_entropy"] = jnp.mean(bit_entropy(q1))
    return stats


def autoencoder_loss(module: DiffusionAutoencoder, process: Process, base_factory: Callable = epsilon_loss, *,
                     kl_weight: float = 0.0, **base_options) -> Callable:
    """`loss_fn(params, batch, rng, model_state=None) -> (loss, aux)`: L_base given z = encoder(x0) plus
    kl_weight * KL (module docstring). `base_factory(process, apply_fn, **base_options)` is any
    objective factory (epsilon_loss, v_loss, hybrid_loss, ...); params = {'encoder', 'decoder'}."""
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    latent = getattr(module.encoder, "latent", "continuous")
    base = base_factory(process, decoder_apply_fn(module), **base_options)
    base_stateful = bool(getattr(base, "stateful", False))
    encode = encode_fn(module)

    def loss_fn(params, batch, rng, model_state: Optional[Any] = None):
        x0, cond = split_batch(batch)
        given = model_state is not None
        state = dict(model_state or {})
        enc_stats = state.get("encoder", {})
        obj_state = state.get("objective", {})
        if not _has_leaves(enc_stats) and has_batch_stats(module, x0.shape):
            raise ValueError("this autoencoder's encoder keeps BatchNorm statistics: pass model_state="
                             "init_model_state(module, variables, loss_fn) (TrainState.model_state)")
        k_enc, k_base = jax.random.split(rng)
        variables = {"params": params}
        if _has_leaves(enc_stats):
            variables["batch_stats"] = enc_stats
        lat, new_stats = encode(variables, x0, train=True, rng=k_enc)

        inner = {k: v for k, v in batch.items() if k in ("t", "t_index", "t_weight")}
        inner.update(x=x0, cond={**(cond or {}), "z": lat.z})
        if base_stateful:
            base_loss, aux = base(params, inner, k_base, obj_state if given else None)
        else:
            base_loss, aux = base(params, inner, k_base)
        aux = dict(aux)
        new_obj = aux.pop("model_state", obj_state)
        kl = jnp.mean(lat.kl)
        loss = base_loss + kl_weight * kl if kl_weight else base_loss
        aux.update(loss=loss, diffusion_loss=base_loss, kl=kl, **latent_statistics(lat, latent))
        if given:
            aux["model_state"] = jax.lax.stop_gradient(
                {**state, "encoder": new_stats if _has_leaves(enc_stats) else enc_stats, "objective": new_obj})
        return loss, aux

    loss_fn.stateful = base_stateful
    loss_fn.base_loss = base
    loss_fn.module = module
    return loss_fn


def init_model_state(module: DiffusionAutoencoder, variables, loss: Optional[Callable] = None) -> dict:
    """{'encoder': variables['batch_stats'] or {}, 'objective': the base loss's `init_state()` or {}}."""
    del module
    base = getattr(loss, "base_loss", loss)
    objective = base.init_state() if getattr(base, "stateful", False) and hasattr(base, "init_state") else {}
    return {"encoder": dict(variables).get("batch_stats", {}), "objective": objective}


__all__ = ["autoencoder_loss", "init_model_state", "latent_statistics"]
