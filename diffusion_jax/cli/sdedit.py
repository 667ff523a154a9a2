"""`--mode=sdedit`: SDEdit (Meng et al. 2022) on a trained run, the realism-faithfulness sweep over t0.

    python -m diffusion_jax --workdir=runs/flow_digits --mode=sdedit [--config.sdedit.t0s='(0.3, 0.6)']

Guides are the first `sdedit.num_images` images of `sdedit.split` (the test split), corrupted by
`sdedit.guide`:
    downsample  (default) a coarse "stroke painting": each factor x factor block (4x4) replaced by its
                mean (16x16 digits become 4x4 blobs of grey), the input SDEdit is made for
    noise       + N(0, noise_std^2) per pixel, clipped to [-1, 1]
    clean       the test images themselves
Each guide is perturbed to t0 = t_min + s (t_max - t_min) for every fraction s in `sdedit.t0s`
(`sampling.sdedit`: x(t0) = alpha(t0) y + sigma(t0) z) and solved back to t_min with `sdedit.sampler`
(None: sample.sampler, with sample.kwargs) in ceil(s N) steps, N = sdedit.full_steps (None:
sample.num_steps), ending with sample.denoise_final's x0_hat step.

Writes workdir/sdedit/grid.png (rows: the originals, the guides, then one row per t0, increasing) and
workdir/sdedit/sdedit.json: per t0 the faithfulness (mean per-image L2 distance to the guide, images in
[-1, 1]), the L2 distance to the original, and, with sdedit.classifier_steps > 0, the classifier-feature
distance (Frechet distance of the penultimate features of `evaluation.train_feature_classifier`, trained
on the train split, between the edits and the test split; lower = more realistic) and the classifier
accuracy of the edits on the originals' labels.
"""
from __future__ import annotations

import json
import os
import time

from diffusion_jax.cli.experiment import CLIError, make_eps_fn, open_split, sampling_params, say
from diffusion_jax.cli.pretrained import load_run

GUIDES = ("downsample", "noise", "clean")


def make_guides(x, kind: str, *, factor: int = 4, noise_std: float = 0.5, seed: int = 0):
    """The guide images (N, H, W, C) in [-1, 1] from clean images x (see the module docstring)."""
    import numpy as np
    x = np.asarray(x, np.float32)
    if kind == "clean":
        return x
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(x + noise_std * rng.standard_normal(x.shape).astype(np.float32), -1.0, 1.0)
    if kind == "downsample":
        n, h, w, c = x.shape
        if h % factor or w % factor:
            raise CLIError(f"sdedit.factor={factor} must divide the image size {h}x{w}")
        blocks = x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
        return np.repeat(np.repeat(blocks, factor, axis=1), factor, axis=2)
    raise CLIError(f"sdedit.guide: unknown guide {kind!r}; expected one of {GUIDES}")


def _load(config, split: str, limit: int = 0) -> dict:
    from diffusion_jax.data import to_model_input
    source = open_split(config, split)
    n = len(source) if not limit else min(limit, len(source))
    return to_model_input(source.get_batch(range(n)))


