"""Attend Who is Weak (Jaiswal et al., WACV 2023): pruning-identified hard-to-learn samples.

Every `htl.every_epochs` epochs the current model is pruned by global magnitude at
`htl.sparsities` without fine-tuning (masks only); samples on which the pruned copies disagree
with the dense model are the hard-to-learn (HTL) ones (`identify.py`, over the whole training
set from the train loop's hook in `attention.py`), and training attends to them until the next
identification: their loss weighs `htl.weight` times (`htl_weight`, through the state's
`sample_weight` table) or they are drawn `htl.weight` times as often (`htl_oversample`, through
the pipeline's sampling weights). Spec: shared/specs/htl.md.

`config.htl.task`:
  segmentation       U-Net (`unet_resnet*`) on image + mask data, Dice + BCE; IoU, Dice, ISIC
                     thresholded Jaccard; disagreement = IoU(dense, pruned) < iou_threshold
  classification     a classifier on image labels; AUC, balanced accuracy; disagreement = dense
                     top-1 vs the pruned majority
  weak_localization  classification training, then class activation maps thresholded into
                     masks and scored against the ground-truth masks (cam_iou, cam_dice, ...)
  semi_supervised    TEAR's semi-supervised step (`htl.ssl_algorithm`, e.g. 'fixmatch', with
                     the `config.ssl` block of jaxmed.methods.tear) on a labeled / unlabeled
                     split; the HTL set is among the UNLABELED samples (dense pseudo label vs
                     the pruned majority) and its weight goes to `state.sample_weight`
                     (`run.py`); AUC, balanced accuracy. 'htl_oversample' is refused there.

Runs are built on the kit in `run.py`, with the steps and evaluator of `step.py`.
`config.htl.methods` x `config.htl.seeds` run on the same data (`jaxmed.train.comparison`,
section 'htl': a new method or seed runs only its own sub-runs); workdir/report/ holds
comparison.csv (test metrics overall and per sub-population the data marks, means and _std over
seeds), summary.md and the figures (report.py).

Decisions beyond the spec: the first identification is after `every_epochs` epochs (an untrained
model's disagreement says nothing); the baseline runs no identification; each run's seed (init
and data order) is its entry of `htl.seeds` (the top-level config.seed is not used).
"""

from __future__ import annotations

import numbers

import ml_collections

from jaxmed.methods import supervised, tear
from jaxmed.methods.htl import report, run
from jaxmed.methods.htl.run import MASK_TASKS
from jaxmed.methods.tear import algorithms
from jaxmed.stacking import check_axis
from jaxmed.train import comparison
from jaxmed.train import run as train_run
from jaxmed.train import workdir as workdir_lib

TASKS = ("classification", "segmentation", "semi_supervised", "weak_localization")
METHODS = ("baseline", "htl_weight", "htl_oversample")  # run.ATTENTION: what each attends
HARMLESS_KEYS = ("htl.identify_batch_size", "htl.level_axis", "htl.grid",
                 *comparison.harmless_keys("htl"))
TASK_METRICS = {
    "segmentation": ("iou", "dice", "thresholded_jaccard"),
    "classification": ("auc", "balanced_accuracy"),
    "semi_supervised": ("auc", "balanced_accuracy"),
    "weak_localization": ("auc", "balanced_accuracy", "cam_iou", "cam_dice",
                          "cam_thresholded_jaccard"),
}

__all__ = ["HARMLESS_KEYS", "METHODS", "TASKS", "TASK_METRICS", "check_config",
           "default_config", "train_and_evaluate"]


