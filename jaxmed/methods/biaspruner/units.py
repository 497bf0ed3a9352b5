"""Which units carry the shortcut, and where each ranking puts them (issue 23): does the bias
score find the units the paper says it finds?

Shortcut units are measured, not assumed: on held-out images whose attribute is known (the
unbiased test set), a unit is a shortcut unit when its pooled post-ReLU activation separates
the attribute's two values (red / green) at fixed class. Per class k, AUC_k is the ROC AUC of
the activation for attribute 1 against attribute 0 among class k's images
(`metrics.binary_auc`); the unit's separation is the mean over classes of max(AUC_k, 1 - AUC_k),
so a red and a green detector both count, and so does a unit that fires for red in one class
and green in the other (pooled over classes its AUC would be 0.5). At fixed class, a unit that
reads the outline does not separate the colours. A unit is a shortcut unit when its separation
is at least `threshold`.

Rankings (`rankings`): every bias-score variant (`scores`, computed on the GCE model's split of
the training images, as the method does), magnitude (filter L1 norm, the lowest pruned: the
ablation) and random. Each cut is the method's: the top gamma fraction of all units in one
global ranking, no layer emptied (`structured.channel_masks`, as `subnetworks.keep_units`).

`analyse` reports, per ranking: the fraction of the pruned set that are shortcut units (the
`chance` level is their share of all units), the fraction of the shortcut units pruned, and per
layer the units the raw global cut takes (`raw_pruned`: before the keep-one rule; all of a
layer's units means the cut would have emptied it), the units pruned, the shortcut units there,
how many of them are pruned and their median position in the prune order (0 = pruned first,
1 = pruned last); per score (variants and magnitude) and layer, the score's distribution.
"""

from __future__ import annotations

import numpy as np

from jaxmed import metrics
from jaxmed.methods.biaspruner import scores
from jaxmed.pruning import structured

DEFAULT_THRESHOLD = 0.9


def separation(acts: dict, attr, labels) -> dict[str, np.ndarray]:
    """{layer: [C]} mean over classes of max(AUC_k, 1 - AUC_k) of each unit's activation
    (acts {layer: [N, C]}) for attr [N] (0 / 1; other values ignored) within class k
    (labels [N]); classes lacking one attribute value are skipped."""
    attr, labels = np.asarray(attr), np.asarray(labels)
    known = (attr == 0) | (attr == 1)
    classes = [k for k in np.unique(labels[known])
               if len(np.unique(attr[known & (labels == k)])) == 2]
    if not classes:
        raise ValueError("separation: no class has images of both attribute values")
    out = {}
    for name, a in acts.items():
        a = np.asarray(a, np.float64)
        per = []
        for k in classes:
            rows = known & (labels == k)
            auc = metrics.binary_auc(a[rows].T, attr[rows])  # [C]
            per.append(np.maximum(auc, 1.0 - auc))
        out[name] = np.mean(per, axis=0)
    return out


