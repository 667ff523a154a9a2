"""Worker for tests/test_training_resume.py: one `diffusion_jax.training.train` run in a process.

    python tests/_train_resume.py --workdir W --steps N --out OUT.npz [--sleep S] [--devices D]

Prints 'STEP k' (flushed) after each step; writes OUT.npz (final params/EMA/opt state) and
OUT.json (data log, restored step, preempted, saved steps, compile time).
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--checkpoint-every", type=int, default=3)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = " ".join(   # this process' device count; the parent's other flags kept
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={args.devices}"])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import time  # noqa: E402

import _train_common as common  # noqa: E402
from diffusion_jax import training as T  # noqa: E402


def main():
    _, init_params_fn, loss_fn = common.make_model()
    source = common.make_source()
    it = common.LoggingIterator(common.make_loader(source, batch_size=common.RESUME_BATCH))
    cfg = common.resume_config(args.steps, args.checkpoint_every, args.devices)

    def on_metrics(step, record):
        print(f"STEP {step} loss={record['loss']:.6f}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)

    result = T.train(cfg, loss_fn, init_params_fn, it, args.workdir, on_metrics=on_metrics)
    state = result.state
    common.save_tree(args.out, {"params": state.params, "ema": state.ema,
                                "opt_state": state.opt_state, "step": state.step})
    common.write_json(args.out.replace(".npz", ".json"), {
        "data_log": it.log, "restored_step": result.restored_step, "preempted": result.preempted,
        "saved_steps": result.saved_steps, "final_step": result.step,
        "compile_seconds": result.compile_seconds})
    print(f"DONE step={result.step} preempted={result.preempted}", flush=True)


if __name__ == "__main__":
    main()
