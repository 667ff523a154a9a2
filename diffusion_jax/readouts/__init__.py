"""Representation readouts of a denoiser (DDAE, Xiang et al. 2023): pooled block features of the
network on noised inputs, scored by linear probes and k-NN.

    f = features(module, params, x, timesteps, ['up_1_0'], process=p, key=k)   # {block: (T, B, C)}
    F = extract_features(module, params, images, ts, blocks, process=p, batch_size=64, key=k)
    probe = fit_linear_probe(F['up_1_0'][0], labels)          # 5-fold CV over (lr, weight decay)
    probe.accuracy(x_test, y_test); knn_accuracy(x_tr, y_tr, x_te, y_te, k=20)
    res = probe_sweep(module, params, xtr, ytr, xte, yte, process=p, timesteps=ts, key=k)
    res.best('linear')                                         # {'t', 'block', 'accuracy', ...}

    where          what
    features.py    features (one vmapped call per t grid), extract_features (batched, numpy),
                   draw_noise; t is the process' continuous time (DDPM step n: t = (n + 1) / N)
    probe.py       fit_linear_probe / LinearProbe (AdamW + cosine logistic regression, grid x folds
                   vmapped), probe_accuracy, fit_linear_regression / RidgeRegression, r2_score
    knn.py         knn_accuracy / knn_predict (weighted cosine vote, chunked, jitted)
    sweep.py       probe_sweep -> SweepResult (accuracy grid over (t, block), best cell, JSON)
    alignment.py   repa_loss: REPA, a denoising loss + alignment of a projected block with a frozen
                   encoder's features (Yu et al. 2025)

Sits above `networks` (and beside `autoencoders`): for a diffusion-autoencoder decoder pass the
decoder module, its own params and cond={'z': z}. Heat maps: `reports.plots.probe_heatmap`.
"""
from diffusion_jax.readouts.features import (POOLS, check_blocks, check_timesteps, draw_noise,
                                             extract_features, features)
from diffusion_jax.readouts.knn import METRICS, knn_accuracy, knn_predict
from diffusion_jax.readouts.probe import (LinearProbe, RidgeRegression, fit_linear_probe,
                                          fit_linear_regression, probe_accuracy, r2_score)
from diffusion_jax.readouts.sweep import METHODS, SweepResult, probe_sweep
from diffusion_jax.readouts.alignment import repa_loss, repa_similarity

__all__ = [
    "POOLS", "METRICS", "METHODS", "features", "extract_features", "draw_noise", "check_blocks",
    "check_timesteps", "LinearProbe", "RidgeRegression", "fit_linear_probe", "probe_accuracy",
    "fit_linear_regression", "r2_score", "knn_accuracy", "knn_predict", "SweepResult",
    "probe_sweep", "repa_loss", "repa_similarity",
]
