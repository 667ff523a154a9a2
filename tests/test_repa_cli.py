"""REPA through the command line: a pixel UNet trained with config.repa aligned to the encoder of a
trained DiffAE run (config.repa.target='run:<workdir>'); the target's width is saved with the
config, sampling needs no target, and bad REPA configs fail with the field's name."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_cli import tiny  # noqa: E402

from diffusion_jax import cli  # noqa: E402
from diffusion_jax import config as cv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_repa_trains_against_a_diffae_run(tmp_path, compile_cache):
    data_dir = str(tmp_path / "data")
    enc = str(tmp_path / "diffae")
    cli.main(tiny(enc, data_dir, "--config.train.num_steps=2", "--config.train.sample_every=0",
                  "--config.train.checkpoint_every=2", "--config.autoencoder.kind=diffae",
                  "--config.autoencoder.z_dim=6"))
    run = str(tmp_path / "repa")
    repa = ["--config.train.num_steps=3", "--config.train.sample_every=0",
            "--config.train.checkpoint_every=3", "--config.repa.weight=0.5",
            f"--config.repa.target=run:{enc}", "--config.repa.block=down_0_0"]
    out = cli.main(tiny(run, data_dir, *repa, one_device=True))
    assert out["step"] == 3
    recs = [r for r in _records(run) if "loss" in r]
    for r in recs:       # the logged loss is the denoising loss plus 0.5 (1 - cos)
        assert -1.0 <= r["repa_cos"] <= 1.0
        assert r["loss"] == pytest.approx(r["diffusion_loss"] + 0.5 * (1 - r["repa_cos"]), rel=1e-5)
    saved = cli.experiment.saved_config(run)
    assert saved.repa.dim == 6 and saved.repa.block == "down_0_0"
    # sampling rebuilds the same network (with its projector) from the saved config alone
    out = cli.main(["diffusion_jax", f"--workdir={run}", "--mode=sample"])
    assert os.path.getsize(out["png"]) > 0

    # a target that is not an autoencoder run is refused, naming the field
    with pytest.raises(cv.ConfigError, match="config.repa.target"):
        cli.main(tiny(str(tmp_path / "bad"), data_dir, "--config.repa.weight=0.5",
                      f"--config.repa.target=run:{run}", "--config.train.num_steps=1"))


def test_bad_repa_configs_name_the_field(tmp_path):
    data_dir = str(tmp_path / "data")
    with pytest.raises(cv.ConfigError, match="config.repa.target"):
        cli.main(tiny(str(tmp_path / "a"), data_dir, "--config.repa.weight=0.5",
                      "--config.repa.target=classifier"))
    with pytest.raises(cv.ConfigError, match="config.repa"):
        cli.main(tiny(str(tmp_path / "b"), data_dir, "--config.repa.weight=0.5"))
