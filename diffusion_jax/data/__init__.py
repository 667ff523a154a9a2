"""Data layer: offline tfds datasets, a TF-free read path and grain loaders.

Quick start::

  from diffusion_jax import data
  ds = data.get_dataset("shapes/32", "train")   # random-access source
  it = data.make_loader(ds, batch_size=128, seed=0, random_flip=True)
  batch = next(it)      # {'x': f32[B,32,32,3] in [-1,1], 'label': i32[B],
                        #  'factors': {'shape', 'scale', 'pos_x', ...}}
  state = it.get_state(); ...; it.set_state(state)     # exact resumption

What works with tensorflow-datasets 4.9.10 and no TensorFlow (checked):

* Reading: ``tfds.data_source(name, data_dir=..., download=False)`` /
  ``builder.as_data_source()`` on array_record data is TF-free (tf.Example
  protos parsed in numpy, images decoded with PIL). GCS access is disabled in
  tfds by default, so an unprepared dataset fails fast and offline; we check
  ``builder.is_prepared()`` first to raise ``DatasetNotPreparedError`` with the
  exact ``tfds build ... --file_format=array_record`` command instead of tfds'
  misleading "file format TFRECORD is not supported" error.
* Writing: ``GeneratorBasedBuilder.download_and_prepare(file_format=
  'array_record')`` is TF-free (tfds' serializer is pure protobuf) except that
  ``tfds.features.Image`` encodes numpy images with ``tf.image.encode_png``;
  passing PNG bytes encoded with PIL avoids it. Builders defined inside a
  package also need ``importlib_resources`` for ``code_path`` (not installed),
  so the embedded builders pin ``code_path``. ``tfds.folder_dataset.ImageFolder``
  needs TF, hence our own PIL ``ImageFolderSource`` for ``folder:`` datasets.
* Real datasets (cifar10, celeb_a) still need TensorFlow once, on a machine
  with internet, to run ``tfds build``; reading them afterwards does not.
"""

from diffusion_jax.data.builders import (Digits, DigitsConfig, Glyphs, GlyphsConfig,
                                         Shapes, ShapesConfig, register_glyphs_config,
                                         register_shapes_config)
from diffusion_jax.data.pipeline import (batches_per_epoch, make_loader,
                                         make_pipeline, to_model_input)
from diffusion_jax.data.sources import (ArraySource, DatasetInfo,
                                        DatasetNotPreparedError,
                                        ImageFolderSource, TfdsSource,
                                        UnknownDatasetError, check_prepared,
                                        dataset_info, default_data_dir,
                                        get_dataset, known_datasets, prepare,
                                        stack_examples)

__all__ = [
    "ArraySource", "DatasetInfo", "DatasetNotPreparedError", "Digits",
    "DigitsConfig", "ImageFolderSource", "Shapes", "ShapesConfig",
    "TfdsSource", "UnknownDatasetError", "batches_per_epoch", "check_prepared",
    "dataset_info", "default_data_dir", "get_dataset", "known_datasets",
    "make_loader", "make_pipeline", "prepare", "register_shapes_config", "register_glyphs_config", "Glyphs", "GlyphsConfig",
    "stack_examples", "to_model_input",
]
