"""`--mode=probe`: how good are the learned representations? One table, one heat map.

Feature sets, each scored on the dataset's labels by a linear probe (logistic regression, 5-fold
CV over learning rate and weight decay, `readouts.fit_linear_probe`) and weighted k-NN, and - for
datasets with generative factors (shapes) - per factor: linear-probe accuracy of the discrete
factors (shape, color) and ridge R^2 of the continuous ones (scale, pos_x, pos_y; rotation is
left out: it is defined only up to each shape's symmetry):

    raw pixels          the flattened image
    PCA-d               its first d principal components (d = the latent size, or 64)
    readout (t, block)  DDAE: the denoiser's pooled block output at noise level t; the best cell of
                        the (config.readout.timesteps x blocks) sweep, chosen on validation accuracy
                        (for an autoencoder the decoder is conditioned on the image's own z);
                        pooled as config.readout.pool (mean, max or both)
    readout (t, all)    every block's pooled features concatenated at the best t
                        (config.readout.concat)
    latent z            the autoencoder's latent (DiffAE z_sem, DMZ bits)

Writes workdir/probe/step<N>.json, step<N>_heatmap.png (sweep) and returns the rows.
"""
from __future__ import annotations

import json
import os
import time

from diffusion_jax.cli.experiment import (
    build_experiment, has_checkpoints, missing_checkpoint, open_split, image_shape_of,
    restore_checkpoint, sampling_params, say)
from diffusion_jax.cli.pretrained import has_weights

__all__ = ["pca_features", "score_features", "probe_table", "run_probe"]

CONTINUOUS_FACTORS = ("scale", "pos_x", "pos_y")
DISCRETE_FACTORS = ("shape", "color", "glyph", "background")


def pca_features(x_train, x_test, dim: int):
    """Projections of (N, D) train / test data on the train set's first `dim` principal axes."""
    import numpy as np
    a, b = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    mean = a.mean(0)
    _, _, vt = np.linalg.svd(a - mean, full_matrices=False)
    v = vt[:min(dim, vt.shape[0])].T
    return ((a - mean) @ v).astype(np.float32), ((b - mean) @ v).astype(np.float32)


def score_features(f_train, f_test, train: dict, test: dict, *, knn_k: int = 20) -> dict:
    """Linear-probe and k-NN accuracy on 'label'; per-factor scores when the data has factors."""
    import numpy as np
    from diffusion_jax.readouts import (fit_linear_probe, fit_linear_regression, knn_accuracy)
    f_train = np.asarray(f_train, np.float32).reshape(len(f_train), -1)
    f_test = np.asarray(f_test, np.float32).reshape(len(f_test), -1)
    ytr, yte = np.asarray(train["label"]), np.asarray(test["label"])
    k = int(max(ytr.max(), yte.max())) + 1
    probe = fit_linear_probe(f_train, ytr, num_classes=k)
    row = {"dim": int(f_train.shape[1]), "linear": probe.accuracy(f_test, yte),
           "knn": float(knn_accuracy(f_train, ytr, f_test, yte, k=knn_k, num_classes=k))}
    factors_tr, factors_te = train.get("factors"), test.get("factors")
    if factors_tr:
        for name in DISCRETE_FACTORS:
            if name in factors_tr and name != _label_factor(train):
                p = fit_linear_probe(f_train, factors_tr[name])
                row[f"{name} acc"] = p.accuracy(f_test, factors_te[name])
        for name in CONTINUOUS_FACTORS:
            if name in factors_tr:
                reg = fit_linear_regression(f_train, factors_tr[name])
                row[f"{name} R2"] = reg.r2(f_test, factors_te[name])
    return row


def _label_factor(arrays: dict):
    """The factor the 'label' field duplicates (shapes: 'shape'), so it is not scored twice."""
    import numpy as np
    f = arrays.get("factors") or {}
    for name in DISCRETE_FACTORS:
        if name in f and np.array_equal(np.asarray(f[name]), np.asarray(arrays["label"])):
            return name
    return None


