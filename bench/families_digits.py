"""Every model family on the embedded digits at equal wall clock on this machine (issue 15).

    python bench/families_digits.py --seconds 240 --out bench/results/families_digits.json
    python bench/families_digits.py --configs default,ldm_digits --seconds 60      # a subset

For each config (configs/<name>.py, all on digits/16): a short calibration run measures the CPU
time of its training step (this process, all threads: unlike wall clock it does not depend on
what else runs on the machine; on an otherwise idle 2-core machine the two agree up to the
cores used); then it trains from scratch with its own schedule compressed to fit the budget
(train.num_steps = seconds / CPU seconds per step; warm-up and first stages keep their share),
and the report of the final checkpoint gives, from the same code for every family:

    fd          classifier-feature distance of report.num_samples samples to the test split (the
                small CNN of diffusion_jax.evaluation; FID's formula) and the floor of as many
                train images
    rec_mse     first-stage reconstruction MSE per pixel (LDM, LSGM, DiVAE; images in [-1, 1]),
                or DiffAE's from (z, inverted x_T)
    nfe         network evaluations per sample (family.nfe_per_sample)
    s/img       sampling wall clock per image (report, batch of report.num_samples)

Compilation and in-training sampling are not counted in the budget. Both the CPU seconds and
the wall seconds of the training are recorded. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = ("flow_digits:vp", "flow_digits", "cld_digits", "default", "ldm_digits",
                   "lsgm_digits", "divae_digits", "ddgan_digits")   # flow_digits:vp = the pixel DDPM


def _argv(name, workdir, data_dir, extra):
    cfg, _, variant = name.partition(":")
    path = os.path.join(ROOT, "configs", f"{cfg}.py") + (f":{variant}" if variant else "")
    return ["diffusion_jax", f"--config={path}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--noprogress", *extra]


def run_one(name, args, log):
    from diffusion_jax import cli
    tag = name.replace(":", "_")
    data_dir = args.data_dir
    calib = os.path.join(args.workdir, f"{tag}_calib")
    quiet = ["--config.report.enabled=False", "--config.train.sample_every=0",
             "--config.train.checkpoint_every=0", "--config.train.log_every=5",
             "--config.eval.num_batches=0", "--config.optim.schedule=constant",
             "--config.optim.warmup_steps=0"]
    log(f"[{name}] calibrating ({args.calib_steps} steps)")
    c = cli.main(_argv(name, calib, data_dir, [f"--config.train.num_steps={args.calib_steps}"] + quiet
                       + _stage_overrides(name, args.calib_steps)))
    cpu_per_step = c["train_cpu_seconds"] / args.calib_steps
    steps = max(10, int(args.seconds / cpu_per_step))
    work = os.path.join(args.workdir, tag)
    log(f"[{name}] {cpu_per_step:.3f} CPU s/step -> {steps} steps in {args.seconds:.0f} CPU s")
    t0 = time.perf_counter()
    out = cli.main(_argv(name, work, data_dir, [
        f"--config.train.num_steps={steps}",
        "--config.train.sample_every=0", f"--config.train.checkpoint_every={steps}",
        "--config.train.log_every=25", "--config.report.probe=False",
        "--config.report.diagnostics=False", f"--config.sample.num_samples={args.num_samples}",
        "--config.eval.num_batches=0"] + _stage_overrides(name, steps)))
    wall = time.perf_counter() - t0
    rep = out.get("report") or json.load(open(os.path.join(work, "report.json")))
    fd = rep.get("feature_distance", {})
    rec = rep.get("first_stage_reconstruction_mse")
    if rec is None and "reconstruction" in rep:
        rec = rep["reconstruction"]["mse_inverted"]
    return {"config": name, "family": _family(name), "cpu_per_step": cpu_per_step,
            "steps": out["step"], "train_cpu_seconds": out.get("train_cpu_seconds"),
            "train_seconds": out.get("train_seconds"), "fd": fd.get("samples_vs_test"),
            "fd_floor": fd.get("train_vs_test"), "rec_mse": rec, "nfe": rep.get("nfe_per_sample"),
            "sec_per_image": rep.get("sampling_seconds_per_image"), "wall_total": wall}


def _family(name):
    from diffusion_jax import models as M
    return M.family_name(_load(name))


def _stage_overrides(name, steps):
    """The config's schedule compressed to `steps`: warm-up and a two-stage config's first stage
    keep their share of the config's train.num_steps."""
    c = _load(name)
    total = int(c.train.num_steps)
    out = [f"--config.optim.warmup_steps={int(int(c.optim.warmup_steps) * steps / total)}"]
    for section, field in (("first_stage", "steps"), ("vq", "steps"), ("lsgm", "warmup_vae_steps")):
        sec = c.get(section, None)
        if sec is not None and int(sec.get(field, 0) or 0) > 0:
            share = int(sec.get(field)) / total
            out.append(f"--config.{section}.{field}={max(1, min(steps - 1, int(share * steps)))}")
    return out          # DiffAE's latent DDIM trains after the budget (at report time, as always)


def _load(name):
    from diffusion_jax.config.loading import load_file
    cfg, _, variant = name.partition(":")
    return load_file(os.path.join(ROOT, "configs", f"{cfg}.py") + (f":{variant}" if variant else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--seconds", type=float, default=240.0, help="CPU seconds of training per model")
    ap.add_argument("--calib_steps", type=int, default=30)
    ap.add_argument("--num_samples", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/families_digits")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "families_digits.json"))
    args = ap.parse_args()
    args.data_dir = args.data_dir or os.path.join(args.workdir, "data")
    os.makedirs(args.workdir, exist_ok=True)
    log = lambda m: print(m, flush=True)
    rows = []
    for name in [c for c in args.configs.split(",") if c]:
        try:
            rows.append(run_one(name, args, log))
        except Exception as e:                                  # noqa: BLE001 - report and go on
            log(f"[{name}] failed: {type(e).__name__}: {e}")
            rows.append({"config": name, "error": f"{type(e).__name__}: {e}"})
        with open(args.out, "w") as f:
            json.dump({"seconds": args.seconds, "num_samples": args.num_samples, "rows": rows}, f,
                      indent=2)
    cols = ("config", "family", "steps", "train_cpu_seconds", "train_seconds", "fd", "fd_floor", "rec_mse", "nfe",
            "sec_per_image")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" + (f" {r['error']}" if "error" in r else ""))
    print(f"wrote {args.out}")


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    main()
