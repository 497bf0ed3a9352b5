"""Pruning-identified hard-to-learn (HTL) samples: the samples on which a dense model and its
global-magnitude-pruned copies (no fine-tuning) disagree (Hooker et al.'s pruning-identified
exemplars, as Attend Who is Weak uses them).

Pure pieces, and the pass over a whole split that composes them (every K epochs, from the
hook in `attention.py`):
  `level_masks`            bool masks at every sparsity, stacked [L, ...], from one radix pass
  `make_level_predictor`   jitted (params, masks, x, extra) -> dense output and, per level, the
                           pruned output (classification) or its IoU with the dense mask
                           (segmentation); the masked copy exists only inside the forward
  `classification_disagreement`, `segmentation_level_iou`, `segmentation_disagreement`
  `select_htl`             the HTL set: disagreeing samples, or the top q by score
  `make_identify_fn`       one program per task: dense forward + every level + disagreement,
                           on a batch sharded over every device
  `identify_samples`       that program over a split (eval preprocessing) through
                           `jaxmed.train.evaluate.predict`: outputs fetched once per pass and
                           sorted by the records' stable index; `composition` of the HTL set

Decisions (the paper gives none):
  - classification: a sample disagrees when the dense top-1 class is not among the modal classes
    of the pruned copies' top-1 votes; a tie that includes the dense class counts as agreement
    (only a clear pruned majority for another class makes a sample hard). Score: the pruned
    copies' mean probability mass off the dense class, 1 - mean_l p_l(dense top-1).
  - segmentation: masks are logit > 0; per level, IoU(dense mask, pruned mask) with IoU = 1 when
    both are empty (as `jaxmed.metrics.iou_per_image`). A sample disagrees when the IoU is below
    `iou_threshold` at a strict majority of the levels (rule 'majority', default: the analogue of
    the classification vote, and robust to the highest sparsity breaking every mask) or at any
    level (rule 'any'). Score: mean over levels of 1 - IoU.
  - top q: the round(q * N) highest scores, ties broken by lower sample index.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmed import pruning
from jaxmed.data import augment
from jaxmed.stacking import check_axis
from jaxmed.train import evaluate, sharding


# ------------------------------------------------------------------------------ masks
@functools.partial(jax.jit, static_argnames=("sparsities", "predicate"))
def _level_masks(params, sparsities: tuple[float, ...], predicate):
    scores = pruning.magnitude_scores(params, predicate)
    n = pruning.num_scored(scores)
    counts = [pruning.prune_count(s, n) for s in sparsities]
    return pruning.stack(pruning.global_masks_at_counts(scores, counts))


def level_masks(params, sparsities: Sequence[float], predicate=pruning.default_predicate):
    """Global L1-magnitude masks (as `torch.nn.utils.prune.global_unstructured`) at every
    sparsity, stacked on a leading level axis: bool leaves [L, *weight.shape], None elsewhere.
    One byte per weight and level; no weight copies."""
    if not len(sparsities):
        raise ValueError("HTL identification needs at least one sparsity level")
    return _level_masks(params, tuple(float(s) for s in sparsities), predicate)


def masked_outputs(apply_fn: Callable, params, stacked_masks, *args, level_axis: str = "map"):
    """apply_fn(params with level l's mask applied, *args) for every level, stacked [L, ...].
    'map' holds one masked copy of the params at a time (lax.map); 'vmap' all of them."""
    return pruning.over_stack(lambda m: apply_fn(pruning.apply_masks(params, m), *args),
                              stacked_masks, level_axis)


def make_level_predictor(apply_fn: Callable, *, task: str, level_axis: str = "map",
                         mesh=None) -> Callable:
    """A jitted `(params, stacked_masks, x, extra) -> (dense, levels)`; `apply_fn(params, x,
    extra)` returns logits (extra: any pytree, e.g. batch_stats, an argument so that new values
    do not recompile).

    task 'classification': dense logits [B, C], pruned logits [L, B, C].
    task 'segmentation': dense logits [B, H, W(, 1)], IoU of each level's mask with the dense
    mask [L, B] (the pruned maps never leave the program).
    With a `mesh` (axis 'data'): x and the outputs sharded on the batch axis, the rest
    replicated."""
    check_axis(level_axis, "level_axis")
    if task not in ("classification", "segmentation"):
        raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")

    def predict(params, stacked_masks, x, extra):
        dense = apply_fn(params, x, extra)
        if task == "classification":
            return dense, masked_outputs(apply_fn, params, stacked_masks, x, extra,
                                         level_axis=level_axis)

        def level_iou(p):
            return mask_iou(dense > 0, apply_fn(p, x, extra) > 0)

        return dense, masked_outputs(level_iou, params, stacked_masks, level_axis=level_axis)

    if mesh is None:
        return jax.jit(predict)
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(predict, in_shardings=(repl, repl, rows, repl),
                   out_shardings=(rows, NamedSharding(mesh, P(None, "data"))))


# ----------------------------------------------------------------------- disagreement
def classification_disagreement(dense_logits, pruned_logits):
    """dense [N, C] and pruned [L, N, C] logits -> (disagree bool [N], score float [N])."""
    chex.assert_rank(dense_logits, 2)
    chex.assert_rank(pruned_logits, 3)
    chex.assert_equal_shape([dense_logits, pruned_logits[0]])
    num_classes = dense_logits.shape[-1]
    dense = jnp.argmax(dense_logits, -1)
    votes = jnp.sum(jax.nn.one_hot(jnp.argmax(pruned_logits, -1), num_classes), axis=0)
    dense_votes = jnp.take_along_axis(votes, dense[:, None], -1)[:, 0]
    disagree = dense_votes < jnp.max(votes, -1)
    probs = jax.nn.softmax(jnp.asarray(pruned_logits, jnp.float32), -1)
    p_dense = jnp.take_along_axis(probs, jnp.broadcast_to(dense[None, :, None],
                                                          probs.shape[:2] + (1,)), -1)[..., 0]
    return disagree, 1.0 - jnp.mean(p_dense, 0)


def mask_iou(a, b):
    """IoU of bool masks a [N, ...] and b [..., N, ...] (extra leading axes: levels), reduced over
    a's non-batch axes. Both empty: 1.0."""
    axes = tuple(range(-(a.ndim - 1), 0))
    inter = jnp.sum(a & b, axes)
    union = jnp.sum(a | b, axes)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def segmentation_level_iou(dense_logits, pruned_logits):
    """dense [N, ...] and pruned [L, N, ...] logit maps -> IoU of the masks (logit > 0) [L, N]."""
    chex.assert_equal_shape([dense_logits, pruned_logits[0]])
    return mask_iou(jnp.asarray(dense_logits) > 0, jnp.asarray(pruned_logits) > 0)


def segmentation_disagreement(level_iou, iou_threshold: float = 0.5, rule: str = "majority"):
    """Per-level IoU [L, N] -> (disagree bool [N], score float [N] = mean_l (1 - IoU))."""
    chex.assert_rank(level_iou, 2)
    low = jnp.asarray(level_iou) < iou_threshold
    if rule == "majority":
        disagree = 2 * jnp.sum(low, 0) > low.shape[0]
    elif rule == "any":
        disagree = jnp.any(low, 0)
    else:
        raise ValueError(f"rule must be 'majority' or 'any', got {rule!r}")
    return disagree, jnp.mean(1.0 - jnp.asarray(level_iou, jnp.float32), 0)


# ---------------------------------------------------------------------------- selection
def select_htl(disagree, score, top_q: float | None = None) -> np.ndarray:
    """The HTL set as a bool array [N] (host). top_q None: the disagreeing samples; a fraction
    in (0, 1]: the round(top_q * N) highest scores (ties: lower index first), disagreeing or
    not."""
    disagree, score = np.asarray(disagree, bool), np.asarray(score, np.float64)
    if disagree.shape != score.shape or disagree.ndim != 1:
        raise ValueError(f"disagree {disagree.shape} and score {score.shape} must be equal [N]")
    if top_q is None:
        return disagree
    if not 0.0 < top_q <= 1.0:
        raise ValueError(f"top_q must be a fraction in (0, 1], got {top_q}")
    chosen = np.zeros(score.shape, bool)
    chosen[np.argsort(-score, kind="stable")[:int(round(top_q * score.size))]] = True
    return chosen



# ----------------------------------------------------------------------- a whole split
def make_identify_fn(model, *, task: str, iou_threshold: float = 0.5, rule: str = "majority",
                     level_axis: str = "map", mesh=None, compute_dtype=jnp.float32) -> Callable:
    """A jitted (params, stacked_masks, batch_stats, batch) -> {'disagree' [B], 'score' [B],
    'levels' [B, L]} (levels: the pruned top-1 class, or the IoU of each pruned mask with the
    dense one). task: 'classification' or 'segmentation'."""
    def apply_fn(params, x, batch_stats):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    predictor = make_level_predictor(apply_fn, task=task, level_axis=level_axis, mesh=mesh)

    def fn(params, stacked_masks, batch_stats, batch):
        x = augment.normalize(batch["image"], dtype=compute_dtype)
        dense, levels = predictor(params, stacked_masks, x, batch_stats)
        if task == "classification":
            disagree, score = classification_disagreement(dense, levels)
            per_level = jnp.argmax(levels, -1).T.astype(jnp.float32)
        else:
            disagree, score = segmentation_disagreement(levels, iou_threshold, rule)
            per_level = levels.T.astype(jnp.float32)
        return {"disagree": disagree, "score": score, "levels": per_level,
                "dense": (jnp.argmax(dense, -1) if task == "classification"
                          else jnp.sum(dense > 0, (1, 2, 3))).astype(jnp.int32)}

    if mesh is None:
        return jax.jit(fn)
    rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, rep, rep, dat), out_shardings=dat)


