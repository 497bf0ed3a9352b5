"""TEAR (MICCAI 2022) and the semi-supervised family it is compared with, on one jitted step.

The pieces are USB's hooks (pseudo-labelling, masking, distribution alignment, weighting) as
small pure jnp functions over `flax.struct.dataclass` states: `pseudo_labels` (hard / soft /
sharpened labels, the 32-batch DA queue, SoftMatch's uniform alignment), `thresholds`
(FixMatch, FlexMatch, FreeMatch masks, SoftMatch weights), `teacher` (EMA teacher), `adapl`
(adaptive soft pseudo labels), `prototypes` (k-means + IPH loss). `algorithms` composes them
per algorithm, `step` is the one jitted step, `data` the labeled / unlabeled split, `run` one
(algorithm, seed) run on the kit, `report` the comparison. Spec: ../shared/specs/tear.md.

TEAR = FixMatch + DA + AdaPL + IPH. AdaPL decision (adapl.py): eps = sigmoid(gamma d) - 0.5
(`config.ssl.adapl_form='rising'`, default), because the spec's literal eps = 1 - sigmoid(gamma
d) ('spec') contradicts its own "larger estimated loss, softer label".

`config.ssl.methods` x `config.ssl.seeds` runs every algorithm on the same labeled split
(`ssl.split_seed`) through the kit's comparison engine (`jaxmed.train.comparison`: sub-runs in
workdir/runs/<method>/seed_<s>/, resume, report from the lead process), then writes
workdir/report/ (comparison.csv, summary.md, figures).
"""

from __future__ import annotations

import logging

import ml_collections

from jaxmed.data import synthetic
from jaxmed.methods import supervised
from jaxmed.methods.tear import algorithms, report, run
from jaxmed.methods.tear import data as ssl_data
from jaxmed.methods.tear.adapl import DISTANCES
from jaxmed.methods.tear.run import build_ssl_run
from jaxmed.methods.tear.step import Hyper, SSLState, make_ssl_step
from jaxmed.train import comparison
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)

# (not data.num_workers: the saved data-iterator position depends on the worker count)
HARMLESS_KEYS = ("train.progress", "train.log_every", *comparison.harmless_keys("ssl"))
METRICS = ("test/auc", "test/accuracy", "test/balanced_accuracy", "test/f1",
           "test/sensitivity", "test/specificity")
# beside them with config.ssl.eval_ema (METRICS are then the EMA model's): the raw student's
STUDENT_METRICS = ("test/student/auc", "test/student/accuracy",
                   "test/student/balanced_accuracy")

__all__ = ["HARMLESS_KEYS", "METRICS", "Hyper", "SSLState", "algorithms", "build_ssl_run",
           "check_config", "default_config", "make_ssl_step", "train_and_evaluate"]


def default_config() -> ml_collections.ConfigDict:
    """Every key the TEAR / semi-supervised trainer reads (the supervised keys + `ssl`)."""
    c = supervised.base_config()
    c.method = "tear"
    c.train.schedule = "fixmatch_cosine"  # lr cos(7 pi k / 16 K) (FixMatch / TEAR reference)
    c.ssl = ml_collections.ConfigDict(dict(
        methods=("supervised", "fixmatch", "tear"), seeds=(0, 1, 2),
        parallel_seeds=True,  # an algorithm's seeds as one program (jaxmed.train.seeds)
        num_labeled=0,  # > 0: stratified labeled subset of the train split; else the lists
        labeled_list="", unlabeled_list="",  # TEAR's TrainN.txt / Train_unlN.txt
        split_seed=0,  # the labeled subset (shared by every method and seed)
        mu=7,  # unlabeled images per labeled one
        weak_augment="rotate(10)|translate(4)|flip",  # spec: rotation 10 deg, translation
        strong_augment="translate(4)|flip|randaugment(2,10)|cutout(16)",
        strong_on_device=False,  # True: the strong view's augmentation runs in the step
        cutout=16,  # device strong view's cutout size
        ema_p=0.999,  # FreeMatch / SoftMatch EMAs (USB)
        teacher_momentum=0.999,  # EMA teacher (spec) = the evaluated EMA's momentum (USB ema_m)
        eval_ema=True,  # evaluate the EMA model of the student (USB); the raw student beside it
        # as test/student/...
        include_labeled_in_unlabeled=True,  # the unlabeled stream also draws the labeled
        # images (USB's include_lb_to_ulb)
        da_length=32,
        adapl_weight=0.1, adapl_distance="kl", adapl_gamma=2.0, adapl_form="rising",
        adapl_entropy=False, adapl_memory=True, adapl_memory_momentum=0.9,
        iph_weight=0.1, iph_iters=3,
    ))
    return c


