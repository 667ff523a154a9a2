"""Reflow on a 2-D Gaussian mixture (Liu et al. 2023): straightness and one-step sample error of the
first rectified flow (the exact mixture velocity, or a small MLP trained by flow matching) and of the
2-rectified flow (the same MLP trained by `objectives.reflow_loss` on ODE pairs of the exact first flow).

    python -m diffusion_jax.demos.reflow_demo          # or bench/reflow.py for the table + JSON

Library pieces: `sampling.reflow.draw_pairs`, `straightness`, `one_step`, `objectives.reflow_loss`,
`objectives.flow_matching_loss`. The MLP here is pure jax (t through sin/cos features), trained with
optax Adam in one jitted `lax.scan`.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import objectives, processes
from diffusion_jax.reference import metrics, mixtures
from diffusion_jax.sampling.reflow import draw_pairs, one_step, straightness

NUM_FREQ = 8


def mlp_init(key, dim: int, hidden: int = 128, depth: int = 3):
    """Weights of an MLP [x, t-features] -> hidden (x depth, SiLU) -> dim (last layer zero)."""
    sizes = [dim + 1 + 2 * NUM_FREQ] + [hidden] * depth + [dim]
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        w = jax.random.normal(k, (m, n)) / math.sqrt(m)
        params.append({"w": w * (0.0 if i == len(sizes) - 2 else 1.0), "b": jnp.zeros((n,))})
    return params


def mlp_apply(params, x, t, cond=None, *, train: bool = False, rng=None):
    """The velocity u_theta(x, t) (library apply_fn signature)."""
    del cond, train, rng
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])[:, None]
    freqs = math.pi * jnp.arange(1, NUM_FREQ + 1, dtype=jnp.float32)
    h = jnp.concatenate([x, t, jnp.sin(freqs * t), jnp.cos(freqs * t)], axis=-1)
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def train(loss_fn, params, key, sample_batch, num_steps: int, learning_rate: float = 3e-3):
    """Adam (cosine decay to 0) on loss_fn(params, sample_batch(key), key') for num_steps, one jitted scan."""
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))

    @jax.jit
    def run(params, key):
        def step(carry, i):
            params, state = carry
            kb, kl = jax.random.split(jax.random.fold_in(key, i))
            loss, grads = jax.value_and_grad(lambda p: loss_fn(p, sample_batch(kb), kl)[0])(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(num_steps))
        return params, losses

    return run(params, key)


def evaluate(eps_fn, process, gm, z, truth, key, straight_steps: int) -> dict:
    """Straightness S (mean, per example summed over the 2 dims), and the one-step sample's error: sliced
    W2 to true data samples, its rms distance to the flow's own N-step endpoint, and the N-step sliced W2."""
    st = jax.jit(lambda z: straightness(eps_fn, process, z, num_steps=straight_steps))(z)
    x1 = jax.jit(lambda z: one_step(eps_fn, process, z))(z)
    fit = metrics.mixture_fit(gm, x1)
    return {"straightness": float(jnp.mean(st.value)),
            "one_step_sw2": float(metrics.sliced_wasserstein(x1, truth, key)),
            "one_step_to_own_ode": float(jnp.sqrt(jnp.mean(jnp.sum((x1 - st.x) ** 2, -1)))),
            "one_step_mean_error": float(fit["mean_error"]), "one_step_cov_error": float(fit["cov_error"]),
            "ode_sw2": float(metrics.sliced_wasserstein(st.x, truth, key))}


def run(*, num_pairs: int = 8192, num_eval: int = 4000, train_steps: int = 2000, batch_size: int = 512,
        hidden: int = 128, pair_steps: int = 32, straight_steps: int = 100, train_first: bool = True,
        seed: int = 0, gm=None) -> dict:
    """The experiment; returns {'rows': {flow name: evaluate(...)}, 'meta': ...}."""
    t0 = time.time()
    process = processes.Flow()
    gm = mixtures.ring_mixture(num_components=4, radius=2.0, std=0.25) if gm is None else gm
    key = jax.random.PRNGKey(seed)
    k_pairs, k_eval, k_true, k_sw, k_init, k_train, k_fm = jax.random.split(key, 7)
    exact = mixtures.eps_fn(gm, process)
    z_eval = process.prior_sample(k_eval, (num_eval, gm.dim))
    truth = mixtures.sample(gm, k_true, num_eval)[0]
    rows = {"1-RF exact velocity": evaluate(exact, process, gm, z_eval, truth, k_sw, straight_steps)}
    velocity_eps = lambda params: processes.as_eps_fn(  # noqa: E731
        lambda x, t, c: mlp_apply(params, x, t, c), "flow", process)
    init = mlp_init(k_init, gm.dim, hidden)
    if train_first:   # the first flow learned by flow matching, same network and budget
        fm = objectives.flow_matching_loss(process, mlp_apply)
        params, losses = train(fm, init, k_fm, lambda k: {"x": mixtures.sample(gm, k, batch_size)[0]}, train_steps)
        rows["1-RF MLP (flow matching)"] = evaluate(velocity_eps(params), process, gm, z_eval, truth, k_sw,
                                                    straight_steps) | {"final_loss": float(jnp.mean(losses[-50:]))}
    x_pairs, z_pairs = draw_pairs(exact, process, k_pairs, (num_pairs, gm.dim), sampler="dpmpp_2m",
                                  num_steps=pair_steps)

    def pair_batch(k):
        idx = jax.random.randint(k, (batch_size,), 0, num_pairs)
        return {"x": x_pairs[idx], "noise": z_pairs[idx]}

    params, losses = train(objectives.reflow_loss(process, mlp_apply), init, k_train, pair_batch, train_steps)
    rows["2-RF MLP (reflow on exact pairs)"] = evaluate(velocity_eps(params), process, gm, z_eval, truth, k_sw,
                                                        straight_steps) | {"final_loss": float(jnp.mean(losses[-50:]))}
    floor = float(metrics.sliced_wasserstein(mixtures.sample(gm, jax.random.fold_in(k_true, 1), num_eval)[0],
                                             truth, k_sw))
    meta = {"num_pairs": num_pairs, "num_eval": num_eval, "train_steps": train_steps, "batch_size": batch_size,
            "hidden": hidden, "pair_sampler": f"dpmpp_2m/{pair_steps} steps", "straightness_euler_steps":
            straight_steps, "sw2_floor": floor, "seconds": time.time() - t0, "seed": seed}
    return {"rows": rows, "meta": meta}


def print_table(result: dict) -> None:
    cols = ("straightness", "one_step_sw2", "one_step_to_own_ode", "one_step_cov_error", "ode_sw2")
    print(f"{'flow':<34}" + "".join(f"{c:>22}" for c in cols))
    for name, r in result["rows"].items():
        print(f"{name:<34}" + "".join(f"{r[c]:>22.4f}" for c in cols))
    print(f"(sliced W2 between two true sample sets: {result['meta']['sw2_floor']:.4f})")


if __name__ == "__main__":
    print_table(run())
