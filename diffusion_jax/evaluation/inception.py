"""The FID Inception-v3 network (TF's 2015-12-05 graph as ported by pytorch-fid) in Flax, loaded
from the published PyTorch weights without PyTorch.

Topology: pytorch-fid's `fid_inception_v3` (torchvision Inception3 with FIDInceptionA/C/E_1/E_2):
BasicConv2d = conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; the A, C and
first E blocks' pool branch is a 3x3 average pool that does NOT count the zero padding
(count_include_pad=False, TF's behaviour); the last E block's is a 3x3 max pool (a quirk of the
TF graph). Outputs, for x (B, 299, 299, 3) in [-1, 1]:

    pool3            (B, 2048)  spatial mean after Mixed_7c: FID / KID / precision-recall features
    logits_unbiased  (B, 1008)  pool3 @ W_fc^T: torch-fidelity's Inception Score input
    logits           (B, 1008)  pool3 @ W_fc^T + b_fc

Preprocessing (`preprocess`, images in [0, 1] or uint8 [0, 255], any size, 1 or 3 channels):
    resize='reference'  pytorch-fid: bilinear resize to 299x299 without antialiasing (PyTorch
                        F.interpolate(mode='bilinear', align_corners=False), here
                        jax.image.resize 'linear', antialias=False: the same half-pixel
                        interpolation with edge clamping), inside the jitted function
    resize='clean'      clean-fid: PIL bicubic resize of each channel as a float ('F') image,
                        values in [0, 255] clipped to [0, 255] (host-side numpy / PIL)
then x -> 2 x - 1. Grey images are repeated to 3 channels (as PIL's convert('RGB')).

Weights: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's FID_WEIGHTS_URL), read by
`weights.torch_pickle`; `convert_state_dict` maps every pytorch-fid key to the Flax variables
(conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); bn weight/bias -> scale/bias; running
mean/var -> batch_stats; num_batches_tracked dropped) or raises naming the key.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.weights.diffusers.folder import WeightsError

__all__ = ["FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "WEIGHTS_FIELD", "FIDInceptionV3",
           "convert_state_dict", "load_inception_variables", "preprocess", "clean_resize",
           "InceptionFeatureExtractor", "RESIZE_MODES", "INPUT_SIZE", "missing_weights_message"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
WEIGHTS_FIELD = "config.quality.inception_weights"
RESIZE_MODES = ("reference", "clean")
INPUT_SIZE = 299
_HI = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
    """relu(BN(conv(x))), conv without bias; `padding` (ph, pw) symmetric as PyTorch's."""
    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.strides, ((ph, ph), (pw, pw)),
                    use_bias=False, precision=_HI, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_no_pad(x):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, nn.max_pool(x, (3, 3), (2, 2))], -1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, nn.max_pool(x, (3, 3), (2, 2))], -1)


