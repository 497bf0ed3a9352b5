"""The one jitted semi-supervised step, composed from the pure pieces per `Algorithm`.

    step(state: SSLState, batch) -> (state, metrics)

batch (global, every leaf sharded on the mesh's `data` axis):
    batch["labeled"]    image (B, H, W, C) uint8 weak view, label (B,) int, index (B,),
                        valid (B,) bool [, attrs]
    batch["unlabeled"]  weak, strong (mu B, H, W, C) uint8, index (mu B,) int (the record's
                        stable index, < num_slots), valid (mu B,) bool
                        [, weight (mu B,) float: optional per-sample loss weights]
    (supervised-only: batch["labeled"] alone.)

Per-sample unlabeled loss weights (for methods built on top, e.g. HTL's "attend who is
weak"): every unlabeled loss term (L_u, AdaPL, FreeMatch's fairness selection does not
weigh) is multiplied per sample by `state.sample_weight[index]` (the kit's (num_slots,)
float32 table, 1 at init, checkpointed; replace it with `state.replace(sample_weight=w)` from a
`state_hook`) times `batch["unlabeled"]["weight"]` when the batch has that field. Weights never change masks, pseudo labels or memories.

The student sees [labeled weak | unlabeled weak | unlabeled strong] in ONE forward pass (the
views an algorithm uses: pseudo-label needs no strong view), so BatchNorm statistics are those
of the whole concatenation (FixMatch's reference). The EMA teacher (mean teacher, AdaPL, IPH)
runs a second, stop-gradient forward on [labeled weak | unlabeled weak]; decision: in train
mode (batch statistics, which it then discards) as USB does, because the running statistics it
copies lag behind early in training.

Evaluation (`make_eval_step`, config.ssl.eval_ema, default on): USB's convention, the EMA model
of the student for every algorithm (USB's EMAHook / `ema_model`: params theta_ema <- m theta_ema
+ (1 - m) theta after each step, m = ema_m 0.999, buffers (BN statistics) copied from the
student). It is the `EmaTeacher` of `teacher.py`, with momentum `teacher_momentum`: one EMA per
run, as in USB, where mean teacher's teacher is that same `ema_model`; an algorithm without a
teacher keeps one for evaluation only (its forward is never run in training). The raw student
is evaluated beside it (`student_probs`, metrics `student/...`).

Memories (FlexMatch's per-sample status, AdaPL's temporal estimate, the weights) are indexed
by the stable record index and live in the state, so they are donated, checkpointed and
restored with it. Decision: they are replicated, not sharded on `data`: the rows of a global
batch are scattered to arbitrary indices, so a sharded memory would need an all-to-all per
step, while a replicated one costs 4 bytes per unlabeled record per device (40 kB for ISIC's
9.2k) and a (mu B)-row gather / scatter (benchmarks/tear_step.py measures the step time with
1e3 and 1e6 slots).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from jaxmed import losses
from jaxmed.data import augment
from jaxmed.methods.tear import adapl as adapl_lib
from jaxmed.methods.tear import prototypes as proto_lib
from jaxmed.methods.tear import pseudo_labels as pl_lib
from jaxmed.methods.tear import thresholds as th_lib
from jaxmed.methods.tear.algorithms import Algorithm
from jaxmed.methods.tear.teacher import EmaTeacher, ema_teacher_update
from jaxmed.train.hyper import FromConfig
from jaxmed.train.state import TrainState
from jaxmed.train import steps as steps_lib
from jaxmed.train.steps import forward


@dataclasses.dataclass(frozen=True)
class Hyper(FromConfig):
    """Plain hyper-parameters the step closes over (from config.ssl; defaults: spec / USB)."""
    num_classes: int
    total_steps: int
    ema_p: float = 0.999  # FreeMatch / SoftMatch / uniform-alignment EMAs (USB ema_p)
    teacher_momentum: float = 0.999  # EMA teacher (spec)
    da_length: int = 32  # TEAR's DA queue
    adapl_weight: float = 0.1  # spec (reference flag adapl-WEIGHT)
    adapl_distance: str = "kl"
    adapl_gamma: float = 2.0
    adapl_form: str = "rising"  # see adapl.py: the spec's literal formula contradicts its intent
    adapl_entropy: bool = False
    adapl_memory: bool = True  # per-sample temporal EMA of d
    adapl_memory_momentum: float = 0.9
    iph_weight: float = 0.1  # spec
    iph_iters: int = 3
    eval_ema: bool = True  # keep the student's EMA (teacher_momentum) and evaluate it (USB)
    compute_dtype: Any = jnp.float32


@flax.struct.dataclass
class SSLMemory:
    """What an algorithm carries between steps; parts it does not use are None."""
    teacher: EmaTeacher | None = None
    da: pl_lib.DAQueue | None = None
    uniform: pl_lib.UniformAlignState | None = None
    flex: th_lib.FlexMatchState | None = None
    free: th_lib.FreeMatchState | None = None
    soft: th_lib.SoftMatchState | None = None
    adapl: adapl_lib.AdaPLMemory | None = None
    iph: proto_lib.IPHState | None = None


@flax.struct.dataclass
class SSLState(TrainState):
    ssl: SSLMemory = None


def init_memory(alg: Algorithm, hp: Hyper, *, params, batch_stats, num_slots: int,
                num_unlabeled: int, feature_dim: int) -> SSLMemory:
    """The algorithm's memories; `num_unlabeled`: the records of the unlabeled stream
    (FlexMatch's USB ulb_dest_len, the labeled ones included when they are in it). With
    `hp.eval_ema` every algorithm, supervised-only included, keeps the EMA of the student."""
    ema = EmaTeacher.init(params, batch_stats) if alg.teacher or hp.eval_ema else None
    if not alg.unlabeled:
        return SSLMemory(teacher=ema)
    c = hp.num_classes
    return SSLMemory(
        teacher=ema,
        da=pl_lib.DAQueue.init(c, hp.da_length) if alg.da == "queue" else None,
        uniform=pl_lib.UniformAlignState.init(c) if alg.da == "uniform" else None,
        flex=th_lib.FlexMatchState.init(num_slots, num_unlabeled) if alg.mask == "flex" else None,
        free=th_lib.FreeMatchState.init(c) if alg.mask == "free" else None,
        soft=th_lib.SoftMatchState.init(c) if alg.mask == "soft" else None,
        adapl=adapl_lib.AdaPLMemory.init(num_slots) if alg.adapl else None,
        iph=proto_lib.IPHState.init(c, feature_dim) if alg.iph else None)


def create_ssl_state(state: TrainState, memory: SSLMemory, num_slots: int) -> SSLState:
    """The SSL state: `state`, the algorithm's memories and a weight-1 `sample_weight` table of
    `num_slots` entries (the unlabeled loss weights by stable index)."""
    return SSLState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                    opt_state=state.opt_state, masks=state.masks, rng=state.rng,
                    sample_weight=jnp.ones((num_slots,), jnp.float32), ssl=memory)


def freematch_fairness(mask, logits_s, p_model, label_hist, valid):
    """USB's FreeMatch `entropy_loss` over the masked rows: sum_c SumNorm(p~/h~) log
    SumNorm(mean_s / hist_s) (added as is, weight lambda_fair); 0 when nothing is masked."""
    sel = (mask > 0) & valid
    w = sel.astype(jnp.float32)
    probs = jax.nn.softmax(logits_s, axis=-1)
    c = probs.shape[-1]
    hist = jnp.sum(jax.nn.one_hot(jnp.argmax(probs, -1), c) * w[:, None], axis=0)
    hist = hist / jnp.maximum(jnp.sum(hist), 1.0)
    inv = lambda h: jnp.where(h > 0, 1.0 / jnp.where(h > 0, h, 1.0), 0.0)  # noqa: E731
    mod_model = jax.lax.stop_gradient(p_model * inv(label_hist))
    mod_model = mod_model / jnp.sum(mod_model)
    mean_s = jnp.sum(probs * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
    mod_mean = mean_s * jax.lax.stop_gradient(inv(hist))
    mod_mean = mod_mean / jnp.maximum(jnp.sum(mod_mean), 1e-12)
    loss = jnp.sum(mod_model * jnp.log(mod_mean + 1e-12))
    return jnp.where(jnp.any(sel), loss, 0.0)


def make_ssl_step(model, tx, alg: Algorithm, hp: Hyper, *, unlabeled_labels=None,
                  strong_fn: Callable | None = None):
    """(state, batch) -> (state, metrics) for `alg` (see the module docstring for the batch).

    unlabeled_labels: (num_slots,) int true labels by index (-1 unknown), used only for the
    monitoring metrics `pl_accuracy` / `pl_masked_accuracy`. strong_fn(rng, uint8 images) ->
    uint8 images: strong augmentation on the device, applied to batch["unlabeled"]["strong"]
    (then the host's strong chain is only the resize)."""
    c = hp.num_classes
    dtype = hp.compute_dtype
    true_u = None if unlabeled_labels is None else jnp.asarray(unlabeled_labels, jnp.int32)

    def loss_fn(params, state: SSLState, batch, drop_rng, aug_rng):
        lab = batch["labeled"]
        chex.assert_rank(lab["image"], 4)
        b = lab["image"].shape[0]
        images = [lab["image"]]
        if alg.unlabeled:
            ulb = batch["unlabeled"]
            chex.assert_equal_shape([ulb["weak"], ulb["strong"]])
            n_u = ulb["weak"].shape[0]
            strong = ulb["strong"] if strong_fn is None else strong_fn(aug_rng, ulb["strong"])
            images += [ulb["weak"] if v == "weak" else strong for v in alg.views]
        x = augment.normalize(jnp.concatenate(images, 0), dtype=dtype)
        (logits, feats), new_stats = forward(
            model, {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            masks=state.masks, rng=drop_rng, features=True)
        logits = logits.astype(jnp.float32)
        lx = logits[:b]
        sup = losses.weighted_mean(
            optax.softmax_cross_entropy_with_integer_labels(lx, lab["label"]), lab["valid"])
        acc = losses.weighted_mean((jnp.argmax(lx, -1) == lab["label"]).astype(jnp.float32),
                                   lab["valid"])
        out = {"sup_loss": sup, "accuracy": acc}
        mem = state.ssl
        if not alg.unlabeled:
            return sup, (new_stats, mem, out)

        parts = {v: logits[b + i * n_u: b + (i + 1) * n_u] for i, v in enumerate(alg.views)}
        uw = parts["weak"]
        us = parts.get("strong")
        feats_uw = feats[b: b + n_u] if "weak" in alg.views else None
        uv, ui = ulb["valid"], ulb["index"].astype(jnp.int32)
        uvf = uv.astype(jnp.float32)
        n_valid = jnp.maximum(jnp.sum(uvf), 1.0)
        weight = state.sample_weight[ui]
        if "weight" in ulb:
            weight = weight * ulb["weight"].astype(jnp.float32)
        probs_w = jax.nn.softmax(jax.lax.stop_gradient(uw), axis=-1)

        t_probs, t_feats = None, None
        if alg.teacher:
            t_x = augment.normalize(jnp.concatenate([lab["image"], ulb["weak"]], 0), dtype=dtype)
            (t_logits, t_feats), _ = forward(model, mem.teacher.variables, t_x, train=True,
                                             masks=state.masks, features=True)
            t_probs = jax.nn.softmax(jax.lax.stop_gradient(t_logits.astype(jnp.float32)), -1)
            t_feats = jax.lax.stop_gradient(t_feats.astype(jnp.float32))

        # distribution alignment
        p_lab = probs_w
        if alg.da == "queue":
            da, p_lab = pl_lib.distribution_alignment(mem.da, probs_w, uv)
            mem = mem.replace(da=da)
        elif alg.da == "uniform":
            uni = pl_lib.uniform_align_update(mem.uniform, probs_w, uv, hp.ema_p)
            mem = mem.replace(uniform=uni)
        # masks / weights
        if alg.mask == "fixed":
            mask = th_lib.fixed_threshold_mask(p_lab, alg.threshold)
        elif alg.mask == "flex":
            mask = th_lib.flexmatch_mask(mem.flex, probs_w, alg.threshold)
            mem = mem.replace(flex=th_lib.flexmatch_update(mem.flex, probs_w, ui, uv,
                                                           alg.threshold))
        elif alg.mask == "free":
            free = th_lib.freematch_update(mem.free, probs_w, uv, hp.ema_p)
            mem = mem.replace(free=free)
            mask = th_lib.freematch_mask(free, probs_w)
        elif alg.mask == "soft":
            aligned = pl_lib.uniform_align(mem.uniform, probs_w)
            soft = th_lib.softmatch_update(mem.soft, aligned, uv, hp.ema_p)
            mem = mem.replace(soft=soft)
            mask = th_lib.softmatch_weights(soft, aligned)
        else:
            mask = jnp.ones_like(probs_w[:, 0])
        hard = pl_lib.hard_pseudo_label(p_lab)

        if alg.consistency == "ce":
            per = optax.softmax_cross_entropy_with_integer_labels(us, hard)
        elif alg.consistency == "self":
            per = optax.softmax_cross_entropy_with_integer_labels(uw, hard)
        else:  # mean teacher: MSE of probabilities, mean over classes (USB)
            per = jnp.mean((jax.nn.softmax(us, -1) - t_probs[b:]) ** 2, axis=-1)
        unsup = jnp.sum(per * mask * weight * uvf) / n_valid
        ramp = 1.0
        if alg.unsup_warmup > 0:
            ramp = jnp.clip(state.step / (alg.unsup_warmup * hp.total_steps), 0.0, 1.0)
        total = sup + alg.lambda_u * ramp * unsup
        out.update(unsup_loss=unsup, mask_rate=jnp.sum(mask * uvf) / n_valid)

        if alg.lambda_fair:
            fair = freematch_fairness(mask, us, mem.free.p_model, mem.free.label_hist, uv)
            total = total + alg.lambda_fair * fair
            out["fair_loss"] = fair
        if alg.adapl:
            d = adapl_lib.adapl_estimate(probs_w, t_probs[b:], hp.adapl_distance,
                                         hp.adapl_entropy)
            if hp.adapl_memory:
                am, d = adapl_lib.adapl_memory_update(mem.adapl, d, ui, uv,
                                                      hp.adapl_memory_momentum)
                mem = mem.replace(adapl=am)
            eps = adapl_lib.adapl_epsilon(d, hp.adapl_gamma, hp.adapl_form)
            q = adapl_lib.adapl_targets(hard, eps, c)
            ad = adapl_lib.adapl_loss(us, q, mask * weight, uv)
            total = total + hp.adapl_weight * ad
            out.update(adapl_loss=ad, adapl_eps=jnp.sum(eps * uvf) / n_valid)
        if alg.iph:
            t_all = t_probs
            if alg.da == "queue":  # the EMA's aligned labels (spec)
                t_all = pl_lib.da_queue_align(mem.da, t_probs)
            t_valid = jnp.concatenate([lab["valid"], uv])
            tp, tpres = proto_lib.class_prototypes(t_feats, pl_lib.hard_pseudo_label(t_all),
                                                   t_valid, c)
            sp, spres = proto_lib.iph_student_prototypes(mem.iph, feats_uw.astype(jnp.float32),
                                                         uv, tp, tpres, hp.iph_iters)
            ip = proto_lib.iph_loss(sp, spres, tp, tpres)
            mem = mem.replace(iph=proto_lib.iph_update(mem.iph, sp))
            total = total + hp.iph_weight * ip
            out["iph_loss"] = ip
        if true_u is not None:
            truth = true_u[ui]
            known = uv & (truth >= 0)
            hit = (hard == truth).astype(jnp.float32)
            out["pl_accuracy"] = losses.weighted_mean(hit, known)
            out["pl_masked_accuracy"] = jnp.sum(hit * mask * known) / jnp.maximum(
                jnp.sum(mask * known), 1e-6)
        return total, (new_stats, mem, out)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: SSLState, batch: dict):
        rng, drop_rng, aug_rng = jax.random.split(state.rng, 3)
        (loss, (new_stats, mem, out)), grads = grad_fn(state.params, state, batch, drop_rng,
                                                      aug_rng)
        state = state.apply_gradients(tx, grads, batch_stats=new_stats, rng=rng)
        if mem.teacher is not None:
            mem = mem.replace(teacher=ema_teacher_update(mem.teacher, state.params,
                                                         state.batch_stats,
                                                         hp.teacher_momentum))
        state = state.replace(ssl=mem)
        out.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(state.params))
        return state, out

    return step


def ema_view(state: SSLState) -> SSLState:
    """`state` with the EMA model's params and BN statistics in place of the student's (the
    statistics are the student's, copied at each update: USB's `ema_model`)."""
    t = state.ssl.teacher
    if t is None:
        raise ValueError("the SSL state keeps no EMA of the student (config.ssl.eval_ema)")
    return state.replace(params=t.params, batch_stats=t.batch_stats)


def make_eval_step(model, *, compute_dtype=jnp.float32, eval_ema: bool = True):
    """(state, batch) -> per-sample `probs`, `loss`, `label` of the model evaluated: the EMA
    model with `eval_ema` (then also `student_probs`, `student_loss` of the raw student, from
    the same batch), else the student."""
    plain = steps_lib.make_eval_step(model, multi_label=False, compute_dtype=compute_dtype)
    if not eval_ema:
        return plain

    def step(state: SSLState, batch: dict):
        out = plain(ema_view(state), batch)
        student = plain(state, batch)
        out.update(student_probs=student["probs"], student_loss=student["loss"])
        return out

    return step
