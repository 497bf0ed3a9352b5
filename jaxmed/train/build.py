"""Model, variables, optimizer and TrainState from a config: what every method builds first.

Each function takes the config block it needs (`config.model`, `config.train`) and returns
plain objects; nothing here reads the config inside traced code.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmed.models import create_model
from jaxmed.models.convert import load_torch_checkpoint
from jaxmed.pruning import masks as mask_lib
from jaxmed.train import sharding
from jaxmed.train.state import TrainState

CIFAR_RESNETS = ("resnet8", "resnet20", "resnet56")  # their stem is fixed ('cifar')


def build_model(model_cfg, num_classes: int):
    """The flax module named by `config.model` (stem / width / compute dtype applied)."""
    kw: dict[str, Any] = {}
    if model_cfg.name.startswith("resnet"):
        if model_cfg.name not in CIFAR_RESNETS:
            kw["stem"] = model_cfg.stem
        if model_cfg.width:
            kw["width"] = model_cfg.width
    return create_model(model_cfg.name, num_classes, dtype=model_cfg.dtype, **kw)


def init_variables(model, model_cfg, rng, image_shape: tuple[int, ...]) -> dict:
    """Random init, then (if configured) pretrained weights converted / restored over it:
    `model_cfg.pretrained` is a PyTorch file (torchvision layout) or a jaxmed workdir (its best
    checkpoint if it kept one, else its latest)."""
    variables = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, *image_shape), jnp.float32))
    variables = jax.device_get(dict(variables))
    path = model_cfg.pretrained
    if not path:
        return variables
    if os.path.isdir(path):
        return load_workdir_variables(path)
    return load_torch_checkpoint(path, model_cfg.name, target=variables)


def load_workdir_variables(workdir: str) -> dict:
    """{'params', 'batch_stats'} (numpy) of a jaxmed run: the checkpoint its model selection
    chose if it selected one, else its last."""
    from jaxmed.train.checkpoint import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} holds no checkpoints/ (not a jaxmed workdir?)")
    ck = Checkpointer(directory, keep=0)
    try:
        state, _ = ck.restore_raw(ck.best_step())
    finally:
        ck.close()
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def learning_rate(train_cfg, total_steps: int):
    """A float or an optax schedule: 'constant' (optional linear warmup), 'cosine', or
    'fixmatch_cosine' (lr cos(7 pi k / 16 K), the FixMatch / TEAR reference's decay)."""
    lr = train_cfg.lr
    if train_cfg.schedule == "fixmatch_cosine":
        return lambda k: lr * jnp.cos(7 * jnp.pi * k / (16 * max(total_steps, 1)))
    if train_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, train_cfg.warmup_steps, max(total_steps, train_cfg.warmup_steps + 1))
    if train_cfg.schedule == "constant":
        return (optax.linear_schedule(0.0, lr, train_cfg.warmup_steps)
                if train_cfg.warmup_steps else lr)
    raise ValueError(f"config.train.schedule={train_cfg.schedule!r}: use constant / cosine / "
                     "fixmatch_cosine")


def make_optimizer(train_cfg, total_steps: int, decay_mask=None
                   ) -> optax.GradientTransformation:
    """The optimizer of `config.train`, wrapped so that pruning masks and frozen weights hold
    (`jaxmed.pruning.masks.masked_optimizer`). Weight decay follows PyTorch: L2 added to the
    gradient for 'adam' and 'sgd', decoupled for 'adamw'; `decay_mask` (an optax mask, e.g.
    `kernels_only`) limits it to some leaves."""
    schedule = learning_rate(train_cfg, total_steps)
    parts = []
    if train_cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    opt, wd = train_cfg.optimizer, train_cfg.weight_decay
    if opt == "adam":
        parts += [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []
        parts += [optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)]
    elif opt == "adamw":
        parts += [optax.adamw(schedule, weight_decay=wd, mask=decay_mask)]
    elif opt == "sgd":
        parts += [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []
        parts += [optax.sgd(schedule, momentum=train_cfg.momentum or None,
                            nesterov=train_cfg.nesterov)]
    else:
        raise ValueError(f"config.train.optimizer={opt!r}: use adam / adamw / sgd")
    return mask_lib.masked_optimizer(optax.chain(*parts))


def kernels_only(params):
    """Weight-decay mask of the kernels (ndim > 1): not BatchNorm scales or biases."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def create_state(variables: dict, tx, rng, mesh, masks=None, index_bound: int = 0
                 ) -> TrainState:
    """The TrainState, replicated over the mesh (index_bound > 0: with a weight-1
    `sample_weight` table)."""
    state = TrainState.create(variables, tx, rng, masks=masks, index_bound=index_bound)
    return jax.device_put(state, sharding.replicated(mesh))
