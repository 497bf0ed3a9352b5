"""Supervised single-label and multi-label training and evaluation.

The trainer every other method starts from: `build_model`, `create_state`, `make_train_step`,
`make_eval_step` and `Evaluator` are reused by PruneCXR (its dense models), BiasPruner and the
hard-sample method. Label type, channels, image size and class count follow the data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxmed import data as data_lib
from jaxmed import losses, metrics
from jaxmed.data import augment
from jaxmed.data.pipeline import Preprocess, eval_batches, train_stream
from jaxmed.models import create_model
from jaxmed.models.convert import load_torch_checkpoint
from jaxmed.pruning import masks as mask_lib
from jaxmed.pruning import training as pruning_training
from jaxmed.train import sharding
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.state import TrainState
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


# ------------------------------------------------------------------------------- model
CIFAR_RESNETS = ("resnet8", "resnet20", "resnet56")  # their stem is fixed ('cifar')


def build_model(model_cfg, num_classes: int):
    kw: dict[str, Any] = {}
    if model_cfg.name.startswith("resnet"):
        if model_cfg.name not in CIFAR_RESNETS:
            kw["stem"] = model_cfg.stem
        if model_cfg.width:
            kw["width"] = model_cfg.width
    return create_model(model_cfg.name, num_classes, dtype=model_cfg.dtype, **kw)


def init_variables(model, model_cfg, rng, image_shape: tuple[int, ...]) -> dict:
    """Random init, then (if configured) pretrained weights converted / restored over it."""
    variables = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, *image_shape), jnp.float32))
    variables = jax.device_get(dict(variables))
    path = model_cfg.pretrained
    if not path:
        return variables
    if os.path.isdir(path):
        from jaxmed.train.checkpoint import Checkpointer
        directory = os.path.join(path, "checkpoints_best")
        if not os.path.isdir(directory):
            directory = os.path.join(path, "checkpoints")
        ck = Checkpointer(directory, keep=0)
        state, _ = ck.restore_raw()
        ck.close()
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    return load_torch_checkpoint(path, model_cfg.name, target=variables)


# ---------------------------------------------------------------------------- optimizer
def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
    lr = train_cfg.lr
    if train_cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, train_cfg.warmup_steps, max(total_steps, train_cfg.warmup_steps + 1))
    elif train_cfg.schedule == "constant":
        schedule = (optax.linear_schedule(0.0, lr, train_cfg.warmup_steps)
                    if train_cfg.warmup_steps else lr)
    else:
        raise ValueError(f"config.train.schedule={train_cfg.schedule!r}: use constant / cosine")
    parts = []
    if train_cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    opt = train_cfg.optimizer
    wd = train_cfg.weight_decay
    if opt == "adam":  # torch.optim.Adam: L2 added to the gradient
        parts += [optax.add_decayed_weights(wd)] if wd else []
        parts += [optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)]
    elif opt == "adamw":
        parts += [optax.adamw(schedule, weight_decay=wd)]
    elif opt == "sgd":  # torch.optim.SGD: L2 added to the gradient, then momentum
        parts += [optax.add_decayed_weights(wd)] if wd else []
        parts += [optax.sgd(schedule, momentum=train_cfg.momentum or None,
                            nesterov=train_cfg.nesterov)]
    else:
        raise ValueError(f"config.train.optimizer={opt!r}: use adam / adamw / sgd")
    return mask_lib.masked_optimizer(optax.chain(*parts))


def create_state(model, variables: dict, tx, rng, mesh, masks=None) -> TrainState:
    """The TrainState, replicated over the mesh."""
    state = TrainState.create(variables, tx, rng, masks=masks)
    return jax.device_put(state, sharding.replicated(mesh))


# ------------------------------------------------------------------------------- steps
def task_loss(logits, labels, *, loss_name: str, multi_label: bool, class_counts=None,
              label_smoothing: float = 0.0):
    if multi_label and loss_name not in ("bce",):
        raise ValueError(f"multi-label data needs loss 'bce', not {loss_name!r}")
    return losses.classification_loss(loss_name, logits, labels, class_counts=class_counts,
                                      label_smoothing=label_smoothing)


def forward(model, state_or_vars, images, *, train: bool, masks=None, rng=None, **kw):
    """Apply the model with masks applied to the params; returns (outputs, new batch_stats)."""
    params, batch_stats = state_or_vars["params"], state_or_vars["batch_stats"]
    params = mask_lib.apply_masks(params, masks)
    variables = {"params": params, "batch_stats": batch_stats}
    rngs = {"dropout": rng} if rng is not None else {}
    if train:
        out, new = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs,
                               **kw)
        return out, new["batch_stats"]
    return model.apply(variables, images, train=False, rngs=rngs, **kw), batch_stats


def make_loss_fn(model, *, loss_name: str, multi_label: bool, class_counts=None,
                 label_smoothing: float = 0.0, compute_dtype=jnp.float32, bn_train: bool = True):
    """loss_fn(params, batch_stats, masks, batch, rng) -> (loss, (logits, new_batch_stats)).

    The mean is over the whole global batch (padded / skipped rows weigh 0), so under a data
    sharding its value and gradients equal the single-device ones. bn_train=False runs the
    model in eval mode (BatchNorm uses and keeps its running statistics)."""
    counts = None if class_counts is None else np.asarray(class_counts)

    def loss_fn(params, batch_stats, masks, batch, rng):
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        logits, new_stats = forward(model, {"params": params, "batch_stats": batch_stats},
                                    images, train=bn_train, masks=masks, rng=rng)
        per = task_loss(logits, batch["label"], loss_name=loss_name, multi_label=multi_label,
                        class_counts=counts, label_smoothing=label_smoothing)
        return losses.weighted_mean(per, batch["valid"]), (logits, new_stats)

    return loss_fn


def make_train_step(model, tx, *, multi_label: bool, **loss_kw):
    """A pure step (state, batch) -> (state, metrics); `loss_kw` as `make_loss_fn`."""
    loss_fn = make_loss_fn(model, multi_label=multi_label, **loss_kw)

    def step(state: TrainState, batch: dict):
        rng, drop_rng = jax.random.split(state.rng)
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, state.masks, batch, drop_rng)
        state = state.apply_gradients(tx, grads, batch_stats=new_stats, rng=rng)
        out = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        if not multi_label:
            correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
            out["accuracy"] = losses.weighted_mean(correct, batch["valid"])
        return state, out

    return step


def make_eval_step(model, *, multi_label: bool, compute_dtype=jnp.float32):
    """(state, batch) -> per-sample probs, loss, label, index, valid (all sharded)."""
    eval_loss = "bce" if multi_label else "ce"  # plain likelihood, whatever trained it

    def step(state: TrainState, batch: dict):
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        logits, _ = forward(model, state.variables, images, train=False, masks=state.masks)
        per = task_loss(logits, batch["label"], loss_name=eval_loss, multi_label=multi_label)
        probs = jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)
        return {"probs": probs, "loss": per, "label": batch["label"], "index": batch["index"],
                "valid": batch["valid"]}

    return step


class SwitchingStep:
    """Runs `first` for the first `switch_at` steps, then `then` (both jitted, each compiled
    once). For the PruneCXR reference's quirk: BatchNorm frozen after the first epoch."""

    def __init__(self, first, then, switch_at: int):
        self.first, self.then, self.switch_at = first, then, switch_at
        self.step = None

    def __call__(self, state, batch):
        if self.step is None:
            self.step = int(jax.device_get(state.step))
        fn = self.first if self.step < self.switch_at else self.then
        self.step += 1
        return fn(state, batch)


