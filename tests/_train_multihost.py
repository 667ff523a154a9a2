"""Worker for tests/test_training_multihost.py: one process of a (possibly multi-process) run.

    python tests/_train_multihost.py train   --workdir W --out O --mesh 2,2,1 --devices 2 \
        [--num-processes 2 --process-id i --port P]
    python tests/_train_multihost.py restore --workdir W --out O --mesh 1,4,1 --devices 4 ...

Each process writes O.p<i>.npz (the full, gathered parameters / EMA / optimiser state) and
O.p<i>.json (the example indices its source read, its data log, topology facts).
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["train", "restore"])
parser.add_argument("--workdir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--mesh", required=True)
parser.add_argument("--devices", type=int, required=True)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = " ".join(   # this process' device count; the parent's other flags kept
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={args.devices}"])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _train_common as common  # noqa: E402
from diffusion_jax import training as T  # noqa: E402

BATCH = 8


def config(steps):
    return T.TrainConfig(
        num_steps=steps, seed=0, mesh_shape=tuple(int(s) for s in args.mesh.split(",")),
        optimizer=T.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.01),
        ema_decays=(0.9,), log_every=1, checkpoint_every=0, max_to_keep=2)


def main():
    if args.num_processes > 1:
        assert T.maybe_initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                  initialization_timeout=120)
    assert jax.process_count() == args.num_processes
    assert jax.local_device_count() == args.devices
    p = jax.process_index()
    _, init_params_fn, loss_fn = common.make_model()
    source = common.make_source()
    it = common.LoggingIterator(common.make_loader(source, batch_size=BATCH))
    cfg = config(args.steps)
    if args.mode == "train":
        result = T.train(cfg, loss_fn, init_params_fn, it, args.workdir)
        state, info = result.state, {"final_step": result.step, "saved": result.saved_steps,
                                     "losses": [r["loss"] for r in result.history]}
    else:
        tx, _ = T.make_optimizer(cfg.optimizer_config())
        init_fn = T.make_init_fn(init_params_fn, tx, cfg.ema_decays)
        abstract, _ = T.state_shardings(init_fn, T.make_mesh(cfg.mesh_shape))
        with T.Checkpointer(os.path.join(args.workdir, "checkpoints")) as ck:
            restored = ck.restore(abstract, data_iterator=it)
        state = restored.state
        info = {"restored_step": restored.step, "data_state": it.get_state(),
                "spec": str(state.params["mlp_in"]["kernel"].sharding.spec)}
    tree = {"params": state.params, "ema": state.ema, "opt_state": state.opt_state,
            "step": state.step}
    common.save_tree(f"{args.out}.p{p}.npz", tree)
    info.update(process_index=p, process_count=jax.process_count(),
                global_devices=jax.device_count(), reads=source.reads, data_log=it.log)
    common.write_json(f"{args.out}.p{p}.json", info)
    print(f"DONE process {p}", flush=True)


if __name__ == "__main__":
    main()