def identify_samples(identify_fn: Callable, params, batch_stats, sparsities: Sequence[float],
                     batches, mesh, *, top_q: float | None = None) -> dict[str, np.ndarray]:
    """Identification over every sample of `batches` (host-local, as `eval_batches` yields):
    {'index', 'attrs', 'disagree', 'score', 'levels', 'dense', 'htl'} sorted by index, 'htl' the
    HTL set (`select_htl`). Masks of all levels come from one sort of the params."""
    masks = level_masks(params, sparsities)
    out = evaluate.predict(lambda b: identify_fn(params, masks, batch_stats, b), batches, mesh,
                           keys=("index", "attrs"))
    out["htl"] = select_htl(out["disagree"], out["score"], top_q)
    return out


def composition(htl: np.ndarray, attrs: dict[str, np.ndarray]) -> dict[str, float]:
    """HTL-set size and, per attribute value, its share of the HTL set and of all samples."""
    out = {"size": float(htl.sum()), "fraction": float(htl.mean())}
    for name in sorted(attrs):
        values = np.asarray(attrs[name])
        for v in sorted(set(values.tolist()) - {-1}):
            sel = values == v
            out[f"share_{name}_{v}"] = float(sel[htl].mean()) if htl.any() else 0.0
            out[f"base_{name}_{v}"] = float(sel.mean())
            out[f"caught_{name}_{v}"] = float(htl[sel].mean()) if sel.any() else 0.0
    return out
