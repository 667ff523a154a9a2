"""Metrics to JSONL and TensorBoard event files, without TensorFlow (or any extra dependency).

    w = MetricsWriter(workdir, jsonl='eval_metrics.jsonl')   # TensorBoard files in workdir/tb/
    w.write(step, {'loss': 0.1, 'grad_norm': 2.0}, prefix='train/')
    w.close()

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (little-endian uint64 length,
masked CRC-32C of the length, the record, masked CRC-32C of the record) around serialised
`tensorflow.Event` protocol buffers. Only the few fields a scalar needs are written, encoded by
hand here:

    Event    wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5,
             session_log = 6 (SessionLog: status = 1, START = 1; written on resumption)
    Summary  value = 1 (repeated)
    Value    tag = 1 (string), simple_value = 2 (float)

(the first record carries file_version 'brain.Event:2'; TensorBoard turns simple_value scalars into
its scalar plugin's data). `read_scalars(path)` parses such files back (CRC-checked), for tests and
for tools without TensorBoard. Only process 0 should write (`primary=False` makes a writer a no-op).
"""
from __future__ import annotations

import glob
import json
import math
import os
import socket
import struct
import threading
import time
from typing import Any, Iterator, Mapping

__all__ = ["MetricsWriter", "EventFileWriter", "read_scalars", "read_jsonl", "crc32c",
           "masked_crc32c"]

# ------------------------------------------------------------------------------- CRC-32C
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------- protobuf bits
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1           # int64 two's complement for negatives
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int = 0, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) +
                         struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _bytes_field(5, summary)
    return out


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data +
            struct.pack("<I", masked_crc32c(data)))


class EventFileWriter:
    """Appends scalar events to one new `events.out.tfevents.<time>.<host>.<pid>.<n>` file in
    `logdir`. Thread-safe; flushes on `flush()` / `close()` and every `flush_every` records."""

    _counter = 0

    def __init__(self, logdir: str | os.PathLike, *, flush_every: int = 20):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        EventFileWriter._counter += 1
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{EventFileWriter._counter}")
        self.path = os.path.join(self.logdir, name)
        self._f = open(self.path, "ab")
        self._lock = threading.Lock()
        self._pending = 0
        self.flush_every = flush_every
        self._write(_event(time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, data: bytes) -> None:
        with self._lock:
            self._f.write(_record(data))
            self._pending += 1
            if self._pending >= self.flush_every:
                self._f.flush()
                self._pending = 0

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None):
        """One event holding every finite-or-not float of `values` (tags as given)."""
        vals = {k: float(v) for k, v in values.items()}
        if vals:
            self._write(_event(time.time() if wall_time is None else wall_time, int(step),
                               scalars=vals))

    def session_start(self, step: int, wall_time: float | None = None) -> None:
        """A SessionLog START event at `step`: TensorBoard then drops points with step >= `step`
        from earlier files (a run resumed from a checkpoint overwrites its own future)."""
        t = time.time() if wall_time is None else wall_time
        self._write(_key(1, 1) + struct.pack("<d", t) + _key(2, 0) + _varint(int(step)) +
                    _bytes_field(6, _key(1, 0) + _varint(1)))

    def flush(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                self._pending = 0

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                self._f.close()


# --------------------------------------------------------------------------------- reader
def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(buf, i)
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, v


def _records(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i + 12 <= len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: corrupt record header at byte {i}")
        body = data[i + 12:i + 12 + n]
        (bcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if bcrc != masked_crc32c(body):
            raise ValueError(f"{path}: corrupt record at byte {i}")
        yield body
        i += 16 + n


def read_scalars(path: str | os.PathLike) -> list[dict]:
    """[{'step', 'wall_time', 'tag', 'value'}] from an event file, or from every event file under
    a directory (sorted by file name)."""
    path = os.fspath(path)
    files = sorted(glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)) \
        if os.path.isdir(path) else [path]
    out = []
    for p in files:
        for rec in _records(p):
            step, wall, summary = 0, 0.0, None
            for field, _, v in _fields(rec):
                if field == 1:
                    wall = struct.unpack("<d", v)[0]
                elif field == 2:
                    step = v
                elif field == 5:
                    summary = v
            if summary is None:
                continue
            for field, _, value in _fields(summary):
                if field != 1:
                    continue
                tag, val = None, None
                for f2, _, v2 in _fields(value):
                    if f2 == 1:
                        tag = v2.decode()
                    elif f2 == 2:
                        val = struct.unpack("<f", v2)[0]
                if tag is not None and val is not None:
                    out.append({"step": step, "wall_time": wall, "tag": tag, "value": val})
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file ([] if it does not exist)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------- writer
def _json_value(v):
    v = float(v)
    return v if math.isfinite(v) else repr(v)      # JSON has no NaN / inf


class MetricsWriter:
    """Scalars to `workdir/<jsonl>` (one JSON object per call, optional) and TensorBoard event
    files in `workdir/<tb_dir>/` (optional). A no-op unless `primary` (process 0)."""

    def __init__(self, workdir: str | os.PathLike, *, jsonl: str | None = None,
                 tb_dir: str | None = "tb", primary: bool = True):
        self.workdir = os.fspath(workdir)
        self.primary = primary
        self.jsonl_path = os.path.join(self.workdir, jsonl) if jsonl else None
        self._tb = None
        if primary:
            os.makedirs(self.workdir, exist_ok=True)
            if tb_dir:
                self._tb = EventFileWriter(os.path.join(self.workdir, tb_dir))

    @property
    def tb_path(self) -> str | None:
        return None if self._tb is None else self._tb.path

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "",
              extra: Mapping[str, Any] | None = None) -> None:
        """Scalars of `metrics` (non-scalars skipped) under tags prefix + name; `extra` goes to
        the JSONL record only (e.g. strings)."""
        if not self.primary:
            return
        scalars = {}
        for k, v in metrics.items():
            try:
                scalars[k] = float(v)
            except (TypeError, ValueError):
                continue
        if self._tb is not None:
            self._tb.scalars(step, {prefix + k: v for k, v in scalars.items()})
        if self.jsonl_path:
            record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()},
                      **dict(extra or {})}
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def restart(self, step: int) -> None:
        """Marks a resumption at `step` (TensorBoard discards older points at or after it)."""
        if self._tb is not None:
            self._tb.session_start(step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
