"""`--mode=train`: the train loop (sharded state, AOT step, checkpoints, samples, progress)."""
from __future__ import annotations

import math
import os
import signal
import sys
import time

from diffusion_jax import config as cv
from diffusion_jax.cli.experiment import (
    CLIError, ckpt_dir, say, build_experiment, open_split, image_shape_of, Batches,
    make_loss_fn, make_eps_fn, sampling_params, generate, check_checkpoint_compatible,
    json_config)
from diffusion_jax.cli.pretrained import initial_state


# --------------------------------------------------------------------------------- train
def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with today's schema defaults for the fields it predates (so that a
    section added since is not reported as a change); the saved dict itself if it does not load."""
    try:
        return json_config(cv.from_dict(saved, validate_config=False))
    except Exception:  # pylint: disable=broad-except
        return saved


def _sample_latents(exp, state, source, n: int, seed: int):
    """What the family's generation needs for the sample grids during training
    (`ModelFamily.generation_latents`; None for most families): an autoencoder's prior latents,
    or for continuous latents (no latent sampler yet) the first n training images' own z."""
    import numpy as np
    from diffusion_jax.data import to_model_input

    def first_images(k):
        return to_model_input(source.get_batch(np.arange(k) % len(source)))["x"]

    return exp.family.generation_latents(exp, state, n, seed, train_images=first_images)[0]


def _install_stop_handler():
    """Installs and returns the train loop's signal handler (see StopHandler)."""
    from diffusion_jax.training import PreemptionHandler

    class StopHandler(PreemptionHandler):
        """SIGTERM or a first Ctrl-C: checkpoint after the current step and stop (the next run
        resumes). A second Ctrl-C quits at once (the last periodic checkpoint stays)."""

        def __init__(self):
            super().__init__(signals=(signal.SIGTERM, signal.SIGINT))

        def _handle(self, signum, frame):
            if signum == signal.SIGINT and self.requested:
                self.uninstall()
                raise KeyboardInterrupt
            super()._handle(signum, frame)
            if signum == signal.SIGINT:
                print("\nCtrl-C: saving a checkpoint after this step, then stopping (run the same "
                      "command again to resume; Ctrl-C again to quit without saving)",
                      file=sys.stderr, flush=True)

    return StopHandler().install()


