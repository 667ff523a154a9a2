"""Flow matching vs VP diffusion on the embedded digits at equal steps and NFE (issue 14).

    python -m diffusion_jax --config=configs/flow_digits.py --workdir=runs/flow_digits
    python -m diffusion_jax --config=configs/flow_digits.py:vp --workdir=runs/vp_digits
    python bench/flow_vs_vp_digits.py runs/flow_digits runs/vp_digits [--num_samples 512]

For each trained run (its saved config and newest checkpoint, EMA parameters): the end of the loss curve
(mean of the last 10 logged values of the objective's own loss and of the eps-equivalent MSE, which is
comparable across parameterisations), `--num_samples` samples with the run's configured sampler and
NFE, and the classifier-feature distance: the Frechet distance between the penultimate features of the
small CNN of `diffusion_jax.evaluation` (trained once on the train split) of the samples and of the test
split (the floor: the same distance for as many train images). Writes a table, a JSON and one PNG grid
of samples per run under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def end_of_curve(workdir: str, k: int = 10) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    tail = recs[-k:]
    return {"step": recs[-1]["step"], "loss_end": float(np.mean([r["loss"] for r in tail])),
            "eps_mse_end": float(np.mean([r["eps_mse"] for r in tail])) if "eps_mse" in tail[0] else None,
            "steps_per_sec": float(np.median([r["steps_per_sec"] for r in recs if "steps_per_sec" in r]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--num_samples", type=int, default=512)
    ap.add_argument("--classifier_steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/results/flow_vs_vp_digits")
    args = ap.parse_args()

    from diffusion_jax.cli.autoencoder import load_arrays
    from diffusion_jax.cli.experiment import generate, make_eps_fn, sampling_params, saved_config
    from diffusion_jax.cli.pretrained import load_run
    from diffusion_jax.evaluation import frechet_distance, train_feature_classifier
    from diffusion_jax.reports import image_grid
    from diffusion_jax.sampling import get_sampler

    os.makedirs(args.out, exist_ok=True)
    from diffusion_jax import config as cv
    configs = [cv.validate(saved_config(os.path.abspath(w))) for w in args.workdirs]
    train = load_arrays(configs[0], "train")
    test = load_arrays(configs[0], "test")
    t0 = time.time()
    net = train_feature_classifier(train["x"], train["label"], steps=args.classifier_steps, seed=0)
    test_feats = net.features(test["x"])
    n_floor = min(len(train["x"]), args.num_samples)
    floor = frechet_distance(net.features(train["x"][:n_floor]), test_feats)
    rows = []
    for workdir, config in zip(args.workdirs, configs):
        workdir = os.path.abspath(workdir)
        exp, step, state = load_run(config, workdir)
        s = config.sample
        nfe = int(s.num_steps) * get_sampler(s.sampler).nfe_per_step + int(bool(s.denoise_final))
        t1 = time.time()
        x, _ = generate(exp, make_eps_fn(exp), sampling_params(exp, state), args.num_samples, args.seed)
        secs = time.time() - t1
        name = os.path.basename(workdir.rstrip("/"))
        image_grid(x[:64], os.path.join(args.out, f"samples_{name}.png"))
        feats = net.features(x)
        probs = net.predict(x)
        rows.append({"run": name, "process": config.process.name, "objective": config.objective.name,
                     "sampler": f"{s.sampler} x {s.num_steps}", "nfe": nfe, **end_of_curve(workdir),
                     "feature_distance": frechet_distance(feats, test_feats),
                     "class_histogram_max_share": float(np.bincount(probs, minlength=10).max() / len(probs)),
                     "sampling_seconds": secs, "checkpoint_step": step})
    result = {"rows": rows, "classifier_test_accuracy": net.accuracy(test["x"], test["label"]),
              "feature_distance_floor_train_vs_test": floor, "num_samples": args.num_samples,
              "seconds": time.time() - t0}
    cols = ("run", "process", "objective", "step", "sampler", "nfe", "loss_end", "eps_mse_end",
            "feature_distance", "class_histogram_max_share")
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
