"""Representation benchmark: DDPM vs DiffAE vs DMZ on the embedded data, CPU-sized.

    python bench/representations.py [--out bench/results/representations.json] [--quick]
        [--datasets digits/16,shapes/32,glyphs/32] [--steps N] [--batch 32] [--num_gen 500]
        [--gen_steps 10,20,50,100] [--fresh] [--dmz_bit_usage W] [--dmz_objective hybrid|v]

For each dataset three models are trained through the command line's own code path
(`diffusion_jax.cli.execute(config, workdir, 'train')`, configs built here from `base_config`),
with the same decoder, optimiser, batch and number of steps:

    DDPM    UNet, 'hybrid' objective (eps MSE + 0.001 L_vb, learned variance) on the cosine DDPM
            process (T = 1000); the same recipe as DMZ (DDPM-IP gamma 0.1, loss-aware t), so that
            the only difference to DMZ is z
    DiffAE  semantic half-UNet encoder, last level flattened (pool='flatten') -> continuous z_sem
            (d values), decoder h (1 + W z) in every ResBlock ('adagn_scale'); v prediction,
            uniform t, on the same process (issue 12: with DiffAE's mean pooling and L_simple the
            latent carried little; see bench/autoencoder_design.py)
    DMZ     conv encoder + BatchNorm -> d Gumbel-softmax bits, z as one cross-attention token in
            every attention block; the hybrid loss, DDPM-IP gamma 0.1, loss-aware t

    decoder   UNet, 1 res block, attention at 8x8, scale-shift AdaGN, no dropout;
              digits/16: ch 32, ch_mult (1, 2), 1500 steps (11.6 GFLOP per DDPM train step);
              shapes/32: ch 16, ch_mult (1, 2, 2), 800 steps (11.8 GFLOP; ch 32 would be 45.6)
    optimiser AdamW lr 1e-3, 100 warm-up steps, cosine decay to 1e-4, clip 1, batch 32;
              EMA 0.999 with warm-up (the EMA parameters are evaluated)
    latents   d = 32: DiffAE z_sem 32 floats, DMZ 32 bits (a 64-value one-hot code), PCA-32

Then, with the EMA parameters of the final checkpoints:
  1. training: parameters, steps/s, wall time, final loss;
  2. representations (`cli.probe.score_features / pca_features / probe_table`, i.e. the report's
     numbers): linear probe (5-fold CV) and k-NN accuracy on the labels, and for shapes per factor
     (color accuracy, scale / pos_x / pos_y ridge R^2), for raw pixels, PCA-d (d = the latent
     size), PCA-64, the DDAE readout of the DDPM at the best (t, block) of the sweep (chosen on
     validation accuracy) and every block concatenated at that t, each max-pooled (READOUT_POOL)
     and mean-pooled (DDAE's own), DiffAE z_sem and the DMZ code;
  3. reconstruction MSE of DiffAE and DMZ from (z, x_T = DDIM^{-1}(x0 | z)) and from (z, fresh
     noise) (`cli.autoencoder.reconstructions`), on the first test images, and the class
     agreement of the fresh-noise reconstructions with their originals (the quality classifier);
  4. sample grids: bench/results/representations/<dataset>/<model>.png (DDPM and DMZ: ancestral,
     100 steps; DiffAE: DDIM 50 steps from z of DiffAE's latent DDIM) and reconstructions;
  5. DMZ vs DDPM sample quality: ancestral sampling with 10 / 20 / 50 / 100 respaced steps, learned
     variance ('learned_range'), DMZ's z ~ Bernoulli(1/2) bits and, the paper's alternative, each
     bit at its frequency in the training codes ('DMZ bit-freq'); Frechet and kernel distance
     (`diffusion_jax.evaluation`) between the features of N samples and of the test split, in the
     space of a small classifier trained here on the train split (its test accuracy is reported);
     the 'data' row is N train images against the test split (the floor).

Training runs live under <workdir>/runs/<dataset>/<model>_s<steps>_b<batch>; a finished run is not
retrained when the bench is run again (--fresh retrains).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time

import jax
import numpy as np

from diffusion_jax import cli
from diffusion_jax.cli.autoencoder import (encode_images, generation_latents, load_arrays,
                                           reconstructions)
from diffusion_jax.cli.experiment import (build_experiment, generate, image_shape_of, json_config,
                                          make_eps_fn, open_split, restore_checkpoint,
                                          sampling_params)
from diffusion_jax.cli.probe import pca_features, probe_table, score_features
from diffusion_jax.config import base_config
from diffusion_jax.evaluation import frechet_distance, kernel_distance, train_feature_classifier
from diffusion_jax.readouts import extract_features
from diffusion_jax.reports import image_grid
from diffusion_jax.training import read_metrics

MODELS = ("ddpm", "diffae", "dmz")
NAMES = {"ddpm": "DDPM", "diffae": "DiffAE", "dmz": "DMZ"}
GEN_STEPS = (10, 20, 50, 100)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Per-dataset sizes. z_dim: DiffAE's z_sem size = DMZ's number of bits = the PCA size."""
    image_size: int
    ch: int
    ch_mult: tuple
    steps: int
    z_dim: int
    probe_train: int = 0          # probe examples (0: the whole split)
    probe_test: int = 0
    knn_k: int = 10