def probe_table(exp, state, train: dict, test: dict, *, key, train_z=None, test_z=None,
                heatmap: str | None = None, log=say) -> dict:
    """{'rows': [...], 'sweep': SweepResult-as-dict, 'best': {...}} for the feature sets above."""
    import jax
    import numpy as np
    from diffusion_jax.readouts import extract_features, probe_sweep
    from diffusion_jax.reports.plots import probe_heatmap

    cfg = exp.config
    xtr = np.asarray(train["x"]).reshape(len(train["x"]), -1)
    xte = np.asarray(test["x"]).reshape(len(test["x"]), -1)
    rows = []
    t0 = time.perf_counter()

    def add(name, ftr, fte):
        row = {"features": name, **score_features(ftr, fte, train, test, knn_k=cfg.readout.knn_k)}
        rows.append(row)
        log(f"probe: {name:<28s} linear {row['linear']:.3f}  k-NN {row['knn']:.3f}  "
            f"({time.perf_counter() - t0:.0f}s)")

    add("raw pixels", xtr, xte)
    dim = int(train_z.shape[1]) if train_z is not None else 64
    add(f"PCA-{dim}", *pca_features(xtr, xte, dim))

    # the network whose blocks are read (an autoencoder's decoder, given the images' own z)
    module, params, cond_tr = exp.family.readout_network(exp, sampling_params(exp, state), train_z)
    cond_te = exp.family.readout_network(exp, sampling_params(exp, state), test_z)[2]
    blocks = tuple(cfg.readout.blocks) or None
    pool = cfg.readout.pool
    sweep = probe_sweep(module, params, train["x"], train["label"], test["x"], test["label"],
                        process=exp.process, timesteps=tuple(cfg.readout.timesteps),
                        blocks=blocks, key=key, methods=("linear",), cond_train=cond_tr,
                        cond_test=cond_te, pool=pool)
    best = sweep.best("linear", on="val")
    log(f"probe: readout sweep over {len(sweep.timesteps)} t x {len(sweep.blocks)} blocks; best "
        f"(by validation) t={best['t']:.3g} block {best['block']} ({time.perf_counter() - t0:.0f}s)")
    read = list(sweep.blocks) if cfg.readout.concat else [best["block"]]
    feats = [extract_features(module, params, d["x"], (best["t"],), tuple(read),
                              process=exp.process, batch_size=64, pool=pool,
                              key=jax.random.fold_in(key, i), cond=c)
             for i, (d, c) in enumerate(((train, cond_tr), (test, cond_te)))]
    given = " (given z)" if cond_tr is not None else ""
    pooled = "" if pool == "gap" else f" {pool}"
    name = f"readout t={best['t']:.3g} {best['block']}{pooled}{given}"
    add(name, feats[0][best["block"]][0], feats[1][best["block"]][0])
    if cfg.readout.concat and len(read) > 1:
        cat = [np.concatenate([f[b][0] for b in read], axis=-1) for f in feats]
        add(f"readout t={best['t']:.3g} all {len(read)} blocks{pooled}{given}", *cat)
    if train_z is not None:
        add("latent z", train_z, test_z)
    if heatmap:
        probe_heatmap(sweep, path=heatmap, method="linear",
                      title="linear-probe test accuracy by noise level t and block")
    return {"rows": rows, "sweep": sweep.to_dict(), "best": best}


def run_probe(config, workdir: str, step=None) -> dict:
    import jax
    import numpy as np
    from diffusion_jax.cli.autoencoder import load_arrays
    if not has_weights(config, workdir):           # a checkpoint, or model.init_from
        raise missing_checkpoint(workdir)
    source = open_split(config, "train")
    exp = build_experiment(config, image_shape_of(source))
    ckpt_step, state = restore_checkpoint(exp, workdir, step)
    r = config.readout
    train = load_arrays(config, "train", r.num_train)
    test = load_arrays(config, config.eval.split, r.num_test)
    train_z = test_z = None
    if exp.family.has_encoder:
        train_z = exp.family.encode(exp, state, train["x"])
        test_z = exp.family.encode(exp, state, test["x"])
    out_dir = os.path.join(workdir, "probe")
    os.makedirs(out_dir, exist_ok=True)
    heat = os.path.join(out_dir, f"step{ckpt_step}_heatmap.png")
    table = probe_table(exp, state, train, test, key=jax.random.PRNGKey(config.train.seed + 3),
                        train_z=train_z, test_z=test_z, heatmap=heat)
    record = {"mode": "probe", "step": ckpt_step, "num_train": len(train["x"]),
              "num_test": len(test["x"]), "heatmap": heat, **table}
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, f"step{ckpt_step}.json"), "w") as f:
            json.dump(record, f, indent=2, default=lambda o: np.asarray(o).tolist())
    say(f"wrote {os.path.join(out_dir, f'step{ckpt_step}.json')} and {heat}")
    return record
