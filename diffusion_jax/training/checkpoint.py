"""Checkpointing with Orbax (`ocp.CheckpointManager`), plus a SIGTERM preemption helper.

Layout of `<directory>/<step>/` (one Orbax composite checkpoint per step):

    state/    the TrainState (step, params, opt_state, ema, rng, model_state):
              `ocp.args.StandardSave`, written collectively by all processes, each its own
              shards (OCDBT + zarr)
    data/     the data iterator's position, `iterator.get_state()` as JSON (`ocp.args.JsonSave`,
              written by process 0). This assumes the state is the same on every process and does
              not depend on the process count, which holds for `diffusion_jax.data` loaders
              ({'next_index': global batch counter}); it is checked at save time when there are
              several processes. `data_state='per_process'` instead uses grain's own Orbax handler
              (`grain.checkpoint.CheckpointSave`: one `process_<i>-of-<n>.json` per process; such
              checkpoints restore only with the same number of processes).
    config/   the run's config (JSON)
    + Orbax's own `_CHECKPOINT_METADATA` (incl. the metrics given to `save`, for keep-best).

Completeness: Orbax writes each step into `<step>.orbax-checkpoint-tmp-<t>/` and renames it to
`<step>/` only once every item of every process is written, so a run killed mid-save leaves at most
a tmp directory; `all_steps()` never lists it and it is removed when the next manager starts
(`cleanup_tmp_directories=True`; only tmp directories are ever removed that way).

Retention: the newest `max_to_keep` steps, plus (`keep_best=n`) the n best by `best_metric`
(`best_mode` 'min' or 'max') among those saved with metrics, plus every `keep_period`-th step.

Restore: `restore(abstract_state)` reads the newest step into the layout of `abstract_state`
(ShapeDtypeStructs carrying the *current* mesh's shardings, `init_train_state(...).abstract`), so a
checkpoint written on one mesh or process count restores on another. If the newest step cannot be
read (missing or truncated files), the policy is FALLBACK: the error is logged naming the directory
and step, the unreadable step directory is moved aside to `<directory>/quarantine/<step>-<time>/`
(never deleted, so nothing is lost and the step number can be saved again), and the next older step
is tried; when no step can be read, `CheckpointRestoreError` lists every step and its error.
`fallback=False` (or an explicit `step=`) raises `CheckpointRestoreError` at once. Good checkpoints
are never deleted or overwritten by a restore. Limitation: Orbax/tensorstore do not checksum array
data, so bytes flipped in place (same file size) are not detected.

Checkpoints written before `TrainState.model_state` existed still restore into a state whose
model_state has no leaves (it stays `{}`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies

from diffusion_jax.training import distributed as dist

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "CheckpointRestoreError", "Restored", "PreemptionHandler",
           "QUARANTINE_DIR", "abstract_with_shardings"]

QUARANTINE_DIR = "quarantine"
DATA_STATES = ("shared", "per_process")


class CheckpointRestoreError(RuntimeError):
    """A checkpoint could not be read; the message names the directory and step(s)."""


@dataclasses.dataclass
class Restored:
    step: int                       # the checkpoint step that was read
    state: Any                      # TrainState in the target layout
    data_state: Any = None          # iterator state dict ('shared') or None
    config: Any = None              # the saved config (JSON), or None
    skipped: tuple = ()             # ((step, error message), ...) newer steps that failed


def _json_safe(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class Checkpointer:
    """Thin policy layer over `ocp.CheckpointManager` for train state + data iterator + config.

    All methods are collective: every process must call them in the same order.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 keep_best: int | None = None, best_metric: str = "loss", best_mode: str = "min",
                 keep_period: int | None = None, async_save: bool = True,
                 data_state: str = "shared"):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if data_state not in DATA_STATES:
            raise ValueError(f"data_state must be one of {DATA_STATES}, got {data_state!r}")
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        self.best_metric, self.best_mode, self.data_state = best_metric, best_mode, data_state
        worst = float("inf") if best_mode == "min" else float("-inf")

        def metric_of(m) -> float:
            return float((m or {}).get(best_metric, worst))

        policies = [ocp_policies.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(ocp_policies.BestN(
                get_metric_fn=metric_of, reverse=(best_mode == "min"), n=int(keep_best),
                keep_checkpoints_without_metrics=False))
        if keep_period:
            policies.append(ocp_policies.EveryNSteps(int(keep_period)))
        # With keep_best, best_fn makes Orbax store the metrics given to `save` (`<step>/metrics/`).
        self.keep_best = keep_best
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
            best_fn=metric_of if keep_best else None, best_mode=best_mode,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options)

    # ---------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Best step by `best_metric` among steps saved with metrics (None if none; metrics are
        only stored when `keep_best` is set)."""
        best = None
        for s in self.all_steps():
            m = self._manager.metrics(s)
            if not m or self.best_metric not in m:
                continue
            v = float(m[self.best_metric])
            if best is None or (v < best[1] if self.best_mode == "min" else v > best[1]):
                best = (s, v)
        return None if best is None else best[0]

    # ------------------------------------------------------------------- save
    def _data_arg(self, data_iterator):
        if self.data_state == "per_process":
            import grain.checkpoint  # pylint: disable=g-import-not-at-top
            return grain.checkpoint.CheckpointSave(data_iterator)
        state = _json_safe(copy.deepcopy(data_iterator.get_state()))
        if jax.process_count() > 1:
            digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).digest()[:8]
            mine = np.frombuffer(digest, np.uint32)
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
            every = np.asarray(multihost_utils.process_allgather(mine))
            if not (every == every[0]).all():
                raise ValueError(
                    "the data iterators' states differ between processes, so one JSON state cannot "
                    "restore them; use Checkpointer(data_state='per_process')")
        return ocp.args.JsonSave(state)

    def save(self, step: int, state: Any, *, data_iterator: Any = None,
             config: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves (asynchronously by default) `state`, the iterator position and `config` as `step`.

        Returns False if `step` already exists (an existing checkpoint is never overwritten) unless
        `force`, which raises instead. `metrics` (host scalars) feed keep-best.
        """
        step = int(step)
        if step in self._manager.all_steps():
            if force:
                raise FileExistsError(f"checkpoint step {step} already exists in {self.directory}")
            log.info("checkpoint step %d already exists in %s; not saving", step, self.directory)
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = self._data_arg(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_json_safe(dict(config)))
        metrics = None if metrics is None or not self.keep_best else {
            k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                   force=True)
        return bool(saved)

    def wait(self) -> None:
        """Blocks until pending async saves are finalised (collective)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- restore
    def _items_of(self, step: int) -> set[str]:
        path = self.directory / str(step)
        return {p.name for p in path.iterdir() if p.is_dir()} if path.exists() else set()

    def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any) -> Restored:
        items = self._items_of(step)
        if "state" not in items:
            raise FileNotFoundError(f"{self.directory / str(step) / 'state'} does not exist")
        return self._restore_items(step, items, abstract_state, data_iterator, legacy=False)

    def _restore_items(self, step, items, abstract_state, data_iterator, legacy):
        target = _legacy_target(abstract_state) if legacy else abstract_state
        args = {"state": ocp.args.StandardRestore(target)}
        per_process = False
        if "data" in items and data_iterator is not None:
            data_dir = self.directory / str(step) / "data"
            per_process = any(p.name.startswith("process_") for p in data_dir.iterdir())
            if per_process:
                import grain.checkpoint  # pylint: disable=g-import-not-at-top
                args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                args["data"] = ocp.args.JsonRestore()
        if "config" in items:
            args["config"] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**args))
        except ValueError as e:
            if legacy or "model_state" not in str(e) or _legacy_target(abstract_state) is None:
                raise
            log.info("checkpoint step %d has no model_state (written before it existed): "
                     "restoring without it", step)
            return self._restore_items(step, items, abstract_state, data_iterator, legacy=True)
        state = out["state"]
        if legacy:
            state = dataclasses.replace(abstract_state, **state)
        data_state = None
        if "data" in args and not per_process:
            data_state = out["data"]
            data_iterator.set_state(copy.deepcopy(data_state))
        return Restored(step=step, state=state, data_state=data_state,
                        config=out["config"] if "config" in args else None)

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable step directories aside (process 0), never deleting them."""
        self._manager.wait_until_finished()
        if dist.is_primary():
            qdir = self.directory / QUARANTINE_DIR
            qdir.mkdir(parents=True, exist_ok=True)
            for s in steps:
                src = self.directory / str(s)
                if src.exists():
                    dst = qdir / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                    log.error("moving unreadable checkpoint %s to %s", src, dst)
                    src.rename(dst)
        dist.sync("diffusion_jax_checkpoint_quarantine")
        self._manager.close()
        self._manager = self._new_manager()

    def restore(self, abstract_state: Any, *, step: int | None = None, data_iterator: Any = None,
                fallback: bool = True) -> Restored | None:
        """Restores `step` (default: the newest complete one) into `abstract_state`'s layout.

        `data_iterator` (optional) gets `set_state` with the saved position. Returns None if the
        directory has no checkpoint (and `step` is None). See the module docstring for the
        fallback policy on unreadable checkpoints.
        """
        self._manager.reload()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointRestoreError(
                    f"no complete checkpoint for step {step} in {self.directory} (have {steps})")
            candidates, fallback = [int(step)], False
        else:
            candidates = sorted(steps, reverse=True)
        if not candidates:
            return None
        failed: list[tuple[int, str]] = []
        for s in candidates:
            try:
                error = None
                restored = self._restore_step(s, abstract_state, data_iterator)
            except Exception as e:  # pylint: disable=broad-except
                error, restored = f"{type(e).__name__}: {e}", None
            # All processes must agree on whether this step was readable.
            if dist.any_process(error is not None):
                error = error or "unreadable on another process"
                msg = f"checkpoint step {s} in {self.directory} could not be restored: {error}"
                if not fallback:
                    raise CheckpointRestoreError(msg)
                log.error("%s; trying an older step", msg)
                failed.append((s, error))
                continue
            if failed:
                self._quarantine([f for f, _ in failed])
            restored.skipped = tuple(failed)
            return restored
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} could be restored: " +
            "; ".join(f"step {s}: {e}" for s, e in failed))

    def read_config(self, step: int | None = None) -> Any:
        """The config saved with `step` (default newest), or None."""
        step = self.latest_step() if step is None else step
        if step is None or "config" not in self._items_of(step):
            return None
        return self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]


