"""`--mode=report` (and the end of `--mode=train`): one page that shows what the run learned.

    workdir/report.md, workdir/report.html   the page (HTML self-contained: images embedded)
    workdir/report.json                      its numbers
    workdir/report/samples.png               unconditional samples (autoencoders: z from the
                                             prior / the latent DDIM, see `generation_latents`)
    workdir/report/reconstructions.png       originals / from (z, inverted x_T) / from (z, noise)
    workdir/report/first_stage_reconstructions.png   (LDM, LSGM, DiVAE) originals / decode(encode(x))
    workdir/report/interpolations.png        linear in z, spherical in x_T, one row per pair
    workdir/report/probe_heatmap.png         linear-probe accuracy by (t, block)
    workdir/loss_curve.png                   the training loss

Labelled data: the classifier-feature distance of the samples to the test split
(report.feature_distance), and the sampling time per image in report.json.
Autoencoders also get "Does z carry the semantics?" (report.diagnostics): the class agreement of
(z, fresh noise) reconstructions with their originals, the eps error with the right and with a
shuffled z per t, and, for binary codes, dead bits and I(x; z).

Everything is computed from the newest checkpoint (EMA parameters), so re-running the report after
an interrupted or finished training run gives the same page.
"""
from __future__ import annotations

import json
import os
import time

from diffusion_jax.cli.experiment import (
    build_experiment, generate, has_checkpoints, image_shape_of, make_eps_fn, missing_checkpoint,
    open_split, restore_checkpoint, sampling_params, say)

__all__ = ["run_report"]