def jit_steps(train_step, eval_step, mesh):
    rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
    train = jax.jit(train_step, in_shardings=(rep, dat), out_shardings=(rep, rep),
                    donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(rep, dat), out_shardings=dat)
    return train, evaluate


# ---------------------------------------------------------------------------- evaluate
class Evaluator:
    """Runs a jitted eval step over a split (every sample exactly once) and computes metrics."""

    def __init__(self, eval_step, splits: dict, *, batch_size: int, preprocess: Preprocess,
                 mesh, multi_label: bool, num_workers: int = 0):
        self.eval_step, self.splits, self.batch_size = eval_step, splits, batch_size
        self.preprocess, self.mesh, self.multi_label = preprocess, mesh, multi_label
        self.num_workers = num_workers

    def predict(self, state, split: str) -> dict[str, np.ndarray]:
        """Outputs of every sample of the split, sorted by sample index, padding removed."""
        source = self.splits[split]
        outs = [self.eval_step(state, sharding.to_global(b, self.mesh))
                for b in eval_batches(source, global_batch=self.batch_size,
                                      preprocess=self.preprocess, num_workers=self.num_workers)]
        host = sharding.to_host(outs)
        cat = {k: np.concatenate([o[k] for o in host]) for k in host[0]}
        keep = cat.pop("valid").astype(bool)
        cat = {k: v[keep] for k, v in cat.items()}
        order = np.argsort(cat["index"], kind="stable")
        return {k: v[order] for k, v in cat.items()}

    def __call__(self, state, split: str) -> dict[str, float]:
        out = self.predict(state, split)
        fn = metrics.multi_label_metrics if self.multi_label else metrics.single_label_metrics
        result = fn(out["probs"], out["label"])
        result["loss"] = float(np.mean(out["loss"]))
        return result


