"""Fault tolerance of the training loop: SIGKILL mid-run resumes bit-exactly, SIGTERM saves and
exits cleanly, unreadable checkpoints fall back to the previous good step (never deleting one),
half-written checkpoints are ignored, and bad batches / meshes give clear errors."""
import os
import sys

if "jax" not in sys.modules and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import glob  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _train_common as common  # noqa: E402
from diffusion_jax import training as T  # noqa: E402

if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices, jax was imported with {jax.device_count()}: run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)",
                allow_module_level=True)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_resume.py")
N_STEPS, EVERY, DEVICES = 10, 3, 2          # saves at 3, 6, 9, 10; keeps the newest 2
TIMEOUT = 240


class Worker:
    """A `_train_resume.py` subprocess whose output lines are collected by a thread."""

    def __init__(self, workdir, out, sleep=0.0, steps=N_STEPS):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PYTHONUNBUFFERED"] = "1"
        self.out = str(out)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, "--workdir", str(workdir), "--steps", str(steps),
             "--out", self.out, "--sleep", str(sleep), "--devices", str(DEVICES),
             "--checkpoint-every", str(EVERY)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def last_step(self) -> int:
        steps = [int(l.split()[1]) for l in list(self.lines) if l.startswith("STEP ")]
        return max(steps, default=0)

    def wait_until(self, cond, what):
        deadline = time.time() + TIMEOUT
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {what}:\n"
                                     + self.output())
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"timeout waiting for {what}:\n" + self.output())
            time.sleep(0.05)

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("worker timed out:\n" + self.output()) from None
        self._reader.join(timeout=10)
        return rc

    def output(self) -> str:
        return "\n".join(l for l in self.lines if not l.startswith(("W0", "I0")))[-6000:]

    def result(self):
        import json
        with open(self.out.replace(".npz", ".json")) as f:
            return common.load_tree(self.out), json.load(f)


def complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def losses(workdir):
    return [(r["step"], r["loss"]) for r in T.read_metrics(workdir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three concurrent runs: the uninterrupted reference, one SIGKILLed after its first complete
    checkpoint (then resumed), and one SIGTERMed (then resumed)."""
    root = tmp_path_factory.mktemp("resume")
    t0 = time.time()
    ref = Worker(root / "ref", root / "ref.npz")
    killed = Worker(root / "killed", root / "killed1.npz", sleep=0.3)
    term = Worker(root / "term", root / "term1.npz", sleep=0.3)
    killed.wait_until(lambda: complete_steps(root / "killed") and killed.last_step() >= 4,
                      "a complete checkpoint and step 4")
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    kill_step, steps_at_kill = killed.last_step(), complete_steps(root / "killed")
    term.wait_until(lambda: term.last_step() >= 2, "step 2")
    term.proc.send_signal(signal.SIGTERM)
    term_rc = term.wait()
    term_steps = complete_steps(root / "term")
    resumed = Worker(root / "killed", root / "killed2.npz")
    term_resumed = Worker(root / "term", root / "term2.npz") if term_rc == 0 else None
    assert ref.wait() == 0, ref.output()
    assert resumed.wait() == 0, resumed.output()
    assert term_resumed is None or term_resumed.wait() == 0, term_resumed.output()
    return dict(root=root, ref=ref.result(), resumed=resumed.result(), kill_step=kill_step,
                steps_at_kill=steps_at_kill, term=term, term_rc=term_rc,
                term_steps=term_steps,
                term_resumed=term_resumed and term_resumed.result(), seconds=time.time() - t0)


def test_sigkill_resumes_bit_exact(runs):
    (ref_arrays, ref_info), (res_arrays, res_info) = runs["ref"], runs["resumed"]
    assert ref_info["final_step"] == res_info["final_step"] == N_STEPS
    assert ref_info["restored_step"] is None
    # resumed from the newest complete checkpoint written before the kill, mid-training
    assert res_info["restored_step"] == max(runs["steps_at_kill"])
    assert res_info["restored_step"] < N_STEPS and res_info["restored_step"] % EVERY == 0
    assert runs["kill_step"] < N_STEPS
    # same parameters, EMA and optimiser state, bit for bit
    assert_bit_exact(ref_arrays, res_arrays)
    # same data order: the resumed run continued at the saved position with the same batches
    r0 = res_info["restored_step"]
    assert res_info["data_log"][0]["pos"] == {"next_index": r0}
    assert res_info["data_log"] == ref_info["data_log"][r0:]
    # and the metrics file reads as one run with identical losses
    assert losses(runs["root"] / "killed") == losses(runs["root"] / "ref")
    assert [s for s, _ in losses(runs["root"] / "ref")] == list(range(1, N_STEPS + 1))


def test_sigterm_saves_then_exits_cleanly(runs):
    assert runs["term_rc"] == 0, runs["term"].output()
    arrays, info = runs["term"].result()
    stop = info["final_step"]
    assert info["preempted"] and 2 <= stop < N_STEPS, info
    assert stop in runs["term_steps"] and info["saved_steps"][-1] == stop
    assert int(arrays["['step']"]) == stop
    assert "stopping at step" in runs["term"].output()
    # ... and the run continues from exactly there to the reference result
    arrays2, info2 = runs["term_resumed"]
    assert info2["restored_step"] == stop and not info2["preempted"]
    assert_bit_exact(runs["ref"][0], arrays2)


# ------------------------------------------------------------------ in-process checkpoint tests
def _abstract_and_init_fn(mesh):
    _, init_params_fn, _ = common.make_model()
    cfg = common.resume_config(N_STEPS)
    tx, _ = T.make_optimizer(cfg.optimizer_config())
    init_fn = T.make_init_fn(init_params_fn, tx, cfg.ema_decays)
    return T.state_shardings(init_fn, mesh)[0]


def _digest(path):
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(f):
            h.update(f.encode())
            h.update(open(f, "rb").read())
    return h.hexdigest()


def _copy_checkpoints(runs, dst):
    shutil.copytree(runs["root"] / "ref" / "checkpoints", dst)
    return str(dst)


def _truncate_state_data(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def test_restore_on_another_mesh(runs, tmp_path):
    """The 2-device (1x2 fsdp) checkpoint restores on 8 devices as 2x4 and 8x1, bit-exact."""
    ckdir = _copy_checkpoints(runs, tmp_path / "ck")
    for shape in ((2, 4, 1), (8, 1, 1)):
        mesh = T.make_mesh(shape)
        abstract = _abstract_and_init_fn(mesh)
        it = common.make_loader(common.make_source(), batch_size=common.RESUME_BATCH)
        with T.Checkpointer(ckdir) as ck:
            r = ck.restore(abstract, data_iterator=it)
        assert r.step == N_STEPS and r.skipped == ()
        assert r.data_state == {"next_index": N_STEPS} and it.get_state() == r.data_state
        assert r.config["mesh_shape"] == [1, -1, 1]
        assert r.state.params["mlp_in"]["kernel"].sharding.spec == (
            jax.sharding.PartitionSpec("fsdp") if shape[1] > 1 else jax.sharding.PartitionSpec())
        got = common.host_tree({"params": r.state.params, "ema": r.state.ema,
                                "opt_state": r.state.opt_state, "step": r.state.step})
        flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
        assert_bit_exact(runs["ref"][0], flat)


def test_corrupt_latest_falls_back_and_keeps_good(runs, tmp_path, caplog):
    ckdir = _copy_checkpoints(runs, tmp_path / "ck")
    assert sorted(os.listdir(ckdir)) == ["10", "9"]
    good = _digest(os.path.join(ckdir, "9"))
    _truncate_state_data(os.path.join(ckdir, "10"))
    abstract = _abstract_and_init_fn(T.make_mesh((2, 4, 1)))
    # fallback=False: a clear error naming the directory and the step; nothing is touched
    with T.Checkpointer(ckdir) as ck:
        with pytest.raises(T.CheckpointRestoreError, match=rf"step 10 in {ckdir}"):
            ck.restore(abstract, fallback=False)
    assert sorted(os.listdir(ckdir)) == ["10", "9"]
    # default policy: fall back to step 9, move step 10 aside (not deleted), keep 9 intact
    it = common.make_loader(common.make_source(), batch_size=common.RESUME_BATCH)
    with T.Checkpointer(ckdir) as ck:
        r = ck.restore(abstract, data_iterator=it)
        assert r.step == 9 and [s for s, _ in r.skipped] == [10]
        assert it.get_state() == {"next_index": 9}
        assert ck.all_steps() == [9]
    assert any("step 10" in m and ckdir in m for m in caplog.messages)
    quarantined = os.listdir(os.path.join(ckdir, T.checkpoint.QUARANTINE_DIR))
    assert len(quarantined) == 1 and quarantined[0].startswith("10-")
    assert _digest(os.path.join(ckdir, "9")) == good
    # every step unreadable: the error lists them, and still nothing is deleted
    _truncate_state_data(os.path.join(ckdir, "9"))
    with T.Checkpointer(ckdir) as ck:
        with pytest.raises(T.CheckpointRestoreError, match=r"no checkpoint in .* could be "
                                                           r"restored: step 9"):
            ck.restore(abstract)
    assert len(os.listdir(os.path.join(ckdir, T.checkpoint.QUARANTINE_DIR))) == 1
    assert os.path.isdir(os.path.join(ckdir, "9"))


def test_half_written_checkpoint_is_ignored(runs, tmp_path):
    """A tmp dir (what a kill during a save leaves) is never listed or restored; good steps stay."""
    ckdir = _copy_checkpoints(runs, tmp_path / "ck")
    tmp = os.path.join(ckdir, "13.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(ckdir, "10"), tmp)
    os.remove(os.path.join(tmp, "_CHECKPOINT_METADATA"))
    good = {s: _digest(os.path.join(ckdir, s)) for s in ("9", "10")}
    abstract = _abstract_and_init_fn(T.make_mesh((1, 8, 1)))
    with T.Checkpointer(ckdir) as ck:
        assert ck.all_steps() == [9, 10] and ck.latest_step() == 10
        assert ck.restore(abstract).step == 10
    assert not os.path.exists(tmp)          # incomplete tmp dirs are cleaned up, nothing else
    assert {s: _digest(os.path.join(ckdir, s)) for s in ("9", "10")} == good


def test_keep_last_n_and_best(tmp_path):
    """max_to_keep newest + keep_best by metric; saving an existing step never overwrites it."""
    mesh = T.make_mesh((8, 1, 1))
    state = {"w": jax.device_put(np.arange(8, dtype=np.float32), T.replicated(mesh))}
    losses_ = {1: 0.5, 2: 0.1, 3: 0.7, 4: 0.9, 5: 0.8}
    with T.Checkpointer(tmp_path / "ck", max_to_keep=2, keep_best=1, async_save=False) as ck:
        for s, l in losses_.items():
            assert ck.save(s, state, config={"lr": 1.0}, metrics={"loss": l})
        assert not ck.save(5, {"w": state["w"] * 0}, metrics={"loss": 0.0})
        assert ck.all_steps() == [2, 4, 5] and ck.best_step() == 2
        assert ck.read_config(2) == {"lr": 1.0}
        r = ck.restore({"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=T.replicated(mesh))})
        assert r.step == 5 and np.array_equal(np.asarray(r.state["w"]), np.arange(8))


# ------------------------------------------------------------------------------ input errors
def _train_inprocess(tmp_path, batches, mesh_shape=(1, 1, 1), **kw):
    _, init_params_fn, loss_fn = common.make_model()
    cfg = common.resume_config(len(batches), checkpoint_every=0)
    cfg.mesh_shape = mesh_shape

    class It:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return batches[self.i - 1]

        def get_state(self):
            return {"i": self.i}

        def set_state(self, s):
            self.i = s["i"]

    devices = jax.devices()[:int(np.prod(mesh_shape))]
    return T.train(cfg, loss_fn, init_params_fn, It(), tmp_path / "w", handle_sigterm=False,
                   mesh=T.make_mesh(mesh_shape, devices=devices), **kw)


def _b(n=8, c=common.C, dtype=np.float32):
    return {"x": np.zeros((n, common.H, common.W, c), dtype)}


def test_wrong_batch_shape_or_dtype_is_a_clear_error(tmp_path):
    # a later batch of another shape: the compiled step refuses it (after one good step)
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(8, 8, 8, 1\), "
                                         r"expected \(8, 8, 8, 2\)"):
        _train_inprocess(tmp_path, [_b(), _b(c=1)])
    # against an explicit spec: refused before init / compilation
    spec = T.batch_spec_of(_b())
    with pytest.raises(ValueError, match=r"batch\['x'\] has dtype float64, expected float32"):
        _train_inprocess(tmp_path / "2", [_b(dtype=np.float64)], batch_spec=spec)
    with pytest.raises(ValueError, match=r"got keys \[\"\['y'\]\"\], expected \[\"\['x'\]\"\]"):
        T.validate_batch({"y": _b()["x"]}, spec)


def test_mesh_not_dividing_the_batch_is_a_clear_error(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"batch\['x'\] batch size 6 is not divisible by the "
                                         r"mesh's batch axes \{'data': 2, 'fsdp': 4\}"):
        _train_inprocess(tmp_path, [_b(n=6)], mesh_shape=(2, 4, 1))
    assert time.perf_counter() - t0 < 30      # raised before init / compilation


def test_per_process_data_state_uses_grain_handler(tmp_path):
    """data_state='per_process': grain's own Orbax handler (one JSON per process)."""
    mesh = T.make_mesh((8, 1, 1))
    state = {"w": jax.device_put(np.zeros(8, np.float32), T.replicated(mesh))}
    it = common.make_loader(common.make_source(), batch_size=8)
    for _ in range(3):
        next(it)
    with T.Checkpointer(tmp_path / "ck", data_state="per_process", async_save=False) as ck:
        ck.save(3, state, data_iterator=it)
    assert "process_0-of-1.json" in os.listdir(tmp_path / "ck" / "3" / "data")
    fresh = common.make_loader(common.make_source(), batch_size=8)
    with T.Checkpointer(tmp_path / "ck", data_state="per_process") as ck:
        r = ck.restore({"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=T.replicated(mesh))},
                       data_iterator=fresh)
    assert r.step == 3 and fresh.get_state() == it.get_state() == {"next_index": 3}
    np.testing.assert_array_equal(next(fresh)["x"], next(it)["x"])


def test_preemption_handler_flag_and_restore():
    before = signal.getsignal(signal.SIGTERM)
    with T.PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not handler.requested and time.time() < deadline:
            time.sleep(0.01)
        assert handler.should_stop() and handler.signal_received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
