"""The diffusion-autoencoder loss: encode x0, then any denoising objective conditioned on z.

    loss_fn = autoencoder_loss(module, process)                       # eps loss (DiffAE)
    loss_fn = autoencoder_loss(module, process, objectives.hybrid_loss, ...)   # DMZ: eps + L_vb
    model_state = init_model_state(module, variables, loss_fn)
    loss, aux = loss_fn(params, batch, rng, model_state)              # aux['model_state']: new state

With (z, kl) = encoder(x0) in training mode (latent noise and dropout from the loss rng, BatchNorm on
batch statistics with its running statistics updated),

    L = L_base(params; {'x': x0, 'cond': {'z': z}}) + kl_weight * mean_b kl_b + bit_usage_weight * U

    U = sum_i KL(Bernoulli(pbar_i) || Bernoulli(1/2)) = sum_i (log 2 - H(pbar_i)),
        pbar_i = mean_b q(b_i = 1 | x_b)           (binary latents; nats)

where L_base is `base_factory(process, decoder_apply_fn(module), **base_options)` and kl is the
latent's KL to its prior (N(0, I) for 'gaussian', Bernoulli(1/2)^d for 'binary', 0 for
'continuous'; DiffAE and DMZ use kl_weight = 0). The encoder is trained only through z (soft
Gumbel-softmax codes for 'binary', or hard straight-through ones with the encoder's
straight_through=True; the reparameterisation for 'gaussian').

U is a batch-level bit-usage term: it is zero when every bit is 1 for half of the batch, whatever
the per-example posteriors, so it keeps bits in use without making them uninformative. A
per-example KL to Bernoulli(1/2) (kl_weight on a binary latent) pushes every q(b_i | x) to 1/2,
i.e. towards codes that carry nothing; it is allowed but rarely what one wants.

train=False (evaluation losses): the encoder runs in evaluation mode (BatchNorm on its running
statistics, which are returned unchanged; the Gaussian mean; the deterministic hard binary code)
and train=False goes to the base loss too.

Stateful-loss protocol: the loss always accepts `loss_fn(params, batch, rng, model_state=None)`.
model_state = {'encoder': the 'batch_stats' collection or {}, 'objective': the base loss's state
or {}} (`init_model_state`); when it is given, aux['model_state'] holds the updated state with the
same structure (stop_gradient). Called with three arguments (model_state=None, as the train step
does when the state has no leaves) it returns no 'model_state', and raises if the encoder keeps
BatchNorm statistics (they would be lost). `loss_fn.stateful` is True iff the base loss is
stateful; the BatchNorm part of the state is known only from `init_model_state`.

aux: the base loss's aux (its 'loss' replaced by the total) and 'diffusion_loss', 'kl', 'z_abs_mean'
(mean |z|), 'z_std' (batch std of z, mean over dimensions); 'gaussian': 'posterior_std' (mean
exp(logvar / 2)); 'binary': 'bit_entropy' (entropy in bits of each bit's batch frequency in the
deterministic hard codes argmax q(b_i | x), mean over bits: 1 = balanced bits, 0 = a constant bit;
computed on hard codes so that a dead bit driven only by the Gumbel noise reads as 0), 'dead_bits'
(bits whose hard code is constant over the batch), 'bit_mi' (sum over bits of I(x; b_i) =
H(pbar_i) - mean_b H(q(b_i | x_b)), bits), 'posterior_entropy' (mean entropy of q(b_i | x)) and
'bit_usage' (U above).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import math

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
        hard = (lat.logits[..., 1] > lat.logits[..., 0]).astype(jnp.float32)     # argmax code (B, d)
        p_hard = jnp.mean(hard, axis=0)
        stats["bit_entropy"] = jnp.mean(bit_entropy(p_hard))
        stats["dead_bits"] = jnp.sum((p_hard == 0.0) | (p_hard == 1.0)).astype(jnp.float32)
        q1 = jax.nn.softmax(lat.logits, axis=-1)[..., 1]
        h_post = bit_entropy(q1)
        stats["posterior_entropy"] = jnp.mean(h_post)
        stats["bit_mi"] = jnp.sum(bit_entropy(jnp.mean(q1, axis=0)) - jnp.mean(h_post, axis=0))
        stats["bit_usage"] = bit_usage(lat.logits)
    return stats


def bit_usage(logits) -> jax.Array:
    """U = sum_i (log 2 - H(pbar_i)) nats, pbar_i = mean_b softmax(logits_b)_i1: the KL of each bit's
    batch-average posterior to Bernoulli(1/2), summed over bits (0 iff every bit is balanced)."""
    pbar = jnp.mean(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., 1], axis=0)
    return jnp.sum(math.log(2.0) - bit_entropy(pbar) * math.log(2.0))


def tau_at(step, tau_schedule) -> jax.Array:
    """Gumbel-softmax temperature tau0 (tau1 / tau0)^min(step / steps, 1) for tau_schedule = (tau0,
    tau1, steps): exponential annealing from tau0 to tau1 over `steps` train steps, then tau1."""
    tau0, tau1, steps = tau_schedule
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / float(steps), 1.0)
    return jnp.float32(tau0) * (float(tau1) / float(tau0)) ** frac


def autoencoder_loss(module: DiffusionAutoencoder, process: Process, base_factory: Callable = epsilon_loss, *,
                     kl_weight: float = 0.0, bit_usage_weight: float = 0.0, tau_schedule=None,
                     train: bool = True, **base_options) -> Callable:
    """`loss_fn(params, batch, rng, model_state=None) -> (loss, aux)`: L_base given z = encoder(x0) plus
    kl_weight * KL + bit_usage_weight * U (module docstring). `base_factory(process, apply_fn,
    **base_options)` is any objective factory (epsilon_loss, v_loss, hybrid_loss, ...); params =
    {'encoder', 'decoder'}. train=False: the evaluation loss (encoder in evaluation mode).
    tau_schedule=(tau0, tau1, steps): the binary latent's temperature annealed by `tau_at`; the train
    step counter then lives in model_state['step'] (`init_model_state`) and aux has 'tau'."""
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if bit_usage_weight < 0:
        raise ValueError(f"bit_usage_weight must be >= 0, got {bit_usage_weight}")
    latent = getattr(module.encoder, "latent", "continuous")
    if bit_usage_weight and latent != "binary":
        raise ValueError(f"bit_usage_weight applies to binary latents; this encoder's latent is {latent!r}")
    if tau_schedule is not None:
        tau_schedule = tuple(float(v) for v in tau_schedule)
        if latent != "binary" or len(tau_schedule) != 3 or min(tau_schedule) <= 0:
            raise ValueError(f"tau_schedule=(tau0, tau1, steps) with positive values needs a binary "
                             f"latent; got {tau_schedule} for a {latent!r} latent")
    base = base_factory(process, decoder_apply_fn(module), train=train, **base_options)
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
        step = state.get("step") if tau_schedule is not None else None
        if tau_schedule is not None and step is None and train:
            raise ValueError("a tau_schedule needs model_state=init_model_state(module, variables, loss_fn) "
                             "(it holds the step counter)")
        tau = tau_at(step, tau_schedule) if tau_schedule is not None and train else None
        lat, new_stats = encode(variables, x0, train=train, rng=k_enc, tau=tau)

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
        if bit_usage_weight:
            loss = loss + bit_usage_weight * bit_usage(lat.logits)
        aux.update(loss=loss, diffusion_loss=base_loss, kl=kl, **latent_statistics(lat, latent))
        if tau is not None:
            aux["tau"] = tau
        if given:
            new_state = {**state, "encoder": new_stats if _has_leaves(enc_stats) else enc_stats,
                         "objective": new_obj}
            if step is not None and train:
                new_state["step"] = step + 1
            aux["model_state"] = jax.lax.stop_gradient(new_state)
        return loss, aux

    loss_fn.stateful = base_stateful
    loss_fn.tau_schedule = tau_schedule
    loss_fn.base_loss = base
    loss_fn.module = module
    return loss_fn


def init_model_state(module: DiffusionAutoencoder, variables, loss: Optional[Callable] = None) -> dict:
    """{'encoder': variables['batch_stats'] or {}, 'objective': the base loss's `init_state()` or {}},
    plus 'step': 0 (int32) when the loss anneals the temperature (tau_schedule)."""
    del module
    base = getattr(loss, "base_loss", loss)
    objective = base.init_state() if getattr(base, "stateful", False) and hasattr(base, "init_state") else {}
    state = {"encoder": dict(variables).get("batch_stats", {}), "objective": objective}
    if getattr(loss, "tau_schedule", None) is not None:
        state["step"] = jnp.zeros((), jnp.int32)
    return state


__all__ = ["autoencoder_loss", "bit_usage", "init_model_state", "latent_statistics", "tau_at"]