# ----------------------------------------------------------------------------- driver
def write_config(config, workdir: str) -> None:
    if sharding.is_lead_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))


def setup(config, workdir: str):
    """Everything a supervised-style run needs: data, model, state, steps, evaluator."""
    mesh = sharding.make_mesh()
    ds = data_lib.build(config.data)
    info = ds.info
    channels = data_lib.image_channels(config.data, info)
    size = data_lib.image_size(config.data, info)
    model = build_model(config.model, info.num_classes)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    tcfg = config.train
    sharding.check_global_batch(tcfg.batch_size, mesh)
    sharding.check_global_batch(tcfg.eval_batch_size, mesh)
    steps_per_epoch = len(ds["train"]) // tcfg.batch_size
    total = tcfg.steps if tcfg.steps > 0 else tcfg.epochs * steps_per_epoch
    tx = make_optimizer(tcfg, total)
    variables = init_variables(model, config.model, init_rng, (size, size, channels))
    pruned = config.pruning.criterion != "none"
    masks = pruning_training.ScheduledPruning.initial_masks(variables["params"]) if pruned else None
    state = create_state(model, variables, tx, state_rng, mesh, masks=masks)
    loss_name = "bce" if info.multi_label and tcfg.loss == "ce" else tcfg.loss
    dtype = jnp.dtype(config.model.dtype)
    loss_kw = dict(loss_name=loss_name, multi_label=info.multi_label,
                   class_counts=info.class_counts, label_smoothing=tcfg.label_smoothing,
                   compute_dtype=dtype)
    train_step = make_train_step(model, tx, **loss_kw)
    eval_step = make_eval_step(model, multi_label=info.multi_label, compute_dtype=dtype)
    train_step, eval_step = jit_steps(train_step, eval_step, mesh)
    if tcfg.freeze_bn_after_epoch > 0:
        frozen, _ = jit_steps(make_train_step(model, tx, bn_train=False, **loss_kw), eval_step,
                              mesh)
        train_step = SwitchingStep(train_step, frozen,
                                   tcfg.freeze_bn_after_epoch * steps_per_epoch)
    eval_pre = Preprocess(size, channels, "", config.seed, config.data.on_error)
    evaluator = Evaluator(eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=eval_pre, mesh=mesh, multi_label=info.multi_label,
                          num_workers=config.data.num_workers)
    train_pre = Preprocess(size, channels, config.data.train_augment, config.seed,
                           config.data.on_error)

    def make_stream():
        return train_stream(ds["train"], global_batch=tcfg.batch_size, preprocess=train_pre,
                            seed=config.seed, num_epochs=max(tcfg.epochs, 1) if tcfg.steps <= 0
                            else -(-tcfg.steps // steps_per_epoch),
                            num_workers=config.data.num_workers)

    return dict(mesh=mesh, ds=ds, model=model, tx=tx, state=state, train_step=train_step,
                eval_step=eval_step, evaluator=evaluator, make_stream=make_stream,
                pruned=pruned)


def train_and_evaluate(config, workdir: str, hooks=()) -> dict:
    """Train, select on validation (if configured), evaluate on test; returns test metrics."""
    write_config(config, workdir)
    s = setup(config, workdir)
    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    state_hooks = [pruning_training.ScheduledPruning(config.pruning, writer)] if s["pruned"] else []
    try:
        state, final = train_loop(
            workdir=workdir, settings=LoopSettings.from_config(config.train), state=s["state"],
            train_step=s["train_step"], make_stream=s["make_stream"], evaluate=s["evaluator"],
            mesh=s["mesh"], writer=writer, meta={"config": json.loads(config.to_json())},
            hooks=hooks, state_hooks=state_hooks, global_batch=config.train.batch_size)
    finally:
        writer.close()
    log.info("test metrics: %s", final)
    return {f"test/{k}": v for k, v in final.items()}