class _Progress:
    """tqdm bar on a terminal; one plain line per logged step otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            import shutil
            from tqdm import tqdm
            # A terminal reporting 0 columns (some ptys) would make tqdm print an empty bar.
            cols = shutil.get_terminal_size((100, 20)).columns
            self.bar = tqdm(total=total, initial=initial, unit="step", desc="train",
                            ncols=cols if cols > 0 else 100)

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, record: dict):
        if not self.enabled:
            return
        loss, sps = record.get("loss", float("nan")), record.get("steps_per_sec", float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{sps:.2f}", refresh=False)
        else:
            print(f"step {step}/{self.total}  loss {loss:.5f}  {sps:.2f} steps/s", flush=True)

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()




def run_train(config, workdir: str, *, progress: bool = True, loader=None,
              init_params=None) -> dict:
    """Trains config's model in workdir (resuming from its newest checkpoint). loader: the batches
    instead of the train split's (an iterator of {'x', ...} host batches with get_state /
    set_state; --mode=reflow's pairs); init_params: host parameters a fresh run starts from (its
    params and every EMA copy; the optimiser's moments at zero)."""
    import jax
    from diffusion_jax.training.loop import config_diff, truncate_metrics
    from diffusion_jax import training as T
    from diffusion_jax.data import make_loader
    from diffusion_jax.reports import image_grid
    from diffusion_jax.reports.metrics_writer import MetricsWriter

    t_start = time.perf_counter()
    source = open_split(config, "train")          # fails fast if the dataset is not prepared
    from diffusion_jax.cli.alignment import resolve_repa_target
    repa = resolve_repa_target(config, image_shape_of(source))      # sets config.repa.dim
    exp = build_experiment(config, image_shape_of(source), repa_target=repa and repa[0])
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if loader is None:
        loader = make_loader(source, batch_size=config.data.batch_size, seed=config.train.seed,
                             random_flip=config.data.random_flip)
    batches = Batches(loader, exp.num_classes is not None)
    tc = config.train
    ckpt = T.Checkpointer(ckpt_dir(workdir), max_to_keep=tc.keep)
    handler = _install_stop_handler()
    writer = None
    bar = None
    try:
        try:
            T.check_batch_divisible(config.data.batch_size, exp.mesh, "config.data.batch_size")
        except ValueError as e:
            raise CLIError(str(e)) from None
        check_checkpoint_compatible(ckpt, config, workdir)
        restored = ckpt.restore(exp.abstract, data_iterator=batches)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if restored is not None:
            state = restored.state
            say(f"resuming from step {restored.step} "
                 f"(checkpoint {os.path.join(ckpt_dir(workdir), str(restored.step))})")
            if restored.config is not None:
                changes = config_diff(_with_defaults(restored.config), json_config(config))
                if changes:
                    say("config differs from the checkpoint's: " + "; ".join(changes))
            if primary:
                truncate_metrics(metrics_path, restored.step)
        else:
            say(f"starting a new run in {workdir}")
            state = initial_state(exp, tc.seed, params=init_params)   # or model.init_from's
        step = int(jax.device_get(state.step))
        writer = MetricsWriter(workdir, jsonl="metrics.jsonl", primary=primary)
        if restored is not None:
            writer.restart(step)          # TensorBoard drops the old run's points after `step`
        result = {"mode": "train", "workdir": workdir, "start_step": step,
                  "restored_step": None if restored is None else restored.step, "samples": []}
        if step >= tc.num_steps:
            say(f"already at step {step} >= train.num_steps={tc.num_steps}; nothing to train")
            result.update(step=step, preempted=False)
            return result

        first = next(batches)
        spec = T.batch_spec_of(first)
        train_step = T.make_train_step(make_loss_fn(exp), exp.tx, exp.schedule,
                                       grad_accum_steps=exp.opt_cfg.grad_accum_steps,
                                       ema_warmup=bool(config.ema.warmup),
                                       grad_norm_groups=exp.family.grad_norm_groups)
        compiled = T.compile_train_step(train_step, exp.abstract, spec, exp.mesh)
        say(f"train step compiled in {compiled.compile_seconds:.1f}s; training steps "
             f"{step + 1}..{tc.num_steps} on {exp.mesh.size} device(s), mesh "
             f"{dict(exp.mesh.shape)}")
        eps_fn = make_eps_fn(exp) if tc.sample_every else None
        saved: list[int] = []
        bar = _Progress(tc.num_steps, step, progress and primary)
        config_json = json_config(config)

        def save(at):
            if ckpt.save(at, state, data_iterator=batches, config=config_json):
                saved.append(at)

        preempted = False
        pending = first
        last_t, last_step = time.perf_counter(), step
        budget = float(tc.get("max_seconds", 0.0) or 0.0)
        t_loop, t_excluded = time.perf_counter(), 0.0       # wall clock of the training steps
        cpu_loop, cpu_excluded = time.process_time(), 0.0   # CPU time of this process (all threads)
        result["stopped_at_time_limit"] = False
        while step < tc.num_steps:
            batch, pending = (pending, None) if pending is not None else (next(batches), None)
            state, metrics = compiled(state, batch)
            step += 1
            bar.step()
            if step % tc.log_every == 0 or step == tc.num_steps:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                host["steps_per_sec"] = (step - last_step) / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                writer.write(step, host, prefix="train/")     # metrics.jsonl + tb/
                bar.log(step, host)
                if not math.isfinite(host["loss"]):
                    bar.write(f"warning: non-finite loss {host['loss']} at step {step}")
            if tc.sample_every and step % tc.sample_every == 0:
                t_sample, cpu_sample = time.perf_counter(), time.process_time()
                path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
                try:
                    n = int(config.sample.num_samples)
                    z = _sample_latents(exp, state, source, n, int(config.sample.seed))
                    x, _ = generate(exp, eps_fn, sampling_params(exp, state), n,
                                    int(config.sample.seed), z=z)
                except FloatingPointError as e:       # an early model may diverge: keep training
                    bar.write(f"step {step}: sampling failed ({e}); training goes on")
                else:
                    if primary:
                        image_grid(x, path)
                        bar.write(f"step {step}: wrote sample grid {path}")
                    result["samples"].append(path)
                last_t += time.perf_counter() - t_sample      # steps/s counts training only
                t_excluded += time.perf_counter() - t_sample
                cpu_excluded += time.process_time() - cpu_sample
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save(step)
            if budget and step < tc.num_steps and (
                    T.any_process(time.perf_counter() - t_loop - t_excluded >= budget)):
                jax.block_until_ready(state)
                result["stopped_at_time_limit"] = True
                bar.write(f"stopping at step {step}: train.max_seconds={budget:g} reached")
                break
            if handler.should_stop():
                if step not in saved:
                    save(step)
                preempted = True
                bar.write(f"stopping at step {step} on signal (checkpoint saved)")
                break
        jax.block_until_ready(state)
        result["train_seconds"] = time.perf_counter() - t_loop - t_excluded
        result["train_cpu_seconds"] = time.process_time() - cpu_loop - cpu_excluded
        if not preempted and step not in saved:
            save(step)
        ckpt.wait()
        bar.close()
        if primary and os.path.exists(metrics_path):
            from diffusion_jax.reports.plots import loss_curve
            result["loss_curve"] = loss_curve(metrics_path, os.path.join(workdir, "loss_curve.png"))
        say(f"done: step {step}, checkpoints {saved}, {time.perf_counter() - t_start:.1f}s; "
             f"metrics in {metrics_path}")
        result.update(step=step, preempted=preempted, saved_steps=saved,
                      compile_seconds=compiled.compile_seconds, metrics=metrics_path)
        return result
    finally:
        if bar is not None:
            bar.close()
        handler.uninstall()
        ckpt.close()
        if writer is not None:
            writer.close()


