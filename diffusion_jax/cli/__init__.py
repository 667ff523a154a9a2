"""The command line: train, sample from, evaluate and probe a diffusion model (or a diffusion
autoencoder) described by a config file.

    python -m diffusion_jax --config=configs/default.py --workdir=runs/digits   # train + report
    python -m diffusion_jax --config=configs/default.py --workdir=runs/digits \\
        --config.train.num_steps=6000 --config.optim.learning_rate=5e-4     # overrides
    python -m diffusion_jax --workdir=runs/digits --mode=sample              # samples
    python -m diffusion_jax --workdir=runs/digits --mode=eval                # test loss
    python -m diffusion_jax --workdir=runs/digits --mode=report              # report.md / .html
    python -m diffusion_jax --workdir=runs/digits --mode=probe               # probe table
    python -m diffusion_jax --config=configs/default.py --workdir=runs/digits --mode=fid \\
        --config.quality.inception_weights=pt_inception-2015-12-05-6726825d.pth  # FID/IS/KID/PR
    python -m diffusion_jax --workdir=runs/digits --mode=sdedit              # SDEdit t0 sweep
    python -m diffusion_jax --config=configs/reflow_digits.py --workdir=runs/reflow \
        --config.reflow.teacher=runs/flow_digits --mode=reflow              # 2-rectified flow
    python -m diffusion_jax --workdir=runs/digits --mode=encode              # latents (.npz)
    ... --mode=reconstruct | interpolate | manipulate                       # autoencoders
    diffusion-jax ...                                 # the same, as a console script

    module         modes
    train.py       train (then report.py unless config.report.enabled is False)
    sample.py      sample            evaluate.py   eval
    report.py      report            probe.py      probe
    quality.py     fid (FID / IS / KID / precision-recall -> workdir/quality/*.json)
    sdedit.py      sdedit (SDEdit from corrupted test images over t0 -> workdir/sdedit/)
    reflow.py      reflow (2-rectified flow from a trained flow run: pairs, training, comparison)
    autoencoder.py encode, reconstruct, interpolate, manipulate (families with an encoder)
    experiment.py  what they share: the model family's model (`diffusion_jax.models`) + optimiser,
                   mesh and train state built from the config

`--config` is an ml-collections config file (`configs/*.py`, `path.py:variant` passes a variant
to `get_config`); every field can be overridden with `--config.<section>.<field>=<value>`
(tuples as strings: `--config.model.ch_mult='(1, 2)'`). The config is validated on load
(`diffusion_jax.config`): a misspelled field is named with the closest valid name.
In every mode but train `--config` may be left out: the config saved with the checkpoint is used.

workdir layout:

    checkpoints/<step>/   Orbax checkpoints (state, EMA, optimiser, data position, config)
    metrics.jsonl         one JSON object per logged train step (loss, grad_norm, lr, ...)
    eval_metrics.jsonl    one JSON object per --mode=eval run
    tb/                   TensorBoard event files (train/*, eval/*)
    samples/              step_<N>.png grids written during training; samples_step<N>.png/.npz
    report.md/.html/.json the report (report/ holds its images); probe/, latents/,
                          reconstructions/, interpolations/, manipulations/: the other modes

Training resumes from the newest complete checkpoint in workdir (and says "resuming from step
N"); it is exact (state, data position and the per-step noise). SIGTERM or Ctrl-C saves and
stops (a second Ctrl-C quits at once). A config
whose model / EMA / optimiser structure differs from the checkpoint's is refused before any
restore. Sample and eval only read the checkpoints (Orbax read-only), so they can run while a
training job writes to the same workdir.

The train loop is composed from `diffusion_jax.training`'s public pieces (mesh, sharded state
init, AOT-compiled train step, Checkpointer, PreemptionHandler) rather than `training.train`,
because it samples from the EMA parameters every `train.sample_every` steps, which needs the
state mid-run (`train`'s `on_metrics` callback receives only the metrics).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config as cv
from diffusion_jax.cli.experiment import CLIError, maybe_initialize_distributed, saved_config

MODES = ("train", "sample", "eval", "report", "probe", "encode", "reconstruct", "interpolate",
         "manipulate", "fid", "sdedit", "reflow")

__all__ = ["main", "run", "define_flags", "execute", "CLIError", "MODES"]


# ---------------------------------------------------------------------------------- flags
def define_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """Defines --config (+ its --config.* overrides), --workdir, --mode, --step, --progress.
    `argv`: the arguments the overrides are read from (config_flags' `sys_argv`; None: sys.argv)."""
    config_flags.DEFINE_config_file(
        "config", None, "experiment config file (configs/*.py, or path.py:variant); fields "
        "are overridden with --config.<section>.<field>=<value>", flag_values=flag_values,
        lock_config=False, sys_argv=None if argv is None else list(argv))
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples",
                        flag_values=flag_values)
    flags.DEFINE_enum("mode", "train", MODES, " | ".join(MODES), flag_values=flag_values)
    flags.DEFINE_integer("step", None, "sample / eval: checkpoint step (default: the newest)",
                         flag_values=flag_values)
    flags.DEFINE_boolean("progress", True, "show a progress bar while training",
                         flag_values=flag_values)


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_paths(argv: Sequence[str]) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("--config.") or a.startswith("--noconfig."):
            name = a.split("=", 1)[0]
            out.append(name[len("--config."):] if name.startswith("--config.")
                       else name[len("--noconfig."):])
    return out


