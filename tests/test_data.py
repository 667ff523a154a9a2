"""Tests for diffusion_jax.data: offline tfds builders, sources, grain loader."""

import json
import socket
import sys
import time

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data
from diffusion_jax.data import builders
from diffusion_jax.data import shapes as shapes_lib

SHAPES_TEST = data.register_shapes_config(
    "32_test", resolution=32, num_train=600, num_test=200, seed=0)


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a network connection fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_data"))


@pytest.fixture(scope="module")
def shapes_train(data_dir):
  return data.get_dataset(SHAPES_TEST, "train", data_dir=data_dir)


def _synthetic(n=100, size=4):
  """Example i has constant image value i and label i % 10."""
  images = (np.arange(n, dtype=np.uint8)[:, None, None, None]
            * np.ones((1, size, size, 1), np.uint8))
  return data.ArraySource({"image": images,
                           "label": np.arange(n, dtype=np.int32) % 10})


def _ids(batch):
  return np.rint((batch["x"][:, 0, 0, 0] + 1.0) * 127.5).astype(int)


# ----------------------------------------------------------------- digits ---


@pytest.mark.parametrize("res", [16, 32])
def test_digits_prepared_offline_and_correct(data_dir, no_network, res):
  from sklearn.datasets import load_digits
  train = data.get_dataset(f"digits/{res}", "train", data_dir=data_dir)
  test = data.get_dataset(f"digits/{res}", "test", data_dir=data_dir)
  assert (len(train), len(test)) == (1500, 297)
  imgs = train.arrays["image"]
  assert imgs.shape == (1500, res, res, 1) and imgs.dtype == np.uint8
  assert set(np.unique(train.arrays["label"])) == set(range(10))
  assert set(np.unique(test.arrays["label"])) == set(range(10))
  # Stored images are exactly our upsampling of the deterministic train split.
  d = load_digits()
  idx = builders.digits_split_indices()["train"]
  expected = builders.upsample_digits(d.images[idx], res)
  assert sorted(x.tobytes() for x in imgs) == sorted(
      x.tobytes() for x in expected)
  # ... and the upsampling is right: block-averaging recovers the 8x8 digits.
  allimg = builders.upsample_digits(d.images, res).astype(np.float64)
  k = res // 8
  down = allimg[..., 0].reshape(-1, 8, k, 8, k).mean(axis=(2, 4))
  for a, b in zip(down, d.images):
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------- shapes ---


def _alpha(image, color):
  rgb = shapes_lib.PALETTE[color].astype(np.float64)
  c = int(np.argmax(rgb))
  return image[..., c] / rgb[c]


def test_shapes_factors_round_trip(shapes_train):
  src = shapes_train
  assert len(src) == 600
  imgs, f = src.arrays["image"], src.arrays["factors"]
  assert imgs.shape == (600, 32, 32, 3) and imgs.dtype == np.uint8
  assert f["shape"].dtype == np.int32 and f["scale"].dtype == np.float32
  for k in ("scale", "pos_x", "pos_y", "rotation"):
    assert 0.0 <= f[k].min() and f[k].max() <= 1.0
  np.testing.assert_array_equal(src.arrays["label"], f["shape"])
  cx, cy, r = shapes_lib.factors_to_pixels(f, 32)
  yy, xx = np.mgrid[:32, :32] + 0.5
  areas = []
  for i in range(len(src)):
    a = _alpha(imgs[i], f["color"][i])
    # Centroid of the anti-aliased mask = position factor (within a pixel).
    assert abs((a * xx).sum() / a.sum() - cx[i]) < 1.0
    assert abs((a * yy).sum() / a.sum() - cy[i]) < 1.0
    # Shape pixels have the colour factor's colour (exact where covered).
    col = shapes_lib.PALETTE[f["color"][i]]
    full = np.all(imgs[i] == col, axis=-1)
    assert full.sum() >= 4
    lit = imgs[i].max(-1) > 0
    assert np.abs(imgs[i][lit] - a[lit, None] * col).max() <= 1.0
    areas.append(a.sum())
  areas = np.asarray(areas)
  for s in range(len(shapes_lib.SHAPE_NAMES)):
    m = f["shape"] == s
    # Area grows with the scale factor (~ radius^2, fixed ratio per shape).
    order = np.argsort(f["scale"][m])
    assert np.corrcoef(f["scale"][m][order], areas[m][order])[0, 1] > 0.95
    ratio = areas[m] / r[m] ** 2
    assert ratio.std() / ratio.mean() < 0.1


