"""Why does z carry so little, and what fixes it? A design sweep of diffusion autoencoders on digits.

    python bench/autoencoder_design.py [--out bench/results/autoencoder_design.json] [--steps 600]
        [--only name1,name2] [--quick]

Every variant is the README's default job (configs/default.py: UNet decoder ch 32, ch_mult (1, 2),
cosine process, AdamW 1e-3, batch 32, EMA) with one or two config fields changed, trained for
--steps steps with the library's `autoencoder_loss` in one jitted step (no checkpoints, so the
sweep is cheap), then measured with the EMA parameters on the 297 test digits:

    probe        linear probe (5-fold CV) and 10-NN accuracy of z on the digit labels
                 (PCA-32 of the pixels: 0.946 linear; raw pixels: 0.973)
    agreement    a classifier trained on the train split gives the (z, fresh noise) reconstruction
                 (DDIM, 20 steps, x0 clipped) the class it gives the original (128 test digits)
    ratio@t      eps MSE with another image's z / eps MSE with the image's own z, at t = 0.3, 0.5,
                 0.7 (`autoencoders.diagnostics.z_dependence`; 1 = z ignored)
    grad_enc     gradient norm reaching the encoder (mean over the last 100 steps), and the decoder's
    codes        binary latents: dead bits (hard codes constant over the test split), mean per-bit
                 entropy, distinct codes, I(x; z) in bits (minibatch estimate over 297 images)

Variants (name: what changes from the default):
    mean_eps        the design before issue 12: semantic encoder with global average pooling,
                    eps objective
    mean_v          ... with the v objective
    flat_eps        semantic encoder, flatten pooling (pool='flatten'), eps objective
    default         flatten pooling, v objective (configs/default.py)
    conv_v          DMZ's conv encoder (GroupNorm) instead of the semantic encoder, v objective
    path_*          the default with z through one other path: adagn_scale_shift, cross_attn,
                    time_add
    z8, z128        the default with 8 / 128 latent dimensions
    dmz_*           32 Gumbel-softmax bits through a cross-attention token (DMZ's design, conv
                    encoder with BatchNorm, v objective): plain, + bit-usage term (weight 1, or
                    0.01: dmz_usage_small), + straight-through hard codes, + both
The training-length axis is the default variant measured at steps/2 and steps (and 2 steps with
--long); the README's main job is the same design at 1 500 steps.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from diffusion_jax import config as cv  # noqa: E402
from diffusion_jax.autoencoders import (LatentOutput, decoder_eps_fn, encode_fn,  # noqa: E402
                                        recompute_batch_stats, reconstruct_from_noise)
from diffusion_jax.autoencoders import diagnostics as D  # noqa: E402
from diffusion_jax.cli.autoencoder import load_arrays  # noqa: E402
from diffusion_jax.evaluation import train_feature_classifier  # noqa: E402
from diffusion_jax.models import family_for  # noqa: E402
from diffusion_jax.readouts import fit_linear_probe, knn_accuracy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = {"autoencoder.pool": "mean", "objective.name": "eps"}
DMZ = {"autoencoder.encoder": "conv", "autoencoder.norm": "batch", "autoencoder.latent": "binary",
       "autoencoder.z_conditioning": ("cross_attn",)}
VARIANTS = {
    "mean_eps": BEFORE,
    "mean_v": {"autoencoder.pool": "mean"},
    "flat_eps": {"objective.name": "eps"},
    "default": {},
    "conv_v": {"autoencoder.encoder": "conv", "autoencoder.norm": "group", "autoencoder.pool": "mean"},
    "path_adagn_scale_shift": {"autoencoder.z_conditioning": ("adagn_scale_shift",)},
    "path_cross_attn": {"autoencoder.z_conditioning": ("cross_attn",)},
    "path_time_add": {"autoencoder.z_conditioning": ("time_add",)},
    "z8": {"autoencoder.z_dim": 8},
    "z128": {"autoencoder.z_dim": 128},
    "dmz_plain": DMZ,
    "dmz_usage": {**DMZ, "autoencoder.bit_usage_weight": 1.0},
    "dmz_usage_small": {**DMZ, "autoencoder.bit_usage_weight": 0.01},
    "dmz_st": {**DMZ, "autoencoder.straight_through": True},
    "dmz_usage_st": {**DMZ, "autoencoder.bit_usage_weight": 1.0, "autoencoder.straight_through": True},
    "dmz_tau": {**DMZ, "autoencoder.tau_final": 0.3, "autoencoder.tau_anneal_steps": 500},   # 1 -> 0.3
}


def make_config(overrides: dict):
    config = cv.load_file(os.path.join(ROOT, "configs", "default.py"))
    for k, v in overrides.items():
        sec, field = k.split(".", 1)
        config[sec][field] = v
    if overrides.get("autoencoder.encoder") == "conv":
        config.autoencoder.pool = "mean"
    cv.validate(config)
    return config


def train(config, tr, steps: int, eval_at: tuple[int, ...], evaluate):
    """The default job's optimiser and EMA (0.999 with warm-up) in a plain jitted loop."""
    shape = tr["x"].shape[1:]
    family = family_for(config)                      # the 'autoencoder' family (DiffAE / DMZ)
    module = family.build_network(shape)
    process = cv.build_process(config)
    loss_fn, _, init_state = family.objective(process, None, module)
    key = jax.random.PRNGKey(config.train.seed)
    variables = nn.unbox(family.init_variables(module, key, shape))
    params, mstate = variables["params"], init_state(variables)
    o = config.optim
    warmup = min(o.warmup_steps, steps // 2)          # the config's 100 for >= 200 steps (--quick: fewer)
    sched = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, steps,
                                               o.learning_rate * o.end_lr_factor)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adamw(sched, weight_decay=o.weight_decay))
    opt = tx.init(params)
    ema = jax.tree_util.tree_map(jnp.copy, params)
    decay = float(config.ema.decays[0])

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt, ema, mstate, x, k, i):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": x}, k, mstate)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
        d = jnp.minimum(decay, (1.0 + i) / (10.0 + i))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return (params, opt, ema, aux["model_state"], loss, optax.global_norm(g["encoder"]),
                optax.global_norm(g["decoder"]))

    rng = np.random.default_rng(config.train.seed)
    grads, results, t0 = [], {}, time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(tr["x"]), int(config.data.batch_size))
        params, opt, ema, mstate, loss, ge, gd = step(params, opt, ema, mstate, jnp.asarray(tr["x"][idx]),
                                                      jax.random.fold_in(key, i), jnp.float32(i))
        grads.append((ge, gd))
        if i + 1 in eval_at:
            last = np.asarray(jax.device_get(grads[-100:]))
            seconds = time.perf_counter() - t0
            results[i + 1] = evaluate(module, process, ema, mstate, seconds,
                                      float(last[:, 0].mean()), float(last[:, 1].mean()))
    return results


