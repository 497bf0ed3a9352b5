"""FoPro-KD's steps: every method of the comparison as module-level pure steps.

big_vision's distill pattern: the step sees the student and the frozen teacher side by side,
`params['student']` (+ `params['prompt']` for the adversarial FPG) and `teacher = {'variables',
'probe'?}`, and differentiates only the student (and the adversarial prompt). The teacher is an
argument of the jitted step beside the state, never inside it: it has no gradient, no optimizer
state, is never donated and is never written to a checkpoint (the loop checkpoints the state).

Methods (one jitted step each, all sharing `train_step`; `Setup` holds the static choices):
  ce, balanced_softmax, ldam_drw, focal, class_balanced, logit_adjusted   student alone
  hinton_kd     BSM(fc) + w * T^2 KL(teacher logits || student logits)   (head-biased: losses.kd)
  balanced_kd   BSM(fc) + w * BKD: the KL towards the teacher's softened outputs re-weighted per
                class by the effective-number weights (losses.balanced_kd, Zhang et al. 2023)
  feature_kd    BSM(fc) + BSM(fc_p(p(h))) + w * mean (p(h) - t)^2       (FitNets-style L2)
  ekd           BSM(fc) + BSM(fc_p(p(h))) + w_kd * (2 - 2 cos(p(h), t))  (the spec's EKD)
  ekd_fpg       EKD against the teacher on the prompted view; prompt + probe learned first on
                the frozen teacher (discriminative FPG), then frozen
  ekd_fpg_adv   EKD with the adversarial FPG: each step first moves the prompt to maximise the
                KD loss of the current student (penalty keeps the mask near 1), then the student
                minimises EKD against the teacher under the updated prompt (alternating steps)

Decisions: every KD method uses balanced softmax as its supervised term (as EKD), so the KD term
is the only difference between them (BKD's paper pairs its KD term with plain CE);
per-class weights on a supervised loss reduce as the references' torch CrossEntropyLoss(weight=w),
sum(w_y l) / sum(w_y) over the batch (LDAM-DRW's DRW phase; class_balanced with
cb_reduction 'weighted', Fed-MAS's CB), while the KD term's class weights (kd_class_weights,
Fed-MAS `balanced_free`) reduce as Fed-MAS's `BalancedSupByolLoss(...).mean()`, the batch mean of
w_y kd; DRW and the KD class weights switch from ones to the effective-number weights at the
start of epoch int(drw_start * epochs) (`drw_start_step`: LDAM-DRW's / Fed-MAS's
`epoch // int(0.8 * epochs)`), and `w_kd_ramp` ramps w_kd down linearly per epoch from that
fraction of training (Fed-MAS --LRD); LDAM-DRW uses cosine logits (normalised h and fc columns,
as the LDAM code's NormedLinear) for training and prediction, since s = 30 assumes them; the
teacher sees the student's (augmented, ImageNet-normalised) view, resized on device if it needs
another size; Hinton KD uses the teacher's own head when it has the data's classes, else a
linear probe fitted on the frozen teacher first (the FPG stage without a prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import fourier, losses
from jaxmed.data import augment
from jaxmed.methods.fopro_kd import objectives
from jaxmed.train import sharding, steps
from jaxmed.train.hyper import FromConfig

METHODS = ("ce", "balanced_softmax", "ldam_drw", "focal", "class_balanced", "logit_adjusted",
           "hinton_kd", "balanced_kd", "feature_kd", "ekd", "ekd_fpg", "ekd_fpg_adv")
STUDENT_ONLY = METHODS[:6]
LOGIT_KD = ("hinton_kd", "balanced_kd")  # distil the teacher's logits (its head or a probe)
CB_REDUCTIONS = ("weighted", "mean")
WITH_HEADS = ("feature_kd", "ekd", "ekd_fpg", "ekd_fpg_adv")
PROMPTED = ("ekd_fpg", "ekd_fpg_adv")


@flax.struct.dataclass
class KDState:
    """What a run trains and checkpoints: the student (+ the prompt of an FPG method), its batch
    statistics and optimizer states. The teacher is not here."""

    step: jax.Array
    params: Any  # {'student': {'backbone', 'heads'?}, 'prompt'?: {'log_mask'}}
    batch_stats: Any  # {'backbone', 'heads'?}
    opt_state: Any  # {'student'[, 'prompt' (adversarial FPG only)]}
    rng: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Setup(FromConfig):
    """The static part of a method's steps (plain values, read at trace time only)."""

    method: str
    model: Any  # the student backbone (flax module)
    heads: Any  # ProjectorHeads or None
    tx: Any  # the student's optimizer
    class_counts: np.ndarray
    compute_dtype: Any = jnp.float32
    prompt_tx: Any = None  # the adversarial prompt's optimizer
    teacher_net: Any = None  # the frozen teacher (flax module); its variables come per step
    teacher_size: int = 0  # teacher input side; 0 = the student's
    teacher_logits: str = "head"  # 'head' (own classifier) or 'probe'
    window: np.ndarray | None = None  # FPG low-frequency window (None: every frequency)
    w_kd: float = 3.0
    w_kd_ramp: float = 0.0  # > 0: w_kd ramps down linearly per epoch from this fraction
    kd_class_weights: np.ndarray | None = None  # the weights from drw_start (ones before)
    w_hinton: float = 1.0
    temperature: float = 4.0
    w_feature: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start: int = 0
    cb_beta: float = 0.9999
    focal_gamma: float = 2.0
    la_tau: float = 1.0
    cb_reduction: str = "weighted"  # class_balanced: 'weighted' (torch / Fed-MAS) or 'mean' (Cui)
    fpg_penalty: float = 1.0
    durations: Any = None  # the run's train.run.Durations (the w_kd ramp counts its epochs)

    @classmethod
    def from_config(cls, kd_cfg, **computed) -> "Setup":
        """The fields named as `config.kd` keys (w_kd, temperature, ldam_scale, ...) from
        `kd_cfg`, the rest from `computed`, which must hold the two keys a run turns into
        values: drw_start (a step, not the fraction) and kd_class_weights (not the flag)."""
        if not {"drw_start", "kd_class_weights"} <= set(computed):
            raise TypeError("Setup.from_config needs drw_start and kd_class_weights computed")
        setup = super().from_config(kd_cfg, **computed)
        if setup.cb_reduction not in CB_REDUCTIONS:
            raise ValueError(f"config.kd.cb_reduction={setup.cb_reduction!r}: one of "
                             f"{CB_REDUCTIONS}")
        if not 0.0 <= setup.w_kd_ramp < 1.0:
            raise ValueError(f"config.kd.w_kd_ramp={setup.w_kd_ramp}: 0 (off) or the fraction "
                             "of training in (0, 1) where w_kd starts ramping down")
        if setup.w_kd_ramp > 0 and setup.durations is None:
            raise TypeError("Setup.from_config: config.kd.w_kd_ramp needs durations computed")
        return setup

    @property
    def needs_teacher(self) -> bool:
        return self.method not in STUDENT_ONLY


