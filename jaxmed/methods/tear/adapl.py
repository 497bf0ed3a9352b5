"""AdaPL: adaptive soft pseudo labels from a temporal loss estimate (TEAR, our reading).

Per unlabeled sample: d = distance(p_student(weak), p_ema(weak)) (+ optional entropy of
p_student), optionally smoothed per sample across epochs in a memory indexed by the stable
record index; eps(d) relaxes the hard pseudo label to Q = (1 - eps) one_hot + eps uniform;
loss = soft CE of the strong view against Q under the confidence mask, weight 0.1 (spec).

Decisions where the spec is open or contradicts itself:
- The spec writes eps = 1 - sigmoid(gamma d), which *falls* from 0.5 as d grows, and also
  says "larger estimated loss, softer label". We keep the stated intent: the default
  `form="rising"` is eps = sigmoid(gamma d) - 0.5, in [0, 0.5), 0 for a stable sample
  (d = 0), rising with d; `form="spec"` gives the literal 1 - sigmoid(gamma d). Both keep
  the hard class on top (eps < 1 - 1/C for C >= 2).
- gamma defaults to 2 (spec: in [1, 4]).
- "mse": mean over classes of (p_s - p_t)^2 (USB's mse consistency); "kl": KL(p_ema ||
  p_student), the teacher as the reference; "emd": 1-D earth mover's distance over the
  class index, sum_c |CDF_s(c) - CDF_t(c)| (scipy's wasserstein_distance at positions 0..C-1).
- Memory: per-visit EMA, est <- m est + (1 - m) d, m = 0.9, the first visit sets est = d.
All inputs are stop-gradient probabilities; only the strong-view logits get gradients.
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from jaxmed.methods.tear.thresholds import scatter_rows

DISTANCES = ("mse", "kl", "emd")


def entropy(probs):
    return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-12)), axis=-1)


def adapl_distance(p_student, p_teacher, kind: str = "kl"):
    """(B,) distance between the current and the EMA model's weak predictions."""
    chex.assert_equal_shape([p_student, p_teacher])
    if kind == "mse":
        return jnp.mean((p_student - p_teacher) ** 2, axis=-1)
    if kind == "kl":
        pt = jnp.maximum(p_teacher, 1e-12)
        return jnp.sum(p_teacher * (jnp.log(pt) - jnp.log(jnp.maximum(p_student, 1e-12))),
                       axis=-1)
    if kind == "emd":
        return jnp.sum(jnp.abs(jnp.cumsum(p_student - p_teacher, axis=-1)), axis=-1)
    raise ValueError(f"adapl_distance: kind={kind!r}, expected one of {DISTANCES}")


def adapl_estimate(p_student, p_teacher, kind: str = "kl", add_entropy: bool = False):
    """The per-sample loss estimate d (stop-gradient)."""
    p_student, p_teacher = jax.lax.stop_gradient((p_student, p_teacher))
    d = adapl_distance(p_student, p_teacher, kind)
    return d + entropy(p_student) if add_entropy else d


@flax.struct.dataclass
class AdaPLMemory:
    estimate: jax.Array  # (num_slots,) float32 EMA of d per stable index
    seen: jax.Array  # (num_slots,) bool, visited at least once

    @classmethod
    def init(cls, num_slots: int) -> "AdaPLMemory":
        if num_slots < 1:
            raise ValueError(f"AdaPLMemory.init: num_slots={num_slots}")
        return cls(estimate=jnp.zeros((num_slots,), jnp.float32),
                   seen=jnp.zeros((num_slots,), bool))


def adapl_memory_update(memory: AdaPLMemory, d, index, valid=None, momentum: float = 0.9):
    """Smooth d with each sample's history; returns (memory, smoothed d (B,)). Invalid rows
    get their smoothed value but write nothing."""
    chex.assert_equal_shape([d, index])
    old, seen = memory.estimate[index], memory.seen[index]
    smoothed = jnp.where(seen, momentum * old + (1 - momentum) * d, d)
    return AdaPLMemory(estimate=scatter_rows(memory.estimate, index, valid, smoothed),
                       seen=scatter_rows(memory.seen, index, valid, jnp.ones_like(seen))), smoothed


def adapl_epsilon(d, gamma: float = 2.0, form: str = "rising"):
    """Relaxation strength per sample (see the module docstring for the two forms)."""
    if form == "rising":
        return jax.nn.sigmoid(gamma * d) - 0.5
    if form == "spec":
        return 1.0 - jax.nn.sigmoid(gamma * d)
    raise ValueError(f"adapl_epsilon: form={form!r}, expected 'rising' or 'spec'")


def adapl_targets(hard_labels, eps, num_classes: int):
    """Q = (1 - eps) one_hot(hard label) + eps / C: (B, C) rows summing to 1."""
    chex.assert_equal_shape([hard_labels, eps])
    eps = eps[:, None]
    onehot = jax.nn.one_hot(hard_labels, num_classes, dtype=eps.dtype)
    return (1.0 - eps) * onehot + eps / num_classes


def adapl_loss(logits_strong, targets, mask, valid=None):
    """sum_b mask_b CE(strong_b, Q_b) / #valid rows (FixMatch's convention: a mean over all
    unlabeled rows, masked-out rows counting 0)."""
    per = optax.softmax_cross_entropy(logits_strong, jax.lax.stop_gradient(targets))
    w = mask if valid is None else mask * valid.astype(mask.dtype)
    n = per.shape[0] if valid is None else jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(per * w) / n
