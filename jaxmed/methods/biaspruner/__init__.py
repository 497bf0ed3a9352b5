"""BiasPruner (MICCAI 2024) and its continual-learning comparison, on the trainer kit.

  continual.py    the frame: tasks, heads, phases on the shared loop, sharded task-agnostic
                  evaluation, per-task orbax checkpoints, the driver
  subnetworks.py  BiasPruner, its magnitude ablation and PackNet: per-task subnetworks as one
                  stacked pytree and module-level jitted steps over it
  baselines.py    fine-tune, joint, EWC, LwF on one shared network
  lff.py          LfF (Learning from Failure): GCE-biased + relative-difficulty-weighted model
  report.py       comparison tables, accuracy-matrix heatmaps, verdicts

Spec: ../shared/specs/biaspruner.md.
"""

from __future__ import annotations

from jaxmed.methods.biaspruner import baselines, continual, lff, subnetworks

ALL_METHODS = ("biaspruner", "biaspruner_magnitude", "packnet", "finetune", "joint", "ewc",
               "lwf", "lff")

METHODS = {
    "biaspruner": subnetworks.method("bias"),
    "biaspruner_magnitude": subnetworks.method("magnitude"),
    "packnet": subnetworks.method("packnet"),
    **{k: baselines.method(k) for k in baselines.KINDS},
    "lff": lff.method(),
}


def default_config():
    c = continual.default_config()
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
    from jaxmed.train import comparison

    cc = config.continual
    comparison.check_methods_and_seeds(cc.methods, cc.seeds, ALL_METHODS, "continual")
    for key in ("tasks", "task_split_files"):
        if isinstance(cc[key], str) or not isinstance(cc[key], (tuple, list)):
            raise ValueError(f"config.continual.{key}={cc[key]!r} must be a tuple")
    if not cc.task_split_files and not all(isinstance(t, (tuple, list)) for t in cc.tasks):
        raise ValueError(f"config.continual.tasks={cc.tasks!r} must be a tuple of class tuples, "
                         "e.g. ((0, 1), (2, 3))")
    if cc.task_selection not in continual.TASK_SELECTIONS:
        raise ValueError(f"config.continual.task_selection={cc.task_selection!r}: use one of "
                         f"{continual.TASK_SELECTIONS}")
    if config.train.schedule != "constant":
        raise ValueError(f"config.train.schedule={config.train.schedule!r}: continual phases "
                         "use a constant learning rate (set 'constant')")


def train_and_evaluate(config, workdir: str) -> dict:
    check_config(config)
    return continual.run(config, workdir, METHODS)


__all__ = ["ALL_METHODS", "METHODS", "check_config", "default_config", "real_data_config",
           "train_and_evaluate"]