def _training_summary(workdir: str) -> dict:
    from diffusion_jax.training import read_metrics
    recs = [r for r in read_metrics(workdir) if "loss" in r]
    if not recs:
        return {}
    first, last = recs[0], recs[-1]
    sps = [r["steps_per_sec"] for r in recs[1:] if "steps_per_sec" in r] or [float("nan")]
    tail = recs[-max(1, len(recs) // 10):]
    return {"steps": last["step"], "first logged loss": first["loss"],
            "final loss (mean of the last 10% of logs)": sum(r["loss"] for r in tail) / len(tail),
            "median steps/s": sorted(sps)[len(sps) // 2]}


def _add_diagnostics(rep, numbers, exp, state, train, test, test_z, workdir, progress,
                     classifier=None) -> None:
    """The 'Does z carry the semantics?' section (`cli.autoencoder.latent_diagnostics`)."""
    from diffusion_jax.cli import autoencoder as ae_lib
    from diffusion_jax.training import read_metrics
    r = exp.config.report
    progress("report: latent diagnostics (z dependence per t, class agreement, codes)")
    d = ae_lib.latent_diagnostics(exp, state, train, test, test_z, num=int(r.diagnostics_images),
                                  steps=int(r.inversion_steps), seed=int(exp.config.sample.seed),
                                  classifier_steps=int(r.classifier_steps), classifier=classifier,
                                  train_metrics=read_metrics(workdir), log=progress)
    numbers["latent_diagnostics"] = d
    rows = []
    if "agreement" in d:
        rows.append({"quantity": "class agreement of (z, fresh noise) reconstructions with their "
                                 "originals", "value": d["agreement"]})
        rows.append({"quantity": "accuracy of those reconstructions on the true labels",
                     "value": d["reconstruction_accuracy"]})
    if "codes" in d:
        c = d["codes"]
        rows += [{"quantity": "dead bits (constant over the images)", "value": f"{c['dead_bits']} of {c['bits']}"},
                 {"quantity": "mean per-bit entropy (bits)", "value": c["mean_entropy"]},
                 {"quantity": "distinct codes", "value": f"{c['distinct_codes']} of {d['num_images']}"}]
    if d.get("mutual_information_bits") is not None:
        rows.append({"quantity": f"I(x; z), bits (minibatch estimate, at most log2 {d['num_images']})",
                     "value": d["mutual_information_bits"]})
    if "grad_norm_encoder" in d:
        rows.append({"quantity": "last gradient norm: encoder / decoder",
                     "value": f"{d['grad_norm_encoder']:.3g} / {d['grad_norm_decoder']:.3g}"})
    rep.add_table(f"Does z carry the semantics? ({d['num_images']} test images)", rows,
                  ["quantity", "value"],
                  caption="the classifier is the small CNN of `diffusion_jax.evaluation` trained on the "
                          "train split; agreement near chance means the decoder makes up the content "
                          "that z should fix")
    dep = d["z_dependence"]
    rep.add_table("How much the denoiser uses z, per noise level t",
                  [{"t": t, "eps MSE (own z)": a, "eps MSE (another image's z)": b, "ratio": g,
                    "share of eps_hat moved by z": sh}
                   for t, a, b, g, sh in zip(dep["t"], dep["mse_z"], dep["mse_shuffled"], dep["gain"],
                                             dep["share"])],
                  caption="x_t = alpha_t x0 + sigma_t eps; share = E|eps_hat(z) - eps_hat(z')|^2 / "
                          "E|eps_hat(z) - mean|^2; a decoder that ignores z has ratio 1 and share 0")


def _add_feature_distance(rep, numbers, samples, train, test, steps, sample_what, progress,
                          seed=0):
    """'Sample quality on the embedded data': FD(samples, test) in the features of the evaluation
    classifier (trained here on the train split), beside FD(train, test) with as many images;
    returns the classifier (the autoencoder diagnostics reuse it)."""
    import numpy as np
    from diffusion_jax.evaluation import frechet_distance, train_feature_classifier
    progress(f"report: classifier-feature distance (classifier: {steps} steps on "
             f"{len(train['x'])} train images)")
    net = train_feature_classifier(train["x"], train["label"], steps=steps,
                                   num_classes=int(np.max(train["label"])) + 1, seed=seed)
    test_feats = net.features(test["x"])
    n = min(len(samples), len(train["x"]))
    fd = frechet_distance(net.features(np.clip(samples, -1, 1)), test_feats)
    floor = frechet_distance(net.features(train["x"][:n]), test_feats)
    pred = net.predict(np.clip(samples, -1, 1))
    share = float(np.bincount(pred).max() / len(pred))
    acc = net.accuracy(test["x"], test["label"])
    numbers["feature_distance"] = {"samples_vs_test": fd, "train_vs_test": floor,
                                   "num_samples": len(samples), "classifier_test_accuracy": acc,
                                   "largest_class_share": share}
    rep.add_table("Sample quality on the embedded data", [
        {"quantity": f"classifier-feature distance, {len(samples)} samples vs the test split",
         "value": fd},
        {"quantity": f"the same for {n} train images (the floor at this sample size)", "value": floor},
        {"quantity": "largest predicted-class share of the samples", "value": share},
        {"quantity": "the classifier's test accuracy", "value": acc}], ["quantity", "value"],
        caption=f"Frechet distance of the penultimate features of the small CNN of "
                f"`diffusion_jax.evaluation` (FID's formula, not Inception); samples: {sample_what}")
    return net


def run_report(config, workdir: str, step=None, *, progress=say) -> dict:
    import jax
    import numpy as np
    from diffusion_jax.cli import autoencoder as ae_lib
    from diffusion_jax.cli.probe import probe_table
    from diffusion_jax.reports import image_grid
    from diffusion_jax.reports.plots import loss_curve
    from diffusion_jax.reports.report import Report

    if not has_checkpoints(workdir):
        raise missing_checkpoint(workdir)
    t0 = time.perf_counter()
    exp = build_experiment(config, image_shape_of(open_split(config, "train")))
    ckpt_step, state = restore_checkpoint(exp, workdir, step)
    r, rd, s = config.report, config.readout, config.sample
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    rel = lambda p: os.path.relpath(p, workdir)
    numbers: dict = {"step": ckpt_step, "config": config.data.name}
    fam = exp.family
    rep = Report(f"{fam.title()} on {config.data.name}: report at step {ckpt_step}",
                 intro=f"Work directory {workdir}. Every figure below is made from the checkpoint "
                       f"of step {ckpt_step} (EMA parameters) by diffusion_jax's own functions; "
                       f"`python -m diffusion_jax --workdir={workdir} --mode=report` rebuilds it.")

    summary = _training_summary(workdir)
    if summary:
        rep.add_table("Training", [{"quantity": k, "value": v} for k, v in summary.items()],
                      ["quantity", "value"])
        numbers["training"] = summary
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        rep.add_image("Loss curve", rel(loss_curve(metrics, os.path.join(workdir,
                                                                           "loss_curve.png"))))

    train = ae_lib.load_arrays(config, "train", rd.num_train)
    test = ae_lib.load_arrays(config, config.eval.split, rd.num_test)
    params = sampling_params(exp, state)
    n = int(s.num_samples)
    train_z = test_z = sampler = None
    sample_what = fam.sampler_description()
    if fam.has_encoder:
        progress(f"report: encoding {len(train['x'])} train and {len(test['x'])} test images")
        train_z = fam.encode(exp, state, train["x"])
        test_z = fam.encode(exp, state, test["x"])
        sampler = fam.fit_latent_sampler(exp, train_z, log=lambda m: progress(f"report: {m}"))
        if getattr(sampler, "losses", None) is not None:
            numbers["latent_sampler_final_loss"] = float(np.asarray(sampler.losses)[-1])
    # what the family's generation draws on (an autoencoder's latents; None for most families)
    z_gen, z_what = fam.generation_latents(exp, state, n, int(s.seed), train_z=train_z,
                                           latent_sampler=sampler)
    if z_what:
        sample_what += f"; {z_what}"
    progress(f"report: sampling {n} images ({sample_what})")
    t_gen = time.perf_counter()
    x, _ = generate(exp, make_eps_fn(exp), params, n, int(s.seed), z=z_gen)
    numbers["sampling_seconds_per_image"] = (time.perf_counter() - t_gen) / n
    numbers["nfe_per_sample"] = fam.nfe_per_sample()
    samples_png = image_grid(x, os.path.join(out, "samples.png"))
    rep.add_image("Samples", rel(samples_png), caption=sample_what)
    classifier = None
    if r.get("feature_distance", True) and "label" in train and len(test["x"]) >= 2:
        classifier = _add_feature_distance(rep, numbers, x, train, test, int(r.classifier_steps),
                                           sample_what, progress, seed=int(s.seed))

    if fam.has_first_stage:
        m = min(256, len(test["x"]))
        k = min(int(r.num_reconstructions), m)
        progress(f"report: first-stage reconstructions of {m} test images")
        rec = np.asarray(fam.first_stage_reconstructions(exp, params, test["x"][:m]), np.float32)
        mse = float(np.mean((rec - np.asarray(test["x"][:m], np.float32)) ** 2))
        extra = fam.first_stage_report(exp, params, test["x"][:m]) or {}
        label = extra.get("label", "decode(encode(x)) by the first stage")
        others = {name: np.asarray(o, np.float32) for name, o in
                  (extra.get("reconstructions") or {}).items()}
        png = image_grid(np.concatenate([test["x"][:k], rec[:k]] + [o[:k] for o in others.values()]),
                         os.path.join(out, "first_stage_reconstructions.png"), ncol=k)
        rows_txt = "; ".join([label] + list(others))
        rep.add_image("First-stage reconstructions", rel(png),
                      caption=f"rows: test images; {rows_txt}; MSE per pixel (images in [-1, 1]) "
                              f"over {m} test images: {mse:.4g}")
        numbers["first_stage_reconstruction_mse"] = mse
        if others or extra.get("numbers"):
            x_m = np.asarray(test["x"][:m], np.float32)
            pred_x = classifier.predict(x_m) if classifier is not None else None
            rows = []
            for name, o in [(label, rec), *others.items()]:
                row = {"reconstruction": name, "MSE": float(np.mean((o - x_m) ** 2))}
                if pred_x is not None:
                    row["classifier agreement"] = float(np.mean(
                        classifier.predict(np.clip(o, -1, 1)) == pred_x))
                rows.append(row)
            rep.add_table("First-stage reconstructions compared", rows,
                          caption=f"{m} test images; classifier agreement: share whose predicted "
                                  f"class (the evaluation classifier) is the original's"
                                  + "".join(f"; {k_}: {v:.4g}" for k_, v in
                                            (extra.get("numbers") or {}).items()))
            numbers["first_stage_compared"] = rows
            numbers.update({f"first_stage_{k_}": v for k_, v in (extra.get("numbers") or {}).items()})

    if fam.has_encoder:
        k = min(int(r.num_reconstructions), len(test["x"]))
        progress(f"report: reconstructing {k} test images (DDIM inversion, "
                 f"{r.inversion_steps} steps)")
        rec = fam.reconstruct(exp, state, test["x"][:k], test_z[:k], steps=r.inversion_steps,
                              fixed_point_iters=r.fixed_point_iters, seed=int(s.seed))
        png = image_grid(np.concatenate([test["x"][:k], rec["inverted"], rec["noise"]]),
                         os.path.join(out, "reconstructions.png"), ncol=k)
        rep.add_image("Reconstructions", rel(png),
                      caption="rows: test images; decoded from (z, x_T = DDIM inversion); decoded "
                              "from (z, fresh noise): same semantics, new details")
        rows = [{"decoded from": "(z, inverted x_T)", "MSE": rec["mse_inverted"]},
                {"decoded from": "(z, fresh noise)", "MSE": rec["mse_noise"]}]
        rep.add_table("Reconstruction error (per pixel, images in [-1, 1])", rows)
        numbers["reconstruction"] = {"mse_inverted": rec["mse_inverted"],
                                     "mse_noise": rec["mse_noise"]}
        m = min(int(r.num_interpolations), len(test["x"]) // 2)
        progress(f"report: interpolating {m} pairs")
        path, w = fam.interpolate(exp, state, test["x"][:m], test["x"][m:2 * m],
                                  test_z[:m], test_z[m:2 * m], steps=r.inversion_steps,
                                  points=int(r.interpolation_points),
                                  fixed_point_iters=r.fixed_point_iters)
        grid = np.transpose(path, (1, 0, 2, 3, 4)).reshape(-1, *path.shape[2:])
        png = image_grid(grid, os.path.join(out, "interpolations.png"), ncol=len(w))
        rep.add_image("Interpolations", rel(png),
                      caption="each row: two test images' (z, x_T), z linear and x_T spherical")
        if r.diagnostics:
            _add_diagnostics(rep, numbers, exp, state, train, test, test_z, workdir, progress,
                             classifier)

    if r.probe:
        progress("report: probing representations (linear probe and k-NN on the labels)")
        heat = os.path.join(out, "probe_heatmap.png")
        table = probe_table(exp, state, train, test, key=jax.random.PRNGKey(config.train.seed + 3),
                            train_z=train_z, test_z=test_z, heatmap=heat, log=progress)
        cols = list(dict.fromkeys(k for row in table["rows"] for k in row))
        rep.add_table(f"Representations: test accuracy ({len(train['x'])} train / "
                      f"{len(test['x'])} test images)", table["rows"], cols,
                      caption="linear: logistic regression, 5-fold CV over (lr, weight decay); "
                              f"knn: {rd.knn_k}-NN cosine vote; readout: best (t, block) of the "
                              "sweep chosen on validation accuracy")
        rep.add_image("Readout sweep (DDAE)", rel(heat))
        numbers["probe"] = table["rows"]
        numbers["readout_best"] = table["best"]
    from diffusion_jax.cli.quality import quality_rows
    quality = quality_rows(workdir)
    if quality:
        rep.add_table("Sample quality (--mode=fid)", quality,
                      caption="FID / IS / KID / precision-recall of the FID Inception-v3 "
                              "(pytorch-fid weights), from workdir/quality/*.json")
        numbers["quality"] = quality
    numbers["seconds"] = time.perf_counter() - t0
    md, html = rep.write(workdir)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(numbers, f, indent=2, default=lambda o: np.asarray(o).tolist())
    progress(f"report written: {html} (and {md}) in {numbers['seconds']:.0f}s")
    return {"mode": "report", "step": ckpt_step, "markdown": md, "html": html, **numbers}
