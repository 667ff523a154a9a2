"""REPA on the embedded data: does aligning a denoiser block with a frozen encoder speed up training?

    python bench/repa.py [--out bench/results/repa.json] [--dataset digits/16] [--steps 1500]
        [--eval_every 250] [--weights 0,0.5] [--block down_1_0] [--target classifier|autoencoder]
        [--quick]

REPA (Yu et al. 2025) adds lambda (1 - cos(h_phi(f(x_t)), y(x0))) to the denoising loss, with f one
intermediate block of the denoiser, h_phi a 3-layer MLP projector and y a frozen encoder's features of
the clean image (`readouts.repa_loss`). Its claim is faster training: a lower FID at every step. Here,
for each lambda in --weights, the same UNet (the README default job's decoder: ch 32, ch_mult (1, 2),
cosine process, v prediction, AdamW 1e-3 with 100 warm-up steps and cosine decay, batch 32, EMA 0.999
with warm-up) is trained for --steps steps from the same initialisation and the same batches, and every
--eval_every steps the EMA parameters draw --num_gen samples (DDIM, 20 steps, x0 clipped, the same
prior noise for every run) whose Frechet distance (FD) to the test split is measured in the feature
space of the evaluation classifier (`evaluation.train_feature_classifier`, seed 0; the README's FD).

The frozen target encoder (`--target`):
    classifier   a second classifier of the same family trained with another seed (seed 1) and its
                 128-d penultimate features: the stand-in for REPA's DINOv2 (a strong, frozen,
                 pretrained encoder). It is not the network FD is measured with, but it is trained on
                 the same labels, so read the FD gain as an upper estimate of what a self-supervised
                 target would give.
    autoencoder  the library's own trained encoder: the semantic encoder of a DiffAE (flatten pooling,
                 32-d z_sem) trained here first for --target_steps steps with `autoencoder_loss` (no
                 labels anywhere).

Printed: one table row per (step, lambda) with FD, the kernel distance, the diffusion loss and the mean
cosine similarity of the aligned block; JSON with the same rows.
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
from diffusion_jax import objectives, sampling  # noqa: E402
from diffusion_jax.autoencoders import encode_fn  # noqa: E402
from diffusion_jax.cli.autoencoder import load_arrays  # noqa: E402
from diffusion_jax.cli.experiment import _objective, build_network  # noqa: E402
from diffusion_jax.evaluation import frechet_distance, kernel_distance, train_feature_classifier  # noqa: E402
from diffusion_jax.networks import UNet  # noqa: E402
from diffusion_jax.processes import as_eps_fn  # noqa: E402
from diffusion_jax.readouts import repa_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config(dataset: str):
    config = cv.load_file(os.path.join(ROOT, "configs", "default.py"))
    config.data.name = dataset
    config.data.image_size = int(dataset.split("/")[1])
    return config


def decoder_fields(config) -> dict:
    m = config.model
    return {k: tuple(m[k]) if isinstance(m[k], (list, tuple)) else m[k] for k in cv.MODEL_FIELDS["unet"]}


def schedule_and_tx(config, steps: int):
    o = config.optim
    warmup = min(o.warmup_steps, steps // 2)
    sched = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, steps,
                                               o.learning_rate * o.end_lr_factor)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(sched, weight_decay=o.weight_decay))


def train_autoencoder_target(config, tr, steps: int, log):
    """The default DiffAE trained `steps` steps; returns y(x0) = its EMA encoder's z_sem."""
    shape = tr["x"].shape[1:]
    module = build_network(config, shape)
    process = cv.build_process(config)
    loss_fn, _, init_state = _objective(config, process, None, module)
    key = jax.random.PRNGKey(config.train.seed)
    x1 = jnp.zeros((1,) + shape)
    variables = nn.unbox(jax.jit(lambda k: module.init({"params": k}, x1, jnp.zeros((1,)), x1,
                                                       train=False))(key))
    params, mstate = variables["params"], init_state(variables)
    tx = schedule_and_tx(config, steps)
    opt = tx.init(params)
    ema = jax.tree_util.tree_map(jnp.copy, params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt, ema, mstate, x, k, i):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": x}, k, mstate)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
        d = jnp.minimum(0.999, (1.0 + i) / (10.0 + i))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt, ema, aux["model_state"], loss

    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(tr["x"]), int(config.data.batch_size))
        params, opt, ema, mstate, loss = step(params, opt, ema, mstate, jnp.asarray(tr["x"][idx]),
                                              jax.random.fold_in(key, i), jnp.float32(i))
    log(f"  target DiffAE: {steps} steps in {time.perf_counter() - t0:.0f} s, loss {float(loss):.4f}")
    enc = encode_fn(module)
    frozen = {"params": ema}
    return lambda x0: enc(frozen, x0)[0].z


