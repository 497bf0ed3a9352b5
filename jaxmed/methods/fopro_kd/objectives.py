"""FoPro-KD objectives as pure functions of (params / outputs, batch); step.py jits them.

EKD, as the authors' Fed-MAS code (one client) computes it:
    loss = mean BSM(fc(h), y) + mean BSM(fc_p(p(h)), y) + w_kd * mean(2 - 2 cos(p(h), t)),
w_kd = 3 (`free_u`; the step may ramp it down, `step.w_kd_at`), t the frozen teacher's feature
of the same view. Optionally the KD term of each sample is multiplied by its class's weight
(`kd_class_weights`: Fed-MAS `balanced_free`), then averaged over the batch: the batch mean of
w_y kd, as Fed-MAS's `BalancedSupByolLoss(...)` followed by `.mean()` (not normalised by
sum w_y). The weights are what the caller passes: the train step passes the DRW schedule of
`step.kd_class_weights_at`, ones until `drw_start` (the start of epoch int(0.8 epochs)), then
the effective-number weights, as Fed-MAS's `set_weight(round)` with betas [0, 0.9999].

FPG (ours; the authors never released it). The prompt only ever changes the teacher's input:
- discriminative: prompt + linear probe on the frozen teacher trained on the target labels
  (balanced softmax when class counts are given, as EKD's heads; CE otherwise), then frozen;
- adversarial (the preprint's AKD): the prompt minimises `-mean KD + penalty * mean (m - 1)^2`,
  i.e. maximises the distillation loss of the current student while staying near identity; the
  student step then minimises EKD against the prompted teacher's (stop-gradiented) features.

Teachers enter as `teacher_apply(teacher_variables, images) -> (B, D)` (static, e.g. a
functools.partial over `model.apply(..., features=True)[1]`); their variables are
stop-gradiented here, so gradients reach only what each objective trains.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from jaxmed import fourier, losses

TeacherApply = Callable[[Any, jax.Array], jax.Array]


def _class_loss(logits, labels, class_counts):
    if class_counts is None:
        return losses.cross_entropy(logits, labels)
    return losses.balanced_softmax(logits, labels, class_counts)


def class_weighted(kd, labels, kd_class_weights):
    """Per-sample KD values scaled by their class's weight (None: unchanged); the weights may
    be traced (the step's DRW schedule)."""
    if kd_class_weights is None:
        return kd
    return kd * jnp.asarray(kd_class_weights, jnp.float32)[labels]


def projector_terms(proj, proj_logits, labels, teacher_features, class_counts, *,
                    l2: bool = False, kd_class_weights=None):
    """Per-sample (balanced softmax on fc_p, KD of p(h) to the teacher's features treated as
    constants): EKD's 2 - 2 cos (feature KD's L2 with `l2`). The one place both the EKD loss
    and the train step compute the projector branch."""
    sup_proj = losses.balanced_softmax(proj_logits, labels, class_counts)
    t = jax.lax.stop_gradient(teacher_features)
    kd = losses.feature_kd(proj, t) if l2 else losses.cosine_kd(proj, t)
    return sup_proj, class_weighted(kd, labels, kd_class_weights)


def ekd_loss(student: Mapping[str, jax.Array], labels, teacher_features, class_counts, *,
             w_kd=3.0, kd_class_weights=None):
    """EKD loss and its parts.

    student: {'logits': fc(h) (B, C), 'proj': p(h) (B, D), 'proj_logits': fc_p(p(h)) (B, C)};
    teacher_features (B, D), treated as constants; class_counts: training counts (numpy, static);
    w_kd may be traced (a ramp-down schedule)."""
    logits, proj, proj_logits = student["logits"], student["proj"], student["proj_logits"]
    chex.assert_rank([logits, proj, proj_logits, teacher_features], 2)
    chex.assert_equal_shape([proj, teacher_features])
    chex.assert_equal_shape([logits, proj_logits])
    sup = jnp.mean(losses.balanced_softmax(logits, labels, class_counts))
    sup_proj, kd = jax.tree.map(jnp.mean, projector_terms(
        proj, proj_logits, labels, teacher_features, class_counts,
        kd_class_weights=kd_class_weights))
    loss = sup + sup_proj + w_kd * kd
    return loss, {"loss": loss, "loss_sup": sup, "loss_sup_proj": sup_proj, "loss_kd": kd}


def teacher_features(prompt_params, teacher_variables, images, *, teacher_apply: TeacherApply,
                     window=None):
    """The frozen teacher's (B, D) float32 features of the prompted images (of the clean ones
    when `prompt_params` is None). Only the prompt can receive a gradient."""
    x = images if prompt_params is None else fourier.apply_prompt(prompt_params, images, window)
    feats = teacher_apply(jax.lax.stop_gradient(teacher_variables), x)
    chex.assert_rank(feats, 2)
    return feats.astype(jnp.float32)


def init_probe(feature_dim: int, num_classes: int) -> dict:
    """Linear probe params (zeros: the probe's loss is convex, any start works)."""
    return {"kernel": jnp.zeros((feature_dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}


def fpg_discriminative_loss(trainable, teacher_variables, batch, *, teacher_apply: TeacherApply,
                            class_counts=None, window=None):
    """Probe loss of the prompted frozen teacher; trainable = {'prompt', 'probe'} and both are
    learned. batch: {'image' (B, H, W, C), 'label' (B,)}."""
    feats = teacher_features(trainable["prompt"], teacher_variables, batch["image"],
                             teacher_apply=teacher_apply, window=window)
    logits = feats @ trainable["probe"]["kernel"] + trainable["probe"]["bias"]
    loss = jnp.mean(_class_loss(logits, batch["label"], class_counts))
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return loss, {"fpg_loss": loss, "fpg_accuracy": accuracy}


def fpg_adversarial_loss(prompt_params, teacher_variables, student_proj, batch, *,
                         teacher_apply: TeacherApply, penalty=1.0, window=None,
                         kd_class_weights=None):
    """What the adversarial prompt MINIMISES: -KD(student, prompted teacher) + penalty * mean
    (m - 1)^2 over the window. student_proj: p(h) of the student on the clean image (B, D),
    a constant here. Returns (loss, {'fpg_kd', 'fpg_penalty'})."""
    feats = teacher_features(prompt_params, teacher_variables, batch["image"],
                             teacher_apply=teacher_apply, window=window)
    kd = jnp.mean(class_weighted(losses.cosine_kd(jax.lax.stop_gradient(student_proj), feats),
                                 batch["label"], kd_class_weights))
    reg = fourier.mask_penalty(prompt_params, window)
    return -kd + penalty * reg, {"fpg_kd": kd, "fpg_penalty": reg}
