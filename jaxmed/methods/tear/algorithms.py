"""The composition table: each semi-supervised algorithm as a choice of pieces (USB's hooks).

An `Algorithm` is plain, hashable data: the step maker (`step.make_ssl_step`) reads it in
Python while tracing, so each algorithm compiles to its own program and nothing in traced code
reads the config. Hyper-parameters are USB's defaults (microsoft/Semi-supervised-learning,
`config/classic_cv/<alg>/*`) or the TEAR spec's, as marked:

  supervised   labeled images alone (its own labeled-only stream, same B and schedule)
  pseudo_label Lee 2013 / USB: hard label of the weak view on itself, p_cutoff 0.95,
               lambda_u 1 ramped linearly over the first 40% of training (USB unsup_warmup 0.4)
  mean_teacher Tarvainen 2017 / USB: MSE(softmax student(strong), softmax EMA(weak)),
               lambda_u 50 ramped over 40%, EMA 0.999
  fixmatch     hard label of the weak view, mask max p >= 0.95, CE of the strong view, lambda 1
  fixmatch_da  + TEAR's distribution alignment (32-batch queue) before labelling
  flexmatch    curriculum thresholds p_cutoff 0.95, threshold warm-up, convex mapping
  freematch    self-adaptive global + local thresholds (EMA 0.999, from 1/C: the paper's
               init), fairness loss weight 0.001 (USB freematch ent_loss_ratio)
  softmatch    truncated-Gaussian weights (n_sigma 2, EMA 0.999) on uniformly aligned probs;
               labels from the raw probs (USB)
  tear         fixmatch_da + AdaPL (weight 0.1) + IPH (weight 0.1) with an EMA teacher (spec)
  tear_adapl   ablation: fixmatch_da + AdaPL          tear_iph  ablation: fixmatch_da + IPH
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    unlabeled: bool = True  # False: supervised-only (labeled stream only)
    views: tuple = ("weak", "strong")  # unlabeled views in the student's forward pass
    consistency: str = "ce"  # 'ce' (strong vs hard pseudo label), 'self' (weak vs itself),
    #                          'mse' (mean teacher: student strong vs EMA weak probabilities)
    mask: str = "fixed"  # 'fixed', 'flex', 'free', 'soft' (weights), 'none'
    da: str = "none"  # 'none', 'queue' (TEAR), 'uniform' (SoftMatch)
    lambda_u: float = 1.0
    unsup_warmup: float = 0.0  # fraction of training over which lambda_u ramps from 0 (USB)
    threshold: float = 0.95
    lambda_fair: float = 0.0  # FreeMatch's fairness (entropy) loss
    teacher: bool = False  # keep an EMA teacher (mean teacher, AdaPL, IPH)
    adapl: bool = False
    iph: bool = False


ALGORITHMS = {a.name: a for a in (
    Algorithm("supervised", unlabeled=False, views=(), mask="none"),
    Algorithm("pseudo_label", views=("weak",), consistency="self", unsup_warmup=0.4),
    Algorithm("mean_teacher", consistency="mse", mask="none", lambda_u=50.0, unsup_warmup=0.4,
              teacher=True),
    Algorithm("fixmatch"),
    Algorithm("fixmatch_da", da="queue"),
    Algorithm("flexmatch", mask="flex"),
    Algorithm("freematch", mask="free", lambda_fair=0.001),
    Algorithm("softmatch", mask="soft", da="uniform"),
    Algorithm("tear", da="queue", teacher=True, adapl=True, iph=True),
    Algorithm("tear_adapl", da="queue", teacher=True, adapl=True),
    Algorithm("tear_iph", da="queue", teacher=True, iph=True),
)}
NAMES = tuple(ALGORITHMS)


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown semi-supervised algorithm {name!r}; known: {list(NAMES)}")
    return ALGORITHMS[name]
