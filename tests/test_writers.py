"""metrics.jsonl and TensorBoard event files, read back with tensorboard's own reader."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxmed.train.writers import MetricWriter, read_metrics


def tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard_hold_the_same_scalars(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(10, {"train/loss": 0.5, "train/accuracy": np.float32(0.75), "note": "skipped"})
    w.write(20, {"val/auc": 0.875, "val/loss": float("nan")})
    w.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[0] == {"step": 10, "train/loss": 0.5, "train/accuracy": 0.75}
    assert lines[1] == {"step": 20, "val/auc": 0.875, "val/loss": "nan"}
    tb = tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert set(tb) == {"train/loss", "train/accuracy", "val/auc", "val/loss"}
    assert tb["train/loss"] == {10: 0.5} and tb["train/accuracy"] == {10: 0.75}
    assert tb["val/auc"] == {20: 0.875} and math.isnan(tb["val/loss"][20])


def test_training_run_tensorboard_matches_metrics_jsonl(tmp_path):
    """A real (tiny) run: every finite scalar of metrics.jsonl is in the event files, at its
    step, with its value (float32 precision)."""
    from jaxmed.methods import supervised
    from tests.configs import tiny

    cfg = tiny.get_config()
    cfg.train.steps, cfg.train.epochs, cfg.train.log_every = 4, 0, 2
    supervised.train_and_evaluate(cfg, str(tmp_path))
    jsonl = read_metrics(str(tmp_path / "metrics.jsonl"))
    tb = tensorboard_scalars(str(tmp_path / "tensorboard"))
    checked = 0
    for step, values in jsonl.items():
        for k, v in values.items():
            if isinstance(v, float) and math.isfinite(v):
                assert tb[k][step] == pytest.approx(v, rel=1e-6, abs=1e-7), (k, step)
                checked += 1
    assert checked >= 6 and "train/loss" in tb and "test/accuracy" in tb


def test_resumed_writer_appends_and_reader_keeps_latest(tmp_path):
    for value in (1.0, 2.0):
        w = MetricWriter(str(tmp_path))
        w.write(5, {"train/loss": value})
        w.close()
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 2
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[5]["train/loss"] == 2.0
    # tensorboard reads both event files; at a repeated step the resumed run's value wins
    assert tensorboard_scalars(str(tmp_path / "tensorboard"))["train/loss"] == {5: 2.0}
