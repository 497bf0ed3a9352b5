"""PruneCXR's analysis, in numpy: per-class metrics across runs and sparsities, forgettability
curves, correlations with class frequency, class-pair curve distances and pruning-identified
exemplars (PIEs). Pure functions of prediction arrays; `prunecxr.py` feeds them, tests check
them against independent computations.

Shapes: preds [runs R, sparsities S, images N, classes C]; labels [N, C] (0/1).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special

from jaxmed.metrics import binary_counts, f1_from_counts, per_class_ap, per_class_auc, rank_average


def per_class_metrics(preds: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """AP, AUROC and F1 at `threshold` for every run, sparsity and class: each [R, S, C]."""
    y = np.broadcast_to(labels, preds.shape)
    tp, fp, fn, _ = binary_counts(y, preds >= threshold)
    return {"ap": per_class_ap(preds, y), "auc": per_class_auc(preds, y),
            "f1": f1_from_counts(tp, fp, fn)}


def relative_change(m: np.ndarray) -> np.ndarray:
    """(m_k - m_0) / m_0 per run and class; m is [R, S, C] with S index 0 = dense."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (m - m[:, :1]) / m[:, :1]


def forgettability_curves(m: np.ndarray) -> np.ndarray:
    """Median over runs of the relative change: [S, C] (row 0 is 0 by definition)."""
    return np.median(relative_change(m), axis=0)


def first_drop(curves: np.ndarray, sparsities, threshold: float = 0.2) -> list:
    """Per class, the first sparsity whose median relative change is strictly below
    -threshold, or None when the class never drops that far."""
    out = []
    for c in range(curves.shape[1]):
        hit = np.flatnonzero(curves[:, c] < -threshold)
        out.append(float(sparsities[hit[0]]) if hit.size else None)
    return out


def change_at(curves: np.ndarray, sparsities, level: float) -> np.ndarray:
    idx = int(np.argmin(np.abs(np.asarray(sparsities) - level)))
    if not math.isclose(sparsities[idx], level, abs_tol=1e-6):
        raise ValueError(f"sparsity {level} is not among the swept levels {list(sparsities)}")
    return curves[idx]


@dataclasses.dataclass
class Correlation:
    n: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float


def _pearson(x, y) -> tuple[float, float]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.size
    xm, ym = x - x.mean(), y - y.mean()
    r = float(np.sum(xm * ym) / math.sqrt(np.sum(xm * xm) * np.sum(ym * ym)))
    r = max(min(r, 1.0), -1.0)
    if n < 3:
        return r, float("nan")
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return r, float(2 * special.stdtr(n - 2, -abs(t)))


def correlate(x, y) -> Correlation:
    """Pearson r and Spearman rho (Pearson of average ranks), two-sided p-values from the t
    distribution with n - 2 degrees of freedom. Pairs with a NaN / None side are dropped."""
    x = np.asarray([np.nan if v is None else v for v in x], np.float64)
    y = np.asarray([np.nan if v is None else v for v in y], np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(int(x.size), *(float("nan"),) * 4)
    r, p = _pearson(x, y)
    rho, prho = _pearson(rank_average(x), rank_average(y))
    return Correlation(int(x.size), r, p, rho, prho)


def cooccurrence_iou(labels: np.ndarray) -> np.ndarray:
    """Standard IoU of every class pair on 0/1 labels: images with both / images with either."""
    y = (np.asarray(labels) > 0.5).astype(np.int64)
    both = y.T @ y
    count = y.sum(0)
    either = count[:, None] + count[None, :] - both
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(either > 0, both / np.maximum(either, 1), 0.0)


def class_pairs(curves: np.ndarray, log_freq: np.ndarray, test_labels: np.ndarray) -> dict:
    """For every class pair i < j: forgettability curve distance (Euclidean, over the pruned
    levels), |difference of log frequency| and IoU^(1/4) of test-label co-occurrence."""
    c = curves.shape[1]
    i, j = np.triu_indices(c, k=1)
    pruned = curves[1:]
    fcd = np.linalg.norm(pruned[:, i] - pruned[:, j], axis=0)
    iou = cooccurrence_iou(test_labels)[i, j]
    return {"i": i, "j": j, "fcd": fcd, "dlogfreq": np.abs(log_freq[i] - log_freq[j]),
            "iou_quarter": iou**0.25}


def per_image_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation across classes, per image: a, b are [N, C]."""
    ra, rb = rank_average(a), rank_average(b)
    ra = ra - ra.mean(1, keepdims=True)
    rb = rb - rb.mean(1, keepdims=True)
    den = np.sqrt(np.sum(ra * ra, 1) * np.sum(rb * rb, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(ra * rb, 1) / den, 0.0)


def find_pies(preds: np.ndarray, sparsities, level: float = 0.9, fraction: float = 0.05):
    """PIEs (Hooker et al.): average the runs' probabilities at each sparsity; per image, the
    Spearman correlation between the dense and the `level` ensembles; the floor(fraction * N)
    images with the lowest correlation. Returns (pie indices sorted by score, scores [N])."""
    idx = int(np.argmin(np.abs(np.asarray(sparsities) - level)))
    ens = preds.mean(axis=0)  # [S, N, C]
    scores = per_image_spearman(ens[0], ens[idx])
    k = int(math.floor(fraction * scores.size))
    order = np.argsort(scores, kind="stable")
    return order[:k], scores


def prevalence_ratio(labels: np.ndarray, pies: np.ndarray) -> np.ndarray:
    """Per class: prevalence among PIEs / prevalence among the other images."""
    y = np.asarray(labels) > 0.5
    is_pie = np.zeros(len(y), bool)
    is_pie[pies] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        return y[is_pie].mean(0) / y[~is_pie].mean(0)


def disease_count_shares(labels: np.ndarray, pies: np.ndarray, class_names,
                         no_finding: str = "No Finding") -> dict:
    """Share of images with 0, 1, 2, 3, 4+ diseases (the No Finding class not counted), among
    PIEs and among the other images."""
    y = np.asarray(labels) > 0.5
    keep = [c for c, n in enumerate(class_names) if n != no_finding]
    counts = np.minimum(y[:, keep].sum(1), 4)
    is_pie = np.zeros(len(y), bool)
    is_pie[pies] = True
    share = lambda m: np.bincount(counts[m], minlength=5) / max(int(m.sum()), 1)  # noqa: E731
    return {"bins": ["0", "1", "2", "3", "4+"], "pie": share(is_pie), "non_pie": share(~is_pie)}
