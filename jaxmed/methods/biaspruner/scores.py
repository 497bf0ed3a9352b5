"""BiasPruner's bias score of a unit and its variants (`config.continual.bias_score`).

Every variant starts from the same numbers: a[n, c], the spatially averaged post-ReLU
activation of channel c of one unit group (a layer: `layer1_0/conv1`) on training sample n;
the GCE model's split (aligned[n]: the biased model is right, S_ba; otherwise S_bc); and, for
'class_conditional', the sample's within-task label. A higher score means "more biased": the
top gamma fraction of all units is pruned (`subnetworks.keep_units`, one global cut).

  'paper' (the default, the paper's step 3): d_c = mean over S_ba of a[:, c] minus the mean
      over S_bc, ranked globally as it is. A missing group counts as zero activation.
  'layer_normalised': d, z-scored within each layer ((d - its layer's mean) / its layer's
      standard deviation, ddof 0; a layer whose scores are all equal scores 0) before the
      global cut. Why: layers differ in activation scale (BatchNorm scales, depth, width), and
      a raw global cut takes its units from the layers whose differences are widest, whatever
      the units carry; a whole layer's worth of the wrong units can go. The z-score and not the
      rank within each layer: ranks would make the global cut take the same fraction of every
      layer, which is per-layer pruning (`structured.channel_masks(scope='layer')`), while
      the z-score still lets a layer with a few outlying units lose more of them.
  'class_conditional': within each class k that has both groups, d_kc = mean over S_ba in k
      minus the mean over S_bc in k; the score is the mean over those classes (each class
      counts once, whatever its size) of |d_kc|. Why: in a 2 x 2 design (label x attribute),
      S_ba holds red class-0 and green class-1 images and S_bc green class-0 and red class-1
      ones, so a unit that detects red has about the same mean over both groups and the
      paper's score cancels for exactly the units that carry the colour. Within one class the
      two groups differ in the attribute only, so d_kc measures it; but red is the aligned
      colour of class 0 and the conflicting one of class 1, so a red detector's signed d_kc are
      +D and -D and their signed mean cancels as well: the magnitude is averaged. Conditioning
      on the class also stops a unit that fires for one class from scoring as biased only
      because the GCE model is right more often on that class. Classes lacking a group are
      skipped; when no class has both, every score is 0 (a warning says so).
  'absolute': |d_c|. A unit that fires more on the conflicting samples than on the aligned
      separates the two groups as much as one that fires more on the aligned: pruned as well.

Pure numpy on host arrays (the activations come from one jitted pass: `subnetworks.unit_pass`).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)
BIAS_SCORES = ("paper", "layer_normalised", "class_conditional", "absolute")


def check_kind(kind: str, key: str = "config.continual.bias_score") -> None:
    if kind not in BIAS_SCORES:
        raise ValueError(f"{key}={kind!r}: use one of {BIAS_SCORES}")


def aligned_minus_conflicting(act, aligned) -> np.ndarray:
    """d [C]: mean of act [N, C] over the aligned rows minus the mean over the others (a
    missing group counts as zero activation)."""
    act, easy = np.asarray(act), np.asarray(aligned, bool)
    n_easy, n_hard = int(easy.sum()), int((~easy).sum())
    return act[easy].sum(0) / max(n_easy, 1) - act[~easy].sum(0) / max(n_hard, 1)


def zscore(d) -> np.ndarray:
    """(d - mean) / std (ddof 0) of one layer's scores; 0 where they are all equal."""
    d = np.asarray(d, np.float64)
    sd = d.std()
    return np.zeros_like(d) if not sd > 0 else (d - d.mean()) / sd


def class_conditional(act, aligned, labels) -> np.ndarray | None:
    """mean over the classes with both groups of |d within the class| [C]; None if no class
    has both groups."""
    act, easy, labels = np.asarray(act), np.asarray(aligned, bool), np.asarray(labels)
    per_class = []
    for k in np.unique(labels):
        in_k = labels == k
        if (easy & in_k).any() and (~easy & in_k).any():
            per_class.append(np.abs(aligned_minus_conflicting(act[in_k], easy[in_k])))
    return np.mean(per_class, axis=0) if per_class else None


def bias_scores(acts: dict, aligned, labels, kind: str = "paper") -> dict[str, np.ndarray]:
    """{unit group: score [C]} of `kind` (module docstring) from acts {unit group: [N, C]},
    aligned [N] (bool: the GCE model is right) and labels [N] (within-task; read by
    'class_conditional' only)."""
    check_kind(kind, "bias_score")
    if kind == "class_conditional":
        if labels is None:
            raise ValueError("bias_score='class_conditional' needs the samples' labels")
        out = {k: class_conditional(v, aligned, labels) for k, v in acts.items()}
        if any(v is None for v in out.values()):
            log.warning("bias scores: no class has both bias-aligned and bias-conflicting "
                        "samples; every class-conditional score is 0")
            out = {k: np.zeros(np.shape(v)[-1]) for k, v in acts.items()}
        return out
    d = {k: aligned_minus_conflicting(v, aligned) for k, v in acts.items()}
    if kind == "layer_normalised":
        return {k: zscore(v) for k, v in d.items()}
    if kind == "absolute":
        return {k: np.abs(v) for k, v in d.items()}
    return d


__all__ = ["BIAS_SCORES", "aligned_minus_conflicting", "bias_scores", "check_kind",
           "class_conditional", "zscore"]
