"""A PyTorch-free reader of `torch.save` files (.pth / .pt / .bin state dicts).

Two on-disk formats, both read with `pickle` and numpy only:

    zip (torch >= 1.6)   <root>/data.pkl: the pickled object, whose tensors refer to storages by
                         key through pickle's persistent ids ('storage', <Type>Storage, key,
                         location, numel); <root>/data/<key>: each storage's raw bytes;
                         <root>/byteorder: 'little' (default) or 'big'.
    legacy (torch < 1.6) a stream of pickles: magic number, protocol version (1001), system info,
                         the object, the sorted storage keys; then per storage an int64 element
                         count and its raw bytes (little-endian).

A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: the numpy
array is `as_strided(storage[offset:], size, stride * itemsize)`, copied. Only the globals a
state dict needs are resolved (OrderedDict, tensor/parameter rebuilders, storage types, dtypes);
anything else is refused, so loading never executes arbitrary code.

    load_state_dict(path) -> {name: np.ndarray}   nested dicts flattened with '.', native dtypes
                                                  (bfloat16 as ml_dtypes.bfloat16)
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from diffusion_jax.weights.diffusers.folder import WeightsError

__all__ = ["load_state_dict", "WeightsError"]

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


class _Storage:
    """A storage's bytes, filled in when read (legacy files read them after the pickle)."""

    def __init__(self, dtype, numel: int):
        self.dtype, self.numel, self.data = np.dtype(dtype), int(numel), None


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialize(self, name: str, path: str) -> np.ndarray:
        s = self.storage
        if s.data is None:
            raise WeightsError(f"{path}: tensor {name!r} refers to a storage missing from the file")
        flat = s.data
        if self.size:
            last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
            if min(self.size) > 0 and last >= flat.size:
                raise WeightsError(f"{path}: tensor {name!r} (size {self.size}, stride "
                                   f"{self.stride}, offset {self.offset}) overruns its storage "
                                   f"of {flat.size} elements")
        elif self.offset >= flat.size:
            raise WeightsError(f"{path}: scalar tensor {name!r} overruns its storage")
        base = flat[self.offset:]
        out = np.lib.stride_tricks.as_strided(
            base, self.size, tuple(st * flat.itemsize for st in self.stride))
        return np.array(out, copy=True)


