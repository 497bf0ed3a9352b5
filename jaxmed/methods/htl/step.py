"""HTL's pure steps: the train steps (segmentation and classification) with per-sample loss
weights, the predictions (masks, probabilities, class activation maps) and the evaluation
passes with per-sub-population metrics.

The attention to hard samples lives in the state (the kit's `TrainState.sample_weight`, a table
indexed by the records' stable `index`): the steps read it, the identification hook
(`attention.py`) rewrites it, and it is jitted, donated and checkpointed with everything else.
A weight-1 table is the plain objective, so the baseline and both attentions run the same
compiled step.

Decisions:
  - weighted loss: sum_i w_i l_i / (number of valid samples), i.e. an HTL sample's loss counts
    `htl.weight` times and the others' as in the baseline (not renormalized by sum w).
  - segmentation: masks are lesion where the decoded mask is > 127 (0/255 PNGs); the loss is
    Dice + BCE per image (`losses.dice_bce`); the predicted mask is logit > 0.
  - CAM (weak localization): the top-1 predicted class's map, ReLU, divided by its maximum per
    image, bilinearly resized to the input and thresholded at `cam_threshold`.
"""

from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses, metrics
from jaxmed.data import augment
from jaxmed.methods.htl import identify
from jaxmed.models.unet import encoder_of
from jaxmed.train import steps
from jaxmed.train.evaluate import Evaluator
from jaxmed.train.state import TrainState

MASK_LEVEL = 127  # decoded masks are 0/255


def target_masks(mask):
    """uint8 [B, H, W] 0/255 -> float [B, H, W, 1] 0/1."""
    return (mask > MASK_LEVEL)[..., None].astype(jnp.float32)


# ------------------------------------------------------------------------------- steps
def make_train_step(model, tx, *, task: str, compute_dtype=jnp.float32,
                    dice_weight: float = 1.0, bce_weight: float = 1.0) -> Callable:
    """A pure (state, batch) -> (state, metrics) for task 'segmentation' (U-Net, Dice + BCE on
    batch['mask']) or 'classification' (CE on batch['label']); every sample's loss is scaled
    by state.sample_weight[batch['index']]."""
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")

    def loss_fn(params, batch_stats, batch, weights):
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        logits, new_stats = steps.forward(model, {"params": params, "batch_stats": batch_stats},
                                          images, train=True)
        if task == "segmentation":
            per = losses.dice_bce(logits, target_masks(batch["mask"]), dice_weight, bce_weight)
        else:
            per = steps.task_loss(logits, batch["label"], loss_name="ce", multi_label=False)
        chex.assert_shape(per, batch["valid"].shape)
        return losses.weighted_mean(per * weights, batch["valid"]), (logits, new_stats, per)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict):
        steps.check_batch(batch)
        if task == "segmentation":
            chex.assert_rank(batch["mask"], 3)
        weights = state.sample_weight[batch["index"]]
        (loss, (logits, new_stats, per)), grads = grad_fn(state.params, state.batch_stats,
                                                          batch, weights)
        rng, _ = jax.random.split(state.rng)
        state = state.apply_gradients(tx, grads, batch_stats=new_stats, rng=rng)
        valid = batch["valid"]
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(state.params),
               "plain_loss": losses.weighted_mean(per, valid),
               "attended": losses.weighted_mean((weights != 1).astype(jnp.float32), valid)}
        if task == "segmentation":
            iou = identify.mask_iou(logits > 0, target_masks(batch["mask"]) > 0)
            out["iou"] = losses.weighted_mean(iou, valid)
        else:
            out["accuracy"] = losses.weighted_mean(
                (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), valid)
        return state, out

    return step


def make_segmentation_predict(model, *, compute_dtype=jnp.float32) -> Callable:
    """(state, batch) -> {'pred': uint8 [B, H, W] predicted lesion mask}."""
    def fn(state, batch):
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        logits, _ = steps.forward(model, state.variables, images, train=False)
        return {"pred": (logits[..., 0] > 0).astype(jnp.uint8)}

    return fn


def make_classification_predict(model, *, compute_dtype=jnp.float32, cam_threshold=None
                                ) -> Callable:
    """(state, batch) -> {'probs' [B, C]} and, with a cam_threshold, {'cam': uint8 [B, H, W]}
    (the thresholded CAM of the top-1 class; the model must be a ResNet)."""
    encoder = encoder_of(model) if cam_threshold is not None else None

    def fn(state, batch):
        images = augment.normalize(batch["image"], dtype=compute_dtype)
        if encoder is None:
            logits, _ = steps.forward(model, state.variables, images, train=False)
            return {"probs": jax.nn.softmax(logits).astype(jnp.float32)}
        logits, cam = class_activation(encoder, state.params, state.batch_stats, images)
        out = {"probs": jax.nn.softmax(logits).astype(jnp.float32)}
        out["cam"] = (cam >= cam_threshold).astype(jnp.uint8)
        return out

    return fn