def drw_start_step(d, fraction: float) -> int:
    """The step where DRW (and the KD class weights) switch on: the start of epoch
    int(fraction * epochs), as LDAM-DRW and Fed-MAS do (`Durations.epoch_start`; 9 epochs:
    epoch 7, not step int(0.8 * total)). `d`: the run's Durations."""
    return d.epoch_start(fraction)


def kd_class_weights_at(setup: Setup, step):
    """The KD term's per-class weights at `step` (traced): ones before `drw_start`, then
    `setup.kd_class_weights` (Fed-MAS `balanced_free`: BalancedSupByolLoss.set_weight's
    betas [0, 0.9999] switched at int(0.8 * epochs)); None when the option is off."""
    if setup.kd_class_weights is None:
        return None
    w = jnp.asarray(setup.kd_class_weights, jnp.float32)
    return jnp.where(jnp.asarray(step) >= setup.drw_start, w, jnp.ones_like(w))


def w_kd_at(setup: Setup, step):
    """EKD's w_kd at `step`: constant, or with `w_kd_ramp` = f > 0 Fed-MAS's linear ramp-down
    (--LRD, start_free_rd): w_kd * (1 - (e - e0) / (E - e0)) in epoch e >= e0 = int(f E) of
    E epochs, w_kd before; one value per epoch, as Fed-MAS sets it per round."""
    if not setup.w_kd_ramp:
        return setup.w_kd
    d = setup.durations
    spe = max(d.steps_per_epoch, 1)
    epochs = d.total / spe
    start = drw_start_step(d, setup.w_kd_ramp) // spe
    epoch = jnp.asarray(step) // spe
    down = jnp.clip((epoch - start) / max(epochs - start, 1e-9), 0.0, 1.0)
    return setup.w_kd * (1.0 - down)


# ------------------------------------------------------------------------------- forwards
def teacher_outputs(model, size: int, variables, images):
    """(logits, features) of the frozen teacher in eval mode, float32; `images` are resized to
    size x size first when the teacher needs another input size."""
    b, h, w, c = images.shape
    if size and (h, w) != (size, size):
        images = jax.image.resize(images, (b, size, size, c), "bilinear")
    logits, feats = model.apply(variables, images, train=False, features=True)
    return logits.astype(jnp.float32), feats.astype(jnp.float32)


def teacher_features_fn(model, size: int):
    """teacher_apply(variables, images) -> features, the form `objectives` takes."""
    return functools.partial(_features_only, model, size)


