"""IPH: iterative prototype harmonizing (TEAR) with a k-means in jnp.

Student prototypes: a few Lloyd iterations (K = classes) on the current model's weak-view
unlabeled features, warm-started from the previous step's centroids so cluster k keeps
meaning class k. Teacher prototypes: class means of the EMA's features grouped by its
(aligned) predicted labels. Loss: mean over clusters present on both sides of
1 - cos(student_k, teacher_k), gradients into the student side only (lambda_IPH 0.1, spec).

Decisions: features are L2-normalised before clustering and before class means (the loss is
a cosine, so k-means runs in the same geometry); an empty cluster keeps its previous centroid
and counts as absent; the first step (nothing to warm-start from) starts from the teacher
prototypes, so cluster k begins at class k (classes absent there start at 0); the Lloyd
assignments are stop-gradient and the last centroid mean is differentiable in the features.
Default 3 iterations ("a few").
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp

from jaxmed.losses import l2_normalize


def group_means(features, assign, valid, num_groups: int, fallback):
    """Means of the rows per group; (means (K, D), counts (K,)); empty groups -> fallback."""
    onehot = jax.nn.one_hot(assign, num_groups, dtype=features.dtype)
    if valid is not None:
        onehot = onehot * valid.astype(features.dtype)[:, None]
    counts = jnp.sum(onehot, axis=0)
    sums = onehot.T @ features
    means = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], fallback)
    return means, counts


def kmeans_step(features, centroids, valid=None):
    """One Lloyd iteration (squared Euclidean): (new centroids, counts)."""
    chex.assert_rank([features, centroids], 2)
    chex.assert_equal_shape_suffix([features, centroids], 1)
    d2 = (jnp.sum(features ** 2, -1)[:, None] - 2.0 * features @ centroids.T
          + jnp.sum(centroids ** 2, -1)[None, :])
    assign = jnp.argmin(d2, axis=-1)
    return group_means(features, assign, valid, centroids.shape[0], centroids)


def kmeans(features, init_centroids, valid=None, num_iters: int = 3):
    """`num_iters` Lloyd steps; returns (centroids, present (K,) bool). Differentiable in the
    features through the last step's means; no Python loop over samples or iterations."""
    if num_iters < 1:
        raise ValueError(f"kmeans: num_iters={num_iters} must be >= 1")
    frozen = jax.lax.stop_gradient(features)
    c = jax.lax.fori_loop(0, num_iters - 1, lambda _, c: kmeans_step(frozen, c, valid)[0],
                          jax.lax.stop_gradient(init_centroids))
    d2 = (jnp.sum(frozen ** 2, -1)[:, None] - 2.0 * frozen @ c.T + jnp.sum(c ** 2, -1)[None, :])
    centroids, counts = group_means(features, jnp.argmin(d2, axis=-1), valid, c.shape[0], c)
    return centroids, counts > 0


def class_prototypes(features, labels, valid, num_classes: int):
    """Class means of L2-normalised features: (prototypes (K, D), present (K,) bool)."""
    chex.assert_equal_shape_prefix([features, labels], 1)
    feats = l2_normalize(features)
    protos, counts = group_means(feats, labels, valid, num_classes,
                                 jnp.zeros((num_classes, feats.shape[-1]), feats.dtype))
    return protos, counts > 0


@flax.struct.dataclass
class IPHState:
    centroids: jax.Array  # (K, D) last step's student prototypes (stop-gradient)
    initialized: jax.Array  # () bool, False until the first update

    @classmethod
    def init(cls, num_classes: int, feature_dim: int) -> "IPHState":
        return cls(centroids=jnp.zeros((num_classes, feature_dim), jnp.float32),
                   initialized=jnp.zeros((), bool))


def iph_student_prototypes(state: IPHState, features, valid, teacher_protos, teacher_present,
                           num_iters: int = 3):
    """Warm-started k-means on the normalised student features: (protos, present)."""
    chex.assert_equal_shape([state.centroids, teacher_protos])
    start = jnp.where(teacher_present[:, None], teacher_protos, state.centroids)
    start = jnp.where(state.initialized, state.centroids, start)
    return kmeans(l2_normalize(features), start, valid, num_iters)


def iph_update(state: IPHState, student_protos) -> IPHState:
    return IPHState(centroids=jax.lax.stop_gradient(student_protos).astype(state.centroids.dtype),
                    initialized=jnp.ones((), bool))


def iph_loss(student_protos, student_present, teacher_protos, teacher_present):
    """mean_k over clusters present in both of 1 - cos(student_k, sg(teacher_k)); 0 if none."""
    both = (student_present & teacher_present).astype(student_protos.dtype)
    cos = jnp.sum(l2_normalize(student_protos)
                  * l2_normalize(jax.lax.stop_gradient(teacher_protos)), axis=-1)
    return jnp.sum(both * (1.0 - cos)) / jnp.maximum(jnp.sum(both), 1.0)
