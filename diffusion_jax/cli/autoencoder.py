"""The modes of model families with an encoder (`family.has_encoder`: DiffAE, DMZ): `encode`,
`reconstruct`, `interpolate`, `manipulate`, the report's latent diagnostics, and thin wrappers of
the family's encoder methods (`diffusion_jax.models`) under their older names.

    python -m diffusion_jax --workdir=runs/x --mode=encode        # latents/<split>_step<N>.npz
    python -m diffusion_jax --workdir=runs/x --mode=reconstruct   # reconstructions/step<N>.png/json
    python -m diffusion_jax --workdir=runs/x --mode=interpolate   # interpolations/step<N>.png/json
    python -m diffusion_jax --workdir=runs/x --mode=manipulate    # manipulations/step<N>.png/json

Each reads the newest checkpoint (or --step), uses the EMA parameters and the encoder's BatchNorm
statistics recomputed for them (`encoder_variables`), and writes its PNG / JSON / NPZ next to the
run. The images are the first `report.num_reconstructions` of `config.eval.split`.
"""
from __future__ import annotations

import json
import os
import time

from diffusion_jax.cli.experiment import (
    CLIError, Experiment, build_experiment, has_checkpoints, missing_checkpoint, open_split,
    image_shape_of, restore_checkpoint, sampling_params, say)

__all__ = ["load_arrays", "encode_images", "encoder_variables", "latent_outputs", "latent_diagnostics",
           "generation_latents", "decoder_eps_fn",
           "reconstructions", "interpolations", "run_encode", "run_reconstruct",
           "run_interpolate", "run_manipulate", "AE_MODES"]

AE_MODES = ("encode", "reconstruct", "interpolate", "manipulate")


# ------------------------------------------------------------------------------- helpers
def load_arrays(config, split: str, limit: int = 0) -> dict:
    """A whole split (or its first `limit` examples) as arrays: 'x' float32 (N, H, W, C) in
    [-1, 1], 'label' int32 (N,) and 'factors' {name: (N,)} when the dataset has them."""
    from diffusion_jax.data import to_model_input
    source = open_split(config, split)
    n = len(source) if not limit else min(limit, len(source))
    return to_model_input(source.get_batch(range(n)))


def encoder_variables(exp: Experiment, state) -> dict:
    """{'params', ['batch_stats']} of the encoder the modes use (the sampling (EMA) parameters,
    BatchNorm statistics recomputed for them): `exp.family.encoder_variables`."""
    return exp.family.encoder_variables(exp, state)


def encode_images(exp: Experiment, state, images, *, batch_size: int = 256):
    """z (N, D) numpy of `images` (N, H, W, C) with the EMA encoder in evaluation mode
    (`exp.family.encode`)."""
    return exp.family.encode(exp, state, images, batch_size=batch_size)


def decoder_eps_fn(exp: Experiment, state=None):
    """eps_fn(x, t, cond={'z': z, 'params': params}) of the decoder (`exp.family.decoder_eps_fn`)."""
    del state
    return exp.family.decoder_eps_fn(exp)


def generation_latents(exp: Experiment, n: int, seed: int, *, train_z=None, latent_sampler=None):
    """(z (n, D), description) for unconditional generation (`exp.family.generation_latents`)."""
    return exp.family.generation_latents(exp, None, n, seed, train_z=train_z,
                                         latent_sampler=latent_sampler)


def reconstructions(exp: Experiment, state, images, z, *, steps: int, fixed_point_iters: int,
                    seed: int = 0) -> dict:
    """Reconstructions from (z, inverted x_T) and from (z, fresh noise) with their MSEs
    (`exp.family.reconstruct`)."""
    return exp.family.reconstruct(exp, state, images, z, steps=steps,
                                  fixed_point_iters=fixed_point_iters, seed=seed)


def latent_outputs(exp: Experiment, state, images) -> dict:
    """The encoder's evaluation output on `images` (`exp.family.latent_outputs`)."""
    return exp.family.latent_outputs(exp, state, images)


