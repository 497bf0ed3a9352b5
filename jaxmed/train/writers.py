"""Metric writers: `metrics.jsonl` (one JSON object per line: `step` and `<split>/<metric>`)
and TensorBoard event files, written directly (TFRecord framing + the Event protobuf's few
fields), so no TensorFlow is needed. Only the lead process writes. Lines are appended and flushed
at once: a crash never loses what was written, and a resumed run appends after it (readers keep
the last value per step and key: `read_metrics`)."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping

import numpy as np


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """tensorflow.Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5;
    Summary.value=1; Value.tag=1, Value.simple_value=2 (float)."""
    msg = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                         + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        msg += _bytes_field(5, summary)
    return msg


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack(
        "<I", masked_crc(data))


def read_tfrecords(path: str) -> list[bytes]:
    """Read back a TFRecord file, checking both CRCs of every record."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise ValueError(f"{path}: corrupt record length")
            data = f.read(length)
            if struct.unpack("<I", f.read(4))[0] != masked_crc(data):
                raise ValueError(f"{path}: corrupt record")
            out.append(data)
    return out


def _to_float(v: Any) -> float | None:
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        return None
    return f


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/` (lead process)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._events = None
        if enabled:
            os.makedirs(os.path.join(workdir, "tensorboard"), exist_ok=True)
            name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
            self._events = open(os.path.join(workdir, "tensorboard", name), "ab")
            self._events.write(tfrecord(encode_event(time.time(), 0,
                                                     file_version="brain.Event:2")))
            self._events.flush()

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in scalars.items():
            f = _to_float(v)
            if f is not None:
                clean[k] = f
        line = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                      for k, v in clean.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self._events.write(tfrecord(encode_event(time.time(), int(step), scalars=clean)))
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def read_metrics(path: str) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: {key: value}}, later lines overriding earlier ones."""
    out: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec.pop("step"), {}).update(rec)
    return out
