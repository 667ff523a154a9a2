"""Multi-process training for real on one machine: 2 processes x 2 CPU devices over loopback
(jax.distributed + gloo) train like 1 process x 4 devices, each process reading only its shard of
the data, and the collectively written Orbax checkpoint restores in either topology."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _train_common as common  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_multihost.py")
STEPS, BATCH = 4, 8
TIMEOUT = 300


def launch(mode, workdir, out, mesh, num_processes, devices):
    """Starts `num_processes` workers (a fresh loopback port); returns the Popen list."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = common.free_port()
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, WORKER, mode, "--workdir", str(workdir), "--out", str(out),
               "--mesh", mesh, "--devices", str(devices), "--steps", str(STEPS),
               "--num-processes", str(num_processes), "--process-id", str(i), "--port", str(port)]
        log = open(f"{out}.p{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    return procs


def finish(procs, out):
    deadline = time.time() + TIMEOUT
    codes = []
    for i, (p, log) in enumerate(procs):
        try:
            codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            codes.append("timeout")
        log.close()
    if any(c != 0 for c in codes):
        logs = "\n".join(
            f"--- process {i} ({c}) ---\n" + "\n".join(
                l for l in open(f"{out}.p{i}.log").read().splitlines()
                if not l.startswith(("W0", "I0")))[-4000:]
            for i, c in enumerate(codes))
        raise AssertionError(f"workers failed: {codes}\n{logs}")
    results = []
    for i in range(len(procs)):
        with open(f"{out}.p{i}.json") as f:
            results.append((common.load_tree(f"{out}.p{i}.npz"), json.load(f)))
    return results


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def assert_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    t0 = time.time()
    multi = launch("train", root / "multi", root / "multi", "2,2,1", 2, 2)
    single = launch("train", root / "single", root / "single", "2,2,1", 1, 4)
    out = {"multi": finish(multi, root / "multi"), "single": finish(single, root / "single")}
    # cross-topology restores: the 2-process checkpoint on 1 process x 4 devices (1x4 fsdp),
    # the 1-process checkpoint on 2 processes x 2 devices (fsdp over both processes)
    r_single = launch("restore", root / "multi", root / "r_single", "1,4,1", 1, 4)
    r_multi = launch("restore", root / "single", root / "r_multi", "1,4,1", 2, 2)
    out["restore_on_single"] = finish(r_single, root / "r_single")
    out["restore_on_multi"] = finish(r_multi, root / "r_multi")
    out.update(root=root, seconds=time.time() - t0)
    return out


def test_two_processes_train_like_one(runs):
    (m0, i0), (m1, i1) = runs["multi"]
    (s0, si), = runs["single"]
    assert (i0["process_count"], i0["global_devices"], si["process_count"],
            si["global_devices"]) == (2, 4, 1, 4)
    assert i0["final_step"] == i1["final_step"] == si["final_step"] == STEPS
    # both processes hold the same (gathered) result, equal to the single-process one
    assert_equal(m0, m1)
    assert_close(m0, s0)
    np.testing.assert_allclose(i0["losses"], si["losses"], rtol=1e-5)
    assert i0["losses"][0] != i0["losses"][-1]           # it trained


def test_each_process_reads_only_its_shard(runs):
    (_, i0), (_, i1) = runs["multi"]
    (_, si), = runs["single"]
    global_batches = si["reads"]                         # what one process reads: whole batches
    assert len(global_batches) == STEPS and all(len(b) == BATCH for b in global_batches)
    for p, info in enumerate((i0, i1)):
        expected = [b[p * BATCH // 2:(p + 1) * BATCH // 2] for b in global_batches]
        assert info["reads"] == expected, f"process {p} read {info['reads']}"
    # the two shards are disjoint and together are the single-process batches
    for b, r0, r1 in zip(global_batches, i0["reads"], i1["reads"]):
        assert sorted(r0 + r1) == sorted(b) and not set(r0) & set(r1)


def test_checkpoint_written_once_collectively(runs):
    ckdir = runs["root"] / "multi" / "checkpoints"
    assert sorted(os.listdir(ckdir)) == [str(STEPS)]
    step = ckdir / str(STEPS)
    assert {"state", "data", "config"} <= set(os.listdir(step))
    # one OCDBT tree per writing process, one JSON data state (written by process 0)
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step / "state"))
    assert json.loads((step / "data" / "metadata").read_text()) == {"next_index": STEPS}
    assert not [n for n in os.listdir(ckdir) if "tmp" in n]


def test_restores_into_either_topology(runs):
    (m0, _), _ = runs["multi"]
    (s0, _), = runs["single"]
    (a, ai), = runs["restore_on_single"]
    assert ai["restored_step"] == STEPS and ai["process_count"] == 1
    assert ai["data_state"] == {"next_index": STEPS} and ai["spec"] in ("P('fsdp',)", "PartitionSpec('fsdp',)")
    assert_equal(a, m0)                                   # 2x2 checkpoint -> 1x4, bit-exact
    for b, bi in runs["restore_on_multi"]:
        assert bi["restored_step"] == STEPS and bi["process_count"] == 2
        assert bi["data_state"] == {"next_index": STEPS}
        assert bi["spec"] in ("P('fsdp',)", "PartitionSpec('fsdp',)")
        assert_equal(b, s0)                               # 1x4 checkpoint -> 2 processes