def test_shapes_rotation_and_determinism():
  f = {"shape": np.array([3, 3]), "color": np.array([0, 0]),
       "scale": np.array([1.0, 1.0]), "pos_x": np.array([0.5, 0.5]),
       "pos_y": np.array([0.5, 0.5]), "rotation": np.array([0.0, 0.5])}
  a = shapes_lib.render_alpha(f, 64)
  assert np.abs(np.rot90(a[0], 2) - a[1]).max() < 0.15  # 180 deg rotation
  assert np.abs(a[0] - a[1]).max() > 0.5  # the heart is not symmetric
  f1 = shapes_lib.sample_factors(np.random.default_rng(3), 50)
  f2 = shapes_lib.sample_factors(np.random.default_rng(3), 50)
  np.testing.assert_array_equal(shapes_lib.render(f1, 32),
                                shapes_lib.render(f2, 32))
  f3 = shapes_lib.sample_factors(np.random.default_rng(4), 50)
  assert not np.array_equal(f1["pos_x"], f3["pos_x"])


def test_shapes_builder_deterministic(shapes_train, tmp_path, no_network):
  other = data.get_dataset(SHAPES_TEST, "train", data_dir=str(tmp_path))
  order = lambda s: np.lexsort([s.arrays["factors"]["pos_x"]])
  for k in ("image", "label"):
    np.testing.assert_array_equal(shapes_train.arrays[k][order(shapes_train)],
                                  other.arrays[k][order(other)])


def test_lazy_tfds_source_matches_cache(shapes_train, data_dir):
  lazy = data.get_dataset(SHAPES_TEST, "train", data_dir=data_dir, cache=False)
  assert isinstance(lazy, data.TfdsSource)
  batch = lazy.get_batch([5, 7])
  np.testing.assert_array_equal(batch["image"], shapes_train.arrays["image"][[5, 7]])
  assert batch["factors"]["pos_x"][1] == shapes_train.arrays["factors"]["pos_x"][7]


def test_dataset_info(data_dir):
  info = data.dataset_info("shapes/64")
  assert info.image_shape == (64, 64, 3) and info.num_classes == 4
  assert set(info.factor_names) == set(shapes_lib.FACTOR_NAMES)
  assert info.factor_num_classes["color"] == 6
  assert info.factor_num_classes["pos_x"] is None
  assert data.dataset_info("digits/32").image_shape == (32, 32, 1)
  assert data.dataset_info("cifar10", data_dir=data_dir).num_classes == 10
  celeb = data.dataset_info("celeb_a", data_dir=data_dir, image_size=64)
  assert celeb.image_shape == (64, 64, 3) and celeb.num_classes is None


# ----------------------------------------------------------------- loader ---


def test_loader_range_dtype_and_factors(shapes_train):
  it = data.make_loader(shapes_train, batch_size=32, seed=0, random_flip=True,
                        process_index=0, process_count=1)
  b = next(it)
  assert b["x"].dtype == np.float32 and b["x"].shape == (32, 32, 32, 3)
  assert b["x"].min() >= -1.0 and b["x"].max() <= 1.0
  assert b["x"].min() == -1.0  # black background
  assert b["label"].dtype == np.int32 and b["label"].shape == (32,)
  assert b["factors"]["pos_x"].shape == (32,)


def test_loader_deterministic_and_epochs():
  src = _synthetic(100)
  kw = dict(batch_size=20, process_index=0, process_count=1)
  a = data.make_loader(src, seed=1, **kw)
  b = data.make_loader(src, seed=1, **kw)
  ea = [_ids(next(a)) for _ in range(10)]
  eb = [_ids(next(b)) for _ in range(10)]
  assert all(np.array_equal(x, y) for x, y in zip(ea, eb))
  ep0, ep1 = np.concatenate(ea[:5]), np.concatenate(ea[5:])
  assert sorted(ep0) == sorted(ep1) == list(range(100))  # each a permutation
  assert not np.array_equal(ep0, ep1)  # reshuffled per epoch
  c = data.make_loader(src, seed=2, **kw)
  assert not np.array_equal(_ids(next(c)), ea[0])
  ordered = data.make_loader(src, seed=1, shuffle=False, num_epochs=1, **kw)
  assert np.array_equal(np.concatenate([_ids(x) for x in ordered]),
                        np.arange(100))  # finite: stops after one epoch