def default_config() -> ml_collections.ConfigDict:
    c = supervised.base_config()
    c.method = "htl"
    c.htl = ml_collections.ConfigDict(dict(
        task="segmentation",
        methods=METHODS,
        seeds=(0, 1, 2),
        parallel_seeds=True,  # no seed axis yet: identification acts on each seed's state
        # between steps (a state hook); the seeds run one after another, with a log line
        every_epochs=2,  # identification cadence K (first after K epochs)
        sparsities=(0.3, 0.5, 0.7, 0.9),  # global-magnitude levels, no fine-tuning
        iou_threshold=0.5,  # segmentation: a level disagrees when IoU(dense, pruned) < this
        rule="majority",  # segmentation: 'majority' or 'any' of the levels
        top_q=0.0,  # 0: the HTL set is the disagreeing samples; in (0, 1]: the top q by score
        weight=3.0,  # lambda: loss weight / oversampling factor of HTL samples
        level_axis="map",  # 'map' (one masked copy at a time) or 'vmap'
        identify_batch_size=0,  # global; 0 = train.eval_batch_size
        dice_weight=1.0, bce_weight=1.0,  # segmentation loss
        cam_threshold=0.5,  # weak localization: CAM (max-normalized) >= this is lesion
        grid=8,  # HTL examples in report/htl_examples.png
        ssl_algorithm="fixmatch",  # semi_supervised: the TEAR-family step (tear.algorithms)
    ))
    # semi_supervised: TEAR's block (split, mu, views, EMAs, ...); htl.methods / htl.seeds
    # drive the comparison, so TEAR's own methods / seeds keys are left out
    c.ssl = ml_collections.ConfigDict({k: v for k, v in tear.default_config().ssl.items()
                                       if k not in ("methods", "seeds", "parallel_seeds")})
    # HTL identifies among the unlabeled images: the unlabeled stream holds them alone (USB's
    # include_lb_to_ulb is TEAR's default, not HTL's)
    c.ssl.include_labeled_in_unlabeled = False
    c.model.name = "unet_resnet18"
    return c


def check_config(config) -> None:
    """Fail before anything runs, naming the key."""
    h = config.htl
    if h.task not in TASKS:
        raise ValueError(f"config.htl.task={h.task!r}: use one of {list(TASKS)}")
    comparison.check_methods_and_seeds(h.methods, h.seeds, METHODS, "htl")
    if h.task == "semi_supervised":
        check_semi_supervised(config)
    sp = h.sparsities
    if (isinstance(sp, str) or not isinstance(sp, (tuple, list)) or not sp
            or not all(isinstance(s, numbers.Real) and 0 < s < 1 for s in sp)):
        raise ValueError(f"config.htl.sparsities={sp!r} must be a tuple of fractions in (0, 1)")
    if h.every_epochs < 1:
        raise ValueError(f"config.htl.every_epochs={h.every_epochs} must be >= 1")
    check_cadence(config)
    if not 0 <= h.top_q <= 1:
        raise ValueError(f"config.htl.top_q={h.top_q} must be 0 (disagreeing samples) or in "
                         "(0, 1]")
    if h.weight <= 0:
        raise ValueError(f"config.htl.weight={h.weight} must be > 0")
    if h.rule not in ("majority", "any"):
        raise ValueError(f"config.htl.rule={h.rule!r}: use 'majority' or 'any'")
    check_axis(h.level_axis, "config.htl.level_axis")
    unet = config.model.name.startswith("unet_")
    if h.task == "segmentation" and not unet:
        raise ValueError(f"config.model.name={config.model.name!r}: htl.task='segmentation' "
                         "needs a U-Net (unet_resnet18 / unet_resnet34 / unet_resnet50)")
    if h.task != "segmentation" and unet:
        raise ValueError(f"config.model.name={config.model.name!r}: htl.task={h.task!r} "
                         "trains a classifier (e.g. resnet18)")
    if h.task == "weak_localization" and not config.model.name.startswith("resnet"):
        raise ValueError(f"config.model.name={config.model.name!r}: class activation maps "
                         "need a ResNet classifier")
    if (h.task in MASK_TASKS and config.data.name == "synthetic"
            and not config.data.synthetic.with_mask):
        raise ValueError(f"htl.task={h.task!r} needs masks: set "
                         "config.data.synthetic.with_mask=True")


