"""Classification losses, each returning one value per sample (shape (B,)).

Per-sample losses let methods weight samples (BiasPruner's exp(alpha * GCE), hard-sample
attention) and mask padded evaluation rows; reduce with `weighted_mean`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def weighted_mean(per_sample, weights=None):
    """Mean of per-sample values; with weights, sum(w * l) / max(sum(w), eps)."""
    if weights is None:
        return jnp.mean(per_sample)
    weights = weights.astype(per_sample.dtype)
    return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Softmax CE with integer labels; label smoothing spreads `label_smoothing` uniformly."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits, targets)


def soft_cross_entropy(logits, targets):
    """CE against a probability vector per sample (soft / pseudo labels)."""
    return optax.softmax_cross_entropy(logits, targets)


def binary_cross_entropy(logits, targets):
    """Multi-label BCE with logits, averaged over classes (PyTorch's BCEWithLogitsLoss)."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


def log_prior(class_counts) -> np.ndarray:
    counts = np.asarray(class_counts, np.float64)
    return np.log(counts / counts.sum()).astype(np.float32)


def balanced_softmax(logits, labels, class_counts):
    """Balanced softmax (Ren et al. 2020): CE on logits + log prior; train-time only."""
    return cross_entropy(logits + jnp.asarray(log_prior(class_counts)), labels)


def focal(logits, labels, gamma: float = 2.0):
    """Softmax focal loss: -(1 - p_y)^gamma log p_y."""
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return -((1 - jnp.exp(logp)) ** gamma) * logp


def ldam_margins(class_counts, max_margin: float = 0.5) -> np.ndarray:
    m = 1.0 / np.sqrt(np.sqrt(np.asarray(class_counts, np.float64)))
    return (m * (max_margin / m.max())).astype(np.float32)


def ldam(logits, labels, class_counts, max_margin: float = 0.5, scale: float = 30.0,
         weights=None):
    """LDAM (Cao et al. 2019): subtract m_y = C / n_y^(1/4) from the true logit, scale by s.

    The paper's s = 30 assumes cosine logits (a normalised linear head); `weights` are the
    per-class DRW weights (None before the deferred re-weighting starts)."""
    margins = jnp.asarray(ldam_margins(class_counts, max_margin))
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    adjusted = logits - onehot * margins[labels][:, None]
    loss = optax.softmax_cross_entropy(scale * adjusted, onehot)
    if weights is not None:
        loss = loss * jnp.asarray(weights)[labels]
    return loss


def class_balanced_weights(class_counts, beta: float = 0.9999) -> np.ndarray:
    """Effective-number weights (Cui et al. 2019), normalised to sum to the number of classes."""
    counts = np.asarray(class_counts, np.float64)
    w = (1 - beta) / (1 - beta**counts)
    return (w / w.sum() * len(counts)).astype(np.float32)


def gce(logits, labels, q: float = 0.7):
    """Generalized CE as BiasPruner / LfF implement it: CE(x, y) * q * p_y^q, p_y detached.

    Its gradient is that of (1 - p_y^q) / q times q: confident (bias-aligned) samples dominate,
    which is what makes the GCE model a biased model."""
    ce = cross_entropy(logits, labels)
    p_y = jax.lax.stop_gradient(jnp.exp(-ce))
    return ce * q * p_y**q


def kd(student_logits, teacher_logits, temperature: float = 4.0):
    """Hinton KD: T^2 * KL(softmax(t / T) || softmax(s / T))."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return temperature**2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


LOSSES = ("ce", "bce", "balanced_softmax", "focal", "ldam", "gce")


def classification_loss(name: str, logits, labels, *, class_counts=None,
                        label_smoothing: float = 0.0, gce_q: float = 0.7,
                        focal_gamma: float = 2.0):
    """Per-sample training loss by config name (the supervised trainer's switch)."""
    if name == "ce":
        return cross_entropy(logits, labels, label_smoothing)
    if name == "bce":
        return binary_cross_entropy(logits, labels)
    if name == "gce":
        return gce(logits, labels, gce_q)
    if name == "focal":
        return focal(logits, labels, focal_gamma)
    if name in ("balanced_softmax", "ldam"):
        if class_counts is None:
            raise ValueError(f"loss {name!r} needs the training class counts")
        fn = balanced_softmax if name == "balanced_softmax" else ldam
        return fn(logits, labels, class_counts)
    raise ValueError(f"unknown loss {name!r}; known: {LOSSES}")
