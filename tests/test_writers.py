"""metrics.jsonl and TensorBoard event files (written without TensorFlow)."""

import json
import struct

from jaxmed.train.writers import (MetricWriter, crc32c, read_metrics, read_tfrecords)


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value


def _scalars(record: bytes) -> dict:
    """Minimal independent protobuf walk of Event.summary.value (tag, simple_value)."""
    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                val, i = _varint(buf, i)
            elif wire == 1:
                val, i = buf[i:i + 8], i + 8
            elif wire == 5:
                val, i = buf[i:i + 4], i + 4
            else:
                n, i = _varint(buf, i)
                val, i = buf[i:i + n], i + n
            yield num, val
    out = {}
    for num, summary in fields(record):
        if num == 5:
            for _, value in fields(summary):
                f = dict(fields(value))
                out[f[1].decode()] = struct.unpack("<f", f[2])[0]
    return out


def _varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def test_jsonl_and_events_round_trip(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(10, {"train/loss": 0.5, "train/accuracy": 0.75})
    w.write(20, {"val/auc": 0.875, "val/loss": float("nan")})
    w.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[0] == {"step": 10, "train/loss": 0.5, "train/accuracy": 0.75}
    assert lines[1]["val/loss"] == "nan"
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    records = read_tfrecords(str(event_file))
    assert b"brain.Event:2" in records[0]
    assert _scalars(records[1]) == {"train/loss": 0.5, "train/accuracy": 0.75}
    assert _scalars(records[2])["val/auc"] == 0.875


def test_resumed_writer_appends_and_reader_keeps_latest(tmp_path):
    for value in (1.0, 2.0):
        w = MetricWriter(str(tmp_path))
        w.write(5, {"train/loss": value})
        w.close()
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 2
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[5]["train/loss"] == 2.0
