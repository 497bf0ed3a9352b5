"""Classification losses, each returning one value per sample (shape (B,)).

Per-sample losses let methods weight samples (BiasPruner's exp(alpha * GCE), hard-sample
attention) and mask padded evaluation rows; reduce with `weighted_mean`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax


def weighted_mean(per_sample, weights=None):
    """Mean of per-sample values; with weights, sum(w * l) / max(sum(w), eps)."""
    if weights is not None:
        chex.assert_equal_shape([per_sample, weights])
    if weights is None:
        return jnp.mean(per_sample)
    weights = weights.astype(per_sample.dtype)
    return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def normalised_sample_weights(class_weights, labels, valid=None):
    """w[labels] / (the batch mean of w[labels] over the valid rows), per sample.

    A per-class weight w_y reduced as the references do (torch's CrossEntropyLoss(weight=w),
    LDAM-DRW's `LDAMLoss`, Fed-MAS) gives sum(w_y l) / sum(w_y), not mean(w_y l): scaling each
    sample's loss by these factors makes the plain (valid-row) batch mean of the per-sample
    loss that reduction. The normaliser depends only on the labels, so it is a constant of
    the gradient, as in torch."""
    w = jnp.asarray(class_weights, jnp.float32)[labels]
    valid = jnp.ones_like(w) if valid is None else valid
    return w / jnp.maximum(weighted_mean(w, valid), 1e-12)


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(||x||, eps), as torch's F.normalize, with finite gradients everywhere.

    The norm is sqrt(max(sum x^2, eps^2)): the same value, but an all-zero row gets torch's
    gradient (1 / eps) instead of the NaN of d||x|| at 0 that jnp.linalg.norm gives (a
    maximum taken after the norm still multiplies that NaN by 0)."""
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


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
    per-class DRW weights (None before the deferred re-weighting starts), returned per sample
    as w_y * l (torch's reduction='none'): reduce with `normalised_sample_weights` (or
    `weighted_mean(l, w[labels])`) for the reference's sum(w_y l) / sum(w_y)."""
    margins = jnp.asarray(ldam_margins(class_counts, max_margin))
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    adjusted = logits - onehot * margins[labels][:, None]
    loss = optax.softmax_cross_entropy(scale * adjusted, onehot)
    if weights is not None:
        loss = loss * jnp.asarray(weights)[labels]
    return loss


def class_balanced_weights(class_counts, beta: float = 0.9999) -> np.ndarray:
    """Effective-number weights (Cui et al. 2019), normalised to sum to the number of classes
    present; a class with no training sample gets weight 0 (as the LDAM-DRW / Fed-MAS code)."""
    counts = np.asarray(class_counts, np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = (1 - beta) / (1 - beta ** counts[present])
    return (w / w.sum() * present.sum()).astype(np.float32)


def class_balanced(logits, labels, class_counts, beta: float = 0.9999):
    """Class-balanced softmax CE (Cui et al. 2019): w_y * CE with effective-number weights.

    Per sample; `jnp.mean` of it is Cui's normalisation (weights sum to C), while
    `weighted_mean(cross_entropy(...), w[labels])` (equivalently the mean of
    `cross_entropy * normalised_sample_weights(w, labels)`) is torch's
    CrossEntropyLoss(weight=w), Fed-MAS's `CB` loss."""
    w = jnp.asarray(class_balanced_weights(class_counts, beta))
    return cross_entropy(logits, labels) * w[labels]


def drw_weights(class_counts, step, drw_start, beta: float = 0.9999):
    """LDAM-DRW's deferred re-weighting: ones before `drw_start` (Cao et al.: 80% of training),
    effective-number weights from then on. `step` / `drw_start` may be traced; (C,) float32."""
    cb = jnp.asarray(class_balanced_weights(class_counts, beta))
    return jnp.where(jnp.asarray(step) >= drw_start, cb, jnp.ones_like(cb))


def logit_adjusted(logits, labels, class_counts, tau: float = 1.0):
    """Logit-adjusted CE (Menon et al. 2021): CE(logits + tau * log prior); tau = 1 is the
    balanced softmax. Train-time only: predict with the plain logits."""
    return cross_entropy(logits + tau * jnp.asarray(log_prior(class_counts)), labels)


def gce(logits, labels, q: float = 0.7):
    """Generalized CE as BiasPruner / LfF implement it: CE(x, y) * q * p_y^q, p_y detached.

    Its gradient is that of (1 - p_y^q) / q times q: confident (bias-aligned) samples dominate,
    which is what makes the GCE model a biased model."""
    ce = cross_entropy(logits, labels)
    p_y = jax.lax.stop_gradient(jnp.exp(-ce))
    return ce * q * p_y**q


def kd(student_logits, teacher_logits, temperature: float = 4.0):
    """Hinton KD: T^2 * KL(softmax(t / T) || softmax(s / T)), per sample.

    Its stationary point is head-biased on long-tailed data, by construction: the KD term is
    a cross-entropy against soft labels with no prior correction, averaged over the
    (long-tailed) training images, so wherever the student cannot tell classes apart its
    optimum is the training-frequency-weighted mixture of the teacher's outputs, i.e. the
    training prior that plain CE has. Added to balanced softmax (whose own term removes that
    prior through the train-time log prior) it re-adds the head offset: in FoPro-KD's quick,
    head - tail logit offset +3.23 vs 0.00 for balanced softmax alone, tail accuracy 0.165.
    Expected, not a bug; `balanced_kd` (the teacher's target re-weighted per class) is the
    usual remedy."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return temperature**2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def balanced_kd(student_logits, teacher_logits, class_weights, temperature: float = 4.0):
    """Class-balanced KD (BKD, Zhang et al., Neurocomputing 2023, as their `BKDLoss`):
    T^2 * KL(q || softmax(s / T)) per sample, with the teacher's softened outputs re-weighted
    per class and renormalised, q_c = w_c p_c / sum_k w_k p_k, p = softmax(t / T).

    With effective-number weights (w_c ~ 1 / n_c for small counts) q divides the training
    prior out of the teacher's target, so the KD term no longer pulls a balanced-softmax
    student back to the head (see `kd`). The batch mean of it is BKD's `batchmean`."""
    w = jnp.asarray(class_weights, jnp.float32)
    p = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature) * w
    q = p / jnp.sum(p, axis=-1, keepdims=True)
    s = jax.nn.log_softmax(student_logits / temperature)
    logq = jnp.log(jnp.where(q > 0, q, 1.0))  # q log q = 0 where a class weighs 0
    return temperature**2 * jnp.sum(q * (logq - s), axis=-1)


def feature_kd(student_features, teacher_features):
    """Feature KD (FitNets-style L2): mean over feature dims of (s - t)^2, per sample. The
    teacher is not stop-gradiented here: a caller that trains only the student differentiates
    only the student's params."""
    diff = student_features.astype(jnp.float32) - teacher_features.astype(jnp.float32)
    return jnp.mean(diff * diff, axis=-1)


def cosine_kd(student_features, teacher_features, eps: float = 1e-12):
    """FoPro-KD's EKD term (BYOL's loss): 2 - 2 cos(s, t) = ||s/|s| - t/|t|||^2, per sample;
    vectors normalised as torch's F.normalize (x / max(|x|, eps), `l2_normalize`: finite
    gradients on an all-zero row)."""
    s = l2_normalize(student_features, eps=eps)
    t = l2_normalize(teacher_features, eps=eps)
    return 2.0 - 2.0 * jnp.sum(s * t, axis=-1)


LOSSES = ("ce", "bce", "balanced_softmax", "focal", "ldam", "gce", "class_balanced",
          "logit_adjusted")


def classification_loss(name: str, logits, labels, *, class_counts=None,
                        label_smoothing: float = 0.0, gce_q: float = 0.7,
                        focal_gamma: float = 2.0, cb_beta: float = 0.9999, la_tau: float = 1.0):
    """Per-sample training loss by config name (the supervised trainer's switch). logits
    [B, C]; labels [B] class ids, or [B, C] multi-hot for 'bce'."""
    chex.assert_rank(logits, 2)
    chex.assert_axis_dimension(labels, 0, logits.shape[0])
    if name == "bce":
        chex.assert_equal_shape([logits, labels])
    elif name != "ce":  # ('ce' also takes soft [B, C] targets)
        chex.assert_rank(labels, 1)
    if name == "ce":
        return cross_entropy(logits, labels, label_smoothing)
    if name == "bce":
        return binary_cross_entropy(logits, labels)
    if name == "gce":
        return gce(logits, labels, gce_q)
    if name == "focal":
        return focal(logits, labels, focal_gamma)
    if name in ("balanced_softmax", "ldam", "class_balanced", "logit_adjusted"):
        if class_counts is None:
            raise ValueError(f"loss {name!r} needs the training class counts")
        if name == "class_balanced":
            return class_balanced(logits, labels, class_counts, cb_beta)
        if name == "logit_adjusted":
            return logit_adjusted(logits, labels, class_counts, la_tau)
        fn = {"balanced_softmax": balanced_softmax, "ldam": ldam}[name]
        return fn(logits, labels, class_counts)
    raise ValueError(f"unknown loss {name!r}; known: {LOSSES}")


# ---------------------------------------------------------------------------- segmentation
def soft_dice_loss(logits, targets, smooth: float = 1.0):
    """1 - soft Dice per sample: (2 sum(p t) + s) / (sum p + sum t + s), p = sigmoid(logits),
    summed over every non-batch axis. `smooth` keeps empty masks defined (empty target, empty
    prediction: loss 0) and the gradient finite; targets are 0/1 floats."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    t = jnp.asarray(targets, jnp.float32).reshape(targets.shape[0], -1)
    dice = (2 * jnp.sum(p * t, -1) + smooth) / (jnp.sum(p, -1) + jnp.sum(t, -1) + smooth)
    return 1.0 - dice


def dice_bce(logits, targets, dice_weight: float = 1.0, bce_weight: float = 1.0,
             smooth: float = 1.0):
    """Segmentation loss per sample (B,): bce_weight * pixel-mean BCE + dice_weight * soft Dice
    loss, on logits and 0/1 target masks of the same shape (B, H, W[, 1])."""
    if logits.shape != targets.shape:
        raise ValueError(f"dice_bce: logits {logits.shape} and targets {targets.shape} differ")
    t = jnp.asarray(targets, jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), t)
    bce = jnp.mean(bce.reshape(bce.shape[0], -1), -1)
    return bce_weight * bce + dice_weight * soft_dice_loss(logits, t, smooth)


__all__ = [
    "balanced_kd", "balanced_softmax", "binary_cross_entropy", "class_balanced",
    "class_balanced_weights", "classification_loss", "cosine_kd", "cross_entropy", "dice_bce",
    "drw_weights", "feature_kd", "focal", "gce", "kd", "l2_normalize", "ldam", "ldam_margins",
    "log_prior", "logit_adjusted", "normalised_sample_weights", "soft_cross_entropy",
    "soft_dice_loss", "weighted_mean", "LOSSES",
]
