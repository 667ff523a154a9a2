"""The flow-matching config trains and samples through the command line (configs/flow_digits.py: the
linear path, velocity prediction, the midpoint sampler), and `--mode=sdedit` on that run writes the
grid and the per-t0 JSON; bad sdedit fields are named."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import cli
from diffusion_jax import config as cv

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = os.path.join(ROOT, "configs", "flow_digits.py")


def tiny_flow(workdir, data_dir, *extra):
    """argv for configs/flow_digits.py shrunk to a seconds-long run (8 host devices: batch 8)."""
    return ["diffusion_jax", f"--config={FLOW}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.batch_size=8",
            "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=1",
            "--config.train.num_steps=2", "--config.train.sample_every=2", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.sample.num_steps=2",
            "--config.sample.num_samples=8", "--config.sample.batch_size=8",
            "--config.report.enabled=False", "--config.mesh.shape=(1,1,1)", "--noprogress", *extra]


def test_flow_config_trains_samples_and_sdedits(tmp_path, compile_cache):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    out = cli.main(tiny_flow(workdir, data_dir))
    assert out["step"] == 2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert os.path.getsize(os.path.join(workdir, "samples", "step_00000002.png")) > 0

    out = cli.main(tiny_flow(workdir, data_dir, "--mode=sdedit", "--config.sdedit.t0s=(0.3, 1.0)",
                             "--config.sdedit.num_images=4", "--config.sdedit.full_steps=1",
                             "--config.sdedit.classifier_steps=5"))
    rows = out["rows"]
    assert [r["t0_fraction"] for r in rows] == [0.3, 1.0]
    assert [r["nfe"] for r in rows] == [2 + 1, 2 + 1]      # one midpoint step (2 NFE) + x0_hat
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("faithfulness_l2_to_guide", "l2_to_original",
                                                 "classifier_feature_distance",
                                                 "classifier_accuracy_on_original_labels")), r
    with open(out["json"]) as f:
        assert json.load(f)["guide"] == "downsample"
    grid = np.asarray(Image.open(out["png"]))
    assert grid.shape[0] == grid.shape[1]    # 4 x 4: rows originals, guides, 2 t0s; 4 images each


def test_sdedit_config_is_validated():
    c = cv.load_file(FLOW)
    c.sdedit.t0s = (0.5, 1.5)
    with pytest.raises(cv.ConfigError, match=r"sdedit\.t0s.*\(0, 1\]"):
        cv.validate(c, lock=False)
    c = cv.load_file(FLOW)
    c.sdedit.guide = "strokes"
    with pytest.raises(cv.ConfigError, match=r"sdedit\.guide"):
        cv.validate(c, lock=False)
    c = cv.load_file(FLOW + ":vp")
    assert c.process.name == "cosine" and c.sample.sampler == "ddim"
    with pytest.raises(ValueError, match="unknown variant"):
        cv.load_file(FLOW + ":cld")