def check_config(config) -> None:
    """Errors naming the key, before anything runs."""
    s = config.ssl
    comparison.check_methods_and_seeds(s.methods, s.seeds, algorithms.NAMES, "ssl")
    lists = bool(s.labeled_list) + bool(s.unlabeled_list)
    if lists == 1:
        raise ValueError("config.ssl.labeled_list and config.ssl.unlabeled_list go together")
    if (s.num_labeled > 0) == (lists == 2):
        raise ValueError("set either config.ssl.num_labeled > 0 or config.ssl.labeled_list / "
                         "unlabeled_list (exactly one)")
    if s.mu < 1:
        raise ValueError(f"config.ssl.mu={s.mu} must be >= 1")
    if s.adapl_distance not in DISTANCES:
        raise ValueError(f"config.ssl.adapl_distance={s.adapl_distance!r}: one of {DISTANCES}")
    if s.adapl_form not in ("rising", "spec"):
        raise ValueError(f"config.ssl.adapl_form={s.adapl_form!r}: 'rising' or 'spec'")
    for key in ("ema_p", "teacher_momentum", "adapl_memory_momentum"):
        if not 0.0 <= s[key] < 1.0:
            raise ValueError(f"config.ssl.{key}={s[key]} must be in [0, 1)")
    if config.data.name == "synthetic" and config.data.synthetic.multi_label:
        raise ValueError("config.data.synthetic.multi_label: semi-supervised methods need "
                         "single-label data")
    if config.pruning.criterion != "none":
        raise ValueError("config.pruning.criterion: the semi-supervised trainer trains dense")
    check_synthetic_split(config)


def check_synthetic_split(config) -> None:
    """`ssl.num_labeled` against a synthetic train split, which the config fixes (other data:
    once read, in `data.from_num_labeled`)."""
    d, n = config.data, config.ssl.num_labeled
    if n <= 0 or d.name != "synthetic":
        return
    syn = d.synthetic
    if syn.num_train <= 0 or not syn.imbalance > 0:  # the data's own checks name these
        return
    counts = synthetic.class_counts(syn.num_train, syn.num_classes, syn.imbalance)
    names = [f"class_{k}" for k in range(syn.num_classes)]
    where = "the synthetic train split (config.data.synthetic.num_train)"
    ssl_data.check_every_class(counts, names, key=f"config.ssl.num_labeled={n}", where=where)
    unlabeled = any(algorithms.get(m).unlabeled for m in config.ssl.methods)
    ssl_data.check_num_labeled(n, counts, where, **ssl_data.batches(config, unlabeled))


def train_and_evaluate(config, workdir: str) -> dict:
    """Every method x seed of config.ssl, then workdir/report/ (lead process); returns the mean
    test metrics per method ({'<method>/test/auc': ...})."""
    check_config(config)
    write_config(config, workdir, harmless=HARMLESS_KEYS)

    metrics = METRICS + (STUDENT_METRICS if config.ssl.eval_ema else ())

    def write(results):
        summary = report.write_report(workdir, config, results, metrics)
        return {f"{m}/{k}": v for m, row in summary.items() for k, v in row.items()
                if k in metrics}

    return comparison.compare(workdir, config, "ssl", run.run_one, write,
                              harmless=HARMLESS_KEYS, run_group=run.run_group)