def _rebuild_tensor(storage, offset, size, stride, *args):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *args):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str, load_storage, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self._path, self._load_storage = path, load_storage

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter",
                                                 "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return lambda func, _type, args, _state: func(*args)
        if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return None                         # only passed to _rebuild_from_type_v2
        if (module, name) == ("torch", "Size"):
            return tuple
        if (module, name) == ("_codecs", "encode"):      # bytes in protocol-2 pickles
            return lambda s, enc="latin1": s.encode(enc)
        raise WeightsError(f"{self._path}: refusing to load the global {module}.{name}: not part "
                           "of a torch state dict (tensors, storages, OrderedDict)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise WeightsError(f"{self._path}: unknown persistent id {pid!r}")
        return self._load_storage(pid)


def _flatten(obj, path: str, prefix: str = "", out=None) -> dict[str, np.ndarray]:
    out = {} if out is None else out
    if isinstance(obj, _Tensor):
        out[prefix] = obj.materialize(prefix, path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, path, f"{prefix}.{k}" if prefix else str(k), out)
    return out


def _storage_dtype(pid, path):
    st = pid[1]
    if not isinstance(st, _StorageType):
        raise WeightsError(f"{path}: storage of unknown type {st!r}")
    return st.dtype


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise WeightsError(f"{path} is a zip archive but holds no <root>/data.pkl: not a "
                               "torch.save file")
        root = pkl[0][: -len("data.pkl")]
        order = "little"
        if root + "byteorder" in names:
            order = zf.read(root + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            dtype = _storage_dtype(pid, path)
            key = str(pid[2])
            if key not in storages:
                entry = f"{root}data/{key}"
                if entry not in names:
                    raise WeightsError(f"{path}: storage {entry!r} is missing from the archive")
                raw = zf.read(entry)
                if pid[1].name == "UntypedStorage":
                    dtype = np.dtype(np.uint8)
                if len(raw) % dtype.itemsize:
                    raise WeightsError(f"{path}: storage {entry!r} has {len(raw)} bytes, not a "
                                       f"multiple of {dtype} ({dtype.itemsize} bytes)")
                s = _Storage(dtype, len(raw) // dtype.itemsize)
                data = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"))
                s.data = data.astype(dtype, copy=False)
                storages[key] = s
            s = storages[key]
            if s.dtype != dtype:    # one storage viewed as another dtype
                v = _Storage(dtype, s.data.nbytes // dtype.itemsize)
                v.data = s.data.view(dtype)
                return v
            return s

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), path, load_storage).load()


def _load_legacy(path: str, f) -> Any:
    def load(what):
        try:
            return pickle.load(f, encoding="latin1")
        except Exception as e:
            raise WeightsError(f"{path}: cannot read the {what} of a legacy torch.save file "
                               f"({type(e).__name__}: {e})") from None

    if load("magic number") != _LEGACY_MAGIC:
        raise WeightsError(f"{path}: not a torch.save file (neither a zip archive nor the legacy "
                           "pickle stream with torch's magic number)")
    version = load("protocol version")
    if version != _LEGACY_PROTOCOL:
        raise WeightsError(f"{path}: unsupported legacy torch.save protocol {version!r}")
    load("system info")
    storages: dict[str, _Storage] = {}

    def load_storage(pid):
        _, stype, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        dtype = _storage_dtype(pid, path)
        key = str(key)
        if key not in storages:
            storages[key] = _Storage(dtype, numel)
        if view is not None:
            raise WeightsError(f"{path}: storage views (torch < 0.4 files) are not supported")
        return storages[key]

    u = _Unpickler(f, path, load_storage, encoding="latin1")
    try:
        obj = u.load()
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{path}: corrupt legacy torch.save file ({type(e).__name__}: "
                           f"{e})") from None
    keys = load("storage key list")
    for key in keys:
        key = str(key)
        if key not in storages:
            raise WeightsError(f"{path}: storage {key!r} is listed but no tensor uses it")
        s = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise WeightsError(f"{path}: truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", head)
        raw = f.read(numel * s.dtype.itemsize)
        if numel != s.numel or len(raw) != numel * s.dtype.itemsize:
            raise WeightsError(f"{path}: storage {key!r} is truncated or inconsistent ({numel} "
                               f"elements recorded, {s.numel} expected)")
        s.data = np.frombuffer(raw, s.dtype.newbyteorder("<")).astype(s.dtype, copy=False)
    return obj


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} of the tensors in the `torch.save` file `path` (zip or legacy format).

    Nested dicts (e.g. {'state_dict': {...}}) are flattened with '.'; non-tensor values are
    dropped. Raises WeightsError naming the file when it is missing, corrupt or not a state dict."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise WeightsError(f"torch weights file {path!r} does not exist")
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            with open(path, "rb") as f:
                if f.read(2)[:1] != b"\x80":
                    raise WeightsError(f"{path}: not a torch.save file (no zip header, no pickle "
                                       "header); tar files of torch < 0.4 are not supported")
                f.seek(0)
                obj = _load_legacy(path, f)
    except WeightsError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, struct.error) as e:
        raise WeightsError(f"{path}: corrupt torch.save file ({type(e).__name__}: {e})") from None
    if isinstance(obj, _Tensor):
        raise WeightsError(f"{path} holds a single tensor, not a state dict")
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict "
                           "(a dict of tensors)")
    out = _flatten(obj, path)
    if not out:
        raise WeightsError(f"{path} holds no tensors")
    return out
