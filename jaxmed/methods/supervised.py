"""Supervised single-label and multi-label training and evaluation: a thin method on the kit
(`jaxmed.train`). Label type, channels, image size and class count follow the data."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxmed import data as data_lib
from jaxmed.data.pipeline import Preprocess, train_stream
from jaxmed.pruning import training as pruning_training
from jaxmed.train import build, sharding, steps
from jaxmed.train.evaluate import Evaluator
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.workdir import write_config
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class Run:
    """What a supervised run is made of (also what PruneCXR and HTL train with)."""

    mesh: Any
    ds: data_lib.Dataset
    model: Any
    tx: Any
    state: Any  # the initial TrainState, replicated
    train_step: Callable  # jitted (state, batch) -> (state, metrics)
    eval_step: Callable  # jitted (state, batch) -> per-sample outputs
    evaluator: Evaluator
    make_stream: Callable  # () -> a fresh TrainStream
    pruned: bool


def build_run(config) -> Run:
    """Data, model, optimizer, initial state, jitted steps and evaluator of `config`."""
    mesh = sharding.make_mesh()
    tcfg = config.train
    sharding.check_global_batch(tcfg.batch_size, mesh)
    ds = data_lib.build(config.data)
    info = ds.info
    size, channels = data_lib.image_size(config.data, info), data_lib.image_channels(
        config.data, info)
    model = build.build_model(config.model, info.num_classes)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    steps_per_epoch = len(ds["train"]) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"config.train.batch_size={tcfg.batch_size} is larger than the "
                         f"{len(ds['train'])} training images of {info.name}")
    tx = build.make_optimizer(tcfg, build.total_steps(tcfg, steps_per_epoch))
    variables = build.init_variables(model, config.model, init_rng, (size, size, channels))
    pruned = config.pruning.criterion != "none"
    masks = pruning_training.initial_masks(variables["params"]) if pruned else None
    state = build.create_state(variables, tx, state_rng, mesh, masks=masks)

    dtype = jnp.dtype(config.model.dtype)
    loss_name = "bce" if info.multi_label and tcfg.loss == "ce" else tcfg.loss
    train_step = steps.jit_train_step(steps.make_train_step(
        model, tx, multi_label=info.multi_label, loss_name=loss_name,
        class_counts=info.class_counts, label_smoothing=tcfg.label_smoothing,
        compute_dtype=dtype, bn_frozen_from=tcfg.freeze_bn_after_epoch * steps_per_epoch), mesh)
    eval_step = steps.jit_eval_step(
        steps.make_eval_step(model, multi_label=info.multi_label, compute_dtype=dtype), mesh)
    evaluator = Evaluator(eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=Preprocess(size, channels, "", config.seed,
                                                config.data.on_error),
                          mesh=mesh, multi_label=info.multi_label,
                          num_workers=config.data.num_workers)
    train_pre = Preprocess(size, channels, config.data.train_augment, config.seed,
                           config.data.on_error)
    epochs = max(tcfg.epochs, 1) if tcfg.steps <= 0 else -(-tcfg.steps // steps_per_epoch)

    def make_stream():
        return train_stream(ds["train"], global_batch=tcfg.batch_size, preprocess=train_pre,
                            seed=config.seed, num_epochs=epochs,
                            num_workers=config.data.num_workers)

    return Run(mesh, ds, model, tx, state, train_step, eval_step, evaluator, make_stream, pruned)


def train_and_evaluate(config, workdir: str, hooks=()) -> dict:
    """Train, select on validation (if configured), evaluate on test; returns test metrics."""
    write_config(config, workdir)
    run = build_run(config)
    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    state_hooks = ([pruning_training.ScheduledPruning(config.pruning, writer)] if run.pruned
                   else [])
    try:
        state, final = train_loop(
            workdir=workdir, settings=LoopSettings.from_config(config.train), state=run.state,
            train_step=run.train_step, make_stream=run.make_stream, evaluate=run.evaluator,
            mesh=run.mesh, writer=writer, meta={"config": json.loads(config.to_json())},
            hooks=hooks, state_hooks=state_hooks, global_batch=config.train.batch_size)
    finally:
        writer.close()
    log.info("test metrics: %s", final)
    return {f"test/{k}": v for k, v in final.items()}
