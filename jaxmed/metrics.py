"""Evaluation metrics in numpy, vectorised over leading axes where a sweep needs it.

Definitions follow scikit-learn (tests compare against it): AP is the step-wise
`average_precision_score` (no interpolation, tied scores grouped), AUC the Mann-Whitney
statistic with average ranks for ties, balanced accuracy the mean recall over the classes present
in `y_true`. A binary quantity that is undefined (no positives or no negatives) is NaN and
macro averages skip it (`nanmean`).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def _nanmean(x, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties getting their average rank (float64)."""
    return stats.rankdata(np.asarray(x), method="average", axis=-1).astype(np.float64)


def binary_auc(scores, labels) -> np.ndarray:
    """ROC AUC of binary problems along the last axis (any leading shape)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    pos = labels.sum(-1)
    neg = labels.shape[-1] - pos
    rank_sum = np.sum(rank_average(scores) * labels, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def binary_average_precision(scores, labels) -> np.ndarray:
    """scikit-learn's average precision along the last axis (any leading shape)."""
    scores, labels = np.asarray(scores, np.float64), (np.asarray(labels) > 0.5)
    order = np.argsort(-scores, axis=-1, kind="stable")
    s = np.take_along_axis(scores, order, -1)
    y = np.take_along_axis(labels, order, -1).astype(np.float64)
    tps = np.cumsum(y, -1)
    n = np.arange(1, y.shape[-1] + 1)
    precision = tps / n
    ends = np.ones(s.shape, bool)
    ends[..., :-1] = s[..., 1:] != s[..., :-1]  # last element of each run of tied scores
    tp_at_end = np.where(ends, tps, 0.0)
    prev = np.concatenate([np.zeros(tps.shape[:-1] + (1,)),
                           np.maximum.accumulate(tp_at_end, -1)[..., :-1]], -1)
    pos = tps[..., -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.sum(np.where(ends, (tps - prev) * precision, 0.0), -1) / pos
    return np.where(pos > 0, ap, np.nan)


def per_class_auc(probs, labels_onehot) -> np.ndarray:
    """(..., N, C) scores and 0/1 labels -> (..., C) one-vs-rest AUC."""
    return binary_auc(np.swapaxes(probs, -1, -2), np.swapaxes(labels_onehot, -1, -2))


def per_class_ap(probs, labels_onehot) -> np.ndarray:
    """(..., N, C) scores and 0/1 labels -> (..., C) average precision."""
    return binary_average_precision(np.swapaxes(probs, -1, -2),
                                    np.swapaxes(labels_onehot, -1, -2))


def macro_auc(probs, labels_onehot) -> float:
    return float(_nanmean(per_class_auc(probs, labels_onehot)))


def mean_average_precision(probs, labels_onehot) -> float:
    return float(_nanmean(per_class_ap(probs, labels_onehot)))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """C[i, j] = number of samples of true class i predicted as j."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true, y_pred, num_classes: int) -> float:
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def binary_counts(y_true, y_pred):
    """tp, fp, fn, tn per column of 0/1 arrays (..., N, C) -> (..., C) each."""
    t, p = np.asarray(y_true) > 0.5, np.asarray(y_pred) > 0.5
    tp = np.sum(t & p, -2)
    fp = np.sum(~t & p, -2)
    fn = np.sum(t & ~p, -2)
    tn = np.sum(~t & ~p, -2)
    return tp, fp, fn, tn


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def f1_from_counts(tp, fp, fn) -> np.ndarray:
    """F1 per class; 0 where the class is neither predicted nor present (zero_division=0)."""
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)


def sensitivity_specificity(tp, fp, fn, tn):
    return _ratio(tp, tp + fn), _ratio(tn, tn + fp)


def one_hot(y, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(y, np.int64)]


def single_label_metrics(probs, labels) -> dict:
    """probs (N, C), integer labels (N,) -> the standard single-label report."""
    probs, labels = np.asarray(probs), np.asarray(labels, np.int64)
    c = probs.shape[-1]
    pred = probs.argmax(-1)
    tp, fp, fn, tn = binary_counts(one_hot(labels, c), one_hot(pred, c))
    sens, spec = sensitivity_specificity(tp, fp, fn, tn)
    present = np.bincount(labels, minlength=c) > 0
    return {
        "accuracy": accuracy(labels, pred),
        "balanced_accuracy": balanced_accuracy(labels, pred, c),
        "auc": macro_auc(probs, one_hot(labels, c)),
        "map": mean_average_precision(probs, one_hot(labels, c)),
        "f1": float(np.mean(f1_from_counts(tp, fp, fn)[present | (tp + fp > 0)])),
        "sensitivity": float(_nanmean(sens)),
        "specificity": float(_nanmean(spec)),
    }


def multi_label_metrics(probs, labels, threshold: float = 0.5) -> dict:
    """probs (N, C) sigmoid outputs, labels (N, C) 0/1 -> macro report.

    accuracy is element-wise (Hamming) accuracy at `threshold`; balanced_accuracy the mean over
    classes of (sensitivity + specificity) / 2."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    pred = probs >= threshold
    tp, fp, fn, tn = binary_counts(labels, pred)
    sens, spec = sensitivity_specificity(tp, fp, fn, tn)
    return {
        "accuracy": float(np.mean(pred == (labels > 0.5))),
        "balanced_accuracy": float(_nanmean((sens + spec) / 2)),
        "auc": macro_auc(probs, labels),
        "map": mean_average_precision(probs, labels),
        "f1": float(np.mean(f1_from_counts(tp, fp, fn))),
        "sensitivity": float(_nanmean(sens)),
        "specificity": float(_nanmean(spec)),
    }


# ------------------------------------------------------------------------------ fairness
def _rate(hit, cond) -> float:
    n = int(np.sum(cond))
    return float(np.sum(hit & cond) / n) if n else float("nan")


def fairness(y_true, y_pred, attr, positive: int = 1) -> dict:
    """Group fairness of a binary decision w.r.t. a binary sensitive attribute (groups 0, 1;
    other values, e.g. -1 unknown, are ignored).

    EOpp0 = |TNR_0 - TNR_1|, EOpp1 = |TPR_0 - TPR_1|, EOdd = |TPR gap| + |FPR gap| (the sum
    convention; some papers halve it), DP ratio = min / max over groups of P(y_hat = positive),
    and accuracy / balanced accuracy per group."""
    y, p, a = (np.asarray(v) for v in (y_true, y_pred, attr))
    pos_t, pos_p = y == positive, p == positive
    out: dict = {}
    rates = {}
    for g in (0, 1):
        in_g = a == g
        tpr = _rate(pos_p, pos_t & in_g)
        tnr = _rate(~pos_p, ~pos_t & in_g)
        rates[g] = (tpr, tnr, _rate(pos_p, in_g))
        out[f"accuracy_group{g}"] = _rate(y == p, in_g)
        out[f"balanced_accuracy_group{g}"] = float(np.nanmean([tpr, tnr]))
    (tpr0, tnr0, dp0), (tpr1, tnr1, dp1) = rates[0], rates[1]
    out["eopp0"] = abs(tnr0 - tnr1)
    out["eopp1"] = abs(tpr0 - tpr1)
    out["eodd"] = abs(tpr0 - tpr1) + abs((1 - tnr0) - (1 - tnr1))
    hi = max(dp0, dp1)
    out["dp_ratio"] = min(dp0, dp1) / hi if hi > 0 else float("nan")
    return out


# ---------------------------------------------------------------------------- continual
def continual_summary(acc: np.ndarray) -> dict:
    """From the accuracy matrix R[i, j] (after training task i, accuracy on task j; entries
    with j > i unused): ACC = mean of the last row, BWT = mean_{j<T-1} R[T-1, j] - R[j, j],
    forgetting = mean_{j<T-1} max_{j<=i<T-1} R[i, j] - R[T-1, j]."""
    r = np.asarray(acc, np.float64)
    t = r.shape[0]
    last = r[t - 1]
    if t == 1:
        return {"acc": float(last[0]), "bwt": 0.0, "forgetting": 0.0}
    bwt = np.mean([last[j] - r[j, j] for j in range(t - 1)])
    forget = np.mean([np.max(r[j:t - 1, j]) - last[j] for j in range(t - 1)])
    return {"acc": float(np.mean(last)), "bwt": float(bwt), "forgetting": float(forget)}


# ---------------------------------------------------------------------------- segmentation
def _binary_masks(pred, target, threshold: float):
    """pred: probabilities (>= threshold is lesion) or 0/1 masks; target: 0/1 or 0/255 masks
    (> 0.5 is lesion). Both (N, ...) -> bool (N, P) with the pixels flattened."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"predicted masks {pred.shape} and true masks {target.shape} differ")
    n = pred.shape[0]
    return (pred >= threshold).reshape(n, -1), (target > 0.5).reshape(n, -1)


def iou_per_image(pred, target, threshold: float = 0.5) -> np.ndarray:
    """Jaccard |P & T| / |P | T| per image (N,). Both masks empty: 1.0 (nothing to find and
    nothing found is a perfect answer; ISIC's own images all hold a lesion); one empty: 0.0."""
    p, t = _binary_masks(pred, target, threshold)
    inter, union = np.sum(p & t, -1), np.sum(p | t, -1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dice_per_image(pred, target, threshold: float = 0.5) -> np.ndarray:
    """Dice 2|P & T| / (|P| + |T|) per image (N,); both masks empty: 1.0, as `iou_per_image`."""
    p, t = _binary_masks(pred, target, threshold)
    inter, total = np.sum(p & t, -1), np.sum(p, -1) + np.sum(t, -1)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


ISIC_JACCARD_CUTOFF = 0.65


def thresholded_jaccard(pred, target, threshold: float = 0.5,
                        cutoff: float = ISIC_JACCARD_CUTOFF) -> float:
    """ISIC 2018 task 1 score: per-image Jaccard, set to 0 below `cutoff` (0.65), averaged."""
    return _thresholded(iou_per_image(pred, target, threshold), cutoff)


def _thresholded(j, cutoff: float) -> float:
    return float(np.mean(np.where(j >= cutoff, j, 0.0)))


def segmentation_metrics(pred, target, threshold: float = 0.5) -> dict:
    """Mean IoU, mean Dice and the ISIC thresholded Jaccard over images."""
    j = iou_per_image(pred, target, threshold)
    return {"iou": float(np.mean(j)),
            "dice": float(np.mean(dice_per_image(pred, target, threshold))),
            "thresholded_jaccard": _thresholded(j, ISIC_JACCARD_CUTOFF)}


# ------------------------------------------------------------------------------ long tail
def class_groups(train_counts, boundaries=()) -> np.ndarray:
    """Group of each class by its training count: 0 head, 1 medium, 2 tail.

    No boundaries: thirds of the classes ranked by count (ties by class index; with C not a
    multiple of 3 the head, then the medium group, get the extra class: 8 -> 3 / 3 / 2).
    boundaries=(many, few): head count > many, tail count < few, medium otherwise (the
    many / medium / few-shot convention, e.g. (100, 20))."""
    counts = np.asarray(train_counts, np.int64)
    groups = np.ones(len(counts), np.int64)
    if len(boundaries):
        many, few = boundaries
        if few > many:
            raise ValueError(f"group boundaries (many, few)={tuple(boundaries)} need few <= many")
        groups[counts > many] = 0
        groups[counts < few] = 2
        return groups
    order = np.argsort(-counts, kind="stable")
    for g, part in enumerate(np.array_split(order, 3)):
        groups[part] = g
    return groups


def per_class_recall(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class absent from y_true)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def group_accuracies(y_true, y_pred, groups) -> dict:
    """head_acc / medium_acc / tail_acc: the mean recall of the group's classes present in
    y_true (on a balanced test set, the group's accuracy); NaN for a group with none."""
    recall = per_class_recall(y_true, y_pred, len(groups))
    groups = np.asarray(groups)
    return {f"{name}_acc": float(_nanmean(recall[groups == g])) if np.any(
        (groups == g) & ~np.isnan(recall)) else float("nan")
        for g, name in enumerate(("head", "medium", "tail"))}


__all__ = [
    "accuracy", "balanced_accuracy", "binary_auc", "binary_average_precision", "binary_counts",
    "class_groups", "confusion_matrix", "continual_summary", "dice_per_image",
    "f1_from_counts", "fairness", "group_accuracies", "iou_per_image", "macro_auc",
    "mean_average_precision", "multi_label_metrics", "one_hot", "per_class_ap",
    "per_class_auc", "per_class_recall", "rank_average", "segmentation_metrics",
    "sensitivity_specificity", "single_label_metrics", "thresholded_jaccard",
    "ISIC_JACCARD_CUTOFF",
]
