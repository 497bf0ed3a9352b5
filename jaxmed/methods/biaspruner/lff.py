"""LfF, "Learning from Failure" (Nam et al., NeurIPS 2020), as a single-network debiasing
baseline in the continual frame: method 'lff'.

Per task, two networks train together on the task's data: a biased model with GCE(q), which
fits the easy (spurious) cue first, and the debiased model with CE weighted per sample by the
relative difficulty W(x) = L_b(x) / (L_b(x) + L_d(x)). L_b, L_d are exponential moving
averages (`ema`, 0.7 as the LfF code) of each sample's CE under the two models, kept in
per-sample memories indexed by record index, and, as the LfF code does, each divided by the
largest memory value of the sample's class before the ratio (`relative_difficulty`).

What changes lives in one pytree, `LfFState` (both models, their BN statistics, the optimizer
state, the memories), and the step is a module-level jitted function of it. Across tasks only
the debiased model carries on (shared backbone and BN, one head per task, like fine-tuning):
the biased model starts every task from a fresh initialisation, its memories from zero.
Inference is the debiased model's (`baselines.predict_batch`, entropy task selection).

Decisions: samples never seen in the task have memory 0 and count in the class maximum like
in the LfF code (a max of non-negative losses: no effect once any sample of the class was
seen); the class maximum is floored at 1e-8 so that a class whose losses are all 0 gives
W = 0, not NaN. One Adam over both models (Adam is per-parameter, so this equals two).
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

from jaxmed import losses
from jaxmed.methods.biaspruner import baselines, frame
from jaxmed.train import build, sharding, steps
from jaxmed.train.hyper import FromConfig


@flax.struct.dataclass
class LfFState:
    """One task's training state. params / batch_stats: {'biased', 'debiased'}, each model's
    {'backbone', 'heads'} and BN statistics; ema_b, ema_d: per-sample loss memories and
    `updated` (seen once) [index_bound]; labels: each memory slot's within-task label (-1 for
    records outside the task) [index_bound]."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_b: Any
    ema_d: Any
    updated: Any
    labels: Any
    rng: Any


@dataclasses.dataclass(frozen=True)
class Setup(FromConfig):
    """Static values of one run: the model, the optimizer, GCE's q and the memories' EMA
    (`config.continual` keys)."""

    model: Any
    tx: Any
    gce_q: float
    lff_ema: float


def ema_update(memory, updated, index, value, valid, alpha: float):
    """The LfF code's EMA: m[i] <- alpha m[i] + (1 - alpha * seen[i]) * value (the first
    update stores the value itself); padding (valid False) leaves the memory alone.
    Returns (memory, updated)."""
    n = memory.shape[0]
    idx = jnp.where(valid, index, n)  # out of range: dropped
    new = alpha * memory[index] + (1.0 - alpha * updated[index]) * value
    return (memory.at[idx].set(new, mode="drop"),
            updated.at[idx].set(1.0, mode="drop"))


def class_max(memory, labels, num_classes: int):
    """Largest memory value of each class [C] (slots with label -1 belong to none)."""
    ids = jnp.where(labels < 0, num_classes, labels)  # out of range: dropped
    per = jax.ops.segment_max(memory, ids, num_segments=num_classes)  # empty class: -inf
    return jnp.maximum(per, 1e-8)


def relative_difficulty(ema_b, ema_d, labels, index, y, num_classes: int):
    """W(x) = L_b / (L_b + L_d + 1e-8) with each loss divided by its class maximum."""
    lb = ema_b[index] / class_max(ema_b, labels, num_classes)[y]
    ld = ema_d[index] / class_max(ema_d, labels, num_classes)[y]
    return lb / (lb + ld + 1e-8)


@functools.partial(jax.jit, static_argnames=("model", "tx", "gce_q", "ema", "mesh"),
                   donate_argnums=0)