def test_loader_drops_remainder():
  it = data.make_loader(_synthetic(50), batch_size=16, seed=0, num_epochs=2,
                        process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 2 * data.batches_per_epoch(50, 16) == 6
  assert all(len(b["label"]) == 16 for b in batches)


def test_loader_process_sharding():
  src = _synthetic(100)
  glob = data.make_loader(src, batch_size=20, seed=3, random_flip=True,
                          process_index=0, process_count=1)
  procs = [data.make_loader(src, batch_size=20, seed=3, random_flip=True,
                            process_index=p, process_count=2) for p in (0, 1)]
  seen = []
  for _ in range(5):  # one epoch
    g = _ids(next(glob))
    p0, p1 = (_ids(next(p)) for p in procs)
    assert len(p0) == len(p1) == 10
    assert not set(p0) & set(p1)  # disjoint
    np.testing.assert_array_equal(np.concatenate([p0, p1]), g)
    seen += list(p0) + list(p1)
  assert sorted(seen) == list(range(100))


def test_loader_flip(data_dir):
  src = data.get_dataset("digits/16", "train", data_dir=data_dir)
  kw = dict(batch_size=64, seed=0, shuffle=False, process_index=0,
            process_count=1)
  plain = next(data.make_loader(src, **kw))["x"]
  flipped = next(data.make_loader(src, random_flip=True, **kw))["x"]
  same = np.all(plain == flipped, axis=(1, 2, 3))
  mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
  assert np.all(same | mirrored) and 10 < mirrored.sum() < 54


def test_loader_state_resumption(shapes_train):
  kw = dict(batch_size=64, seed=5, random_flip=True, process_index=1,
            process_count=2)
  it = data.make_loader(shapes_train, **kw)
  for _ in range(7):  # 9 batches per epoch: the continuation crosses epochs
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  expected = [next(it) for _ in range(5)]
  resumed = data.make_loader(shapes_train, **kw)
  resumed.set_state(state)
  for e, r in zip(expected, (next(resumed) for _ in range(5))):
    np.testing.assert_array_equal(e["x"], r["x"])
    np.testing.assert_array_equal(e["label"], r["label"])
    np.testing.assert_array_equal(e["factors"]["scale"], r["factors"]["scale"])


def test_loader_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  src = _synthetic(100)
  kw = dict(batch_size=8, seed=0, process_index=0, process_count=1)
  it = data.make_loader(src, **kw)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [_ids(next(it)) for _ in range(4)]
  restored = data.make_loader(src, **kw)
  mngr.restore(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(restored)))
  assert all(np.array_equal(e, _ids(next(restored))) for e in expected)


def test_loader_bad_arguments():
  src = _synthetic(100)
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.make_loader(src, batch_size=9, seed=0, process_index=0,
                     process_count=2)
  with pytest.raises(ValueError, match="larger than the dataset"):
    data.make_loader(src, batch_size=128, seed=0, process_index=0,
                     process_count=1)
  with pytest.raises(ValueError, match="process_index"):
    data.make_loader(src, batch_size=8, seed=0, process_index=2,
                     process_count=2)


# ------------------------------------------------------ names and errors ---


def test_unknown_dataset_lists_known():
  with pytest.raises(data.UnknownDatasetError) as e:
    data.get_dataset("mnist_but_typo")
  for name in ("digits/16", "digits/32", "shapes/32", "shapes/64", "cifar10",
               "celeb_a", "folder:"):
    assert name in str(e.value)
  with pytest.raises(ValueError):
    data.get_dataset("digits/64")


def test_cifar10_unprepared_fails_fast(tmp_path, no_network):
  t0 = time.time()
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.get_dataset("cifar10", "train", data_dir=str(tmp_path))
  assert time.time() - t0 < 10
  msg = str(e.value)
  assert "'cifar10'" in msg and str(tmp_path) in msg
  assert (f"tfds build cifar10 --file_format=array_record "
          f"--data_dir={tmp_path}") in msg
  assert "TensorFlow" in msg
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or created
  assert isinstance(e.value, ValueError)