DATASETS = {
    "digits/16": DatasetSpec(16, 32, (1, 2), steps=1500, z_dim=32),
    "shapes/32": DatasetSpec(32, 16, (1, 2, 2), steps=800, z_dim=32, probe_train=4000,
                             probe_test=1000, knn_k=20),
    "glyphs/32": DatasetSpec(32, 16, (1, 2, 2), steps=800, z_dim=32, probe_train=4000,
                             probe_test=1000, knn_k=20),
}
IP_GAMMA = 0.1                    # DDPM-IP's gamma (DMZ: 0.1 outside CIFAR-10)
READOUT_T = (0.012, 0.05, 0.1, 0.25)
READOUT_POOL = "gmp"   # max pooling: a small glyph on a large background is not averaged away;
                       # DDAE's mean pooling is reported beside it


def make_config(dataset: str, model: str, *, steps: int, batch: int = 32, seed: int = 0,
                latent_steps: int = 1500, sample_batch: int = 250, dmz_bit_usage: float = 0.0,
                dmz_objective: str = "hybrid"):
    """The experiment config of `model` ('ddpm' | 'diffae' | 'dmz') on `dataset` (see the module
    docstring); validated by `cli.execute`."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; this bench knows {tuple(DATASETS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {MODELS}")
    spec = DATASETS[dataset]
    if dmz_objective not in ("hybrid", "v"):
        raise ValueError(f"dmz_objective must be 'hybrid' (the paper's) or 'v', got {dmz_objective!r}")
    v_objective = model == "diffae" or (model == "dmz" and dmz_objective == "v")
    c = base_config("unet", "ddpm", "v" if v_objective else "hybrid")
    d = c.data
    d.name, d.image_size, d.batch_size, d.random_flip = dataset, spec.image_size, batch, False
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = spec.ch, spec.ch_mult, 1, (8,)
    m.dropout, m.scale_shift_norm = 0.0, True
    c.process.kwargs.num_steps = 1000
    c.process.kwargs.beta_schedule = "cosine"
    o = c.objective.kwargs
    if v_objective:
        o.weighting, o.time_sampling = "none", "uniform"
    else:
        o.vb_weight, o.input_perturbation, o.time_sampling = 0.001, IP_GAMMA, "loss_aware"
    ae = c.autoencoder
    if model == "diffae":
        ae.kind, ae.encoder, ae.latent, ae.z_dim = "diffae", "semantic", "continuous", spec.z_dim
        ae.z_conditioning, ae.encoder_attn_resolutions = ("adagn_scale",), ()
        ae.pool = "flatten"          # issue 12: global average pooling loses the layout
    elif model == "dmz":
        ae.kind, ae.encoder, ae.latent, ae.z_dim = "dmz", "conv", "binary", spec.z_dim
        ae.z_conditioning, ae.encoder_ch, ae.norm = ("cross_attn",), 32, "batch"
        ae.tau, ae.prior = 1.0, "bernoulli"
        ae.bit_usage_weight = dmz_bit_usage
    op = c.optim
    op.learning_rate, op.schedule, op.end_lr_factor = 1e-3, "cosine", 0.1
    op.warmup_steps = min(100, steps // 10)
    op.grad_clip = 1.0
    c.ema.decays, c.ema.warmup = (0.999,), True
    t = c.train
    t.num_steps, t.log_every, t.sample_every, t.checkpoint_every, t.keep = steps, 50, 0, 0, 1
    t.seed = seed
    if model == "diffae":
        ls = c.latent_sampler
        ls.num_steps, ls.num_layers, ls.hidden, ls.batch_size = latent_steps, 4, 256, 256
        ls.learning_rate, ls.loss, ls.sample_steps = 1e-3, "l1", 50
    s = c.sample
    if v_objective:
        s.sampler, s.num_steps = "ddim", 50
    else:
        s.sampler, s.num_steps, s.spacing = "ancestral", 100, "uniform"
        s.kwargs.variance = "learned_range"
    s.kwargs.clip_x0 = True
    s.num_samples, s.batch_size, s.seed = 64, sample_batch, seed
    r = c.readout
    r.timesteps, r.blocks, r.knn_k = READOUT_T, (), spec.knn_k
    r.pool, r.concat = READOUT_POOL, True
    r.num_train, r.num_test = spec.probe_train, spec.probe_test
    rep = c.report
    rep.enabled = False
    rep.inversion_steps, rep.fixed_point_iters = 50, 2
    return c


# ------------------------------------------------------------------------------------ training
def run_dir(workdir: str, dataset: str, model: str, steps: int, batch: int, variant: str = "") -> str:
    return os.path.join(os.path.abspath(workdir), "runs", dataset.replace("/", "_"),
                        f"{model}{variant}_s{steps}_b{batch}")


def dmz_variant(args) -> str:
    """The DMZ run's folder suffix: '' for the paper's loss, else its bit-usage weight / objective."""
    return ((f"_usage{args.dmz_bit_usage:g}" if args.dmz_bit_usage else "")
            + ("_v" if args.dmz_objective == "v" else ""))


def train_model(config, wd: str, fresh: bool) -> dict:
    """Trains (or finds trained) one model; {'seconds', 'trained_now', 'steps_per_sec', 'loss'}."""
    if fresh and os.path.isdir(wd):
        shutil.rmtree(wd)
    t0 = time.perf_counter()
    res = cli.execute(config, wd, "train", progress=False)
    if res.get("preempted"):  # SIGTERM / Ctrl-C saved a checkpoint: stop the bench, do not go on
        raise SystemExit(f"training in {wd} was interrupted at step {res.get('step')}; "
                         "run the bench again to resume")
    seconds = time.perf_counter() - t0
    recs = [r for r in read_metrics(wd) if "loss" in r]
    sps = sorted(r["steps_per_sec"] for r in recs[1:] if "steps_per_sec" in r) or [float("nan")]
    tail = recs[-max(1, len(recs) // 10):]
    return {"seconds": seconds, "trained_now": res.get("start_step", 0) < config.train.num_steps,
            "compile_seconds": res.get("compile_seconds"), "steps_per_sec": sps[len(sps) // 2],
            "final_loss": float(np.mean([r["loss"] for r in tail])) if tail else float("nan")}


def load_model(config, wd: str):
    """(Experiment, TrainState) of the newest checkpoint in `wd`."""
    exp = build_experiment(config, image_shape_of(open_split(config, "train")))
    _, state = restore_checkpoint(exp, wd, None)
    return exp, state


def param_counts(exp, state) -> dict:
    size = lambda tree: int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
    p = state.params
    if exp.family.has_encoder:
        return {"decoder": size(p["decoder"]), "encoder": size(p["encoder"])}
    return {"decoder": size(p), "encoder": 0}


# ----------------------------------------------------------------------------- measurements
def representations(models: dict, train: dict, test: dict, z: dict, spec: DatasetSpec,
                    seed: int) -> tuple[list, dict]:
    """Probe rows (raw, PCA-d, PCA-64, DDAE readout of the DDPM, DiffAE z_sem, DMZ z) and the
    readout sweep; the DDPM's rows come from `probe_table` (the report's own table)."""
    exp, state = models["ddpm"]
    table = probe_table(exp, state, train, test, key=jax.random.PRNGKey(seed + 3), log=print)
    rows = []
    for row in table["rows"]:
        name = row["features"]
        if name.startswith("readout"):
            name = f"DDPM {name} (DDAE)"
        rows.append({**row, "features": name})
    pool = exp.config.readout.pool
    if pool != "gap":    # DDAE's own mean pooling at the same t, best block and every block
        best, blocks = table["best"], tuple(table["sweep"]["blocks"])
        params = sampling_params(exp, state)
        f = [extract_features(exp.module, params, d["x"], (best["t"],), blocks,
                              process=exp.process, batch_size=64, pool="gap",
                              key=jax.random.fold_in(jax.random.PRNGKey(seed + 3), i))
             for i, d in enumerate((train, test))]
        for what, bl in ((best["block"], (best["block"],)), (f"all {len(blocks)} blocks", blocks)):
            ftr, fte = (np.concatenate([g[b][0] for b in bl], -1) for g in f)
            rows.append({"features": f"DDPM readout t={best['t']:.3g} {what} gap (DDAE)",
                         **score_features(ftr, fte, train, test, knn_k=spec.knn_k)})
    xtr = np.asarray(train["x"]).reshape(len(train["x"]), -1)
    xte = np.asarray(test["x"]).reshape(len(test["x"]), -1)
    d = spec.z_dim
    if d != 64:
        rows.insert(1, {"features": f"PCA-{d}",
                        **score_features(*pca_features(xtr, xte, d), train, test,
                                         knn_k=spec.knn_k)})
    for m, what in (("diffae", f"DiffAE z_sem ({d} floats)"), ("dmz", f"DMZ z ({d} bits)")):
        if m in z:
            rows.append({"features": what, **score_features(z[m]["train"], z[m]["test"], train,
                                                            test, knn_k=spec.knn_k)})
    return rows, {"sweep": table["sweep"], "best": table["best"]}


def sample_quality(models: dict, train_full: dict, test_full: dict, *, num_gen: int,
                   gen_steps, seed: int, out_dir: str, classifier_steps: int,
                   dmz_train_z=None, agreement: dict | None = None) -> dict:
    """FD / KD between classifier features of `num_gen` samples and of the test split, for DDPM
    and DMZ (z ~ Bernoulli(1/2), and with `dmz_train_z` also z ~ the per-bit frequencies of those
    training codes) at each number of ancestral steps; writes the 100-step (largest) grids.
    `agreement` {model: (originals, reconstructions)}: the fraction of reconstructions given the
    class of their original by the same classifier (out['agreement'])."""
    from diffusion_jax.autoencoders import bit_frequencies, sample_binary_prior
    t0 = time.perf_counter()
    k = int(max(train_full["label"].max(), test_full["label"].max())) + 1
    net = train_feature_classifier(train_full["x"], train_full["label"], num_classes=k,
                                   steps=classifier_steps, seed=seed)
    ref = net.features(test_full["x"])
    m = min(num_gen, len(train_full["x"]))
    floor_feats = net.features(train_full["x"][:m])
    kd = lambda f: kernel_distance(ref, f, subset_size=min(len(f), len(ref), 500))
    out = {"classifier": {"test_accuracy": net.accuracy(test_full["x"], test_full["label"]),
                          "train_accuracy": net.train_accuracy,
                          "seconds": time.perf_counter() - t0},
           "num_generated": num_gen, "num_reference": int(len(ref)),
           "floor": {"fd": frechet_distance(ref, floor_feats), "kd": kd(floor_feats)[0],
                     "num_train_images": m},
           "rows": [], "agreement": {}}
    for label, (orig, rec) in (agreement or {}).items():
        out["agreement"][label] = float(np.mean(net.predict(rec) == net.predict(orig)))
    print(f"quality: feature classifier test accuracy {out['classifier']['test_accuracy']:.3f}; "
          f"floor FD {out['floor']['fd']:.3f}", flush=True)
    variants = [("ddpm", "DDPM", None), ("dmz", "DMZ", None)]
    if dmz_train_z is not None:  # the paper's alternative prior: each bit at its training frequency
        variants.append(("dmz", "DMZ bit-freq", bit_frequencies(dmz_train_z)))
    for name, label, probs in variants:
        if name not in models:
            continue
        exp, state = models[name]
        eps_fn = make_eps_fn(exp)            # one closure: one compiled sampler per step count
        params = sampling_params(exp, state)
        # the family's prior latents (None for the DDPM), or DMZ's bits at their train frequencies
        z = (exp.family.generation_latents(exp, state, num_gen, seed)[0] if probs is None else
             np.asarray(sample_binary_prior(jax.random.PRNGKey(seed), num_gen, len(probs), probs)))
        for steps in gen_steps:
            t1 = time.perf_counter()
            x, _ = generate(exp, eps_fn, params, num_gen, seed, z=z, num_steps=steps,
                            sampler="ancestral")
            secs = time.perf_counter() - t1
            f = net.features(np.clip(x, -1.0, 1.0))
            kmean, kstd = kd(f)
            row = {"model": label, "steps": int(steps), "fd": frechet_distance(ref, f),
                   "kd": kmean, "kd_std": kstd, "seconds": secs,
                   "pred_class_entropy": _class_entropy(net.predict(np.clip(x, -1, 1)), k)}
            out["rows"].append(row)
            print(f"quality: {label:<12} {steps:4d} steps  FD {row['fd']:.3f}  "
                  f"KD {kmean:.4f}  ({secs:.0f}s)", flush=True)
            if steps == max(gen_steps):
                fname = name if probs is None else f"{name}_bitfreq"
                image_grid(x[:64], os.path.join(out_dir, f"{fname}.png"))
    out["seconds"] = time.perf_counter() - t0
    return out


def code_usage(z) -> dict:
    """How DMZ uses its bits on the training images: per-bit entropy H(p_i) (1 bit: balanced), the
    number of constant bits (p_i in {0, 1}) and of distinct codes."""
    from diffusion_jax.autoencoders import bit_entropy, bit_frequencies
    p = np.asarray(bit_frequencies(z))
    bits = np.asarray(z)[:, 1::2] > 0.5
    return {"mean_bit_entropy": float(np.mean(np.asarray(bit_entropy(p)))),
            "constant_bits": int(np.sum((p == 0) | (p == 1))), "bits": int(len(p)),
            "distinct_codes": int(len(np.unique(bits, axis=0))), "num_images": int(len(z))}


def _class_entropy(pred, k: int) -> float:
    """Entropy (nats) of the predicted-class histogram of the samples (log k: all classes even)."""
    p = np.bincount(np.asarray(pred), minlength=k) / len(pred)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def diffae_grid(exp, state, train_z, config, out_dir: str, seed: int) -> dict:
    """DiffAE samples: z from its latent DDIM (trained here on the train latents), DDIM decoding."""
    from diffusion_jax.autoencoders.latent_sampler import train_latent_sampler
    t0 = time.perf_counter()
    ls = config.latent_sampler
    sampler = train_latent_sampler(train_z, {
        "num_layers": ls.num_layers, "hidden": ls.hidden, "batch_size": ls.batch_size,
        "learning_rate": ls.learning_rate, "num_steps": ls.num_steps, "loss": ls.loss,
        "sample_steps": ls.sample_steps, "seed": seed, "chunk_steps": min(1000, ls.num_steps)})
    z, what = generation_latents(exp, 64, seed, train_z=train_z, latent_sampler=sampler)
    x, _ = generate(exp, make_eps_fn(exp), sampling_params(exp, state), 64, seed, z=z)
    image_grid(x, os.path.join(out_dir, "diffae.png"))
    return {"latent_sampler_final_loss": float(np.asarray(sampler.losses)[-1]), "z": what,
            "seconds": time.perf_counter() - t0}


def run_dataset(dataset: str, args, log) -> dict:
    spec = DATASETS[dataset]
    steps = args.steps or spec.steps
    out_dir = os.path.join(args.workdir, dataset.replace("/", "_"))
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {"dataset": dataset, "steps": steps, "batch": args.batch, "z_dim": spec.z_dim,
                 "training": {}, "timings": {}}
    t0 = time.perf_counter()
    configs, models = {}, {}
    for name in MODELS:
        cfg = make_config(dataset, name, steps=steps, batch=args.batch, seed=args.seed,
                          latent_steps=args.latent_steps, sample_batch=min(args.num_gen, 500),
                          dmz_bit_usage=args.dmz_bit_usage, dmz_objective=args.dmz_objective)
        wd = run_dir(args.workdir, dataset, name, steps, args.batch,
                     dmz_variant(args) if name == "dmz" else "")
        log(f"[{dataset}] training {NAMES[name]} ({steps} steps) in {wd}")
        tr = train_model(cfg, wd, args.fresh)
        configs[name] = cfg
        models[name] = load_model(cfg, wd)
        tr.update(params=param_counts(*models[name]), workdir=wd)
        res["training"][NAMES[name]] = tr
        res.setdefault("configs", {})[NAMES[name]] = json_config(cfg)
        log(f"[{dataset}] {NAMES[name]}: {tr['steps_per_sec']:.2f} steps/s, {tr['seconds']:.0f}s, "
            f"final loss {tr['final_loss']:.4f}")
    res["timings"]["training"] = time.perf_counter() - t0

    cfg0 = configs["ddpm"]
    train = load_arrays(cfg0, "train", spec.probe_train if not args.quick else 300)
    test = load_arrays(cfg0, "test", spec.probe_test if not args.quick else 100)
    z = {}
    for name in ("diffae", "dmz"):
        exp, state = models[name]
        z[name] = {"train": encode_images(exp, state, train["x"]),
                   "test": encode_images(exp, state, test["x"])}

    res["dmz_code"] = code_usage(z["dmz"]["train"])
    t1 = time.perf_counter()
    rows, sweep = representations(models, train, test, z, spec, args.seed)
    res["representations"] = {"rows": rows, "num_train": len(train["x"]),
                              "num_test": len(test["x"]), **sweep}
    res["timings"]["representations"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    res["reconstruction"], recs = {}, {}
    n_rec = min(args.num_rec, len(test["x"]))
    for name in ("diffae", "dmz"):
        exp, state = models[name]
        cfg = configs[name]
        rec = reconstructions(exp, state, test["x"][:n_rec], z[name]["test"][:n_rec],
                              steps=cfg.report.inversion_steps,
                              fixed_point_iters=cfg.report.fixed_point_iters, seed=args.seed)
        k = min(12, n_rec)
        image_grid(np.concatenate([test["x"][:k], rec["inverted"][:k], rec["noise"][:k]]),
                   os.path.join(out_dir, f"{name}_reconstructions.png"), ncol=k)
        res["reconstruction"][NAMES[name]] = {"mse_inverted": rec["mse_inverted"],
                                              "mse_noise": rec["mse_noise"], "num_images": n_rec,
                                              "inversion_steps": cfg.report.inversion_steps}
        recs[NAMES[name]] = (test["x"][:n_rec], rec["noise"])
    res["timings"]["reconstruction"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    exp, state = models["diffae"]
    res["diffae_samples"] = diffae_grid(exp, state, z["diffae"]["train"], configs["diffae"],
                                        out_dir, args.seed)
    res["timings"]["diffae_samples"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    train_full, test_full = load_arrays(cfg0, "train"), load_arrays(cfg0, "test")
    res["quality"] = sample_quality(models, train_full, test_full, num_gen=args.num_gen,
                                    gen_steps=args.gen_steps, seed=args.seed, out_dir=out_dir,
                                    classifier_steps=args.classifier_steps,
                                    dmz_train_z=z["dmz"]["train"] if "dmz" in z else None,
                                    agreement=recs)
    for m, a in res["quality"]["agreement"].items():
        res["reconstruction"][m]["class_agreement_noise"] = a
    res["timings"]["quality"] = time.perf_counter() - t1
    res["images"] = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                           if f.endswith(".png"))
    res["timings"]["total"] = time.perf_counter() - t0
    return res


# -------------------------------------------------------------------------------- printing
def _fmt(v, nd=3):
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _md_table(rows: list[dict], cols: list[str], heads: list[str] | None = None) -> str:
    heads = heads or cols
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def print_tables(results: list[dict]) -> None:
    for res in results:
        ds = res["dataset"]
        print(f"\n## {ds}: training ({res['steps']} steps, batch {res['batch']}, "
              f"z {res['z_dim']})")
        rows = [{"model": m, "decoder params": t["params"]["decoder"],
                 "encoder params": t["params"]["encoder"], "steps/s": t["steps_per_sec"],
                 "train s": f"{t['seconds']:.0f}" + ("" if t["trained_now"] else " (cached)"),
                 "final loss": t["final_loss"]} for m, t in res["training"].items()]
        print(_md_table(rows, list(rows[0])))

        rep = res["representations"]
        print(f"\n## {ds}: representations (linear probe / k-NN test accuracy on the labels; "
              f"{rep['num_train']} train / {rep['num_test']} test images)")
        cols = list(dict.fromkeys(k for r in rep["rows"] for k in r))
        print(_md_table(rep["rows"], cols))
        u = res["dmz_code"]
        print(f"DMZ code on {u['num_images']} train images: mean bit entropy "
              f"{u['mean_bit_entropy']:.3f} bits, {u['constant_bits']}/{u['bits']} constant bits, "
              f"{u['distinct_codes']} distinct codes")
        b = rep["best"]
        print(f"readout sweep: t in {rep['sweep']['timesteps']} x {len(rep['sweep']['blocks'])} "
              f"blocks; best by validation t={b['t']:.3g} {b['block']}")

        print(f"\n## {ds}: reconstruction MSE (per pixel, images in [-1, 1])")
        rows = [{"model": m, "from (z, inverted x_T)": r["mse_inverted"],
                 "from (z, fresh noise)": r["mse_noise"],
                 "class agreement (z, fresh noise)": r.get("class_agreement_noise", ""),
                 "images": r["num_images"]}
                for m, r in res["reconstruction"].items()]
        print(_md_table(rows, list(rows[0])))

        q = res["quality"]
        steps = sorted({r["steps"] for r in q["rows"]})
        print(f"\n## {ds}: sample quality, ancestral (learned variance), {q['num_generated']} "
              f"samples vs {q['num_reference']} test images; feature classifier test accuracy "
              f"{q['classifier']['test_accuracy']:.3f}")
        rows = []
        for m in dict.fromkeys(r["model"] for r in q["rows"]):
            for metric, scale in (("fd", 1.0), ("kd", 1e3)):
                row = {"model": m, "metric": "FD" if metric == "fd" else "KD x1e3"}
                for s in steps:
                    r = next(r for r in q["rows"] if r["model"] == m and r["steps"] == s)
                    row[f"{s} steps"] = r[metric] * scale
                rows.append(row)
        print(_md_table(rows, ["model", "metric"] + [f"{s} steps" for s in steps]))
        f = q["floor"]
        print(f"floor ({f['num_train_images']} train images vs the test split): FD {f['fd']:.3f}, "
              f"KD x1e3 {f['kd'] * 1e3:.3f}")
        print(f"\nimages: {', '.join(res['images'])}")
        print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items()))


def main():
    ap = argparse.ArgumentParser(description="DDPM / DiffAE / DMZ representation benchmark")
    ap.add_argument("--out", default="bench/results/representations.json")
    ap.add_argument("--workdir", default="bench/results/representations",
                    help="runs/ (checkpoints) and <dataset>/<model>.png go here")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--steps", type=int, default=0, help="train steps (0: per-dataset default: "
                    + ", ".join(f"{k} {v.steps}" for k, v in DATASETS.items()) + ")")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--num_gen", type=int, default=500, help="samples per (model, step count)")
    ap.add_argument("--gen_steps", default=",".join(map(str, GEN_STEPS)))
    ap.add_argument("--num_rec", type=int, default=128, help="test images reconstructed")
    ap.add_argument("--latent_steps", type=int, default=1500, help="DiffAE latent DDIM steps")
    ap.add_argument("--classifier_steps", type=int, default=1000,
                    help="train steps of the feature classifier (batch 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dmz_bit_usage", type=float, default=0.0,
                    help="DMZ's autoencoder.bit_usage_weight (0: the paper's loss)")
    ap.add_argument("--dmz_objective", default="hybrid", choices=("hybrid", "v"),
                    help="DMZ's objective: 'hybrid' (the paper's eps + L_vb, learned variance, "
                         "DDPM-IP, loss-aware t) or 'v' (issue 12's design sweep; DDIM sampling)")
    ap.add_argument("--fresh", action="store_true", help="retrain even if a finished run exists")
    ap.add_argument("--quick", action="store_true", help="smoke run: 60 steps, few samples")
    args = ap.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        ap.error(f"unknown dataset(s) {bad}; valid: {', '.join(DATASETS)}")
    args.gen_steps = tuple(int(s) for s in args.gen_steps.split(","))
    if args.quick:
        args.steps = args.steps or 60
        args.num_gen, args.gen_steps, args.num_rec = 64, (5, 10), 16
        args.latent_steps, args.classifier_steps = 100, 200
        args.workdir = args.workdir.rstrip("/") + "_quick"
        args.out = args.out.replace(".json", "_quick.json")
    t0 = time.time()
    log = lambda msg: print(msg, flush=True)
    results = []
    for d in datasets:  # the JSON is rewritten after each dataset, so a late failure keeps the rest
        results.append(run_dataset(d, args, log))
        meta = write_results(args, results, t0)
    print_tables(results)
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")


def write_results(args, results: list[dict], t0: float) -> dict:
    meta = {"jax": jax.__version__, "device": str(jax.devices()[0]),
            "num_devices": jax.device_count(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "args": {k: v for k, v in vars(args).items()}, "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1,
                  default=lambda o: np.asarray(o).tolist())
    return meta


if __name__ == "__main__":
    main()
