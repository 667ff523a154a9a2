"""CLD through the command line (`cli.main`, model.family='cld', configs/cld_digits.py shrunk like
test_cli's `tiny`): 3 training steps write finite metrics and a sample grid, --mode=sample draws
images of the data's shape through the family's phase-space sampler, --mode=eval gives the paper's
phase-space bits/dim bound, and a bad mass / damping or a mode that needs a scalar eps (the readout
probe) is refused at load time with the field named."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax import config as cv

sys.path.insert(0, os.path.dirname(__file__))
from test_cli import ROOT, tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags

CLD = os.path.join(ROOT, "configs", "cld_digits.py")


def tiny_cld(workdir, data_dir, *extra):
    argv = [f"--config={CLD}" if a.startswith("--config=") else a for a in tiny(workdir, data_dir, one_device=True)]
    return argv + ["--config.train.num_steps=3", "--config.train.sample_every=3",
                   "--config.train.checkpoint_every=3", *extra]


def test_cld_trains_and_samples(tmp_path, compile_cache):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    out = cli.main(tiny_cld(workdir, data_dir))
    assert out["step"] == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm")), r
    assert os.path.getsize(os.path.join(workdir, "samples", "step_00000003.png")) > 0

    out = cli.main(["diffusion_jax", f"--workdir={workdir}", "--mode=sample"])
    assert out["step"] == 3 and os.path.getsize(out["png"]) > 0
    with np.load(out["npz"]) as z:
        assert z["x"].shape == (8, 16, 16, 1) and np.isfinite(z["x"]).all()

    # --mode=eval with eval.bpd: the phase-space bound (family.image_bits_per_dim), 2 test images
    ev = cli.main(tiny_cld(workdir, data_dir, "--mode=eval", "--config.eval.bpd=True",
                           "--config.eval.bpd_num_examples=2", "--config.eval.num_batches=1"))
    assert ev["bpd_num_examples"] == 2 and ev["bpd_t_min"] > 0 and ev["bpd_nfe"] > 0
    assert 1.0 < ev["bpd"] < 40.0


@pytest.mark.parametrize("override, named", [
    ("--config.process.kwargs.m_inv=-1.0", r"config\.process: m_inv"),
    ("--config.process.kwargs.damping=3.0", r"config\.process: m_inv.*critical damping"),
    ("--config.objective.name=eps", r"config\.objective\.name='eps'.*config\.process\.name='cld'"),
    (("--config.report.enabled=True", "--config.report.probe=True"), r"config\.report\.probe"),
])
def test_cld_bad_config_is_refused_at_load(tmp_path, override, named):
    with pytest.raises(cv.ConfigError, match=named):
        extra = override if isinstance(override, tuple) else (override,)
        cli.main(tiny_cld(str(tmp_path / "run"), str(tmp_path / "data"), *extra))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
