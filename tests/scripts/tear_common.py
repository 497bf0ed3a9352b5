"""Shared by the TEAR tests: a tiny model, an SSL state and step for any algorithm, and
deterministic fake batches (no data pipeline)."""

import jax
import numpy as np

from jaxmed.methods.tear import algorithms
from jaxmed.methods.tear.step import Hyper, create_ssl_state, init_memory, make_ssl_step
from jaxmed.models import create_model
from jaxmed.train.state import TrainState

import optax

C, SIZE, B, MU, SLOTS = 3, 16, 8, 2, 64


def make_state_and_step(name, *, strong_fn=None, hyper=None, lr=1e-2):
    """(state, step) of algorithm `name` on a width-4 ResNet-8 (unjitted, on the host)."""
    model = create_model("resnet8", C, width=4)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
    tx = optax.adam(lr)
    base = TrainState.create(variables, tx, jax.random.PRNGKey(1))
    hp = hyper or Hyper(num_classes=C, total_steps=10, ema_p=0.9, teacher_momentum=0.9)
    alg = algorithms.get(name)
    mem = init_memory(alg, hp, params=base.params, batch_stats=base.batch_stats,
                      num_slots=SLOTS, num_unlabeled=SLOTS - B, feature_dim=16)
    labels = np.arange(SLOTS, dtype=np.int32) % C
    step = make_ssl_step(model, tx, alg, hp, unlabeled_labels=labels, strong_fn=strong_fn)
    return create_ssl_state(base, mem, SLOTS), step


def fake_batch(seed=0, supervised=False):
    """Labeled rows 0..B-1, unlabeled rows with indices B.. (one padded unlabeled row)."""
    rng = np.random.default_rng(seed)
    img = lambda n: rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)  # noqa: E731
    lab = {"image": img(B), "label": (np.arange(B) % C).astype(np.int32),
           "index": np.arange(B, dtype=np.int32), "valid": np.ones(B, bool)}
    if supervised:
        return {"labeled": lab}
    n = MU * B
    idx = (B + rng.permutation(SLOTS - B)[:n]).astype(np.int32)
    valid = np.ones(n, bool)
    valid[-1] = False
    return {"labeled": lab, "unlabeled": {"weak": img(n), "strong": img(n), "index": idx,
                                          "valid": valid}}
