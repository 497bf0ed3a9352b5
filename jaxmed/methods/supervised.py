"""Supervised single-label and multi-label training and evaluation: a thin method on the kit
(`jaxmed.train`). Label type, channels, image size and class count follow the data."""

from __future__ import annotations

import logging

import ml_collections

from jaxmed import data as data_lib
from jaxmed.pruning import training as pruning_training
from jaxmed.train.run import build_run, fit
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)
HARMLESS_KEYS: tuple[str, ...] = ()


def default_config() -> ml_collections.ConfigDict:
    """Every key the supervised trainer reads (method configs start from this)."""
    c = ml_collections.ConfigDict()
    c.method = "supervised"
    c.seed = 0
    c.data = data_lib.default_config()
    c.model = ml_collections.ConfigDict(dict(
        name="resnet18",
        stem="imagenet",  # ImageNet ResNets: 'imagenet' or 'small' (3x3/1 stem, 28-64 px)
        width=0,  # ResNets: first-stage width; 0 = the architecture's default
        dtype="float32",  # compute dtype ('bfloat16' on GPU / TPU); params stay float32
        pretrained="",  # a PyTorch .pth/.pt (torchvision layout) or a jaxmed workdir
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, eval_batch_size=128, epochs=10, steps=0,
        optimizer="adam",  # 'adam' (L2 as torch.optim.Adam), 'adamw', 'sgd'
        lr=1e-3, schedule="constant",  # 'constant', 'cosine'
        warmup_steps=0, weight_decay=0.0, momentum=0.9, nesterov=False,
        grad_clip_norm=0.0,
        loss="ce",  # ce, bce (multi-label), balanced_softmax, focal, ldam, gce
        label_smoothing=0.0,
        freeze_bn_after_epoch=0,  # > 0: BN in eval mode (running stats) from this epoch on
        log_every=50, eval_every=0, checkpoint_every=0, keep_checkpoints=3,
        early_stop_metric="", early_stop_mode="min", patience=0, progress=True,
    ))
    c.pruning = pruning_training.default_config()  # criterion 'none': dense training
    return c


def check_config(config) -> None:
    """The supervised keys are checked by their readers (the data / model / optimizer
    builders name the key at fault); nothing more before the run."""
    del config


def train_and_evaluate(config, workdir: str, hooks=()) -> dict:
    """Train, select on validation (if configured), evaluate on test; returns test metrics."""
    write_config(config, workdir)
    _, final = fit(build_run(config), workdir, hooks=hooks)
    log.info("test metrics: %s", final)
    return {f"test/{k}": v for k, v in final.items()}


__all__ = ["HARMLESS_KEYS", "build_run", "check_config", "default_config",
           "train_and_evaluate"]