def _features_only(model, size, variables, images):
    return teacher_outputs(model, size, variables, images)[1]


def cosine_logits(h, backbone_params):
    """LDAM's NormedLinear on the backbone's own classifier: normalise h and each class column
    as torch's F.normalize (finite gradients on an all-zero row: `losses.l2_normalize`)."""
    head = backbone_params["fc"] if "fc" in backbone_params else backbone_params["head"]
    w = head["kernel"].astype(jnp.float32)
    return losses.l2_normalize(h, axis=-1) @ losses.l2_normalize(w, axis=0)


def student_apply(setup: Setup, params, batch_stats, images, train: bool):
    """The student's outputs {'logits', 'h'[, 'proj', 'proj_logits']} and new batch stats."""
    (logits, h), bb_stats = steps.forward(
        setup.model, {"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
        images, train=train, features=True)
    out = {"logits": logits, "h": h}
    new_stats = {"backbone": bb_stats}
    if setup.heads is not None:
        hv = {"params": params["heads"], "batch_stats": batch_stats["heads"]}
        if train:
            heads_out, mutated = setup.heads.apply(hv, h, train=True, mutable=["batch_stats"])
            new_stats["heads"] = mutated["batch_stats"]
        else:
            heads_out = setup.heads.apply(hv, h, train=False)
            new_stats["heads"] = batch_stats["heads"]
        out.update(heads_out)
    if setup.method == "ldam_drw":
        out["logits"] = cosine_logits(h, params["backbone"])
    return out, new_stats


# ---------------------------------------------------------------------------------- losses
def per_sample_loss(setup: Setup, out, labels, step, t_feats=None, t_logits=None, valid=None):
    """(per-sample loss (B,), {part: per-sample values}) of `setup.method`, whose mean over
    the `valid` rows (all when None) is the method's batch loss: a supervised term weighted
    per class is scaled by `losses.normalised_sample_weights` so that mean is the reference's
    sum(w_y l) / sum(w_y)."""
    m, counts, logits = setup.method, setup.class_counts, out["logits"]
    if m == "ldam_drw":
        w = losses.drw_weights(counts, step, setup.drw_start, setup.cb_beta)
        sup = losses.ldam(logits, labels, counts, setup.ldam_max_margin, setup.ldam_scale)
        sup = sup * losses.normalised_sample_weights(w, labels, valid)
    elif m == "class_balanced" and setup.cb_reduction == "weighted":
        w = losses.class_balanced_weights(counts, setup.cb_beta)
        sup = losses.cross_entropy(logits, labels) * losses.normalised_sample_weights(
            w, labels, valid)
    else:  # the named loss; balanced softmax for it and under every KD method
        name = m if m in ("ce", "focal", "class_balanced", "logit_adjusted") else "balanced_softmax"
        sup = losses.classification_loss(name, logits, labels, class_counts=counts,
                                         focal_gamma=setup.focal_gamma, cb_beta=setup.cb_beta,
                                         la_tau=setup.la_tau)
    parts = {"loss_sup": sup}
    loss = sup
    if m in LOGIT_KD:
        t = jax.lax.stop_gradient(t_logits)
        kd = (losses.kd(logits, t, setup.temperature) if m == "hinton_kd" else
              losses.balanced_kd(logits, t, losses.class_balanced_weights(counts, setup.cb_beta),
                                 setup.temperature))
        parts["loss_kd"] = kd
        loss = loss + setup.w_hinton * kd
    if m in WITH_HEADS:
        sup_p, kd = objectives.projector_terms(
            out["proj"], out["proj_logits"], labels, t_feats, counts, l2=m == "feature_kd",
            kd_class_weights=kd_class_weights_at(setup, step))
        w = setup.w_feature if m == "feature_kd" else w_kd_at(setup, step)
        parts.update(loss_sup_proj=sup_p, loss_kd=kd)
        loss = loss + sup_p + w * kd
    return loss, parts


# ----------------------------------------------------------------------------------- steps
def train_step(state: KDState, teacher, batch, *, setup: Setup):
    """One step of `setup.method`: (state, teacher, batch) -> (state, metrics). `teacher` =
    {'variables'[, 'probe']} (empty for student-only methods) is read, never changed."""
    steps.check_batch(batch)
    images = augment.normalize(batch["image"], dtype=setup.compute_dtype)
    labels, valid = batch["label"], batch["valid"]
    params, opt_state = dict(state.params), dict(state.opt_state)
    metrics = {}

    def student_fn(student_params):
        return student_apply(setup, student_params, state.batch_stats, images, True)

    out, student_vjp, new_stats = jax.vjp(student_fn, params["student"], has_aux=True)
    t_feats = t_logits = None
    if setup.needs_teacher:
        tvars = jax.lax.stop_gradient(teacher["variables"])
        if setup.method == "ekd_fpg_adv":  # the prompt's move first (alternating steps)
            (_, pm), pgrad = jax.value_and_grad(objectives.fpg_adversarial_loss, has_aux=True)(
                params["prompt"], tvars, out["proj"], {"image": images, "label": labels},
                teacher_apply=teacher_features_fn(setup.teacher_net, setup.teacher_size),
                penalty=setup.fpg_penalty, window=setup.window,
                kd_class_weights=kd_class_weights_at(setup, state.step))
            upd, opt_state["prompt"] = setup.prompt_tx.update(pgrad, opt_state["prompt"],
                                                              params["prompt"])
            params["prompt"] = optax.apply_updates(params["prompt"], upd)
            metrics.update(pm)
        x = images
        if "prompt" in params:
            x = fourier.apply_prompt(jax.lax.stop_gradient(params["prompt"]), images,
                                     setup.window)
        t_logits, t_feats = teacher_outputs(setup.teacher_net, setup.teacher_size, tvars, x)
        if setup.teacher_logits == "probe" and "probe" in teacher:
            probe = jax.lax.stop_gradient(teacher["probe"])
            t_logits = t_feats @ probe["kernel"] + probe["bias"]

    def loss_of_outputs(o):
        per, parts = per_sample_loss(setup, o, labels, state.step, t_feats, t_logits, valid)
        return losses.weighted_mean(per, valid), {k: losses.weighted_mean(v, valid)
                                                  for k, v in parts.items()}

    (loss, parts), g_out = jax.value_and_grad(loss_of_outputs, has_aux=True)(out)
    (grads,) = student_vjp(g_out)
    updates, opt_state["student"] = setup.tx.update(grads, opt_state["student"],
                                                    params["student"])
    params["student"] = optax.apply_updates(params["student"], updates)
    correct = (jnp.argmax(out["logits"], -1) == labels).astype(jnp.float32)
    metrics.update(parts)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params["student"]),
                   accuracy=losses.weighted_mean(correct, valid))
    new = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                        opt_state=opt_state, rng=jax.random.split(state.rng)[0])
    return new, metrics


