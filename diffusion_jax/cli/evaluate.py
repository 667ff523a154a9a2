"""`--mode=eval`: test loss (raw and EMA parameters) and optional bits/dim."""
from __future__ import annotations

import time

from diffusion_jax.cli.experiment import (
    CLIError, has_checkpoints, missing_checkpoint, say, Experiment, build_experiment,
    open_split, image_shape_of, Batches, make_loss_fn, make_eps_fn, sampling_params,
    restore_checkpoint, mesh_batch)
from diffusion_jax.cli.pretrained import has_weights


def run_eval(config, workdir: str, step: int | None) -> dict:
    import jax
    import numpy as np
    from diffusion_jax import training as T
    from diffusion_jax.data import make_loader
    from diffusion_jax.reports.metrics_writer import MetricsWriter

    if not has_weights(config, workdir):           # a checkpoint, or model.init_from
        raise missing_checkpoint(workdir)
    e = config.eval
    source = open_split(config, e.split)
    exp = build_experiment(config, image_shape_of(source))
    ckpt_step, state = restore_checkpoint(exp, workdir, step)
    bs = mesh_batch(exp, int(e.batch_size or config.data.batch_size), len(source))
    loader = make_loader(source, batch_size=bs, seed=0, shuffle=False, num_epochs=1)
    batches = Batches(loader, exp.num_classes is not None)
    loss_fn = jax.jit(make_loss_fn(exp, train=False))
    key = jax.random.PRNGKey(config.train.seed + 1)
    param_sets = {"loss": state.params}
    if config.ema.decays:
        param_sets["loss_ema"] = state.ema[T.ema_key(config.ema.decays[0])]
    # Stateful losses get the model_state that belongs to each parameter set (the family's:
    # e.g. an autoencoder's encoder BatchNorm statistics recomputed for the EMA parameters).
    states = {k: None for k in param_sets}
    if exp.stateful and T.has_leaves(state.model_state):
        states = {k: exp.family.eval_model_state(exp, state, p) for k, p in param_sets.items()}
    totals = {k: 0.0 for k in param_sets}
    n_batches = n_examples = 0
    t0 = time.perf_counter()
    bpd_images = []
    for i, batch in enumerate(batches):
        if e.num_batches and i >= e.num_batches:
            break
        gbatch = T.shard_batch(batch, exp.mesh)
        k = jax.random.fold_in(key, i)
        for name, params in param_sets.items():
            args = (params, gbatch, k) if states[name] is None else (params, gbatch, k, states[name])
            loss, _ = loss_fn(*args)
            totals[name] += float(loss)
        n_batches += 1
        n_examples += bs
        if e.bpd and sum(len(b["x"]) for b in bpd_images) < e.bpd_num_examples:
            bpd_images.append(jax.tree_util.tree_map(np.asarray, batch))
    if not n_batches:
        raise CLIError(f"no evaluation batch: split {e.split!r} is too small for batch {bs}")
    record = {k: v / n_batches for k, v in totals.items()}
    record["num_examples"] = n_examples
    if e.bpd:
        sel = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:e.bpd_num_examples],
                                     *bpd_images)
        record.update(_bits_per_dim(exp, state, sel))
    record["seconds"] = time.perf_counter() - t0
    writer = MetricsWriter(workdir, jsonl="eval_metrics.jsonl", primary=jax.process_index() == 0)
    writer.write(ckpt_step, record, prefix="eval/", extra={"split": e.split})
    writer.close()
    say(f"eval on {e.split!r} ({n_examples} examples, checkpoint step {ckpt_step}): " +
         ", ".join(f"{k} {v:.5g}" for k, v in record.items() if k != "num_examples"))
    return {"mode": "eval", "step": ckpt_step, **record}


def _bits_per_dim(exp: Experiment, state, batch) -> dict:
    """Bits/dim of the (dequantised) test images under the PF-ODE density at t = eval.bpd_t_min
    (None: the process' t_min) of the sampling parameters (`diffusion_jax.likelihood.image_bpd`,
    score_sde's estimate). The record names that time, `bpd_t_min`, and its noise level
    `bpd_sigma` = sigma(t): the bound depends on them (score_sde: t = 1e-5)."""
    import jax
    import numpy as np
    try:
        from diffusion_jax.likelihood import image_bpd
    except ImportError:                                   # pragma: no cover
        say("eval.bpd: diffusion_jax.likelihood is not available; skipped")
        return {}
    cfg = exp.config
    t_min = float(exp.process.t_min if cfg.eval.bpd_t_min is None else cfg.eval.bpd_t_min)
    family_bound = getattr(exp.family, "image_bits_per_dim", None)
    if family_bound is not None:                  # a family with its own bound (LSGM: VAE + ODE prior)
        out = family_bound(exp, sampling_params(exp, state), batch["x"],
                           jax.random.PRNGKey(cfg.train.seed + 2), t_min=t_min,
                           repeats=int(cfg.eval.bpd_repeats))
        say(f"bits/dim: {exp.family.title()}'s bound (family.image_bits_per_dim; see its "
            f"docstring), t_min = {t_min:g}, {int(cfg.eval.bpd_repeats)} repeat(s)")
        return out
    eps_fn = make_eps_fn(exp)

    @jax.jit
    def run(params, batch, key):
        cond = {"params": params, "model_cond": batch.get("cond")}
        return image_bpd(lambda x, t, c: eps_fn(x, t, cond), exp.process, batch["x"], key,
                         num_repeats=int(cfg.eval.bpd_repeats), t_min=t_min).bpd

    bpd = np.asarray(run(sampling_params(exp, state), batch,
                         jax.random.PRNGKey(cfg.train.seed + 2)))
    sigma = float(exp.process.sigma(np.float32(t_min)))
    say(f"bits/dim: the PF-ODE density at t = {t_min:g} (sigma = {sigma:.3g}; a dequantisation cell "
        f"is 2/256 = 0.0078 wide), {int(cfg.eval.bpd_repeats)} dequantisation repeat(s)")
    return {"bpd": float(np.mean(bpd)), "bpd_num_examples": int(bpd.shape[0]),
            "bpd_t_min": t_min, "bpd_sigma": sigma}
