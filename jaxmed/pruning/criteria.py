"""Pruning criteria: score pytrees -> masks, globally or per layer, for one or many sparsities.

A criterion is a score per weight (magnitude, random, SNIP, a user's score such as BiasPruner's
bias score); `masks_from_scores` turns scores into masks that prune exactly
`round(sparsity * n)` weights (Python rounding, as `torch.nn.utils.prune`), lowest scores
first, ties broken by position in the flattened weights. Global thresholds for every sparsity
level come from one pass: two radix histograms over the order-preserving integer keys of the
scores (`_radix_thresholds`), so `magnitude_masks(params, [0.05, ..., 0.95])` costs two
histograms, not twenty sorts.
Structured (channel) criteria live in `structured.py`; sparsity distributions (uniform, ERK)
here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.pruning.masks import Mask, _is_none, default_predicate, path_name


def select(params, predicate: Callable[[str, Any], bool] = default_predicate):
    """params with None on leaves the predicate does not select (the pruning scope)."""
    return jax.tree.map_with_path(
        lambda p, v: v if predicate(path_name(p), v) else None, params)


# --------------------------------------------------------------------------------- scores
def magnitude_scores(params, predicate=default_predicate):
    return jax.tree.map(lambda v: None if v is None else jnp.abs(v), select(params, predicate),
                        is_leaf=_is_none)


def random_scores(params, rng, predicate=default_predicate):
    scoped = select(params, predicate)
    leaves, treedef = jax.tree.flatten(scoped, is_leaf=_is_none)
    keys = iter(jax.random.split(rng, len(leaves)))
    return jax.tree.unflatten(treedef, [None if v is None else
                                        jax.random.uniform(next(keys), jnp.shape(v))
                                        for v in leaves])


def snip_scores(loss_fn: Callable[[Any], jax.Array], params, predicate=default_predicate):
    """SNIP (Lee et al. 2019): |dL/dw * w| on a batch; loss_fn(params) closes over the batch."""
    grads = jax.grad(loss_fn)(params)
    scoped = select(params, predicate)
    return jax.tree.map(lambda w, g: None if w is None else jnp.abs(w * g), scoped, grads,
                        is_leaf=_is_none)


# ---------------------------------------------------------------------------- ranking
def _flat(scores) -> tuple[list, Any]:
    return jax.tree.flatten(scores, is_leaf=_is_none)


def layer_ranks(scores):
    """Rank of every weight within its own layer (leaf)."""
    def rank(x):
        order = jnp.argsort(jnp.ravel(x).astype(jnp.float32), stable=True)
        return jnp.zeros(x.size, jnp.int32).at[order].set(
            jnp.arange(x.size, dtype=jnp.int32)).reshape(x.shape)
    return jax.tree.map(lambda x: None if x is None else rank(x), scores, is_leaf=_is_none)


def num_scored(scores) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(scores)))


def prune_count(sparsity: float, n: int) -> int:
    """Weights to prune: round(sparsity * n), Python rounding as torch.nn.utils.prune."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(sparsity * n))


def masks_from_scores(scores, sparsity: float | Sequence[float], scope: str = "global"):
    """Masks pruning the lowest-scoring weights. `sparsity` a float -> one mask pytree;
    per-leaf (a pytree of floats like `scores`, for layer scope) or a list of floats -> a list.

    scope 'global': one ranking over all scored weights; 'layer': every leaf keeps
    1 - sparsity of its own weights."""
    if scope == "global":
        n = num_scored(scores)
        levels = [sparsity] if np.isscalar(sparsity) else list(sparsity)
        out = global_masks_at_counts(scores, [prune_count(s, n) for s in levels])
        return out[0] if np.isscalar(sparsity) else out
    if scope == "layer":
        ranks = layer_ranks(scores)
        if np.isscalar(sparsity) or isinstance(sparsity, (list, tuple)):
            levels = [sparsity] if np.isscalar(sparsity) else list(sparsity)
            out = [jax.tree.map(lambda r, s=s: None if r is None else r >= prune_count(s, r.size),
                                ranks, is_leaf=_is_none) for s in levels]
            return out[0] if np.isscalar(sparsity) else out
        return jax.tree.map(lambda r, s: None if r is None else r >= prune_count(float(s), r.size),
                            ranks, sparsity, is_leaf=_is_none)
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def order_keys(x) -> jax.Array:
    """float -> uint32 with the same order (the radix-sort trick: flip negatives, set the sign
    bit of non-negatives), so integer comparisons and histograms rank floats exactly."""
    b = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _radix_thresholds(keys, counts):
    """For each count k (prune the k smallest): the key T of the k-th smallest element and how
    many of the elements equal to T are pruned. Two 65536-bin histogram passes instead of a
    sort: XLA's CPU sort is ~30x slower than a histogram and GPUs like both."""
    counts = jnp.asarray(counts, jnp.int32)
    levels = counts.shape[0]
    hi = (keys >> 16).astype(jnp.int32)
    lo = (keys & 0xFFFF).astype(jnp.int32)
    cum = jnp.cumsum(jnp.zeros(65536, jnp.int32).at[hi].add(1))
    k = jnp.maximum(counts, 1)
    b = jnp.searchsorted(cum, k, side="left").astype(jnp.int32)
    below_b = jnp.where(b > 0, cum[jnp.maximum(b - 1, 0)], 0)
    table = jnp.full(65536, -1, jnp.int32).at[b].set(jnp.arange(levels, dtype=jnp.int32))
    slot = table[hi]
    idx = jnp.where(slot >= 0, slot * 65536 + lo, levels * 65536)
    hist2 = jnp.zeros(levels * 65536 + 1, jnp.int32).at[idx].add(1)[:-1].reshape(levels, 65536)
    cum2 = jnp.cumsum(hist2[table[b]], axis=1)
    need = k - below_b
    lo_t = jax.vmap(lambda c, n: jnp.searchsorted(c, n, side="left"))(cum2, need).astype(jnp.int32)
    rows = jnp.arange(levels)
    below_t = below_b + jnp.where(lo_t > 0, cum2[rows, jnp.maximum(lo_t - 1, 0)], 0)
    ties = below_b + cum2[rows, lo_t] - below_t
    threshold = (b.astype(jnp.uint32) << 16) | lo_t.astype(jnp.uint32)
    return threshold, k - below_t, ties


