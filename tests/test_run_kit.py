"""The top of the kit: durations in steps, loop settings from a config, and the rule that no
method opens writers or calls the loop itself (everything trains through `train.run.fit`)."""

import os
import re

import ml_collections
import pytest

from jaxmed.train import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(**kw):
    base = dict(batch_size=8, epochs=3, steps=0, log_every=5, eval_every=0, checkpoint_every=0,
                keep_checkpoints=2, early_stop_metric="", early_stop_mode="min", patience=0,
                progress=False)
    return ml_collections.ConfigDict({**base, **kw})


def test_durations_from_epochs_or_steps():
    d = run.durations(_train(epochs=3), 7)
    assert (d.total, d.num_epochs, d.epochs(2), d.epochs(0.5)) == (21, 3, 14, 4)
    d = run.durations(_train(steps=10), 7)  # steps win; the stream needs 2 epochs
    assert (d.total, d.num_epochs) == (10, 2)
    assert run.durations(_train(epochs=0), 7).total == 7  # at least one epoch
    with pytest.raises(ValueError, match="batch_size=8"):
        run.durations(_train(), 0)
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 50 training"):
        run.steps_per_epoch(50, 64)


def test_fraction_of_training_and_epoch_boundaries():
    # 9 epochs of 7 steps: 0.8 of 63 = 50.4 -> step 50, or the next epoch boundary, 56
    d = run.Durations(7, 63)
    assert d.fraction(0.8) == 50
    assert d.fraction(0.8, at_epoch=True) == 56
    assert d.fraction(5 / 9, at_epoch=True) == 35  # exactly on a boundary stays there
    assert d.fraction(1.0, at_epoch=True) == 63 and d.fraction(0.0, at_epoch=True) == 0
    assert run.Durations(7, 60).fraction(0.99, at_epoch=True) == 60  # capped at the total


def test_cadences_resolve_to_the_runs_own_epoch():
    d = run.Durations(7, 63)
    s = run.loop_settings(_train(eval_every=0, checkpoint_every=0), d)
    assert (s.steps, s.eval_every, s.checkpoint_every) == (63, 7, 7)
    s = run.loop_settings(_train(eval_every=-1, checkpoint_every=5), d, progress=True)
    assert (s.eval_every, s.checkpoint_every, s.progress) == (-1, 5, True)
    assert (d.every(0), d.every(-1), d.every(4)) == (7, 0, 4)


def test_no_method_calls_the_loop_or_opens_writers():
    """Acceptance of the run kit: every method trains through `train.run.fit`."""
    hits = []
    for root, _, files in os.walk(os.path.join(REPO, "jaxmed", "methods")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(root, f)).read()
                hits += [f"{f}: {m}" for m in re.findall(r"train_loop\(|MetricWriter\(", text)]
    assert not hits, hits
