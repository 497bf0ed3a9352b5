"""PruneCXR's analysis, in numpy / scipy: per-class metrics across runs and sparsities,
forgettability curves, correlations with class frequency, class-pair curve distances and
pruning-identified exemplars (PIEs). Pure functions of prediction arrays; `analyze` composes
them for the report, tests check them against independent computations.

Shapes: preds [runs R, sparsities S, images N, classes C]; labels [N, C] (0/1).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from jaxmed.metrics import binary_counts, f1_from_counts, per_class_ap, per_class_auc


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


def correlate(x, y) -> Correlation:
    """Pearson r and Spearman rho with their two-sided p-values (scipy.stats). Pairs with a NaN /
    None side are dropped (a class that never drops 20%); fewer than 3 pairs, or a constant
    side, give NaN."""
    x = np.asarray([np.nan if v is None else v for v in x], np.float64)
    y = np.asarray([np.nan if v is None else v for v in y], np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(int(x.size), *(float("nan"),) * 4)
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    return Correlation(int(x.size), float(pearson.statistic), float(pearson.pvalue),
                       float(spearman.statistic), float(spearman.pvalue))


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
    """Spearman correlation across classes, per image: a, b are [N, C]. Vectorised over images
    (Pearson of scipy's average ranks, row by row); an image whose scores are all tied gets 0."""
    ra = stats.rankdata(a, method="average", axis=1)
    rb = stats.rankdata(b, method="average", axis=1)
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


# ------------------------------------------------------------------------------ the study


def analyze(sweeps: dict, cfg) -> dict:
    """Every quantity of the study from the sweep arrays (`stages.load_sweeps`); `cfg` is
    `config.prunecxr`. Kept apart from file writing so tests can read the numbers."""
    meta, labels = sweeps["meta"], sweeps["labels"]
    sp = np.asarray(meta["sparsities"])
    names = meta["class_names"]
    counts = np.asarray(meta["train_class_counts"], np.float64)
    log_freq = np.log(np.maximum(counts, 1))
    out = {"sparsities": sp, "class_names": names, "log_freq": log_freq, "counts": counts,
           "labels": labels, "index": sweeps["index"], "kinds": {}}
    for kind in meta["prune_types"]:
        m = per_class_metrics(sweeps[kind], labels)
        curves = {k: forgettability_curves(v) for k, v in m.items()}
        drop = first_drop(curves["ap"], sp, cfg.drop_threshold)
        change = change_at(curves["ap"], sp, cfg.change_level)
        pairs = class_pairs(curves["ap"], log_freq, labels)
        corr = {
            "log train freq vs first 20% AP drop": correlate(log_freq, drop),
            "log train freq vs relative AP change at 95%": correlate(log_freq, change),
            "FCD vs |diff of log freq|": correlate(pairs["fcd"], pairs["dlogfreq"]),
            "FCD vs IoU^(1/4)": correlate(pairs["fcd"], pairs["iou_quarter"]),
        }
        out["kinds"][kind] = {"metrics": m, "curves": curves, "first_drop": drop,
                              "change": change, "pairs": pairs, "corr": corr,
                              "map": np.nanmean(m["ap"], axis=-1)}
    base = "l1" if "l1" in sweeps else meta["prune_types"][0]
    pies, scores = find_pies(sweeps[base], sp, cfg.pie_level, cfg.pie_fraction)
    out["pies"] = {"kind": base, "indices": pies, "scores": scores,
                   "ratio": prevalence_ratio(labels, pies),
                   "diseases": disease_count_shares(labels, pies, names)}
    return out
