"""`--mode=fid`: FID / IS / KID / precision-recall of a run's samples against reference
statistics, as pytorch-fid and torch-fidelity compute them (`diffusion_jax.evaluation`).

    python -m diffusion_jax --workdir=runs/cifar --mode=fid \\
        --config=configs/ddpm_cifar10.py \\
        --config.quality.inception_weights=~/weights/pt_inception-2015-12-05-6726825d.pth \\
        --config.quality.reference_stats=~/stats/fid_stats_cifar10_train.npz \\
        --config.sample.sampler=ddim --config.sample.num_steps=50

Samples: config.quality.num_samples images drawn as --mode=sample draws them (config.sample's
sampler, steps, seed, EMA), quantised to uint8 like saved PNGs (round((x + 1) 127.5)), then fed
to the FID Inception as [0, 1] images (autoencoders: latents from the prior, or the training
images' latents for continuous ones, as the report's samples).

Reference: config.quality.reference_stats (.npz with mu, sigma [, features]) or, if unset, the
statistics (and features) of data.name's quality.reference_split, cached in
workdir/quality/reference_<dataset>_<split>_<resize>_<n>.npz.
Output: workdir/quality/quality_step<N>_<sampler>_<steps>.json (the metrics and how they were
made); the report shows every such file when it is rebuilt.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time

import numpy as np

from diffusion_jax.cli.experiment import (CLIError, say, make_eps_fn, sampling_params, generate,
                                          open_split, json_config)
from diffusion_jax.cli.pretrained import load_run

__all__ = ["run_quality", "evaluate_images", "make_extractor", "reference_statistics",
           "quality_rows"]


def make_extractor(config, mesh=None, progress: bool = True):
    """The Inception feature extractor config.quality describes; CLIError when the weights file
    is missing or unreadable (the message names the file, the field and where it is published)."""
    from diffusion_jax.evaluation.inception import InceptionFeatureExtractor
    from diffusion_jax.weights.diffusers import WeightsError
    q = config.quality
    try:
        return InceptionFeatureExtractor.from_file(
            q.inception_weights, batch_size=int(q.batch_size), resize=q.resize, mesh=mesh,
            progress=progress)
    except WeightsError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:          # batch size vs mesh
        raise CLIError(f"config.quality.batch_size: {e}") from None


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)).strip("-")


def reference_statistics(config, extractor, workdir: str):
    """ReferenceStatistics from config.quality.reference_stats, or computed from the dataset
    split (with features when kid / prc are asked for) and cached under workdir/quality/."""
    from diffusion_jax.evaluation import sample_quality as sq
    q = config.quality
    if q.reference_stats:
        try:
            return sq.load_statistics(q.reference_stats)
        except (OSError, ValueError) as e:
            raise CLIError(f"config.quality.reference_stats: {e}") from None
    src = open_split(config, q.reference_split)
    n = len(src) if not q.reference_num_images else min(int(q.reference_num_images), len(src))
    keep = any(m in ("kid", "prc") for m in q.metrics)
    cache = os.path.join(workdir, "quality", f"reference_{_safe(config.data.name)}_"
                         f"{_safe(q.reference_split)}_{q.resize}_{n}.npz")
    if os.path.exists(cache):
        ref = sq.load_statistics(cache)
        if ref.features is not None or not keep:
            say(f"fid: reference statistics from {cache}")
            return ref
    say(f"fid: reference statistics of {n} {config.data.name} {q.reference_split!r} images")
    bs = extractor.batch_size
    batches = (src.get_batch(np.arange(i, min(i + bs, n)))["image"] for i in range(0, n, bs))
    ref = sq.reference_from_batches(extractor, batches, keep_features=keep, total=-(-n // bs),
                                    source=f"{config.data.name} {q.reference_split!r} split")
    sq.save_statistics(cache, ref.mu, ref.sigma, ref.features)
    return ref


def to_uint8(x) -> np.ndarray:
    """Samples in [-1, 1] -> uint8 as --mode=sample saves them: round((x + 1) 127.5), clipped."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def evaluate_images(config, images: np.ndarray, workdir: str, *, mesh=None,
                    progress: bool = True, extractor=None) -> dict:
    """config.quality.metrics of uint8 `images` (N, H, W, C) against the configured reference
    (`extractor`: a prebuilt one, else `make_extractor(config, mesh, progress)`)."""
    from diffusion_jax.evaluation import sample_quality as sq
    q = config.quality
    extractor = extractor or make_extractor(config, mesh, progress)
    needs_ref = [m for m in q.metrics if m != "is"]
    ref = reference_statistics(config, extractor, workdir) if needs_ref else None
    if ("kid" in q.metrics and ref.features is not None
            and min(len(images), len(ref.features)) < q.kid_subset_size):
        raise CLIError(f"config.quality.kid_subset_size ({q.kid_subset_size}) exceeds the "
                       f"{len(images)} samples or {len(ref.features)} reference images")
    if "is" in q.metrics and len(images) < q.is_splits:
        raise CLIError(f"config.quality.is_splits ({q.is_splits}) exceeds the {len(images)} "
                       "samples")
    bs = extractor.batch_size
    batches = (images[i:i + bs] for i in range(0, len(images), bs))
    try:
        result = sq.evaluate_samples(
            extractor, batches, ref, metrics=tuple(q.metrics), total=-(-len(images) // bs),
            is_splits=int(q.is_splits), kid_subsets=int(q.kid_subsets),
            kid_subset_size=int(q.kid_subset_size), prc_k=int(q.prc_k), seed=int(q.seed))
    except ValueError as e:
        raise CLIError(f"--mode=fid: {e}") from None
    result["reference"] = ref.source if ref is not None else None
    result["resize"] = q.resize
    return result


def _latents(exp, state, n: int, seed: int):
    """(z, description) for the family's unconditional samples as the report draws them
    (`ModelFamily.generation_latents`: an autoencoder's prior samples; continuous latents without
    a latent sampler: the training images' latents, i.e. conditional samples); (None, None) for
    families whose generation needs none."""
    fam, c = exp.family, exp.config
    train_z = None
    if fam.needs_train_latents:
        from diffusion_jax.cli.autoencoder import load_arrays
        train_z = fam.encode(exp, state, load_arrays(c, "train", c.readout.num_train)["x"])
    return fam.generation_latents(exp, state, n, seed, train_z=train_z)


def run_quality(config, workdir: str, step: int | None, *, progress: bool = True) -> dict:
    """--mode=fid (see the module docstring); returns the metrics and writes them as JSON."""
    import jax
    from diffusion_jax.evaluation.inception import missing_weights_message

    q = config.quality
    w = q.inception_weights
    if not w or not os.path.isfile(os.path.expanduser(w)):  # fail fast, before sampling
        raise CLIError(missing_weights_message(w))
    exp, ckpt_step, state = load_run(config, workdir, step)   # a checkpoint, or model.init_from
    s = config.sample
    n = int(q.num_samples)
    z, latents = _latents(exp, state, n, int(s.seed))
    say(f"fid: sampling {n} images with {s.sampler!r} ({s.num_steps} steps) from checkpoint "
        f"step {ckpt_step}" + (f"; {latents}" if latents else ""))
    t0 = time.perf_counter()
    try:
        x, _ = generate(exp, make_eps_fn(exp), sampling_params(exp, state), n, int(s.seed), z=z)
    except FloatingPointError as e:
        raise CLIError(f"sampling from checkpoint step {ckpt_step} failed: {e}") from None
    t_sample = time.perf_counter() - t0
    result = evaluate_images(config, to_uint8(x), workdir, mesh=exp.mesh, progress=progress)
    result.update(step=ckpt_step, latents=latents, sampler=s.sampler, num_steps=int(s.num_steps),
                  use_ema=bool(s.use_ema), seed=int(s.seed), sample_seconds=t_sample,
                  seconds=time.perf_counter() - t0,
                  quality={k: v for k, v in json_config(config)["quality"].items()})
    out = os.path.join(workdir, "quality",
                       f"quality_step{ckpt_step}_{_safe(s.sampler)}_{int(s.num_steps)}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        shown = {k: result[k] for k in ("fid", "is_mean", "kid_mean", "precision", "recall")
                 if k in result}
        say("fid: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + f" -> {out}")
    return {"mode": "fid", "json": out, **result}


def quality_rows(workdir: str) -> list[dict]:
    """One table row per workdir/quality/quality_*.json (for the report); [] if none."""
    rows = []
    for path in sorted(glob.glob(os.path.join(workdir, "quality", "quality_*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        rows.append({"step": r.get("step"), "sampler": r.get("sampler"),
                     "steps": r.get("num_steps"), "samples": r.get("num_samples"),
                     "FID": r.get("fid"), "IS": r.get("is_mean"), "KID": r.get("kid_mean"),
                     "precision": r.get("precision"), "recall": r.get("recall"),
                     "reference": os.path.basename(str(r.get("reference")))})
    return rows