class InceptionE(nn.Module):
    """pool='avg' (padding-excluding, FIDInceptionE_1) or 'max' (FIDInceptionE_2)."""
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "avg":
            p = _avg_pool_no_pad(x)
        else:
            p = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(p)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
    """`apply(variables, x) -> {'pool3', 'logits_unbiased', 'logits'}` for x (B, H, W, 3) in
    [-1, 1] (H, W >= 75; 299 for the published statistics)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                        ("Mixed_6e", 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool3 = x.mean(axis=(1, 2))
        fc = nn.Dense(1008, precision=_HI, name="fc")
        logits = fc(pool3)
        unbiased = logits - fc.variables["params"]["bias"]
        return {"pool3": pool3, "logits_unbiased": unbiased, "logits": logits}


# ----------------------------------------------------------------------------------- weights
def _template():
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def convert_state_dict(state: dict[str, np.ndarray], source: str = "state dict") -> dict:
    """Flax variables {'params', 'batch_stats'} of `FIDInceptionV3` from pytorch-fid's state
    dict; every key is consumed (num_batches_tracked ignored) or WeightsError names it, and every
    Flax leaf must be filled."""
    tmpl = _template()
    flat_tmpl = {tuple(k.key for k in path): leaf for path, leaf in
                 jax.tree_util.tree_flatten_with_path(tmpl)[0]}
    out: dict[tuple, np.ndarray] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        mod, leaf = parts[:-1], parts[-1]
        value = np.asarray(value, np.float32)
        if mod and mod[-1] == "conv" and leaf == "weight" and value.ndim == 4:
            target, value = ("params", *mod, "kernel"), value.transpose(2, 3, 1, 0)
        elif mod == ["fc"] and leaf == "weight" and value.ndim == 2:
            target, value = ("params", "fc", "kernel"), value.T
        elif mod == ["fc"] and leaf == "bias":
            target = ("params", "fc", "bias")
        elif mod and mod[-1] == "bn" and leaf in ("weight", "bias", "running_mean", "running_var"):
            coll = "params" if leaf in ("weight", "bias") else "batch_stats"
            name = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                    "running_var": "var"}[leaf]
            target = (coll, *mod, name)
        else:
            raise WeightsError(f"{source}: key {key!r} has no counterpart in the FID Inception-v3 "
                               "network (expected pytorch-fid's fid_inception_v3 state dict)")
        if target not in flat_tmpl:
            raise WeightsError(f"{source}: key {key!r} has no counterpart in the FID Inception-v3 "
                               "network (expected pytorch-fid's fid_inception_v3 state dict)")
        want = tuple(flat_tmpl[target].shape)
        if value.shape != want:
            raise WeightsError(f"{source}: key {key!r} has shape {value.shape} after conversion, "
                               f"the network expects {want}")
        out[target] = value
    missing = [t for t in flat_tmpl if t not in out]
    if missing:
        t = missing[0]
        raise WeightsError(f"{source}: {len(missing)} FID Inception-v3 tensors are missing, e.g. "
                           f"{'/'.join(t)}")
    variables: dict[str, Any] = {}
    for path, v in out.items():
        d = variables
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = jnp.asarray(v)
    return variables


def missing_weights_message(path: str | None) -> str:
    """One line: what is missing, the field that takes the file, where it is published."""
    what = (f"FID Inception weights file {path!r} does not exist" if path else
            f"FID Inception weights ({FID_WEIGHTS_FILE}) not given")
    return (f"{what}: set {WEIGHTS_FIELD} (--{WEIGHTS_FIELD}=/path/to/{FID_WEIGHTS_FILE}); "
            f"the file is published at {FID_WEIGHTS_URL}")


def load_inception_variables(path: str | None) -> dict:
    """Flax variables of `FIDInceptionV3` from the pytorch-fid weights file at `path`."""
    from diffusion_jax.weights.torch_pickle import load_state_dict
    if not path or not os.path.isfile(os.path.expanduser(str(path))):
        raise WeightsError(missing_weights_message(path))
    path = os.path.abspath(os.path.expanduser(str(path)))
    return convert_state_dict(load_state_dict(path), source=path)


# ----------------------------------------------------------------------------- preprocessing
def _to_unit_float(images) -> np.ndarray:
    """(B, H, W, 3) float32 in [0, 1] from uint8 [0, 255] or float [0, 1] images, C in {1, 3}."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, C) with C = 1 or 3, got shape {x.shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def clean_resize(x: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's resize: each channel of each image, scaled to [0, 255], as a PIL 'F' image
    resized bicubically to size x size, clipped to [0, 255]; returned in [0, 1]."""
    from PIL import Image
    x = _to_unit_float(x) * 255.0
    out = np.empty((x.shape[0], size, size, 3), np.float32)
    for i in range(x.shape[0]):
        for c in range(3):
            img = Image.fromarray(np.ascontiguousarray(x[i, :, :, c]), mode="F")
            out[i, :, :, c] = np.asarray(img.resize((size, size), resample=Image.BICUBIC))
    return np.clip(out, 0.0, 255.0) / 255.0


def preprocess(x, resize: str = "reference"):
    """x (B, H, W, 3) in [0, 1] (jax) -> the network's input in [-1, 1]: 'reference' resizes
    bilinearly to 299 (no antialiasing) here; 'clean' expects `clean_resize`d input."""
    if resize == "reference" and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), "linear",
                             antialias=False, precision=_HI)
    return 2.0 * x - 1.0


# ------------------------------------------------------------------------------- extraction
class InceptionFeatureExtractor:
    """Inception features of image batches: `extract(images)` -> {'pool3', 'logits_unbiased'}
    (numpy float32); `stream(batches)` yields the same per input batch.

    Every batch is padded to `batch_size` so the jitted network compiles once per image size;
    with a `mesh`, batches are sharded over its 'data' axis (batch_size must divide by its size)
    and the variables replicated. A tqdm bar counts batches when `progress`.
    """

    OUTPUTS = ("pool3", "logits_unbiased")

    def __init__(self, variables: dict, *, batch_size: int = 50, resize: str = "reference",
                 mesh: jax.sharding.Mesh | None = None, progress: bool = True):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.resize, self.mesh, self.progress = batch_size, resize, mesh, progress
        self._net = FIDInceptionV3()
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec
            n = mesh.shape["data"]
            if batch_size % n:
                raise ValueError(f"batch_size {batch_size} must divide by the mesh's 'data' "
                                 f"axis ({n} devices)")
            self._x_sharding = NamedSharding(mesh, PartitionSpec("data"))
            variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
        else:
            self._x_sharding = None
        self.variables = variables

        def fn(v, x):
            out = self._net.apply(v, preprocess(x, resize))
            return {k: out[k] for k in self.OUTPUTS}

        self._fn = jax.jit(fn)

    @classmethod
    def from_file(cls, path: str | None, **kw) -> "InceptionFeatureExtractor":
        return cls(load_inception_variables(path), **kw)

    def _run(self, images) -> dict[str, np.ndarray]:
        x = clean_resize(images) if self.resize == "clean" else _to_unit_float(images)
        n = x.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images exceeds batch_size {self.batch_size}")
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        x = jax.device_put(x, self._x_sharding) if self._x_sharding is not None else x
        out = self._fn(self.variables, x)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def stream(self, batches: Iterable, total: int | None = None) -> Iterator[dict]:
        """Features of each batch (each of at most batch_size images), in order."""
        from tqdm.auto import tqdm
        for b in tqdm(batches, total=total, disable=not self.progress, unit="batch",
                      desc="Inception features", leave=False):
            yield self._run(b)

    def extract(self, images) -> dict[str, np.ndarray]:
        """Features of all `images` (N, H, W, C), in batches of batch_size."""
        n = len(images)
        chunks = (images[i:i + self.batch_size] for i in range(0, n, self.batch_size))
        outs = list(self.stream(chunks, total=-(-n // self.batch_size)))
        return {k: np.concatenate([o[k] for o in outs]) for k in self.OUTPUTS}
