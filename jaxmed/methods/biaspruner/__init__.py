"""BiasPruner (MICCAI 2024) and its continual-learning comparison, on the trainer kit.

  tasks.py        the task sequence: class groups of one dataset or one split file per task
  frame.py        the continual frame: heads, the run's `TaskSequence`, phases through
                  `train.run.fit`, task selection and sharded task-agnostic evaluation
  run.py          the driver: the comparison (`train.comparison`), one method through the
                  tasks with per-task orbax checkpoints, its result
  subnetworks.py  BiasPruner, its magnitude ablation and PackNet: per-task subnetworks as one
                  stacked pytree and module-level jitted steps over it
  scores.py       the bias score of a unit and its variants (`continual.bias_score`)
  units.py        which units carry the shortcut and where each ranking puts them
  baselines.py    fine-tune, joint, EWC, LwF on one shared network
  lff.py          LfF (Learning from Failure): GCE-biased + relative-difficulty-weighted model
  report.py       comparison tables, accuracy-matrix heatmaps, verdicts

Spec: ../shared/specs/biaspruner.md.
"""

from __future__ import annotations

import ml_collections

from jaxmed.data import synthetic_bias
from jaxmed.methods import supervised
from jaxmed.methods.biaspruner import baselines, frame, lff, run, scores, subnetworks
from jaxmed.train import comparison

ALL_METHODS = ("biaspruner", "biaspruner_magnitude", "packnet", "finetune", "joint", "ewc",
               "lwf", "lff")

METHODS = {
    "biaspruner": subnetworks.method("bias"),
    "biaspruner_magnitude": subnetworks.method("magnitude"),
    "packnet": subnetworks.method("packnet"),
    **{k: baselines.method(k) for k in baselines.KINDS},
    "lff": lff.method(),
}

# Which methods and seeds run, and how the subnetworks are batched at inference (the same
# predictions either way), never change a sub-run's results.
HARMLESS_KEYS = ("continual.task_axis", *comparison.harmless_keys(run.SECTION))


def default_config() -> ml_collections.ConfigDict:
    c = supervised.base_config()
    c.method = "biaspruner"
    c.continual = ml_collections.ConfigDict(dict(
        tasks=((0, 1), (2, 3)),  # class groups of one dataset, one tuple per task
        task_split_files=(),  # or one reference split file per task
        methods=("biaspruner",),  # any of biaspruner, biaspruner_magnitude, packnet,
        # finetune, joint, ewc, lwf, lff: all run on the same tasks, compared in the report
        seeds=(0,),  # every method runs once per seed (config.seed = each); report: mean +- SE
        parallel_seeds=True,  # baselines' seeds together (run.run_seeds); not BiasPruner / PackNet
        sensitive_attr="bias",  # attribute for fairness (synthetic: 'bias'; fitz: skin_group;
        # '' = none: fairness metrics are NaN)
        positive_class=1,  # within-task label counted as positive for TPR / FPR
        biased_epochs=4,  # BiasPruner / PackNet first phase (GCE / CE on free units)
        finetune_epochs=4,  # second phase (subnetwork fine-tuning)
        gamma=0.3,  # fraction of units (BiasPruner) / free weights (PackNet) pruned per task
        # BiasPruner's unit score (subnetworks' ablation and PackNet ignore it): 'paper' (mean
        # pooled activation over the GCE model's aligned minus its conflicting samples),
        # 'layer_normalised' (that, z-scored within each layer before the global cut),
        # 'class_conditional' (mean over classes of |that difference within the class|) or
        # 'absolute' (|that difference|): what each computes and why, biaspruner/scores.py
        bias_score="paper",
        gce_q=0.7,
        alpha=0.0,  # > 0: fine-tune weights each sample by exp(alpha * its GCE loss)
        # True: then rescale the weights of the samples the GCE model gets wrong (S_bc) so that
        # they carry the same total weight as the rest (S_ba), as JTT's upweighting: with few
        # conflicting samples exp(alpha * GCE) alone makes them dominate and the subnetwork
        # learns the colour the other way round (subnetworks.finetune_weights)
        balance_groups=False,
        ewc_lambda=100.0,
        ewc_samples=256,
        lwf_lambda=1.0,
        lwf_temperature=2.0,
        lff_ema=0.7,  # LfF: EMA of the per-sample losses (the LfF code's ema_alpha)
        # Subnetworks at inference, all in one program: 'map' (lax.map, one after another) or
        # 'vmap' (batched over the stacked masks, which turns the convolutions into grouped
        # ones: slower in every measurement, benchmarks/RESULTS.md).
        task_axis="map",
        # How task-agnostic inference picks the task: 'entropy' (the paper: the lowest
        # normalised predictive entropy) or 'bn', for the methods that store BatchNorm per task
        # (biaspruner, biaspruner_magnitude, packnet): the lowest negative log-likelihood of the
        # image's stem activations under each task's stored stem statistics (`subnetworks`
        # docstring; the single-network baselines keep 'entropy'). Entropy picks the wrong
        # task most of the time on the synthetic sequence: benchmarks/RESULTS.md.
        task_selection="entropy",
    ))
    c.train.optimizer = "adam"
    c.train.lr = 1e-4
    c.train.weight_decay = 5e-4
    c.data.synthetic_bias = synthetic_bias.default_config()  # read when data.name selects it
    c.model.name = "resnet56"
    return c


def real_data_config(dataset: str, augment: str, epochs: int):
    """The paper's setting on a real dataset: ImageNet-stem ResNet-18 at 224 px, Adam 1e-4
    (default_config), batch 32, every method compared, `epochs` per phase."""
    c = default_config()
    c.data.name = dataset
    c.data.image_size = 224
    c.data.channels = 3
    c.data.train_augment = augment
    c.data.num_workers = 8
    c.model.name = "resnet18"
    c.model.stem = "imagenet"
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.continual.methods = ALL_METHODS
    c.continual.biased_epochs = c.continual.finetune_epochs = epochs
    return c


def check_config(config) -> None:
    """Fail before anything runs, naming the key: methods / seeds / tasks / split files are
    tuples (a comma string would be read character by character), and the learning rate is
    constant (each phase builds its optimizer without a total length, so a decaying schedule
    would reach 0 after its warm-up)."""
    cc = config.continual
    comparison.check_methods_and_seeds(cc.methods, cc.seeds, ALL_METHODS, "continual")
    for key in ("tasks", "task_split_files"):
        if isinstance(cc[key], str) or not isinstance(cc[key], (tuple, list)):
            raise ValueError(f"config.continual.{key}={cc[key]!r} must be a tuple")
    if not cc.task_split_files and not all(isinstance(t, (tuple, list)) for t in cc.tasks):
        raise ValueError(f"config.continual.tasks={cc.tasks!r} must be a tuple of class tuples, "
                         "e.g. ((0, 1), (2, 3))")
    scores.check_kind(cc.bias_score)
    if cc.task_selection not in frame.TASK_SELECTIONS:
        raise ValueError(f"config.continual.task_selection={cc.task_selection!r}: use one of "
                         f"{frame.TASK_SELECTIONS}")
    if config.train.schedule != "constant":
        raise ValueError(f"config.train.schedule={config.train.schedule!r}: continual phases "
                         "use a constant learning rate (set 'constant')")


def train_and_evaluate(config, workdir: str) -> dict:
    check_config(config)
    return run.run(config, workdir, METHODS, harmless=HARMLESS_KEYS)


__all__ = ["ALL_METHODS", "HARMLESS_KEYS", "METHODS", "check_config", "default_config",
           "real_data_config", "train_and_evaluate"]
