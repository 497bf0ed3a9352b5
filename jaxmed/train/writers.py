"""Metric writers: `metrics.jsonl` (one JSON object per line: `step` and `<split>/<metric>`) and
TensorBoard event files through tensorboardX (no TensorFlow), combined as small writers the way
clu's `AsyncMultiWriter` combines them. Only the lead process writes. JSON lines are appended
and flushed at once: a crash never loses what was written, and a resumed run appends after it
(readers keep the last value per step and key: `read_metrics`)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np


def scalars_of(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are scalars, as Python floats (arrays of one element included)."""
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(np.asarray(v))
        except (TypeError, ValueError):
            continue
    return out


class JsonlWriter:
    """Appends one line per `write` to a JSON-lines file; non-finite values as strings."""

    def __init__(self, path: str):
        self.path = path

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        line = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                      for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars as TensorBoard events (tensorboardX), flushed after every write."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        # tensorboardX names files by the second; a suffix in ns keeps two writers of one
        # second (a quick resume, consecutive phases) from sharing, or truncating, a file, and
        # keeps the names in time order (readers load files in name order).
        self._writer = SummaryWriter(logdir=logdir, flush_secs=5,
                                     filename_suffix=f".{time.time_ns()}.{os.getpid()}")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self._writer.add_scalar(k, v, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/` (lead process)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._writers: list = []
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._writers = [JsonlWriter(self.path),
                             TensorBoardWriter(os.path.join(workdir, "tensorboard"))]

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        clean = scalars_of(scalars)
        for w in self._writers:
            w.write(step, clean)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []


def read_metrics(path: str) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: {key: value}}, later lines overriding earlier ones."""
    out: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec.pop("step"), {}).update(rec)
    return out