def run(config, tr, te, *, weight: float, block: str, target_fn, target_dim: int, steps: int,
        eval_every: int, num_gen: int, clf, ref_feats, log) -> list[dict]:
    shape = tr["x"].shape[1:]
    process = cv.build_process(config)
    module = UNet(**decoder_fields(config), repa_block=block, repa_dim=target_dim)
    key = jax.random.PRNGKey(config.train.seed)
    x1 = jnp.zeros((1,) + shape)
    params = nn.unbox(jax.jit(module.init)(key, x1, jnp.zeros((1,))))["params"]
    loss_fn = repa_loss(process, module, target_fn, base_factory=objectives.v_loss, weight=weight)
    tx = schedule_and_tx(config, steps)
    opt = tx.init(params)
    ema = jax.tree_util.tree_map(jnp.copy, params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt, ema, x, k, i):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": x}, k)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
        d = jnp.minimum(0.999, (1.0 + i) / (10.0 + i))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt, ema, aux["diffusion_loss"], aux["repa_cos"]

    def v_net(x, t, cond):
        return module.apply({"params": cond["params"]}, x, t)

    eps_fn = as_eps_fn(v_net, "v", process)

    rows, hist = [], []
    rng = np.random.default_rng(0)                  # the same batches for every weight
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(tr["x"]), int(config.data.batch_size))
        params, opt, ema, dl, cos = step(params, opt, ema, jnp.asarray(tr["x"][idx]),
                                         jax.random.fold_in(key, i), jnp.float32(i))
        hist.append((dl, cos))
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            last = np.asarray(jax.device_get(hist[-eval_every:]))
            out = sampling.sample("ddim", eps_fn, process, jax.random.PRNGKey(7), (num_gen,) + shape,
                                  num_steps=20, cond={"params": ema}, clip_x0=True,
                                  denoise_final=True)
            feats = clf.features(np.asarray(out.x))
            row = {"weight": weight, "step": i + 1, "seconds": round(time.perf_counter() - t0, 1),
                   "fd": frechet_distance(feats, ref_feats),
                   "kd": float(kernel_distance(feats, ref_feats, subset_size=min(500, num_gen))[0]),
                   "diffusion_loss": float(last[:, 0].mean()), "repa_cos": float(last[:, 1].mean())}
            log("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in row.items()))
            rows.append(row)
    return rows


def table(rows: list[dict], weights) -> str:
    steps = sorted({r["step"] for r in rows})
    by = {(r["step"], r["weight"]): r for r in rows}
    head = "| step | " + " | ".join(f"FD, lambda = {w:g}" for w in weights) + " | " + \
           " | ".join(f"cos, lambda = {w:g}" for w in weights) + " |"
    out = [head, "|" + "---|" * (1 + 2 * len(weights))]
    for s in steps:
        fds = [f"{by[(s, w)]['fd']:.2f}" if (s, w) in by else "" for w in weights]
        coss = [f"{by[(s, w)]['repa_cos']:.3f}" if (s, w) in by else "" for w in weights]
        out.append(f"| {s} | " + " | ".join(fds) + " | " + " | ".join(coss) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/repa.json")
    ap.add_argument("--dataset", default="digits/16")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--num_gen", type=int, default=500)
    ap.add_argument("--weights", default="0,0.5")
    ap.add_argument("--block", default="down_1_0", help="the UNet block aligned (REPA: an early one)")
    ap.add_argument("--target", default="classifier", choices=("classifier", "autoencoder"))
    ap.add_argument("--target_steps", type=int, default=1500)
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 64 samples")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.num_gen, args.target_steps = 40, 20, 64, 30
    weights = [float(w) for w in args.weights.split(",")]

    def log(msg):
        print(msg, flush=True)

    config = default_config(args.dataset)
    tr, te = load_arrays(config, "train"), load_arrays(config, "test")
    nc = int(max(tr["label"].max(), te["label"].max())) + 1
    t0 = time.perf_counter()
    clf = train_feature_classifier(tr["x"], tr["label"], num_classes=nc, seed=0)
    log(f"evaluation classifier: test accuracy {clf.accuracy(te['x'], te['label']):.3f}")
    ref_feats = clf.features(te["x"])
    floor = frechet_distance(clf.features(tr["x"][:len(te['x'])]), ref_feats)
    if args.target == "classifier":
        tgt = train_feature_classifier(tr["x"], tr["label"], num_classes=nc, seed=1)
        log(f"target classifier (seed 1): test accuracy {tgt.accuracy(te['x'], te['label']):.3f}")
        target_fn = lambda x0: tgt.module.apply({"params": tgt.params}, x0)[1]
        target_dim = int(np.asarray(tgt.features(te["x"][:2])).shape[-1])
    else:
        target_fn = train_autoencoder_target(config, tr, args.target_steps, log)
        target_dim = int(config.autoencoder.z_dim)
    rows = []
    for w in weights:
        log(f"lambda = {w:g}")
        rows += run(config, tr, te, weight=w, block=args.block, target_fn=target_fn,
                    target_dim=target_dim, steps=args.steps, eval_every=args.eval_every,
                    num_gen=args.num_gen, clf=clf, ref_feats=ref_feats, log=log)
    text = table(rows, weights)
    print(text)
    print(f"data floor (train vs test): FD {floor:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "floor_fd": floor,
                   "seconds": time.perf_counter() - t0, "platform": platform.platform(),
                   "devices": [str(d) for d in jax.devices()]}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