def class_activation(encoder, params, batch_stats, images):
    """ResNet logits [B, C] and the top-1 class's activation map [B, H, W] in [0, 1]: the
    last stage's features times that class's `fc` weights (Zhou et al. 2016), ReLU, divided by
    the image's maximum, bilinearly resized to the input. The logits equal the classifier's
    (global average pooling commutes with the linear head)."""
    trunk_params = {k: v for k, v in params.items() if k != "fc"}
    feats = encoder.apply({"params": trunk_params, "batch_stats": batch_stats}, images,
                          train=False)[-1].astype(jnp.float32)
    kernel, bias = params["fc"]["kernel"], params["fc"]["bias"]
    logits = jnp.mean(feats, (1, 2)) @ kernel + bias
    top = jnp.argmax(logits, -1)
    cam = jax.nn.relu(jnp.einsum("bhwf,fb->bhw", feats, kernel[:, top]))
    cam = cam / jnp.maximum(jnp.max(cam, (1, 2), keepdims=True), 1e-12)
    b, h, w = images.shape[:3]
    return logits, jax.image.resize(cam, (b, h, w), "bilinear")


# ------------------------------------------------------------------------- evaluation
def group_metrics(metric_fn: Callable[[np.ndarray], dict], attrs: dict[str, np.ndarray]
                  ) -> dict[str, float]:
    """metric_fn(selection) on every sub-population the data marks: keys '<attr>_<v>/<m>' (e.g.
    'hard_1/iou'; TensorBoard-safe) for each attribute value other than -1 (unknown)."""
    out = {}
    for name in sorted(attrs):
        values = np.asarray(attrs[name])
        for v in sorted(set(values.tolist()) - {-1}):
            for k, x in metric_fn(values == v).items():
                out[f"{name}_{v}/{k}"] = x
    return out


def segmentation_scores(pred, mask, attrs) -> dict[str, float]:
    """IoU / Dice / thresholded Jaccard over all images and per sub-population."""
    target = np.asarray(mask) > MASK_LEVEL
    pred = np.asarray(pred)
    out = metrics.segmentation_metrics(pred, target)
    out.update(group_metrics(lambda sel: metrics.segmentation_metrics(pred[sel], target[sel]),
                             attrs))
    return out


def classification_scores(probs, labels, attrs, cam=None, mask=None) -> dict[str, float]:
    """AUC / balanced accuracy (+ CAM localization as cam_iou, cam_dice,
    cam_thresholded_jaccard) over all images and per sub-population."""
    probs, labels = np.asarray(probs), np.asarray(labels)

    def score(sel):
        full = metrics.single_label_metrics(probs[sel], labels[sel])
        m = {k: full[k] for k in ("auc", "balanced_accuracy", "accuracy")}
        if cam is not None:
            loc = metrics.segmentation_metrics(np.asarray(cam)[sel],
                                               np.asarray(mask)[sel] > MASK_LEVEL)
            m.update({f"cam_{k}": v for k, v in loc.items()})
        return m

    out = score(Ellipsis)
    out.update(group_metrics(score, attrs))
    return out


def evaluation_keys(task: str) -> tuple[str, ...]:
    """The batch fields the task's metrics read beside the predictions."""
    return ("index", "attrs") + (("mask",) if task != "classification" else ()) + (
        ("label",) if task != "segmentation" else ())


def task_metrics(out: dict, task: str) -> dict[str, float]:
    """The evaluator's `metrics_fn`: the task's scores overall and per sub-population."""
    if task == "segmentation":
        return segmentation_scores(out["pred"], out["mask"], out["attrs"])
    return classification_scores(out["probs"], out["label"], out["attrs"], out.get("cam"),
                                 out.get("mask"))


def make_evaluator(predict_step, splits, *, task: str, batch_size: int, preprocess, mesh,
                   num_workers: int):
    """The kit's one `Evaluator` with the task's metrics (`predict_step`: jitted)."""
    return Evaluator(predict_step, splits, batch_size=batch_size, preprocess=preprocess,
                     mesh=mesh, multi_label=False, num_workers=num_workers,
                     metrics_fn=functools.partial(task_metrics, task=task),
                     keys=evaluation_keys(task))
