"""Zero-shot classification by a class-conditional diffusion model (Li et al. 2023) on the embedded
digits, next to the linear probe and k-NN of the same model's DDAE readout and of the pixels.

    python bench/diffusion_classifier.py [--out bench/results/diffusion_classifier.json]
        [--steps 1500] [--samples 8,32,128] [--workdir bench/results/diffusion_classifier]
        [--dataset digits/16 | shapes/32 | glyphs/32] [--num_test 1000]

digits/16 (the default) uses the network below; shapes/32 and glyphs/32 use the DDPM of
`bench/representations.py` (UNet ch 16, hybrid objective, 800 steps by default) with the class label
(shape / glyph) as condition, so the zero-shot accuracy sits next to that bench's readouts.

The model is the README's default network (UNet ch 32, ch_mult (1, 2), cosine process, v
prediction, configs/default.py) without the encoder and with the digit label as its condition
(model.num_classes = 10), trained through the command line's code path for --steps steps. Each
test digit x is then classified by argmin_c E_{t, eps} w(t) ||eps - eps_hat(x_t, t, c)||^2 with the
same (t, eps) draws for the ten classes (`likelihood.diffusion_classify`), for each number of draws
per image and both weightings ('none': the paper's uniform-t eps error; 'elbo'). Its cost is
10 x draws network evaluations per image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import cli  # noqa: E402
from diffusion_jax import config as cv  # noqa: E402
from diffusion_jax.cli.autoencoder import load_arrays  # noqa: E402
from diffusion_jax.cli.experiment import (build_experiment, image_shape_of, make_eps_fn,  # noqa: E402
                                          open_split, restore_checkpoint, sampling_params)
from diffusion_jax.cli.probe import probe_table  # noqa: E402
from diffusion_jax.likelihood import diffusion_classify  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(steps: int):
    c = cv.load_file(os.path.join(ROOT, "configs", "default.py"))
    c.autoencoder.kind = "none"
    c.autoencoder.pool = "mean"
    c.latent_sampler.num_steps = 0
    c.model.num_classes = 10
    c.train.num_steps, c.train.sample_every, c.train.checkpoint_every = steps, 0, 0
    c.report.enabled = False
    c.readout.timesteps = (0.02, 0.1, 0.3)
    cv.validate(c)
    return c


NUM_CLASSES = {"digits/16": 10, "shapes/32": 4, "glyphs/32": 6}


def make_dataset_config(dataset: str, steps: int | None):
    """The representations bench's DDPM on `dataset`, conditioned on its class label."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import representations as rb
    c = rb.make_config(dataset, "ddpm", steps=steps or rb.DATASETS[dataset].steps)
    c.model.num_classes = NUM_CLASSES[dataset]
    cv.validate(c)
    return c


def model_cond(labels, cond):
    """cond_fn for the command line's eps_fn: the parameters travel in cond (compiled once)."""
    return {"params": cond["params"], "model_cond": {"label": labels}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default: bench/results/diffusion_classifier"
                    "[_<dataset>].json")
    ap.add_argument("--workdir", default=None, help="default: bench/results/diffusion_classifier"
                    "[_<dataset>]")
    ap.add_argument("--steps", type=int, default=None, help="default: 1500 (digits), 800 (others)")
    ap.add_argument("--dataset", default="digits/16", choices=tuple(NUM_CLASSES))
    ap.add_argument("--num_test", type=int, default=1000, help="test images (and 4x train for "
                    "the probes) outside digits")
    ap.add_argument("--samples", default="16")
    ap.add_argument("--batch", type=int, default=99, help="test images per classification call")
    args = ap.parse_args(argv)
    k = NUM_CLASSES[args.dataset]
    tag = "" if args.dataset == "digits/16" else "_" + args.dataset.replace("/", "_")
    base = os.path.join(ROOT, "bench", "results", "diffusion_classifier" + tag)
    args.out, args.workdir = args.out or base + ".json", args.workdir or base
    if args.dataset == "digits/16":
        config = make_config(args.steps or 1500)
    else:
        config = make_dataset_config(args.dataset, args.steps)
        config.readout.num_train, config.readout.num_test = 4 * args.num_test, args.num_test
    t0 = time.perf_counter()
    cli.execute(config, args.workdir, "train", progress=False)
    train_seconds = time.perf_counter() - t0
    exp = build_experiment(config, image_shape_of(open_split(config, "train")))
    step, state = restore_checkpoint(exp, args.workdir, None)
    train = load_arrays(config, "train", config.readout.num_train)
    test = load_arrays(config, "test", config.readout.num_test)
    params = sampling_params(exp, state)
    eps_fn = make_eps_fn(exp, pair=False)        # eps only (a learned-variance net: its first C channels)
    rows = []
    for weighting in ("none", "elbo"):
        for s in (int(v) for v in args.samples.split(",")):
            t1 = time.perf_counter()
            preds = []
            for i in range(0, len(test["x"]), args.batch):
                p, _ = diffusion_classify(eps_fn, exp.process, test["x"][i:i + args.batch],
                                          jax.random.PRNGKey(i), num_classes=k, num_samples=s,
                                          weighting=weighting, cond={"params": params}, cond_fn=model_cond)
                preds.append(np.asarray(p))
            acc = float(np.mean(np.concatenate(preds) == test["label"]))
            sec = time.perf_counter() - t1
            rows.append({"features": f"diffusion classifier ({weighting}, {s} draws x {k} classes)",
                         "linear": acc, "seconds": sec, "evals_per_image": k * s})
            print(f"diffusion classifier, weighting {weighting}, {s} draws: accuracy {acc:.3f} ({sec:.0f} s)",
                  flush=True)
    table = probe_table(exp, state, train, test, key=jax.random.PRNGKey(3), log=print)
    rows = table["rows"] + rows
    record = {"dataset": args.dataset, "step": step, "train_seconds": train_seconds, "rows": rows, "readout_best": table["best"],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print("| features | linear (or zero-shot) | k-NN |\n|---|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['linear']:.3f} | {r.get('knn', float('nan')):.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