def test_folder_dataset(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ("cats", "dogs"):
    (tmp_path / cls).mkdir()
    for i in range(6):
      arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
      Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
  src = data.get_dataset(f"folder:{tmp_path}", image_size=16)
  assert len(src) == 12 and src[0]["image"].shape == (16, 16, 3)
  assert sorted(set(int(src[i]["label"]) for i in range(12))) == [0, 1]
  info = data.dataset_info(f"folder:{tmp_path}", image_size=16)
  assert info.image_shape == (16, 16, 3) and info.num_classes == 2
  b = next(data.make_loader(src, batch_size=4, seed=0, process_index=0,
                            process_count=1))
  assert b["x"].shape == (4, 16, 16, 3) and b["x"].dtype == np.float32
  raw = data.get_dataset(f"folder:{tmp_path}")
  assert raw[3]["image"].shape == (20, 24, 3)
  with pytest.raises(ValueError, match="split"):
    data.get_dataset(f"folder:{tmp_path}", "test")


# ----------------------------------------------------------------- glyphs ---
from diffusion_jax.data import glyphs as glyphs_lib  # noqa: E402

GLYPHS_TEST = data.register_glyphs_config(
    "32_test", resolution=32, num_train=240, num_test=60, seed=0)


def test_glyphs_built_offline_with_labelled_factors(data_dir, no_network):
  src = data.get_dataset(GLYPHS_TEST, "train", data_dir=data_dir)
  a = src.arrays
  assert a["image"].shape == (240, 32, 32, 3) and a["image"].dtype == np.uint8
  f = a["factors"]
  assert set(f) == set(glyphs_lib.FACTOR_NAMES)
  np.testing.assert_array_equal(a["label"], f["glyph"])
  assert set(np.unique(f["glyph"])) == set(range(len(glyphs_lib.GLYPH_NAMES)))
  assert set(np.unique(f["background"])) == set(range(len(glyphs_lib.BACKGROUND_NAMES)))
  for k in ("scale", "pos_x", "pos_y", "rotation", "hue"):
    assert 0.0 <= f[k].min() and f[k].max() <= 1.0
  info = data.dataset_info(GLYPHS_TEST, data_dir=data_dir)
  assert info.num_classes == 6 and info.factor_num_classes["glyph"] == 6
  # the glyph sits at its factors' centre in its colour (value 1 > any background's 0.5)
  cx, cy, half, _ = glyphs_lib.glyph_geometry(f, 32)
  alpha = glyphs_lib.render_alpha(f, 32)
  for i in range(20):
    full = alpha[i] == 1.0
    assert full.any()
    ys, xs = np.nonzero(alpha[i] > 0)
    assert abs(xs.mean() + 0.5 - cx[i]) < 0.35 * half[i] and abs(ys.mean() + 0.5 - cy[i]) < 0.35 * half[i]
    assert a["image"][i][full].max(axis=-1).mean() > 200


def test_glyph_areas_and_determinism():
  n = 6
  f = {"glyph": np.arange(n, dtype=np.int32), "scale": np.ones(n, np.float32),
       "pos_x": np.full(n, 0.5, np.float32), "pos_y": np.full(n, 0.5, np.float32),
       "rotation": np.full(n, 0.5, np.float32), "hue": np.zeros(n, np.float32),
       "background": np.zeros(n, np.int32)}
  area = glyphs_lib.render_alpha(f, 64).sum((1, 2))
  h = 64 * glyphs_lib.S_MAX
  np.testing.assert_allclose(area[2], np.pi * (0.95 ** 2 - 0.55 ** 2) * h * h, rtol=0.03)   # ring
  np.testing.assert_allclose(area[4], (1.44 * h) ** 2, rtol=0.03)                          # square
  np.testing.assert_allclose(area[0], area[1], rtol=0.03)            # 'x' is '+' turned by 45 degrees
  one = glyphs_lib.render(f, 32, np.random.default_rng(1))
  np.testing.assert_array_equal(one, glyphs_lib.render(f, 32, np.random.default_rng(1)))
  assert not np.array_equal(one, glyphs_lib.render(f, 32, np.random.default_rng(2)))