def train_step(state: LfFState, batch, inputs, *, model, tx, gce_q: float, ema: float, mesh):
    """Both models one step on task `inputs['task']`: GCE for the biased model, CE x W(x) for
    the debiased one, the memories updated with this batch's (detached) CE first."""
    steps.check_batch(batch)
    y, index, valid = batch["label"], batch["index"], batch["valid"]
    num_classes = inputs["cmask"].shape[1]

    def logits_of(params, stats):
        feats, new = frame.features(model, params["backbone"], stats, batch["image"],
                                    train=True)
        all_logits = frame.head_logits(feats, params["heads"], inputs["cmask"])
        return jnp.take(all_logits, inputs["task"], axis=1), new

    def loss_fn(params):
        lb, stats_b = logits_of(params["biased"], state.batch_stats["biased"])
        ld, stats_d = logits_of(params["debiased"], state.batch_stats["debiased"])
        ce_b = jax.lax.stop_gradient(losses.cross_entropy(lb, y))
        ce_d = jax.lax.stop_gradient(losses.cross_entropy(ld, y))
        ema_b, upd = ema_update(state.ema_b, state.updated, index, ce_b, valid, ema)
        ema_d, _ = ema_update(state.ema_d, state.updated, index, ce_d, valid, ema)
        w = relative_difficulty(ema_b, ema_d, state.labels, index, y, num_classes)
        loss = (losses.weighted_mean(losses.gce(lb, y, gce_q), valid)
                + losses.weighted_mean(losses.cross_entropy(ld, y) * w, valid))
        aux = ({"biased": stats_b, "debiased": stats_d}, ema_b, ema_d, upd, w)
        return loss, aux

    (loss, (stats, ema_b, ema_d, upd, w)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, masks=None,
                                   trainable=inputs["trainable"])
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=stats, opt_state=opt_state, ema_b=ema_b, ema_d=ema_d,
                          updated=upd)
    wv = valid.astype(jnp.float32)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "mean_weight": jnp.sum(w * wv) / jnp.maximum(wv.sum(), 1.0)}
    return jax.lax.with_sharding_constraint((state, metrics), sharding.replicated(mesh))


def init(seq: frame.TaskSequence) -> tuple[Setup, baselines.SharedNetwork]:
    bsetup, state = baselines.init(seq, "finetune")
    return Setup.from_config(seq.config.continual, model=bsetup.model, tx=bsetup.tx), state


def task_labels(seq: frame.TaskSequence, t: int) -> np.ndarray:
    """Within-task label of every record index of task t's training set, -1 elsewhere."""
    src = seq.tasks[t].splits["train"]
    table = np.full(seq.index_bound, -1, np.int32)
    for i in range(len(src)):
        rec = src[i]
        table[int(rec["index"])] = int(rec["label"])
    return table


def train_task(seq: frame.TaskSequence, setup: Setup, state: baselines.SharedNetwork, t: int,
               workdir: str) -> baselines.SharedNetwork:
    cfg, cc = seq.config, seq.config.continual
    s = jax.device_get(state)
    fresh = build.init_variables(setup.model, cfg.model, jax.random.PRNGKey(cfg.seed + 7919 + t),
                                 seq.image_shape)
    params = {"biased": {"backbone": jax.tree.map(np.asarray, fresh["params"]),
                         "heads": s.params["heads"]},
              "debiased": s.params}
    stats = {"biased": jax.device_get(fresh["batch_stats"]), "debiased": s.stats}
    head = np.arange(seq.num_tasks) == t
    trainable = jax.tree.map(lambda _: np.ones((), bool), params)
    for m in ("biased", "debiased"):
        trainable[m]["heads"] = {"kernel": head[:, None, None], "bias": head[:, None]}
    zeros = np.zeros(seq.index_bound, np.float32)
    ts = LfFState(step=np.int32(0), params=params, batch_stats=stats,
                  opt_state=setup.tx.init(params), ema_b=zeros, ema_d=zeros.copy(),
                  updated=zeros.copy(), labels=task_labels(seq, t),
                  rng=jax.random.PRNGKey(cfg.seed + t))
    inputs = seq.replicate({"trainable": trainable, "task": np.int32(t), "cmask": s.cmask})
    step = functools.partial(train_step, inputs=inputs, model=setup.model, tx=setup.tx,
                             gce_q=setup.gce_q, ema=setup.lff_ema, mesh=seq.mesh)
    ts = frame.run_phase(seq, f"{workdir}/train", ts, step, seq.tasks[t].splits["train"],
                         cc.biased_epochs + cc.finetune_epochs, cfg.seed + 10 * t)
    params, stats = jax.device_get((ts.params["debiased"], ts.batch_stats["debiased"]))
    return baselines.SharedNetwork(params=params, stats=stats, fisher=s.fisher,
                                   anchor=s.anchor, cmask=s.cmask, stored=np.int32(t + 1))


def predict(setup: Setup, state: baselines.SharedNetwork, batch, *, valid_tasks):
    return baselines.predict_batch(state, batch, valid_tasks, model=setup.model)


def method() -> frame.Method:
    return frame.Method(build=init, train_task=train_task, predict=predict)