def latent_diagnostics(exp: Experiment, state, train: dict, test: dict, test_z, *, num: int = 256,
                       steps: int = 50, seed: int = 0, classifier=None, classifier_steps: int = 1500,
                       train_metrics=None, log=say) -> dict:
    """Does z carry the semantics? On the first `num` test images:

    z_dependence   eps MSE with the image's own z and with another image's z, and the share of the
                   denoiser's output that z moves, per t (`autoencoders.diagnostics.z_dependence`)
    agreement      the fraction of (z, fresh noise) reconstructions (DDIM, `steps`) to which a
                   classifier trained on the labelled train split (the `evaluation` feature
                   classifier, or `classifier`) gives the class it gives the original; also the
                   reconstructions' accuracy on the true labels
    codes          binary latents: `code_usage` (dead bits, per-bit entropy, distinct codes) and
                   I(x; z) (`mutual_information`, bits; at most log2 num)
    gradients      the last logged 'grad_norm/encoder' and 'grad_norm/decoder' (train_metrics: the
                   rows of metrics.jsonl)
    """
    import jax
    import numpy as np
    from diffusion_jax.autoencoders import diagnostics as D

    fam = exp.family
    n = min(int(num), len(test["x"]))
    x0, z = np.asarray(test["x"][:n], np.float32), np.asarray(test_z[:n], np.float32)
    eps_fn, params = fam.decoder_eps_fn(exp), sampling_params(exp, state)
    key = jax.random.PRNGKey(seed)
    out: dict = {"num_images": n}
    out["z_dependence"] = D.z_dependence(eps_fn, exp.process, x0, z, jax.random.fold_in(key, 1),
                                         params=params)
    labels = train.get("label")
    if labels is not None and len(np.unique(labels)) > 1:
        from diffusion_jax.evaluation import train_feature_classifier
        if classifier is None:
            log(f"diagnostics: training the feature classifier on {len(train['x'])} train images")
            classifier = train_feature_classifier(train["x"], labels, steps=int(classifier_steps),
                                                  num_classes=int(np.max(labels)) + 1, seed=seed)
        log(f"diagnostics: decoding {n} test latents from fresh noise ({steps} DDIM steps)")
        bs = int(exp.config.sample.batch_size)
        rec = np.concatenate([fam.decode(exp, state, z[i:i + bs], key=jax.random.fold_in(key, 2 + i),
                                         steps=int(steps)) for i in range(0, n, bs)])
        pred_orig, pred_rec = classifier.predict(x0), classifier.predict(np.clip(rec, -1, 1))
        out["agreement"] = float(np.mean(pred_orig == pred_rec))
        out["reconstruction_accuracy"] = float(np.mean(pred_rec == np.asarray(test["label"][:n])))
        out["classifier_test_accuracy"] = float(np.mean(pred_orig == np.asarray(test["label"][:n])))
    lat = fam.latent_outputs(exp, state, x0)
    if lat.get("logits") is not None or lat.get("mean") is not None:     # a stochastic latent
        from diffusion_jax.autoencoders import LatentOutput
        fields = {k: lat.get(k) for k in ("logits", "mean", "logvar")}
        out["mutual_information_bits"] = D.mutual_information(LatentOutput(lat["z"], **fields),
                                                               jax.random.fold_in(key, 3))
        if lat.get("logits") is not None:
            usage = D.code_usage(lat["z"])
            out["codes"] = {k: usage[k] for k in ("bits", "dead_bits", "low_entropy_bits",
                                                  "mean_entropy", "distinct_codes", "code_entropy")}
    rows = [m for m in (train_metrics or []) if "grad_norm/encoder" in m]
    if rows:
        out["grad_norm_encoder"] = float(rows[-1]["grad_norm/encoder"])
        out["grad_norm_decoder"] = float(rows[-1]["grad_norm/decoder"])
    return out


