"""A long-tailed subsample of any dataset's training split (`config.data.train_imbalance`).

Per-class counts follow the long-tailed benchmarks' geometric profile (Cao et al.'s
IMBALANCECIFAR: `int(n_max * imbalance ** (r / (C - 1)))` for the class of rank r): classes are
ranked by their count in the data (largest first, ties by class index), n_max is the largest
class's count, and a class keeps at most the images it has (so a class already below its target
keeps all of them and n_min / n_max is `imbalance` only where the data allows). The images kept
in each class are drawn without replacement by `config.data.split_seed`: the same subsample for
every method and seed of a comparison. Val and test stay as shipped.

Applied by `jaxmed.data.build`, which then sets `info.class_counts` to the subsample's counts
(what balanced softmax, LDAM and the class groups read). Single-label data only.
"""

from __future__ import annotations

import numpy as np

KEY = "config.data.train_imbalance"


def check_imbalance(imbalance) -> None:
    """`imbalance` in (0, 1] (1.0 = the split as shipped), else a ValueError naming the key."""
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not (
            0 < imbalance <= 1):
        raise ValueError(f"{KEY}={imbalance!r}: n_min / n_max of the training split's class "
                         "counts, in (0, 1] (1.0 = the split as shipped, 0.1 = a long tail)")


def target_counts(counts, imbalance: float) -> np.ndarray:
    """Images kept per class: the geometric profile by rank, capped by each class's count.
    Classes with no image in the data are left out of the ranking (they stay at 0)."""
    check_imbalance(imbalance)
    counts = np.asarray(counts, np.int64)
    present = np.flatnonzero(counts > 0)
    out = np.zeros_like(counts)
    if not present.size:
        return out
    order = present[np.argsort(-counts[present], kind="stable")]
    n_max = int(counts[order[0]])
    steps = max(len(order) - 1, 1)
    for r, c in enumerate(order):
        out[c] = min(int(counts[c]), int(n_max * imbalance ** (r / steps)))
    return out


def subsample_indices(labels, imbalance: float, seed: int, *, class_names=None,
                      where: str = "the train split") -> np.ndarray:
    """Sorted positions (into `labels`) of the long-tailed subsample. A class that had images
    but would keep none fails naming the key, the class and its count."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{KEY}={imbalance!r}: a long-tailed subsample needs single-label data; "
                         f"{where} has multi-label rows {labels.shape}")
    labels = labels.astype(np.int64)
    num = int(labels.max()) + 1 if labels.size else 0
    if class_names is not None:
        num = max(num, len(class_names))
    counts = np.bincount(labels, minlength=num)
    keep_n = target_counts(counts, imbalance)
    empty = np.flatnonzero((counts > 0) & (keep_n == 0))
    if empty.size:
        c = int(empty[0])
        name = class_names[c] if class_names is not None else f"class {c}"
        raise ValueError(f"{KEY}={imbalance!r} leaves {empty.size} class(es) of {where} empty, "
                         f"e.g. {name!r} ({int(counts[c])} images, largest class "
                         f"{int(counts.max())}): raise the imbalance factor to at least "
                         f"{1 / counts.max():.3g}")
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == c))[:keep_n[c]] for c in range(num)]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
