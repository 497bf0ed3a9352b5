"""Shared by the BiasPruner configs: the paper's real-data setting and the reference splits.

Configs load this file by path (`load()` in each), so they work from any working directory."""

from jaxmed.methods import biaspruner

SPLITS = "../shared/splits/biaspruner"  # the reference's biased-train / unbiased-test splits


def real_data_config(dataset: str, augment: str, epochs: int):
    """ImageNet-stem ResNet-18 at 224 px, Adam 1e-4, batch 32, every method compared."""
    return biaspruner.real_data_config(dataset, augment, epochs)


def reference_splits(folder: str, *names: str) -> tuple[str, ...]:
    """The reference's split files, one per task (e.g. the biased split, then the flipped)."""
    return tuple(f"{SPLITS}/{folder}/{n}" for n in names)


def synthetic_config():
    """The synthetic biased sequence (jaxmed.data.synthetic_bias) with every method and seeds:
    the base of benchmark.py and quick.py (their docstrings give the measured reasons)."""
    c = biaspruner.default_config()
    c.data.name = "synthetic_bias"
    c.data.image_size = 24
    # label-preserving for tasks 0 and 1 (vflip would swap task 2's triangles: the data refuses)
    c.data.train_augment = "flip|vflip|translate(2)"
    s = c.data.synthetic_bias
    s.num_tasks = 2
    s.num_train, s.num_val, s.num_test = 3000, 50, 600
    s.bias_rate, s.test_bias_rate = 0.97, 0.5
    s.noise, s.shape_noise = 20.0, 0.1  # the outline is wrong on 10% of training images
    s.shared_colours = True  # one sensitive attribute (red / green) across tasks
    c.model.name, c.model.width = "resnet8", 16
    c.train.batch_size, c.train.eval_batch_size = 64, 200
    c.train.lr = 1e-3
    c.train.log_every = 100
    c.train.progress = False
    cc = c.continual
    cc.tasks = ((0, 1), (2, 3))
    cc.methods = biaspruner.ALL_METHODS
    cc.seeds = (0, 1, 2, 3, 4)
    cc.sensitive_attr = "bias"
    cc.biased_epochs, cc.finetune_epochs = 2, 15
    cc.gamma = 0.5
    cc.alpha = 4.0
    cc.balance_groups = True
    cc.task_selection = "bn"
    return c


def tiny(c):
    """The tests' variant of a synthetic config (`:tiny`): seconds, one seed."""
    s = c.data.synthetic_bias
    s.num_train, s.num_val, s.num_test = 96, 16, 48
    c.data.image_size = 16
    c.model.width = 4
    c.train.batch_size, c.train.eval_batch_size = 16, 48
    c.continual.biased_epochs = c.continual.finetune_epochs = 1
    c.continual.seeds = (0,)
    return c


def bias_score_variant(c, variant: str):
    """`<config>.py:<variant>`: only BiasPruner, its units ranked by `variant`
    (config.continual.bias_score); the magnitude ablation it is compared with is the base
    run's biaspruner_magnitude, which no bias score changes."""
    from jaxmed.methods.biaspruner import scores

    scores.check_kind(variant, "variant")
    c.continual.bias_score = variant
    c.continual.methods = ("biaspruner",)
    return c