def run_sdedit(config, workdir: str, step: int | None) -> dict:
    import jax
    import numpy as np
    from diffusion_jax.reports import image_grid
    from diffusion_jax.sampling.sdedit import sdedit, t0_from_fraction

    from diffusion_jax.models import family_for
    family = family_for(config)
    if not family.image_denoiser:
        raise CLIError("--mode=sdedit needs a plain diffusion model (autoencoder.kind='none'); this run's "
                       f"model family {family.name!r} (config.model.family) is not a plain image denoiser")
    exp, ckpt_step, state = load_run(config, workdir, step)
    c, s = config.sdedit, config.sample
    sampler = c.sampler or s.sampler
    kwargs = {k: s.kwargs[k] for k in s.kwargs.keys() if s.kwargs[k] is not None} if sampler == s.sampler else {}
    full_steps = int(c.full_steps or s.num_steps)
    test = _load(config, c.split, int(c.num_images))
    x = np.asarray(test["x"], np.float32)
    guides = make_guides(x, c.guide, factor=int(c.factor), noise_std=float(c.noise_std), seed=int(c.seed))
    process = exp.process
    params = sampling_params(exp, state)
    eps_fn = make_eps_fn(exp)
    model_cond = None
    if getattr(exp, "num_classes", None):
        model_cond = {"label": np.asarray(test["label"], np.int32)}
    cond = {"params": params, "model_cond": model_cond}
    fracs = sorted(float(f) for f in c.t0s)
    say(f"sdedit: {len(x)} {c.guide!r} guides from the {c.split!r} split, t0 fractions {fracs}, "
        f"{sampler!r} ({full_steps} steps over the whole range), checkpoint step {ckpt_step}")
    key = jax.random.PRNGKey(int(c.seed))
    t_start = time.perf_counter()
    rows, edits = [], []
    for frac in fracs:
        t0 = t0_from_fraction(process, frac)
        try:
            out = sdedit(eps_fn, process, guides, key, t0, sampler=sampler, full_steps=full_steps,
                         spacing=s.spacing, cond=cond, denoise_final=bool(s.denoise_final), **kwargs)
        except FloatingPointError as e:
            raise CLIError(f"sdedit at t0={t0:.4g} failed: {e}") from None
        e_x = np.asarray(jax.device_get(out.x), np.float32)
        edits.append(e_x)
        flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
        rows.append({"t0_fraction": frac, "t0": t0, "nfe": int(out.nfe),
                     "faithfulness_l2_to_guide": float(np.mean(np.linalg.norm(flat(e_x - guides), axis=1))),
                     "l2_to_original": float(np.mean(np.linalg.norm(flat(e_x - x), axis=1)))})
    numbers = {"mode": "sdedit", "step": ckpt_step, "guide": c.guide, "sampler": sampler,
               "full_steps": full_steps, "num_images": int(len(x)),
               "guide_l2_to_original": float(np.mean(np.linalg.norm((guides - x).reshape(len(x), -1), axis=1)))}
    if int(c.classifier_steps) > 0 and "label" in test:
        from diffusion_jax.evaluation import frechet_distance, train_feature_classifier
        train = _load(config, "train")
        say(f"sdedit: training the feature classifier ({int(c.classifier_steps)} steps)")
        net = train_feature_classifier(train["x"], train["label"], steps=int(c.classifier_steps),
                                       seed=int(c.seed))
        ref = _load(config, c.split)
        ref_feats = net.features(ref["x"])
        numbers["classifier_test_accuracy"] = net.accuracy(ref["x"], ref["label"])
        numbers["guide_classifier_accuracy"] = net.accuracy(guides, test["label"])
        if len(x) >= 2:
            numbers["guide_feature_distance"] = frechet_distance(net.features(guides), ref_feats)
        for row, e_x in zip(rows, edits):
            row["classifier_accuracy_on_original_labels"] = net.accuracy(e_x, test["label"])
            if len(e_x) >= 2:
                row["classifier_feature_distance"] = frechet_distance(net.features(e_x), ref_feats)
    numbers["rows"] = rows
    numbers["seconds"] = time.perf_counter() - t_start
    out_dir = os.path.join(workdir, "sdedit")
    png, js = os.path.join(out_dir, "grid.png"), os.path.join(out_dir, "sdedit.json")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        image_grid(np.concatenate([x, guides] + edits), png, ncol=len(x))
        with open(js, "w") as f:
            json.dump(numbers, f, indent=2)
        for r in rows:
            say(f"  t0={r['t0']:.3f}: L2 to guide {r['faithfulness_l2_to_guide']:.3f}"
                + (f", feature distance {r['classifier_feature_distance']:.3g}"
                   if "classifier_feature_distance" in r else ""))
        say(f"wrote {png} and {js} ({numbers['seconds']:.1f}s)")
    return {**numbers, "png": png, "json": js}