def global_masks_at_counts(scores, counts) -> list:
    """Masks pruning exactly counts[i] lowest-scoring weights over all scored leaves, one mask
    pytree per count; ties at a threshold are pruned in flattened-parameter order. counts may be
    traced (no recompilation when they change)."""
    leaves, treedef = _flat(scores)
    live = [x for x in leaves if x is not None]
    if not live:
        raise ValueError("no weights to prune: the predicate selected no leaf of the params")
    keys = jnp.concatenate([jnp.ravel(order_keys(x)) for x in live])
    counts = jnp.atleast_1d(jnp.asarray(counts, jnp.int32))
    threshold, pruned_ties, ties = _radix_thresholds(keys, counts)
    out = []
    for i in range(counts.shape[0]):
        t, n = threshold[i], pruned_ties[i]

        def with_order(t=t, n=n):  # some (not all) equal elements pruned: by position
            eq = keys == t
            return (keys > t) | (eq & (jnp.cumsum(eq) > n))

        kept = jax.lax.cond(n >= ties[i], lambda t=t: keys > t, with_order)
        kept = jnp.where(counts[i] > 0, kept, True)
        flat, start = [], 0
        for x in leaves:
            if x is None:
                flat.append(None)
                continue
            flat.append(kept[start:start + x.size].reshape(x.shape))
            start += x.size
        out.append(jax.tree.unflatten(treedef, flat))
    return out


def masks_at_counts(scores, counts, scope: str = "global"):
    """Masks pruning exactly `counts` weights (an int, traced or not, for 'global'; a pytree
    of ints like `scores` for 'layer'). Jit-friendly: counts can change without recompiling."""
    if scope == "global":
        return global_masks_at_counts(scores, counts)[0]
    return jax.tree.map(lambda r, k: None if r is None else r >= k, layer_ranks(scores), counts,
                        is_leaf=_is_none)


def layer_counts(scores, sparsities) -> Any:
    """Per-leaf prune counts (host ints) for per-leaf sparsities."""
    return jax.tree.map(lambda x, s: None if x is None else prune_count(float(s), int(np.size(x))),
                        scores, sparsities, is_leaf=_is_none)


@functools.partial(jax.jit, static_argnames=("sparsities", "scope", "predicate"))
def _magnitude_masks(params, sparsities: tuple[float, ...], scope: str, predicate):
    return masks_from_scores(magnitude_scores(params, predicate), list(sparsities), scope)


def magnitude_masks(params, sparsities: Sequence[float], scope: str = "global",
                    predicate=default_predicate) -> list[Mask]:
    """L1-magnitude masks at many sparsity levels from one sort, in one jitted program
    (PruneCXR prunes each model at 20 levels). Identical to torch's `global_unstructured`
    with `L1Unstructured` (scope='global') or `l1_unstructured` per layer (scope='layer')."""
    return _magnitude_masks(params, tuple(float(s) for s in sparsities), scope, predicate)


# -------------------------------------------------------------------- distributions
def uniform_distribution(params, sparsity: float, predicate=default_predicate):
    """Every prunable layer at the same sparsity."""
    return jax.tree.map(lambda v: None if v is None else float(sparsity),
                        select(params, predicate), is_leaf=_is_none)


def erk_distribution(params, sparsity: float, predicate=default_predicate,
                     power: float = 1.0):
    """Erdos-Renyi-Kernel (Evci et al. 2020): density of a layer proportional to
    sum(shape) / prod(shape), scaled to the global target; layers that would exceed density 1
    are kept dense and the rest rescaled (iteratively)."""
    scoped = select(params, predicate)
    leaves, treedef = _flat(scoped)
    shapes = [None if v is None else np.shape(v) for v in leaves]
    sizes = np.array([0 if s is None else np.prod(s) for s in shapes], np.float64)
    raw = np.array([0.0 if s is None else (np.sum(s) / np.prod(s)) ** power for s in shapes])
    live = sizes > 0
    dense = np.zeros(len(leaves), bool)
    target = (1 - sparsity) * sizes[live].sum()
    while True:
        free = live & ~dense
        budget = target - sizes[dense].sum()
        eps = budget / max(np.sum(raw[free] * sizes[free]), 1e-30)
        density = np.where(free, eps * raw, np.where(dense, 1.0, 0.0))
        over = free & (density > 1.0)
        if not over.any():
            break
        dense |= over
    return jax.tree.unflatten(treedef, [None if s is None else float(1.0 - density[i])
                                        for i, s in enumerate(shapes)])
