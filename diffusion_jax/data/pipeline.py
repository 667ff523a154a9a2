"""grain input pipeline over example *indices*: shuffle -> batch -> shard -> fetch.

``make_loader`` returns a ``grain.DatasetIterator`` yielding ``{'x': float32
(B, H, W, C) in [-1, 1], 'label': int32 (B,), ['factors': {name: (B,)}]}``
with ``B = batch_size / process_count`` (this process' share).

The grain ``MapDataset`` pipeline runs on integer indices, and examples are
fetched per batch (``source.get_batch``, vectorised for in-memory sources)::

  range(N) -> shuffle(seed)          # re-shuffled every epoch (epoch in seed)
           -> batch(global B, drop_remainder=True)   # per epoch
           -> repeat(num_epochs)
           -> random_map: flip decisions for the whole global batch
           -> map: keep rows [p*B/P, (p+1)*B/P) -> fetch -> normalise -> flip
           -> to_iter_dataset(threads prefetch) [-> mp_prefetch]

So the global batch sequence (examples, order and flips) depends only on the
seed, not on the number of processes: process ``p`` of ``P`` fetches exactly
its slice of each global batch and reads nothing else, and concatenating all
processes' batches gives the single-process batch.

Checkpointing: ``it.get_state()`` is a small JSON-able dict
(``{'next_index': k}`` = global batch counter, topology-independent) and
``it.set_state(state)`` resumes exactly. With Orbax, save/restore the
iterator itself: ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` in an ``ocp.args.Composite`` (handler
``grain.checkpoint.CheckpointHandler``, writes ``process_<i>-of-<n>.json``),
or as an Orbax v1 stateful checkpointable (``DatasetIterator.save/load``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import grain
import numpy as np

from diffusion_jax.data.sources import stack_examples

BatchTransform = Callable[[dict], dict] | grain.transforms.RandomMap


def to_model_input(batch: dict[str, Any]) -> dict[str, Any]:
  """uint8 ``image`` -> float32 ``x = image / 127.5 - 1``; int32 ``label``."""
  out = {"x": np.asarray(batch["image"], np.float32) / np.float32(127.5) - 1.0,
         "label": np.asarray(batch["label"], np.int32)}
  if "factors" in batch:
    out["factors"] = batch["factors"]
  return out


def _flip_decisions(indices: np.ndarray, rng: np.random.Generator,
                    enabled: bool) -> dict:
  flip = rng.random(len(indices)) < 0.5 if enabled else None
  return {"indices": indices, "flip": flip}


def _fetch(item: dict, *, source, start: int, stop: int) -> dict:
  batch = source.get_batch(item["indices"][start:stop]) if hasattr(
      source, "get_batch") else stack_examples(
          [source[int(i)] for i in item["indices"][start:stop]])
  batch = to_model_input(batch)
  if item["flip"] is not None:
    flip = item["flip"][start:stop]
    batch["x"] = np.where(flip[:, None, None, None], batch["x"][:, :, ::-1],
                          batch["x"])
  return batch


class _SeededRandomMap(grain.transforms.RandomMap):
  """Applies a user ``RandomMap`` with an rng also keyed on the process."""

  def __init__(self, transform: grain.transforms.RandomMap, salt: int):
    self.transform, self.salt = transform, salt

  def random_map(self, element, rng: np.random.Generator):
    seed = rng.integers(0, 2**63)
    return self.transform.random_map(
        element, np.random.default_rng([seed, self.salt]))


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, process_count={process_count}).")
  return process_index, process_count


def make_pipeline(
    source: Sequence[dict],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    random_flip: bool = False,
    transforms: Sequence[BatchTransform] = (),
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> grain.IterDataset:
  """Builds this process' pipeline; ``iter()`` it (or use ``make_loader``).

  Args:
    source: a ``get_dataset`` result or any random-access sequence of
      ``{'image': uint8 (H, W, C), 'label': int, ['factors': dict]}``
      (a ``get_batch(indices)`` method is used when present).
    batch_size: GLOBAL batch size; each process gets
      ``batch_size // process_count`` examples per batch.
    seed: seeds the shuffling, the flips and random ``transforms``.
    shuffle: reshuffle (deterministically) every epoch.
    num_epochs: ``None`` repeats forever.
    random_flip: random horizontal flips of ``x`` (p = 1/2 per example).
    transforms: extra transforms on this process' batches ``{'x', 'label',
      ...}``: callables (``grain.transforms.Map``) or
      ``grain.transforms.RandomMap`` (rng from seed, step and process).
    process_index, process_count: default ``jax.process_index()/count()``.
    num_threads, prefetch_batches: grain ``ReadOptions`` (whole batches are
      fetched in parallel threads); ``worker_count > 0`` adds ``mp_prefetch``
      worker processes.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  if batch_size > len(source):
    raise ValueError(f"batch_size={batch_size} is larger than the dataset "
                     f"({len(source)} examples).")
  seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(
      2 + len(transforms))]
  local = batch_size // process_count
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=seeds[0])
  ds = ds.batch(batch_size, drop_remainder=True).repeat(num_epochs)
  ds = ds.random_map(functools.partial(_flip_decisions, enabled=random_flip),
                     seed=seeds[1])
  ds = ds.map(functools.partial(_fetch, source=source,
                                start=process_index * local,
                                stop=(process_index + 1) * local))
  for t, s in zip(transforms, seeds[2:]):
    if isinstance(t, grain.transforms.RandomMap):
      ds = ds.random_map(_SeededRandomMap(t, process_index), seed=s)
    else:
      ds = ds.map(t)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain 0.2.18's mp_prefetch reads a flag
      flags.FLAGS.mark_as_parsed()  # (absl.app.run would have parsed them).
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  return it_ds


def make_loader(source: Sequence[dict], **kwargs) -> grain.DatasetIterator:
  """``iter(make_pipeline(source, **kwargs))``: a checkpointable ``grain.DatasetIterator``.

  Same keyword arguments as ``make_pipeline``. ``it.get_state()`` /
  ``it.set_state(state)`` save and restore the position; see the module
  docstring for Orbax.
  """
  return iter(make_pipeline(source, **kwargs))


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
  """Number of (global) batches per epoch: the remainder is dropped."""
  return num_examples // batch_size
