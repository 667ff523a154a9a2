"""Library functions that take a path accept a relative one (taken from the current directory; Orbax
itself refuses relative checkpoint paths), and the eval record names the likelihood time of its bpd."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax.cli import experiment as E
from diffusion_jax.cli.evaluate import run_eval
from diffusion_jax.training import Checkpointer

from test_cli import tiny

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags


def test_checkpoints_restore_and_eval_from_relative_paths(tmp_path, monkeypatch, capsys, compile_cache):
    monkeypatch.chdir(tmp_path)
    cli.main(tiny("run", "data", "--config.train.sample_every=0", one_device=True))   # relative workdir and data_dir
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3", "6"]

    # The read-only checkpoint functions, given relative paths.
    config = E.saved_config("run")
    reader = E.ReadOnlyCheckpoints(os.path.join("run", "checkpoints"))
    try:
        assert os.path.isabs(reader.directory) and reader.all_steps() == [3, 6]
        assert reader.read_config()["model"]["ch"] == 8
    finally:
        reader.close()
    exp = E.build_experiment(config, E.image_shape_of(E.open_split(config, "train")))
    step, state = E.restore_checkpoint(exp, "run", None)
    assert step == 6
    _, state_abs = E.restore_checkpoint(exp, str(tmp_path / "run"), 6)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(state_abs.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The writer (training.Checkpointer), relative.
    ckpt = Checkpointer(os.path.join("run", "checkpoints"))
    try:
        assert ckpt.latest_step() == 6 and os.path.isabs(str(ckpt.directory))
    finally:
        ckpt.close()

    # Eval (a mode's function, relative workdir) with bits/dim at eval.bpd_t_min: the record and the printed line name the time used.
    config.eval.bpd = True
    config.eval.bpd_num_examples = 2
    config.eval.num_batches = 1
    config.eval.bpd_t_min = 2e-3                        # the cosine process' t_min is 1e-3
    capsys.readouterr()
    rec = run_eval(config, "run", None)
    assert rec["bpd_t_min"] == 2e-3 and np.isfinite(rec["bpd"]) and rec["bpd_num_examples"] == 2
    assert rec["bpd_sigma"] == pytest.approx(float(exp.process.sigma(np.float32(2e-3))), rel=1e-6)
    assert "bits/dim: the PF-ODE density at t = 0.002" in capsys.readouterr().out
    with open(tmp_path / "run" / "eval_metrics.jsonl") as f:
        last = json.loads(f.read().strip().splitlines()[-1])
    assert last["bpd_t_min"] == 2e-3 and last["bpd"] == pytest.approx(rec["bpd"])
