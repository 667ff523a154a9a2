"""Diffusion-autoencoder modes: `encode`, `reconstruct`, `interpolate`, `manipulate`, and the
latent helpers the train loop and the report share.

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


def _check_images(exp: Experiment, images) -> None:
    shape = tuple(images.shape[1:])
    if shape != tuple(exp.image_shape):
        raise CLIError(f"images of shape {shape} do not fit this autoencoder, which was built "
                       f"for {tuple(exp.image_shape)} (config.data.image_size)")


def encoder_variables(exp: Experiment, state) -> dict:
    """{'params', ['batch_stats']} of the encoder the modes use: the sampling (EMA) parameters and,
    when the encoder keeps BatchNorm statistics and the EMA parameters are used, statistics
    recomputed for those parameters on (up to 2 048 images of) the train split
    (`autoencoders.recompute_batch_stats`): the running statistics in the state were gathered
    under the online weights. Cached per state on the experiment."""
    from diffusion_jax.autoencoders import recompute_batch_stats
    from diffusion_jax.training.state import has_leaves

    params = sampling_params(exp, state)
    key = ("encoder_variables", id(state), int(state.step))
    if key in exp.cache:
        return exp.cache[key]
    variables = {"params": params}
    stats = state.model_state.get("encoder", {}) if isinstance(state.model_state, dict) else {}
    if has_leaves(stats):
        variables["batch_stats"] = stats
        if params is not state.params:
            images = load_arrays(exp.config, "train", 2048)["x"]
            variables["batch_stats"] = recompute_batch_stats(exp.module, variables, images)
    exp.cache = {k: v for k, v in exp.cache.items()
                 if not (isinstance(k, tuple) and k[0] == "encoder_variables")}
    exp.cache[key] = variables
    return variables


def _encoder_fn(exp: Experiment):
    import jax
    from diffusion_jax.autoencoders import encode_fn
    if "encode" not in exp.cache:
        enc = encode_fn(exp.module)
        exp.cache["encode"] = jax.jit(lambda v, x: enc(v, x, train=False)[0].z)
    return exp.cache["encode"]


def encode_images(exp: Experiment, state, images, *, batch_size: int = 256):
    """z (N, D) numpy of `images` (N, H, W, C) with the EMA encoder in evaluation mode (BatchNorm
    statistics of `encoder_variables`, hard binary codes, Gaussian means). One compiled function
    per experiment and batch shape."""
    import numpy as np

    _check_images(exp, images)
    variables = encoder_variables(exp, state)
    fn = _encoder_fn(exp)
    out = []
    for i in range(0, len(images), batch_size):
        xb = np.asarray(images[i:i + batch_size], np.float32)
        n = len(xb)
        if n < batch_size and len(images) > batch_size:          # one compiled shape
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, 0)])
        out.append(np.asarray(fn(variables, xb))[:n])
    return np.concatenate(out)


def decoder_eps_fn(exp: Experiment, state=None):
    """eps_fn(x, t, cond={'z': z, 'params': params}) of the decoder (first C channels), for the
    inference functions of `diffusion_jax.autoencoders` (pass params=`sampling_params(exp,
    state)`). One function per experiment, so their jitted loops compile once."""
    del state
    if "decoder_eps" not in exp.cache:
        from diffusion_jax.cli.experiment import make_eps_fn
        base = make_eps_fn(exp, pair=False)
        exp.cache["decoder_eps"] = lambda x, t, cond: base(
            x, t, {"params": cond["params"], "model_cond": {"z": cond["z"]}})
    return exp.cache["decoder_eps"]


def generation_latents(exp: Experiment, n: int, seed: int, *, train_z=None, latent_sampler=None):
    """(z (n, D), description) for unconditional generation: binary latents from the prior
    (Bernoulli(1/2), or the per-bit frequencies of `train_z` with autoencoder.prior='empirical'),
    Gaussian latents from N(0, I), continuous latents from DiffAE's latent sampler when one was
    trained, else the latents of the first n training images (conditional samples)."""
    import jax
    import numpy as np
    from diffusion_jax.autoencoders import bit_frequencies, sample_binary_prior
    from diffusion_jax.cli.experiment import autoencoder_choices

    choice = autoencoder_choices(exp.config)
    key = jax.random.PRNGKey(seed)
    if choice["latent"] == "binary":
        probs, what = None, "z ~ Bernoulli(1/2) bits"
        if exp.config.autoencoder.prior == "empirical" and train_z is not None:
            probs, what = bit_frequencies(train_z), "z ~ per-bit empirical frequencies"
        return np.asarray(sample_binary_prior(key, n, choice["z_dim"], probs)), what
    if choice["latent"] == "gaussian":
        return np.asarray(jax.random.normal(key, (n, choice["z_dim"]))), "z ~ N(0, I)"
    if latent_sampler is not None:
        return np.asarray(latent_sampler.sample(key, n)), "z from the latent DDIM"
    if train_z is None:
        raise CLIError("continuous latents need a latent sampler (config.latent_sampler."
                       "num_steps > 0) or training latents to condition on")
    idx = np.arange(n) % len(train_z)
    return np.asarray(train_z)[idx], "z of training images (conditional samples)"


def _clip(exp: Experiment) -> bool:
    """config.sample.kwargs.clip_x0: DDIM with x0_hat clipped to [-1, 1] (inverted the same way)."""
    return bool(exp.config.sample.kwargs.get("clip_x0", False))


def reconstructions(exp: Experiment, state, images, z, *, steps: int, fixed_point_iters: int,
                    seed: int = 0) -> dict:
    """Reconstructions of `images` from (z, x_T = DDIM^{-1}(x0 | z)) and from (z, fresh noise),
    with their mean squared errors (per pixel, images in [-1, 1])."""
    import jax
    import numpy as np
    from diffusion_jax.autoencoders import (reconstruct, reconstruct_from_noise,
                                            stochastic_encode)
    eps_fn = decoder_eps_fn(exp)
    params = sampling_params(exp, state)
    p = exp.process
    clip = _clip(exp)
    x_t = stochastic_encode(eps_fn, p, images, z, num_steps=steps,
                            fixed_point_iters=fixed_point_iters, clip_x0=clip, params=params)
    rec = np.asarray(reconstruct(eps_fn, p, z, x_t, num_steps=steps, clip_x0=clip, params=params))
    rec_noise = np.asarray(reconstruct_from_noise(eps_fn, p, z, jax.random.PRNGKey(seed),
                                                  exp.image_shape, num_steps=steps, clip_x0=clip,
                                                  params=params))
    mse = lambda a: float(np.mean((np.clip(a, -1, 1) - images) ** 2))
    return {"x_T": np.asarray(x_t), "inverted": rec, "noise": rec_noise,
            "mse_inverted": mse(rec), "mse_noise": mse(rec_noise)}


def latent_outputs(exp: Experiment, state, images) -> dict:
    """The encoder's full evaluation output on `images` (one batch): 'z' and, where the latent has
    them, 'logits' (binary) or 'mean' / 'logvar' (Gaussian), as numpy arrays."""
    import jax
    import numpy as np
    from diffusion_jax.autoencoders import encode_fn
    _check_images(exp, images)
    if "encode_full" not in exp.cache:
        enc = encode_fn(exp.module)
        exp.cache["encode_full"] = jax.jit(
            lambda v, x: {k: v_ for k, v_ in enc(v, x, train=False)[0]._asdict().items() if v_ is not None})
    out = exp.cache["encode_full"](encoder_variables(exp, state), np.asarray(images, np.float32))
    return {k: np.asarray(v) for k, v in out.items()}


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
    from diffusion_jax.autoencoders import reconstruct_from_noise
    from diffusion_jax.autoencoders import diagnostics as D
    from diffusion_jax.cli.experiment import autoencoder_choices

    n = min(int(num), len(test["x"]))
    x0, z = np.asarray(test["x"][:n], np.float32), np.asarray(test_z[:n], np.float32)
    eps_fn, params = decoder_eps_fn(exp), sampling_params(exp, state)
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
        rec = np.concatenate([np.asarray(reconstruct_from_noise(
            eps_fn, exp.process, z[i:i + bs], jax.random.fold_in(key, 2 + i), exp.image_shape,
            num_steps=int(steps), clip_x0=_clip(exp), params=params)) for i in range(0, n, bs)])
        pred_orig, pred_rec = classifier.predict(x0), classifier.predict(np.clip(rec, -1, 1))
        out["agreement"] = float(np.mean(pred_orig == pred_rec))
        out["reconstruction_accuracy"] = float(np.mean(pred_rec == np.asarray(test["label"][:n])))
        out["classifier_test_accuracy"] = float(np.mean(pred_orig == np.asarray(test["label"][:n])))
    if autoencoder_choices(exp.config)["latent"] != "continuous":
        lat = latent_outputs(exp, state, x0)
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
    """(K, B, H, W, C) decodes along linear-in-z, spherical-in-x_T paths between pairs."""
    import numpy as np
    from diffusion_jax.autoencoders import interpolate, stochastic_encode
    eps_fn = decoder_eps_fn(exp)
    params = sampling_params(exp, state)
    p = exp.process
    clip = _clip(exp)
    xa = stochastic_encode(eps_fn, p, images_a, z_a, num_steps=steps,
                           fixed_point_iters=fixed_point_iters, clip_x0=clip, params=params)
    xb = stochastic_encode(eps_fn, p, images_b, z_b, num_steps=steps,
                           fixed_point_iters=fixed_point_iters, clip_x0=clip, params=params)
    w = np.linspace(0.0, 1.0, points)
    return np.asarray(interpolate(eps_fn, p, (z_a, xa), (z_b, xb), w, num_steps=steps,
                                  clip_x0=clip, params=params)), w


def _open(config, workdir: str, step, mode: str):
    if config.autoencoder.kind == "none":
        raise CLIError(f"--mode={mode} needs a diffusion autoencoder (config.autoencoder.kind "
                       f"'diffae' or 'dmz'); this run's kind is 'none'")
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
    from diffusion_jax.autoencoders.inference import reconstruct, stochastic_encode
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
    eps_fn = decoder_eps_fn(exp)
    params = sampling_params(exp, state)
    x_t = stochastic_encode(eps_fn, exp.process, x0, z, num_steps=r.inversion_steps,
                            fixed_point_iters=r.fixed_point_iters, clip_x0=_clip(exp), params=params)
    rows = [x0]
    scales = tuple(float(s) for s in r.manipulate_scales)
    logits = []
    for s in scales:
        zs = manipulate(jnp.asarray(z), direction, s, stats)
        x_s = np.asarray(reconstruct(eps_fn, exp.process, zs, x_t, num_steps=r.inversion_steps,
                                     clip_x0=_clip(exp), params=params))
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