def eval_step(state: KDState, batch, *, setup: Setup):
    """Per-sample probs (of `fc`, the head used at inference), CE loss and label."""
    steps.check_batch(batch)
    images = augment.normalize(batch["image"], dtype=setup.compute_dtype)
    out, _ = student_apply(setup, state.params["student"], state.batch_stats, images, False)
    per = losses.cross_entropy(out["logits"], batch["label"])
    return {"probs": jax.nn.softmax(out["logits"]).astype(jnp.float32), "loss": per,
            "label": batch["label"]}


def jit_train_step(setup: Setup, mesh):
    """jit (state, teacher, batch) -> (state, metrics): state and teacher replicated, the state
    donated (the teacher is not), the batch sharded on `data`."""
    rep = sharding.replicated(mesh)
    return jax.jit(functools.partial(train_step, setup=setup),
                   in_shardings=(rep, rep, sharding.data_sharding(mesh)),
                   out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(setup: Setup, mesh):
    return steps.jit_eval_step(functools.partial(eval_step, setup=setup), mesh)


# ------------------------------------------------------------------------ FPG / probe stage
def probe_step(pstate, teacher, batch, *, setup: Setup, tx, learn_prompt: bool):
    """One step of the discriminative FPG (prompt + linear probe on the frozen teacher), or of
    the probe alone (`learn_prompt=False`, Hinton KD's teacher logits)."""
    steps.check_batch(batch)
    images = augment.normalize(batch["image"], dtype=setup.compute_dtype)

    def loss_fn(trainable):
        full = {"prompt": trainable.get("prompt"), "probe": trainable["probe"]}
        return objectives.fpg_discriminative_loss(
            full, jax.lax.stop_gradient(teacher["variables"]),
            {"image": images, "label": batch["label"]},
            teacher_apply=teacher_features_fn(setup.teacher_net, setup.teacher_size),
            class_counts=setup.class_counts, window=setup.window if learn_prompt else None)

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(pstate["params"])
    updates, opt = tx.update(grads, pstate["opt_state"], pstate["params"])
    new = {"params": optax.apply_updates(pstate["params"], updates), "opt_state": opt}
    return new, {**m, "loss": loss}


def jit_probe_step(setup: Setup, tx, learn_prompt: bool, mesh):
    rep = sharding.replicated(mesh)
    return jax.jit(functools.partial(probe_step, setup=setup, tx=tx, learn_prompt=learn_prompt),
                   in_shardings=(rep, rep, sharding.data_sharding(mesh)),
                   out_shardings=(rep, rep), donate_argnums=0)
