"""Embedded tfds datasets (``digits``, ``shapes``) that need no internet.

Importing this module registers two ``tfds.core.GeneratorBasedBuilder``s:

* ``digits/16``, ``digits/32``: scikit-learn's 1797 handwritten 8x8 digits
  (shipped inside scikit-learn), scaled from 0..16 to 0..255 and upsampled with
  bicubic interpolation to 16x16 / 32x32, uint8 ``(H, W, 1)``, label 0-9.
  Deterministic split: a permutation with seed 0, first 1500 -> train, the
  remaining 297 -> test.
* ``shapes/32``, ``shapes/64``: procedural shapes (see ``shapes.py``),
  uint8 ``(H, W, 3)``, ``label`` = shape index, and ``factors`` (a nested
  dict: ints for ``shape``/``color``, float32 in [0, 1] for ``scale``,
  ``pos_x``, ``pos_y``, ``rotation``). Default 10000 train / 2000 test, seed
  0 (the 32 and 64 configs show the same scenes); generation takes seconds.
  More configs: ``register_shapes_config``.

* ``glyphs/32``: procedural glyphs (see ``glyphs.py``) under nuisance factors
  (position, scale, small rotation, colour, gradient / stripes / blobs
  backgrounds, pixel noise), uint8 ``(32, 32, 3)``, ``label`` = glyph index (6
  classes), ``factors`` as for shapes. 10000 train / 2000 test, seed 0: a
  benchmark where raw pixels and PCA probe near chance.

All are prepared with ``builder.download_and_prepare(file_format=
'array_record')`` without TensorFlow: tfds' tf.Example serializer is pure
protobuf; the only TF use on the write path is ``tfds.features.Image`` encoding
numpy arrays with ``tf.image.encode_png``, which we avoid by handing the feature
PNG bytes encoded with PIL (it stores bytes as-is and decodes with PIL/OpenCV
on the ``as_data_source`` read path). One more snag: tfds' default
``code_path`` needs the ``importlib_resources`` backport for builders defined
in a package, so ``_EmbeddedBuilder`` pins it to this file.
"""

from __future__ import annotations

import dataclasses
import io

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import glyphs as glyphs_lib
from diffusion_jax.data import shapes as shapes_lib

