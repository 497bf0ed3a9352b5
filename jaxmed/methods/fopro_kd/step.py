"""FoPro-KD's steps: every method of the comparison as module-level pure steps.

big_vision's distill pattern: the step sees the student and the frozen teacher side by side,
`params['student']` (+ `params['prompt']` for the adversarial FPG) and `teacher = {'variables',
'probe'?}`, and differentiates only the student (and the adversarial prompt). The teacher is an
argument of the jitted step beside the state, never inside it: it has no gradient, no optimizer
state, is never donated and is never written to a checkpoint (the loop checkpoints the state).

Methods (one jitted step each, all sharing `train_step`; `Setup` holds the static choices):
  ce, balanced_softmax, ldam_drw, focal, class_balanced, logit_adjusted   student alone
  hinton_kd     BSM(fc) + w * T^2 KL(teacher logits || student logits)
  feature_kd    BSM(fc) + BSM(fc_p(p(h))) + w * mean (p(h) - t)^2       (FitNets-style L2)
  ekd           BSM(fc) + BSM(fc_p(p(h))) + w_kd * (2 - 2 cos(p(h), t))  (the spec's EKD)
  ekd_fpg       EKD against the teacher on the prompted view; prompt + probe learned first on
                the frozen teacher (discriminative FPG), then frozen
  ekd_fpg_adv   EKD with the adversarial FPG: each step first moves the prompt to maximise the
                KD loss of the current student (penalty keeps the mask near 1), then the student
                minimises EKD against the teacher under the updated prompt (alternating steps)

Decisions: every KD method uses balanced softmax as its supervised term (as EKD), so the KD term
is the only difference between them; LDAM-DRW uses cosine logits (normalised h and fc columns,
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
           "hinton_kd", "feature_kd", "ekd", "ekd_fpg", "ekd_fpg_adv")
STUDENT_ONLY = METHODS[:6]
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
    kd_class_weights: np.ndarray | None = None
    w_hinton: float = 1.0
    temperature: float = 4.0
    w_feature: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start: int = 0
    cb_beta: float = 0.9999
    focal_gamma: float = 2.0
    la_tau: float = 1.0
    fpg_penalty: float = 1.0

    @classmethod
    def from_config(cls, kd_cfg, **computed) -> "Setup":
        """The fields named as `config.kd` keys (w_kd, temperature, ldam_scale, ...) from
        `kd_cfg`, the rest from `computed`, which must hold the two keys a run turns into
        values: drw_start (a step, not the fraction) and kd_class_weights (not the flag)."""
        if not {"drw_start", "kd_class_weights"} <= set(computed):
            raise TypeError("Setup.from_config needs drw_start and kd_class_weights computed")
        return super().from_config(kd_cfg, **computed)

    @property
    def needs_teacher(self) -> bool:
        return self.method not in STUDENT_ONLY


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
    """LDAM's NormedLinear on the backbone's own classifier: normalise h and each class column."""
    head = backbone_params["fc"] if "fc" in backbone_params else backbone_params["head"]
    w = head["kernel"].astype(jnp.float32)
    hn = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    wn = w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-12)
    return hn @ wn


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
def per_sample_loss(setup: Setup, out, labels, step, t_feats=None, t_logits=None):
    """(per-sample loss (B,), {part: per-sample values}) of `setup.method`."""
    m, counts, logits = setup.method, setup.class_counts, out["logits"]
    if m == "ldam_drw":
        w = losses.drw_weights(counts, step, setup.drw_start, setup.cb_beta)
        sup = losses.ldam(logits, labels, counts, setup.ldam_max_margin, setup.ldam_scale,
                          weights=w)
    else:  # the named loss; balanced softmax for it and under every KD method
        name = m if m in ("ce", "focal", "class_balanced", "logit_adjusted") else "balanced_softmax"
        sup = losses.classification_loss(name, logits, labels, class_counts=counts,
                                         focal_gamma=setup.focal_gamma, cb_beta=setup.cb_beta,
                                         la_tau=setup.la_tau)
    parts = {"loss_sup": sup}
    loss = sup
    if m == "hinton_kd":
        kd = losses.kd(logits, jax.lax.stop_gradient(t_logits), setup.temperature)
        parts["loss_kd"] = kd
        loss = loss + setup.w_hinton * kd
    if m in WITH_HEADS:
        sup_p, kd = objectives.projector_terms(
            out["proj"], out["proj_logits"], labels, t_feats, counts, l2=m == "feature_kd",
            kd_class_weights=setup.kd_class_weights)
        w = setup.w_feature if m == "feature_kd" else setup.w_kd
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
                kd_class_weights=setup.kd_class_weights)
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
        per, parts = per_sample_loss(setup, o, labels, state.step, t_feats, t_logits)
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