def check_cadence(config) -> None:
    """The first identification (after `htl.every_epochs` epochs) must come before the run's
    last step, else every HTL method trains as the baseline. With `train.steps` the length of an
    epoch decides: known for synthetic data, else at least one step (refused where no data
    could identify in time)."""
    h, t = config.htl, config.train
    attending = [m for m in h.methods if run.ATTENTION[m] is not None]
    if not attending:
        return
    k = h.every_epochs
    outcome = (f"no identification would happen and {', '.join(attending)} would train as the "
               "baseline")
    if t.steps <= 0:
        if k >= max(t.epochs, 1):
            raise ValueError(f"config.htl.every_epochs={k} is not below config.train.epochs="
                             f"{t.epochs}: the first identification, after {k} epochs, would "
                             f"come at the run's end or later, so {outcome}; lower "
                             "htl.every_epochs or raise train.epochs")
        return
    spe = _synthetic_steps_per_epoch(config)
    every = train_run.Durations(spe or 1, t.steps).epochs(k)
    if every >= t.steps:
        length = (f"{every} steps at {spe} steps per epoch" if spe
                  else f"at least {every} steps: an epoch is one step at least")
        raise ValueError(f"config.htl.every_epochs={k} ({length}) is not before the run's end "
                         f"at config.train.steps={t.steps}: {outcome}; lower htl.every_epochs "
                         "or raise train.steps")


def _synthetic_steps_per_epoch(config) -> int | None:
    """Steps per epoch of a synthetic run, which the config fixes (None: only the data knows).
    Semi-supervised: a pass over TEAR's unlabeled stream (with the labeled images when
    `ssl.include_labeled_in_unlabeled`, as `tear.run.unlabeled_stream_source`), mu B images per
    step (TEAR's epoch)."""
    d, b = config.data, config.train.batch_size
    if d.name != "synthetic" or b <= 0:
        return None
    n = d.synthetic.num_train
    if config.htl.task == "semi_supervised":
        s = config.ssl
        if s.num_labeled <= 0 or s.mu < 1:
            return None
        drawn = n if s.get("include_labeled_in_unlabeled", False) else n - s.num_labeled
        return max(drawn // (s.mu * b), 1)
    return n // b or None


def check_semi_supervised(config) -> None:
    """semi_supervised's keys, naming the one at fault (TEAR checks its `ssl` block)."""
    h = config.htl
    if "ssl" not in config:
        raise ValueError("htl.task='semi_supervised' needs the config.ssl block (TEAR's keys; "
                         "jaxmed.methods.htl.default_config() has it)")
    try:
        alg = algorithms.get(h.ssl_algorithm)
    except ValueError as e:
        raise ValueError(f"config.htl.ssl_algorithm={h.ssl_algorithm!r}: {e}") from None
    if not alg.unlabeled:
        raise ValueError(f"config.htl.ssl_algorithm={h.ssl_algorithm!r} trains on labeled "
                         "images alone: HTL among unlabeled samples needs an algorithm that "
                         "uses them (e.g. 'fixmatch', 'tear')")
    if "htl_oversample" in h.methods:
        raise ValueError("config.htl.methods: 'htl_oversample' is not supported with "
                         "htl.task='semi_supervised' (TEAR's unlabeled stream has no sampling "
                         "weights); use 'baseline' and 'htl_weight'")
    c = ml_collections.ConfigDict(config.to_dict())  # as TEAR reads it: its own comparison keys
    c.ssl.methods, c.ssl.seeds = (h.ssl_algorithm,), tuple(h.seeds)
    tear.check_config(c)


def train_and_evaluate(config, workdir: str) -> dict:
    """Every method x seed (finished runs read back), then the report (lead process); returns
    its headline."""
    check_config(config)
    workdir_lib.write_config(config, workdir, harmless=HARMLESS_KEYS)
    return comparison.compare(
        workdir, config, "htl", run.run_one,
        lambda results: report.write_report(config, workdir, results,
                                            TASK_METRICS[config.htl.task]),
        harmless=HARMLESS_KEYS,
        why_sequential="HTL's identification prunes each seed's own network between steps (a "
                       "state hook, per seed)")
