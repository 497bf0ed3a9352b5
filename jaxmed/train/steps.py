"""Pure step makers shared by every method: forward, loss, train step, eval step.

A maker takes plain values (model, optimizer, loss name, ...) and returns a function of
(state, batch) that reads nothing else: no config inside traced code. `jit_train_step` /
`jit_eval_step` compile them once with the state replicated and the batch sharded on the mesh's
`data` axis.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses
from jaxmed.data import augment
from jaxmed.pruning import masks as mask_lib
from jaxmed.train import sharding
from jaxmed.train.state import TrainState


def check_batch(batch: dict) -> None:
    """Boundary check of a (global) batch: NHWC images, one label row and flag per image."""
    chex.assert_rank(batch["image"], 4)
    n = batch["image"].shape[0]
    chex.assert_axis_dimension(batch["label"], 0, n)
    chex.assert_shape(batch["valid"], (n,))


def task_loss(logits, labels, *, loss_name: str, multi_label: bool, class_counts=None,
              label_smoothing: float = 0.0):
    """Per-sample loss; multi-label data only trains with 'bce'."""
    if multi_label and loss_name != "bce":
        raise ValueError(f"multi-label data needs loss 'bce', not {loss_name!r}")
    return losses.classification_loss(loss_name, logits, labels, class_counts=class_counts,
                                      label_smoothing=label_smoothing)


def forward(model, variables, images, *, train: bool, masks=None, rng=None, **kw):
    """Apply the model with `masks` applied to the params: (outputs, batch_stats), the
    batch statistics updated in train mode and passed through in eval mode."""
    params = mask_lib.apply_masks(variables["params"], masks)
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    rngs = {"dropout": rng} if rng is not None else {}
    if train:
        out, new = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs,
                               **kw)
        return out, new["batch_stats"]
    return model.apply(variables, images, train=False, rngs=rngs, **kw), variables["batch_stats"]


def make_loss_fn(model, *, loss_name: str, multi_label: bool, class_counts=None,
                 label_smoothing: float = 0.0, compute_dtype=jnp.float32, bn_train: bool = True):
    """loss_fn(params, batch_stats, masks, batch, rng) -> (loss, (logits, new_batch_stats)).

    The mean is over the whole global batch (padded / skipped rows weigh 0), so under a data
    sharding its value and gradients equal the single-device ones. bn_train=False runs the
    model in eval mode (BatchNorm uses and keeps its running statistics)."""
    counts = None if class_counts is None else np.asarray(class_counts)

    def loss_fn(params, batch_stats, masks, batch, rng):
        check_batch(batch)
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        logits, new_stats = forward(model, {"params": params, "batch_stats": batch_stats},
                                    images, train=bn_train, masks=masks, rng=rng)
        per = task_loss(logits, batch["label"], loss_name=loss_name, multi_label=multi_label,
                        class_counts=counts, label_smoothing=label_smoothing)
        chex.assert_shape(per, batch["valid"].shape)
        return losses.weighted_mean(per, batch["valid"]), (logits, new_stats)

    return loss_fn


def make_train_step(model, tx, *, multi_label: bool, bn_frozen_from: int = 0, **loss_kw):
    """A pure step (state, batch) -> (state, metrics); `loss_kw` as `make_loss_fn`.

    bn_frozen_from > 0: from that step on BatchNorm runs in eval mode (the PruneCXR reference's
    quirk); the switch is a `lax.cond` on `state.step`, so the step still compiles once."""
    grad_fns = [jax.value_and_grad(make_loss_fn(model, multi_label=multi_label, bn_train=bn,
                                                **loss_kw), has_aux=True)
                for bn in ((True, False) if bn_frozen_from > 0 else (True,))]

    def step(state: TrainState, batch: dict):
        rng, drop_rng = jax.random.split(state.rng)
        args = (state.params, state.batch_stats, state.masks, batch, drop_rng)
        if len(grad_fns) == 1:
            (loss, (logits, new_stats)), grads = grad_fns[0](*args)
        else:
            (loss, (logits, new_stats)), grads = jax.lax.cond(
                state.step < bn_frozen_from, grad_fns[0], grad_fns[1], *args)
        state = state.apply_gradients(tx, grads, batch_stats=new_stats, rng=rng)
        # param_norm: the NaN guard also sees an update that left a non-finite weight
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(state.params)}
        if not multi_label:
            correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
            out["accuracy"] = losses.weighted_mean(correct, batch["valid"])
        return state, out

    return step


def make_eval_step(model, *, multi_label: bool, compute_dtype=jnp.float32):
    """(state, batch) -> per-sample probs, loss, label (all sharded like the batch)."""
    eval_loss = "bce" if multi_label else "ce"  # plain likelihood, whatever trained it

    def step(state: TrainState, batch: dict):
        check_batch(batch)
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        logits, _ = forward(model, state.variables, images, train=False, masks=state.masks)
        per = task_loss(logits, batch["label"], loss_name=eval_loss, multi_label=multi_label)
        probs = jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)
        return {"probs": probs.astype(jnp.float32), "loss": per, "label": batch["label"]}

    return step


def jit_train_step(step, mesh, state_sharding=None):
    """jit (state, batch) -> (state, metrics): state replicated (or `state_sharding`, e.g. for
    per-sample memories sharded on `data`) and donated, batch sharded on `data`."""
    rep = sharding.replicated(mesh)
    st = rep if state_sharding is None else state_sharding
    return jax.jit(step, in_shardings=(st, sharding.data_sharding(mesh)),
                   out_shardings=(st, rep), donate_argnums=0)


def jit_eval_step(step, mesh, state_sharding=None):
    """jit (state, batch) -> per-sample outputs, sharded like the batch."""
    rep = sharding.replicated(mesh)
    st = rep if state_sharding is None else state_sharding
    dat = sharding.data_sharding(mesh)
    return jax.jit(step, in_shardings=(st, dat), out_shardings=dat)
