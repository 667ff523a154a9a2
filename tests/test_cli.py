"""The command line end to end, in-process (`diffusion_jax.cli.main(argv)`) on a shrunk default
config: train writes finite metrics, TensorBoard events, sample grids and checkpoints; sample mode
writes a PNG and an .npz; a second train resumes and says so; eval writes the test loss; bad
configs, an unprepared dataset and a missing checkpoint fail fast with clear messages."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax import config as cv
from diffusion_jax.data import DatasetNotPreparedError
from diffusion_jax.reports.metrics_writer import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")
DDPM = os.path.join(ROOT, "configs", "ddpm_cifar10.py")


# A run on the first of the 8 host devices: the tests of a family's command line, whose sharded
# path the 8-device tests here and in test_training_* cover, run ~30% faster on one device.
ONE_DEVICE = "--config.mesh.shape=(1,1,1)"


def tiny(workdir, data_dir, *extra, one_device=False):
    """argv for the default config shrunk to a seconds-long run (8 host devices: batch 8; or with
    `one_device`, the first device only)."""
    return ["diffusion_jax", f"--config={DEFAULT}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.batch_size=8",
            "--config.model.ch=8", "--config.model.ch_mult=(1,)",
            "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=2",
            "--config.train.num_steps=6", "--config.train.sample_every=3",
            "--config.train.log_every=1", "--config.train.checkpoint_every=3",
            "--config.sample.num_steps=3", "--config.sample.num_samples=8",
            "--config.sample.batch_size=8", "--config.eval.num_batches=2",
            "--config.report.enabled=False", "--config.autoencoder.kind=none",
            "--config.latent_sampler.num_steps=0", "--noprogress",
            *((ONE_DEVICE,) if one_device else ()), *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_sample_resume_eval(tmp_path, capsys, compile_cache):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")

    # Train 6 steps: metrics every step, sample grids at 3 and 6, checkpoints at 3 and 6.
    out = cli.main(tiny(workdir, data_dir))
    assert out["step"] == 6 and out["restored_step"] is None
    assert "starting a new run" in capsys.readouterr().out
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "learning_rate",
                                                 "steps_per_sec")), r
    assert records[0]["learning_rate"] == 0.0 and records[-1]["learning_rate"] > 0  # warm-up
    for s in (3, 6):
        assert os.path.getsize(os.path.join(workdir, "samples", f"step_{s:08d}.png")) > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert out["loss_curve"] == os.path.join(workdir, "loss_curve.png") and os.path.getsize(out["loss_curve"]) > 0
    events = read_scalars(os.path.join(workdir, "tb"))
    assert [e["step"] for e in events if e["tag"] == "train/loss"] == [1, 2, 3, 4, 5, 6]

    # Sample mode without --config: the checkpoint's config, EMA parameters -> PNG + .npz. It
    # only reads: a concurrent trainer's unfinished save (an Orbax tmp dir) is left alone.
    busy = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1234")
    os.makedirs(busy)
    out = cli.main(["diffusion_jax", f"--workdir={workdir}", "--mode=sample"])
    assert os.path.isdir(busy)
    os.rmdir(busy)
    assert out["step"] == 6 and os.path.getsize(out["png"]) > 0
    with np.load(out["npz"]) as z:
        assert z["x"].shape == (8, 16, 16, 1) and z["images"].dtype == np.uint8
        assert np.isfinite(z["x"]).all() and int(z["step"]) == 6

    # A second train with more steps resumes from step 6 and says so.
    capsys.readouterr()
    out = cli.main(tiny(workdir, data_dir, "--config.train.num_steps=8"))
    assert out["restored_step"] == 6 and out["step"] == 8
    assert "resuming from step 6" in capsys.readouterr().out
    resumed = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 9))
    # ... exactly: an uninterrupted 8-step run (no sampling) logs the same losses.
    straight = str(tmp_path / "straight")
    cli.main(tiny(straight, data_dir, "--config.train.num_steps=8",
                  "--config.train.sample_every=0", "--config.train.checkpoint_every=0"))
    assert [r["loss"] for r in read_jsonl(os.path.join(straight, "metrics.jsonl"))] == \
        [r["loss"] for r in resumed]
    assert "8" in os.listdir(os.path.join(workdir, "checkpoints"))

    # A config describing another model is refused before any restore; nothing is moved aside.
    with pytest.raises(cli.CLIError, match=r"different model.*model\.ch: 8 -> 16"):
        cli.main(tiny(workdir, data_dir, "--config.model.ch=16", "--config.train.num_steps=9"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "8"]   # keep=2

    # Eval: test-split loss of the raw and the EMA parameters.
    out = cli.main(tiny(workdir, data_dir, "--mode=eval"))
    assert out["step"] == 8 and out["num_examples"] == 16
    assert math.isfinite(out["loss"]) and math.isfinite(out["loss_ema"])
    rec = read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))[-1]
    assert rec["step"] == 8 and rec["split"] == "test"
    assert any(e["tag"] == "eval/loss" for e in read_scalars(os.path.join(workdir, "tb")))


def test_unprepared_dataset_fails_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError) as e:
        cli.main(["diffusion_jax", f"--config={DDPM}", f"--workdir={tmp_path / 'run'}",
                  f"--config.data.data_dir={tmp_path / 'empty'}"])
    assert "'cifar10' is not prepared" in str(e.value)
    assert "tfds build cifar10 --file_format=array_record" in str(e.value)
    assert time.perf_counter() - t0 < 60
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_command_line_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax", f"--config={DDPM}", f"--workdir={tmp_path / 'r'}",
         f"--config.data.data_dir={tmp_path / 'empty'}"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: Dataset 'cifar10' is not prepared" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_misspelled_override_is_named_with_suggestion(tmp_path):
    with pytest.raises(cv.ConfigError) as e:
        cli.main(["diffusion_jax", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                  "--config.optim.lerning_rate=1e-3"])
    assert "config.optim.lerning_rate" in str(e.value)
    assert "did you mean 'learning_rate'" in str(e.value)


def test_wrong_type_override_is_rejected(tmp_path):
    with pytest.raises(cv.ConfigError, match="num_steps"):
        cli.main(["diffusion_jax", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                  "--config.train.num_steps=many"])


def test_sample_and_eval_need_a_checkpoint(tmp_path):
    empty = str(tmp_path / "nothing_here")
    for mode in ("sample", "eval"):
        with pytest.raises(cli.CLIError, match="no checkpoint in workdir") as e:
            cli.main(["diffusion_jax", f"--workdir={empty}", f"--mode={mode}"])
        assert empty in str(e.value)
    with pytest.raises(cli.CLIError, match="no checkpoint in workdir"):
        cli.main(["diffusion_jax", f"--config={DEFAULT}", f"--workdir={empty}", "--mode=sample"])
    with pytest.raises(cli.CLIError, match="--config is required"):
        cli.main(["diffusion_jax", f"--workdir={empty}"])


def test_checkpoint_from_an_older_schema_is_compatible():
    """A checkpoint's saved config that predates a model field (here the UNet's published-weights
    conventions) is compared with that field's default, so the run still resumes / samples; a
    real difference is still refused."""
    from diffusion_jax.cli.experiment import check_checkpoint_compatible, json_config
    from diffusion_jax.config import base_config, validate
    config = validate(base_config("unet", "ddpm", "eps"))
    saved = json_config(config)
    for k in ("downsample_padding", "mid_attn", "norm_eps", "time_offset", "time_freq_shift"):
        saved["model"].pop(k)

    class Saved:
        def read_config(self, step=None):
            return saved

    check_checkpoint_compatible(Saved(), config, "w")          # no error
    saved["model"]["ch"] = config.model.ch * 2
    with pytest.raises(cli.CLIError, match=r"model\.ch"):
        check_checkpoint_compatible(Saved(), config, "w")


def test_resume_reports_only_real_config_changes():
    """A checkpoint's config that predates a schema section is not reported as changed."""
    from diffusion_jax.cli.experiment import json_config
    from diffusion_jax.cli.train import _with_defaults
    from diffusion_jax.training.loop import config_diff
    config = cv.load_file(DEFAULT)
    old = json_config(config)
    old.pop("repa")
    assert config_diff(old, json_config(config))                  # the raw diff names the section
    assert config_diff(_with_defaults(old), json_config(config)) == []
    config.optim.learning_rate = 5e-4
    assert config_diff(_with_defaults(old), json_config(config)) == ["optim.learning_rate: 0.001 -> 0.0005"]
