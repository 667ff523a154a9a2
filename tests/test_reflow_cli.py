"""--mode=reflow end to end on a tiny flow: the pairs are the teacher's ODE solutions of their noises,
the student starts from the teacher's EMA weights (with learning rate 1e-12 it stays the teacher: equal
straightness and few-step errors in reflow.json), a second call resumes and reuses the pairs; the
pairs loader reshuffles per epoch without repeats and resumes exactly; bad set-ups are named."""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax import config as cv
from diffusion_jax.cli.reflow import PairsLoader

sys.path.insert(0, os.path.dirname(__file__))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = os.path.join(ROOT, "configs", "flow_digits.py")
REFLOW = os.path.join(ROOT, "configs", "reflow_digits.py")
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _small(cfg, workdir, data_dir, *extra):
    return ["diffusion_jax", f"--config={cfg}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.batch_size=8",
            "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
            "--config.train.num_steps=4", "--config.train.sample_every=0", "--config.train.log_every=1",
            "--config.train.checkpoint_every=0", "--config.sample.num_steps=2",
            "--config.sample.num_samples=8", "--config.sample.batch_size=8",
            "--config.report.enabled=False", "--config.mesh.shape=(1,1,1)", "--noprogress", *extra]


def test_reflow_mode_pairs_init_and_comparison(tmp_path, compile_cache):
    data = str(tmp_path / "data")
    teacher = str(tmp_path / "flow")
    cli.main(_small(FLOW, teacher, data))
    student = str(tmp_path / "rf2")
    argv = _small(REFLOW, student, data, "--mode=reflow", f"--config.reflow.teacher={teacher}",
                  "--config.reflow.num_pairs=16", "--config.reflow.num_steps=2",
                  "--config.reflow.straightness_steps=4", "--config.reflow.eval_steps=(1,)",
                  "--config.reflow.num_eval=8", "--config.report.classifier_steps=20",
                  "--config.optim.learning_rate=1e-12")
    out = cli.main(argv)
    assert out["mode"] == "reflow" and out["step"] == 4
    with np.load(os.path.join(student, "reflow", "pairs.npz")) as f:
        x, z = f["x"], f["noise"]
    assert x.shape == z.shape == (16, 16, 16, 1)

    # the pairs are the teacher's Heun ODE solutions of their noises (EMA weights)
    from diffusion_jax.cli.pretrained import load_run
    from diffusion_jax.cli.experiment import make_eps_fn, saved_config
    from diffusion_jax.models import sampling_params
    from diffusion_jax.sampling import sample
    exp, _, state = load_run(saved_config(teacher), teacher)
    params = sampling_params(exp, state)
    ref = sample("heun", make_eps_fn(exp), exp.process, jax.random.PRNGKey(0), z[:8].shape,
                 num_steps=2, cond={"params": params, "model_cond": None}, x_init=z[:8]).x
    np.testing.assert_allclose(x[:8], np.asarray(ref), atol=2e-5)

    # learning rate 1e-12: the student is (up to 1e-12) the teacher, so the comparison rows agree
    rep = json.load(open(os.path.join(student, "reflow", "reflow.json")))
    t, s = rep["flows"]["teacher (1-RF)"], rep["flows"]["student (2-RF)"]
    assert t["straightness"] > 0 and s["straightness"] == pytest.approx(t["straightness"], rel=1e-3)
    te, se = t["few_step"]["1"], s["few_step"]["1"]
    assert te["mse_to_teacher_ode"] > 0
    assert se["mse_to_teacher_ode"] == pytest.approx(te["mse_to_teacher_ode"], rel=1e-3)
    assert se["feature_distance"] == pytest.approx(te["feature_distance"], rel=1e-3)
    assert os.path.getsize(os.path.join(student, "reflow", "grid.png")) > 0
    recs = [json.loads(l) for l in open(os.path.join(student, "metrics.jsonl"))]
    assert len(recs) == 4 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)

    # the same command again: nothing left to train, the pairs are reused
    again = cli.main(argv)
    assert again["start_step"] == 4

    # bad set-ups are named
    with pytest.raises(cv.ConfigError, match=r"config\.model\.ch=16.*teacher"):
        cli.main(_small(REFLOW, str(tmp_path / "x"), data, "--mode=reflow",
                        f"--config.reflow.teacher={teacher}", "--config.model.ch=16"))
    with pytest.raises(cli.CLIError, match="--mode=reflow"):
        cli.main(_small(REFLOW, str(tmp_path / "y"), data))
    with pytest.raises(cv.ConfigError, match=r"config\.reflow\.teacher"):
        cli.main(_small(REFLOW, str(tmp_path / "z"), data, "--mode=reflow"))


def test_pairs_loader_epochs_and_resume():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    loader = PairsLoader(x, -x, batch_size=4, seed=3)
    first = [next(loader) for _ in range(2)]               # 8 of 10: one epoch, no repeats
    seen = np.concatenate([b["x"][:, 0] for b in first])
    assert len(set(seen.tolist())) == 8
    assert all(np.array_equal(b["noise"], -b["x"]) for b in first)
    state = loader.get_state()
    nxt = next(loader)                                     # the tail of 2 waits: a new epoch
    assert loader.get_state()["epoch"] == 1
    other = PairsLoader(x, -x, batch_size=4, seed=3)
    other.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(other)["x"], nxt["x"])
    with pytest.raises(cli.CLIError, match="batch_size"):
        PairsLoader(x, x, batch_size=11)