def interpolations(exp: Experiment, state, images_a, images_b, z_a, z_b, *, steps: int,
                   points: int, fixed_point_iters: int):
    """(K, B, H, W, C) decodes along linear-in-z, spherical-in-x_T paths between pairs
    (`exp.family.interpolate`), and the K weights."""
    return exp.family.interpolate(exp, state, images_a, images_b, z_a, z_b, steps=steps,
                                  points=points, fixed_point_iters=fixed_point_iters)


def _open(config, workdir: str, step, mode: str):
    from diffusion_jax.models import family_for
    family = family_for(config)
    if not family.has_encoder:
        raise CLIError(f"--mode={mode} needs a diffusion autoencoder (or another model family "
                       f"with an encoder: config.model.family, config.autoencoder.kind 'diffae' or "
                       f"'dmz'); this run's family {family.name!r} has none")
    if not has_checkpoints(workdir):
        raise missing_checkpoint(workdir)
    split = config.eval.split
    source = open_split(config, split)
    exp = build_experiment(config, image_shape_of(source))
    ckpt_step, state = restore_checkpoint(exp, workdir, step)
    return exp, ckpt_step, state, split


def _write_json(path: str, record: dict) -> None:
    import jax
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)


# --------------------------------------------------------------------------------- modes
def run_encode(config, workdir: str, step=None) -> dict:
    """Latents of every image of config.eval.split (and of the train split) -> NPZ + JSON."""
    import numpy as np
    exp, ckpt_step, state, split = _open(config, workdir, step, "encode")
    out_dir = os.path.join(workdir, "latents")
    os.makedirs(out_dir, exist_ok=True)
    record = {"mode": "encode", "step": ckpt_step, "files": {}}
    t0 = time.perf_counter()
    for sp in dict.fromkeys(("train", split)):
        arr = load_arrays(config, sp)
        z = encode_images(exp, state, arr["x"])
        path = os.path.join(out_dir, f"{sp}_step{ckpt_step}.npz")
        extra = {f"factor_{k}": v for k, v in (arr.get("factors") or {}).items()}
        np.savez_compressed(path, z=z, label=arr["label"], **extra)
        record["files"][sp] = path
        record[f"{sp}_num"] = int(len(z))
        say(f"encoded {len(z)} {sp!r} images to {path} (z {z.shape[1]}-d)")
    record["seconds"] = time.perf_counter() - t0
    _write_json(os.path.join(out_dir, f"step{ckpt_step}.json"), record)
    return record


def run_reconstruct(config, workdir: str, step=None) -> dict:
    from diffusion_jax.reports import image_grid
    import numpy as np
    exp, ckpt_step, state, split = _open(config, workdir, step, "reconstruct")
    r = config.report
    arr = load_arrays(config, split, r.num_reconstructions)
    z = encode_images(exp, state, arr["x"])
    rec = reconstructions(exp, state, arr["x"], z, steps=r.inversion_steps,
                          fixed_point_iters=r.fixed_point_iters)
    out_dir = os.path.join(workdir, "reconstructions")
    png = os.path.join(out_dir, f"step{ckpt_step}.png")
    rows = np.concatenate([arr["x"], rec["inverted"], rec["noise"]])
    image_grid(rows, png, ncol=len(arr["x"]))
    record = {"mode": "reconstruct", "step": ckpt_step, "split": split, "png": png,
              "rows": ["originals", "from (z, inverted x_T)", "from (z, fresh noise)"],
              "mse_inverted": rec["mse_inverted"], "mse_noise": rec["mse_noise"],
              "inversion_steps": r.inversion_steps, "fixed_point_iters": r.fixed_point_iters}
    _write_json(os.path.join(out_dir, f"step{ckpt_step}.json"), record)
    say(f"wrote {png}: MSE from inverted x_T {rec['mse_inverted']:.4g}, from fresh noise "
        f"{rec['mse_noise']:.4g}")
    return record


