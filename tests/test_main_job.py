"""The README's main job (configs/default.py: a DiffAE on the embedded digits) end to end with a tiny
step count: every artefact of the report exists and holds sane numbers; the autoencoder modes write
their files; Ctrl-C saves a checkpoint and the same command resumes and says so."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import cli

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def small(workdir, data_dir, *extra):
    """The default config at a size that trains in seconds (8 host devices, batch 16; "--config.mesh.shape=(1,1,1)" in
    `extra` for the first device only)."""
    return ["diffusion_jax", f"--config={DEFAULT}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.batch_size=16",
            "--config.model.ch=16", "--config.autoencoder.z_dim=16",
            "--config.optim.warmup_steps=5", "--config.train.num_steps=60",
            "--config.train.log_every=5", "--config.train.sample_every=0",
            "--config.train.checkpoint_every=30", "--config.latent_sampler.num_steps=60",
            "--config.latent_sampler.hidden=32", "--config.latent_sampler.num_layers=2",
            "--config.latent_sampler.sample_steps=10", "--config.sample.num_steps=10",
            "--config.sample.num_samples=16", "--config.sample.batch_size=16",
            "--config.report.num_reconstructions=4", "--config.report.num_interpolations=2",
            "--config.report.interpolation_points=3", "--config.report.inversion_steps=8",
            "--config.readout.timesteps=(0.05,)", "--config.readout.blocks=('mid', 'up_0_0')",
            "--config.readout.num_train=400", "--config.readout.num_test=200",
            "--config.report.diagnostics_images=32", "--config.report.classifier_steps=150",
            "--noprogress", *extra]


def image(path):
    assert os.path.exists(path), path
    return np.asarray(Image.open(path), np.float32)


def test_main_job_writes_a_sane_report(tmp_path, capsys, compile_cache):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    out = cli.main(small(workdir, data_dir, "--config.mesh.shape=(1,1,1)"))   # ~30% faster than 8
    printed = capsys.readouterr().out
    assert "report written:" in printed and os.path.join(workdir, "report.html") in printed
    rep = out["report"]
    for name in ("report.md", "report.html", "report.json", "loss_curve.png",
                 "report/samples.png", "report/reconstructions.png",
                 "report/interpolations.png", "report/probe_heatmap.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    for name in ("samples", "reconstructions", "interpolations", "probe_heatmap"):
        im = image(os.path.join(workdir, "report", f"{name}.png"))
        assert im.std() > 5.0, f"{name}.png is (nearly) constant"
    # The loss decreased and is finite.
    train = rep["training"]
    assert np.isfinite(train["first logged loss"])
    assert train["final loss (mean of the last 10% of logs)"] < 0.8 * train["first logged loss"]
    # Reconstruction from the inverted x_T beats fresh noise.
    rec = rep["reconstruction"]
    assert 0 < rec["mse_inverted"] < rec["mse_noise"]
    # Probes: all above chance (10 classes), raw pixels near-perfect on digits.
    rows = {r["features"].split(" ")[0]: r for r in rep["probe"]}
    assert set(rows) >= {"raw", "PCA-16", "readout", "latent"}
    for r in rep["probe"]:
        assert r["linear"] > 0.3 and r["knn"] > 0.3, r
    assert rows["raw"]["linear"] > 0.85
    # Classifier-feature distance of the samples (60 steps: far from the data) above the floor of
    # as many train images; sampling time per image recorded.
    fd = rep["feature_distance"]
    assert fd["num_samples"] == 16 and fd["classifier_test_accuracy"] > 0.5
    assert 0 < fd["train_vs_test"] < fd["samples_vs_test"]
    assert rep["sampling_seconds_per_image"] > 0
    # Does z carry the semantics? The diagnostics are there and in range.
    d = rep["latent_diagnostics"]
    assert d["num_images"] == 32 and 0.0 <= d["agreement"] <= 1.0
    dep = d["z_dependence"]
    assert len(dep["t"]) == 5 and max(dep["gain"]) > 1.0 and max(dep["share"]) > 0.0   # z is used
    assert d["grad_norm_encoder"] > 0 and d["grad_norm_decoder"] > 0
    # The markdown embeds the table and links the images; the HTML embeds the images.
    md = open(os.path.join(workdir, "report.md")).read()
    assert "| features |" in md and "](report/samples.png)" in md and "Does z carry the semantics" in md
    html = open(os.path.join(workdir, "report.html")).read()
    assert html.count("data:image/png;base64,") >= 5
    saved = json.load(open(os.path.join(workdir, "report.json")))
    assert saved["step"] == 60

    # The autoencoder modes on the same run (read-only on the checkpoints).
    base = ["diffusion_jax", f"--workdir={workdir}", "--noprogress"]
    enc = cli.main(base + ["--mode=encode"])
    z = np.load(enc["files"]["test"])["z"]
    assert z.shape == (297, 16) and np.isfinite(z).all() and z.std() > 0
    rec = cli.main(base + ["--mode=reconstruct"])
    assert rec["mse_inverted"] < rec["mse_noise"] and os.path.exists(rec["png"])
    assert os.path.exists(cli.main(base + ["--mode=interpolate"])["png"])
    man = cli.main(base + ["--mode=manipulate"])
    assert image(man["png"]).std() > 5.0


def test_bad_input_names_the_problem(tmp_path):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    with pytest.raises(cli.CLIError, match="needs a diffusion autoencoder"):
        cli.main(small(workdir, data_dir, "--config.autoencoder.kind=none",
                       "--config.latent_sampler.num_steps=0", "--mode=reconstruct"))
    with pytest.raises(cli.CLIError, match="no checkpoint in workdir"):
        cli.main(small(workdir, data_dir, "--mode=interpolate"))
    with pytest.raises(cli.cv.ConfigError, match="unknown z-conditioning modes"):
        cli.main(small(workdir, data_dir, "--config.autoencoder.z_conditioning=('adagn',)"))
    with pytest.raises(cli.cv.ConfigError, match="power of two"):
        cli.main(small(workdir, data_dir, "--config.autoencoder.encoder=conv",
                       "--config.data.image_size=12"))


def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path, capsys, compile_cache):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    def argv(num_steps):
        return small(workdir, data_dir, f"--config.train.num_steps={num_steps}",
                     "--config.train.checkpoint_every=0", "--config.report.enabled=False",
                     "--config.mesh.shape=(1,1,1)")
    metrics = os.path.join(workdir, "metrics.jsonl")

    def interrupt():                       # Ctrl-C once training has logged a few steps
        deadline = time.time() + 600
        while time.time() < deadline:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    threading.Thread(target=interrupt, daemon=True).start()
    out = cli.main(argv(100_000))
    assert out["preempted"] and out["step"] >= 10
    err = capsys.readouterr().err
    assert "Ctrl-C: saving a checkpoint" in err
    stopped = out["step"]
    assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))
    # The same command again (a few more steps) resumes instead of starting over.
    again = cli.main(argv(stopped + 5))
    assert again["restored_step"] == stopped and again["step"] == stopped + 5
    assert f"resuming from step {stopped}" in capsys.readouterr().out


def test_dmz_with_batchnorm_trains_evaluates_and_encodes(tmp_path, compile_cache):
    """A DMZ (conv encoder with BatchNorm, binary code, bit-usage term) through the command line:
    --mode=eval evaluates the encoder in eval mode with statistics for each parameter set, and the
    codes of --mode=encode are hard bits."""
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    dmz = ["--config.autoencoder.kind=dmz", "--config.autoencoder.encoder=conv",
           "--config.autoencoder.latent=binary", "--config.autoencoder.z_conditioning=('cross_attn',)",
           "--config.autoencoder.pool=mean", "--config.autoencoder.bit_usage_weight=1.0",
           "--config.autoencoder.straight_through=True", "--config.latent_sampler.num_steps=0",
           "--config.train.num_steps=20", "--config.report.enabled=False"]
    cli.main(small(workdir, data_dir, *dmz))
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    last = [m for m in metrics if "bit_usage" in m][-1]
    assert 0.0 <= last["bit_usage"] and 0 <= last["dead_bits"] <= 16 and last["grad_norm/encoder"] > 0
    base = ["diffusion_jax", f"--workdir={workdir}", "--noprogress"]
    ev = cli.main(base + ["--mode=eval"])
    assert np.isfinite(ev["loss"]) and np.isfinite(ev["loss_ema"])
    z = np.load(cli.main(base + ["--mode=encode"])["files"]["test"])["z"]
    assert z.shape == (297, 32) and set(np.unique(z)) <= {0.0, 1.0}
    np.testing.assert_array_equal(z.reshape(297, 16, 2).sum(-1), 1.0)
