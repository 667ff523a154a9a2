"""Denoising diffusion GAN at 4 NFE vs the library's pixel DDPM at few steps, on the embedded digits (issue 15).

    python bench/ddgan_vs_ddpm.py                                   # trains both runs (CPU: ~1 h)
    python bench/ddgan_vs_ddpm.py --ddgan_run runs/ddgan_digits --ddpm_run runs/vp_digits

The runs: configs/ddgan_digits.py (DDGAN, T = 4) and configs/flow_digits.py:vp (the embedded default's
UNet trained as a pixel diffusion model: cosine VP, v prediction, 1 500 steps; its own sampler is DDIM
50 steps); a missing --*_run is trained here through the command line (report off) under --out.

For each sampler row: `--num_samples` samples from the run's EMA parameters by `family.generate`
(the DDPM with the sampler and steps of the row; NFE counts the final x0_hat step of
sample.denoise_final), the classifier-feature distance (Frechet distance of the penultimate features of
`diffusion_jax.evaluation`'s small CNN, trained once on the train split, to the test split's; the floor
is the same distance for as many train images), the largest predicted-class share (mode collapse shows
as a share far above 0.1) and the sampling time per sample (wall clock of the whole generate call
after a warm-up call of one batch, i.e. compilation excluded). Writes a table, result.json and one
PNG grid per row under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_run(config_arg: str, workdir: str) -> None:
    cmd = [sys.executable, "-m", "diffusion_jax", f"--config={config_arg}", f"--workdir={workdir}",
           "--config.report.enabled=False", "--config.train.sample_every=0", "--noprogress"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ddpm_generate(exp, eps_fn, params, n: int, seed: int, sampler: str, steps: int):
    """`ModelFamily.generate` of a pixel run with another sampler: config.sample's options that the
    sampler takes (clip_x0 for ancestral / DDIM; DPM-Solver++ has none), its batches and keys."""
    import inspect

    import jax
    from diffusion_jax.sampling import get_sampler, sample
    from diffusion_jax.training import to_host
    s = exp.config.sample
    accepted = inspect.signature(get_sampler(sampler).fn).parameters
    kwargs = {k: s.kwargs[k] for k in s.kwargs.keys() if s.kwargs[k] is not None and k in accepted}
    key, xs, done = jax.random.PRNGKey(seed), [], 0
    while done < n:
        b = min(int(s.batch_size), n - done)
        model_cond, _ = exp.family.batch_cond(exp, done, done + b)
        out = sample(sampler, eps_fn, exp.process, jax.random.fold_in(key, done), (b, *exp.image_shape),
                     num_steps=steps, spacing=s.spacing, cond={"params": params, "model_cond": model_cond},
                     t_end=s.t_end, denoise_final=bool(s.denoise_final), **kwargs)
        xs.append(np.asarray(to_host(out.x), np.float32))
        done += b
    return np.concatenate(xs), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ddgan_run", default=None, help="workdir of a configs/ddgan_digits.py run")
    ap.add_argument("--ddpm_run", default=None, help="workdir of a configs/flow_digits.py:vp run")
    ap.add_argument("--num_samples", type=int, default=512)
    ap.add_argument("--classifier_steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "ddgan_vs_ddpm"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    ddgan_run = args.ddgan_run or os.path.join(args.out, "ddgan_digits")
    ddpm_run = args.ddpm_run or os.path.join(args.out, "vp_digits")
    if args.ddgan_run is None:
        train_run(os.path.join(ROOT, "configs", "ddgan_digits.py"), ddgan_run)
    if args.ddpm_run is None:
        train_run(os.path.join(ROOT, "configs", "flow_digits.py") + ":vp", ddpm_run)

    from diffusion_jax import config as cv
    from diffusion_jax.cli.autoencoder import load_arrays
    from diffusion_jax.cli.experiment import generate, make_eps_fn, sampling_params, saved_config
    from diffusion_jax.cli.pretrained import load_run
    from diffusion_jax.evaluation import frechet_distance, train_feature_classifier
    from diffusion_jax.reports import image_grid
    from diffusion_jax.sampling import get_sampler

    t0 = time.time()
    runs = {}
    for key, wd in (("ddgan", ddgan_run), ("ddpm", ddpm_run)):
        wd = os.path.abspath(wd)
        config = cv.validate(saved_config(wd))
        exp, step, state = load_run(config, wd)
        runs[key] = (wd, config, exp, step, state)
    train = load_arrays(runs["ddpm"][1], "train")
    test = load_arrays(runs["ddpm"][1], "test")
    net = train_feature_classifier(train["x"], train["label"], steps=args.classifier_steps, seed=0)
    test_feats = net.features(test["x"])
    n_floor = min(len(train["x"]), args.num_samples)
    floor = frechet_distance(net.features(train["x"][:n_floor]), test_feats)

    def train_seconds(wd):
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        sps = [r["steps_per_sec"] for r in recs if "steps_per_sec" in r]
        return {"train_steps": recs[-1]["step"],
                "train_steps_per_sec": float(np.median(sps)) if sps else None}

    d_cfg = runs["ddpm"][1].sample
    rows_spec = [("ddgan", "ddgan (generator chain)", None, None),
                 ("ddpm", "ancestral", "ancestral", 4),
                 ("ddpm", "dpmpp_2m (DPM-Solver++ 2M)", "dpmpp_2m", 4),
                 ("ddpm", "dpmpp_2m (DPM-Solver++ 2M)", "dpmpp_2m", 3),
                 ("ddpm", f"{d_cfg.sampler} (the run's own)", d_cfg.sampler, int(d_cfg.num_steps))]
    rows = []
    for key, label, sampler, steps in rows_spec:
        wd, config, exp, step, state = runs[key]
        fam, params = exp.family, sampling_params(exp, state)
        eps_fn = make_eps_fn(exp)
        if key == "ddgan":
            nfe = int(config.ddgan.num_timesteps)
            steps = nfe
        else:
            nfe = steps * get_sampler(sampler).nfe_per_step + int(bool(config.sample.denoise_final))
        if key == "ddgan":
            def gen(n, seed):
                return generate(exp, eps_fn, params, n, seed)
        else:
            def gen(n, seed):
                return ddpm_generate(exp, eps_fn, params, n, seed, sampler, steps)
        bs = int(config.sample.batch_size)
        gen(min(bs, args.num_samples), args.seed + 1)                     # compile
        t1 = time.time()
        x, _ = gen(args.num_samples, args.seed)
        secs = time.time() - t1
        x = np.clip(x, -1.0, 1.0)
        name = f"{key}_{(sampler or 'ddgan')}_{steps}"
        image_grid(x[:64], os.path.join(args.out, f"samples_{name}.png"))
        probs = net.predict(x)
        rows.append({"model": key, "run": wd, "checkpoint_step": step, "sampler": label, "steps": steps,
                     "nfe": nfe, "feature_distance": frechet_distance(net.features(x), test_feats),
                     "class_histogram_max_share": float(np.bincount(probs, minlength=10).max() / len(probs)),
                     "ms_per_sample": 1000.0 * secs / args.num_samples, **train_seconds(wd)})
        print(f"{name}: FD {rows[-1]['feature_distance']:.4g}, {rows[-1]['ms_per_sample']:.3g} ms/sample",
              flush=True)

    result = {"rows": rows, "classifier_test_accuracy": net.accuracy(test["x"], test["label"]),
              "feature_distance_floor_train_vs_test": floor, "num_samples": args.num_samples,
              "seconds": time.time() - t0}
    cols = ("model", "sampler", "steps", "nfe", "feature_distance", "class_histogram_max_share",
            "ms_per_sample", "train_steps", "train_steps_per_sec")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print(f"feature distance floor ({n_floor} train vs test images): {floor:.4g}; classifier test "
          f"accuracy {result['classifier_test_accuracy']:.3f}")
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}/result.json and samples_*.png ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