def precheck_argv(argv: Sequence[str]) -> None:
    """Loads the config file once before flag parsing so that a bad file or an unknown override
    field fails with a ConfigError naming it (config_flags would raise a bare AttributeError)."""
    spec = _config_arg(argv)
    paths = _override_paths(argv)
    if spec is None:
        if paths:
            raise cv.ConfigError(f"--config.{paths[0]} overrides a field, but no --config file "
                                 f"was given")
        return
    config = cv.load_file(spec)
    cv.check_override_paths(config, paths)


def _parse(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
    precheck_argv(argv)
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise cv.ConfigError(str(e)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise cv.ConfigError(f"bad --config override: {e}") from None


def main(argv: Sequence[str]) -> dict:
    """In-process entry point: `main(['prog', '--config=...', '--workdir=...', ...])`.

    Parses `argv` into a fresh flag set (so it can be called repeatedly), runs the mode and
    returns a summary dict; errors raise (ConfigError, CLIError, DatasetNotPreparedError, ...).
    """
    fv = flags.FlagValues()
    define_flags(fv, argv)
    rest = _parse(argv, fv)
    if len(rest) > 1:
        raise CLIError(f"unexpected arguments {rest[1:]}")
    return execute(fv.config, fv.workdir, fv.mode, step=fv.step, progress=fv.progress)


def _user_errors() -> tuple[type, ...]:
    from diffusion_jax.data import DatasetNotPreparedError, UnknownDatasetError
    from diffusion_jax.training import CheckpointRestoreError
    return (cv.ConfigError, CLIError, DatasetNotPreparedError, UnknownDatasetError,
            CheckpointRestoreError)


def _parse_global(argv):
    try:
        return _parse(argv, flags.FLAGS)
    except cv.ConfigError as e:
        sys.stderr.write(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(2)


_KNOWN_WARNINGS = (
    "OpenCV is not installed",                 # tfds: images are decoded with PIL instead
    "setting save_interval_steps=0",           # Orbax: our read-only checkpoint reader
    "Given directory is read only",
)


def _quiet_known_warnings(record) -> bool:
    """Drops library warnings that need no action from the user (see _KNOWN_WARNINGS)."""
    msg = record.getMessage()
    return not any(k in msg for k in _KNOWN_WARNINGS)


def _app_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if "verbosity" in f and not f["verbosity"].present:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)   # Orbax is chatty at INFO
        import logging
        logging.getLogger("absl").addFilter(_quiet_known_warnings)
    try:
        execute(f.config, f.workdir, f.mode, step=f.step, progress=f.progress)
    except _user_errors() as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script / `python -m diffusion_jax` entry point (absl `app.run`): user errors are
    printed without a traceback and exit with status 1 (2 for flag errors). --help lists the
    flags; --verbosity=0 shows INFO logs (Orbax's included; default WARNING)."""
    if "config" not in flags.FLAGS:
        define_flags(flags.FLAGS, argv)
        main_module = (argv or sys.argv)[0]         # --help / --helpshort list the main module's
        for name in ("config", "workdir", "mode", "step", "progress"):
            flags.FLAGS.register_key_flag_for_module(main_module, flags.FLAGS[name])
    app.run(_app_main, argv=list(argv) if argv is not None else None,
            flags_parser=_parse_global)


# ----------------------------------------------------------------------------- execution
def execute(config, workdir: str | None, mode: str = "train", *, step: int | None = None,
            progress: bool = True) -> dict:
    """Runs `mode` for `config` (a ConfigDict, validated here; None in sample/eval mode: the
    checkpoint's config) in `workdir`."""
    if mode not in MODES:
        raise CLIError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")
    if not workdir:
        raise CLIError("--workdir is required")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if config is None:
        if mode in ("train", "reflow"):
            raise CLIError(f"--config is required for --mode={mode} (e.g. --config=configs/"
                           f"{'default' if mode == 'train' else 'reflow_digits'}.py)")
        config = saved_config(workdir)
    cv.validate(config)
    from diffusion_jax.models import family_for
    family_for(config)                        # config.model.family: a registered family, consistent
    from diffusion_jax.cli.pretrained import resolve_init_from
    resolve_init_from(config, workdir)        # model.init_from: the network from published weights
    maybe_initialize_distributed(config)
    if mode == "train" and config.objective.name == "reflow":
        raise CLIError("config.objective.name='reflow' trains on a teacher's (noise, sample) pairs: "
                       "use --mode=reflow with config.reflow.teacher (see configs/reflow_digits.py)")
    if mode in ("train", "reflow"):
        if mode == "reflow":
            from diffusion_jax.cli.reflow import run_reflow
            result = run_reflow(config, workdir, progress=progress)
        else:
            from diffusion_jax.cli.train import run_train
            result = run_train(config, workdir, progress=progress)
        if config.report.enabled and not result.get("preempted"):
            from diffusion_jax.cli.report import run_report
            result["report"] = run_report(config, workdir)
        return result
    if mode == "sample":
        from diffusion_jax.cli.sample import run_sample
        return run_sample(config, workdir, step)
    if mode == "eval":
        from diffusion_jax.cli.evaluate import run_eval
        return run_eval(config, workdir, step)
    if mode == "report":
        from diffusion_jax.cli.report import run_report
        return run_report(config, workdir, step)
    if mode == "probe":
        from diffusion_jax.cli.probe import run_probe
        return run_probe(config, workdir, step)
    if mode == "fid":
        from diffusion_jax.cli.quality import run_quality
        return run_quality(config, workdir, step, progress=progress)
    if mode == "sdedit":
        from diffusion_jax.cli.sdedit import run_sdedit
        return run_sdedit(config, workdir, step)
    from diffusion_jax.cli import autoencoder as ae
    return {"encode": ae.run_encode, "reconstruct": ae.run_reconstruct,
            "interpolate": ae.run_interpolate, "manipulate": ae.run_manipulate}[mode](
                config, workdir, step)


