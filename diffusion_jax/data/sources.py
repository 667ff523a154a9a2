"""Dataset sources: one name -> a random-access source of canonical examples.

``get_dataset(name, split)`` returns a random-access *source* (``len(src)``,
``src[i]``, ``src.get_batch(indices)``) of canonical examples
``{'image': uint8 (H, W, C), 'label': int32, ['factors': dict]}``; wrap it in
``grain.MapDataset.source(src)`` for ad-hoc grain use, or hand it to
``make_loader``:

* ``digits/16``, ``digits/32``, ``shapes/32``, ``shapes/64``, ``glyphs/32`` (and configs added
  with ``register_shapes_config``): embedded; prepared into ``data_dir`` on
  first use (seconds, offline), see ``builders.py``.
* ``cifar10``, ``celeb_a`` and ``tfds:<any tfds image dataset>``: must already
  be prepared in ``array_record`` format; otherwise ``DatasetNotPreparedError``
  says how to prepare them on a machine with internet. Nothing is downloaded.
* ``folder:/path/to/images``: image files read with PIL (``ImageFolderSource``).

All tfds datasets are read through tfds' own random-access path
(``tfds.data_source(name, split=..., data_dir=..., download=False)``), which
needs no TensorFlow: ArrayRecord files + ``dataset_info.json``, examples parsed
from tf.Example protos in numpy and images decoded with PIL.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import builders
from diffusion_jax.data import glyphs as glyphs_lib
from diffusion_jax.data import shapes as shapes_lib

REAL_DATASETS = ("cifar10", "celeb_a")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")
_EMBEDDED = {"digits": builders.Digits, "shapes": builders.Shapes,
             "glyphs": builders.Glyphs}
_DISCRETE_FACTORS = {**shapes_lib.DISCRETE_FACTORS, **glyphs_lib.DISCRETE_FACTORS}


class UnknownDatasetError(ValueError):
  """The dataset name is not one this library knows how to load."""


class DatasetNotPreparedError(ValueError):
  """A download-only dataset is not prepared (as array_record) in data_dir."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset (no data needs to be prepared).

  ``factor_num_classes[k]`` is the number of values of a discrete factor, or
  ``None`` for a continuous factor in [0, 1]. ``num_classes`` is ``None`` for
  unlabelled datasets (their ``label`` is always 0).
  """
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int | None
  factor_names: tuple[str, ...] = ()
  factor_num_classes: dict[str, int | None] = dataclasses.field(
      default_factory=dict)


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (tfds' own default)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def known_datasets() -> list[str]:
  """Names accepted by ``get_dataset`` (``folder:``/``tfds:`` are prefixes)."""
  names = [f"{n}/{c}" for n, cls in _EMBEDDED.items()
           for c in cls.builder_configs]
  return names + list(REAL_DATASETS) + ["folder:<path>", "tfds:<name>"]


def _parse(name: str) -> tuple[str, str]:
  """Returns ``(kind, resolved name)``, kind in embedded/tfds/folder."""
  if name.startswith("folder:"):
    return "folder", name[len("folder:"):]
  if name.startswith("tfds:"):
    return "tfds", name[len("tfds:"):]
  if name in REAL_DATASETS:
    return "tfds", name
  base, _, config = name.partition("/")
  if base in _EMBEDDED and config in _EMBEDDED[base].builder_configs:
    return "embedded", name
  raise UnknownDatasetError(
      f"Unknown dataset {name!r}. Known datasets: {', '.join(known_datasets())}")


def _prepare_command(name: str, data_dir: str) -> str:
  return f"tfds build {name} --file_format=array_record --data_dir={data_dir}"


def _builder(name: str, data_dir: str):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UnknownDatasetError(
        f"Unknown tfds dataset {name!r}: {e}. Known datasets: "
        f"{', '.join(known_datasets())}") from e


def prepare(name: str, data_dir: str | None = None):
  """Prepares an embedded dataset (no-op if prepared); returns its builder."""
  data_dir = data_dir or default_data_dir()
  kind, name = _parse(name)
  if kind != "embedded":
    raise ValueError(f"Only embedded datasets can be prepared here, not "
                     f"{name!r}; run `{_prepare_command(name, data_dir)}` on a "
                     "machine with internet (needs TensorFlow).")
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def check_prepared(name: str, data_dir: str | None = None):
  """Returns the tfds builder, or raises ``DatasetNotPreparedError``."""
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  cmd = _prepare_command(name, data_dir)
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in data_dir {data_dir!r} (looked "
        f"for {builder.data_path}/dataset_info.json), and diffusion_jax never "
        "downloads at run time. Prepare it on a machine with internet access "
        "(TensorFlow is needed only for this one-off step: `pip install "
        f"tensorflow tensorflow-datasets`):\n    {cmd}\nthen copy "
        f"'{os.path.join(data_dir, builder.name)}' to this machine's data dir "
        "(or pass data_dir= / set $TFDS_DATA_DIR).")
  formats = builder.info.available_file_formats()
  if not formats & set(tfds.core.file_adapters.FileFormat.with_random_access()):
    raise DatasetNotPreparedError(
        f"Dataset {name!r} in {builder.data_path} is prepared as "
        f"{sorted(f.value for f in formats)}, which has no random access. "
        f"Re-prepare it with array_record (needs TensorFlow):\n    {cmd}")
  return builder


def _to_canonical(example: dict[str, Any], image_size: int | None) -> dict:
  out = {"image": resize_image(np.asarray(example["image"]), image_size),
         "label": np.int32(example.get("label", 0))}
  if "factors" in example:
    out["factors"] = {k: (np.int32(v) if k in _DISCRETE_FACTORS
                          else np.float32(v))
                      for k, v in example["factors"].items()}
  return out


def resize_image(image: np.ndarray, size: int | None) -> np.ndarray:
  """Centre-crops to a square and resizes (bicubic) to ``size``; None: as is."""
  if size is None or image.shape[:2] == (size, size):
    return image
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = image[top:top + s, left:left + s]
  pil = Image.fromarray(crop[..., 0] if crop.shape[-1] == 1 else crop)
  out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
  return out.reshape(size, size, image.shape[-1])


def _tree_map(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def stack_examples(examples: Sequence[dict]) -> dict:
  """Stacks a list of (nested dict) examples into one batch of arrays."""
  return _tree_map(lambda *xs: np.stack(xs), *examples)


class _Source(Sequence):
  """Random-access source of canonical examples; ``get_batch`` stacks."""

  def get_batch(self, indices: Sequence[int]) -> dict:
    return stack_examples([self[int(i)] for i in indices])


class TfdsSource(_Source):
  """Canonicalising view of a tfds data source (``tfds.data_source`` result)."""

  def __init__(self, tfds_source, image_size: int | None = None):
    self.tfds_source = tfds_source
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.tfds_source)

  def __getitem__(self, index: int) -> dict:
    return _to_canonical(self.tfds_source[index], self.image_size)

  def get_batch(self, indices: Sequence[int]) -> dict:
    examples = self.tfds_source.__getitems__([int(i) for i in indices])
    return stack_examples([_to_canonical(e, self.image_size) for e in examples])


class ArraySource(_Source):
  """In-memory source over stacked (nested dict) numpy arrays."""

  def __init__(self, arrays: dict):
    self.arrays = arrays
    self._len = len(arrays["image"])

  @classmethod
  def from_source(cls, source: Sequence[dict], chunk: int = 1024
                  ) -> "ArraySource":
    """Reads all examples of ``source`` once (in chunks of ``chunk``)."""
    get = getattr(source, "get_batch", None) or (
        lambda idx: stack_examples([source[i] for i in idx]))
    parts = [get(range(s, min(len(source), s + chunk)))
             for s in range(0, len(source), chunk)]
    return cls(_tree_map(lambda *xs: np.concatenate(xs), *parts))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    return _tree_map(lambda a: a[index], self.arrays)

  def get_batch(self, indices: Sequence[int]) -> dict:
    idx = np.asarray(indices)
    return _tree_map(lambda a: a[idx], self.arrays)


class ImageFolderSource(_Source):
  """Random-access source over image files, read with PIL (no TensorFlow).

  Layouts: ``root/*.png`` (unlabelled, label 0), ``root/<class>/*.png``
  (labels = sorted class directory index), each optionally under
  ``root/<split>/`` when ``root/train`` exists. Images are converted to RGB;
  with ``image_size`` they are centre-cropped and resized, otherwise all images
  must share one size.
  """

  def __init__(self, root: str, split: str = "train",
               image_size: int | None = None):
    root_path = pathlib.Path(root).expanduser()
    if not root_path.is_dir():
      raise FileNotFoundError(f"Image folder {root!r} does not exist.")
    if (root_path / "train").is_dir():
      splits = sorted(p.name for p in root_path.iterdir() if p.is_dir())
      if split not in splits:
        raise ValueError(f"Split {split!r} not in {root!r}; found {splits}.")
      root_path = root_path / split
    elif split != "train":
      raise ValueError(f"{root!r} has no split sub-folders, only 'train' "
                       f"(all images) is available, not {split!r}.")
    is_img = lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    classes = sorted(p.name for p in root_path.iterdir()
                     if p.is_dir() and any(map(is_img, p.rglob("*"))))
    if classes:
      self.files = [(f, c) for c, name in enumerate(classes)
                    for f in sorted(filter(is_img, (root_path / name).rglob("*")))]
    else:
      self.files = [(f, 0) for f in sorted(filter(is_img, root_path.iterdir()))]
    if not self.files:
      raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found "
                       f"under {str(root_path)!r}.")
    self.classes = tuple(classes)
    self.image_size = image_size
    self.image_shape = self._load(0).shape

  def _load(self, index: int) -> np.ndarray:
    with Image.open(self.files[index][0]) as img:
      arr = np.asarray(img.convert("RGB"))
    return resize_image(arr, self.image_size)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    image = self._load(index)
    if image.shape != self.image_shape:
      raise ValueError(
          f"{self.files[index][0]} has shape {image.shape}, expected "
          f"{self.image_shape}; pass image_size= to crop+resize all images.")
    return {"image": image, "label": np.int32(self.files[index][1])}


def get_dataset(name: str, split: str = "train", *, data_dir: str | None = None,
                image_size: int | None = None, cache: bool | None = None):
  """Returns a random-access source of canonical examples (see module doc).

  Args:
    name: see ``known_datasets()``.
    split: a tfds split spec (``'train'``, ``'test'``, ``'train[:90%]'``...);
      for ``folder:`` datasets a sub-folder name.
    data_dir: tfds data dir (default: ``default_data_dir()``).
    image_size: optional square size to centre-crop + resize to (e.g. 64 for
      ``celeb_a``); ``None`` keeps the stored size.
    cache: decode the whole split once into memory (``ArraySource``: batches
      are then gathered with numpy, ~100x faster per example). Default: only
      for the small embedded datasets.
  """
  kind, resolved = _parse(name)
  data_dir = data_dir or default_data_dir()
  if kind == "folder":
    source = ImageFolderSource(resolved, split, image_size)
  else:
    if kind == "embedded":
      prepare(resolved, data_dir)
    else:
      check_prepared(resolved, data_dir)
    source = TfdsSource(tfds.data_source(resolved, split=split,
                                         data_dir=data_dir, download=False),
                        image_size)
  if cache if cache is not None else kind == "embedded":
    source = ArraySource.from_source(source)
  return source


def dataset_info(name: str, *, data_dir: str | None = None,
                 image_size: int | None = None) -> DatasetInfo:
  """Image shape, number of classes and factors of ``name`` (no preparation)."""
  kind, resolved = _parse(name)
  if kind == "folder":
    src = ImageFolderSource(resolved, "train", image_size)
    return DatasetInfo(name, tuple(src.image_shape),
                       len(src.classes) or None)
  features = _builder(resolved, data_dir or default_data_dir()).info.features
  if "image" not in features:
    raise ValueError(f"Dataset {name!r} has no 'image' feature: "
                     f"{list(features.keys())}")
  shape = tuple(features["image"].shape)
  if image_size is not None:
    shape = (image_size, image_size, shape[-1])
  num_classes = (features["label"].num_classes if "label" in features
                 else None)
  factors = {}
  if "factors" in features:
    factors = {k: getattr(f, "num_classes", None)
               for k, f in features["factors"].items()}
  return DatasetInfo(name, shape, num_classes, tuple(factors), factors)
