"""Metric writers: `metrics.jsonl` (one JSON object per line: `step` and `<split>/<metric>`) and
TensorBoard event files through tensorboardX (no TensorFlow), combined as small writers the way
clu's `AsyncMultiWriter` combines them. Only the lead process writes. JSON lines are appended
and flushed at once: a crash never loses what was written. A resumed run first drops what the
dead attempt wrote after the step it resumes from (`MetricWriter.resume_from`: metrics.jsonl
rewritten atomically, TensorBoard's `purge_step`), so every step is recorded once, with the
values of the attempt that survived."""

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

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps > `step` (atomically: a kill leaves the old file or the
        new one)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [x for x in lines if x.strip() and _line_step(x) <= step]
        if len(keep) == len(lines):
            return
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def close(self) -> None:
        pass


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: drop it
        return 2**62


class TensorBoardWriter:
    """Scalars as TensorBoard events (tensorboardX), flushed after every write."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        # tensorboardX names files by the second; a suffix in ns keeps two writers of one
        # second (a quick resume, consecutive phases) from sharing, or truncating, a file, and
        # keeps the names in time order (readers load files in name order). `purge_step`:
        # readers hide the earlier files' events at steps >= it (a dead attempt's).
        self.logdir = logdir
        self._writer = SummaryWriter(logdir=logdir, flush_secs=5, purge_step=purge_step,
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

    def resume_from(self, step: int) -> None:
        """A run (re)starts after `step` (-1: from scratch): forget what an earlier attempt
        recorded for later steps, in metrics.jsonl and in TensorBoard."""
        if not self.enabled:
            return
        jsonl, tb = self._writers
        jsonl.truncate_after(step)
        tb.close()
        self._writers = [jsonl, TensorBoardWriter(tb.logdir, purge_step=step + 1)]

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
