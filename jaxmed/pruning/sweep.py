"""Predictions of one model at many sparsity levels, without fine-tuning, as two compiled
programs: one builds a chunk of masked parameter copies from a single radix pass over the scores
(`criteria.global_masks_at_counts`), the other runs the model over the chunk's levels (vmapped,
or mapped in one program). Each is compiled once for a given model and chunk size, whatever the
number of levels or models.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmed.data import augment
from jaxmed.pruning import criteria
from jaxmed.pruning.masks import apply_masks
from jaxmed.stacking import check_axis, over_stack

PRUNE_TYPES = ("l1", "random")


def scores_for(kind: str, params, rng=None, predicate=criteria.default_predicate):
    """'l1': |w| (global L1 magnitude); 'random': uniform scores from rng (one draw per model,
    so the random masks of higher sparsities contain those of lower ones)."""
    if kind == "l1":
        return criteria.magnitude_scores(params, predicate)
    if kind == "random":
        if rng is None:
            raise ValueError("random pruning needs an rng")
        return criteria.random_scores(params, rng, predicate)
    raise ValueError(f"unknown prune type {kind!r}: use l1 / random")


@jax.jit
def build_masked_params(params, scores, counts):
    """Stacked copies of params, copy i with the counts[i] lowest-scoring weights zeroed."""
    masks = criteria.global_masks_at_counts(scores, counts)
    stacked = [apply_masks(params, m) for m in masks]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)


def make_forward(model, *, multi_label: bool, compute_dtype=jnp.float32,
                 level_axis: str = "map", mesh=None) -> Callable:
    """(stacked params, batch_stats, uint8 images) -> probabilities [levels, batch, classes].

    With a `mesh` (1-D, axis 'data'), the program is compiled for images sharded over its
    devices and replicated params, and its output stays sharded on the batch axis.

    level_axis 'vmap' batches the levels into grouped convolutions; 'map' runs them one after
    another inside the same compiled program (lax.map), each a dense forward over the batch.
    Which is faster depends on the backend (XLA:CPU runs grouped convs ~7x slower); see
    benchmarks/prunecxr_sweep.py."""

    def one(params, batch_stats, x):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)

    check_axis(level_axis, "level_axis")

    def forward(stacked, batch_stats, images):
        x = augment.normalize(images, dtype=compute_dtype)
        return over_stack(lambda p: one(p, batch_stats, x), stacked, level_axis)

    if mesh is None:
        return jax.jit(forward)
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(forward, in_shardings=(repl, repl, rows),
                   out_shardings=NamedSharding(mesh, P(None, "data")))


def sweep(forward: Callable, variables: dict, scores, sparsities: Sequence[float],
          predict_levels: Callable[[Callable], np.ndarray], *, chunk: int) -> np.ndarray:
    """Predictions [len(sparsities), N, C]. Levels are processed `chunk` at a time (memory):
    for each chunk, `predict_levels(fn)` runs `fn(images) -> [chunk, batch, C]` over the whole
    evaluation set and returns [chunk, N, C] on the host. The caller owns batching, device
    placement and the single fetch per pass (`jaxmed.train.evaluate.predict` in PruneCXR)."""
    n = criteria.num_scored(scores)
    counts = [criteria.prune_count(s, n) for s in sparsities]
    pad = (-len(counts)) % chunk
    padded = counts + [counts[-1]] * pad  # keep one chunk shape: one compile
    out = []
    for start in range(0, len(padded), chunk):
        stacked = build_masked_params(variables["params"], scores,
                                      jnp.asarray(padded[start:start + chunk], jnp.int32))
        out.append(np.asarray(predict_levels(
            lambda images, stacked=stacked: forward(stacked, variables["batch_stats"], images))))
        del stacked
    return np.concatenate(out, axis=0)[:len(counts)]