DIGITS_NUM_TRAIN = 1500
DIGITS_SPLIT_SEED = 0


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a uint8 ``(H, W, C)`` image (C in {1, 3}) as PNG with PIL."""
  buf = io.BytesIO()
  arr = image[..., 0] if image.shape[-1] == 1 else image
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def upsample_digits(images8: np.ndarray, resolution: int) -> np.ndarray:
  """Bicubic upsampling of 0..16 float 8x8 digits to uint8 ``(N, R, R, 1)``."""
  out = np.empty((len(images8), resolution, resolution, 1), np.uint8)
  for i, img in enumerate(np.asarray(images8, np.float32) * (255.0 / 16.0)):
    big = Image.fromarray(img, mode="F").resize(
        (resolution, resolution), Image.Resampling.BICUBIC)
    out[i, ..., 0] = np.clip(np.rint(np.asarray(big)), 0, 255).astype(np.uint8)
  return out


def digits_split_indices() -> dict[str, np.ndarray]:
  """Deterministic train/test indices into ``sklearn.datasets.load_digits``."""
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(1797)
  return {"train": np.sort(perm[:DIGITS_NUM_TRAIN]),
          "test": np.sort(perm[DIGITS_NUM_TRAIN:])}


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for builders whose data ships with the code (nothing to download).

  ``code_path`` is pinned to this file: tfds' default implementation probes
  ``importlib_resources`` (not installed here) for builders living in a package.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


@dataclasses.dataclass(kw_only=True, eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  resolution: int = 16


class Digits(_EmbeddedBuilder):
  """scikit-learn handwritten digits, upsampled (offline, embedded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      DigitsConfig(name=str(r), resolution=r,
                   description=f"8x8 digits upsampled to {r}x{r}.")
      for r in (16, 32)
  ]

  def _info(self):
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is embedded.
    return {split: self._generate_examples(idx)
            for split, idx in digits_split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    images = upsample_digits(d.images[indices], self.builder_config.resolution)
    for i, img, label in zip(indices, images, d.target[indices]):
      yield int(i), {"image": encode_png(img), "label": int(label)}


@dataclasses.dataclass(kw_only=True, eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  resolution: int = 32
  num_train: int = 10_000
  num_test: int = 2_000
  seed: int = 0


class _FactorsBuilder(_EmbeddedBuilder, skip_registration=True):
  """Procedural images with labelled generative factors: subclasses name the rendering module
  (``FACTOR_NAMES``, ``DISCRETE_FACTORS``, ``sample_factors``), the class names, the label factor
  and ``_render(factors, resolution, rng)``. Split s of seed k draws from rng([k, s, *_SEED_TAIL])."""

  _LIB = None
  _CLASS_NAMES: tuple = ()
  _LABEL: str = ""
  _SEED_TAIL: tuple = ()

  def _info(self):
    r = self.builder_config.resolution
    lib = self._LIB
    factors = {k: tfds.features.ClassLabel(num_classes=n)
               for k, n in lib.DISCRETE_FACTORS.items()}
    factors.update({k: tfds.features.Scalar(dtype=np.float32)
                    for k in lib.FACTOR_NAMES if k not in factors})
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=self._CLASS_NAMES),
            "factors": tfds.features.FeaturesDict(factors),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {"train": self._generate_examples(0, cfg.num_train),
            "test": self._generate_examples(1, cfg.num_test)}

  def _render(self, factors, resolution, rng):
    raise NotImplementedError

  def _generate_examples(self, split_id, n):
    cfg = self.builder_config
    rng = np.random.default_rng([cfg.seed, split_id, *self._SEED_TAIL])
    factors = self._LIB.sample_factors(rng, n)
    images = self._render(factors, cfg.resolution, rng)
    for i in range(n):
      f = {k: v[i].item() for k, v in factors.items()}
      yield i, {"image": encode_png(images[i]), "label": f[self._LABEL],
                "factors": f}


class Shapes(_FactorsBuilder):
  """Procedural shapes with known generative factors (offline, embedded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name=str(r), resolution=r,
                   description=f"{r}x{r} shapes, 10000 train / 2000 test.")
      for r in (32, 64)
  ]
  _LIB, _CLASS_NAMES, _LABEL = shapes_lib, shapes_lib.SHAPE_NAMES, "shape"

  def _render(self, factors, resolution, rng):
    del rng
    return shapes_lib.render(factors, resolution)


def _register(builder_cls, config_cls, what: str, name: str, **settings) -> str:
  """Adds a builder config (idempotent; a clash with other settings is an error)."""
  cfg = config_cls(name=name, **settings,
                   description=f"{settings['resolution']}x{settings['resolution']} {what}, "
                   f"{settings['num_train']} train / {settings['num_test']} test, "
                   f"seed {settings['seed']}.")
  existing = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  if name in existing:
    if dataclasses.asdict(existing[name]) != dataclasses.asdict(cfg):
      raise ValueError(f"{what} config {name!r} already registered with "
                       f"different settings: {existing[name]}")
  else:
    builder_cls.BUILDER_CONFIGS.append(cfg)
  return f"{builder_cls.name}/{name}"


def register_shapes_config(name: str, *, resolution: int, num_train: int,
                           num_test: int, seed: int = 0) -> str:
  """Adds a ``shapes`` config (idempotent) and returns ``'shapes/<name>'``."""
  return _register(Shapes, ShapesConfig, "shapes", name, resolution=resolution,
                   num_train=num_train, num_test=num_test, seed=seed)


@dataclasses.dataclass(kw_only=True, eq=False)
class GlyphsConfig(ShapesConfig):
  """The same fields as ``ShapesConfig`` (resolution, split sizes, seed)."""


class Glyphs(_FactorsBuilder):
  """Procedural glyphs under nuisance factors (offline, embedded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      GlyphsConfig(name="32", resolution=32,
                   description="32x32 glyphs, 10000 train / 2000 test.")
  ]
  _LIB, _CLASS_NAMES, _LABEL, _SEED_TAIL = glyphs_lib, glyphs_lib.GLYPH_NAMES, "glyph", (7,)

  def _render(self, factors, resolution, rng):
    return glyphs_lib.render(factors, resolution, rng)


def register_glyphs_config(name: str, *, resolution: int, num_train: int,
                           num_test: int, seed: int = 0) -> str:
  """Adds a ``glyphs`` config (idempotent) and returns ``'glyphs/<name>'``."""
  return _register(Glyphs, GlyphsConfig, "glyphs", name, resolution=resolution,
                   num_train=num_train, num_test=num_test, seed=seed)
