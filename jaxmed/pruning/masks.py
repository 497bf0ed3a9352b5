"""Masks: pytrees with the params' structure; bool leaves for prunable weights, None elsewhere.

A mask leaf may also broadcast against its weight (a structured channel mask of shape (Cout,)
against a (kh, kw, Cin, Cout) kernel). `masked_optimizer` keeps pruned weights exactly zero
through any optax optimizer (momentum, Adam moments, weight decay) and freezes weights whose
`trainable` mask is False bitwise.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Mask = Any  # pytree of bool arrays / None with the params' structure


def _is_none(x) -> bool:
    return x is None


def path_name(path) -> str:
    """jax key path -> 'layer1_0/conv1/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def default_predicate(path: str, value) -> bool:
    """Conv and dense kernels are prunable; BN scales, biases, embeddings and tokens are not."""
    leaf = path.rsplit("/", 1)[-1]
    return leaf == "kernel" and np.ndim(value) >= 2


def build_masks(params, predicate: Callable[[str, Any], bool] = default_predicate,
                fill: bool = True) -> Mask:
    """All-`fill` bool masks on the leaves the predicate selects, None elsewhere."""
    return jax.tree.map_with_path(
        lambda p, v: jnp.full(np.shape(v), fill, bool) if predicate(path_name(p), v) else None,
        params)


def apply_masks(params, masks: Mask):
    """params with masked-out entries set to exactly zero (masks None -> params unchanged)."""
    if masks is None:
        return params
    return jax.tree.map(lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
                        masks, params, is_leaf=_is_none)


def _leaves(masks: Mask) -> list:
    return [m for m in jax.tree.leaves(masks, is_leaf=_is_none) if m is not None]


def count(masks: Mask, params=None) -> tuple[int, int]:
    """(kept, total) over the masked weights (mask leaves broadcast to their weights)."""
    if params is None:
        leaves = _leaves(masks)
        return int(sum(np.sum(np.asarray(m)) for m in leaves)), int(sum(np.size(m) for m in leaves))
    pairs = jax.tree.leaves(jax.tree.map(
        lambda m, p: None if m is None else (int(np.sum(np.broadcast_to(np.asarray(m),
                                                                          np.shape(p)))),
                                             int(np.size(p))),
        masks, params, is_leaf=_is_none), is_leaf=lambda x: isinstance(x, tuple))
    return sum(k for k, _ in pairs), sum(t for _, t in pairs)


def sparsity(masks: Mask, params=None) -> float:
    kept, total = count(masks, params)
    return 1.0 - kept / max(total, 1)


def layer_report(masks: Mask, params=None) -> dict[str, dict[str, float]]:
    """Per masked leaf: kept, total and sparsity."""
    out = {}
    flat_m = jax.tree.flatten_with_path(masks, is_leaf=_is_none)[0]
    flat_p = dict(jax.tree.flatten_with_path(params)[0]) if params is not None else {}
    for path, m in flat_m:
        if m is None:
            continue
        shape = np.shape(flat_p[path]) if path in flat_p else np.shape(m)
        kept = int(np.sum(np.broadcast_to(np.asarray(m), shape)))
        total = int(np.prod(shape))
        out[path_name(path)] = {"kept": kept, "total": total, "sparsity": 1 - kept / total}
    return out


def _combine(fn, *masks: Mask) -> Mask:
    return jax.tree.map(lambda *ms: None if ms[0] is None else fn(*ms), *masks, is_leaf=_is_none)


def union(a: Mask, b: Mask) -> Mask:
    return _combine(jnp.logical_or, a, b)


def intersection(a: Mask, b: Mask) -> Mask:
    return _combine(jnp.logical_and, a, b)


def difference(a: Mask, b: Mask) -> Mask:
    """Kept in a and not in b (e.g. the units a task owns that no earlier task owns)."""
    return _combine(lambda x, y: jnp.logical_and(x, jnp.logical_not(y)), a, b)


def invert(a: Mask) -> Mask:
    return _combine(jnp.logical_not, a)


def stack(masks: list[Mask]) -> Mask:
    """Stack several masks on a new leading axis (for jax.vmap over subnetworks)."""
    return jax.tree.map(lambda *ms: None if ms[0] is None else jnp.stack(ms), *masks,
                        is_leaf=_is_none)


def unstack(stacked: Mask, n: int) -> list[Mask]:
    return [jax.tree.map(lambda m, i=i: None if m is None else m[i], stacked, is_leaf=_is_none)
            for i in range(n)]


# ------------------------------------------------------------------ optax transformation
class MaskedState(NamedTuple):
    inner: Any


def masked_optimizer(inner: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
    """Wrap an optimizer so that, given `masks` and/or `trainable` at update time,

      - gradients of pruned weights are zeroed before the optimizer sees them (its moments stay
        zero), and the update of a pruned weight is exactly `-param`, so it is exactly 0.0 after
        `optax.apply_updates` whatever momentum or weight decay would have done;
      - weights whose `trainable` mask is False get an update of exactly 0 (bitwise frozen).

    Without masks it is the inner optimizer. Masks are passed per call (from `TrainState.masks`),
    so pruning events never rebuild the optimizer."""

    def init(params):
        return MaskedState(inner.init(params))

    def update(updates, state, params=None, *, masks=None, trainable=None, **extra):
        del extra
        if masks is not None:
            updates = apply_masks(updates, masks)
        if trainable is not None:
            updates = apply_masks(updates, trainable)
        new_updates, inner_state = inner.update(updates, state.inner, params)
        if masks is not None:
            if params is None:
                raise ValueError("masked_optimizer needs params to keep pruned weights at zero")
            new_updates = jax.tree.map(
                lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                masks, new_updates, params, is_leaf=_is_none)
        if trainable is not None:
            new_updates = apply_masks(new_updates, trainable)
        return new_updates, MaskedState(inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