def run_interpolate(config, workdir: str, step=None) -> dict:
    import numpy as np
    from diffusion_jax.reports import image_grid
    exp, ckpt_step, state, split = _open(config, workdir, step, "interpolate")
    r = config.report
    n = r.num_interpolations
    arr = load_arrays(config, split, 2 * n)
    if len(arr["x"]) < 2 * n:
        raise CLIError(f"split {split!r} has {len(arr['x'])} images; interpolation needs {2 * n}")
    z = encode_images(exp, state, arr["x"])
    path, w = interpolations(exp, state, arr["x"][:n], arr["x"][n:], z[:n], z[n:],
                             steps=r.inversion_steps, points=r.interpolation_points,
                             fixed_point_iters=r.fixed_point_iters)
    out_dir = os.path.join(workdir, "interpolations")
    png = os.path.join(out_dir, f"step{ckpt_step}.png")
    grid = np.transpose(path, (1, 0, 2, 3, 4)).reshape(-1, *path.shape[2:])   # one row per pair
    image_grid(grid, png, ncol=len(w))
    record = {"mode": "interpolate", "step": ckpt_step, "png": png, "weights": w.tolist(),
              "pairs": n}
    _write_json(os.path.join(out_dir, f"step{ckpt_step}.json"), record)
    say(f"wrote {png} ({n} pairs x {len(w)} points: linear in z, spherical in x_T)")
    return record


def run_manipulate(config, workdir: str, step=None) -> dict:
    """DiffAE's manipulation: a linear classifier of the target attribute on normalised training
    latents gives w; test images move along z + s sqrt(D) w / ||w|| and are decoded with their own
    inverted x_T."""
    import jax.numpy as jnp
    import numpy as np
    from diffusion_jax.autoencoders.manipulation import fit_linear_classifier, manipulate
    from diffusion_jax.reports import image_grid
    exp, ckpt_step, state, split = _open(config, workdir, step, "manipulate")
    r = config.report
    train = load_arrays(config, "train")
    labels = train.get("label")
    if labels is None or np.all(labels == labels[0]):
        raise CLIError(f"dataset {config.data.name!r} has no attribute labels to train the "
                       f"attribute classifier that manipulation needs")
    target = int(r.manipulate_target)
    classes = np.unique(labels)
    if target not in classes:
        raise CLIError(f"report.manipulate_target={target} is not a label of "
                       f"{config.data.name!r} (labels {classes.min()}..{classes.max()})")
    z_train = encode_images(exp, state, train["x"])
    clf = fit_linear_classifier(z_train, labels == target)      # on normalised z (DiffAE)
    direction, stats = clf.directions, clf.stats
    train_acc = float(np.mean((np.asarray(clf.logits(z_train)) > 0) == (labels == target)))
    test = load_arrays(config, split, r.num_reconstructions)
    keep = test["label"] != target
    x0 = test["x"][keep][:8]
    z = encode_images(exp, state, x0)
    x_t = exp.family.invert(exp, state, x0, z, steps=r.inversion_steps,
                            fixed_point_iters=r.fixed_point_iters)
    rows = [x0]
    scales = tuple(float(s) for s in r.manipulate_scales)
    logits = []
    for s in scales:
        zs = manipulate(jnp.asarray(z), direction, s, stats)
        x_s = exp.family.decode(exp, state, zs, x_T=x_t, steps=r.inversion_steps)
        rows.append(x_s)
        logits.append(float(np.mean(np.asarray(clf.logits(encode_images(exp, state, x_s))))))
    out_dir = os.path.join(workdir, "manipulations")
    png = os.path.join(out_dir, f"step{ckpt_step}_target{target}.png")
    image_grid(np.concatenate(rows), png, ncol=len(x0))
    record = {"mode": "manipulate", "step": ckpt_step, "target": target, "png": png,
              "scales": list(scales), "rows": ["originals"] + [f"scale {s}" for s in scales],
              "classifier_train_accuracy": train_acc,
              "mean_logit_of_re_encoded_images": logits}
    _write_json(os.path.join(out_dir, f"step{ckpt_step}_target{target}.json"), record)
    say(f"wrote {png} (towards label {target}, scales {scales})")
    return record