def make_evaluator(config, tr, te, clf, log):
    prediction = cv.objective_prediction(config.objective)
    encoders = {}                        # one compiled encoder per module (evaluated several times)

    def evaluate(module, process, ema, mstate, seconds, grad_enc, grad_dec):
        variables = {"params": ema}
        if jax.tree_util.tree_leaves(mstate["encoder"]):          # BatchNorm: statistics for the EMA weights
            variables["batch_stats"] = recompute_batch_stats(module, {**variables, "batch_stats": mstate["encoder"]},
                                                             tr["x"][:1024])
        if module not in encoders:
            encoders[module] = jax.jit(lambda v, x: {k: a for k, a in encode_fn(module)(v, x)[0]._asdict().items()
                                                     if a is not None})
        enc = encoders[module]
        ztr = np.concatenate([np.asarray(enc(variables, tr["x"][i:i + 500])["z"])
                              for i in range(0, len(tr["x"]), 500)])
        lat = enc(variables, te["x"])
        zte = np.asarray(lat["z"])
        probe = fit_linear_probe(ztr, tr["label"], num_classes=10)
        row = {"seconds": round(seconds, 1), "linear": probe.accuracy(zte, te["label"]),
               "knn": float(knn_accuracy(ztr, tr["label"], zte, te["label"], k=10, num_classes=10)),
               "grad_enc": grad_enc, "grad_dec": grad_dec}
        eps_fn = decoder_eps_fn(module, None, prediction, process=process)
        dep = D.z_dependence(eps_fn, process, te["x"][:256], zte[:256], jax.random.PRNGKey(1),
                             ts=(0.3, 0.5, 0.7), params=ema)
        row.update({f"ratio@{t:g}": g for t, g in zip(dep["t"], dep["gain"])})
        row.update({f"share@{t:g}": s for t, s in zip(dep["t"], dep["share"])})
        rec = reconstruct_from_noise(eps_fn, process, zte[:128], jax.random.PRNGKey(5), te["x"].shape[1:],
                                     num_steps=20, clip_x0=True, params=ema)
        row["agreement"] = float(np.mean(clf.predict(np.asarray(rec)) == clf.predict(te["x"][:128])))
        if "logits" in lat:
            usage = D.code_usage(zte)
            row.update(dead_bits=usage["dead_bits"], bit_entropy=usage["mean_entropy"],
                       distinct_codes=usage["distinct_codes"],
                       mi_bits=D.mutual_information(LatentOutput(lat["z"], logits=lat["logits"]),
                                                    jax.random.PRNGKey(2)))
        log("  " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        return row

    return evaluate


COLUMNS = ("linear", "knn", "agreement", "ratio@0.3", "ratio@0.5", "ratio@0.7", "grad_enc", "grad_dec",
           "dead_bits", "bit_entropy", "mi_bits", "seconds")


def table(rows: list[dict]) -> str:
    head = "| variant | steps | " + " | ".join(COLUMNS) + " |"
    out = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append(f"| {r['variant']} | {r['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "autoencoder_design.json"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--quick", action="store_true", help="30 steps, two variants (a smoke run)")
    ap.add_argument("--long", action="store_true", help="also measure the default at 2 x steps")
    args = ap.parse_args(argv)
    steps = 30 if args.quick else args.steps
    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    if args.quick:
        names = names[:2] if args.only else ["default", "dmz_usage"]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    log = lambda m: print(m, flush=True)
    base = make_config({})
    tr, te = load_arrays(base, "train"), load_arrays(base, "test")
    t0 = time.perf_counter()
    clf = train_feature_classifier(tr["x"], tr["label"], num_classes=10, seed=0)
    log(f"feature classifier: test accuracy {clf.accuracy(te['x'], te['label']):.3f} "
        f"({time.perf_counter() - t0:.0f} s)")
    rows = []
    record = {"steps": steps, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "jax": jax.__version__, "devices": str(jax.devices())},
              "classifier_test_accuracy": clf.accuracy(te["x"], te["label"]), "rows": rows}
    for name in names:
        config = make_config(VARIANTS[name])
        eval_at = ((steps // 2, steps) + ((2 * steps,) if args.long else ())
                   if name == "default" and not args.quick else (steps,))
        log(f"{name}: {VARIANTS[name] or 'the default'}; {max(eval_at)} steps")
        res = train(config, tr, max(eval_at), eval_at, make_evaluator(config, tr, te, clf, log))
        for s, row in res.items():
            rows.append({"variant": name, "steps": s, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in VARIANTS[name].items()}, **row})
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    print(table(rows))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