class PreemptionHandler:
    """Turns SIGTERM (and any of `signals`) into a flag that the train loop polls.

        with PreemptionHandler() as pre:
            for ...:
                ...
                if pre.should_stop(): save; break

    `should_stop()` is collective when there are several processes (all processes stop at the same
    step if any got the signal). The previous handlers are restored on exit. Handlers can only be
    installed from the main thread; elsewhere the handler is inert (and logs so).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_received: int | None = None

    def _handle(self, signum, frame):  # noqa: ARG002
        self.signal_received = signum
        self._flag.set()
        log.warning("received signal %d: will checkpoint and stop after the current step", signum)

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionHandler: not on the main thread; signals are not handled")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def trigger(self) -> None:
        """Sets the flag as if a signal had arrived (tests, or a custom stop condition)."""
        self._flag.set()

    @property
    def requested(self) -> bool:
        """This process' flag (no communication)."""
        return self._flag.is_set()

    def should_stop(self) -> bool:
        """True on every process if any process was signalled (collective if multi-process)."""
        return dist.any_process(self._flag.is_set())

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def _legacy_target(abstract_state: Any) -> dict | None:
    """The restore target of a checkpoint saved before `TrainState.model_state` existed: the other
    fields as a dict, if `abstract_state` is a TrainState whose model_state has no leaves."""
    if not dataclasses.is_dataclass(abstract_state) or not hasattr(abstract_state, "model_state"):
        return None
    if jax.tree_util.tree_leaves(abstract_state.model_state):
        return None
    return {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
            if f.name != "model_state"}


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStruct tree with `.sharding` from `shardings` (for `Checkpointer.restore`)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