def shortcut_units(sep: dict, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
    """{layer: bool [C]}: separation >= threshold."""
    return {k: np.asarray(v) >= threshold for k, v in sep.items()}


def rankings(acts: dict, aligned, labels, backbone=None, *, seed: int = 0) -> dict:
    """{name: (scores {layer: [C]}, 'highest' | 'lowest': which end is pruned)}: every bias
    score variant of acts {layer: [N, C]} under the GCE split (aligned [N]) and labels [N],
    magnitude (filter L1 of `backbone`'s units) when given the backbone, and random."""
    out = {kind: (scores.bias_scores(acts, aligned, labels, kind), "highest")
           for kind in scores.BIAS_SCORES}
    if backbone is not None:
        l1 = {k: np.asarray(v) for k, v in structured.filter_l1_scores(backbone).items()}
        out["magnitude"] = ({k: l1[k] for k in acts}, "lowest")
    rng = np.random.default_rng(seed)
    out["random"] = ({k: rng.random(np.shape(v)[-1]) for k, v in acts.items()}, "highest")
    return out


def prune_position(values: dict, prune: str) -> dict[str, np.ndarray]:
    """{layer: [C]} each unit's position in the global prune order as a fraction: 0 is the
    first unit pruned, 1 the last (ties in layer order, as `structured.channel_masks`)."""
    names = list(values)
    sign = 1.0 if prune == "lowest" else -1.0
    flat = np.concatenate([sign * np.asarray(values[k], np.float64) for k in names])
    pos = np.empty(flat.size)
    pos[np.argsort(flat, kind="stable")] = np.arange(flat.size) / max(flat.size - 1, 1)
    out, start = {}, 0
    for k in names:
        n = np.size(values[k])
        out[k] = pos[start:start + n]
        start += n
    return out


def distribution(v) -> dict:
    v = np.asarray(v, np.float64)
    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {**{k: float(x) for k, x in zip(("min", "q25", "median", "q75", "max"), q)},
            "mean": float(v.mean()), "std": float(v.std())}


def analyse(ranks: dict, shortcut: dict, gamma: float, *, sep: dict | None = None) -> dict:
    """The report (module docstring) of rankings {name: (scores, prune)} against the shortcut
    units {layer: bool [C]}, every ranking cut at `gamma`; JSON-ready."""
    layers = list(shortcut)
    total = sum(np.size(shortcut[k]) for k in layers)
    n_short = int(sum(np.sum(shortcut[k]) for k in layers))
    out = {"gamma": gamma, "units": total, "shortcut_units": n_short,
           "chance": n_short / total, "layers": [], "rankings": {}, "scores": {}}
    for k in layers:
        row = {"layer": k, "units": int(np.size(shortcut[k])),
               "shortcut": np.flatnonzero(shortcut[k]).tolist()}
        if sep is not None:
            row["separation"] = distribution(sep[k])
        out["layers"].append(row)
    for name, (values, prune) in ranks.items():
        values = {k: np.asarray(values[k]) for k in layers}
        kept = structured.channel_masks(values, gamma, prune=prune)
        raw = structured.channel_masks(values, gamma, prune=prune, min_keep=0)
        pos = prune_position(values, prune)
        pruned = {k: ~kept[k] for k in layers}
        n_pruned = int(sum(p.sum() for p in pruned.values()))
        hit = int(sum((pruned[k] & shortcut[k]).sum() for k in layers))
        per_layer = {}
        for k in layers:
            s = np.asarray(shortcut[k], bool)
            per_layer[k] = {
                "raw_pruned": int((~raw[k]).sum()), "pruned": int(pruned[k].sum()),
                "shortcut": int(s.sum()), "shortcut_pruned": int((pruned[k] & s).sum()),
                "shortcut_position": float(np.median(pos[k][s])) if s.any() else None}
        out["rankings"][name] = {
            "prune": prune, "pruned": n_pruned, "shortcut_pruned": hit,
            "precision": hit / n_pruned if n_pruned else float("nan"),
            "recall": hit / n_short if n_short else float("nan"),
            "emptied_by_raw_cut": [k for k in layers
                                   if per_layer[k]["raw_pruned"] == np.size(shortcut[k])],
            "per_layer": per_layer}
        if name != "random":
            out["scores"][name] = {k: distribution(values[k]) for k in layers}
    return out


def table_rows(report: dict) -> list[dict]:
    """One row per (ranking, layer) and a summary row per ranking, for a printed table."""
    rows = []
    for name, r in report["rankings"].items():
        for k, p in r["per_layer"].items():
            d = report["scores"].get(name, {}).get(k, {})
            rows.append({"ranking": name, "layer": k, "pruned": p["pruned"],
                         "raw_pruned": p["raw_pruned"], "shortcut": p["shortcut"],
                         "shortcut_pruned": p["shortcut_pruned"],
                         "shortcut_position": p["shortcut_position"],
                         "score_median": d.get("median"), "score_iqr": (
                             d["q75"] - d["q25"]) if d else None})
        rows.append({"ranking": name, "layer": "ALL", "pruned": r["pruned"],
                     "shortcut": report["shortcut_units"],
                     "shortcut_pruned": r["shortcut_pruned"],
                     "precision": r["precision"], "recall": r["recall"],
                     "chance": report["chance"]})
    return rows


__all__ = ["DEFAULT_THRESHOLD", "analyse", "distribution", "prune_position", "rankings",
           "separation", "shortcut_units", "table_rows"]
